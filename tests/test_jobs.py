"""Whole jobs on a real local Ray cluster, with local Parquet files and on a real S3-compatible server (moto's
server mode on 127.0.0.1, through s3fs): resume, a killed driver, config changes, dying and failing workers, and
the integrity cases: input changed mid-run, damaged or half-written output, a second run on a held output,
relative paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fastdllm.jobs import InvalidJob, parse_manifest, run_job
from fastdllm.jobs.cli import main
from fastdllm.workers import JobOutput, Lease, RunStats
from .conftest import own_local_ray

ROOT = Path(__file__).resolve().parent.parent
DECODE = {"gen_length": 8, "block_length": 4, "steps": 8}
S3_ENV = {"AWS_ACCESS_KEY_ID": "fdl-test-key", "AWS_SECRET_ACCESS_KEY": "fdl-test-secret-value",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (its own, never a cluster some `ray start` left on the machine); workers
    inherit the S3 test credentials from this process's environment."""
    os.environ.update(S3_ENV)
    with own_local_ray() as address:
        yield address


def write_inputs(directory: Path, n_files=2, rows=6, with_ids=True) -> list[int]:
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(n_files):
        file_ids = list(range(k * 1000, k * 1000 + rows))
        cols = {"prompt": [f"{i % 97}+{(i * 7) % 89}=" if i % 2 else f"sort:{i % 1000}=" for i in file_ids]}
        if with_ids:
            cols["id"] = pa.array(file_ids, pa.int64())
        pq.write_table(pa.table(cols), directory / f"part-{k}.parquet")
        ids += file_ids
    return ids


def spec(tmp_path, **over) -> dict:
    m = {"name": "t", "model": {"source": "tiny"},
         "input": {"uri": str(tmp_path / "in" / "*.parquet"), "id_column": "id", "rows_per_shard": 3},
         "output": {"uri": str(tmp_path / "out")}, "decode": dict(DECODE),
         "workers": {"count": 1, "batch_size": 4, "max_retries": 1}}
    for k, v in over.items():
        m[k] = {**m[k], **v} if isinstance(v, dict) and isinstance(m.get(k), dict) else v
    return m


def output_rows(out: Path) -> list[dict]:
    return [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def mtimes(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "stats").glob("*.json")}


