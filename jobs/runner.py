"""The job driver: validate and plan, take the output's lease, prepare the output (resume check, job.json), run
the pending shards on Ray actors (jobs/cluster.py connects, jobs/dispatch.py hands shards out, retries and
watches), then verify every planned shard and write summary.json. `ray` is imported in jobs/ only, never below."""

from __future__ import annotations

import logging
import os
import platform
import signal
import time
from dataclasses import dataclass

import fastdllm
from fastdllm.workers import (JobOutput, JobSpec, JobSummary, Lease, LeaseHeld, MissingShard, RunStats, Shard,
                              ShardRecord, ShardStats)
from fastdllm.workers.output import now
from fastdllm.workers.storage import redact, scrub_all, storage_error

from .cluster import JobInterrupted, Signals, actors_that_fit, check_reachable, connect, stop_on_signals
from .dispatch import Dispatcher, Outcome
from .guards import check_no_overlap, check_output_uri
from .manifest import InvalidJob, Manifest
from .metrics import JobMetrics
from .plan import Plan, check_model_source, make_plan
from .report import write_card, write_report

log = logging.getLogger("fastdllm.jobs")


@dataclass
class JobResult:
    output_uri: str
    summary: JobSummary
    problem: str | None = None  # the run could not finish its own bookkeeping (lost lease, summary not written)
    interrupted: JobInterrupted | None = None  # the signal that stopped the run early
    ran: int = 0  # shards this call ran (summary.run keeps the last run that ran any)

    @property
    def ok(self) -> bool:
        """Every planned shard committed and verified, and the error rows within workers.max_error_rate (exit 0)."""
        return (self.summary.complete and self.problem is None and self.interrupted is None
                and self.summary.too_many_errors is None)

    @property
    def failed(self) -> dict[int, str]:
        """Missing shards -> why."""
        return {m.shard: m.why for m in self.summary.missing}


def absolute_uris(m: Manifest) -> Manifest:
    """The manifest with local input, output and model paths made absolute, before anything reaches a worker: a
    worker on another node, or in another working directory, must read, load and write where the driver looks.
    URLs, built-in model names and hub repo ids stay."""

    def absolute(uri: str) -> str:
        return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))

    source = fastdllm.models.local_path(m.model.source) or m.model.source
    return m.model_copy(update={"input": m.input.model_copy(update={"uri": absolute(m.input.uri)}),
                                "output": m.output.model_copy(update={"uri": absolute(m.output.uri)}),
                                "model": m.model.model_copy(update={"source": source})})


def job_spec(m: Manifest, plan: Plan, run_id: str | None = None) -> JobSpec:
    """The frozen spec every worker of this run gets: the manifest (after absolute_uris) and what planning found."""
    return JobSpec.of(m, plan.source, plan.keep_columns, run_id)


def input_changes(old_job: dict, m: Manifest, plan: Plan) -> str:
    """What differs between the input an output was planned from (its job.json) and the input now: which file
    appeared, went or changed (size, rows, content / footer hash), or which setting (columns, rows_per_shard)."""
    before = {f["relpath"]: f for f in old_job.get("plan", {}).get("files", [])}
    now = {f.relpath: vars(f) for f in plan.files}
    what = [f"{rel} is new" for rel in now if rel not in before]
    what += [f"{rel} is gone" for rel in before if rel not in now]
    pin = "footer hash" if plan.source.format == "parquet" else (
        "fingerprint" if plan.source.format == "hf" else "content hash")
    for rel in (r for r in now if r in before):
        a, b = before[rel], now[rel]
        diff = [f"{k} {a.get(k)} -> {b[k]}" for k in ("size", "rows") if a.get(k) != b[k]]
        if a.get("digest") != b["digest"]:
            diff.append(f"{pin} differs")
        if diff:
            what.append(f"{rel}: {', '.join(diff)}")
    old_in = old_job.get("manifest", {}).get("input", {})
    new_in = m.input.model_dump()
    for k in ("format", "prompt_column", "messages_column", "id_column", "rows_per_shard", "column_types"):
        if old_in.get(k, {} if k == "column_types" else None) != new_in.get(k):
            what.append(f"input.{k} {old_in.get(k)!r} -> {new_in.get(k)!r}")
    if old_job.get("plan", {}).get("keep_columns") != plan.keep_columns:
        what.append(f"kept columns {old_job.get('plan', {}).get('keep_columns')} -> {plan.keep_columns}")
    return "; ".join(what[:5]) + (f"; and {len(what) - 5} more" if len(what) > 5 else "") if what else \
        "files, rows, columns or rows_per_shard"


