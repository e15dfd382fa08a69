"""Per-shard throughput counters. They add up (`a + b`), so job totals are the sum of the shards' stats files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ShardStats:
    """Summable counters of one shard (or, summed, of many). Tokens are generated tokens before the first stop
    token: never the prompt, never padding. wall_seconds runs from reading the shard to committing it."""

    shards: int = 0
    rows: int = 0
    error_rows: int = 0
    generated_tokens: int = 0
    nfe: int = 0
    forward_passes: int = 0
    row_forwards: int = 0  # rows summed over every forward: nfe / row_forwards is the occupancy
    read_seconds: float = 0.0  # reading the shard's rows
    decode_seconds: float = 0.0  # fastdllm.generate calls
    write_seconds: float = 0.0  # writing the shard's Parquet file
    wall_seconds: float = 0.0  # reading the shard -> committing it

    def __add__(self, other: "ShardStats") -> "ShardStats":
        return ShardStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in dataclasses.fields(self)})

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of shard wall time (per worker, summed over shards)."""
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def occupancy(self) -> float:
        """Useful share of the rows pushed through the model (nfe / row_forwards; 1.0: none only waited)."""
        return self.nfe / self.row_forwards if self.row_forwards else 1.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_second": self.tokens_per_second, "occupancy": self.occupancy}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardStats":
        return cls(**{f.name: d.get(f.name, 1 if f.name == "shards" else 0) for f in dataclasses.fields(cls)})
