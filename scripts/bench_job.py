"""Runner overhead: the same prompts and decode settings through `fastdllm run` machinery (one Ray worker) vs
`fastdllm.generate` called directly in one process.

Both sides use the same torch thread count (the worker's num_cpus), batch size and length-sorted batches, and
both include tokenizing the prompts and detokenizing the completions. Figures:
  direct          tokens / seconds of encode + generate + decode in this process (after a warm-up batch)
  in an actor     the same `direct` inside a fresh Ray actor with the worker's resources
  runner          tokens / span from the first shard's start to the last shard's commit (stats files): includes
                  Parquet reads and writes, stats commits and Ray dispatch between shards, not start-up
  runner e2e      tokens / the driver's wall time for the job, including actor start-up and the model load
overhead % = (direct - runner) / direct, on medians of rounds that alternate which side runs first (load on a
shared machine drifts). Also printed: the share of the runner's span spent outside generate() (reads, tokenizing,
writes, commits, dispatch), which does not depend on comparing two noisy runs.

    python scripts/bench_job.py [--rows 256] [--rows-per-shard 64] [--gen-length 32] ...

`--slots 1 2` instead compares runner runs only, with workers.shards_per_actor 1 (the shard-at-a-time worker of
the lock-step engine: each shard's last rows decode in a draining batch) and 2 (the next shard's rows join the
actor's engine as the current shard's finish), in alternating rounds: slot utilisation (mean rows in flight /
batch size over the engine's steps) and tokens/s over the span. Many small shards show the difference:

    python scripts/bench_job.py --slots 1 2 --rows 256 --rows-per-shard 16 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script make_demo_data; fastdllm is installed

from make_demo_data import write_demo_data  # noqa: E402


def direct(prompts, cfg, batch_size: int, threads: int) -> tuple[int, float]:
    import torch

    import fastdllm

    torch.set_num_threads(threads)
    model, tok = fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")
    fastdllm.generate(model, [tok.encode(prompts[0])], cfg)  # warm-up, as the worker does
    t0 = time.perf_counter()
    ids = sorted(enumerate(tok.encode_batch(prompts)), key=lambda t: (len(t[1]), t[0]))
    tokens = 0
    for b in range(0, len(ids), batch_size):
        batch = ids[b : b + batch_size]
        out = fastdllm.generate(model, [p for _, p in batch], cfg, row_ids=[i for i, _ in batch])
        tok.decode_batch(out.tokens)
        tokens += out.stats["generated_tokens"]
    return tokens, time.perf_counter() - t0


def direct_in_actor(prompts, cfg, batch_size: int, threads: int) -> float:
    """`direct` inside a fresh Ray actor with the runner's resources: separates the cost of running in a Ray
    worker process from the runner's own machinery."""
    import ray

    actor = ray.remote(num_cpus=threads)(_Direct).remote()
    try:
        tokens, seconds = ray.get(actor.run.remote(prompts, cfg.to_dict(), batch_size, threads))
    finally:
        ray.kill(actor)
    return tokens / seconds


class _Direct:
    def run(self, prompts, decode: dict, batch_size: int, threads: int):
        import fastdllm

        return direct(prompts, fastdllm.DecodeConfig.from_dict(decode), batch_size, threads)


def runner(data: Path, out: Path, decode: dict, args) -> dict:
    """One job on the running Ray; throughput from its stats files."""
    from fastdllm.jobs import parse_manifest, run_job
    from fastdllm.workers import JobOutput
    from fastdllm.workers.output import planned_rows

    m = parse_manifest({"name": "bench", "model": {"source": "tiny"},
                        "input": {"uri": str(data), "id_column": "id", "rows_per_shard": args.rows_per_shard},
                        "output": {"uri": str(out)}, "decode": decode,
                        "workers": {"count": 1, "num_cpus": args.threads, "batch_size": args.batch_size,
                                    "shards_per_actor": args.shards_per_actor}})
    t0 = time.perf_counter()
    result = run_job(m, progress=False)
    e2e = time.perf_counter() - t0
    output = JobOutput(str(out))
    records = list(output.scan(planned_rows(output.read_job()), verify=False).committed.values())
    start = min(datetime.fromisoformat(r.started_at) for r in records)
    end = max(datetime.fromisoformat(r.finished_at) for r in records)
    stats = [r.stats for r in records]
    tokens = sum(s.generated_tokens for s in stats)
    span = (end - start).total_seconds()
    return {"tokens": tokens, "tps": tokens / span, "e2e_tps": tokens / e2e,
            "in_shards": sum(s.wall_seconds for s in stats) / span,
            "decode_share": sum(s.decode_seconds for s in stats) / sum(s.wall_seconds for s in stats),
            "outside_generate": 1 - sum(s.decode_seconds for s in stats) / span,
            "io_share": sum(s.read_seconds + s.write_seconds for s in stats) / span,
            "slot_utilisation": sum(s.rows_in_flight for s in stats) / max(1, sum(s.slot_steps for s in stats)),
            "ok": result.ok}


