"""The Ray driver: validate and plan, prepare the output (resume check, job.json), run the pending shards on
plain actors (one model load each, shards handed out one at a time as actors free up), retry shards whose
worker died or raised, and write summary.json. `ray` is imported here and nowhere below jobs/."""

from __future__ import annotations

import logging
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

import fastdllm
from workers import Shard, ShardStats, ShardWorker, WorkerSettings
from workers.storage import filesystem, read_json, redact, write_json

from .manifest import InvalidJob, Manifest
from .plan import Plan, check_model_source, make_plan

log = logging.getLogger("fastdllm.jobs")


@dataclass
class JobResult:
    output_uri: str
    summary: dict
    failed: dict[int, str] = field(default_factory=dict)  # shard index -> why

    @property
    def ok(self) -> bool:
        return not self.failed


def worker_settings(m: Manifest) -> WorkerSettings:
    return WorkerSettings(
        model_source=m.model.source, model_revision=m.model.revision, dtype=m.model.dtype, device=m.model.device,
        chat_template=m.model.chat_template, trust_remote_code=m.model.trust_remote_code, decode=m.decode,
        output_uri=m.output.uri, prompt_column=m.input.prompt_column, id_column=m.input.id_column,
        storage_options=m.storage_options, batch_size=m.workers.batch_size, crash=m.faults.crash,
        error=m.faults.error, hang=m.faults.hang)


def _identity(m: Manifest) -> dict:
    """What decides the output's content: a rerun must match it to reuse committed shards."""
    return {"model": m.model.model_dump(include={"source", "revision", "dtype", "chat_template"}),
            "decode": m.decode}


def _versions() -> dict:
    import pyarrow
    import torch

    out = {"fastdllm": fastdllm.__version__, "torch": torch.__version__, "pyarrow": pyarrow.__version__,
           "python": platform.python_version()}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


class Output:
    """The output directory: job.json, shards/, stats/ (commit markers), summary.json."""

    def __init__(self, uri: str, storage_options: dict | None):
        self.uri = uri
        try:
            self.fs, self.root = filesystem(uri, storage_options)
        except ValueError as e:
            raise InvalidJob(str(e)) from None

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def job(self) -> dict | None:
        return read_json(self.fs, self.path("job.json")) if self.fs.exists(self.path("job.json")) else None

    def committed(self) -> dict[int, dict]:
        """Stats of every committed shard, by index."""
        self.fs.invalidate_cache()  # object stores cache listings; workers wrote behind our back
        try:
            files = self.fs.glob(self.path("stats", "*.json"))
        except FileNotFoundError:
            return {}
        stats = [read_json(self.fs, f) for f in sorted(files)]
        return {s["shard"]: s for s in stats}

    def clear(self) -> None:
        for sub in ("stats", "shards"):
            if self.fs.exists(self.path(sub)):
                self.fs.rm(self.path(sub), recursive=True)
        if self.fs.exists(self.path("summary.json")):
            self.fs.rm(self.path("summary.json"))


