"""The job runner: Click CLI, manifests, shard planning, the Ray driver and job summaries."""
