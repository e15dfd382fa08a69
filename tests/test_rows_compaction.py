"""fastdllm.rows.Rows on its own: `add` right-aligns joining canvases into holes first, then after the last row;
`drop` retires rows and moves the last rows into the holes, so the rows in flight stay in slots [0, n)."""

import torch

from fastdllm.rows import Live, Rows

MASK, PAD, BL = 99, 0, 4


def _live(name: str, prompt: list[int], gen: int = 4) -> Live:
    return Live(request=name, canvas=len(prompt) + gen, gen_length=gen, n_blocks=gen // BL, generator=None)


def _expected_row(prompt: list[int], gen: int, T: int) -> list[int]:
    return [PAD] * (T - len(prompt) - gen) + prompt + [MASK] * gen


def _check(rows: Rows, want: dict[str, list[int]], gen: int = 4):
    """Slots [0, n) hold exactly the rows named in `want`, each right-aligned with its own positions."""
    T = rows.T
    assert [r.request for r in rows.live] == list(want)
    for slot, (name, prompt) in enumerate(want.items()):
        assert rows.x[slot].tolist() == _expected_row(prompt, gen, T), name
        start = T - len(prompt) - gen
        assert rows.valid[slot].tolist() == [False] * start + [True] * (T - start), name
        assert rows.positions[slot].tolist() == [0] * start + list(range(T - start)), name


def test_add_fills_holes_first_then_appends_and_drop_compacts():
    rows = Rows(slots=5, seq_len=10, block_length=BL, mask_id=MASK, pad_id=PAD, device="cpu")
    prompts = {"a": [1, 2], "b": [3, 4, 5, 6], "c": [7], "d": [8, 9, 10], "e": [11, 12, 13, 14, 15, 16]}
    used = rows.add([(p, _live(k, p)) for k, p in prompts.items()], [])
    assert used == [0, 1, 2, 3, 4] and rows.n == 5
    assert all(r.left == BL for r in rows.live)
    _check(rows, prompts)

    # b and d finish; two rows above the new count (c stays, e moves): e fills b's slot, d's slot is freed
    src, dst = rows.drop([1, 3])
    assert (src, dst) == ([4], [1])
    assert rows.n == 3
    _check(rows, {"a": prompts["a"], "e": prompts["e"], "c": prompts["c"]})

    # f joins into the hole of a (finished), g after the last row; nothing left to compact
    f, g = [20, 21, 22], [23]
    holes = [0]
    used = rows.add([(f, _live("f", f)), (g, _live("g", g))], holes)
    assert used == [0, 3] and holes == []
    assert rows.drop(holes) == ([], [])
    _check(rows, {"f": f, "e": prompts["e"], "c": prompts["c"], "g": g})


def test_drop_of_the_last_rows_moves_nothing_and_a_hole_left_by_add_is_closed():
    rows = Rows(slots=4, seq_len=8, block_length=BL, mask_id=MASK, pad_id=PAD, device="cpu")
    prompts = {"a": [1], "b": [2, 3], "c": [4, 5, 6], "d": [7, 8]}
    rows.add([(p, _live(k, p)) for k, p in prompts.items()], [])
    before = rows.x.clone()
    assert rows.drop([2, 3]) == ([], [])  # the finished rows were the last ones: no copy
    assert rows.n == 2 and torch.equal(rows.x[:2], before[:2])
    _check(rows, {"a": [1], "b": [2, 3]})

    # a finishes and b too, but only one request joins: it takes a's slot and b's hole is closed (nothing above)
    rows.add([(p, _live(k, p)) for k, p in {"c": [4, 5, 6], "d": [7, 8]}.items()], [])
    holes = [0, 2]  # a and c finished
    used = rows.add([([9, 9, 9, 9], _live("h", [9, 9, 9, 9]))], holes)
    assert used == [0] and holes == [2]
    src, dst = rows.drop(holes)
    assert (src, dst) == ([3], [2])  # d, the last row, moves into c's slot
    _check(rows, {"h": [9, 9, 9, 9], "b": [2, 3], "d": [7, 8]})


def test_grow_moves_every_row_right_and_keeps_its_positions():
    rows = Rows(slots=2, seq_len=6, block_length=BL, mask_id=MASK, pad_id=PAD, device="cpu")
    rows.add([([1, 2], _live("a", [1, 2])), ([3], _live("b", [3]))], [])
    assert rows.grow(9) == 3 and rows.T == 9
    _check(rows, {"a": [1, 2], "b": [3]})
    assert rows.block_starts().tolist() == [5, 5]  # the generated region ends at T for every row
