"""The output of a job, owned by one object: `JobOutput` knows its layout, writes atomically, commits shards
(data file first, commit marker last), reads markers tolerantly, verifies committed shards against their data
files, and holds the lease that makes one run the only writer. The worker, the driver, `status` and the
benchmarks all go through it.

    job.json                  resolved manifest, shard plan, input fingerprint, versions
    lease.json                the running driver's lease (holder, run id, expiry); absent when no run holds it
    shards/NNNNN.<ext>        one data file per shard (ext: parquet or jsonl, output.format)
    stats/NNNNN.json          the commit marker: the shard's counters and its data file's size, rows and crc32
    summary.json              job totals after a run; the shards still missing, each with why
    logs/NNNNN-attemptK.txt   what went wrong in each failed attempt
    README.md                 the dataset card: its `configs:` names shards/*.<ext>, so `datasets.load_dataset(root)`
                              loads the shards (and nothing else), with the job's figures for a human reader
    report.html, report.png   the job report (jobs/report.py): throughput over time, NFE, occupancy, finish reasons
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from fsspec.implementations.local import LocalFileSystem

from .stats import ShardStats
from .storage import filesystem, scrub, scrub_all

log = logging.getLogger("fastdllm.output")

JOB, SUMMARY, LEASE = "job.json", "summary.json", "lease.json"
TMP = "_tmp"  # local writes go here first, then are renamed into place (same file system, atomic)
CARD, REPORT_HTML, REPORT_PNG = "README.md", "report.html", "report.png"
READ_BATCH = 32  # files fetched per fs.cat call while scanning (concurrent on object stores, bounded memory)


def shard_name(shard: int) -> str:
    """A shard's name in the layout (NNNNN: shards/NNNNN.<ext>, stats/NNNNN.json, logs/NNNNN-attemptK.txt) and in
    messages: its index, zero-padded so the files list in shard order."""
    return f"{shard:05d}"


_JOB_FILE = re.compile(r"stats/\d{5,}\.json|shards/\d{5,}\.(parquet|jsonl)|logs/\d{5,}-attempt\d+\.txt(\.tmp-[0-9a-f]{12})?|"
                       r"summary\.json|_tmp/[0-9a-f]{12}-.+|(stats|shards|logs)/\d{5,}\.[a-z]+\.tmp-[0-9a-f]{12}|"
                       r"[a-z]+\.json\.tmp-[0-9a-f]{12}")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _utc(stamp: str) -> datetime:
    """An ISO 8601 time; one without a timezone (written by hand or another tool) is taken as UTC."""
    t = datetime.fromisoformat(stamp)
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def crc32(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


@dataclass(frozen=True)
class DataFile:
    """A shard's data file as its writer saw it; resume and status compare the file against this."""

    path: str  # relative to the output root, e.g. shards/00007.parquet
    size: int
    rows: int
    crc32: str

    @classmethod
    def of(cls, path: str, data: bytes, rows: int) -> "DataFile":
        return cls(path=path, size=len(data), rows=rows, crc32=crc32(data))


