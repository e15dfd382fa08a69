#!/usr/bin/env python
"""Decoding benchmark, two workloads.

`--workload matrix` (default): one run measures a matrix of cache mode x rule on one model shape.

For every (gen length, batch size) it times the baseline (cache none, rule quota, steps = gen_length) and each
cache x rule setting after a warm-up, and reports NFE, generated tokens/s, wall time, counted forward FLOPs and the
speedup over the baseline, as a markdown table and JSON. Random weights by default (the shape comes from the
command line); `--model` benchmarks a real checkpoint instead.

    python scripts/bench_decode.py                                   # CPU-sized LLaDA-like shape
    python scripts/bench_decode.py --device cuda --dtype bfloat16 --d-model 4096 --n-layers 32 --vocab 126464
    python scripts/bench_decode.py --max-blocks 2                    # time the first 2 blocks of each problem

`--max-blocks` decodes only the first blocks of the full-length problem (the sequence, and so the per-step cost,
is that of the whole gen length); it keeps slow CPU runs short, and the table says how many blocks were timed.

`--workload mixed`: continuous batching against the lock-step engine. 512 prompts, half "{a}+{b}=" and half
"sort:{s}=" (4-16 digits) in a shuffled order, gen 32, block 8, rule threshold 0.9, for each cache mode and batch
size (rows in flight). On the built-in tiny model (`--model tiny`) the prompts are the task texts; on a random-weight
shape they are random ids of the same lengths. It reports NFE, row-forwards (rows summed over every forward, counted
at the model's embedding, so the same for any engine), occupancy = NFE / row-forwards, tokens/s and peak memory
(CUDA: allocated; CPU: the process's peak RSS so far). `--merge` prints the medians of saved JSON files, with the
ratios to an older engine when some of them were measured by one (the lock-step engine of 786f673 or the
continuous one of c91e7c2, run from a checkout of that commit):

    python scripts/bench_decode.py --workload mixed --model tiny --threads 1 --json cb1.json
    python scripts/bench_decode.py --merge cb*.json ls*.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import time
from pathlib import Path

import torch

import fastdllm
from fastdllm.models import from_config
from fastdllm.models.common import ModelConfig
from fastdllm.policies import CACHE_POLICIES
from fastdllm.rules import RULES
from fastdllm.tiny_kit import problems

try:
    from fastdllm.movement import count_movement
except ImportError:  # the continuous engine before it (c91e7c2), run side by side: this checkout's counter
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_movement", Path(__file__).resolve().parent.parent / "fastdllm" / "movement.py")
    _movement = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_movement)
    count_movement = _movement.count_movement

CACHES = tuple(CACHE_POLICIES)
# The label of this engine's rows in the JSON (--merge compares it with older ones' saved runs).
ENGINE = "request engine" if hasattr(fastdllm, "Engine") else "continuous"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("matrix", "mixed"), default="matrix")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="print the median table of earlier --workload mixed runs (both engines) and exit")
    p.add_argument("--model", default=None, help="checkpoint to benchmark instead of a random-weight shape")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--mlp-hidden", type=int, default=None, help="default 3 x d_model (LLaDA-8B's ratio)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-length", type=int, default=200)
    p.add_argument("--gen-lengths", type=int, nargs="+", default=None, help="matrix: 256 1024; mixed: 32")
    p.add_argument("--block-length", type=int, default=None, help="matrix: 32; mixed: 8")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="matrix: 1 8; mixed: 16 64")
    p.add_argument("--caches", nargs="+", default=None, choices=CACHES,
                   help="matrix: all; mixed: dual prefix none")
    p.add_argument("--rules", nargs="+", default=None, choices=RULES, help="matrix: all; mixed: threshold")
    p.add_argument("--n-prompts", type=int, default=512, help="mixed: prompts (half addition, half sorting)")
    p.add_argument("--temperature", type=float, default=0.0, help="mixed: sampling temperature")
    p.add_argument("--sort-prompts", action="store_true",
                   help="mixed: hand the prompts over sorted by length (the lock-step shard worker did)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--frechet-margin", type=float, default=0.25)
    p.add_argument("--max-blocks", type=int, default=None, help="decode only the first N blocks of each problem")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    p.add_argument("--movement", action="store_true",
                   help="mixed: also count the bytes copy/gather/index ops write (an extra, untimed pass)")
    p.add_argument("--compile", action="store_true", help="mixed: Engine(compile=True) (request engine only)")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra DecodeConfig fields for every non-baseline setting (repeatable)")
    a = p.parse_args(argv)
    mixed = a.workload == "mixed"
    defaults = dict(gen_lengths=[32] if mixed else [256, 1024], block_length=8 if mixed else 32,
                    batch_sizes=[16, 64] if mixed else [1, 8], caches=["dual", "prefix", "none"] if mixed else CACHES,
                    rules=["threshold"] if mixed else RULES)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, list(v) if isinstance(v, (list, tuple)) else v)
    return a


def build_model(a):
    if a.model:
        return fastdllm.load_model(a.model, device=a.device, dtype=None if a.dtype == "auto" else a.dtype)
    cfg = ModelConfig(family="llada", vocab_size=a.vocab, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
                      n_kv_heads=a.n_kv_heads or a.n_heads, mlp_hidden=a.mlp_hidden or 3 * a.d_model,
                      rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False, tie_embeddings=False,
                      mask_token_id=a.vocab - 1, max_seq_len=8192)
    dtype = fastdllm.models.torch_dtype(a.dtype, a.device)
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


def _peak_memory_mib(device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set so far."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def mixed_prompts(model, a) -> list[list[int]]:
    """The mixed workload: half addition, half sorting prompts, shuffled; token ids from the model's tokenizer
    (a checkpoint), or random ids of the same lengths (a random-weight shape)."""
    n_add = a.n_prompts // 2
    texts = [p.prompt for p in problems("addition", n_add, a.seed) + problems("sorting", a.n_prompts - n_add, a.seed)]
    random.Random(a.seed).shuffle(texts)
    if a.sort_prompts:
        texts.sort(key=len)  # the tiny tokenizer has one token per character
    if a.model:
        return fastdllm.load_tokenizer(a.model).encode_batch(texts)
    g = torch.Generator().manual_seed(a.seed)
    vocab = model.config.vocab_size - 1  # never the mask id (the last one)
    return [torch.randint(0, vocab, (len(t),), generator=g).tolist() for t in texts]


def decode_all(model, prompts, cfg, batch_size: int, max_blocks=None, compile=False) -> dict:
    """All prompts with `batch_size` rows in flight, in one call."""
    kw = dict(compile=True) if compile else {}
    out = fastdllm.generate(model, prompts, cfg, max_batch_size=batch_size, max_blocks=max_blocks, **kw)
    return dict(nfe=sum(out.nfe), tokens=out.stats["generated_tokens"], forward_passes=out.stats["forward_passes"])


def run_mixed(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build_model(a)
    prompts = mixed_prompts(model, a)
    counted = dict(rows=0)

    def count_rows(_module, args):  # every forward embeds its query tokens once: (rows, L)
        counted["rows"] += args[0].shape[0]

    model.embed.register_forward_pre_hook(count_rows)
    results = []
    for gen in a.gen_lengths:
        for cache in a.caches:
            for rule in a.rules:
                cfg = fastdllm.DecodeConfig(gen_length=gen, block_length=a.block_length, steps=gen, cache=cache,
                                            rule=rule, threshold=a.threshold, factor=a.factor,
                                            frechet_margin=a.frechet_margin, temperature=a.temperature)
                decode_all(model, prompts[: max(a.batch_sizes)], cfg, max(a.batch_sizes), 1, a.compile)  # warm-up
                for bs in a.batch_sizes:
                    if torch.device(a.device).type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    counted["rows"] = 0
                    _sync(a.device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    tot = decode_all(model, prompts, cfg, bs, a.max_blocks, a.compile)
                    _sync(a.device)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    moved, rf = None, counted["rows"]
                    if a.movement:  # untimed: the counting mode slows every op down
                        with count_movement() as counter:
                            decode_all(model, prompts, cfg, bs, a.max_blocks, a.compile)
                        moved = sum(counter.values()) / rf
                    engine = ENGINE + (" compiled" if a.compile else "") + (" (sorted)" if a.sort_prompts else "")
                    row = dict(engine=engine, gen_length=gen, batch=bs,
                               cache=cache, rule=rule, nfe=tot["nfe"], row_forwards=rf,
                               occupancy=tot["nfe"] / rf, forward_passes=tot["forward_passes"],
                               tokens=tot["tokens"], wall_s=wall, tokens_per_s=tot["tokens"] / wall, cpu_s=cpu,
                               tokens_per_cpu_s=tot["tokens"] / cpu, peak_mib=_peak_memory_mib(a.device),
                               moved_bytes_per_row_forward=moved)
                    results.append(row)
                    print(f"{row['engine']} gen {gen} batch {bs} {cache:>6} {rule}: nfe {row['nfe']}  row-forwards "
                          f"{row['row_forwards']}  occupancy {row['occupancy']:.2f}  {row['tokens_per_s']:.1f} tok/s  "
                          f"{wall:.2f}s  ({row['tokens_per_cpu_s']:.1f} tok per CPU s)  peak {row['peak_mib']:.0f} MiB"
                          + (f"  moved {moved / 1024:.1f} KiB per row-forward" if moved is not None else ""),
                          flush=True)
    return dict(info=_info(a, model, workload="mixed", n_prompts=len(prompts),
                           mean_prompt_tokens=sum(map(len, prompts)) / len(prompts)), results=results)


def _info(a, model, **extra) -> dict:
    mc = model.config
    info = dict(device=a.device, dtype=str(model.dtype), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), model=a.model or "random",
                engine=ENGINE, fastdllm=fastdllm.__file__,
                shape=dict(d_model=mc.d_model, n_layers=mc.n_layers, n_heads=mc.n_heads, n_kv_heads=mc.n_kv_heads,
                           mlp_hidden=mc.mlp_hidden, vocab=mc.vocab_size, params=model.num_parameters()),
                prompt_length=a.prompt_length, block_length=a.block_length, max_blocks=a.max_blocks,
                temperature=a.temperature, **extra)
    if torch.device(a.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def merge(paths: list[str]) -> str:
    """Median over runs of each (engine, cache, rule, batch) and the ratios to the older engine, as markdown: the
    request engine against the continuous one of c91e7c2, or the continuous one against the lock-step one."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        for row in r["results"]:
            groups.setdefault((row["cache"], row["rule"], row["batch"], row["engine"]), []).append(row)
    fields = ("nfe", "row_forwards", "occupancy", "tokens", "tokens_per_s", "tokens_per_cpu_s", "peak_mib")
    med = {k: {f: statistics.median(x[f] for x in v) for f in fields} | {"n": len(v)} for k, v in groups.items()}
    for k, v in groups.items():
        moved = [x["moved_bytes_per_row_forward"] for x in v if x.get("moved_bytes_per_row_forward") is not None]
        med[k]["moved"] = statistics.median(moved) if moved else None
    engines = {k[3] for k in groups}
    older = "continuous" if "request engine" in engines else "lock-step"
    lines = ["| cache | batch | engine | runs | NFE | row-forwards | occupancy | tokens | tokens/s | ratio | "
             "tokens per CPU s | ratio | KiB moved per row-forward | ratio |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cache, rule, bs, engine in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != older, k[3])):
        m = med[(cache, rule, bs, engine)]
        base = med.get((cache, rule, bs, older))

        def ratio(f):
            if engine == older or not base or m[f] is None or not base[f]:
                return ""
            return f"{m[f] / base[f]:.2f}x"

        moved = f"{m['moved'] / 1024:.1f}" if m["moved"] is not None else ""
        lines.append(f"| {cache} ({rule}) | {bs} | {engine} | {m['n']} | {m['nfe']:.0f} | {m['row_forwards']:.0f} | "
                     f"{m['occupancy']:.2f} | {m['tokens']:.0f} | {m['tokens_per_s']:.0f} | {ratio('tokens_per_s')} | "
                     f"{m['tokens_per_cpu_s']:.0f} | {ratio('tokens_per_cpu_s')} | {moved} | {ratio('moved')} |")
    i = runs[0]["info"]
    return (f"model {i['model']} ({i['shape']['params'] / 1e6:.2f}M params), {i['device']} {i['dtype']}, "
            f"{i['threads']} threads, {i.get('n_prompts')} prompts\n\n" + "\n".join(lines))


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
            for c in sorted({c for c, _, _ in settings}):  # warm-up: one block of each mode
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
    return dict(info=_info(a, model, workload="matrix"), results=results)


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


def mixed_table(report: dict) -> str:
    i = report["info"]
    lines = [f"{i['engine']} engine ({i['fastdllm']}), model {i['model']}, {i['device']} {i['dtype']}, "
             f"{i['threads']} threads, {i['n_prompts']} prompts", "",
             "| cache | rule | batch | NFE | row-forwards | occupancy | tokens | tokens/s | tokens per CPU s | "
             "peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['cache']} | {r['rule']} | {r['batch']} | {r['nfe']} | {r['row_forwards']} | "
                     f"{r['occupancy']:.2f} | {r['tokens']} | {r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | "
                     f"{r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.merge:
        print(merge(a.merge))
        return
    report = run_mixed(a) if a.workload == "mixed" else run(a)
    print()
    print(mixed_table(report) if a.workload == "mixed" else table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