def error_policy(total: ShardStats, max_error_rate: float) -> str | None:
    """One line when the job's error rows exceed workers.max_error_rate, or every row failed; else None."""
    if not total.rows or (total.error_rows < total.rows and total.error_rows <= max_error_rate * total.rows):
        return None
    common = "; ".join(f"{why} ({k})" for why, k in total.commonest_errors())
    what = ("every row failed" if total.error_rows == total.rows
            else f"above workers.max_error_rate {max_error_rate:g}")
    return (f"{total.error_rows} of {total.rows} rows failed ({total.error_rows / total.rows:.1%}), {what}; "
            f"commonest: {common}")


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
        return JobOutput(m.output.uri, m.storage_options, ext=m.output.format)
    except (ValueError, ImportError, OSError) as e:
        raise InvalidJob(f"output.uri {m.output.uri} is not usable: {storage_error(e)}") from None


def take_lease(out: JobOutput, m: Manifest) -> Lease:
    """This run's lease on the output, held (and renewed) until released; InvalidJob when another run holds it
    or the output cannot be written."""
    lease = Lease(out, m.output.lease_s)
    try:
        lease.acquire()
    except LeaseHeld as e:
        raise InvalidJob(str(e)) from None
    except Exception as e:  # storage errors of any fsspec backend: endpoint, credentials, options, timeouts
        raise InvalidJob(f"output.uri {m.output.uri} is not writable: {storage_error(e)}") from None
    return lease


def prepare_output(out: JobOutput, m: Manifest, plan: Plan, force: bool) -> None:
    """Check an existing output against this job (refuse a changed input or config unless forced), then write
    job.json. Call it holding the output's lease. An unwritable output raises InvalidJob before any work."""
    ident = scrub_all(m.identity())  # as job.json records it (credentials in URIs scrubbed), so a rerun matches
    try:
        old = out.read_job()
    except ValueError as e:
        if not force:
            raise InvalidJob(f"{e}; use a new output.uri, or --force to discard the output and start over") from None
        log.warning("--force: %s; starting over", e)
        old = None
        _force_clear(out)
    except Exception as e:  # storage errors of any fsspec backend
        raise InvalidJob(f"output.uri {m.output.uri} is not usable: {storage_error(e)}") from None
    if old is not None:
        changes = []
        if old.get("plan", {}).get("fingerprint") != plan.fingerprint:
            changes.append(f"the input changed ({input_changes(old, m, plan)})")
        for part in ("model", "decode", "output"):
            a, b = old.get("identity", {}).get(part, {}), ident[part]
            if part == "output":  # written before output.id_name existed: the ids were in `id`
                a = {"id_name": "id", **a}
            diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            if diffs:
                changes.append(f"{part} config changed ({', '.join(diffs)})")
        if changes and not force:
            raise InvalidJob(f"output {m.output.uri} holds a different job: {'; '.join(changes)}; use a new "
                             "output.uri, or --force to discard its shards and start over")
        if changes:
            log.warning("--force: discarding the shards in %s (%s)", m.output.uri, "; ".join(changes))
            _force_clear(out)
    try:
        out.clear_tmp()  # a worker killed mid-write left them; no worker of this run writes yet
    except Exception as e:  # noqa: BLE001 - only tidiness: readers never look under _tmp/
        log.warning("could not remove left-over temporary files in %s: %s", m.output.uri, storage_error(e))
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
        write_card(out, job, out.read_summary())  # load_dataset(output.uri) works from the first commit on
    except Exception as e:
        raise InvalidJob(f"output.uri {m.output.uri} is not writable: {storage_error(e)}") from None


