"""Decoding settings: `DecodeConfig`, the defaults an engine gives every request (docs/DESIGN.md, "Decoding semantics").

This module imports nothing else from fastdllm, so the decoding loop, the cache policies and the rules can all
import it. The names of the cache modes and rules are listed here; their registries (`fastdllm.policies`,
`fastdllm.rules`) are checked against these lists at import time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

CACHE_MODES = ("none", "prefix", "dual", "dllm")
RULES = ("quota", "threshold", "factor", "frechet", "quota_threshold")
REMASKING = ("low_confidence", "random")


def _f(default, description: str):
    """A field with its description in the metadata (what `fastdllm plan --schema` prints)."""
    return field(default=default, metadata={"description": description})


_KINDS = {"int": (int, "an integer"), "float": ((int, float), "a number"), "bool": (bool, "true or false"),
          "str": (str, "text")}


@dataclass(kw_only=True)
class DecodeConfig:
    """Decoding settings (docs/DESIGN.md, "Decoding semantics"). Invalid values raise ValueError; this is the one
    check of them (the job manifest's decode section calls it too). Each field's description: its metadata."""

    gen_length: int = _f(256, "Generated positions per row (a multiple of block_length).")
    block_length: int = _f(32, "Positions per block; blocks are decoded left to right.")
    steps: int = _f(256, "Total steps for the quota rules: steps / num_blocks per block (a multiple of the number "
                         "of blocks unless steps_per_block is set).")
    steps_per_block: int | None = _f(None, "The quota rules' steps per block; null: steps / num_blocks.")
    cache: str = _f("dual", f"KV cache policy: {' | '.join(CACHE_MODES)} (fastdllm.policies.CACHE_POLICIES).")
    rule: str = _f("threshold", f"Commit rule: {' | '.join(RULES)} (quota_threshold: LLaDA2's own).")
    threshold: float = _f(0.9, "threshold / quota_threshold rules: commit candidates at least this confident, in "
                               "(0, 1].")
    factor: float = _f(1.0, "factor rule: commit the n most confident with c_(n) >= 1 - factor / (n + 1); > 0.")
    frechet_margin: float = _f(0.25, "frechet rule (Fast-dLLM++): the Frechet lower bound's margin; >= 0.")
    temperature: float = _f(0.0, "0: greedy; > 0: Gumbel noise seeded by (seed, row id).")
    remasking: str = _f("low_confidence", f"Confidence of a candidate: {' | '.join(REMASKING)} (a uniform number).")
    stop_at_eos: bool = _f(True, "Finish a row once its block is complete and a stop token was committed; the "
                                 "output is cut before the first stop token.")
    eos_early_stop: bool = _f(False, "End a row mid-block once a committed stop token has no mask before it.")
    stop_token_ids: tuple[int, ...] | None = _f(None, "Stop token ids; null: the checkpoint's own.")
    seed: int = _f(0, "Seed of the sampling noise (with each row's id); >= 0.")
    # dLLM-Cache (cache="dllm"): defaults are the paper's LLaDA setting.
    prompt_interval: int = _f(50, "dLLM-Cache: refresh interval of the prompt's features, in steps (K_p).")
    response_interval: int = _f(7, "dLLM-Cache: refresh interval of the response's features, in steps (K_r).")
    adaptive_ratio: float = _f(0.25, "dLLM-Cache: share of response positions recomputed per layer on the other "
                                     "steps (rho), in [0, 1].")

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        for f in dataclasses.fields(self):  # the declared type, first (a string where a number goes: one line)
            if f.type in _KINDS:
                v, (want, what) = getattr(self, f.name), _KINDS[f.type]
                if not isinstance(v, want) or (isinstance(v, bool) and f.type != "bool"):
                    bad(f"{f.name} must be {what}, got {v!r}")
        spb = self.steps_per_block
        if spb is not None and (isinstance(spb, bool) or not isinstance(spb, int) or spb < 1):
            bad(f"steps_per_block must be a positive integer or None, got {spb!r}")
        if self.gen_length < 1 or self.block_length < 1:
            bad(f"gen_length ({self.gen_length}) and block_length ({self.block_length}) must be positive")
        if self.gen_length % self.block_length:
            bad(f"block_length ({self.block_length}) must divide gen_length ({self.gen_length})")
        if self.cache not in CACHE_MODES:
            bad(f"cache {self.cache!r} is not one of: {', '.join(CACHE_MODES)}")
        if self.rule not in RULES:
            bad(f"rule {self.rule!r} is not one of: {', '.join(RULES)}")
        if self.remasking not in REMASKING:
            bad(f"remasking {self.remasking!r} is not one of: {', '.join(REMASKING)}")
        if self.steps < 1:
            bad(f"steps must be at least 1, got {self.steps}")
        if self.rule in ("quota", "quota_threshold") and spb is None and self.steps % self.num_blocks:
            bad(f"steps ({self.steps}) must be a multiple of the number of blocks "
                f"({self.num_blocks} = gen_length / block_length) for rule {self.rule!r}")
        if not 0.0 < self.threshold <= 1.0:
            bad(f"threshold must be in (0, 1], got {self.threshold}")
        if not (self.factor > 0 and math.isfinite(self.factor)):
            bad(f"factor must be a positive number, got {self.factor}")
        if not (self.frechet_margin >= 0 and math.isfinite(self.frechet_margin)):
            bad(f"frechet_margin must be a non-negative number, got {self.frechet_margin}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.prompt_interval < 1 or self.response_interval < 1:
            bad(f"prompt_interval ({self.prompt_interval}) and response_interval ({self.response_interval}) "
                "must be at least 1 step")
        if not 0.0 <= self.adaptive_ratio <= 1.0:
            bad(f"adaptive_ratio must be in [0, 1], got {self.adaptive_ratio}")
        if self.seed < 0:
            bad(f"seed must be >= 0, got {self.seed}")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if isinstance(ids, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                bad(f"stop_token_ids must be a list of token ids, got {ids!r}")
            self.stop_token_ids = tuple(ids)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def block_steps(self) -> int:
        """The quota rule's steps per block (engine-wide: a request of another gen_length keeps it)."""
        return self.steps_per_block or max(1, self.steps // self.num_blocks)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown decode setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["stop_token_ids"] is not None:
            d["stop_token_ids"] = list(d["stop_token_ids"])
        return d
