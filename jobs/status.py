"""`fastdllm status`: what an output directory holds (committed / pending / failed shards, rows, tokens)."""

from __future__ import annotations

from workers import ShardStats

from .manifest import InvalidJob
from .runner import Output


def job_status(uri: str, storage_options: dict | None = None) -> dict:
    out = Output(uri, storage_options)
    try:
        job = out.job()
    except (OSError, ValueError) as e:
        raise InvalidJob(f"cannot read {uri}: {type(e).__name__}: {e}") from None
    if job is None:
        raise InvalidJob(f"{uri} holds no job (no job.json)")
    committed = out.committed()
    shards = job["plan"]["shards"]
    summary = None
    if out.fs.exists(out.path("summary.json")):
        from workers.storage import read_json

        summary = read_json(out.fs, out.path("summary.json"))
    failed = {f["shard"]: f["error"] for f in (summary or {}).get("failed", []) if f["shard"] not in committed}
    total = sum((ShardStats.from_dict(s) for s in committed.values()), ShardStats())
    return {"name": job["name"], "uri": uri, "shards": len(shards), "committed": sorted(committed),
            "pending": [s["index"] for s in shards if s["index"] not in committed and s["index"] not in failed],
            "failed": failed, "rows": job["plan"]["rows"], "totals": total, "stats": committed}


def throughput_table(stats: dict[int, dict]) -> str:
    """A text table of per-shard throughput from stats files."""
    lines = [f"{'shard':>5} {'rows':>6} {'errors':>6} {'tokens':>8} {'nfe':>8} {'seconds':>8} {'tok/s':>8}  worker"]
    for k in sorted(stats):
        s = stats[k]
        lines.append(f"{k:>5} {s['rows']:>6} {s['error_rows']:>6} {s['generated_tokens']:>8} {s['nfe']:>8} "
                     f"{s['wall_seconds']:>8.2f} {s['tokens_per_second']:>8.1f}  {s['worker']}")
    return "\n".join(lines)
