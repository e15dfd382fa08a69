"""The tiny model's tasks: text problems whose answers can be checked exactly.

Formats (other code and tests rely on them):
- addition: prompt "{a}+{b}=" with 0 <= a, b < 10000, answer "{a+b}";
- sorting:  prompt "sort:{s}=" with s 4 to 16 decimal digits, answer the same digits in ascending order.
The built-in model is trained to write the answer, then the stop token, within a 32-token generation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
