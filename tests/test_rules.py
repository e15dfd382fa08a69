"""The vectorised selection rules against a plain reading of their definitions in docs/DESIGN.md ("Commit rules")."""

import pytest
import torch

from fastdllm.rules import commit_mask, quota_schedule


def reference_count(c, rule, k=1, t=0.9, f=1.0, d=0.25):
    """c: candidate confidences sorted descending (plain floats)."""
    if rule == "quota":
        return min(k, len(c))
    if rule == "threshold":
        return max(1, sum(x >= t for x in c))
    if rule == "factor":
        ok = [n for n in range(1, len(c) + 1) if c[n - 1] >= 1 - f / (n + 1)]
        return max([1] + ok)
    if rule == "frechet":
        ok = [n for n in range(1, len(c) + 1) if (sum(c[:n]) - (n - 1)) - (1 - c[n - 1]) > d]
        return max([1] + ok)


@pytest.mark.parametrize("rule", ["quota", "threshold", "factor", "frechet"])
def test_rules_match_their_definitions(rule):
    g = torch.Generator().manual_seed(0)
    B, L = 64, 12
    conf = torch.rand((B, L), generator=g, dtype=torch.float64) ** 0.3  # skewed towards 1: many commits
    cand = torch.rand((B, L), generator=g) < 0.7
    cand[0] = False  # a row with nothing to do commits nothing
    commit = commit_mask(conf, cand, rule, quota=3, threshold=0.9, factor=1.0, frechet_margin=0.25)
    assert not (commit & ~cand).any()
    for b in range(B):
        c = sorted(conf[b][cand[b]].tolist(), reverse=True)
        expect = reference_count(c, rule, k=3) if c else 0
        assert int(commit[b].sum()) == expect, (b, c)
        if expect:  # the committed ones are the most confident
            assert conf[b][commit[b]].min() >= max(conf[b][cand[b] & ~commit[b]].tolist() or [-1.0])
    counts = commit.sum(-1)
    assert counts.max() > 1  # the test exercises parallel commits


def test_quota_schedule_spreads_the_remainder_first():
    assert quota_schedule(8, 8) == [1] * 8
    assert quota_schedule(10, 4) == [3, 3, 2, 2]
    assert quota_schedule(3, 5) == [1, 1, 1, 0, 0]
