"""The driver's side of Ray: which cluster to use (a local one we start, or a joined one), whether it can hold the
job's actors, and turning SIGTERM / Ctrl-C into a clean stop. `ray` is imported here and in jobs/dispatch.py only.

A local Ray started by the CLI has all the resources it will ever have, so an actor it cannot hold is a bad
manifest (exit 2). A joined cluster (--address, RAY_ADDRESS, `ray job submit`, a KubeRay RayJob) may grow: an
autoscaler adds nodes once actors ask for them, so there the driver warns and waits (jobs/dispatch.py)."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from .manifest import InvalidJob, WorkersSpec

log = logging.getLogger("fastdllm.jobs")

CONNECT_TIMEOUT_S = 5.0  # a Ray address that does not accept a TCP connection in this time is wrong


def resolve_address(address: str | None) -> str | None:
    """The cluster to join (--address, else RAY_ADDRESS), or None: start a local Ray. Never Ray's own fallback of
    joining whatever cluster `ray start` last left on this machine: a job lands where the user said."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for `auto`/`local` and the like."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str | None) -> None:
    """Refuse (InvalidJob) a cluster address nothing listens on, in seconds instead of Ray's minutes of retries.
    Called before the output is touched."""
    address = resolve_address(address)
    hp = _host_port(address) if address else None
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise InvalidJob(f"cannot reach the Ray cluster at {address} ({type(e).__name__}: {e}); check --address "
                         "or RAY_ADDRESS, or leave both unset to start a local Ray") from None


@dataclass
class RaySession:
    started: bool  # True: a local Ray this process started (and stops); False: a joined cluster


def connect(address: str | None, *, dashboard: bool = True, log_to_driver: bool = True) -> RaySession:
    """Join the cluster `address` names, or start a local Ray (with its dashboard unless `dashboard` is False).
    A Ray already initialised in this process (tests, notebooks) is used as it is."""
    import ray

    if ray.is_initialized():
        return RaySession(started=False)
    address = resolve_address(address)
    check_reachable(address)
    local = address is None
    try:
        ctx = ray.init(address="local" if local else address, include_dashboard=dashboard if local else None,
                       logging_level=logging.WARNING, log_to_driver=log_to_driver, configure_logging=False)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError, Ray client errors: all mean a bad address
        raise InvalidJob(f"cannot join the Ray cluster at {address or 'local'}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    url = getattr(ctx, "dashboard_url", None) or None
    if url:
        log.info("Ray dashboard: http://%s", url.removeprefix("http://"))
    return RaySession(started=local)


def _need(w: WorkersSpec) -> dict[str, float]:
    """The Ray resources one actor asks for (only those it asks for)."""
    return {name: want for name, want in (("GPU", w.num_gpus), ("CPU", w.num_cpus)) if want > 0}


def describe_need(w: WorkersSpec) -> str:
    """'1 GPU, 1 CPU' for log lines."""
    return ", ".join(f"{v:g} {k}" for k, v in _need(w).items()) or "no CPU or GPU"


def describe_cluster() -> str:
    """'0/0 GPU, 1/2 CPU free' for log lines: what the cluster has right now."""
    import ray

    have, free = ray.cluster_resources(), ray.available_resources()
    return ", ".join(f"{free.get(k, 0):g}/{have.get(k, 0):g} {k}" for k in ("GPU", "CPU")) + " free"


def actors_that_fit(w: WorkersSpec, strict: bool) -> int:
    """How many actors to start. On a local Ray (`strict`) an actor asking for more than the whole cluster has is
    refused (InvalidJob), and `count` is capped to what fits at once (more would never be placed). On a joined
    cluster a shortfall is only a warning: actors wait for nodes, and jobs/dispatch.py gives up after
    workers.placement_timeout_s."""
    import ray

    have = ray.cluster_resources()
    fits = w.count
    for name, want in _need(w).items():
        n = int(math.floor(have.get(name, 0) / want + 1e-9))
        if n == 0:
            msg = (f"workers.num_{name.lower()}s is {want:g} but the Ray cluster has {have.get(name, 0):g} {name}s")
            if strict:
                raise InvalidJob(f"{msg}; lower it (e.g. --set workers.num_{name.lower()}s=0) or join a cluster "
                                 "with --address")
            log.warning("%s; actors will wait for nodes that have them (up to workers.placement_timeout_s)", msg)
        fits = min(fits, n)
    if 0 < fits < w.count:
        if strict:
            log.warning("workers.count is %d but this Ray holds only %d actors of %s; running %d", w.count, fits,
                        describe_need(w), fits)
            return fits
        log.warning("workers.count is %d but the cluster holds %d actors of %s now; the others wait for nodes",
                    w.count, fits, describe_need(w))
    return w.count


class JobInterrupted(BaseException):
    """SIGTERM or SIGINT arrived during the job: stop dispatching, kill the actors, write the summary.
    A BaseException (like KeyboardInterrupt) so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


class Signals:
    """SIGTERM and SIGINT recorded by a handler that never raises: `check()` raises JobInterrupted at the driver's
    safe points (each turn of the dispatch loop, between the steps of a run). A handler that raised inside a Ray
    call (ray.wait in C++) would surface as SystemError with a traceback; Ray's own SIGTERM handler, which
    ray.init installs, would exit with 15. A second signal while stopping is ignored."""

    def __init__(self):
        self.signum: int | None = None
        self.active = False

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> None:
        """(Re)install the handler, e.g. after ray.init replaced it; no-op off the main thread."""
        if self.active:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, self._handler)

    def check(self) -> None:
        if self.signum is not None:
            raise JobInterrupted(self.signum)

    def interrupted(self) -> JobInterrupted | None:
        return JobInterrupted(self.signum) if self.signum is not None else None


@contextmanager
def stop_on_signals():
    """Within the block, SIGTERM and SIGINT are recorded on the yielded Signals (main thread only; elsewhere the
    Signals never fires); the handlers in place before are restored after it."""
    sig = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield sig
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    sig.active = True
    sig.install()
    try:
        yield sig
    finally:
        for s, h in before.items():
            signal.signal(s, h)
