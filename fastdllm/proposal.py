"""Propose and commit: the pure part of a decoding step (docs/DESIGN.md, "The engine's step").

From the logits of each row's still-masked block positions it proposes a token per position (argmax, or a
Gumbel-max draw with temperature > 0) with its confidence (the float64 softmax probability of that token, or a
uniform draw with remasking "random"), and lets the rule choose which of them to commit. Every per-request setting
(temperature, the rule's threshold / factor / margin, the quota of the row's step) comes in per row, so requests with
different settings share one step; a row's result depends only on its own logits, settings and generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rules import select

# The proposal works on chunks of rows holding at most this many (position x vocabulary) entries, so its float64
# temporaries stay bounded (about 32 MiB each) at any batch size and vocabulary (LLaDA: 126k).
PROPOSE_CHUNK_ELEMENTS = 1 << 22


@dataclass
class RowSettings:
    """The per-row settings of the rows in a step, in row order (host lists; the rule parameters become tensors)."""

    temperature: list[float]
    threshold: list[float]
    factor: list[float]
    frechet_margin: list[float]
    quota: list[int]  # the quota rule's count for each row's current step


def propose(logits: torch.Tensor, select_idx: torch.Tensor, mask_id: int, block_length: int,
            temperature: list[float], remasking: str, generators, chunk_elements: int = PROPOSE_CHUNK_ELEMENTS):
    """Proposed tokens x0 (B, M) and their confidences (float64) from logits (B, M, V) for the M positions of each
    row's block that `select_idx` (B, M) indexes. Rows are taken in chunks of at most `chunk_elements` draws or
    logits, so no float64 (rows x positions x vocabulary) tensor is ever held at once. `generators` (one per row, or
    None when no row samples) give each row's noise: a row draws for its whole block at every step it takes part in,
    so its stream does not depend on its batch or on when it joined.

    The mask token itself is never proposed (committing it would leave the position masked forever); its
    probability still counts in the softmax that gives the confidence. The logits are overwritten."""
    B, M, V = logits.shape
    per_row = max(M, block_length if generators is not None else 0) * (V + 1)
    step = max(1, chunk_elements // per_row)
    x0 = torch.empty((B, M), dtype=torch.long, device=logits.device)
    conf = torch.empty((B, M), dtype=torch.float64, device=logits.device)
    for a in range(0, B, step):
        b = min(B, a + step)
        x0[a:b], conf[a:b] = _propose_rows(logits[a:b], temperature[a:b], remasking,
                                           None if generators is None else generators[a:b], mask_id, block_length,
                                           select_idx[a:b])
    return x0, conf


def _propose_rows(logits, temperature: list[float], remasking: str, gens, mask_id: int, block_length: int,
                  select_idx: torch.Tensor):
    """`propose` for one chunk of rows."""
    V = logits.shape[-1]
    log_z = torch.logsumexp(logits.double(), dim=-1) if remasking == "low_confidence" else None  # (b, M)
    logits[..., mask_id] = -float("inf")  # in place: the caller's logits are not used again
    sampled = [t > 0 for t in temperature]
    draws: dict[int, torch.Tensor] = {}
    if gens is not None:
        # a row with a generator draws for its whole block: V uniforms per position when it samples its tokens
        # (temperature > 0), and one more per position, the last column, that "random" remasking uses
        for i, g in enumerate(gens):
            if g is not None:
                draws[i] = torch.rand((block_length, V + 1) if sampled[i] else (block_length, 1), generator=g,
                                      device=logits.device, dtype=torch.float64)
    x0 = logits.argmax(-1)  # (b, M)
    for i in (i for i, s in enumerate(sampled) if s):
        # argmax of exp(logits) / (-log u)^T, in log space: logits - T * log(-log u)
        gumbel = draws[i][:, :V].index_select(0, select_idx[i]).clamp_min(1e-300)  # (M, V)
        x0[i] = (logits[i].double() - temperature[i] * torch.log(-torch.log(gumbel))).argmax(-1)
    if remasking == "random":  # every row has a generator then
        conf = torch.stack([draws[i][:, -1] for i in range(len(temperature))]).gather(1, select_idx)  # (b, M)
    else:
        conf = torch.exp(logits.gather(-1, x0[..., None]).squeeze(-1).double() - log_z)  # softmax(x0), float64
    return x0, conf


def propose_commit(logits: torch.Tensor, block: torch.Tensor, select_idx: torch.Tensor, mask_id: int, rule: str,
                   remasking: str, settings: RowSettings, generators, **kw) -> torch.Tensor:
    """One step's decision for every row: the row's block (B, bl) with the committed proposals written in.

    logits (B, M, V) are those of the block positions `select_idx` (B, M) (every still-masked one among them)."""
    bl = block.shape[1]
    x0, conf = propose(logits, select_idx, mask_id, bl, settings.temperature, remasking, generators, **kw)
    dev = block.device
    candidates = (block == mask_id).gather(1, select_idx)  # (B, M)
    params = {name: _values(getattr(settings, name), dev) for name in ("threshold", "factor", "frechet_margin")}
    quota = torch.tensor(settings.quota, device=dev) if rule in ("quota", "quota_threshold") else 1
    commit_sel = select(conf, candidates, rule, quota=quota, **params)  # (B, M)
    commit = torch.zeros_like(block, dtype=torch.bool).scatter(1, select_idx, commit_sel)  # (B, bl)
    return torch.where(commit, block.scatter(1, select_idx, x0), block)


def _values(v: list[float], device):
    """One float for every row when they agree (the common case), else a (B,) float64 tensor."""
    first = v[0]
    if all(x == first for x in v):
        return first
    return torch.tensor(v, dtype=torch.float64, device=device)
