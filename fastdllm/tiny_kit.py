"""The built-in `tiny` model's kit in one place: its task formats and problem sets, the one scoring function, the
character tokenizer, the model shape and the decode settings it is trained and measured with.
scripts/train_tiny.py, scripts/eval_tiny.py, scripts/bench_decode.py, the demo and the tests all take them from here.

Task formats (other code and tests rely on them):
- addition: prompt "{a}+{b}=" with 0 <= a, b < 10000, answer "{a+b}";
- sorting:  prompt "sort:{s}=" with s 4 to 16 decimal digits, answer the same digits in ascending order.
The model writes the answer, then the stop token, within a 32-token generation (block length 8).

Problem sets (PROBLEM_SETS), each a fixed function of its seed:
- addition: operands uniform in [0, 10000), so about 90% of them have 4 digits;
- addition-mixed: each operand's digit count uniform in 1-4, then the operand uniform among those numbers;
- sorting: a length uniform in 4-16, digits uniform.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .models.common import ModelConfig

# ---------------------------------------------------------------------------------------------------- tasks
TASKS = ("addition", "sorting")
ADD_LIMIT = 10_000  # operands are in [0, ADD_LIMIT)
SORT_MIN_DIGITS, SORT_MAX_DIGITS = 4, 16


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


def addition(a: int, b: int) -> Problem:
    if not (0 <= a < ADD_LIMIT and 0 <= b < ADD_LIMIT):
        raise ValueError(f"addition operands must be in [0, {ADD_LIMIT}), got {a} and {b}")
    return Problem("addition", f"{a}+{b}=", str(a + b))


def sorting(s: str) -> Problem:
    if not (s.isdigit() and s.isascii() and SORT_MIN_DIGITS <= len(s) <= SORT_MAX_DIGITS):
        raise ValueError(f"sorting input must be {SORT_MIN_DIGITS} to {SORT_MAX_DIGITS} decimal digits, got {s!r}")
    return Problem("sorting", f"sort:{s}=", "".join(sorted(s)))


def random_operand(rng: random.Random, uniform_digits: bool = False) -> int:
    """An operand in [0, 10000): uniform over the range, or (uniform_digits) with a uniform number of digits 1-4,
    which gives short numbers far more weight than the uniform draw does."""
    if not uniform_digits:
        return rng.randrange(ADD_LIMIT)
    n = rng.randint(1, 4)
    return rng.randrange(10 ** (n - 1) if n > 1 else 0, 10**n)


def random_problem(task: str, rng: random.Random, uniform_digits: bool = False) -> Problem:
    """One problem of `task` drawn from `rng`. Sorting inputs have a uniform length in [4, 16]."""
    if task == "addition":
        return addition(random_operand(rng, uniform_digits), random_operand(rng, uniform_digits))
    if task == "sorting":
        n = rng.randint(SORT_MIN_DIGITS, SORT_MAX_DIGITS)
        return sorting("".join(rng.choice("0123456789") for _ in range(n)))
    raise ValueError(f"task {task!r} is not one of: {', '.join(TASKS)}")


def problems(task: str, n: int, seed: int, uniform_digits: bool = False) -> list[Problem]:
    """n problems of `task`, a fixed function of seed. The evaluation draw has operands uniform in [0, 10000)
    (mostly 4 digits); uniform_digits draws each operand's digit count uniformly from 1-4 instead."""
    rng = random.Random(f"{task}:{seed}" + (":digits" if uniform_digits else ""))
    return [random_problem(task, rng, uniform_digits) for _ in range(n)]


# name -> (task, uniform_digits)
PROBLEM_SETS = {"addition": ("addition", False), "addition-mixed": ("addition", True), "sorting": ("sorting", False)}


def problem_set(name: str, n: int, seed: int) -> list[Problem]:
    """n problems of the named set (PROBLEM_SETS), a fixed function of seed."""
    if name not in PROBLEM_SETS:
        raise ValueError(f"problem set {name!r} is not one of: {', '.join(PROBLEM_SETS)}")
    task, uniform_digits = PROBLEM_SETS[name]
    return problems(task, n, seed, uniform_digits)


