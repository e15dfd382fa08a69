"""The job runner: Click CLI, manifests, shard planning, the Ray driver and job summaries."""

from .manifest import InvalidJob, Manifest, load_manifest, parse_manifest
from .plan import Plan, make_plan
from .runner import JobResult, run_job

__all__ = ["InvalidJob", "Manifest", "load_manifest", "parse_manifest", "Plan", "make_plan", "JobResult", "run_job"]