def test_local_job_end_to_end_then_rerun_does_nothing(tmp_path, ray_cluster):
    ids = write_inputs(tmp_path / "in")
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(spec(tmp_path)))
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, "--set", "workers.count=2"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    rows = output_rows(out)
    assert sorted(r["id"] for r in rows) == ids
    assert all(r["finish_reason"] in ("stop", "length") and r["error"] is None for r in rows)
    assert sorted(p.name for p in (out / "stats").iterdir()) == [f"{i:05d}.json" for i in range(4)]
    job = json.loads((out / "job.json").read_text())
    assert job["manifest"]["workers"]["count"] == 2 and len(job["plan"]["shards"]) == 4
    assert job["plan"]["fingerprint"] and job["versions"]["fastdllm"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["committed"] == 4 and summary["complete"] and summary["missing"] == []
    assert summary["totals"]["rows"] == len(ids)
    assert summary["totals"]["generated_tokens"] == sum(r["n_tokens"] for r in rows)
    assert not (out / "lease.json").exists()  # released at the end

    before = mtimes(out)
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 0 and "nothing to run" in r.output, r.output
    assert mtimes(out) == before

    r = CliRunner().invoke(main, ["status", str(out), "--shards"])
    assert r.exit_code == 0 and "4/4 shards committed, 0 pending, 0 failed" in r.output, r.output
    assert f"prompts {len(ids)}/{len(ids)}" in r.output


def test_resume_recomputes_missing_damaged_and_unreadable_shards_only(tmp_path, ray_cluster, caplog):
    ids = write_inputs(tmp_path / "in", rows=9)
    m = parse_manifest(spec(tmp_path))
    assert run_job(m, address=ray_cluster).ok
    out = tmp_path / "out"
    before = mtimes(out)
    (out / "stats" / "00099.json").write_bytes((out / "stats" / "00005.json").read_bytes())  # not in the plan
    (out / "stats" / "00002.json").unlink()  # a shard the driver died in
    (out / "shards" / "00002.parquet").write_bytes(b"half-written")
    (out / "stats" / "00001.json").write_bytes(b"")  # what a full disk left before commits were atomic
    (out / "summary.json").write_bytes(b"")
    data = (out / "shards" / "00000.parquet").read_bytes()
    (out / "shards" / "00000.parquet").write_bytes(data[:-100])  # truncated
    flipped = bytearray((out / "shards" / "00003.parquet").read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    (out / "shards" / "00003.parquet").write_bytes(bytes(flipped))  # one bit flipped
    (out / "shards" / "00004.parquet").unlink()  # deleted, its marker kept
    r = CliRunner().invoke(main, ["status", str(out)])
    assert r.exit_code == 1 and "1/6 shards committed, 1 pending, 0 failed, 4 damaged" in r.output, r.output
    assert "incomplete: 1 shards pending, 4 failed or damaged" in r.output
    assert "prompts 3/18" in r.output and "shard 00003 is damaged: shards/00003.parquet does not match" in r.output
    assert "stats/00001.json: not valid JSON (0 bytes" in r.output
    with caplog.at_level("WARNING"):
        result = run_job(m, address=ray_cluster)
    assert "stats/00099.json: not a shard of this job's plan" in caplog.text
    assert result.ok and result.summary.run.shards_run == 5 and result.summary.committed == 6
    assert result.summary.totals.rows == len(ids)  # the marker outside the plan never counts
    after = mtimes(out)
    assert {k for k in after if after[k] != before.get(k)} == {f"{i:05d}.json" for i in range(5)} | {"00099.json"}
    assert sorted(r["id"] for r in output_rows(out)) == ids


def test_changed_config_or_input_refused_unless_forced(tmp_path, ray_cluster):
    write_inputs(tmp_path / "in", n_files=1, rows=3)
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(spec(tmp_path)))
    assert CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster]).exit_code == 0
    out = tmp_path / "out"
    before = mtimes(out)
    other = Lease(JobOutput(str(out)), ttl_s=60)  # another run holds the output
    other.acquire()
    try:
        for extra in ([], ["--force", "--set", "input.rows_per_shard=1"]):
            r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, *extra])
            assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
            held = f"in use by another run: lease held by {other.me.holder} (run {other.me.run_id[:8]}) until"
            assert held in r.output, r.output
    finally:
        other.release()
    assert mtimes(out) == before and len(list((out / "shards").iterdir())) == 1  # --force deleted nothing
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, "--set", "decode.threshold=0.5"])
    assert r.exit_code == 2 and "decode config changed (threshold: 0.9 -> 0.5)" in r.output, r.output
    assert "--force" in r.output
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, "--set", "workers.batch_size=2"])
    assert r.exit_code == 0, r.output  # batch size does not change outputs
    write_inputs(tmp_path / "in", n_files=1, rows=4)
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 2 and "the input" in r.output, r.output
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, "--force", "--set", "decode.threshold=0.5"])
    assert r.exit_code == 0, r.output
    assert sorted(r["id"] for r in output_rows(out)) == [0, 1, 2, 3]
    assert all(json.loads(p.read_text())["config"]["threshold"] == 0.5 for p in (out / "stats").glob("*.json"))


def test_more_gpus_than_the_cluster_has_warns_on_a_joined_cluster(tmp_path, ray_cluster, caplog):
    from fastdllm.jobs.cluster import actors_that_fit
    from fastdllm.jobs.manifest import WorkersSpec

    with pytest.raises(InvalidJob, match="workers.num_gpus is 1 but the Ray cluster has 0 GPUs"):
        actors_that_fit(WorkersSpec(num_gpus=1), strict=True)
    assert actors_that_fit(WorkersSpec(num_gpus=1, count=2), strict=False) == 2
    assert "actors will wait" in caplog.text
    assert actors_that_fit(WorkersSpec(count=3), strict=True) == 2  # 2 CPUs: a third actor would never be placed
    assert actors_that_fit(WorkersSpec(count=3), strict=False) == 3  # a joined cluster may grow


def test_worker_dying_mid_shard_is_retried_on_a_new_actor(tmp_path, ray_cluster):
    ids = write_inputs(tmp_path / "in", n_files=1, rows=9)
    m = parse_manifest(spec(tmp_path, faults={"crash": {1: 1}}))
    result = run_job(m, address=ray_cluster)
    assert result.ok, result.failed
    out = tmp_path / "out"
    assert sorted(r["id"] for r in output_rows(out)) == ids
    stats = {p.name: json.loads(p.read_text()) for p in (out / "stats").glob("*.json")}
    assert stats["00001.json"]["attempt"] == 1 and stats["00000.json"]["attempt"] == 0
    assert stats["00001.json"]["worker"] != stats["00000.json"]["worker"]  # a new process took the retry


