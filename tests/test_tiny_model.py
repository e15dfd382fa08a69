"""The shipped `tiny` model solves its tasks, and the task generators keep their text formats."""

import random
import re

import pytest

import fastdllm
from fastdllm.tasks import ADD_LIMIT, TASKS, addition, problems, random_problem, sorting

# 8 problems per task drawn with a fixed seed (not hand-picked); the bar is what the shipped model measured on them.
N_PER_TASK, SEED = 8, 2024
MIN_CORRECT = {"addition": 8, "sorting": 8}


def test_addition_format():
    p = addition(5071, 923)
    assert (p.task, p.prompt, p.answer) == ("addition", "5071+923=", "5994")
    assert addition(0, 0).prompt == "0+0=" and addition(9999, 9999).answer == "19998"
    with pytest.raises(ValueError, match="operands"):
        addition(10000, 1)
    with pytest.raises(ValueError, match="operands"):
        addition(-1, 1)


def test_sorting_format():
    p = sorting("93181")
    assert (p.task, p.prompt, p.answer) == ("sorting", "sort:93181=", "11389")
    for bad in ("123", "1" * 17, "12a4", ""):
        with pytest.raises(ValueError, match="4 to 16"):
            sorting(bad)


def test_random_problems_follow_the_formats():
    rng = random.Random(0)
    for _ in range(500):
        for uniform_digits in (False, True):
            p = random_problem("addition", rng, uniform_digits)
            m = re.fullmatch(r"(0|[1-9]\d{0,3})\+(0|[1-9]\d{0,3})=", p.prompt)
            assert m, p.prompt
            a, b = int(m.group(1)), int(m.group(2))
            assert a < ADD_LIMIT and b < ADD_LIMIT and p.answer == str(a + b)
        p = random_problem("sorting", rng)
        m = re.fullmatch(r"sort:(\d{4,16})=", p.prompt)
        assert m, p.prompt
        assert p.answer == "".join(sorted(m.group(1)))
    with pytest.raises(ValueError, match="not one of"):
        random_problem("division", rng)


def test_problem_draws_are_seeded():
    for task in TASKS:
        assert problems(task, 20, seed=3) == problems(task, 20, seed=3)
        assert problems(task, 20, seed=3) != problems(task, 20, seed=4)
    lengths = {len(p.prompt) - len("sort:=") for p in problems("sorting", 400, seed=0)}
    assert lengths == set(range(4, 17))


@pytest.fixture(scope="module")
def tiny():
    return fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")


@pytest.mark.parametrize("cache,rule", [("none", "quota"), ("dual", "threshold")])
@pytest.mark.parametrize("task", TASKS)
def test_shipped_model_solves_problems(tiny, task, cache, rule):
    model, tok = tiny
    probs = problems(task, N_PER_TASK, seed=SEED)
    cfg = fastdllm.DecodeConfig(gen_length=32, block_length=8, steps=32, cache=cache, rule=rule, threshold=0.9)
    out = fastdllm.generate(model, tok.encode_batch([p.prompt for p in probs]), cfg)
    got = tok.decode_batch(out.tokens)
    wrong = [(p.prompt, p.answer, g) for p, g in zip(probs, got) if g != p.answer]
    assert N_PER_TASK - len(wrong) >= MIN_CORRECT[task], wrong
    assert all(r == "stop" for r in out.finish_reasons)
    if rule == "threshold":  # parallel commits: well under the one-token-per-step baseline
        assert sum(out.nfe) / N_PER_TASK <= 0.5 * sum(-(-(len(p.answer) + 1) // 8) * 8 for p in probs) / N_PER_TASK


def test_answer_for_reads_the_task_formats():
    from fastdllm.tasks import answer_for

    assert answer_for("5071+923=") == "5994"
    assert answer_for("sort:93812=") == "12389"
    assert answer_for("hello") is None and answer_for("1+x=") is None and answer_for("sort:12") is None
