"""The job's Ray metrics (`ray.util.metrics`), recorded by the driver from each committed shard's stats and each
failed attempt. Ray exports them with the cluster's own metrics (Prometheus names prefixed `ray_`, counters
suffixed `_total`), tagged with the job name, so a Grafana panel can sit beside Ray's dashboards."""

from __future__ import annotations

SHARD_SECONDS_BUCKETS = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600]


class JobMetrics:
    """Counters of rows, generated tokens, error rows, committed shards and failed attempts; a histogram of shard
    wall seconds; gauges of decode occupancy (the last shard's) and of actors by state."""

    def __init__(self, job: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"job": job}
        keys = ("job",)
        self.rows = Counter("fastdllm_rows", "Rows of committed shards (error rows included).", tag_keys=keys)
        self.error_rows = Counter("fastdllm_error_rows", "Rows that got an error instead of a completion.",
                                  tag_keys=keys)
        self.tokens = Counter("fastdllm_generated_tokens", "Generated tokens before the first stop token.",
                              tag_keys=keys)
        self.shards = Counter("fastdllm_shards_committed", "Shards committed.", tag_keys=keys)
        self.failures = Counter("fastdllm_shard_attempts_failed", "Shard attempts that failed (retried or not).",
                                tag_keys=keys)
        self.shard_seconds = Histogram("fastdllm_shard_seconds", "Shard wall time, reading to committing.",
                                       boundaries=SHARD_SECONDS_BUCKETS, tag_keys=keys)
        self.occupancy = Gauge("fastdllm_occupancy", "Decode occupancy of the last committed shard: nfe / "
                               "row_forwards (1.0: no row was pushed through the model only to wait).", tag_keys=keys)
        self.actors = Gauge("fastdllm_actors", "The job's actors by state (waiting for placement, loading the "
                            "model, ready).", tag_keys=("job", "state"))

    def shard_committed(self, stats) -> None:
        """Record one committed shard's ShardStats."""
        self.rows.inc(stats.rows, tags=self.tags)
        if stats.error_rows:
            self.error_rows.inc(stats.error_rows, tags=self.tags)
        if stats.generated_tokens:
            self.tokens.inc(stats.generated_tokens, tags=self.tags)
        self.shards.inc(1, tags=self.tags)
        self.shard_seconds.observe(stats.wall_seconds, tags=self.tags)
        if stats.row_forwards:
            self.occupancy.set(stats.occupancy, tags=self.tags)

    def attempt_failed(self) -> None:
        self.failures.inc(1, tags=self.tags)

    def actor_states(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.actors.set(n, tags={**self.tags, "state": state})