@dataclass
class ShardRecord:
    """stats/NNNNN.json, the commit marker of shard `shard`: its summable counters (flattened into the JSON),
    who decoded it with what, and its data file."""

    shard: int
    stats: ShardStats
    file: DataFile
    worker: str = ""
    device: str = ""
    dtype: str = ""  # the model's dtype as loaded ("float32", "bfloat16"): what dtype "auto" chose
    model: str = ""
    config: dict = field(default_factory=dict)
    attempt: int = 0
    started_at: str = ""
    finished_at: str = ""

    def to_dict(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("shard", "stats", "file")}
        return {"shard": self.shard, **self.stats.to_dict(), **meta, "file": dataclasses.asdict(self.file)}

    @classmethod
    def from_dict(cls, d) -> "ShardRecord":
        """Raises ValueError (saying what is wrong) for anything that is not a complete marker."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        if not isinstance(d.get("file"), dict):
            raise ValueError("it records no data file (written by an older version?)")
        try:
            f = d["file"]
            file = DataFile(path=str(f["path"]), size=int(f["size"]), rows=int(f["rows"]), crc32=str(f["crc32"]))
            meta = {k: d[k] for k in ("worker", "device", "dtype", "model", "config", "attempt", "started_at",
                                      "finished_at") if k in d}
            rec = cls(shard=int(d["shard"]), stats=ShardStats.from_dict(d), file=file, **meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"incomplete marker ({type(e).__name__}: {e})") from None
        st = rec.stats.to_dict()
        bad = [k for k, v in st.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0]
        if bad or file.size < 0 or file.rows < 0:
            raise ValueError(f"impossible counters: {', '.join(bad) or 'file size or rows'} negative")
        if rec.stats.error_rows > rec.stats.rows:
            raise ValueError(f"impossible counters: {rec.stats.error_rows} error rows of {rec.stats.rows}")
        return rec


@dataclass(frozen=True)
class MissingShard:
    """A planned shard without a verified commit. kind: data (its input must be fixed), failed (attempts ran
    out), damaged (its files do not match its marker), not_committed (no marker where the driver looks), not_run."""

    shard: int
    kind: str
    why: str

    def line(self) -> str:
        verb = {"data": "has bad input", "failed": "failed", "damaged": "is damaged",
                "not_committed": "is not committed", "not_run": "was not run"}.get(self.kind, self.kind)
        return f"shard {shard_name(self.shard)} {verb}: {self.why}"


@dataclass
class RunStats:
    """The last run that had shards to run (a rerun with nothing to do keeps the one before): the shards it ran
    and its job tokens/s: generated tokens over its wall time less the start-up (Ray, actors, model loads)."""

    shards_run: int = 0
    generated_tokens: int = 0
    wall_seconds: float = 0.0  # the whole run, start-up included
    interrupted: str | None = None  # SIGTERM / SIGINT when a signal stopped the run
    startup_seconds: float = 0.0  # run start -> the first worker ready

    @property
    def job_tokens_per_second(self) -> float:
        busy = self.wall_seconds - self.startup_seconds
        return self.generated_tokens / busy if busy > 0 and self.generated_tokens else 0.0

    tokens_per_second = job_tokens_per_second  # the older name, kept for readers of summary.json

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "job_tokens_per_second": self.job_tokens_per_second,
                "tokens_per_second": self.job_tokens_per_second}


@dataclass
class JobSummary:
    """summary.json: totals over the verified commits, and every planned shard still missing with why."""

    shards: int
    committed: int
    missing: list[MissingShard]
    totals: ShardStats
    run: RunStats
    too_many_errors: str | None = None  # the error policy's verdict (workers.max_error_rate), one line
    finished_at: str = field(default_factory=now)

    @property
    def complete(self) -> bool:
        return self.committed == self.shards and not self.missing

    def to_dict(self) -> dict:
        return {"shards": self.shards, "committed": self.committed, "complete": self.complete,
                "missing": [dataclasses.asdict(m) for m in self.missing], "totals": self.totals.to_dict(),
                "run": self.run.to_dict(), "too_many_errors": self.too_many_errors, "finished_at": self.finished_at}

    @classmethod
    def from_dict(cls, d: dict) -> "JobSummary":
        run = {k: d["run"][k] for k in ("shards_run", "generated_tokens", "wall_seconds")}
        run["interrupted"] = d["run"].get("interrupted")
        run["startup_seconds"] = float(d["run"].get("startup_seconds", 0.0))
        return cls(shards=int(d["shards"]), committed=int(d["committed"]),
                   missing=[MissingShard(**m) for m in d["missing"]], totals=ShardStats.from_dict(d["totals"]),
                   run=RunStats(**run), too_many_errors=d.get("too_many_errors"), finished_at=d["finished_at"])


def planned_rows(job: dict) -> dict[int, int]:
    """{shard: rows} of the plan recorded in job.json."""
    return {s["index"]: s["stop"] - s["start"] for s in job["plan"]["shards"]}


@dataclass
class Scan:
    """What the markers of an output say, checked against the plan and the data files."""

    committed: dict[int, ShardRecord]  # planned shards whose commit verified
    damaged: dict[int, str]  # planned shards with a marker that does not hold up: why


@dataclass(frozen=True)
class LeaseInfo:
    holder: str  # host:pid of the driver
    run_id: str
    expires_at: str  # ISO 8601, UTC

    def expired(self) -> bool:
        return _utc(self.expires_at) <= datetime.now(timezone.utc)

    def holder_is_dead(self) -> bool:
        """True only when the holder provably is gone: a process on this host that no longer exists."""
        host, _, pid = self.holder.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        return f"{self.holder} (run {self.run_id[:8]}) until {self.expires_at}"


class Superseded(RuntimeError):
    """A worker's run no longer holds the output's lease: it must not write."""


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease."""


