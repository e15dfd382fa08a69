"""Propose and commit: the pure part of a decoding step (docs/DESIGN.md, "The engine's step").

From the logits of each row's still-masked block positions it proposes a token per position (argmax, or a
Gumbel-max draw with temperature > 0) with its confidence (the float64 softmax probability of that token, or a
uniform draw with remasking "random"), and lets the rule choose which of them to commit. Every per-request setting
(temperature, the rule's threshold / factor / margin, the quota of the row's step) comes in per row, so requests with
different settings share one step; a row's result depends only on its own logits, settings and generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rules import commit_counts, commit_mask

# The proposal works on chunks of rows holding at most this many (position x vocabulary) entries, so its float64
# temporaries stay bounded (about 32 MiB each) at any batch size and vocabulary (LLaDA: 126k).
PROPOSE_CHUNK_ELEMENTS = 1 << 22
# The float32 path's exp and sums run over slabs of positions of at most this many logits (4 MiB, cache-sized).
FAST_SLAB_ELEMENTS = 1 << 20


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
    """Proposed tokens x0 (B, M) and their float64 confidences: `propose_bounded` with exact=True."""
    x0, conf, _ = propose_bounded(logits, select_idx, mask_id, block_length, temperature, remasking, generators,
                                  chunk_elements, exact=True)
    return x0, conf


def propose_bounded(logits: torch.Tensor, select_idx: torch.Tensor, mask_id: int, block_length: int,
                    temperature: list[float], remasking: str, generators,
                    chunk_elements: int = PROPOSE_CHUNK_ELEMENTS, exact: bool = False):
    """Proposed tokens x0 (B, M), their confidences (float64) and the confidences' relative error bound (B, M)
    (None when they are exact) from logits (B, M, V) for the M positions of each row's block that `select_idx`
    (B, M) indexes. Rows are taken in chunks of at most `chunk_elements` draws or logits, so no (rows x positions x
    vocabulary) temporary is ever held at once. `generators` (one per row, or None when no row samples) give each
    row's noise: a row draws for its whole block at every step it takes part in, so its stream does not depend on
    its batch or on when it joined.

    x0 is exactly what the float64 reference picks. The confidence of "low_confidence" remasking is computed in
    float32 with a proven bound `rel`: the float64 softmax probability c64 lies in [c (1 - rel), c (1 + rel)]
    (see `_fast_conf`); `exact=True`, float64 logits, or "random" remasking give the float64 values themselves.
    The mask token itself is never proposed (committing it would leave the position masked forever); its
    probability still counts in the softmax that gives the confidence. The logits come back as they went in."""
    B, M, V = logits.shape
    per_row = max(M, block_length if generators is not None else 0) * (V + 1)
    step = max(1, chunk_elements // per_row)
    fast = not exact and remasking == "low_confidence" and logits.dtype in _FAST_DTYPES
    x0 = torch.empty((B, M), dtype=torch.long, device=logits.device)
    conf = torch.empty((B, M), dtype=torch.float64, device=logits.device)
    rel = torch.empty((B, M), dtype=torch.float64, device=logits.device) if fast else None
    work = torch.empty((max(1, min(B * M, FAST_SLAB_ELEMENTS // V)), V), dtype=torch.float32,
                       device=logits.device) if fast else None
    for a in range(0, B, step):
        b = min(B, a + step)
        x0[a:b], conf[a:b], r = _propose_rows(logits[a:b], temperature[a:b], remasking,
                                              None if generators is None else generators[a:b], mask_id,
                                              block_length, select_idx[a:b], work)
        if fast:
            rel[a:b] = r
    return x0, conf, rel


_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _propose_rows(logits, temperature: list[float], remasking: str, gens, mask_id: int, block_length: int,
                  select_idx: torch.Tensor, work: torch.Tensor | None):
    """`propose_bounded` for one chunk of rows; `work` (float32 (k, V)) when the fast path runs."""
    fast = work is not None
    V = logits.shape[-1]
    log_z = None
    if remasking == "low_confidence" and not fast:
        log_z = torch.logsumexp(logits.double(), dim=-1)  # (b, M)
    mask_logit = logits[..., mask_id].clone()  # (b, M), put back at the end
    logits[..., mask_id] = -float("inf")
    sampled = [t > 0 for t in temperature]
    draws: dict[int, torch.Tensor] = {}
    if gens is not None:
        # a row with a generator draws for its whole block: V uniforms per position when it samples its tokens
        # (temperature > 0), and one more per position, the last column, that "random" remasking uses
        for i, g in enumerate(gens):
            if g is not None:
                draws[i] = torch.rand((block_length, V + 1) if sampled[i] else (block_length, 1), generator=g,
                                      device=logits.device, dtype=torch.float64)
    top, x0 = _max_first(logits)  # (b, M) the largest proposable logit and its first index, as argmax gives
    top_idx = x0.clone() if fast else None
    for i in (i for i, s in enumerate(sampled) if s):
        # argmax of exp(logits) / (-log u)^T, in log space: logits - T * log(-log u)
        gumbel = draws[i][:, :V].index_select(0, select_idx[i]).clamp_min(1e-300)  # (M, V)
        x0[i] = (logits[i].double() - temperature[i] * torch.log(-torch.log(gumbel))).argmax(-1)
    rel = None
    if remasking == "random":  # every row has a generator then
        conf = torch.stack([draws[i][:, -1] for i in range(len(temperature))]).gather(1, select_idx)  # (b, M)
    elif fast:
        conf, rel = _fast_conf(logits, x0, top, top_idx, mask_logit, work)
    else:
        conf = torch.exp(logits.gather(-1, x0[..., None]).squeeze(-1).double() - log_z)  # softmax(x0), float64
    logits[..., mask_id] = mask_logit
    return x0, conf, rel


# Unit roundoffs, the float32 exp's assumed error (torch's vectorised expf is within 1 ulp;
# tests/test_proposal.py checks that it is) and the length of the float32 partial sums.
_U32, _U64 = 2.0 ** -24, 2.0 ** -53
_EXP_ULPS = 4
SUM_CHUNK = 256


def _max_first(logits: torch.Tensor):
    """(max, argmax) over the last dimension, the index the first maximal one as `argmax` gives it (the first NaN
    when there is one), in one vectorised max pass: maxima of SUM_CHUNK-wide chunks, the first chunk holding the
    row's maximum, then an argmax within that chunk only (torch's argmax pass is several times slower than amax)."""
    V = logits.shape[-1]
    q = V // SUM_CHUNK
    parts = [logits[..., : q * SUM_CHUNK].unflatten(-1, (q, SUM_CHUNK)).amax(-1)] if q else []
    if q * SUM_CHUNK < V:
        parts.append(logits[..., q * SUM_CHUNK:].amax(-1, keepdim=True))
    chunk_max = torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # (b, M, chunks)
    top = chunk_max.amax(-1)  # (b, M)
    hit = (chunk_max == top[..., None]) | chunk_max.isnan()
    start = hit.to(torch.uint8).argmax(-1) * SUM_CHUNK  # (b, M) the first chunk holding the maximum
    cols = start[..., None] + torch.arange(SUM_CHUNK, device=logits.device)  # (b, M, SUM_CHUNK)
    vals = logits.gather(-1, cols.clamp_max(V - 1)).masked_fill(cols >= V, -float("inf"))
    return top, start + vals.argmax(-1)


def _fast_conf(logits: torch.Tensor, x0: torch.Tensor, top: torch.Tensor, top_idx: torch.Tensor,
               mask_logit: torch.Tensor, work: torch.Tensor):
    """The softmax probability of x0 over the whole vocabulary in float32, with its bound. logits (b, M, V) have
    the mask column at -inf, `top` is their max, `mask_logit` the mask column's own value.

    c = exp(l - m) / S with m the largest logit and S = sum_i exp(x_i - m) (S >= 1). The largest proposable term
    and the mask token's are added in float64 (so a confidence near 1 keeps its distance from 1); the others, `rest`,
    are summed in float32. Against the true p = exp(l - L), L = log sum exp(x_i), `rest` is off by at most:
      - d_i = x_i - m rounds in float32 to d_i (1 + e), |e| <= u32: term i is off by a factor exp(d_i e), and
        |d_i| <= 104 for every term that does not underflow (relative 104 u32);
      - each float32 exp is within _EXP_ULPS ulps (relative 2 u32 each); underflowed terms lose < 2^-149 each;
      - the float32 sums run over chunks of SUM_CHUNK terms (any order: nonnegative terms, relative error
        <= (SUM_CHUNK - 1) u32 / (1 - (SUM_CHUNK - 1) u32)) and the chunk sums add in float64;
      - the float64 steps (the two float64 terms, exp(l - m), the division) cost a few u64 each, times |l| + |m|.
    So S is off by at most err_s = fast * rest + V 2^-149 + 8 u64 S.
    The float64 reference c64 = exp(l - logsumexp64(x)) has its own error: its sum of V terms in any order
    (V u64), the term exps and the log, exp and subtraction (a few u64 times (1 + log V + |l| + |m|)). So
    |c - c64| <= c * rel with rel the sum of both, doubled to cover the products of small terms and the
    rounding of the bound itself. Positions whose values are not finite get rel = inf (decided in float64)."""
    V = logits.shape[-1]
    m = torch.maximum(top, mask_logit).float()  # (b, M) the largest logit of the whole vocabulary
    flat, m_flat = logits.reshape(-1, V), m.reshape(-1, 1)  # (b M, V): a view of the chunk's logits
    top_flat = top_idx.reshape(-1, 1)
    s = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)
    k = work.shape[0]
    q = V // SUM_CHUNK
    for a in range(0, flat.shape[0], k):  # slabs of positions that stay in cache for the three passes
        b = min(flat.shape[0], a + k)
        t = torch.sub(flat[a:b], m_flat[a:b], out=work[: b - a]).exp_()  # (k, V) float32, exp(x_i - m)
        t.scatter_(1, top_flat[a:b], 0.0)  # the largest proposable term is added in float64 below
        part = t[:, : q * SUM_CHUNK].unflatten(-1, (q, SUM_CHUNK)).sum(-1).double().sum(-1) if q else 0.0
        s[a:b] = part + (t[:, q * SUM_CHUNK:].sum(-1).double() if q * SUM_CHUNK < V else 0.0)
    rest = s.view(m.shape)  # (b, M) the float32 terms: all but the top and mask ones
    m64 = m.double()
    s = rest + torch.exp(top.double() - m64) + torch.exp(mask_logit.double() - m64)  # (b, M), S >= 1
    lx = logits.gather(-1, x0[..., None]).squeeze(-1).double()  # (b, M)
    conf = torch.exp(lx - m64) / s
    log_v = math.log(V)
    c = SUM_CHUNK - 1
    # relative error of the float32 part `rest`: |d_i| <= 104 for a term that does not underflow
    fast = 104 * _U32 + 2 * _EXP_ULPS * _U32 + c * _U32 / (1 - c * _U32)
    err_s = fast * rest + V * 2.0 ** -149 + 8 * _U64 * s  # absolute error of S
    ref = V * _U64 / (1 - V * _U64) + 16 * _U64 * (1 + log_v)
    rel = 2 * (err_s / s + ref + 16 * _U64 * (lx.abs() + m64.abs() + top.double().abs()))
    bad = ~(torch.isfinite(conf) & torch.isfinite(m64) & torch.isfinite(lx))
    return conf, rel.masked_fill(bad, float("inf"))


def _exact_conf(logits: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The float64 confidences of x0 (b, M) exactly as the reference path computes them (logits untouched)."""
    log_z = torch.logsumexp(logits.double(), dim=-1)
    lx = logits.gather(-1, x0[..., None]).squeeze(-1).double()
    lx = lx.masked_fill(x0 == mask_id, -float("inf"))
    return torch.exp(lx - log_z)