def _force_clear(out: JobOutput) -> None:
    """--force: remove the files the job wrote (markers, data files, logs, summary, temporary files), say what."""
    removed = out.clear()
    kinds = {"stats/": "markers", "shards/": "data files", "logs/": "logs", "_tmp/": "temporary files"}
    counts = {k: sum(r.startswith(p) for r in removed) for p, k in kinds.items()}
    said = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    said += ", summary.json" if "summary.json" in removed else ""
    log.warning("--force: removed %s from %s (files the job wrote; other files are kept)", said or "nothing",
                out.uri)


def summarize(out: JobOutput, plan: Plan, failed: dict[int, MissingShard], reported: set[int], run: RunStats,
              verified: dict[int, ShardRecord] | None = None, max_error_rate: float = 1.0) -> JobSummary:
    """Verify every planned shard in the output (never trusting what workers said; `verified`: records this run
    already checked, whose data files are then checked by size) and say why each one that is not there is
    missing."""
    scan = out.scan(plan.shard_rows, known=verified)
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
    return JobSummary(shards=len(plan.shards), committed=len(scan.committed), missing=missing, totals=totals, run=run,
                      too_many_errors=error_policy(totals, max_error_rate))


def _unverified(plan: Plan, done: dict[int, ShardRecord], outcome: Outcome, run: RunStats) -> JobSummary:
    """A summary from what this run knows when the output cannot be read back: the shards verified at the start
    and those workers reported; every other planned shard missing."""
    have = set(done) | outcome.reported
    missing = [outcome.failed.get(s.index) or MissingShard(s.index, "not_run", "not run")
               for s in plan.shards if s.index not in have]
    return JobSummary(shards=len(plan.shards), committed=len(have), missing=missing,
                      totals=sum((r.stats for r in done.values()), ShardStats()), run=run)


def run_job(m: Manifest, *, address: str | None = None, force: bool = False, progress: bool | None = None,
            dashboard: bool = True) -> JobResult:
    """Run (or resume) a job; InvalidJob for a bad manifest, input, output or cluster address (or an output another
    run holds), raised before any shard runs. The result is ok only when every planned shard is committed and
    verified. SIGTERM / SIGINT during the run stop it cleanly: JobResult.interrupted names the signal (before the
    output is touched: JobInterrupted is raised)."""
    with stop_on_signals() as stop:
        return _run_job(m, stop, address=address, force=force, progress=progress, dashboard=dashboard)


