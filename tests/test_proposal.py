"""The float32 proposal with its float64 fallback decides exactly what the float64 proposal decides.

The reference below is the float64 proposal step the engine ran before the fast path (logsumexp of the float64
logits, argmax of the float32 ones, float64 Gumbel-max for sampling); every case compares whole committed blocks.
"""

import math

import pytest
import torch

from fastdllm import proposal
from fastdllm.proposal import RowSettings, propose_commit
from fastdllm.rules import RULES, commit_mask as select

MASK = 5


def reference(logits, block, sel, rule, remasking, st, gens):
    """The float64 proposal step: tokens and commit mask from float64 softmax probabilities."""
    B, M, V = logits.shape
    bl = block.shape[1]
    logits = logits.clone()
    log_z = torch.logsumexp(logits.double(), dim=-1)
    logits[..., MASK] = -math.inf
    x0 = logits.argmax(-1)
    draws = {}
    for i in range(B):
        if gens is not None and gens[i] is not None:
            shape = (bl, V + 1) if st.temperature[i] > 0 else (bl, 1)
            draws[i] = torch.rand(shape, generator=gens[i], dtype=torch.float64)
    for i in range(B):
        if st.temperature[i] > 0:
            u = draws[i][:, :V].index_select(0, sel[i]).clamp_min(1e-300)
            x0[i] = (logits[i].double() - st.temperature[i] * torch.log(-torch.log(u))).argmax(-1)
    if remasking == "random":
        conf = torch.stack([draws[i][:, -1] for i in range(B)]).gather(1, sel)
    else:
        conf = torch.exp(logits.gather(-1, x0[..., None]).squeeze(-1).double() - log_z)
    cand = (block == MASK).gather(1, sel)
    params = {k: torch.tensor(getattr(st, k), dtype=torch.float64) for k in ("threshold", "factor", "frechet_margin")}
    commit_sel = select(conf, cand, rule, quota=torch.tensor(st.quota), **params)
    commit = torch.zeros_like(block, dtype=torch.bool).scatter(1, sel, commit_sel)
    return torch.where(commit, block.scatter(1, sel, x0), block)


def settings(B, **kw):
    base = dict(temperature=[0.0] * B, threshold=[0.9] * B, factor=[1.0] * B, frechet_margin=[0.25] * B,
                quota=[2] * B)
    base.update(kw)
    return RowSettings(**base)


def gens_for(B, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(B)]


def check(logits, block, sel, rule, st, remasking="low_confidence", sampling=False, tally=None):
    """The fast step's blocks equal the reference's; returns how many rows fell back to float64."""
    B = logits.shape[0]
    gens = gens_for(B) if (sampling or remasking == "random") else None
    want = reference(logits, block, sel, rule, remasking, st, gens)
    gens = gens_for(B) if (sampling or remasking == "random") else None
    t = {} if tally is None else tally
    before = t.get("exact_rows", 0)
    got = propose_commit(logits.clone(), block, sel, MASK, rule, remasking, st, gens, tally=t)
    assert torch.equal(got, want), (rule, remasking, (got != want).nonzero()[:5])
    return t.get("exact_rows", 0) - before


def random_case(g, B, M, bl, V, scale, dtype=torch.float32):
    logits = (torch.randn((B, M, V), generator=g) * scale).to(dtype)
    block = torch.full((B, bl), MASK)
    sel = torch.stack([torch.randperm(bl, generator=g)[:M] for _ in range(B)])
    # some selected positions already committed (not candidates): their proposals must not be written
    done = torch.rand((B, bl), generator=g) < 0.25
    block[done] = 1
    return logits, block, sel


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("V", [37, 256, 300, 1029])
def test_random_logits_same_blocks_as_float64(rule, V):
    g = torch.Generator().manual_seed(V)
    for scale in (1e-3, 0.05, 1.0, 4.0, 30.0):
        logits, block, sel = random_case(g, 6, 8, 8, V, scale)
        st = settings(6, threshold=[0.9, 0.5, 0.1, 0.01, 1e-3, 0.99], factor=[0.5, 1, 2, 4, 8, 0.1],
                      frechet_margin=[0.25, -2.0, -5.0, 0.0, 0.5, -0.5], quota=[1, 2, 3, 8, 1, 4])
        check(logits, block, sel, rule, st)