def answer_for(prompt: str) -> str | None:
    """The correct answer to a prompt in one of the task formats above (None for any other text)."""
    body = prompt[:-1] if prompt.endswith("=") else None
    if body is None:
        return None
    if body.startswith("sort:") and body[5:].isdigit() and body[5:].isascii():
        return "".join(sorted(body[5:]))
    a, plus, b = body.partition("+")
    if plus and a.isdigit() and b.isdigit() and a.isascii() and b.isascii():
        return str(int(a) + int(b))
    return None


def score(prompts, completions) -> list[bool]:
    """Whether each decoded completion (special tokens dropped) is exactly the answer to its prompt: the one
    scoring rule of the trainer's quick eval, scripts/eval_tiny.py and the demo. Prompts may be Problems."""
    prompts = [p.prompt if isinstance(p, Problem) else p for p in prompts]
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    right = []
    for prompt, text in zip(prompts, completions):
        answer = answer_for(prompt)
        right.append(answer is not None and text == answer)
    return right


# ---------------------------------------------------------------------------------------------------- decoding
GEN_LENGTH, BLOCK_LENGTH = 32, 8


def decode_config(cache: str = "none", rule: str = "quota", **fields):
    """The tiny model's DecodeConfig: gen_length 32, block_length 8, greedy. The defaults are the baseline (no
    cache, one token per step); threshold rules use 0.9 unless given."""
    from .decoding import DecodeConfig

    kw = dict(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, steps=GEN_LENGTH, cache=cache, rule=rule,
              threshold=0.9)
    kw.update(fields)
    return DecodeConfig(**kw)


# ---------------------------------------------------------------------------------------------------- tokenizer
CHAR_SPECIALS = ("<|pad|>", "<|eos|>", "<|mask|>", "<|unk|>")
# A plain chat template for character-level models: the user's text as is (the tiny tasks carry their own format).
CHAR_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def char_vocab() -> dict[str, int]:
    """Specials (pad 0, eos 1, mask 2, unk 3), then the printable ASCII characters."""
    chars = [chr(c) for c in range(32, 127)]
    return {t: i for i, t in enumerate(list(CHAR_SPECIALS) + chars)}


VOCAB = char_vocab()
PAD, EOS, MASK, UNK = (VOCAB[t] for t in CHAR_SPECIALS)
_ID_TO_CHAR = {i: c for c, i in VOCAB.items()}


def encode(text: str) -> list[int]:
    """Character ids, as the saved Hugging Face tokenizer gives them (unknown characters: <|unk|>)."""
    return [VOCAB.get(c, UNK) for c in text]


def decode(ids) -> str:
    """Text of ids with the special tokens dropped, as the saved tokenizer decodes with skip_special_tokens."""
    return "".join(_ID_TO_CHAR[int(i)] for i in ids if int(i) >= len(CHAR_SPECIALS))


def save_char_tokenizer(directory) -> dict[str, int]:
    """Write the character-level Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) to `directory`."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel(VOCAB, unk_token="<|unk|>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(list(CHAR_SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", eos_token="<|eos|>",
                                  mask_token="<|mask|>", unk_token="<|unk|>")
    tok.chat_template = CHAR_CHAT_TEMPLATE
    tok.save_pretrained(str(directory))
    return dict(VOCAB)


# ---------------------------------------------------------------------------------------------------- model shape
SHAPE = dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden=384)  # the shipped model's shape


def tiny_config(**overrides) -> ModelConfig:
    """A LLaDA-architecture config of the tiny shape over the character vocabulary; `overrides` change any field
    (the shape, or the vocabulary and special ids for other small test models)."""
    kw = dict(family="llada", vocab_size=len(VOCAB), **SHAPE, n_kv_heads=SHAPE["n_heads"], rope_theta=10000.0,
              norm_eps=1e-5, qkv_bias=False, tie_embeddings=False, mask_token_id=MASK, max_seq_len=512,
              pad_token_id=PAD, stop_token_ids=(EOS,))
    kw.update(overrides)
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        kw["n_kv_heads"] = kw["n_heads"]
    return ModelConfig(**kw)
