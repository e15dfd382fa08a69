"""Handing shards to actors, on a local Ray or a joined cluster, without silent waits.

Each actor goes through: placing (Ray has not granted its resources yet; on a joined cluster it may wait for an
autoscaler) -> loading (its process runs, the model loads) -> idle <-> busy. A busy actor holds up to
`workers.shards_per_actor` shards: the one it decodes and the next, whose rows join the actor's engine as the first one's
last rows finish (workers/shard.py). Shards go only to loaded actors, so an actor the cluster cannot place never
holds a shard. A failed attempt (the actor died, the
task raised, or it ran past the shard timeout) goes back to the end of the queue until it has had
max_retries + 1 attempts; a dead or stuck actor is replaced by a fresh one, which is placed and loaded again. A
shard whose input is bad (ShardDataError) fails at once: another attempt would read the same.

Nothing waits silently: every `workers.heartbeat_s` the driver logs the actors still waiting for placement and,
when nothing was committed meanwhile, what is running and for how long; with no actor placed for
`workers.placement_timeout_s` it gives up on the remaining shards; without `workers.shard_timeout_s` a shard
attempt times out after max(workers.min_shard_timeout_s, 5x the slowest committed shard)."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from fastdllm.workers import MissingShard, Shard, ShardDataError, ShardRecord, ShardWorker, JobSpec
from fastdllm.workers.output import shard_name

from .cluster import JobInterrupted, describe_cluster, describe_need
from .manifest import WorkersSpec

log = logging.getLogger("fastdllm.jobs")

TIMEOUT_FACTOR = 5  # a derived shard timeout: this many times the slowest committed shard
POLL_S = 1.0  # with a bar showing, ask each busy actor this often how many rows it has decoded
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class WorkerActor:
    """A ShardWorker inside a Ray actor. Created empty, so the driver sees when Ray has placed the actor
    (`placed` returns) apart from when its model has loaded (`load` returns)."""

    def placed(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def load(self, settings: JobSpec) -> str:
        self.worker = ShardWorker(settings)
        return self.worker.name

    def run_shard(self, shard: Shard, attempt: int) -> ShardRecord:
        return self.worker.run_shard(shard, attempt)

    def rows_decoded(self) -> int:
        """Output rows decoded so far (committed or not); answered on the actor's spare thread while it decodes."""
        worker = getattr(self, "worker", None)
        return worker.rows_decoded() if worker is not None else 0


@dataclass
class Place:
    """One actor place of the job; its actor is replaced when it dies or hangs."""

    index: int
    actor: object = None
    state: str = "placing"  # placing | loading | idle | busy | stopped (given up)
    since: float = 0.0  # when it entered `state`
    where: str = ""  # host:pid once placed
    running: dict = field(default_factory=dict)  # object ref -> (shard, when it was handed over)
    decoded: int = 0  # output rows its actor had decoded at the last poll (the bar's rows in flight)
    committed: int = 0  # of those, the rows of shards it committed
    polling: bool = False  # a rows_decoded call is out

    def shards(self) -> list[Shard]:
        return [shard for shard, _ in self.running.values()]


@dataclass
class Outcome:
    tokens: int = 0
    failed: dict[int, MissingShard] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)  # shards whose worker said it committed them
    interrupted: JobInterrupted | None = None
    ready_at: float | None = None  # time.monotonic() when the first worker was ready (start-up ends)


