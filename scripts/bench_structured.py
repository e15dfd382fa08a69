"""Structured outputs on the tiny model: validity, accuracy, NFE and host mask time, with and without constraints,
against one-token-per-step constrained decoding (quota 1 per step, no forced-token commits) as the baseline.

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/bench_structured.py [--n 64]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jsonschema
import torch

import fastdllm
from fastdllm import Engine, Request, StructuredOutputs, tiny_kit
from fastdllm import structured as S

SCHEMA = {"type": "object", "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 20000},
                                           "ok": {"type": "boolean"}}, "required": ["sum", "ok"]}


def valid(spec, text):
    if spec is None:
        return True
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    try:
        jsonschema.validate(json.loads(text), spec.json)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def right(spec, probs, texts):
    """Addition answered right: the text itself, or (JSON) its "sum"."""
    if spec is None or spec.json is None:
        return sum(tiny_kit.score(probs, texts))
    n = 0
    for p, t in zip(probs, texts):
        try:
            n += json.loads(t)["sum"] == int(p.answer)
        except (ValueError, KeyError, TypeError):
            pass
    return n


def run(model, tok, probs, spec, parallel: bool):
    cfg = (tiny_kit.decode_config("dual", "threshold") if parallel else tiny_kit.decode_config("dual", "quota"))
    S.RowConstraint.fast_forward = parallel
    host = [0.0]

    def timed(f):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                host[0] += time.perf_counter() - t
        return g

    saved = {n: getattr(S.StructuredStep, n) for n in ("mask_logits", "candidates", "commit")}
    for n, f in saved.items():
        setattr(S.StructuredStep, n, timed(f))
    try:
        eng = Engine(model, cfg, max_batch_size=16, tokenizer=tok)
        ids = [eng.add(Request(tok.encode(p.prompt), structured=spec)) for p in probs]
        out, t0 = {}, time.perf_counter()
        while eng.pending:
            for f in eng.step():
                out[f.id] = f
        wall = time.perf_counter() - t0
    finally:
        for n, f in saved.items():
            setattr(S.StructuredStep, n, f)
        S.RowConstraint.fast_forward = True
    fs = [out[i] for i in ids]
    done = [f for f in fs if f.finish_reason == "stop"]
    return dict(finished=len(done) / len(fs), valid=sum(valid(spec, f.text) for f in done) / max(1, len(done)),
                accuracy=right(spec, probs, [f.text for f in fs]) / len(fs),
                nfe=sum(f.nfe for f in fs) / len(fs), host_share=host[0] / wall, wall=wall)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")
    probs = tiny_kit.problem_set("addition", a.n, seed=2024)
    print("| constraint | decoding | finished | valid (of finished) | accuracy | NFE / row | host mask share |")
    print("|---|---|---|---|---|---|---|")
    for name, spec in [("none", None), ("regex [0-9]+", StructuredOutputs(regex="[0-9]+")),
                       ("JSON schema {sum, ok}", StructuredOutputs(json=SCHEMA))]:
        for parallel in (True, False):
            label = "parallel (threshold 0.9)" if parallel else "one token / step"
            r = run(model, tok, probs, spec, parallel)
            print(f"| {name} | {label} | {r['finished']:.0%} | {r['valid']:.0%} | {r['accuracy']:.0%} | "
                  f"{r['nfe']:.1f} | {r['host_share']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
