"""Integrity under faults (issue 20): a half-rewritten input is a changed input, never a transient error; the
lease through a store outage (moto's S3 server behind a TCP proxy that is stopped and started); input/output
overlap; signals at every moment of a run; temporary files; --force beside the user's files; credentials in URIs;
bad manifests, job.json files and markers in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fastdllm.jobs import InvalidJob, parse_manifest, run_job
from fastdllm.jobs.cli import main
from fastdllm.workers import JobOutput, Lease, LeaseHeld, Shard, ShardDataError, ShardRecord, ShardStats
from fastdllm.workers.output import Superseded
from .conftest import own_local_ray
from .test_cluster import start_driver  # the job driver as a process of its own
from fastdllm.workers import inputs


def _parquet(path, n: int, start: int = 0) -> None:
    pq.write_table(pa.table({"prompt": [f"{i}+1=" for i in range(start, start + n)],
                             "id": pa.array(range(start, start + n), pa.int64())}), path)


def _pinned_shard(path) -> Shard:
    pf = pq.ParquetFile(path)
    info = inputs.inspect_parquet(str(path), path.name, "id", None)
    return Shard(index=0, file=str(path), relpath=path.name, start=0, stop=pf.metadata.num_rows,
                 file_size=info.size, file_rows=info.rows, footer_sha256=info.digest)


def test_a_file_rewritten_while_it_is_read_is_a_changed_input_not_a_storage_error(tmp_path, monkeypatch):
    """The pin check passes, then a writer rewrites the file under the reader (what the flaky
    test_input_changed_mid_run_fails_its_shards_as_data_errors hit): arrow fails with an error that looks like a
    storage error; re-checking the pin classifies it as a changed input (a data error, never retried)."""
    path = tmp_path / "part-0.parquet"
    _parquet(path, 24)
    shard = _pinned_shard(path)
    real_check = inputs._check_pinned

    def writer_gets_in_after_the_check(s, f):
        real_check(s, f)
        _parquet(tmp_path / "new.parquet", 5, start=100)
        with open(path, "wb") as w:  # truncated and rewritten in place, under the open reader
            w.write((tmp_path / "new.parquet").read_bytes())

    monkeypatch.setattr(inputs, "_check_pinned", writer_gets_in_after_the_check)
    with pytest.raises(ShardDataError, match=r"changed since the job was planned \(\d+ -> \d+ bytes"):
        inputs.read_shard_rows(shard, ["prompt", "id"])  # the read itself "succeeds", with the new file's rows
    monkeypatch.setattr(inputs, "_check_pinned", real_check)
    _parquet(path, 24)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, *a, **k: _parquet(path, 3) or
                        (_ for _ in ()).throw(OSError("Column cannot have more than one dictionary.")))
    with pytest.raises(ShardDataError, match="changed since the job was planned"):  # the error of the flaky test
        inputs.read_shard_rows(shard, ["prompt", "id"])


def test_a_read_error_on_the_planned_file_stays_a_storage_error(tmp_path, monkeypatch):
    path = tmp_path / "part-0.parquet"
    _parquet(path, 24)
    shard = _pinned_shard(path)

    def flaky_store(*a, **k):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(inputs, "_read_shard_rows", flaky_store)
    with pytest.raises(OSError, match="connection reset"):  # the file still matches its pin: the driver retries
        inputs.read_shard_rows(shard, ["prompt", "id"])
    monkeypatch.undo()
    path.unlink()
    with pytest.raises(ShardDataError, match="it no longer exists"):
        inputs.read_shard_rows(shard, ["prompt", "id"])


# -- the lease through a store outage ---------------------------------------------------------------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "fdl-test-key", "AWS_SECRET_ACCESS_KEY": "fdl-test-secret-value",
          "AWS_DEFAULT_REGION": "us-east-1"}


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of `target` that can be stopped (listener closed, every connection cut:
    the store is unreachable) and started again on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port, self.conns, self.lock = target, 0, [], threading.Lock()
        self.listener = None
        self.start()

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port, self.listener = s.getsockname()[1], s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone leaves it listening)
        self.listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture(scope="module")
def s3_proxy():
    """moto's S3 server (a real S3-compatible server on 127.0.0.1), reached through a Proxy; yields (endpoint
    through the proxy, the proxy, an s3fs filesystem that talks to moto directly)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = s3fs.S3FileSystem(key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=f"http://{host}:{port}")
    direct.mkdir("fdl-outage")
    proxy = Proxy((host, port))
    yield f"http://127.0.0.1:{proxy.port}", proxy, direct
    proxy.stop()
    server.stop()


