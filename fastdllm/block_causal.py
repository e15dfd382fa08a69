"""Block-causal families (LLaDA2.x): canvas layout and the cache policies `none` and `prefix` (docs/DESIGN.md,
"Block-causal families").

A query sees its own block and the blocks before it, so a row's canvas is laid out in blocks counted from its
position 0: the prompt, then masks up to a whole number of blocks covering prompt + gen_length. The prompt's tail
shares a block with the first masks (its `lead` prompt tokens are not candidates), and the last block is decoded in
full, its tokens past prompt + gen_length dropped. Canvases are whole blocks and right-aligned at column T, so every
row's block boundaries fall on the same columns whatever its left padding.

Nothing after a row's current block is visible to it, so a forward only needs the columns up to the block's end;
and the keys/values of a finished block, once computed from its final tokens, never change: `prefix` keeps them and
forwards only the blocks whose keys/values are not final yet (the current block, plus the block finished at the
previous step), which is exact: its logits are those of `none` up to float rounding.

`dual` and `dllm` are refused: `dual` exists to reuse the keys/values of positions *after* the block, which a
block-causal query never reads, so it would be `prefix` under another name; dLLM-Cache approximates features of
a bidirectional model, which `prefix` makes unnecessary here.
"""

from __future__ import annotations

import torch

from .models.common import KVCache
from .models.llada2 import block_causal_mask

SUPPORTED_CACHES = ("none", "prefix")


def is_block_causal(model_config) -> bool:
    return bool(getattr(model_config, "block_causal", False))


def check_cache(model_config, cache: str) -> None:
    """Raise ValueError (one line) for a cache mode a block-causal family does not support."""
    if is_block_causal(model_config) and cache not in SUPPORTED_CACHES:
        raise ValueError(f"cache {cache!r} does not apply to the block-causal family {model_config.family} (its "
                         f"finished blocks never see later positions): use cache 'prefix' (exact) or 'none'")


def layout(prompt_len: int, gen_length: int, block_length: int) -> tuple[int, int, int]:
    """(canvas, region, lead): the canvas length (whole blocks from position 0 covering prompt + gen_length), the
    decoded region (from the block holding the prompt's tail to the end) and the prompt tokens at its start."""
    canvas = -(-(prompt_len + gen_length) // block_length) * block_length
    first = prompt_len // block_length * block_length
    return canvas, canvas - first, prompt_len - first


def _head_flops(model, n_rows: int, n_out: int) -> int:
    c = model.config
    return n_rows * 2 * n_out * c.d_model * c.vocab_size


class BlockNoCache:
    """`none`: every step forwards each row from its first column to the end of its current block (the longest
    such window among the rows), under the block-causal mask."""

    def __init__(self, model, cfg, slots: int, seq_len: int):
        self.bl = cfg.block_length

    def admit(self, slots):
        pass

    def move(self, src, dst):
        pass

    def grow(self, seq_len):
        pass

    def settle(self, continuing):
        pass

    def forward(self, model, rows, starts, select):
        from .policies import Step

        n, w = rows.n, rows.window()
        q1 = max(rows.block_start(i) for i in range(n)) + self.bl - w.first  # the latest block end, in the window
        pos, valid = w.positions[:, :q1], rows.valid[:n, w.first:w.first + q1]
        mask = block_causal_mask(pos, pos, valid, self.bl)  # (n, 1, q1, q1)
        h = model.hidden(w.x[:, :q1], pos, mask)  # (n, q1, d)
        logits = model.output(h, 0, starts - w.first, select)  # (n, M, V)
        return Step(logits, [n], n * model.forward_flops(q1, q1) + _head_flops(model, n, select.shape[1]))


class BlockPrefixCache:
    """`prefix`, exact: preallocated key/value buffers (one slot per row). A row's step forwards the columns
    [from, block end), where `from` is the start of the block it decoded at its previous step (the row's first
    column at its first step): that rewrites the keys/values of a block just finished with its final tokens, and
    those of the current block. Rows share one query window [min from, max block end); each writes only its own
    [from, block end) and attends over the cache under the block-causal mask."""

    def __init__(self, model, cfg, slots: int, seq_len: int):
        self.cache = KVCache.allocate(model.config, slots, seq_len, model.device, model.dtype)
        self.bl = cfg.block_length
        self.start: list[int | None] = [None] * slots  # per slot: the column its keys/values are final before

    def admit(self, slots):
        for s in slots:
            self.start[s] = None

    def move(self, src, dst):
        dev = self.cache.k.device
        self.cache.move(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))
        for a, b in zip(src, dst):
            self.start[b] = self.start[a]

    def grow(self, seq_len):
        d = seq_len - self.cache.seq_len
        self.cache = self.cache.grow(seq_len)
        self.start = [None if s is None else s + d for s in self.start]

    def settle(self, continuing):
        pass

    def forward(self, model, rows, starts, select):
        from .policies import Step

        n, w, T = rows.n, rows.window(), rows.T
        f = w.first
        ends = [rows.block_start(i) + self.bl for i in range(n)]
        froms = [self.start[i] if self.start[i] is not None else T - rows.live[i].canvas for i in range(n)]
        q0, q1 = min(froms) - f, max(ends) - f  # the query window, in window columns
        dev = rows.x.device
        cols = torch.arange(q0, q1, device=dev)[None, :]  # (1, Lq)
        lo = torch.tensor(froms, device=dev)[:, None] - f
        hi = torch.tensor(ends, device=dev)[:, None] - f
        write = (cols >= lo) & (cols < hi)  # (n, Lq) the columns each row rewrites
        mask = block_causal_mask(w.positions[:, q0:q1], w.positions, rows.valid[:n, f:], self.bl)  # (n,1,Lq,T-f)
        cache = self.cache.for_rows(None, write=write, first=f)
        h = model.hidden(w.x[:, q0:q1], w.positions[:, q0:q1], mask, cache, q0)  # (n, Lq, d)
        logits = model.output(h, q0, starts - f, select)
        for i in range(n):
            self.start[i] = rows.block_start(i)
        flops = n * model.forward_flops(q1 - q0, T - f) + _head_flops(model, n, select.shape[1])
        return Step(logits, [n], flops)


POLICIES = {"none": BlockNoCache, "prefix": BlockPrefixCache}


def early_stop(old: torch.Tensor, new: torch.Tensor, lead: torch.Tensor, stop_ids: torch.Tensor,
               mask_id: int) -> torch.Tensor:
    """(n,) rows to end mid-block (`eos_early_stop`): this step committed a stop token, and the row's first stop
    token in its generated part of the block (offsets >= lead) has no mask before it there.
    old/new (n, bl) the block before and after the commit; stop_ids (n, K) per-row stop ids padded with -1."""
    bl = new.shape[1]
    gen = torch.arange(bl, device=new.device)[None, :] >= lead[:, None]  # (n, bl)
    is_stop = (new[:, :, None] == stop_ids[:, None, :]).any(-1) & gen
    fresh = is_stop & (old == mask_id)
    masks_before = torch.cumsum((new == mask_id) & gen, dim=-1) - ((new == mask_id) & gen).long()  # exclusive
    first = is_stop.long().argmax(-1, keepdim=True)  # (n, 1) the first stop offset (0 when none)
    clean = masks_before.gather(1, first).squeeze(1) == 0
    return fresh.any(-1) & is_stop.any(-1) & clean
