#!/usr/bin/env python
"""Decoding benchmark: one run measures a matrix of cache mode x rule on one model shape.

For every (gen length, batch size) it times the baseline (cache none, rule quota, steps = gen_length) and each
cache x rule setting after a warm-up, and reports NFE, generated tokens/s, wall time, counted forward FLOPs and the
speedup over the baseline, as a markdown table and JSON. Random weights by default (the shape comes from the
command line); `--model` benchmarks a real checkpoint instead.

    python scripts/bench_decode.py                                   # CPU-sized LLaDA-like shape
    python scripts/bench_decode.py --device cuda --dtype bfloat16 --d-model 4096 --n-layers 32 --vocab 126464
    python scripts/bench_decode.py --max-blocks 2                    # time the first 2 blocks of each problem

`--max-blocks` decodes only the first blocks of the full-length problem (the sequence, and so the per-step cost,
is that of the whole gen length); it keeps slow CPU runs short, and the table says how many blocks were timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastdllm  # noqa: E402
from fastdllm.decoding import CACHE_MODES  # noqa: E402
from fastdllm.models import from_config  # noqa: E402
from fastdllm.models.common import ModelConfig  # noqa: E402
from fastdllm.rules import RULES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint to benchmark instead of a random-weight shape")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--mlp-hidden", type=int, default=None, help="default 3 x d_model (LLaDA-8B's ratio)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-length", type=int, default=200)
    p.add_argument("--gen-lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--caches", nargs="+", default=list(CACHE_MODES), choices=CACHE_MODES)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--frechet-margin", type=float, default=0.25)
    p.add_argument("--max-blocks", type=int, default=None, help="decode only the first N blocks of each problem")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra DecodeConfig fields for every non-baseline setting (repeatable)")
    return p.parse_args(argv)


def build_model(a):
    if a.model:
        return fastdllm.load_model(a.model, device=a.device, dtype=None if a.dtype == "auto" else a.dtype)
    cfg = ModelConfig(family="llada", vocab_size=a.vocab, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
                      n_kv_heads=a.n_kv_heads or a.n_heads, mlp_hidden=a.mlp_hidden or 3 * a.d_model,
                      rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False, tie_embeddings=False,
                      mask_token_id=a.vocab - 1, max_seq_len=8192)
    dtype = fastdllm.models._dtype(a.dtype, torch.device(a.device))
    # std 1/sqrt(d) makes the random model's confidences spread, so the parallel rules commit varied counts
    return from_config(cfg, device=a.device, dtype=dtype, seed=a.seed, std=a.d_model ** -0.5)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def run(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build_model(a)
    mc = model.config
    g = torch.Generator().manual_seed(a.seed)
    extra = dict(kv.split("=", 1) for kv in a.extra)
    extra = {k: _value(v) for k, v in extra.items()}
    results = []
    for gen in a.gen_lengths:
        for bs in a.batch_sizes:
            prompts = torch.randint(0, mc.vocab_size - 1, (bs, a.prompt_length), generator=g)
            prompts[prompts == mc.mask_token_id] = 0
            prompts = prompts.tolist()
            settings = [("none", "quota", {})]  # the baseline first
            settings += [(c, r, extra) for c in a.caches for r in a.rules if (c, r) != ("none", "quota")]
            for c in {c for c, _, _ in settings}:  # warm-up: one block of each mode
                cfg = fastdllm.DecodeConfig(gen_length=a.block_length, block_length=a.block_length,
                                            steps=a.block_length, cache=c, rule="quota", stop_at_eos=False)
                fastdllm.generate(model, prompts, cfg)
            base_wall = None
            for cache, rule, kw in settings:
                cfg = fastdllm.DecodeConfig(gen_length=gen, block_length=a.block_length, steps=gen, cache=cache,
                                            rule=rule, threshold=a.threshold, factor=a.factor,
                                            frechet_margin=a.frechet_margin, stop_at_eos=False, **kw)
                _sync(a.device)
                t0 = time.perf_counter()
                out = fastdllm.generate(model, prompts, cfg, max_blocks=a.max_blocks)
                _sync(a.device)
                wall = time.perf_counter() - t0
                base_wall = base_wall or wall
                n_tok = out.stats["generated_tokens"]
                row = dict(gen_length=gen, batch=bs, cache=cache, rule=rule, mean_nfe=sum(out.nfe) / bs,
                           forward_passes=out.stats["forward_passes"], tokens=n_tok, wall_s=wall,
                           tokens_per_s=n_tok / wall, gflops=out.stats["forward_flops"] / 1e9,
                           speedup=base_wall / wall, **{k: v for k, v in kw.items()})
                results.append(row)
                print(f"gen {gen} batch {bs} {cache:>6} {rule:>9}: nfe {row['mean_nfe']:7.1f}  "
                      f"{row['tokens_per_s']:9.1f} tok/s  {wall:8.2f}s  x{row['speedup']:.2f}", flush=True)
    info = dict(device=a.device, dtype=str(model.dtype), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), model=a.model or "random",
                shape=dict(d_model=mc.d_model, n_layers=mc.n_layers, n_heads=mc.n_heads, n_kv_heads=mc.n_kv_heads,
                           mlp_hidden=mc.mlp_hidden, vocab=mc.vocab_size, params=model.num_parameters()),
                prompt_length=a.prompt_length, block_length=a.block_length, max_blocks=a.max_blocks)
    if torch.device(a.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return dict(info=info, results=results)


def table(report: dict) -> str:
    i = report["info"]
    head = (f"model {i['model']} ({i['shape']['params'] / 1e6:.0f}M params, d {i['shape']['d_model']}, "
            f"{i['shape']['n_layers']} layers, vocab {i['shape']['vocab']}), {i['device']} {i['dtype']}, "
            f"{i['threads']} threads, prompt {i['prompt_length']}, block {i['block_length']}"
            + (f", first {i['max_blocks']} blocks timed" if i["max_blocks"] else ""))
    lines = [head, "", "| gen | batch | cache | rule | mean NFE | tokens/s | wall s | GFLOPs | speedup |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['gen_length']} | {r['batch']} | {r['cache']} | {r['rule']} | {r['mean_nfe']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {r['wall_s']:.2f} | {r['gflops']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    report = run(a)
    print()
    print(table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