def decided(conf: torch.Tensor, rel: torch.Tensor, candidates: torch.Tensor, rule: str, **params) -> torch.Tensor:
    """(B,) True where the rule's decision on confidences known to lie in [conf (1 - rel), conf (1 + rel)] is
    the same for every value in those intervals, so the one on `conf` itself is the exact one.

    Two facts make it so. Every rule's count is non-decreasing in the confidences (threshold, factor and frechet
    test `sorted value >= bound` or a float64 cumulative sum that rounding keeps monotone, quota ignores them), and
    the k-th largest value is bracketed by the k-th largest lower and upper ends: equal counts at both ends fix the
    count. The commit set is then certain when every chosen interval lies strictly above every other candidate's."""
    neg = torch.full_like(conf, -float("inf"))
    lo = torch.where(candidates, conf - conf * rel, neg).clamp_min(0).masked_fill(~candidates, -float("inf"))
    hi = torch.where(candidates, conf + conf * rel, neg)
    n_cand = candidates.sum(-1)
    count_lo = commit_counts(lo.sort(-1, descending=True).values, n_cand, rule, **params)
    count_hi = commit_counts(hi.sort(-1, descending=True).values, n_cand, rule, **params)
    order = torch.where(candidates, conf, neg).sort(dim=-1, descending=True, stable=True).indices
    first = torch.arange(conf.shape[-1], device=conf.device)[None, :] < count_lo[:, None]  # chosen, in order
    low_chosen = torch.where(first, lo.gather(1, order), torch.full_like(conf, float("inf"))).amin(-1)
    high_rest = torch.where(first, neg, hi.gather(1, order)).amax(-1)
    return (count_lo == count_hi) & (low_chosen > high_rest) & torch.isfinite(rel).all(-1)