@pytest.mark.parametrize("rule", RULES)
def test_ties_and_saturated_confidences(rule):
    """Equal confidences (duplicated positions, integer logits) keep the float64 step's lowest-index order, and
    confidences that round to 1.0 in float64 are ordered as the float64 step orders them."""
    g = torch.Generator().manual_seed(1)
    B, M, bl, V = 8, 8, 8, 64
    logits = torch.randint(-3, 4, (B, M, V), generator=g).float()  # many exact ties
    logits[:, 3] = logits[:, 1]  # identical positions: identical confidences
    logits[:2, :, 9] = 60.0  # confidence 1.0 in float64 at every position of two rows
    logits[2, :4, 9] = torch.tensor([17.0, 18.0, 19.0, 20.0])  # close to 1, apart only in float64
    logits[3, :, MASK] = 50.0  # the mask token dominates: tiny confidences
    logits[4, :, 11] = -math.inf  # some logits -inf
    block = torch.full((B, bl), MASK)
    sel = torch.arange(bl).expand(B, -1)
    st = settings(B, threshold=[0.9, 1.0, 0.999999, 0.5, 0.2, 0.3, 0.01, 0.9], quota=[1, 3, 2, 2, 5, 1, 7, 8])
    check(logits, block, sel, rule, st)


def _exact_conf(logits, sel_block, rule):
    st = settings(logits.shape[0])
    cand = torch.ones(logits.shape[:2], dtype=torch.bool)
    x0 = logits.clone()
    x0[..., MASK] = -math.inf
    x0 = x0.argmax(-1)
    return torch.exp(logits.gather(-1, x0[..., None]).squeeze(-1).double()
                     - torch.logsumexp(logits.double(), -1)), st, cand


@pytest.mark.parametrize("ulps", [-2, -1, 0, 1, 2])
def test_threshold_at_a_confidence_plus_minus_ulps(ulps):
    """A row's threshold placed exactly on, or 1-2 ulps around, one of its float64 confidences (never its largest,
    whose count the rule's minimum of one settles): the fast step cannot tell these apart in float32 and must take
    the float64 path, with the float64 decision."""
    g = torch.Generator().manual_seed(2 + ulps)
    B, M, V = 8, 6, 500
    logits = torch.randn((B, M, V), generator=g) * 3
    logits[:, :, 17] += torch.linspace(0, 12, M)  # a spread of confidences up to ~1
    conf, _, _ = _exact_conf(logits, None, "threshold")
    thr = conf.sort(-1, descending=True).values[torch.arange(B), torch.arange(B) % (M - 1) + 1]  # not the top one
    for _ in range(abs(ulps)):
        thr = torch.nextafter(thr, torch.full_like(thr, math.inf if ulps > 0 else -math.inf))
    block = torch.full((B, M), MASK)
    sel = torch.arange(M).expand(B, -1)
    n = check(logits, block, sel, "threshold", settings(B, threshold=thr.tolist()))
    assert n == B  # the count is 1 or 2 within float32 rounding of every row's boundary