def _opts(endpoint: str) -> dict:
    """Storage options for the proxied store; one attempt per call, so a call in the outage fails at once."""
    return {"endpoint_url": endpoint, "key": "${AWS_ACCESS_KEY_ID}", "secret": "${AWS_SECRET_ACCESS_KEY}",
            "config_kwargs": {"retries": {"max_attempts": 1}}}


def _renewed_at(direct, path: str) -> str:
    direct.invalidate_cache()
    return json.loads(direct.cat(path))["renewed_at"]


def test_the_lease_survives_a_short_outage_and_is_given_up_after_a_long_one(s3_proxy):
    """A store outage raises botocore's EndpointConnectionError (not an OSError) in the renewal thread: it must be
    a failed renewal that is retried, never a dead thread; once the last renewal no longer covers the run, the
    lease says it is lost."""
    endpoint, proxy, direct = s3_proxy
    out = JobOutput("s3://fdl-outage/short", _opts(endpoint))
    lease = Lease(out, ttl_s=8)
    lease.acquire()
    try:
        time.sleep(2.5)  # one renewal
        proxy.stop()
        time.sleep(3)  # renewals fail meanwhile (EndpointConnectionError)
        before = _renewed_at(direct, "fdl-outage/short/lease.json")
        proxy.start()
        deadline = time.monotonic() + 6
        while _renewed_at(direct, "fdl-outage/short/lease.json") == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _renewed_at(direct, "fdl-outage/short/lease.json") != before, "not renewed after the outage"
        assert lease._thread.is_alive() and lease.problem() is None
    finally:
        lease.release()

    out = JobOutput("s3://fdl-outage/long", _opts(endpoint))
    lease = Lease(out, ttl_s=2)
    lease.acquire()
    try:
        proxy.stop()
        deadline = time.monotonic() + 10
        while lease.problem() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.problem() and "could not renew the lease on s3://fdl-outage/long" in lease.problem()
        assert "stops writing" in lease.problem()
    finally:
        proxy.start()
        lease.release()


def test_a_superseded_run_never_commits(tmp_path):
    """A worker checks the output's lease before it writes: another run's lease, or none, and nothing is written."""
    out = JobOutput(str(tmp_path / "out"))
    mine, other = Lease(out, ttl_s=30), Lease(out, ttl_s=30)
    mine.acquire()
    mine._stop.set()  # this run's renewals stop (as in a frozen driver) ...
    mine._thread.join()
    (tmp_path / "out" / "lease.json").unlink()  # ... its lease expires, and another run takes the output
    other.acquire()
    try:
        def finish(file):
            raise AssertionError("the data file was written")

        with pytest.raises(Superseded, match=f"run {mine.me.run_id[:8]} no longer holds the lease"):
            out.commit(0, b"rows", 1, finish, run_id=mine.me.run_id)
        assert not (tmp_path / "out" / "shards").exists() and not (tmp_path / "out" / "stats").exists()
    finally:
        other.release()
    with pytest.raises(Superseded, match=r"\(no lease\)"):
        out.commit(0, b"rows", 1, finish, run_id=other.me.run_id)


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.update(S3_ENV)
    with own_local_ray() as address:
        yield address