def prepare_output(m: Manifest, plan: Plan, force: bool) -> Output:
    """Check an existing output against this job (refuse a changed input or config unless forced), then write
    job.json and create shards/ and stats/. An unwritable output raises InvalidJob before any work."""
    out = Output(m.output.uri, m.storage_options)
    ident = _identity(m)
    try:
        old = out.job()
    except (OSError, ValueError) as e:
        raise InvalidJob(f"output.uri {m.output.uri} is not usable: {type(e).__name__}: {e}") from None
    if old is not None:
        changes = []
        if old.get("plan", {}).get("fingerprint") != plan.fingerprint:
            changes.append("the input (files, rows, columns or rows_per_shard) changed")
        for part in ("model", "decode"):
            a, b = old.get("identity", {}).get(part, {}), ident[part]
            diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            if diffs:
                changes.append(f"{part} config changed ({', '.join(diffs)})")
        if changes and not force:
            raise InvalidJob(f"output {m.output.uri} holds a different job: {'; '.join(changes)}; use a new "
                             "output.uri, or --force to discard its shards and start over")
        if changes:
            log.warning("--force: discarding the shards in %s (%s)", m.output.uri, "; ".join(changes))
            out.clear()
    options, hidden = redact(m.storage_options)
    for k in hidden:
        log.warning("%s holds an inline secret; it is left out of job.json (reference an environment variable: "
                    "'${VAR}')", k)
    manifest = m.model_dump()
    manifest["storage_options"] = options
    job = {"name": m.name, "manifest": manifest, "identity": ident, "plan": plan.to_dict(), "versions": _versions(),
           "created_at": (old or {}).get("created_at") or _now()}
    try:
        for sub in ("shards", "stats"):
            out.fs.makedirs(out.path(sub), exist_ok=True)
        write_json(out.fs, out.path("job.json"), job)
    except (OSError, ValueError) as e:
        raise InvalidJob(f"output.uri {m.output.uri} is not writable: {type(e).__name__}: {e}") from None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def summarize(out: Output, plan_shards: int, failed: dict[int, str], run: dict) -> dict:
    committed = out.committed()
    total = sum((ShardStats.from_dict(s) for s in committed.values()), ShardStats())
    return {"shards": plan_shards, "committed": len(committed), "pending": plan_shards - len(committed),
            "failed": [{"shard": k, "error": v} for k, v in sorted(failed.items())],
            "totals": total.to_dict(), "run": run, "finished_at": _now()}


def _init_ray(address: str | None):
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=False)
    return True


def run_job(m: Manifest, *, address: str | None = None, force: bool = False, progress: bool | None = None
            ) -> JobResult:
    """Run (or resume) a job; InvalidJob for a bad manifest or input, raised before any shard runs."""
    check_model_source(m)
    plan = make_plan(m)
    out = prepare_output(m, plan, force)
    done = set(out.committed())
    pending = [s for s in plan.shards if s.index not in done]
    log.info("job %s: %d shards (%d rows) in %d files; %d committed, %d to run -> %s", m.name, len(plan.shards),
             plan.rows, len(plan.files), len(done), len(pending), m.output.uri)
    t0 = time.perf_counter()
    failed: dict[int, str] = {}
    tokens = 0
    if pending:
        tokens, failed = _run_shards(m, pending, address, progress)
    wall = time.perf_counter() - t0
    run = {"shards_run": len(pending), "generated_tokens": tokens, "wall_seconds": wall,
           "tokens_per_second": tokens / wall if wall > 0 and tokens else 0.0}
    summary = summarize(out, len(plan.shards), failed, run)
    write_json(out.fs, out.path("summary.json"), summary)
    return JobResult(m.output.uri, summary, failed)


