"""Plain worker classes (wrapped with ray.remote by jobs/): load a model once, decode shards, write results."""

from .inputs import InputReader, InputSource, ShardDataError
from .output import JobOutput, JobSummary, Lease, LeaseHeld, MissingShard, RunStats, ShardRecord
from .shard import Shard, ShardWorker, WorkerSettings, seed_id
from .spec import JobSpec
from .stats import ShardStats

__all__ = ["InputReader", "InputSource", "JobOutput", "JobSpec", "JobSummary", "Lease", "LeaseHeld", "MissingShard",
           "RunStats", "Shard", "ShardDataError", "ShardRecord", "ShardStats", "ShardWorker", "WorkerSettings",
           "seed_id"]
