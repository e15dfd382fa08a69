"""Plain worker classes (wrapped with ray.remote by jobs/): load a model once, decode shards, write results."""

from .output import JobOutput, JobSummary, Lease, LeaseHeld, MissingShard, RunStats, ShardRecord
from .shard import Shard, ShardDataError, ShardWorker, WorkerSettings, read_shard_rows, seed_id
from .stats import ShardStats

__all__ = ["JobOutput", "JobSummary", "Lease", "LeaseHeld", "MissingShard", "RunStats", "Shard", "ShardDataError",
           "ShardRecord", "ShardStats", "ShardWorker", "WorkerSettings", "read_shard_rows", "seed_id"]