class JobOutput:
    """One job's output directory (any fsspec URI). `ext` is the shard data files' extension."""

    def __init__(self, uri: str, storage_options: dict | None = None, ext: str = "parquet"):
        self.uri = uri
        self.fs, root = filesystem(uri, storage_options)
        self.root = root.rstrip("/")
        self.ext = ext

    @property
    def ext(self) -> str:
        return self._ext

    @ext.setter
    def ext(self, fmt: str) -> None:
        """The data files' extension, from output.format (openai answer lines are JSON Lines files)."""
        self._ext = "jsonl" if fmt == "openai" else fmt

    # -- layout ------------------------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def shard_file(self, shard: int) -> str:
        return f"shards/{shard_name(shard)}.{self.ext}"

    def data_glob(self) -> str:
        """The shards' data files as a glob relative to the root (what the dataset card's configs name)."""
        return f"shards/*.{self.ext}"

    @staticmethod
    def marker_file(shard: int) -> str:
        return f"stats/{shard_name(shard)}.json"

    @staticmethod
    def log_file(shard: int, attempt: int) -> str:
        return f"logs/{shard_name(shard)}-attempt{attempt}.txt"

    def _rel(self, path: str) -> str:
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path

    # -- writing -----------------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `rel` so that readers see its old content or all of the new one, never a part: on a local disk
        to a temporary name (fsync'd) renamed over the target; on object stores as one PUT (an object appears
        whole or not at all) whose size is then read back. A failure (a full disk...) leaves the old content."""
        path = self.path(rel)
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.makedirs(self.path(TMP), exist_ok=True)
            # beside the data, never in it: readers of shards/ (pq.read_table, pandas, globs) see no partial file
            tmp = self.path(f"{TMP}/{uuid.uuid4().hex[:12]}-{rel.replace('/', '-')}")
            try:
                with self.fs.open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.fs.mv(tmp, path)
            except BaseException:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
                raise
            return
        self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(path)
        size = self.fs.info(path)["size"]
        if size != len(data):
            raise OSError(f"{self.uri}/{rel}: wrote {len(data)} bytes but the store holds {size}")

    def write_json(self, rel: str, obj) -> None:
        """Write `obj` as JSON, with credentials inside URIs and messages scrubbed (workers/storage.py)."""
        self.write_bytes(rel, (json.dumps(scrub_all(obj), indent=2) + "\n").encode())

    def commit(self, shard: int, data: bytes, rows: int, finish: Callable[[DataFile], ShardRecord],
               run_id: str | None = None) -> ShardRecord:
        """Commit a shard: write its data file, then `finish(data file)` builds the record (so its timings can
        include the write) and the marker is written last. Until the marker lands the shard is not committed;
        a marker always describes the data file beside it. With `run_id`, the output's lease is checked to be
        that run's (and live) before each of the two writes: a superseded run never commits (Superseded)."""
        file = DataFile.of(self.shard_file(shard), data, rows)
        self.check_lease(run_id)
        self.write_bytes(file.path, data)
        record = finish(file)
        self.check_lease(run_id)
        self.write_json(self.marker_file(shard), record.to_dict())
        return record

    def check_lease(self, run_id: str | None) -> None:
        """Raise Superseded unless the output's current lease belongs to run `run_id` and has not expired (no-op
        for None: a worker used outside a job)."""
        if run_id is None:
            return
        cur = self.read_lease()
        if cur is None or cur.run_id != run_id or cur.expired():
            held = "no lease" if cur is None else (f"the lease of {cur.describe()}" + (
                " (expired)" if cur.run_id == run_id else ""))
            raise Superseded(f"not committed: run {run_id[:8]} no longer holds the lease on {self.uri} ({held})")

    def write_job(self, job: dict) -> None:
        self.write_json(JOB, job)

    def write_summary(self, summary: JobSummary) -> None:
        self.write_json(SUMMARY, summary.to_dict())

    def write_log(self, shard: int, attempt: int, text: str) -> None:
        self.write_bytes(self.log_file(shard, attempt), scrub(text).encode())

    def job_files(self) -> tuple[list[str], list[str]]:
        """(files this job wrote, other files) under the output, relative to its root; job files are the commit
        markers stats/NNNNN.json, data files shards/NNNNN.parquet|jsonl, logs/NNNNN-attemptK.txt, summary.json,
        temporary files (under _tmp/, or beside a target as *.tmp-* from older versions). job.json and the lease
        are neither: they stay."""
        ours, other = [], []
        for rel in sorted(self._listing("")):
            if rel in (JOB, LEASE):
                continue
            (ours if _JOB_FILE.fullmatch(rel) else other).append(rel)
        return ours, other

    def clear(self) -> list[str]:
        """Remove the files this job wrote (see job_files) and return them; the user's own files stay."""
        ours, other = self.job_files()
        for rel in ours:
            self.fs.rm(self.path(rel))
        for sub in ("stats", "shards", "logs", TMP):  # directories left empty
            try:
                if self.fs.isdir(self.path(sub)) and not self.fs.ls(self.path(sub)):
                    self.fs.rmdir(self.path(sub))
            except OSError:
                pass
        if other:
            log.info("kept %d files in %s that this job did not write: %s", len(other), self.uri,
                     ", ".join(other[:10]) + (" ..." if len(other) > 10 else ""))
        return ours

    def clear_tmp(self) -> list[str]:
        """Remove left-over temporary files (a worker killed mid-write); call while holding the lease, before
        any worker of the run writes."""
        stale = [rel for rel in self.job_files()[0] if rel.startswith(f"{TMP}/") or ".tmp-" in rel]
        for rel in stale:
            self.fs.rm(self.path(rel))
        if stale:
            log.info("removed %d left-over temporary files in %s", len(stale), self.uri)
        return stale

    # -- reading -----------------------------------------------------------------------------------------------
    def _read_json(self, rel: str):
        """The parsed file, None when it does not exist; ValueError naming the file when it does not parse."""
        try:
            raw = self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{self.uri}/{rel} is not valid JSON ({len(raw)} bytes: {e})") from None

    def read_job(self) -> dict | None:
        """job.json, None when absent; ValueError naming the file when it cannot be parsed or is not a job's
        description (a plan of shards with index, start and stop)."""
        self.fs.invalidate_cache()
        job = self._read_json(JOB)
        if job is None:
            return None
        try:
            plan = job["plan"]
            for sh in plan["shards"]:
                if not all(type(sh[k]) is int for k in ("index", "start", "stop")) or sh["stop"] < sh["start"]:
                    raise ValueError(f"shard {sh!r}")
            if type(plan["rows"]) is not int or not isinstance(job["name"], str) or not isinstance(
                    job.get("manifest", {}), dict) or not isinstance(job.get("identity", {}), dict):
                raise ValueError("rows, name, manifest or identity")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.uri}/{JOB} is not a job description ({type(e).__name__}: {e})") from None
        return job

    def read_summary(self) -> JobSummary | None:
        """The last run's summary; None (with a warning naming the file) when absent or unreadable."""
        try:
            d = self._read_json(SUMMARY)
            return None if d is None else JobSummary.from_dict(d)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s/%s: %s", self.uri, SUMMARY, e)
            return None

    def _cat(self, rels: list[str]) -> dict[str, bytes | Exception]:
        out = {}
        for i in range(0, len(rels), READ_BATCH):
            paths = [self.path(r) for r in rels[i : i + READ_BATCH]]
            got = self.fs.cat(paths, on_error="return") if paths else {}
            for p in paths:
                out[self._rel(p)] = got.get(p, FileNotFoundError(p))
        return out

    def _listing(self, sub: str) -> dict[str, int]:
        """{relative path: size} of the files under `sub`."""
        try:
            found = self.fs.find(self.path(sub), detail=True)
        except FileNotFoundError:
            return {}
        return {self._rel(p): info.get("size") for p, info in found.items()}

    def committed_record(self, shard: int, rows: int) -> ShardRecord | None:
        """Shard `shard`'s commit record when its marker and data file are in place and verified, else None (used
        when a worker died after it committed a shard but before it could report it)."""
        try:
            rec = ShardRecord.from_dict(json.loads(self.fs.cat_file(self.path(self.marker_file(shard))).decode()))
            data = self.fs.cat_file(self.path(rec.file.path))
        except Exception:  # noqa: BLE001 - absent, unreadable or not a record: not committed
            return None
        ok = (rec.shard == shard and rec.file.path == self.shard_file(shard) and rec.stats.rows == rows
              and len(data) == rec.file.size and crc32(data) == rec.file.crc32)
        return rec if ok else None

    def scan(self, planned: Mapping[int, int], verify: bool = True,
             known: Mapping[int, ShardRecord] | None = None) -> Scan:
        """The commit markers, checked: a marker counts only for a shard in the plan ({shard: rows}), when it
        parses, records the planned row count, and its data file exists with the recorded size (one listing);
        with `verify`, also the recorded crc32 (reads every data file, except those of `known`: records an
        earlier scan verified, still the same). Anything else is logged with the file it concerns and leaves the
        shard uncommitted (a run recomputes it); markers outside the plan are ignored."""
        self.fs.invalidate_cache()
        markers = sorted(r for r in self._listing("stats") if r.endswith(".json"))
        records: dict[int, ShardRecord] = {}
        damaged: dict[int, str] = {}
        for rel, raw in self._cat(markers).items():
            stem = rel.rsplit("/", 1)[-1].removesuffix(".json")
            if not stem.isdigit() or int(stem) not in planned:
                log.warning("ignoring %s/%s: not a shard of this job's plan (%d shards)", self.uri, rel, len(planned))
                continue
            shard = int(stem)
            try:
                if isinstance(raw, Exception):
                    raise ValueError(f"unreadable ({type(raw).__name__}: {raw})")
                try:
                    rec = ShardRecord.from_dict(json.loads(raw.decode()))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"not valid JSON ({len(raw)} bytes: {e})") from None
                if rec.shard != shard or rec.file.path != self.shard_file(shard):
                    raise ValueError(f"it describes shard {rec.shard} in {rec.file.path}")
                if rec.stats.rows != planned[shard]:
                    raise ValueError(f"it records {rec.stats.rows} rows but the plan has {planned[shard]}")
                records[shard] = rec
            except ValueError as e:
                damaged[shard] = f"{rel}: {e}"
        sizes = self._listing("shards")
        for shard, rec in list(records.items()):
            size = sizes.get(rec.file.path)
            if size is None:
                damaged[shard] = f"{rec.file.path} is missing"
            elif size != rec.file.size:
                damaged[shard] = f"{rec.file.path} is {size} bytes, its marker records {rec.file.size}"
        if verify:
            ok = [rec.file.path for s, rec in records.items() if s not in damaged and (known or {}).get(s) != rec]
            for rel, data in self._cat(ok).items():
                shard = int(rel.rsplit("/", 1)[-1].split(".")[0])
                if isinstance(data, Exception):
                    damaged[shard] = f"{rel} is unreadable ({type(data).__name__}: {data})"
                elif crc32(data) != records[shard].file.crc32:
                    damaged[shard] = f"{rel} does not match its recorded checksum (damaged)"
        for shard in sorted(damaged):
            records.pop(shard, None)
            log.warning("shard %s in %s is not committed: %s; a run recomputes it", shard_name(shard), self.uri,
                        damaged[shard])
        return Scan(committed=records, damaged=damaged)

    # -- lease -------------------------------------------------------------------------------------------------
    def read_lease(self) -> LeaseInfo | None:
        """The current lease; None when there is none or it cannot be read (a warning names the file)."""
        self.fs.invalidate_cache()
        try:
            d = self._read_json(LEASE)
            if d is None:
                return None
            _utc(d["expires_at"])  # a malformed expiry: unreadable, like malformed JSON
            return LeaseInfo(holder=str(d["holder"]), run_id=str(d["run_id"]), expires_at=d["expires_at"])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable lease %s/%s: %s", self.uri, LEASE, e)
            return None


