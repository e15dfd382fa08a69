"""`fastdllm status`: what an output directory holds (committed / pending / failed / damaged shards, rows,
tokens, the run holding its lease), every committed shard verified against its data file."""

from __future__ import annotations

from dataclasses import dataclass

from fastdllm.workers import JobOutput, MissingShard, ShardRecord, ShardStats
from fastdllm.workers.output import LeaseInfo, planned_rows
from fastdllm.workers.spec import recorded_manifest
from fastdllm.workers.storage import storage_error

from .manifest import InvalidJob
from .runner import error_policy


@dataclass
class JobStatus:
    name: str
    uri: str
    shards: int
    rows: int  # planned
    committed: dict[int, ShardRecord]
    pending: list[int]  # not committed, no known failure
    problems: list[MissingShard]  # failed (last run), bad input, damaged
    lease: LeaseInfo | None  # the live lease of a running driver
    max_error_rate: float = 1.0  # the job's workers.max_error_rate
    num_samples: int = 1  # output rows per prompt

    @property
    def complete(self) -> bool:
        """What `fastdllm run` exits 0 for: every planned shard committed and verified, errors within the policy."""
        return len(self.committed) == self.shards and not self.problems and self.too_many_errors is None

    @property
    def totals(self) -> ShardStats:
        return sum((r.stats for r in self.committed.values()), ShardStats())

    @property
    def too_many_errors(self) -> str | None:
        """The error policy's verdict on the committed shards (None: within workers.max_error_rate)."""
        return error_policy(self.totals, self.max_error_rate)


def job_status(uri: str, storage_options: dict | None = None, verify: bool = True) -> JobStatus:
    """The output's state; with `verify`, every committed shard's data file is read and checksummed (without,
    only its presence and size are checked)."""
    try:
        out = JobOutput(uri, storage_options)
        job = out.read_job()
    except Exception as e:  # storage errors of any fsspec backend, a job.json that does not parse
        raise InvalidJob(f"cannot read {uri}: {storage_error(e)}") from None
    if job is None:
        raise InvalidJob(f"{uri} holds no job (no job.json)")
    try:
        m = recorded_manifest(job)
    except ValueError as e:  # pydantic's ValidationError included: a required field missing
        raise InvalidJob(f"{uri}/job.json: its manifest does not read back: {str(e).splitlines()[0]}") from None
    out.ext = m.output.format  # shard data files: shards/NNNNN.<ext>
    planned = planned_rows(job)
    scan = out.scan(planned, verify=verify)
    summary = out.read_summary()
    last = {m.shard: m for m in summary.missing if m.kind in ("data", "failed")} if summary else {}
    problems, pending = [], []
    for k in sorted(planned):
        if k in scan.committed:
            continue
        if k in scan.damaged:
            problems.append(MissingShard(k, "damaged", scan.damaged[k]))
        elif k in last:
            problems.append(last[k])
        else:
            pending.append(k)
    lease = out.read_lease()
    return JobStatus(name=job["name"], uri=uri, shards=len(planned), rows=job["plan"]["rows"],
                     committed=scan.committed, pending=pending, problems=problems,
                     lease=lease if lease is not None and not lease.expired() and not lease.holder_is_dead()
                     else None,
                     max_error_rate=m.workers.max_error_rate, num_samples=m.decode.num_samples)


def throughput_table(records: dict[int, ShardRecord]) -> str:
    """A text table of per-shard throughput from the commit records (slots: the slot utilisation, mean rows in
    flight / max_batch_size over the engine steps the shard's rows took part in)."""
    lines = [f"{'shard':>5} {'rows':>6} {'errors':>6} {'tokens':>8} {'nfe':>8} {'occup':>6} {'slots':>6} "
             f"{'seconds':>8} {'tok/s':>8} {'dtype':>8}  worker"]
    for k in sorted(records):
        r, s = records[k], records[k].stats
        lines.append(f"{k:>5} {s.rows:>6} {s.error_rows:>6} {s.generated_tokens:>8} {s.nfe:>8} {s.occupancy:>6.2f} "
                     f"{s.slot_utilisation:>6.2f} {s.wall_seconds:>8.2f} {s.tokens_per_second:>8.1f} {r.dtype or '-':>8}  "
                     f"{r.worker}")
    return "\n".join(lines)