def _job(tmp_path, rows=12, **over) -> dict:
    (tmp_path / "in").mkdir(exist_ok=True)
    _parquet(tmp_path / "in" / "part-0.parquet", rows)
    m = {"name": "t", "model": {"source": "tiny"},
         "input": {"uri": str(tmp_path / "in" / "*.parquet"), "id_column": "id", "rows_per_shard": 3},
         "output": {"uri": str(tmp_path / "out")}, "decode": {"gen_length": 8, "block_length": 4, "steps": 8},
         "workers": {"count": 1, "batch_size": 4, "max_retries": 1}}
    for k, v in over.items():
        m[k] = {**m[k], **v} if isinstance(m.get(k), dict) else v
    return m


@pytest.mark.slow
def test_a_driver_that_cannot_renew_its_lease_stops_writing(tmp_path, ray_cluster, s3_proxy):
    """The store goes away while shards run: the driver stops (actors killed, no summary) with the reason, once
    its last renewal no longer covers it; nothing is committed after that, even when the store comes back."""
    endpoint, proxy, direct = s3_proxy
    m = parse_manifest(_job(tmp_path, output={"uri": "s3://fdl-outage/job", "lease_s": 4},
                            storage_options=_opts(endpoint), faults={"hang": {1: 9, 2: 9, 3: 9}}))
    got = {}
    t = threading.Thread(target=lambda: got.update(result=run_job(m, address=ray_cluster)), daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not direct.exists("fdl-outage/job/stats/00000.json") and time.monotonic() < deadline:
        time.sleep(0.2)
        direct.invalidate_cache()
    proxy.stop()
    try:
        t.join(30)
        assert not t.is_alive(), "the driver went on without its lease"
        direct.invalidate_cache()
        markers = direct.find("fdl-outage/job/stats")
    finally:
        proxy.start()
    r = got["result"]
    assert not r.ok and "could not renew the lease on s3://fdl-outage/job" in r.problem
    time.sleep(2)
    direct.invalidate_cache()
    assert direct.find("fdl-outage/job/stats") == markers == ["fdl-outage/job/stats/00000.json"]
    assert not direct.exists("fdl-outage/job/summary.json")


# -- input and output must not overlap ---------------------------------------------------------------------------

def _snapshot(root) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("input_uri, output_uri, how", [
    ("X/shards/*.parquet", "X", "the input is inside the output"),
    ("X/shards", "X", "the input is inside the output"),
    ("X/shards/00000.parquet", "X", "the input is inside the output"),
    ("X", "X/out", "the output is inside the input"),
    ("X/shards/", "X/shards", "the output is inside the input"),
])
def test_an_output_that_overlaps_the_input_is_refused_before_anything_is_written(tmp_path, input_uri, output_uri,
                                                                                  how):
    (tmp_path / "X" / "shards").mkdir(parents=True)
    _parquet(tmp_path / "X" / "shards" / "00000.parquet", 6)
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(_job(tmp_path, input={"uri": str(tmp_path / input_uri)},
                                     output={"uri": str(tmp_path / output_uri)})))
    before = _snapshot(tmp_path)
    for cmd in ("run", "plan"):
        r = CliRunner().invoke(main, [cmd, str(m)])
        assert r.exit_code == 2, r.output
        line = r.output.strip()
        assert "\n" not in line and "overlap" in line and how in line, line
        assert str(tmp_path / output_uri) in line and str(tmp_path / input_uri) in line
        assert _snapshot(tmp_path) == before


def test_overlap_of_object_store_prefixes_is_refused(tmp_path):
    m = parse_manifest(_job(tmp_path, input={"uri": str(tmp_path / "in" / "*.parquet")},
                            output={"uri": "s3://b/runs/a"}))
    from fastdllm.jobs.guards import check_no_overlap
    from fastdllm.jobs.plan import make_plan

    plan = make_plan(m)
    check_no_overlap(m, plan)  # local input, S3 output: no overlap
    m2 = m.model_copy(update={"input": m.input.model_copy(update={"uri": "s3://b/runs/*.parquet"})})
    with pytest.raises(InvalidJob, match=r"s3://b/runs/\*.parquet and output.uri s3://b/runs/a overlap \(the "
                                         r"output is inside the input\)"):
        check_no_overlap(m2, plan)
    m3 = m.model_copy(update={"input": m.input.model_copy(update={"uri": "s3://b/runs/ab/x.parquet"})})
    check_no_overlap(m3, plan)  # a sibling prefix that shares the name's start is not inside


