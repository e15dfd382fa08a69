#!/usr/bin/env python
"""The proposal step, float64 against float32-with-fallback (docs/DESIGN.md, "The proposal's fast path").

`micro`: propose_commit alone on Gaussian logits (rows x 32 positions x vocab), exact=True (the float64 step)
and the fast path interleaved, medians over --reps, and how many rows fell back to float64.

`decode`: whole decodes of a random LLaDA (dual cache, rule threshold) with the proposal's share of the wall time,
old and new engines interleaved in fresh processes: `--old PATH` is a source tree of the old engine (e.g.
`git archive c91e7c2 | tar -x -C /tmp/old`), the new one is this checkout. Tokens and NFE must match.

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/bench_proposal.py micro --vocab 32000 126464 --rows 16 64
    OMP_NUM_THREADS=1 taskset -c 0 python scripts/bench_proposal.py decode --old /tmp/old --rows 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def micro(a):
    import torch

    from fastdllm.proposal import RowSettings, propose_commit

    torch.set_num_threads(a.threads)
    out = []
    for V in a.vocab:
        for B in a.rows:
            g = torch.Generator().manual_seed(0)
            logits = torch.randn((B, 32, V), generator=g) * a.scale
            block = torch.full((B, 32), V - 1)
            sel = torch.arange(32).expand(B, -1)
            st = RowSettings([0.0] * B, [0.9] * B, [1.0] * B, [0.25] * B, [1] * B)
            times = {True: [], False: []}
            tally = {}
            blocks = {}
            for _ in range(a.reps):
                for exact in (True, False):
                    t = time.perf_counter()
                    blocks[exact] = propose_commit(logits, block, sel, V - 1, "threshold", "low_confidence", st,
                                                   None, tally=tally if not exact else None, exact=exact)
                    times[exact].append(time.perf_counter() - t)
            assert torch.equal(blocks[True], blocks[False])
            row = dict(vocab=V, rows=B, float64_s=statistics.median(times[True]),
                       fast_s=statistics.median(times[False]), exact_rows=tally["exact_rows"],
                       proposal_rows=tally["proposal_rows"])
            row["speedup"] = row["float64_s"] / row["fast_s"]
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def one_decode(a):
    """A single decode in this process (the engine is whatever `fastdllm` imports); prints one JSON line."""
    import torch

    import fastdllm
    from fastdllm.models import from_config
    from fastdllm.models.common import ModelConfig

    torch.set_num_threads(a.threads)
    V = a.vocab[0]
    cfg = ModelConfig(family="llada", vocab_size=V, d_model=a.d_model, n_layers=a.n_layers, n_heads=4, n_kv_heads=4,
                      mlp_hidden=3 * a.d_model, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                      tie_embeddings=False, mask_token_id=V - 1, max_seq_len=4096)
    model = from_config(cfg, dtype=torch.float32, seed=0, std=a.d_model ** -0.5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V - 1, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 48, (a.rows[0],), generator=g)]
    dc = fastdllm.DecodeConfig(gen_length=a.gen_length, block_length=a.block_length, steps=a.gen_length,
                               cache="dual", rule="threshold", threshold=0.9)
    spent = [0.0]

    def timed(f):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            r = f(*args, **kw)
            spent[0] += time.perf_counter() - t
            return r
        return wrapper

    try:
        import fastdllm.engine as eng
        eng.propose_commit = timed(eng.propose_commit)
    except ImportError:  # the engine from before fastdllm/engine.py: decoding._propose
        import fastdllm.decoding as dec
        dec._propose = timed(dec._propose)
    t = time.perf_counter()
    res = fastdllm.generate(model, prompts, dc, max_batch_size=a.rows[0])
    wall = time.perf_counter() - t
    digest = hashlib.sha256(json.dumps([list(map(int, x)) for x in res.tokens]).encode()).hexdigest()[:16]
    print(json.dumps(dict(wall_s=wall, proposal_s=spent[0], nfe=sum(res.nfe), tokens=digest,
                          exact_rows=res.stats.get("exact_rows"))), flush=True)


def decode(a):
    base = [sys.executable, __file__, "one", "--vocab", str(a.vocab[0]), "--rows", str(a.rows[0]),
            "--d-model", str(a.d_model), "--n-layers", str(a.n_layers), "--gen-length", str(a.gen_length),
            "--block-length", str(a.block_length), "--threads", str(a.threads)]
    runs = {"old": [], "new": []}
    for _ in range(a.reps):
        for name, src in (("old", a.old), ("new", str(ROOT))):
            env = dict(os.environ, PYTHONPATH=src)
            line = subprocess.run(base, env=env, check=True, capture_output=True, text=True).stdout.strip()
            runs[name].append(json.loads(line.splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    assert len({r["tokens"] for rs in runs.values() for r in rs}) == 1, "tokens differ"
    assert len({r["nfe"] for rs in runs.values() for r in rs}) == 1, "NFE differs"
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "proposal_s")} for k, v in runs.items()}
    summary = dict(vocab=a.vocab[0], rows=a.rows[0], d_model=a.d_model, n_layers=a.n_layers, reps=a.reps,
                   old=med["old"], new=med["new"], speedup=med["old"]["wall_s"] / med["new"]["wall_s"],
                   old_share=med["old"]["proposal_s"] / med["old"]["wall_s"],
                   new_share=med["new"]["proposal_s"] / med["new"]["wall_s"],
                   exact_rows=runs["new"][-1]["exact_rows"], nfe=runs["new"][-1]["nfe"])
    print(json.dumps(summary))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("micro", "decode", "one"))
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 126464])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--scale", type=float, default=1.0, help="micro: std of the Gaussian logits")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--old", default=None, help="decode: source tree of the old engine")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    if a.what == "one":
        return one_decode(a)
    if a.what == "decode" and not a.old:
        p.error("decode needs --old PATH (a source tree of the engine to compare with)")
    res = micro(a) if a.what == "micro" else decode(a)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