class Dispatcher:
    """Runs `shards` on `n_actors` actors loaded with `settings`; `run()` returns an Outcome.

    write_log(shard, attempt, text) keeps each failed attempt's traceback; `lost()` returns why the run lost the
    output (its lease went to another run: stop dispatching) or None; metrics (fastdllm.jobs.metrics.JobMetrics or None)
    records commits, failures and actor states."""

    def __init__(self, name: str, w: WorkersSpec, settings: JobSpec, shards: list[Shard], n_actors: int, *,
                 write_log: Callable[[Shard, int, str], None], lost: Callable[[], str | None] = lambda: None,
                 recover: Callable[[Shard], ShardRecord | None] = lambda shard: None,
                 metrics=None, progress: bool | None = None, check_signals: Callable[[], None] = lambda: None):
        import ray

        self.name, self.w, self.settings = name, w, settings
        self.write_log, self.lost, self.metrics, self.progress = write_log, lost, metrics, progress
        self.recover = recover  # a shard's verified commit record, for shards whose worker died after committing
        self.check_signals = check_signals  # raises JobInterrupted once SIGTERM / SIGINT arrived (jobs/cluster.py)
        self.bar = None
        self.actor_cls = ray.remote(num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_restarts=0,  # + 1: progress polls
                                    max_concurrency=w.shards_per_actor + 1)(WorkerActor)
        self.queue: deque[Shard] = deque(shards)
        self.rows, self.total = sum(s.rows for s in shards), len(shards)
        self.attempts: dict[int, int] = {}
        self.refs: dict = {}  # object ref -> (place, "placed" | "loaded" | "shard")
        self.durations: list[float] = []  # dispatch -> result of each committed shard
        self.out = Outcome()
        self.deaths = 0  # actor deaths since the last commit
        self.rows_done = 0  # prompts of the shards committed in this run
        self.give_up_after = (w.max_retries + 1) * n_actors
        self.places = [Place(i) for i in range(n_actors)]
        now = time.monotonic()
        self.t0 = self.last_commit = self.last_beat = self.last_poll = now
        self.unplaced_since: float | None = now
        for place in self.places:
            self._start(place)

    # -- actors ----------------------------------------------------------------------------------------------

    def _set(self, place: Place, state: str) -> None:
        place.state, place.since = state, time.monotonic()
        if self.metrics:
            counts = {s: 0 for s in ("placing", "loading", "idle", "busy", "stopped")}
            for s in self.places:
                counts[s.state] += 1
            self.metrics.actor_states(counts)

    def _start(self, place: Place) -> None:
        """A fresh actor in `place`: ask Ray to place it, then load its model (both calls queue on the actor)."""
        place.actor, place.where, place.running = self.actor_cls.remote(), "", {}
        place.decoded = place.committed = 0
        place.polling = False
        self.refs[place.actor.placed.remote()] = (place, "placed")
        self.refs[place.actor.load.remote(self.settings)] = (place, "loaded")
        self._set(place, "placing")

    def _replace(self, place: Place) -> None:
        import ray

        self.refs = {r: v for r, v in self.refs.items() if v[0] is not place}
        ray.kill(place.actor, no_restart=True)
        self._start(place)

    def _gave_up(self, why: str) -> bool:
        """After `give_up_after` actor deaths with no commit in between (a model that cannot load, OOM, a node
        that keeps failing), fail every queued shard instead of starting actors forever."""
        if self.deaths < self.give_up_after:
            return False
        for s in self.queue:
            self._fail(s, f"{why} (gave up: {self.deaths} worker deaths in a row)")
        log.error("workers keep dying (%s); giving up on %d queued shards", why, len(self.queue))
        self.queue.clear()
        return True

    def _worker_lost(self, place: Place, why: str) -> None:
        """The actor died before it could take a shard (placement or model load failed)."""
        self.deaths += 1
        if self._gave_up(why):
            self._set(place, "stopped")
            return
        log.warning("worker %d: %s; starting another", place.index, why)
        self._replace(place)

    # -- shards ----------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for depth in range(self.w.shards_per_actor):  # first every actor's current shard, then their next ones
            for place in self.places:
                if not self.queue:
                    return
                if place.state in ("idle", "busy") and len(place.running) == depth:
                    shard = self.queue.popleft()
                    ref = place.actor.run_shard.remote(shard, self.attempts.get(shard.index, 0))
                    self.refs[ref] = (place, "shard")
                    place.running[ref] = (shard, time.monotonic())
                    if place.state == "idle":
                        self._set(place, "busy")

    def _fail(self, shard: Shard, why: str, kind: str = "failed") -> None:
        self.out.failed[shard.index] = MissingShard(shard.index, kind, why)

    def _attempt_failed(self, place: Place, shard: Shard, why: str, detail: str, replace: bool,
                        data_error: bool = False) -> None:
        """One attempt of `shard` on `place` failed; with `replace` its actor is gone (died, or killed after a
        timeout), and so is every other shard it was running: each of those attempts failed too."""
        lost = []
        if not replace:  # the rows this attempt decoded will not commit: the bar forgets them
            place.committed = place.decoded
        if replace:
            running, place.running = list(place.running.values()), {}
            for other, since in running:  # a shard the worker committed before it died counts as committed
                rec = self.recover(other)
                if rec is None:
                    lost.append(other)
                else:
                    self._committed(place, since, rec, self.bar)
            self.deaths += 1
        gave_up = replace and self.deaths >= self.give_up_after
        rec = self.recover(shard) if replace else None
        if rec is not None:
            self._committed(place, None, rec, self.bar)
        else:
            self._attempt_failed_one(place, shard, why, detail, data_error, gave_up)
        for other in lost:
            self._attempt_failed_one(place, other, f"{why} (while its worker ran shard {shard.name})",
                                     f"lost with its worker, which was running shard {shard.name}", False, gave_up)
        if gave_up:
            self._gave_up(why)
            self._set(place, "stopped")
        elif replace:
            self._replace(place)
        elif not place.running:
            self._set(place, "idle")

    def _attempt_failed_one(self, place: Place, shard: Shard, why: str, detail: str, data_error: bool,
                            gave_up: bool) -> None:
        attempt = self.attempts.get(shard.index, 0)
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.write_log(shard, attempt, f"shard {shard.name} attempt {attempt} on {place.where or '?'} failed at "
                                       f"{when}: {why}\n\n{detail.rstrip()}\n")
        if self.metrics:
            self.metrics.attempt_failed()
        if data_error:  # the input is wrong: another attempt reads the same
            log.error("shard %s: %s", shard.name, why)
            self._fail(shard, why, kind="data")
            return
        n = self.attempts[shard.index] = attempt + 1
        if gave_up:
            self._fail(shard, f"{why} (gave up: {self.deaths} worker deaths in a row)")
        elif n <= self.w.max_retries:
            log.warning("shard %s failed (attempt %d of %d): %s; retrying", shard.name, n, self.w.max_retries + 1,
                        why)
            self.queue.append(shard)
        else:
            log.error("shard %s failed after %d attempts: %s", shard.name, n, why)
            self._fail(shard, why)

    def _committed(self, place: Place, since: float | None, rec: ShardRecord, bar) -> None:
        now = time.monotonic()
        if since is not None:  # None: found committed after its worker died (its duration is unknown)
            self.durations.append(now - since)
        self.deaths, self.last_commit = 0, now
        self.out.tokens += rec.stats.generated_tokens
        self.rows_done += rec.stats.rows
        self.out.reported.add(rec.shard)
        if not place.running:
            self._set(place, "idle")
        if self.metrics:
            self.metrics.shard_committed(rec.stats)
        place.committed += sum(n for why, n in rec.stats.finish_reasons.items() if why != "error")
        self._show(bar, now)
        log.debug("shard %s committed: %d rows, %.1f tokens/s on %s", shard_name(rec.shard), rec.stats.rows,
                  rec.stats.tokens_per_second, rec.worker)

    def _handle(self, ref, bar) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        place, kind = self.refs.pop(ref)
        shard, since = place.running.pop(ref) if kind == "shard" else (None, 0.0)
        try:
            value = ray.get(ref)
        except RayError as e:
            if kind == "progress":  # the actor is gone: its shard's own result says so
                place.polling = False
                return
            if kind == "shard":
                detail = _ANSI.sub("", getattr(e, "traceback_str", None) or str(e))  # the worker's own traceback
                data_error = isinstance(getattr(e, "cause", None), ShardDataError)
                self._attempt_failed(place, shard, str(e.cause) if data_error else _reason(e), detail,
                                     replace=not isinstance(e, RayTaskError), data_error=data_error)
            elif kind == "loaded" and isinstance(e, RayTaskError):
                self._worker_lost(place, f"worker could not load the model: {_reason(e)}")
            else:
                self._worker_lost(place, _reason(e))
            return
        if kind == "progress":
            place.polling = False
            place.decoded = max(place.decoded, value)
            self._show(bar, time.monotonic())
        elif kind == "placed":
            place.where = value
            self._set(place, "loading")
            log.debug("worker %d placed on %s; loading the model", place.index, value)
        elif kind == "loaded":
            self._set(place, "idle")
            if self.out.ready_at is None:
                self.out.ready_at = time.monotonic()
            log.info("worker %d ready on %s", place.index, value)
        else:
            self._committed(place, since, value, bar)

    # -- watching --------------------------------------------------------------------------------------------

    def _poll(self, now: float) -> None:
        """With the bar showing, ask busy actors how many rows they have decoded, so the bar moves between commits."""
        if self.bar is None or self.bar.disable or now - self.last_poll < POLL_S:
            return
        self.last_poll = now
        for place in self.places:
            if place.state == "busy" and not place.polling:
                self.refs[place.actor.rows_decoded.remote()] = (place, "progress")
                place.polling = True
        self.bar.refresh()  # the elapsed time and rate move on even while nothing finishes

    def _show(self, bar, now: float) -> None:
        """The bar: output rows of committed shards plus those decoded in the shards running now."""
        ns = self.settings.decode.num_samples
        live = sum(min(max(0, s.decoded - s.committed), ns * sum(sh.rows for sh in s.shards())) for s in self.places)
        bar.update(self.rows_done * ns + live - bar.n)
        bar.set_postfix(shards=f"{len(self.out.reported)}/{self.total}",
                        tok_s=f"{self.out.tokens / (now - self.t0):.1f}", refresh=False)

    def shard_timeout(self) -> float | None:
        """workers.shard_timeout_s, else derived from the committed shards (None until one has committed)."""
        if self.w.shard_timeout_s:
            return self.w.shard_timeout_s
        if not self.durations:
            return None
        return max(self.w.min_shard_timeout_s, TIMEOUT_FACTOR * max(self.durations))

    def _check_timeouts(self, now: float) -> None:
        limit = self.shard_timeout()
        if limit is None:
            return
        for place in self.places:
            late = [(ref, shard, since) for ref, (shard, since) in place.running.items() if now - since > limit]
            if late:
                ref, shard, since = late[0]
                how = "workers.shard_timeout_s" if self.w.shard_timeout_s else (
                    f"{TIMEOUT_FACTOR}x the slowest committed shard, at least workers.min_shard_timeout_s")
                self.refs = {r: v for r, v in self.refs.items() if v[0] is not place}
                del place.running[ref]
                self._attempt_failed(place, shard, f"timed out after {limit:.0f}s ({how})",
                                     f"no result after {now - since:.0f}s; the actor was killed", replace=True)

    def _check_placement(self, now: float) -> None:
        """Give up on the queue when no actor has been placed for workers.placement_timeout_s."""
        if any(s.state != "placing" for s in self.places):
            self.unplaced_since = None
            return
        if self.unplaced_since is None:
            self.unplaced_since = now
        elif now - self.unplaced_since > self.w.placement_timeout_s and self.queue:
            why = (f"no worker could be placed in {self.w.placement_timeout_s:g}s: each needs "
                   f"{describe_need(self.w)}, the cluster has {describe_cluster()}; add nodes, lower "
                   "workers.num_gpus / num_cpus, or raise workers.placement_timeout_s")
            log.error("%s", why)
            for s in self.queue:
                self._fail(s, why)
            self.queue.clear()

    def _heartbeat(self, now: float) -> None:
        if now - self.last_beat < self.w.heartbeat_s:
            return
        self.last_beat = now
        placing = [s for s in self.places if s.state == "placing"]
        if placing:
            left = ""
            if self.unplaced_since is not None:
                left = f"; giving up in {max(0, self.w.placement_timeout_s - (now - self.unplaced_since)):.0f}s"
            log.info("waiting for %d actors (need %s each; cluster: %s)%s", len(placing), describe_need(self.w),
                     describe_cluster(), left)
        self._progress_line(now)
        if now - self.last_commit >= self.w.heartbeat_s:
            busy = [f"{shard.name} {now - since:.0f}s on {s.where}" for s in self.places
                    for shard, since in s.running.values()]
            loading = sum(s.state == "loading" for s in self.places)
            limit = self.shard_timeout()
            log.info("no shard committed for %.0fs: %d/%d committed in this run, %d queued; running: %s%s; shard "
                     "timeout %s", now - self.last_commit, len(self.durations), self.total, len(self.queue),
                     ", ".join(busy) or "none", f"; {loading} actors loading the model" if loading else "",
                     f"{limit:.0f}s" if limit else "none until a shard commits")

    def _progress_line(self, now: float) -> None:
        """Every heartbeat, committed or not: prompts and output rows done, job tokens/s since start-up, ETA."""
        ns = self.settings.decode.num_samples
        ready = self.out.ready_at
        rate = self.out.tokens / (now - ready) if ready is not None and now > ready else 0.0
        eta = "unknown"
        if ready is not None and self.rows_done and now > ready:
            eta = f"{(self.rows - self.rows_done) * (now - ready) / self.rows_done:.0f}s"
        log.info("progress: %d/%d prompts (%d/%d output rows), %d/%d shards in this run, job %.1f tokens/s, ETA %s",
                 self.rows_done, self.rows, self.rows_done * ns, self.rows * ns, len(self.durations), self.total,
                 rate, eta)

    def _stop(self, why: str, kind: str = "failed") -> None:
        """Every queued or running shard is missing, for `why`."""
        for s in [*self.queue, *(shard for place in self.places for shard in place.shards())]:
            self._fail(s, why, kind)
        self.queue.clear()

    def run(self) -> Outcome:
        import ray
        from tqdm.contrib.logging import logging_redirect_tqdm

        from fastdllm.progress import bar as progress_bar

        # output rows: they finish one by one (a prompt's samples need not finish together)
        total = self.rows * self.settings.decode.num_samples
        bar = self.bar = progress_bar(total=total, unit="row", desc=self.name, enabled=self.progress)
        bar.set_postfix(shards=f"0/{self.total}", refresh=False)
        with logging_redirect_tqdm() if not bar.disable else nullcontext():  # log lines above the bar
            try:
                while self.queue or any(s.state == "busy" for s in self.places):
                    self.check_signals()
                    if self.lost():
                        self._stop(f"not finished: {self.lost()}")
                        break
                    self._dispatch()
                    ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=1.0) if self.refs else ([], [])
                    self.check_signals()
                    if ready:
                        self._handle(ready[0], bar)
                    now = time.monotonic()
                    self._check_timeouts(now)
                    self._check_placement(now)
                    self._heartbeat(now)
                    self._poll(now)
            except JobInterrupted as e:
                self.out.interrupted = e
                running = [shard.name for s in self.places for shard in s.shards()]
                log.warning("%s: stopping; %d shards committed in this run, %s abandoned; rerun to resume",
                            e, len(self.durations), ", ".join(running) or "none")
                self._stop(f"stopped by {e} before it committed", kind="not_run")
            finally:
                bar.close()
                for s in self.places:
                    ray.kill(s.actor, no_restart=True)
        return self.out


def _reason(e: Exception) -> str:
    """One line saying why a shard attempt (or an actor) failed."""
    from ray.exceptions import RayActorError, RayTaskError

    text = _ANSI.sub("", str(e))
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
