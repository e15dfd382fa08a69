"""Plain worker classes (wrapped with ray.remote by jobs/): load a model once, decode shards, write results."""

from .shard import Shard, ShardWorker, WorkerSettings, read_shard_rows, seed_id
from .stats import ShardStats

__all__ = ["Shard", "ShardWorker", "WorkerSettings", "ShardStats", "read_shard_rows", "seed_id"]
