#!/usr/bin/env python
"""LLaDA2 (block-causal MoE) decoding: cache `prefix` against `none` at equal NFE, on a random-weight llada2_moe.

Rule quota_threshold with threshold 1.0 (nothing is strictly above it), so both modes commit the quota schedule
and take exactly the same forwards; the script checks that their tokens are identical and reports tokens/s.
The grouped-matmul MoE is also timed against a per-expert loop (the reference's way) on the same weights.

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/bench_llada2.py                 # d512, 8 layers, 8 experts, top 2
    python scripts/bench_llada2.py --device cuda --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastdllm import DecodeConfig, generate
from fastdllm.models import from_config
from fastdllm.models.llada2 import from_hf_config


def shape(a) -> dict:
    return dict(model_type="llada2_moe", vocab_size=a.vocab, hidden_size=a.d_model, num_hidden_layers=a.n_layers,
                num_attention_heads=a.d_model // 64, num_key_value_heads=max(1, a.d_model // 256), head_dim=64,
                intermediate_size=4 * a.d_model, partial_rotary_factor=0.5, num_experts=a.experts,
                num_experts_per_tok=a.top_k, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                moe_intermediate_size=a.d_model, num_shared_experts=1, first_k_dense_replace=1,
                mask_token_id=a.vocab - 1, max_position_embeddings=4096, rms_norm_eps=1e-6)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--steps-per-block", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    model = from_config(from_hf_config(shape(a)), device=a.device, dtype=dtype, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, a.vocab - 1, (a.prompt,), generator=g).tolist() for _ in range(a.batch)]
    res = {}
    for cache in ("none", "prefix"):
        cfg = DecodeConfig(gen_length=a.gen, block_length=a.block, steps_per_block=a.steps_per_block,
                           rule="quota_threshold", threshold=1.0, cache=cache, stop_at_eos=False)
        generate(model, prompts, DecodeConfig(**{**cfg.to_dict(), "gen_length": a.block}))  # warm-up
        t0 = time.perf_counter()
        out = generate(model, prompts, cfg)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        n = sum(len(t) for t in out.tokens)
        res[cache] = dict(nfe=out.nfe[0], tokens=n, seconds=round(wall, 3), tok_s=round(n / wall, 1),
                          flops=out.stats["forward_flops"], ids=out.tokens)
    assert res["none"]["ids"] == res["prefix"]["ids"], "prefix and none disagree"
    assert res["none"]["nfe"] == res["prefix"]["nfe"]
    moe = next(l.mlp for l in model.layers if hasattr(l.mlp, "route"))
    x = torch.randn(a.batch * (a.prompt + a.gen), a.d_model, device=a.device, dtype=dtype, generator=None)
    idx, _ = moe.route(x)

    def loop():  # the reference's way: sort by expert, one Python iteration per expert, counts on the host
        order = idx.flatten().argsort()
        xs = x[order // idx.shape[1]]
        ys, s = [], 0
        for e, c in enumerate(torch.bincount(idx.flatten(), minlength=moe.cfg.n_experts).tolist()):
            if c:
                t = xs[s:s + c]
                ys.append(torch.nn.functional.linear(torch.nn.functional.silu(t @ moe.w_gate[e].T)
                                                     * (t @ moe.w_up[e].T), moe.w_down[e]))
                s += c
        return torch.cat(ys)

    timings = {}
    for name, fn in (("grouped", lambda: moe.experts(x, idx)), ("per_expert_loop", loop)):
        with torch.inference_mode():
            fn()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name] = round((time.perf_counter() - t0) / 5 * 1000, 2)
    for r in res.values():
        del r["ids"]
    report = dict(shape=vars(a), decode=res, speedup=round(res["prefix"]["tok_s"] / res["none"]["tok_s"], 2),
                  moe_ms=timings)
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