# -- signals at every moment of a run ---------------------------------------------------------------------------

def _wait_for(proc: subprocess.Popen, path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and path.exists(), proc.communicate()


def _assert_clean_stop(proc: subprocess.Popen, sig, out: Path) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err and "SystemError" not in err, err
    assert err.count("rerun the same command to resume") == 1 and f"stopped by {sig.name}" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["interrupted"] == sig.name and not summary["complete"], summary
    assert not (out / "lease.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_while_the_driver_waits_on_a_long_shard_stops_cleanly(tmp_path, ray_cluster, sig):
    """`ray job stop` / Kubernetes while a shard runs for long: the driver waits in ray.wait, where a handler that
    raised surfaced as SystemError (exit 1, a traceback, no summary)."""
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(_job(tmp_path, rows=6, faults={"hang": {1: 9}})))
    proc = start_driver(m, "--address", ray_cluster)
    _wait_for(proc, tmp_path / "out" / "stats" / "00000.json")
    time.sleep(1.5)  # shard 1 hangs: the driver is inside ray.wait
    os.kill(proc.pid, sig)
    _assert_clean_stop(proc, sig, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_ray_starts_stops_cleanly(tmp_path, sig):
    """The lease is taken, then a local Ray starts (seconds): ray.init's own SIGTERM handler exited with 15."""
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(_job(tmp_path, rows=6)))
    proc = start_driver(m, "--no-dashboard")
    _wait_for(proc, tmp_path / "out" / "lease.json")
    os.kill(proc.pid, sig)
    _assert_clean_stop(proc, sig, tmp_path / "out")
    assert not (tmp_path / "out" / "stats").exists() or not list((tmp_path / "out" / "stats").iterdir())


# -- temporary files; --force beside the user's files --------------------------------------------------------------

def test_temporary_files_are_written_beside_the_data_and_never_read_as_data(tmp_path, monkeypatch):
    """A writer frozen mid-write (here: the rename never happens) leaves its temporary file under _tmp/, where
    pq.read_table(out/shards) does not look; the next run's prepare removes it (and the older *.tmp-* kind)."""
    out = JobOutput(str(tmp_path / "out"))
    table = pa.table({"id": pa.array([1, 2], pa.int64())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    out.write_bytes("shards/00000.parquet", data)
    monkeypatch.setattr(out.fs, "mv", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(out.fs, "rm", lambda *a, **k: None)  # killed: no clean-up either
    with pytest.raises(KeyboardInterrupt):
        out.write_bytes("shards/00001.parquet", data)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "out" / "shards").iterdir()] == ["00000.parquet"]
    assert pq.read_table(tmp_path / "out" / "shards").num_rows == 2
    (left,) = (tmp_path / "out" / "_tmp").iterdir()
    (tmp_path / "out" / "shards" / "00002.parquet.tmp-0123456789ab").write_bytes(data)  # an older version's
    assert sorted(out.clear_tmp()) == ["_tmp/" + left.name, "shards/00002.parquet.tmp-0123456789ab"]
    assert not left.exists() and [p.name for p in (tmp_path / "out" / "shards").iterdir()] == ["00000.parquet"]


def test_force_removes_only_the_files_the_job_wrote_and_says_so(tmp_path, ray_cluster, caplog):
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(_job(tmp_path, rows=3)))
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    mine = {"logs/app-2026.log": b"app log", "shards/README.md": b"# notes", "stats/q3.csv": b"q,3",
            "notes.txt": b"n", "shards/00000.parquet.bak": b"bak"}
    for rel, data in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "logs" / "00000-attempt0.txt").write_text("an old failure")
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, "--force",
                                  "--set", "decode.threshold=0.5"])
    assert r.exit_code == 0, r.output
    for rel, data in mine.items():
        assert (out / rel).read_bytes() == data, rel
    assert not (out / "logs" / "00000-attempt0.txt").exists()
    said = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("--force: removed")]
    assert said == [f"--force: removed 1 markers, 1 data files, 1 logs, summary.json from {out} (files the job "
                    "wrote; other files are kept)"], said
    assert json.loads((out / "stats" / "00000.json").read_text())["config"]["threshold"] == 0.5


