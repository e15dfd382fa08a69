"""The Ray driver: validate and plan, take the output's lease, prepare the output (resume check, job.json), run
the pending shards on plain actors (one model load each, shards handed out one at a time as actors free up),
retry shards whose worker died or raised (not those whose input is bad), then verify every planned shard and
write summary.json. `ray` is imported here and nowhere below jobs/."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import fastdllm
from workers import (JobOutput, JobSummary, Lease, LeaseHeld, MissingShard, RunStats, Shard, ShardDataError,
                     ShardRecord, ShardStats, ShardWorker, WorkerSettings)
from workers.output import now
from workers.storage import redact

from .manifest import InvalidJob, Manifest
from .plan import Plan, check_model_source, make_plan

log = logging.getLogger("fastdllm.jobs")


@dataclass
class JobResult:
    output_uri: str
    summary: JobSummary
    problem: str | None = None  # the run could not finish its own bookkeeping (lost lease, summary not written)

    @property
    def ok(self) -> bool:
        """Every planned shard committed and verified (exit 0)."""
        return self.summary.complete and self.problem is None

    @property
    def failed(self) -> dict[int, str]:
        """Missing shards -> why."""
        return {m.shard: m.why for m in self.summary.missing}


def absolute_uris(m: Manifest) -> Manifest:
    """The manifest with local input and output paths made absolute, before anything reaches a worker: a worker
    on another node, or in another working directory, must read and write where the driver looks. URLs stay."""

    def absolute(uri: str) -> str:
        return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))

    return m.model_copy(update={"input": m.input.model_copy(update={"uri": absolute(m.input.uri)}),
                                "output": m.output.model_copy(update={"uri": absolute(m.output.uri)})})


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


def open_output(m: Manifest) -> JobOutput:
    try:
        return JobOutput(m.output.uri, m.storage_options)
    except (ValueError, ImportError, OSError) as e:
        raise InvalidJob(f"output.uri {m.output.uri} is not usable: {type(e).__name__}: {e}") from None


def take_lease(out: JobOutput, m: Manifest) -> Lease:
    """This run's lease on the output, held (and renewed) until released; InvalidJob when another run holds it
    or the output cannot be written."""
    lease = Lease(out, m.output.lease_s)
    try:
        lease.acquire()
    except LeaseHeld as e:
        raise InvalidJob(str(e)) from None
    except (OSError, ValueError) as e:
        raise InvalidJob(f"output.uri {m.output.uri} is not writable: {type(e).__name__}: {e}") from None
    return lease


def prepare_output(out: JobOutput, m: Manifest, plan: Plan, force: bool) -> None:
    """Check an existing output against this job (refuse a changed input or config unless forced), then write
    job.json. Call it holding the output's lease. An unwritable output raises InvalidJob before any work."""
    ident = _identity(m)
    try:
        old = out.read_job()
    except ValueError as e:
        if not force:
            raise InvalidJob(f"{e}; use a new output.uri, or --force to discard the output and start over") from None
        log.warning("--force: %s; starting over", e)
        old = None
        out.clear()
    except OSError as e:
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
           "created_at": (old or {}).get("created_at") or now()}
    try:
        out.write_job(job)
    except (OSError, ValueError) as e:
        raise InvalidJob(f"output.uri {m.output.uri} is not writable: {type(e).__name__}: {e}") from None


def summarize(out: JobOutput, plan: Plan, failed: dict[int, MissingShard], reported: set[int], run: RunStats,
              verified: dict[int, ShardRecord] | None = None) -> JobSummary:
    """Verify every planned shard in the output (never trusting what workers said; `verified`: records this run
    already checked, whose data files are then checked by size) and say why each one that is not there is
    missing."""
    scan = out.scan({s.index: s.rows for s in plan.shards}, known=verified)
    missing = []
    for s in plan.shards:
        if s.index in scan.committed:
            continue
        if s.index in failed:
            missing.append(failed[s.index])
        elif s.index in scan.damaged:
            missing.append(MissingShard(s.index, "damaged", scan.damaged[s.index]))
        elif s.index in reported:
            missing.append(MissingShard(s.index, "not_committed", (
                f"its worker committed it, but {out.marker_file(s.index)} is not in {out.uri}: does every node "
                "see the same output.uri?")))
        else:
            missing.append(MissingShard(s.index, "not_run", "not run"))
    totals = sum((r.stats for r in scan.committed.values()), ShardStats())
    return JobSummary(shards=len(plan.shards), committed=len(scan.committed), missing=missing, totals=totals, run=run)


def _init_ray(address: str | None):
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=False)
    return True


