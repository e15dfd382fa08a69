#!/usr/bin/env python
"""bf16 against fp32 on this CPU: matmul rates at the decode's shapes, then whole dual-cache decodes of a random
LLaDA with dtype "auto" and fp32 interleaved (medians), and how many rows' tokens differ between the two.

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/bench_bf16.py --threads 1
    FASTDLLM_CPU_BF16=1 python scripts/bench_bf16.py     # force "auto" to bf16 (a CPU without the flags emulates)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

import fastdllm
from fastdllm.models import torch_dtype as _dtype, cpu_has_bf16, from_config
from fastdllm.models.common import ModelConfig


def matmul_rate(m, k, n, dtype, reps=3):
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def decode(dtype, a):
    cfg = ModelConfig(family="llada", vocab_size=a.vocab, d_model=a.d_model, n_layers=a.n_layers, n_heads=8,
                      n_kv_heads=8, mlp_hidden=3 * a.d_model, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                      tie_embeddings=False, mask_token_id=a.vocab - 1, max_seq_len=4096)
    model = from_config(cfg, dtype=dtype, seed=0, std=a.d_model ** -0.5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, a.vocab - 1, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 64, (a.prompts,), generator=g)]
    dc = fastdllm.DecodeConfig(gen_length=a.gen_length, block_length=8, steps=a.gen_length, cache="dual",
                               rule="threshold", threshold=0.9)
    t = time.perf_counter()
    out = fastdllm.generate(model, prompts, dc, max_batch_size=a.rows)
    wall = time.perf_counter() - t
    return dict(wall_s=wall, tokens_per_s=out.stats["generated_tokens"] / wall, nfe=sum(out.nfe)), out.tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    up = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    auto = _dtype("auto", torch.device("cpu"))
    res = dict(uptime_before=up(), cpu_has_bf16=cpu_has_bf16(), auto=str(auto), threads=a.threads, matmul={})
    for shape in ((2048, 1024, 2816), (16 * 32, 1024, 1024), (16 * 32, 512, 32000)):
        res["matmul"]["x".join(map(str, shape))] = {str(dt): round(matmul_rate(*shape, dt), 1)
                                                     for dt in (torch.float32, torch.bfloat16)}
    runs = {"auto": [], "float32": []}
    toks = {}
    for _ in range(a.reps):
        for name, dt in (("auto", auto), ("float32", torch.float32)):
            r, toks[name] = decode(dt, a)
            runs[name].append(r)
    res["decode"] = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "tokens_per_s")}
                     for k, v in runs.items()}
    res["speedup_auto_over_fp32"] = res["decode"]["float32"]["wall_s"] / res["decode"]["auto"]["wall_s"]
    res["rows_differing"] = sum(x != y for x, y in zip(toks["auto"], toks["float32"]))
    res["uptime_after"] = up()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
