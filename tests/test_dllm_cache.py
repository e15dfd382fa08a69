"""dLLM-Cache (cache="dllm"): exactness at interval 1, the per-layer partial update, settings."""

import math

import pytest
import torch

from fastdllm import DecodeConfig, generate
from fastdllm.dllm_cache import FeatureCache
from fastdllm.models.common import apply_rope, key_mask_from, positions_from_mask, rope_tables
from fastdllm.rules import RULES

from .conftest import random_prompts


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
@pytest.mark.parametrize("rule", RULES)
def test_refreshing_every_step_equals_no_cache(request, family, rule):
    model = request.getfixturevalue(family)
    prompts = random_prompts(model, [3, 11, 6], seed=11)
    base = dict(gen_length=32, block_length=8, steps=32, stop_at_eos=False, rule=rule, threshold=0.5, factor=2.0)
    plain = generate(model, prompts, DecodeConfig(cache="none", **base))
    dllm = generate(model, prompts, DecodeConfig(cache="dllm", prompt_interval=1, response_interval=1, **base))
    assert dllm.tokens == plain.tokens
    assert dllm.nfe == plain.nfe


def test_cached_steps_count_fewer_flops(llada_tiny):
    prompts = random_prompts(llada_tiny, [20, 9], seed=12)
    base = dict(gen_length=64, block_length=16, steps=64, stop_at_eos=False, rule="quota")
    plain = generate(llada_tiny, prompts, DecodeConfig(cache="none", **base))
    dllm = generate(llada_tiny, prompts, DecodeConfig(cache="dllm", **base))
    assert dllm.nfe == plain.nfe  # same schedule, so equal NFE
    assert dllm.stats["forward_flops"] < plain.stats["forward_flops"] / 2


def _rms(x, norm):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def test_partial_update_matches_a_direct_computation(llada_tiny):
    """One adaptive step, recomputed row by row with explicit matmuls from the cached features."""
    model, c = llada_tiny, llada_tiny.config
    torch.manual_seed(0)
    prompts = random_prompts(model, [5, 9], seed=13)
    P, G = 9, 16
    T, B = P + G, 2
    x = torch.full((B, T), c.mask_token_id)
    valid = torch.zeros((B, T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, P - len(p) : P] = torch.tensor(p)
        valid[b, P - len(p) :] = True
    pos, km = positions_from_mask(valid), key_mask_from(valid)
    fc = FeatureCache(model, B, T, P, prompt_interval=100, response_interval=100, adaptive_ratio=0.25)
    starts, block = torch.full((B,), P), torch.arange(8).expand(B, -1)  # logits for [P, P + 8)
    fc.forward(model, x, pos, km, [0, 0], starts, block)  # step 0: everything computed
    old = {name: getattr(fc, name).clone() for name in ("k", "v", "attn", "mlp")}
    x[:, P : P + 5] = torch.tensor([[7, 8, 9, 10, 11], [40, 41, 42, 43, 44]])  # some tokens got committed
    logits, _ = fc.forward(model, x, pos, km, [1, 1], starts, block)  # step 1: adaptive
    n_pick = math.floor(0.25 * G)
    hd, H = c.head_dim, c.n_heads
    for b in range(B):
        h = model.embed(x[b, P:])  # (G, d)
        cos, sin = rope_tables(pos[b : b + 1, P:], hd, c.rope_theta)
        keys_ok = valid[b]
        for li, layer in enumerate(model.layers):
            att = layer.attn
            n = _rms(h, layer.attn_norm)
            v_new = n @ att.v.weight.T  # (G, H * hd)
            v_old = old["v"][li, b, :, P:].transpose(0, 1).reshape(G, -1)
            sim = torch.nn.functional.cosine_similarity(v_new, v_old, dim=-1)
            picked = sorted(torch.argsort(sim)[:n_pick].tolist())
            K, V = old["k"][li, b].clone(), old["v"][li, b].clone()  # (H, T, hd)
            V[:, P:] = v_new.view(G, H, hd).transpose(0, 1)
            A, M = old["attn"][li, b].clone(), old["mlp"][li, b].clone()  # (T, d)
            q = apply_rope((n @ att.q.weight.T).view(1, G, H, hd).transpose(1, 2), cos, sin)[0]  # (H, G, hd)
            k = apply_rope((n @ att.k.weight.T).view(1, G, H, hd).transpose(1, 2), cos, sin)[0]
            for j in picked:
                K[:, P + j] = k[:, j]
            for j in picked:
                scores = (q[:, j : j + 1] @ K.transpose(1, 2)) / math.sqrt(hd)  # (H, 1, T)
                scores = scores.masked_fill(~keys_ok, -float("inf"))
                a = (scores.softmax(-1) @ V).transpose(0, 1).reshape(-1) @ att.o.weight.T  # (d,)
                A[P + j] = a
                u = _rms(h[j] + a, layer.mlp_norm)
                M[P + j] = (torch.nn.functional.silu(u @ layer.mlp.gate.weight.T) * (u @ layer.mlp.up.weight.T)) \
                    @ layer.mlp.down.weight.T
            for name, want in (("k", K), ("v", V), ("attn", A), ("mlp", M)):
                torch.testing.assert_close(getattr(fc, name)[li, b], want, atol=2e-5, rtol=1e-4, msg=name)
            h = h + A[P:] + M[P:]
        want_logits = _rms(h[:8], model.norm) @ model.lm_head.weight.T
        torch.testing.assert_close(logits[b], want_logits, atol=1e-4, rtol=1e-4)


def test_zero_ratio_reuses_the_response_until_its_refresh(llada_tiny):
    prompts = random_prompts(llada_tiny, [6], seed=14)
    x_cfg = dict(gen_length=16, block_length=16, steps=16, stop_at_eos=False, rule="quota", cache="dllm")
    out = generate(llada_tiny, prompts, DecodeConfig(adaptive_ratio=0.0, response_interval=4, **x_cfg))
    full = generate(llada_tiny, prompts, DecodeConfig(adaptive_ratio=0.0, response_interval=1, prompt_interval=1,
                                                     **x_cfg))
    assert out.nfe == full.nfe
    assert out.stats["forward_flops"] < full.stats["forward_flops"] / 2


def test_dllm_settings_are_validated():
    with pytest.raises(ValueError, match="response_interval \\(0\\) must be at least 1"):
        DecodeConfig(cache="dllm", response_interval=0)
    with pytest.raises(ValueError, match="adaptive_ratio must be in \\[0, 1\\]"):
        DecodeConfig(cache="dllm", adaptive_ratio=1.5)
    with pytest.raises(ValueError, match="prompt_interval must be an integer"):
        DecodeConfig(cache="dllm", prompt_interval=2.5)
    assert DecodeConfig(cache="dllm").response_interval == 7