@pytest.mark.slow  # ~25 s; a hung shard's timeout and retry are in CI through tests/test_terminal.py's bar test
def test_stuck_shard_times_out_and_is_retried(tmp_path, ray_cluster):
    ids = write_inputs(tmp_path / "in", n_files=1, rows=6)
    m = parse_manifest(spec(tmp_path, faults={"hang": {0: 1}}, workers={"shard_timeout_s": 8}))
    result = run_job(m, address=ray_cluster)
    assert result.ok, result.failed
    assert sorted(r["id"] for r in output_rows(tmp_path / "out")) == ids
    assert json.loads((tmp_path / "out" / "stats" / "00000.json").read_text())["attempt"] == 1


def test_shard_that_keeps_failing_is_reported_exit_1_with_relative_paths(tmp_path, ray_cluster, monkeypatch):
    ids = write_inputs(tmp_path / "in", n_files=1, rows=9)
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(spec(tmp_path, faults={"error": {2: 99}}, input={"uri": "in/*.parquet"},
                                     output={"uri": "out"})))
    monkeypatch.chdir(tmp_path)  # the Ray workers run elsewhere: relative paths must not reach them
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 1, r.output
    assert "shard 00002 failed: RuntimeError: injected fault in shard 00002 (attempt 1)" in r.output
    assert "incomplete: 1 of 3 shards missing; rerun the same command" in r.output
    out = tmp_path / "out"
    assert (out / "logs" / "00002-attempt0.txt").exists() and (out / "logs" / "00002-attempt1.txt").exists()
    job = json.loads((out / "job.json").read_text())
    assert job["manifest"]["output"]["uri"] == str(out)
    assert job["manifest"]["input"]["uri"] == f"{tmp_path}/in/*.parquet"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["committed"] == 2 and [(f["shard"], f["kind"]) for f in summary["missing"]] == [(2, "failed")]
    assert sorted(r["id"] for r in output_rows(out)) == ids[:6]
    r = CliRunner().invoke(main, ["status", str(out)])
    assert "1 failed" in r.output and "shard 00002 failed" in r.output, r.output

    # A shard its worker reported committed but whose marker the driver cannot see is missing, never counted.
    from fastdllm.jobs.plan import make_plan
    from fastdllm.jobs.runner import absolute_uris, summarize

    (out / "stats" / "00000.json").unlink()
    s = summarize(JobOutput(str(out)), make_plan(absolute_uris(parse_manifest(yaml.safe_load(m.read_text())))),
                  {}, {0}, RunStats())
    assert not s.complete and s.committed == 1 and [x.kind for x in s.missing] == ["not_committed", "not_run"]
    assert "stats/00000.json is not in" in s.missing[0].why and "same output.uri" in s.missing[0].why
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, "--set", "faults.error={}"])
    assert r.exit_code == 0 and "3/3 shards committed" in r.output and "last run 2 shards" in r.output, r.output
    assert sorted(r["id"] for r in output_rows(out)) == ids


def test_workers_that_keep_dying_fail_the_remaining_shards(tmp_path, ray_cluster):
    write_inputs(tmp_path / "in", n_files=1, rows=9)
    m = parse_manifest(spec(tmp_path, faults={"crash": {0: 9, 1: 9, 2: 9}}, workers={"max_retries": 0}))
    result = run_job(m, address=ray_cluster)
    assert sorted(result.failed) == [0, 1, 2]
    assert all("worker process died" in why and "gave up" in why for why in result.failed.values()), result.failed


SHADOWS = {"workers.py": "raise ImportError('the user\\'s own workers.py was imported')\n",
           "jobs.py": "raise ImportError('the user\\'s own jobs.py was imported')\n"}


