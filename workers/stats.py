"""Per-shard throughput counters. They add up (`a + b`), so job totals are the sum of the shards' stats files."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ShardStats:
    """Summable counters of one shard (or, summed, of many). Tokens are generated tokens before the first stop
    token: never the prompt, never padding. wall_seconds runs from reading the shard to committing it."""

    shards: int = 0
    rows: int = 0  # input rows (prompts); each gives num_samples output rows
    error_rows: int = 0  # input rows that could not be decoded (their output rows carry the error)
    generated_tokens: int = 0
    nfe: int = 0
    forward_passes: int = 0
    row_forwards: int = 0  # rows summed over every forward: nfe / row_forwards is the occupancy
    # engine steps the shard's rows took part in: the batch places they offered (steps x max_batch_size) and the
    # rows in flight in them (any shard's: the next shard's rows join while this one's last rows finish)
    slot_steps: int = 0
    rows_in_flight: int = 0
    read_seconds: float = 0.0  # reading the shard's rows
    decode_seconds: float = 0.0  # fastdllm.generate calls
    write_seconds: float = 0.0  # writing the shard's data file
    wall_seconds: float = 0.0  # reading the shard -> committing it
    error_reasons: dict[str, int] = field(default_factory=dict)  # error rows by reason (numbers blanked)
    finish_reasons: dict[str, int] = field(default_factory=dict)  # output rows by finish reason (stop, length, error)

    def __add__(self, other: "ShardStats") -> "ShardStats":
        counts = ("error_reasons", "finish_reasons")
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)
                  if f.name not in counts}
        return ShardStats(**summed, **{k: dict(Counter(getattr(self, k)) + Counter(getattr(other, k))) for k in counts})

    def commonest_errors(self, k: int = 3) -> list[tuple[str, int]]:
        """The k most frequent error reasons with their row counts, most frequent first."""
        return sorted(self.error_reasons.items(), key=lambda t: (-t[1], t[0]))[:k]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of shard wall time (per worker, summed over shards)."""
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def occupancy(self) -> float:
        """Useful share of the rows pushed through the model (nfe / row_forwards; 1.0: none only waited)."""
        return self.nfe / self.row_forwards if self.row_forwards else 1.0

    @property
    def slot_utilisation(self) -> float:
        """Mean rows in flight / max_batch_size over the engine steps the shard's rows took part in."""
        return self.rows_in_flight / self.slot_steps if self.slot_steps else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_second": self.tokens_per_second, "occupancy": self.occupancy,
                "slot_utilisation": self.slot_utilisation}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardStats":
        defaults = {"shards": 1, "error_reasons": {}, "finish_reasons": {}}
        return cls(**{f.name: d.get(f.name, defaults.get(f.name, 0)) for f in dataclasses.fields(cls)})
