"""Selection rules: which candidate positions a decoding step commits.

Each rule is a pure tensor function over a batch, vectorised with one sort and cumulative sums per row:
no Python loop over rows, no host synchronisation. Inputs are the candidates' confidences (B, L) in float64 with
non-candidates at -inf; the output is the boolean commit mask (B, L). A rule parameter is one number for every
row or a (B,) tensor of per-row values (requests with their own thresholds share a step).
"""

from __future__ import annotations

import torch

from .config import RULES


def _per_row(v, like: torch.Tensor):
    """A rule parameter as a column (B, 1) when it is per row, else as it is."""
    return v[:, None].to(like.dtype) if isinstance(v, torch.Tensor) else v


def quota_schedule(masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of `steps` steps for `masked` positions: masked // steps each, +1 for the first
    masked % steps steps (LLaDA's schedule)."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def commit_counts(sorted_conf: torch.Tensor, n_cand: torch.Tensor, rule: str, *, quota: int | torch.Tensor = 1,
                  threshold=0.9, factor=1.0, frechet_margin=0.25) -> torch.Tensor:
    """How many of the most confident candidates each row commits (B,), from confidences sorted descending.
    `quota` is one count for every row or a (B,) tensor of per-row counts (rows at different steps of their blocks);
    threshold, factor and frechet_margin likewise."""
    B, L = sorted_conf.shape
    threshold, factor, frechet_margin = (_per_row(v, sorted_conf) for v in (threshold, factor, frechet_margin))
    n = torch.arange(1, L + 1, device=sorted_conf.device)  # candidate count n for each sorted slot
    valid = n[None, :] <= n_cand[:, None]  # (B, L)
    if rule == "quota":
        count = torch.as_tensor(quota, dtype=n_cand.dtype, device=n_cand.device).expand_as(n_cand)
    elif rule == "quota_threshold":
        # LLaDA2: every candidate strictly above the threshold when there are at least the step's quota of them,
        # else the quota's most confident
        above = ((sorted_conf > threshold) & valid).sum(-1)
        q = torch.as_tensor(quota, dtype=n_cand.dtype, device=n_cand.device).expand_as(n_cand)
        count = torch.where(above >= q, above, q)
    elif rule == "threshold":
        count = ((sorted_conf >= threshold) & valid).sum(-1)
    elif rule == "factor":
        # largest n with c_(n) >= 1 - f / (n + 1); the condition only gets harder as n grows.
        ok = (sorted_conf >= 1.0 - factor / (n + 1).to(sorted_conf.dtype)) & valid
        count = (ok * n).amax(-1)
    elif rule == "frechet":
        # largest n with (c_(1) + ... + c_(n) - (n - 1)) - (1 - c_(n)) > margin
        c = torch.where(valid, sorted_conf, torch.zeros((), dtype=sorted_conf.dtype, device=sorted_conf.device))
        score = c.cumsum(-1) - (n - 1) - (1.0 - c)
        count = ((score > frechet_margin) & valid).mul(n).amax(-1)
    else:
        raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    return torch.minimum(count.clamp(min=1), n_cand)  # at least one, never more than there are candidates


def commit_mask(confidence: torch.Tensor, candidates: torch.Tensor, rule: str, **params) -> torch.Tensor:
    """Commit mask (B, L): the rule's count of the most confident candidates in each row."""
    conf = torch.where(candidates, confidence, torch.full_like(confidence, -float("inf")))
    sorted_conf, order = conf.sort(dim=-1, descending=True, stable=True)  # (B, L)
    n_cand = candidates.sum(-1)
    count = commit_counts(sorted_conf, n_cand, rule, **params)
    take_sorted = torch.arange(conf.shape[-1], device=conf.device)[None, :] < count[:, None]
    return torch.zeros_like(candidates).scatter(-1, order, take_sorted)