def test_user_files_named_workers_and_jobs_do_not_shadow_the_package(tmp_path, ray_cluster):
    """fastdllm installs its job runner as fastdllm.jobs / fastdllm.workers: a `workers.py` or `jobs.py` in the
    directory a job is started from (on the driver's and the actors' sys.path) is never imported."""
    ids = write_inputs(tmp_path / "in", n_files=1, rows=6)
    wd = tmp_path / "wd"
    wd.mkdir()
    for name, text in SHADOWS.items():
        (wd / name).write_text(text)
    (wd / "job.yaml").write_text(yaml.safe_dump(spec(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "fastdllm.jobs.cli", "run", "job.yaml", "--address", ray_cluster],
                       cwd=wd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "own workers.py" not in r.stderr and "own jobs.py" not in r.stderr
    assert sorted(x["id"] for x in output_rows(tmp_path / "out")) == ids


def test_killed_driver_then_rerun_gives_every_row_once(tmp_path, ray_cluster):
    ids = write_inputs(tmp_path / "in", n_files=2, rows=12)
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(spec(tmp_path, decode={"gen_length": 16, "block_length": 4, "steps": 16})))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "fastdllm.jobs.cli", "run", str(m), "--address", ray_cluster],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stats, lease = tmp_path / "out" / "stats", tmp_path / "out" / "lease.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not lease.exists():
        time.sleep(0.05)
    for extra in ([], ["--force", "--set", "input.rows_per_shard=2"]):  # beside the live run: refused
        r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster, *extra])
        assert r.exit_code == 2 and f":{proc.pid} (run " in r.output and "until" in r.output, r.output
    assert proc.poll() is None, "the first run should still be running"
    while time.time() < deadline and proc.poll() is None and not (stats.exists() and any(stats.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(stats.glob("*.json")))  # markers only: a write cut by the kill leaves a .tmp-* file
    assert 1 <= committed < 8, "the driver should have been killed mid-job"
    result = run_job(parse_manifest(yaml.safe_load(m.read_text())), address=ray_cluster)
    assert result.ok, result.summary
    assert result.summary.run.shards_run <= 8 - committed, (committed, result.summary)
    rows = output_rows(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == ids  # every row exactly once


def test_input_changed_mid_run_fails_its_shards_as_data_errors(tmp_path, ray_cluster):
    ids = write_inputs(tmp_path / "in", n_files=1, rows=24)
    planned = (tmp_path / "in" / "part-0.parquet").read_bytes()
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(spec(tmp_path, workers={"max_retries": 2})))
    res = {}
    run = threading.Thread(target=lambda: res.update(r=CliRunner().invoke(main, ["run", str(m), "--address",
                                                                                  ray_cluster])))
    run.start()
    stats, deadline = tmp_path / "out" / "stats", time.time() + 120
    while time.time() < deadline and not (stats.exists() and any(stats.iterdir())):
        time.sleep(0.01)
    write_inputs(tmp_path / "in", n_files=1, rows=5)  # rewritten after the first commit
    run.join()
    r = res["r"]
    assert r.exit_code == 1, r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    data = [x["shard"] for x in summary["missing"]]
    assert data and all(x["kind"] == "data" for x in summary["missing"]) and summary["committed"] + len(data) == 8
    for k in data:  # named, told to fix the input, never retried
        assert f"shard {k:05d} has bad input: input file {tmp_path}/in/part-0.parquet changed since" in r.output
        logs = tmp_path / "out" / "logs"
        assert (logs / f"{k:05d}-attempt0.txt").exists() and not (logs / f"{k:05d}-attempt1.txt").exists()
    assert r.output.strip().splitlines()[-1] == (f"incomplete: {len(data)} of 8 shards missing; fix the input named "
                                                 "above, then rerun the same command")
    rows = output_rows(tmp_path / "out")
    assert len(rows) == 3 * summary["committed"] and {r["id"] for r in rows} <= set(ids)  # nothing from the new file
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 2 and "the input" in r.output, r.output  # the changed file is refused at planning
    (tmp_path / "in" / "part-0.parquet").write_bytes(planned)  # the input fixed: the rerun finishes the job
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 0 and f"last run {len(data)} shards" in r.output, r.output
    assert sorted(r["id"] for r in output_rows(tmp_path / "out")) == ids


def test_a_run_whose_lease_is_taken_stops_and_leaves_the_output_to_the_new_holder(tmp_path, ray_cluster):
    ids = write_inputs(tmp_path / "in", n_files=1, rows=12)
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(spec(tmp_path, output={"lease_s": 0.4})))  # renewed (and checked) every 0.1 s
    res = {}
    run = threading.Thread(target=lambda: res.update(r=CliRunner().invoke(main, ["run", str(m), "--address",
                                                                                  ray_cluster])))
    run.start()
    out = tmp_path / "out"
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "job.json").exists():  # the run holds its lease
        time.sleep(0.01)
    thief = {"holder": "thief:1", "run_id": "f" * 32, "expires_at": "2999-01-01T00:00:00+00:00"}
    while run.is_alive():  # a run that took over (e.g. after this one stalled) and keeps renewing
        (out / "lease.json").write_text(json.dumps(thief))  # a renewal racing this write may overwrite it once
        time.sleep(0.05)
    run.join()
    r = res["r"]
    assert r.exit_code == 1 and "error: the lease on" in r.output and "taken over by thief:1" in r.output, r.output
    assert not (out / "summary.json").exists()
    lines = r.output.strip().splitlines()
    committed = int(lines[0].split("/")[0])  # at most the shard in flight while its model loaded
    assert committed <= 1 and f"incomplete: {4 - committed} of 4 shards missing" in lines[-1], r.output
    assert len([x for x in lines if "not finished: the lease on" in x]) == 4 - committed, r.output
    assert json.loads((out / "lease.json").read_text())["holder"] == "thief:1"  # left to its holder
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 2 and "lease held by thief:1" in r.output, r.output
    (out / "lease.json").unlink()  # the other run ended
    r = CliRunner().invoke(main, ["run", str(m), "--address", ray_cluster])
    assert r.exit_code == 0, r.output
    assert sorted(r["id"] for r in output_rows(out)) == ids