def compare_slots(args, decode: dict) -> None:
    """Runner runs only, alternating workers.shards_per_actor over `args.slots`; medians per setting."""
    import ray

    runs: dict[int, list[dict]] = {n: [] for n in args.slots}
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            write_demo_data(data, rows=args.rows, files=1)
            for k in range(args.repeats):
                order = args.slots if k % 2 == 0 else args.slots[::-1]
                for n in order:
                    args.shards_per_actor = n
                    runs[n].append(runner(data, Path(tmp) / f"out{k}-{n}", decode, args))
                    print(f"round {k} shards_per_actor {n}: slot utilisation {runs[n][-1]['slot_utilisation']:.2f}, "
                          f"{runs[n][-1]['tps']:.1f} tokens/s over the span", flush=True)
    finally:
        ray.shutdown()
    med = statistics.median
    print(f"{args.rows} prompts in {args.rows // args.rows_per_shard} shards of {args.rows_per_shard}, batch "
          f"{args.batch_size}, {decode}, {args.threads} thread(s), tiny model on CPU; medians of {args.repeats} rounds")
    print("| shards per actor | slot utilisation | tokens/s (span) | tokens/s (with start-up) |")
    print("|---:|---:|---:|---:|")
    for n in args.slots:
        print(f"| {n} | {med(r['slot_utilisation'] for r in runs[n]):.2f} | {med(r['tps'] for r in runs[n]):.1f} | "
              f"{med(r['e2e_tps'] for r in runs[n]):.1f} |")
    if not all(r["ok"] for rs in runs.values() for r in rs):
        sys.exit("a run had failed shards")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads = the worker's num_cpus")
    ap.add_argument("--repeats", type=int, default=3, help="alternating direct / runner rounds; medians reported")
    ap.add_argument("--shards-per-actor", type=int, default=2, help="workers.shards_per_actor of the runner")
    ap.add_argument("--slots", type=int, nargs="+", metavar="N",
                    help="compare runner runs with these workers.shards_per_actor values instead")
    args = ap.parse_args()

    import ray
    import pyarrow.parquet as pq

    import fastdllm

    decode = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.gen_length}
    cfg = fastdllm.DecodeConfig.from_dict(decode)
    if args.slots:
        return compare_slots(args, decode)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, configure_logging=False, log_to_driver=False)
    d_tps, a_tps, r_runs = [], [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            write_demo_data(data, rows=args.rows, files=1)
            prompts = pq.read_table(data / "part-000.parquet").column("prompt").to_pylist()
            for k in range(args.repeats):  # alternate which side goes first, so drifting load hits both alike
                if k % 2:
                    r_runs.append(runner(data, Path(tmp) / f"out{k}", decode, args))
                tokens, seconds = direct(prompts, cfg, args.batch_size, args.threads)
                d_tps.append(tokens / seconds)
                a_tps.append(direct_in_actor(prompts, cfg, args.batch_size, args.threads))
                if not k % 2:
                    r_runs.append(runner(data, Path(tmp) / f"out{k}", decode, args))
                print(f"round {k}: direct {d_tps[-1]:.1f}, in an actor {a_tps[-1]:.1f}, runner {r_runs[-1]['tps']:.1f} "
                      f"tokens/s "
                      f"({r_runs[-1]['e2e_tps']:.1f} with actor start-up)", flush=True)
    finally:
        ray.shutdown()
    med = statistics.median
    direct_tps, actor_tps, runner_tps = med(d_tps), med(a_tps), med(r["tps"] for r in r_runs)
    print(f"{args.rows} prompts in {args.rows // args.rows_per_shard} shards, batch {args.batch_size}, {decode}, "
          f"{args.threads} thread(s), tiny model on CPU; medians of {args.repeats} rounds")
    print(f"direct      {direct_tps:.1f} tokens/s in this process; {actor_tps:.1f} tokens/s in a fresh Ray actor")
    print(f"runner      {runner_tps:.1f} tokens/s (decode is {100 * med(r['decode_share'] for r in r_runs):.1f}% "
          f"of shard wall time; shards are {100 * med(r['in_shards'] for r in r_runs):.1f}% of the span)")
    print(f"runner e2e  {med(r['e2e_tps'] for r in r_runs):.1f} tokens/s including actor start-up and model load")
    print(f"overhead    {100 * (direct_tps - runner_tps) / direct_tps:.1f}% vs direct in this process (target < 10%); "
          f"{100 * (actor_tps - runner_tps) / actor_tps:.1f}% vs direct in a Ray actor")
    print(f"outside     "
          f"{100 * med(r['outside_generate'] for r in r_runs):.1f}% of the runner's span is outside generate() "
          f"({100 * med(r['io_share'] for r in r_runs):.1f}% Parquet reads and writes)")
    if not all(r["ok"] and r["tokens"] == tokens for r in r_runs):
        sys.exit("runner and direct disagree on the generated tokens, or shards failed")


if __name__ == "__main__":
    main()
