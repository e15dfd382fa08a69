#!/usr/bin/env python
"""Quality vs speed of the built-in tiny model: accuracy, mean NFE and tokens/s for every cache mode x rule.

Accuracy is the kit's score (fastdllm.tiny_kit.score: the decoded completion is exactly the answer) on N fresh
problems of each problem set (addition: operands uniform in [0, 10000); addition-mixed: 1-4 digit operands; sorting:
4 to 16 digits), drawn from --seed. Decoding: the kit's settings, gen_length 32, block_length 8, greedy; the
baseline is rule quota with steps = gen_length (one token per step). Writes a markdown table, a JSON file and a PNG
plot of accuracy against mean NFE.

  .venv/bin/python scripts/eval_tiny.py --n 1000 --batch-size 256 --out docs/tiny_eval
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fastdllm
from fastdllm.policies import CACHE_POLICIES
from fastdllm.tiny_kit import BLOCK_LENGTH, GEN_LENGTH, PROBLEM_SETS, decode_config, problem_set, score

RULE_SETTINGS = {  # name -> (DecodeConfig fields, label)
    "quota": (dict(rule="quota", steps=GEN_LENGTH), "quota (steps=32)"),
    "threshold": (dict(rule="threshold", threshold=0.9), "threshold 0.9"),
    "factor": (dict(rule="factor", factor=1.0), "factor 1.0"),
    "frechet": (dict(rule="frechet", frechet_margin=0.25), "frechet 0.25"),
}


def evaluate(model, tok, cache: str, rule: str, probs_by_task, batch_size: int) -> dict:
    fields, label = RULE_SETTINGS[rule]
    cfg = decode_config(cache, **fields)
    row = dict(cache=cache, rule=rule, label=label, tasks={})
    for task, probs in probs_by_task.items():
        # one continuous-batching call per task: batch_size rows in flight
        out = fastdllm.generate(model, tok.encode_batch([p.prompt for p in probs]), cfg, max_batch_size=batch_size)
        texts = tok.decode_batch(out.tokens)
        correct = sum(score(probs, texts))
        nfe, n_tok, wall = sum(out.nfe), out.stats["generated_tokens"], out.stats["wall_seconds"]
        n = len(probs)
        row["tasks"][task] = dict(n=n, accuracy=correct / n, mean_nfe=nfe / n, generated_tokens=n_tok,
                                  wall_seconds=wall, tokens_per_second=n_tok / wall if wall > 0 else 0.0)
    return row


def markdown(rows, tasks) -> str:
    head = ["cache", "rule"]
    for t in tasks:
        head += [f"{t} acc", f"{t} NFE", f"{t} tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["cache"], r["label"]]
        for t in tasks:
            m = r["tasks"][t]
            cells += [f"{100 * m['accuracy']:.1f}%", f"{m['mean_nfe']:.2f}", f"{m['tokens_per_second']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, tasks, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"quota": "o", "threshold": "s", "factor": "^", "frechet": "D"}
    caches = sorted({r["cache"] for r in rows}, key=lambda c: [r["cache"] for r in rows].index(c))
    colors = {c: f"C{i}" for i, c in enumerate(caches)}
    sizes = {c: max(20, 130 - 40 * i) for i, c in enumerate(caches)}  # decreasing, so coinciding points stay visible
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            m = r["tasks"][task]
            ax.scatter(m["mean_nfe"], 100 * m["accuracy"], marker=markers.get(r["rule"], "x"),
                       color=colors[r["cache"]], s=sizes[r["cache"]], alpha=0.85,
                       label=f"{r['cache']} / {r['label']}")
        ax.set_xlabel("mean NFE per problem")
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_title(task)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="built-in name or checkpoint directory (default: tiny)")
    ap.add_argument("--n", type=int, default=1000, help="problems per task")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the problem draw")
    ap.add_argument("--batch-size", type=int, default=128, help="rows in flight")
    ap.add_argument("--caches", default=",".join(CACHE_POLICIES),
                    help=f"comma-separated cache modes (default: all of {', '.join(CACHE_POLICIES)})")
    ap.add_argument("--rules", default=",".join(RULE_SETTINGS),
                    help=f"comma-separated rules (default: {', '.join(RULE_SETTINGS)})")
    ap.add_argument("--tasks", default=",".join(PROBLEM_SETS),
                    help=f"comma-separated problem sets (default: all of {', '.join(PROBLEM_SETS)})")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/eval_tiny/eval",
                    help="output prefix: writes PREFIX.md, PREFIX.json and PREFIX.png")
    args = ap.parse_args(argv)
    for name in ("n", "batch_size", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    for name, known in (("caches", tuple(CACHE_POLICIES)),
                        ("rules", tuple(RULE_SETTINGS)), ("tasks", tuple(PROBLEM_SETS))):
        items = [s.strip() for s in getattr(args, name).split(",") if s.strip()]
        bad = [s for s in items if s not in known]
        if not items or bad:
            ap.error(f"--{name}: {', '.join(bad) or 'nothing given'} not in: {', '.join(known)}")
        setattr(args, name, items)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        model = fastdllm.load_model(args.model, device=args.device)
        tok = fastdllm.load_tokenizer(args.model)
    except ValueError as e:
        sys.exit(f"error: {e}")
    probs = {t: problem_set(t, args.n, args.seed) for t in args.tasks}
    rows = []
    t0 = time.perf_counter()
    for cache in args.caches:
        for rule in args.rules:
            r = evaluate(model, tok, cache, rule, probs, args.batch_size)
            rows.append(r)
            print(json.dumps({"cache": cache, "rule": rule, **{t: {k: round(v, 4) for k, v in m.items()}
                                                                for t, m in r["tasks"].items()}}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args.tasks)
    meta = dict(model=args.model, n=args.n, seed=args.seed, batch_size=args.batch_size, threads=args.threads,
                device=args.device, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, parameters=model.num_parameters(),
                eval_seconds=time.perf_counter() - t0, torch=torch.__version__)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    plot(rows, args.tasks, out.with_suffix(".png"),
         f"tiny model, {args.n} problems/task, gen 32 / block 8 (seed {args.seed})")
    print(table)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