# -- credentials inside URIs ----------------------------------------------------------------------------------

@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www (it ignores the credentials a URL carries)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    www = tmp_path / "www"
    www.mkdir()

    class Ranged(SimpleHTTPRequestHandler):  # byte ranges, as Parquet readers ask for them
        def log_message(self, *a):
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            path = Path(self.translate_path(self.path))
            if not rng or not path.is_file():
                return super().do_GET()
            data = path.read_bytes()
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start = int(a) if a else max(0, len(data) - int(b))
            stop = min(len(data), int(b) + 1) if a and b else len(data)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(data[start:stop])

        def end_headers(self):
            if not self._headers_buffer or b"Accept-Ranges" not in b"".join(self._headers_buffer):
                self.send_header("Accept-Ranges", "bytes")
            super().end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Ranged, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, server.server_address[1]
    server.shutdown()


def test_credentials_in_the_input_uri_are_in_neither_job_json_nor_the_log(tmp_path, ray_cluster, http_dir):
    www, port = http_dir
    _parquet(www / "part-0.parquet", 3)
    uri = f"http://alice:hunter2@127.0.0.1:{port}/part-0.parquet"
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(_job(tmp_path, input={"uri": uri})))
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, "-v"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    text = "".join(p.read_text() for p in out.rglob("*.json")) + r.output
    assert "hunter2" not in text and "alice:<redacted>@" in (out / "job.json").read_text()
    assert (out / "job.json").read_text().count("alice:<redacted>@") >= 2  # the manifest and the plan's file

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    m.write_text(yaml.safe_dump(_job(tmp_path, input={"uri": f"http://alice:hunter2@127.0.0.1:"
                                                      f"{closed.getsockname()[1]}/x/*.parquet"})))
    closed.close()
    r = CliRunner().invoke(main, ["run", str(m)])
    assert r.exit_code == 2 and "hunter2" not in r.output and "alice:<redacted>@" in r.output, r.output


# -- one line and exit 2 (or the documented behaviour) -----------------------------------------------------------

def _one_line_exit_2(r, *needles) -> None:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("over, needle", [
    ({"decode": {"threshold": "high"}}, "decode.threshold must be a number, got 'high'"),
    ({"decode": {"temperature": "hot"}}, "decode.temperature must be a number, got 'hot'"),
    ({"decode": {"gen_length": 8.5}}, "decode.gen_length must be an integer, got 8.5"),
    ({"decode": {"num_samples": 10 ** 11, "temperature": 1.0}}, "num_samples"),
    ({"output": {"lease_s": float("inf")}}, "lease_s"),
    ({"output": {"uri": ""}}, "output.uri is empty"),
])
def test_bad_manifest_values_are_one_line(tmp_path, over, needle):
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(_job(tmp_path, **over)))
    for cmd in (["run", str(m)], ["plan", str(m)]):
        _one_line_exit_2(CliRunner().invoke(main, cmd), needle)
    assert not (tmp_path / "out").exists() and not any(p.name == "job.json" for p in Path.cwd().iterdir())