def _run_job(m: Manifest, stop: Signals, *, address: str | None, force: bool, progress: bool | None,
             dashboard: bool) -> JobResult:
    check_model_source(m)
    check_output_uri(m)
    m = absolute_uris(m)
    plan = make_plan(m)
    check_no_overlap(m, plan)  # before anything is written
    check_reachable(address)  # before the output is touched: a wrong address costs seconds, not minutes
    stop.check()  # a signal while planning: nothing was written, nothing to summarise
    out = open_output(m)
    lease = take_lease(out, m)
    try:
        prepare_output(out, m, plan, force)
        done = out.scan(plan.shard_rows).committed
        pending = [s for s in plan.shards if s.index not in done]
        log.info("job %s: %d shards (%d rows) in %d files; %d committed, %d to run -> %s", m.name,
                 len(plan.shards), plan.rows, len(plan.files), len(done), len(pending), m.output.uri)
        t0 = time.monotonic()
        outcome = Outcome(interrupted=stop.interrupted())
        if pending and not outcome.interrupted:
            outcome = _run_shards(m, plan, pending, address, progress, dashboard, out, lease, stop)
        outcome.interrupted = outcome.interrupted or stop.interrupted()
        stopped = outcome.interrupted.args[0] if outcome.interrupted else None
        end = time.monotonic()
        run = RunStats(shards_run=len(pending), generated_tokens=outcome.tokens, wall_seconds=end - t0,
                       interrupted=stopped, startup_seconds=(outcome.ready_at or end) - t0)
        last = out.read_summary() if not pending else None
        if last is not None:  # nothing to do: the figures stay those of the run that did the work
            run = last.run
        try:
            summary = summarize(out, plan, outcome.failed, outcome.reported, run, verified=done,
                                max_error_rate=m.workers.max_error_rate)
        except Exception as e:  # the store went away at the end (an outage: any exception type)
            why = f"could not verify the output in {m.output.uri}: {storage_error(e)}"
            log.error("%s; rerun the same command once it is reachable", why)
            return JobResult(m.output.uri, _unverified(plan, done, outcome, run), lease.problem() or why,
                             outcome.interrupted)
        if stop.signum is not None and not outcome.interrupted:  # while verifying
            outcome.interrupted = stop.interrupted()
            summary.run.interrupted = outcome.interrupted.args[0]
        if lease.problem():  # another run may own the output now: its summary is not ours to write
            log.error("%s; summary.json not written", lease.lost)
            return JobResult(m.output.uri, summary, lease.lost, outcome.interrupted)
        try:
            out.write_summary(summary)
        except OSError as e:
            log.error("could not write %s/summary.json: %s: %s", m.output.uri, type(e).__name__, e)
            return JobResult(m.output.uri, summary, f"summary.json not written ({type(e).__name__}: {e})",
                             outcome.interrupted)
        try:
            # the card with this run's figures and report.html; report.png only from `fastdllm report` (matplotlib
            # costs a second or more per run)
            write_report(out, png=False, verify=False)
        except Exception as e:  # the report must never fail a job whose shards are committed
            log.warning("could not write the job report in %s: %s", m.output.uri, storage_error(e))
        return JobResult(m.output.uri, summary, interrupted=outcome.interrupted, ran=len(pending))
    finally:
        lease.release()


def _run_shards(m: Manifest, plan: Plan, pending: list[Shard], address: str | None, progress: bool | None,
                dashboard: bool, out: JobOutput, lease: Lease, stop: Signals) -> Outcome:
    """Connect to Ray (jobs/cluster.py), size the actor pool, and run the pending shards (jobs/dispatch.py) until
    done, interrupted by a signal, or `lost()` says the output's lease went to another run."""
    import ray

    try:
        session = connect(address, dashboard=dashboard)
    except SystemExit as e:  # SIGTERM while Ray started: ray.init's own handler exits with 15
        if e.code != signal.SIGTERM:
            raise
        stop.signum = stop.signum or signal.SIGTERM
        if ray.is_initialized():
            ray.shutdown()
        return Outcome(interrupted=stop.interrupted())
    stop.install()  # ray.init replaced our SIGTERM handler with its own
    try:
        if stop.signum is not None:  # arrived while Ray started
            return Outcome(interrupted=stop.interrupted())
        n = min(actors_that_fit(m.workers, strict=session.started), len(pending))
        _warn_local_output(m)
        dispatcher = Dispatcher(m.name, m.workers, job_spec(m, plan, lease.me.run_id), pending, n,
                                progress=progress,
                                write_log=lambda shard, attempt, text: _write_attempt_log(out, shard, attempt, text),
                                recover=lambda shard: out.committed_record(shard.index, shard.rows),
                                lost=lease.problem, metrics=JobMetrics(m.name), check_signals=stop.check)
        return dispatcher.run()
    finally:
        if session.started:
            ray.shutdown()


def _warn_local_output(m: Manifest) -> None:
    """A local output path on a multi-node cluster is each node's own disk: the shards would end up scattered."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and ("://" not in m.output.uri or m.output.uri.startswith("file://")):
        log.warning("output.uri %s is a local path but the cluster has %d nodes: each worker writes to its own "
                    "node's disk unless the path is on a shared file system; prefer object storage (s3://...)",
                    m.output.uri, nodes)


def _write_attempt_log(out: JobOutput, shard: Shard, attempt: int, text: str) -> None:
    """logs/NNNNN-attemptK.txt: why attempt K of a shard failed, with the worker's traceback."""
    try:
        out.write_log(shard.index, attempt, text)
    except Exception as e:  # a log that cannot be written must not stop the job
        log.warning("could not write %s: %s", out.log_file(shard.index, attempt), storage_error(e))
