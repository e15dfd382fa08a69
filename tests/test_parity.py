"""Parity with the public reference implementations (fixtures written by their own code)."""

import pytest
import torch

from fastdllm import DecodeConfig, generate

from .conftest import load_cases

LLADA_CASES = load_cases("llada")
DECODE_CASES = [c for c in LLADA_CASES if "kind" not in c]


def test_llada_logits_match_reference(llada_tiny):
    (case,) = [c for c in LLADA_CASES if c.get("kind") == "logits"]
    logits = llada_tiny(torch.tensor([case["input"]]))[0]
    ref = torch.tensor(case["logits_rows"])
    assert (logits[case["rows"]] - ref).abs().max() < 1e-4


def test_dream_logits_match_reference(dream_tiny):
    case = next(c for c in load_cases("dream") if c["kind"] == "logits")
    logits = dream_tiny(torch.tensor([case["input"]]))[0]
    assert (logits[case["rows"]] - torch.tensor(case["logits_rows"])).abs().max() < 1e-4


def test_dream_left_padded_logits_match_reference(dream_tiny):
    case = next(c for c in load_cases("dream") if c["kind"] == "logits_padded")
    logits = dream_tiny(torch.tensor(case["input"]), attention_mask=torch.tensor(case["attention_mask"]))
    ref = torch.tensor(case["logits_rows"])
    for b in range(len(case["input"])):
        assert (logits[b, case["rows"]] - ref[b]).abs().max() < 1e-4


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"p{len(c['prompt'])}-{c['cache']}-{c['rule']}")
def test_llada_decode_trace_matches_reference(llada_tiny, case):
    cfg = DecodeConfig(gen_length=case["gen_length"], block_length=case["block_length"], steps=case["steps"],
                       cache=case["cache"], rule=case["rule"], stop_at_eos=False, **case["params"])
    out = generate(llada_tiny, [case["prompt"]], cfg)
    assert out.tokens[0] == case["output"]
    assert out.nfe[0] == case["nfe"]
    assert out.stats["forward_passes"] == case["nfe"]


def test_reference_traces_cover_every_mode_and_rule():
    assert {(c["cache"], c["rule"]) for c in DECODE_CASES} == {
        (m, r) for m in ("none", "prefix", "dual") for r in ("quota", "threshold", "factor", "frechet")}