def run_job(m: Manifest, *, address: str | None = None, force: bool = False, progress: bool | None = None
            ) -> JobResult:
    """Run (or resume) a job; InvalidJob for a bad manifest, input or output (or an output another run holds),
    raised before any shard runs. The result is ok only when every planned shard is committed and verified."""
    check_model_source(m)
    m = absolute_uris(m)
    plan = make_plan(m)
    out = open_output(m)
    lease = take_lease(out, m)
    try:
        prepare_output(out, m, plan, force)
        done = out.scan({s.index: s.rows for s in plan.shards}).committed
        pending = [s for s in plan.shards if s.index not in done]
        log.info("job %s: %d shards (%d rows) in %d files; %d committed, %d to run -> %s", m.name,
                 len(plan.shards), plan.rows, len(plan.files), len(done), len(pending), m.output.uri)
        t0 = time.perf_counter()
        tokens, failed, reported = 0, {}, set()
        if pending:
            tokens, failed, reported = _run_shards(m, pending, address, progress, out, lambda: lease.lost)
        run = RunStats(shards_run=len(pending), generated_tokens=tokens, wall_seconds=time.perf_counter() - t0)
        summary = summarize(out, plan, failed, reported, run, verified=done)
        if lease.lost:  # another run owns the output now: its summary is not ours to write
            return JobResult(m.output.uri, summary, lease.lost)
        try:
            out.write_summary(summary)
        except OSError as e:
            log.error("could not write %s/summary.json: %s: %s", m.output.uri, type(e).__name__, e)
            return JobResult(m.output.uri, summary, f"summary.json not written ({type(e).__name__}: {e})")
        return JobResult(m.output.uri, summary)
    finally:
        lease.release()


def _run_shards(m: Manifest, pending: list[Shard], address: str | None, progress: bool | None, out: JobOutput,
                lost: Callable[[], str | None]):
    """Run shards on `workers.count` actors; returns (generated tokens, {failed shard: why}, {shards workers
    reported committed}).

    Each actor holds one shard at a time; a free actor takes the next shard in the queue. A failed attempt
    (the actor process died, the task raised, or it ran past workers.shard_timeout_s) puts the shard back at
    the end of the queue until it has had max_retries + 1 attempts; a dead or stuck actor is replaced. A shard
    whose input is bad (ShardDataError) fails at once: retrying cannot help. Each failed attempt leaves
    logs/NNNNN-attemptK.txt. When `lost()` says the lease was lost, dispatching stops."""
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
    failed: dict[int, MissingShard] = {}
    reported: set[int] = set()
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=sum(s.rows for s in pending), unit="row", desc=m.name,
               disable=None if progress is None else not progress)

    deaths = 0  # actor deaths since the last committed shard
    give_up_after = (w.max_retries + 1) * len(slots)

    def write_log(shard: Shard, text: str) -> None:
        try:
            out.write_log(shard.index, attempts.get(shard.index, 0), text + "\n")
        except OSError as e:
            log.warning("could not write %s: %s", out.log_file(shard.index, attempts.get(shard.index, 0)), e)

    def attempt_failed(slot: int, shard: Shard, why: str, replace: bool) -> None:
        nonlocal deaths
        deaths += replace
        if deaths >= give_up_after and replace:  # every actor keeps dying (a model that cannot load, OOM...)
            for s in [shard, *queue]:
                failed[s.index] = MissingShard(s.index, "failed", f"{why} (gave up: {deaths} worker deaths in a row)")
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
            failed[shard.index] = MissingShard(shard.index, "failed", why)

    try:
        while queue or inflight:
            if lost():
                for s in [*queue, *(shard for _, shard, _ in inflight.values())]:
                    failed[s.index] = MissingShard(s.index, "failed", f"not finished: {lost()}")
                break
            while idle and queue:
                slot, shard = idle.pop(), queue.popleft()
                ref = actors[slot].run_shard.remote(shard, attempts.get(shard.index, 0))
                inflight[ref] = (slot, shard, time.perf_counter())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0 if w.shard_timeout_s else None)
            if not ready:
                t = time.perf_counter()
                for ref, (slot, shard, since) in list(inflight.items()):
                    if t - since > w.shard_timeout_s:
                        del inflight[ref]
                        why = f"timed out after {w.shard_timeout_s:g}s"
                        write_log(shard, why)
                        attempt_failed(slot, shard, why, replace=True)
                continue
            slot, shard, _ = inflight.pop(ready[0])
            try:
                rec = ray.get(ready[0])
            except (RayActorError, RayTaskError) as e:
                write_log(shard, str(e))
                cause = getattr(e, "cause", None)
                if isinstance(cause, ShardDataError):  # the input is wrong: another attempt reads the same
                    log.error("shard %s: %s", shard.name, cause)
                    failed[shard.index] = MissingShard(shard.index, "data", str(cause))
                    idle.append(slot)
                    continue
                attempt_failed(slot, shard, _reason(e), replace=isinstance(e, RayActorError))
                continue
            idle.append(slot)
            deaths = 0
            reported.add(shard.index)
            tokens += rec.stats.generated_tokens
            bar.update(rec.stats.rows)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}", refresh=False)
            log.debug("shard %s committed: %d rows, %.1f tokens/s on %s", shard.name, rec.stats.rows,
                      rec.stats.tokens_per_second, rec.worker)
    finally:
        bar.close()
        for a in actors.values():
            ray.kill(a)
        if started_ray:
            ray.shutdown()
    return tokens, failed, reported


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