def _run_shards(m: Manifest, pending: list[Shard], address: str | None, progress: bool | None):
    """Run shards on `workers.count` actors; returns (generated tokens, {failed shard: why}).

    Each actor holds one shard at a time; a free actor takes the next shard in the queue. A failed attempt
    (the actor process died, the task raised, or it ran past workers.shard_timeout_s) puts the shard back at
    the end of the queue until it has had max_retries + 1 attempts; a dead or stuck actor is replaced."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    started_ray = _init_ray(address)
    w = m.workers
    try:
        _check_resources(w, strict=started_ray)
    except InvalidJob:
        if started_ray:
            ray.shutdown()
        raise
    actor_cls = ray.remote(num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=0)(ShardWorker)
    settings = worker_settings(m)
    slots = list(range(min(w.count, len(pending))))
    actors = {i: actor_cls.remote(settings) for i in slots}
    queue: deque[Shard] = deque(pending)
    attempts: dict[int, int] = {}
    inflight: dict = {}  # ref -> (slot, shard, dispatch time)
    idle = list(slots)
    failed: dict[int, str] = {}
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=sum(s.rows for s in pending), unit="row", desc=m.name,
               disable=None if progress is None else not progress)

    deaths = 0  # actor deaths since the last committed shard
    give_up_after = (w.max_retries + 1) * len(slots)

    def attempt_failed(slot: int, shard: Shard, why: str, replace: bool) -> None:
        nonlocal deaths
        deaths += replace
        if deaths >= give_up_after and replace:  # every actor keeps dying (a model that cannot load, OOM...)
            for s in [shard, *queue]:
                failed[s.index] = f"{why} (gave up: {deaths} worker deaths in a row)"
            queue.clear()
            log.error("workers keep dying (%s); giving up on %d shards", why, len(failed))
            return
        if replace:  # a new process; its model loads again
            ray.kill(actors[slot], no_restart=True)
            actors[slot] = actor_cls.remote(settings)
        idle.append(slot)
        n = attempts[shard.index] = attempts.get(shard.index, 0) + 1
        if n <= w.max_retries:
            log.warning("shard %s failed (attempt %d of %d): %s; retrying", shard.name, n, w.max_retries + 1, why)
            queue.append(shard)
        else:
            log.error("shard %s failed after %d attempts: %s", shard.name, n, why)
            failed[shard.index] = why

    try:
        while queue or inflight:
            while idle and queue:
                slot, shard = idle.pop(), queue.popleft()
                ref = actors[slot].run_shard.remote(shard, attempts.get(shard.index, 0))
                inflight[ref] = (slot, shard, time.perf_counter())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0 if w.shard_timeout_s else None)
            if not ready:
                now = time.perf_counter()
                for ref, (slot, shard, since) in list(inflight.items()):
                    if now - since > w.shard_timeout_s:
                        del inflight[ref]
                        attempt_failed(slot, shard, f"timed out after {w.shard_timeout_s:g}s", replace=True)
                continue
            slot, shard, _ = inflight.pop(ready[0])
            try:
                stats = ray.get(ready[0])
            except (RayActorError, RayTaskError) as e:
                attempt_failed(slot, shard, _reason(e), replace=isinstance(e, RayActorError))
                continue
            idle.append(slot)
            deaths = 0
            tokens += stats["generated_tokens"]
            bar.update(stats["rows"])
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}", refresh=False)
            log.debug("shard %s committed: %d rows, %.1f tokens/s on %s", shard.name, stats["rows"],
                      stats["tokens_per_second"], stats["worker"])
    finally:
        bar.close()
        for a in actors.values():
            ray.kill(a)
        if started_ray:
            ray.shutdown()
    return tokens, failed


def _check_resources(w, strict: bool) -> None:
    """An actor that asks for more CPUs or GPUs than the whole cluster has would wait forever: refuse it on a
    local Ray we started (InvalidJob), warn on a joined cluster (an autoscaler may still add nodes)."""
    import ray

    have = ray.cluster_resources()
    for name, want in (("GPU", w.num_gpus), ("CPU", w.num_cpus)):
        if want > have.get(name, 0):
            msg = (f"workers.num_{name.lower()}s is {want:g} but the Ray cluster has {have.get(name, 0):g} {name}s; "
                   f"lower it (e.g. --set workers.num_{name.lower()}s=0) or join a cluster with --address")
            if strict:
                raise InvalidJob(msg)
            log.warning("%s; actors will wait until the cluster has them", msg)


def _reason(e: Exception) -> str:
    """One line saying why a shard attempt failed."""
    from ray.exceptions import RayActorError, RayTaskError

    text = str(e).replace("\x1b[36m", "").replace("\x1b[39m", "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(e, RayActorError):
        if getattr(e, "_actor_init_failed", False) or "creation task" in text:
            return f"worker failed to start: {lines[-1][:300]}"  # the last line is the exception
        return f"worker process died ({lines[0][:200]})" if lines else "worker process died"
    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if cause is not None and not isinstance(cause, RayTaskError):
            return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"