def propose_commit(logits: torch.Tensor, block: torch.Tensor, select_idx: torch.Tensor, mask_id: int, rule: str,
                   remasking: str, settings: RowSettings, generators, structured=None, tally: dict | None = None,
                   **kw) -> torch.Tensor:
    """One step's decision for every row: the row's block (B, bl) with the committed proposals written in.

    logits (B, M, V) are those of the block positions `select_idx` (B, M) (every still-masked one among them).
    The confidences come from the float32 path; a row whose decision its error bound cannot settle takes the
    float64 ones (`decided`), so every decision is the float64 reference's. `tally`, when given, counts the rows
    (`proposal_rows`) and those decided in float64 (`exact_rows`). `structured` (a
    fastdllm.structured.StructuredStep, or None when no row is constrained) masks the constrained rows' frontier
    logits, narrows their candidates to the grammar's valid run and writes their commits."""
    bl = block.shape[1]
    if structured is not None:
        structured.mask_logits(logits)
    x0, conf, rel = propose_bounded(logits, select_idx, mask_id, bl, settings.temperature, remasking, generators,
                                    **kw)
    dev = block.device
    candidates = (block == mask_id).gather(1, select_idx)  # (B, M)
    if structured is not None:
        candidates = structured.candidates(x0, candidates)
    params = {name: _values(getattr(settings, name), dev) for name in ("threshold", "factor", "frechet_margin")}
    quota = torch.tensor(settings.quota, device=dev) if rule in ("quota", "quota_threshold") else 1
    n_exact = 0
    if rel is not None:
        redo = (~decided(conf, rel, candidates, rule, quota=quota, **params)).nonzero().squeeze(1).tolist()
        n_exact = len(redo)
        for r in redo:  # one row at a time, as the float64 path at a large vocabulary does
            conf[r] = _exact_conf(logits[r: r + 1], x0[r: r + 1], mask_id)[0]
    if tally is not None:
        tally["proposal_rows"] = tally.get("proposal_rows", 0) + block.shape[0]
        tally["exact_rows"] = tally.get("exact_rows", 0) + n_exact
    commit_sel = commit_mask(conf, candidates, rule, quota=quota, **params)  # (B, M)
    commit = torch.zeros_like(block, dtype=torch.bool).scatter(1, select_idx, commit_sel)  # (B, bl)
    out = torch.where(commit, block.scatter(1, select_idx, x0), block)
    return out if structured is None else structured.commit(out, commit_sel, block)


def _values(v: list[float], device):
    """One float for every row when they agree (the common case), else a (B,) float64 tensor."""
    first = v[0]
    if all(x == first for x in v):
        return first
    return torch.tensor(v, dtype=torch.float64, device=device)