@pytest.fixture(scope="module")
def s3(ray_cluster):
    """A real S3-compatible server on 127.0.0.1 (moto server mode) and an s3fs filesystem for it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=endpoint)
    fs.mkdir("fdl-bucket")
    yield endpoint, fs
    server.stop()


def test_s3_job_end_to_end(tmp_path, ray_cluster, s3):
    endpoint, fs = s3
    ids = write_inputs(tmp_path / "in")
    for p in sorted((tmp_path / "in").iterdir()):
        fs.put(str(p), f"fdl-bucket/prompts/{p.name}")
    opts = {"endpoint_url": endpoint, "key": "${AWS_ACCESS_KEY_ID}", "secret": "${AWS_SECRET_ACCESS_KEY}"}
    m = parse_manifest(spec(tmp_path, input={"uri": "s3://fdl-bucket/prompts/"}, output={"uri": "s3://fdl-bucket/runs/a"},
                            storage_options=opts))
    result = run_job(m, address=ray_cluster)
    assert result.ok, result.failed
    fs.invalidate_cache()
    assert sorted(fs.ls("fdl-bucket/runs/a/stats")) == [f"fdl-bucket/runs/a/stats/{i:05d}.json" for i in range(4)]
    rows = []
    for path in sorted(fs.glob("fdl-bucket/runs/a/shards/*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    assert sorted(r["id"] for r in rows) == ids
    import datasets  # the README's S3 loading line

    ds = datasets.load_dataset("parquet", data_files="s3://fdl-bucket/runs/a/shards/*.parquet", split="train",
                               storage_options={"endpoint_url": endpoint, "key": S3_ENV["AWS_ACCESS_KEY_ID"],
                                                "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]},
                               cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(ds["id"]) == ids
    job = fs.cat("fdl-bucket/runs/a/job.json").decode()
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in job and "${AWS_SECRET_ACCESS_KEY}" in job

    assert not fs.exists("fdl-bucket/runs/a/lease.json")

    damaged = bytearray(fs.cat("fdl-bucket/runs/a/shards/00001.parquet"))
    damaged[len(damaged) // 2] ^= 0x01
    fs.pipe("fdl-bucket/runs/a/shards/00001.parquet", bytes(damaged))
    status = ["status", "s3://fdl-bucket/runs/a", "-o", f"endpoint_url={endpoint}"]
    r = CliRunner().invoke(main, status)
    assert r.exit_code == 1 and "3/4 shards committed, 0 pending, 0 failed, 1 damaged" in r.output, r.output
    other = Lease(JobOutput("s3://fdl-bucket/runs/a", opts), ttl_s=60)
    other.acquire()
    try:
        with pytest.raises(InvalidJob, match=f"in use by another run: lease held by {other.me.holder}"):
            run_job(m, address=ray_cluster)
        assert "running: lease held by" in CliRunner().invoke(main, status).output
    finally:
        other.release()
    result = run_job(m, address=ray_cluster)
    assert result.ok and result.summary.run.shards_run == 1 and result.summary.committed == 4
    r = CliRunner().invoke(main, status)
    assert r.exit_code == 0 and "4/4 shards committed" in r.output, r.output

    with pytest.raises(InvalidJob, match="does not exist"):
        run_job(parse_manifest(spec(tmp_path, input={"uri": "s3://fdl-bucket/nothing/here.parquet"},
                                    output={"uri": "s3://fdl-bucket/runs/b"}, storage_options=opts)))
