"""The shipped `tiny` model solves its tasks, and the task generators keep their text formats."""

import random
import re

import pytest

import fastdllm
from fastdllm import tiny_kit
from fastdllm.tiny_kit import (ADD_LIMIT, PROBLEM_SETS, TASKS, addition, decode_config, problem_set, problems,
                               random_problem, score, sorting)

# 8 problems per set drawn with a fixed seed (not hand-picked); the bar is what the shipped model measured on them.
N_PER_TASK, SEED = 8, 2024
MIN_CORRECT = {"addition": 8, "addition-mixed": 8, "sorting": 8}


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
@pytest.mark.parametrize("task", PROBLEM_SETS)
def test_shipped_model_solves_problems(tiny, task, cache, rule):
    model, tok = tiny
    probs = problem_set(task, N_PER_TASK, seed=SEED)
    out = fastdllm.generate(model, tok.encode_batch([p.prompt for p in probs]), decode_config(cache, rule))
    got = tok.decode_batch(out.tokens)
    wrong = [(p.prompt, p.answer, g) for p, g, ok in zip(probs, got, score(probs, got)) if not ok]
    assert N_PER_TASK - len(wrong) >= MIN_CORRECT[task], wrong
    assert all(r == "stop" for r in out.finish_reasons)
    if rule == "threshold":  # parallel commits: well under the one-token-per-step baseline
        assert sum(out.nfe) / N_PER_TASK <= 0.5 * sum(-(-(len(p.answer) + 1) // 8) * 8 for p in probs) / N_PER_TASK


def test_answer_for_reads_the_task_formats():
    from fastdllm.tiny_kit import answer_for

    assert answer_for("5071+923=") == "5994"
    assert answer_for("sort:93812=") == "12389"
    assert answer_for("hello") is None and answer_for("1+x=") is None and answer_for("sort:12") is None


def test_score_is_exact_match_with_the_answer():
    probs = [addition(12, 7), sorting("3121"), addition(5, 5)]
    assert score(probs, ["19", "1123", "10 "]) == [True, True, False]
    assert score(["12+7=", "hello", "sort:21="], ["19", "hello", "21"]) == [True, False, False]  # no answer: wrong
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        score(["1+1=", "2+2="], ["2"])


def test_problem_sets():
    assert set(PROBLEM_SETS) == {"addition", "addition-mixed", "sorting"}
    assert problem_set("addition", 50, 1) == problems("addition", 50, 1)
    mixed = problem_set("addition-mixed", 400, 1)
    digits = [len(p.prompt[:-1].split("+")[0]) for p in mixed]
    assert {d: digits.count(d) > 60 for d in range(1, 5)} == {1: True, 2: True, 3: True, 4: True}  # ~100 each
    with pytest.raises(ValueError, match="not one of"):
        problem_set("subtraction", 1, 0)


def test_kit_codec_and_config_match_the_shipped_checkpoint(tiny):
    """The trainer's fast codec is the saved Hugging Face tokenizer, and the kit's config is the shipped shape."""
    model, tok = tiny
    for text in ("5071+923=", "sort:0918273645=", "12+7=", "hello, world!"):
        assert tiny_kit.encode(text) == tok.encode(text)
        assert tiny_kit.decode(tiny_kit.encode(text) + [tiny_kit.EOS, tiny_kit.PAD]) == text
    assert tiny_kit.decode([tiny_kit.MASK, tiny_kit.encode("7")[0], tiny_kit.EOS]) == tok.decode(
        [tiny_kit.MASK, tiny_kit.encode("7")[0], tiny_kit.EOS]) == "7"
    c, shipped = tiny_kit.tiny_config(), model.config
    for field in ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden",
                  "mask_token_id", "pad_token_id"):
        assert getattr(c, field) == getattr(shipped, field), field
    assert tiny_kit.EOS in shipped.stop_token_ids


def test_saved_char_tokenizer_round_trips(tmp_path):
    vocab = tiny_kit.save_char_tokenizer(tmp_path)
    tok = fastdllm.load_tokenizer(tmp_path)
    assert vocab == tiny_kit.VOCAB and tok.encode("sort:93=") == tiny_kit.encode("sort:93=")
    assert tok.hf.mask_token_id == tiny_kit.MASK and tok.hf.eos_token_id == tiny_kit.EOS