@pytest.mark.parametrize("ulps", [-1, 0, 1])
def test_factor_and_frechet_at_their_boundaries(ulps):
    """factor: 1 - f / (n + 1) equal to (or 1 ulp off) the n-th confidence; frechet: the margin equal to (or 1 ulp
    off) the float64 score of n candidates."""
    g = torch.Generator().manual_seed(10 + ulps)
    B, M, V = 6, 6, 300
    logits = torch.randn((B, M, V), generator=g)
    logits[:, :, 3] += torch.linspace(8, 14, M)  # confidences close to 1
    conf, _, _ = _exact_conf(logits, None, "factor")
    srt = conf.sort(-1, descending=True).values
    n = torch.arange(B) % (M - 1) + 1  # the boundary at n candidates
    c_n = srt[torch.arange(B), n - 1]
    step = (lambda v: torch.nextafter(v, torch.full_like(v, math.inf if ulps > 0 else -math.inf))) if ulps else None
    factor = (1.0 - c_n) * (n + 1).double()  # 1 - f/(n+1) == c_n up to rounding
    if step:
        factor = step(factor)
    block = torch.full((B, M), MASK)
    sel = torch.arange(M).expand(B, -1)
    assert check(logits, block, sel, "factor", settings(B, factor=factor.tolist())) > 0
    nn = torch.arange(1, M + 1)
    score = srt.cumsum(-1) - (nn - 1) - (1.0 - srt)
    margin = score[torch.arange(B), n - 1]
    if step:
        margin = step(margin)
    assert check(logits, block, sel, "frechet", settings(B, frechet_margin=margin.tolist())) > 0


@pytest.mark.parametrize("rule", RULES)
def test_sampling_and_random_remasking_keep_the_float64_stream(rule):
    g = torch.Generator().manual_seed(3)
    logits, block, sel = random_case(g, 5, 4, 8, 300, 2.0)
    st = settings(5, temperature=[0.0, 0.5, 1.0, 2.0, 0.1])
    check(logits, block, sel, rule, st, sampling=True)
    check(logits, block, sel, rule, st, remasking="random")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    g = torch.Generator().manual_seed(4)
    for rule in RULES:
        logits, block, sel = random_case(g, 4, 8, 8, 700, 3.0, dtype)
        check(logits, block, sel, rule, settings(4, threshold=[0.9, 0.3, 0.1, 0.05]))


def test_bound_holds_and_is_tight_enough():
    """|c32 - c64| <= c32 * rel on many logits, and rel is small enough that almost no row falls back."""
    g = torch.Generator().manual_seed(5)
    for V in (50, 1000, 32000):
        for scale in (1e-4, 0.02, 1.0, 10.0, 100.0):
            logits = torch.randn((4, 8, V), generator=g) * scale
            x0, c64 = proposal.propose(logits.clone(), torch.arange(8).expand(4, -1), MASK, 8, [0.0] * 4,
                                       "low_confidence", None)
            x0f, c32, rel = proposal.propose_bounded(logits.clone(), torch.arange(8).expand(4, -1), MASK, 8,
                                                     [0.0] * 4, "low_confidence", None)
            assert torch.equal(x0, x0f)
            assert ((c32 - c64).abs() <= c32 * rel).all()
            assert (rel < 1e-4).all()


def test_logits_come_back_unchanged():
    g = torch.Generator().manual_seed(6)
    logits, block, sel = random_case(g, 3, 4, 8, 300, 2.0)
    keep = logits.clone()
    propose_commit(logits, block, sel, MASK, "threshold", "low_confidence", settings(3), None)
    assert torch.equal(logits, keep)


def test_float32_exp_is_within_the_assumed_ulps():
    """The bound assumes torch's float32 exp within _EXP_ULPS ulps; measure it on a dense grid of its inputs."""
    d = torch.linspace(-87.0, 0.0, 2_000_001)
    got = torch.exp(d).double()
    want = torch.exp(d.double())
    ulp = torch.nextafter(want.float(), torch.tensor(math.inf)).double() - want.float().double()
    assert ((got - want).abs() / ulp).max() <= proposal._EXP_ULPS


def test_max_first_is_argmax():
    g = torch.Generator().manual_seed(7)
    for V in (5, 256, 257, 1000):
        x = torch.randint(-2, 3, (3, 7, V), generator=g).float()
        x[0, 0, V // 2] = math.nan
        x[1, 1, -1] = 9.0
        top, idx = proposal._max_first(x)
        assert torch.equal(idx, x.argmax(-1))
        assert torch.equal(top[~top.isnan()], x.amax(-1)[~top.isnan()])