def test_a_binary_manifest_and_a_yaml_alias_bomb_are_one_line(tmp_path):
    m = tmp_path / "job.yaml"
    m.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    _one_line_exit_2(CliRunner().invoke(main, ["plan", str(m)]), "is not a text (UTF-8) YAML file")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    m.write_text(bomb + "name: t\n")
    t0 = time.monotonic()
    _one_line_exit_2(CliRunner().invoke(main, ["plan", str(m)]), "expands to more than 100000 values")
    assert time.monotonic() - t0 < 20  # it returned: 10^9 values were never walked


def test_a_job_json_of_the_wrong_shape_is_one_line_in_run_and_status(tmp_path):
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(_job(tmp_path)))
    (tmp_path / "out").mkdir()
    for bad in ([1, 2], {"name": "t", "plan": {"shards": "all", "rows": 3}}, {"name": "t", "plan": []},
                {"name": "t", "plan": {"rows": 3, "shards": [{"index": 0, "start": "a", "stop": 3}]}}):
        (tmp_path / "out" / "job.json").write_text(json.dumps(bad))
        _one_line_exit_2(CliRunner().invoke(main, ["status", str(tmp_path / "out")]), "is not a job description")
        _one_line_exit_2(CliRunner().invoke(main, ["run", str(m)]), "is not a job description", "--force")


def test_a_lease_without_a_timezone_is_read_as_utc(tmp_path):
    out = JobOutput(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    naive = (datetime.now(timezone.utc) + timedelta(seconds=300)).replace(tzinfo=None).isoformat()
    (tmp_path / "out" / "lease.json").write_text(json.dumps({"holder": "elsewhere:1", "run_id": "r" * 32,
                                                             "expires_at": naive}))
    with pytest.raises(LeaseHeld, match="in use by another run: lease held by elsewhere:1"):
        Lease(out, ttl_s=30).acquire()
    expired = (datetime.now(timezone.utc) - timedelta(seconds=5)).replace(tzinfo=None).isoformat()
    (tmp_path / "out" / "lease.json").write_text(json.dumps({"holder": "elsewhere:1", "run_id": "r" * 32,
                                                             "expires_at": expired}))
    lease = Lease(out, ttl_s=30)
    lease.acquire()  # expired: taken over
    lease.release()


def test_markers_with_impossible_counters_are_not_commits(tmp_path):
    out = JobOutput(str(tmp_path / "out"))
    rec = ShardRecord(shard=0, stats=ShardStats(shards=1, rows=3, generated_tokens=12),
                      file=out.commit(0, b"data", 3, lambda f: ShardRecord(0, ShardStats(shards=1, rows=3), f)).file)
    for field_, value, why in (("generated_tokens", -5, "generated_tokens negative"),
                               ("error_rows", 10 ** 9, "1000000000 error rows of 3")):
        d = rec.to_dict()
        d[field_] = value
        (tmp_path / "out" / "stats" / "00000.json").write_text(json.dumps(d))
        scan = out.scan({0: 3})
        assert scan.committed == {} and why in scan.damaged[0], scan.damaged


def test_status_does_not_call_a_dead_drivers_lease_running(tmp_path):
    out = JobOutput(str(tmp_path / "out"))
    out.write_job({"name": "t", "plan": {"rows": 3, "shards": [{"index": 0, "start": 0, "stop": 3}]}})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    until = (datetime.now(timezone.utc) + timedelta(seconds=300)).isoformat()
    (tmp_path / "out" / "lease.json").write_text(json.dumps({"holder": f"{socket.gethostname()}:{dead.pid}",
                                                             "run_id": "r" * 32, "expires_at": until}))
    r = CliRunner().invoke(main, ["status", str(tmp_path / "out")])
    assert r.exit_code == 1 and "running" not in r.output and "0/1 shards committed" in r.output, r.output  # 1: incomplete
    (tmp_path / "out" / "lease.json").write_text(json.dumps({"holder": f"{socket.gethostname()}:{os.getpid()}",
                                                             "run_id": "r" * 32, "expires_at": until}))
    assert "running: lease held by" in CliRunner().invoke(main, ["status", str(tmp_path / "out")]).output