class Lease:
    """One writer per output: the driver's lease in lease.json, with an expiry it keeps pushing forward.

    acquire(): a live lease of another run raises LeaseHeld naming its holder and expiry. An expired one, or one
    whose holder is a process of this host that no longer exists, is taken over with a warning. The lease is
    written, then read back after `settle_s` and compared: fsspec has no create-if-absent that every S3-compatible
    store honours, so two drivers starting together both write and the last write wins; the loser sees the
    winner's run id when it reads back and backs off. The race window we accept: a competing write that becomes
    visible more than `settle_s` after its driver read "no lease" (a very slow PUT) can let both proceed until the
    loser's next renewal, which notices and stops it.
    """

    def __init__(self, out: JobOutput, ttl_s: float, settle_s: float | None = None):
        self.out, self.ttl_s = out, ttl_s
        self.settle_s = settle_s if settle_s is not None else (0.1 if isinstance(out.fs, LocalFileSystem) else 1.0)
        self.me = LeaseInfo(holder=f"{socket.gethostname()}:{os.getpid()}", run_id=uuid.uuid4().hex, expires_at="")
        self.lost: str | None = None  # why this run no longer holds the lease
        self._good = 0.0  # time.monotonic() just before the last lease write that succeeded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        expires = (datetime.now(timezone.utc) + timedelta(seconds=self.ttl_s)).isoformat(timespec="milliseconds")
        self.out.write_json(LEASE, {"holder": self.me.holder, "run_id": self.me.run_id, "expires_at": expires,
                                    "renewed_at": now()})

    def acquire(self) -> None:
        cur = self.out.read_lease()
        if cur is not None and cur.run_id != self.me.run_id:
            if not (cur.expired() or cur.holder_is_dead()):
                raise LeaseHeld(f"output {self.out.uri} is in use by another run: lease held by {cur.describe()}; "
                                "wait for that run to finish (or for its lease to expire if it died)")
            why = "expired" if cur.expired() else "its process is gone"
            log.warning("taking over the lease on %s from %s (%s)", self.out.uri, cur.describe(), why)
        self._good = time.monotonic()
        self._write()
        time.sleep(self.settle_s)
        cur = self.out.read_lease()
        if cur is None or cur.run_id != self.me.run_id:
            raise LeaseHeld(f"output {self.out.uri} is in use by another run that started at the same time: lease "
                            f"held by {cur.describe() if cur else 'an unreadable lease file'}")
        self._thread = threading.Thread(target=self._keep, name="fastdllm-lease", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        """Renew every ttl/4 until released. Any failure (an OSError, botocore's EndpointConnectionError, a
        timeout...) is a failed renewal, retried with backoff while the last good renewal still covers us; once
        it no longer does (ttl/4 before its expiry, so workers checking the lease stop too) `lost` says why and
        the driver stops writing. A lease found taken over sets `lost` at once."""
        wait, backoff = self.ttl_s / 4, self.ttl_s / 16
        while not self._stop.wait(wait):
            try:
                cur = self.out.read_lease()
                if cur is not None and cur.run_id != self.me.run_id:
                    self.lost = f"the lease on {self.out.uri} was taken over by {cur.describe()}"
                    log.error("%s; stopping", self.lost)
                    return
                t = time.monotonic()
                self._write()
                self._good, wait, backoff = t, self.ttl_s / 4, self.ttl_s / 16
            except Exception as e:  # noqa: BLE001 - every failure is a failed renewal, never a dead thread
                left = self._good + self.ttl_s * 3 / 4 - time.monotonic()
                if left <= 0:
                    self.lost = self._unproven(f"last error {type(e).__name__}: {e}")
                    log.error("%s", self.lost)
                    return
                log.warning("could not renew the lease on %s (%s: %s); retrying in %.1fs", self.out.uri,
                            type(e).__name__, e, min(backoff, left))
                wait, backoff = min(backoff, left), min(backoff * 2, self.ttl_s / 4)

    def _unproven(self, why: str) -> str:
        return (f"could not renew the lease on {self.out.uri} for {time.monotonic() - self._good:.0f}s (lease_s "
                f"{self.ttl_s:g}; {why}); another run may take the output over, so this run stops writing")

    def problem(self) -> str | None:
        """Why this run can no longer prove it holds the lease, or None. Also true while a renewal call hangs
        past the margin (a store that accepts the connection but never answers): the thread cannot say so."""
        if self.lost is None and self._thread is not None and time.monotonic() - self._good > self.ttl_s * 3 / 4:
            self.lost = self._unproven("the renewal has not returned")
        return self.lost

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            cur = self.out.read_lease()
            if cur is not None and cur.run_id == self.me.run_id:
                self.out.fs.rm(self.out.path(LEASE))
        except Exception as e:  # noqa: BLE001 - a store outage (any exception type): the lease expires by itself
            log.warning("could not release the lease on %s: %s: %s", self.out.uri, type(e).__name__, e)
