"""Cluster-native operation on a real local Ray: joined clusters that cannot (yet) place the actors, a derived shard
timeout and heartbeat lines, per-attempt tracebacks, Ray metrics, SIGTERM / Ctrl-C, every promised exit-2 case as
one line, secrets kept off job.json and the command line. The multi-node (node loss) and `ray job submit` tests are
marked slow."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fastdllm.jobs import parse_manifest, run_job
from fastdllm.jobs.cli import main
from tests.test_jobs import ROOT, output_rows, spec, write_inputs
from tests.conftest import own_local_ray
from fastdllm.workers.storage import redact

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs that reports metrics every half second."""
    with own_local_ray() as address:  # the shared test Ray reports metrics every half second (conftest.py)
        yield address


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_manifest(tmp_path: Path, **over) -> Path:
    m = tmp_path / "job.yaml"
    m.write_text(yaml.safe_dump(spec(tmp_path, **over)))
    return m


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_exit_2(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], lines[0]


# -- exit 2: one line, before any work -------------------------------------------------------------------------------


def test_mixed_int_id_types_and_gen_length_beyond_the_model_are_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["1+2="], "id": pa.array([1], pa.int32())}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"prompt": ["3+4="], "id": pa.array([2], pa.int64())}), tmp_path / "in" / "b.parquet")
    m = write_manifest(tmp_path)
    assert_one_line_exit_2(invoke("run", m), "disagree on the type of id column 'id'", "int32 in a.parquet",
                           "int64 in b.parquet")
    assert not (tmp_path / "out").exists()
    r = invoke("run", m, "--set", "input.id_column=null", "--set", "decode={gen_length: 1024, block_length: 32}")
    assert_one_line_exit_2(r, "decode.gen_length is 1024 but model tiny takes 512 positions")
    assert not (tmp_path / "out").exists()


def test_storage_errors_are_one_line(tmp_path, monkeypatch):
    write_inputs(tmp_path / "in", n_files=1, rows=3)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    m = write_manifest(tmp_path, input={"uri": "s3://fdl-bucket/in/"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    r = invoke("run", m, "--set", f"storage_options.endpoint_url={endpoint}")
    assert_one_line_exit_2(r, "EndpointConnectionError", "check storage_options.endpoint_url")
    r = invoke("run", m, "--set", f"storage_options={{endpoint_url: '{endpoint}/', bogus_option: 1}}")
    assert_one_line_exit_2(r, "storage_options has an option the file system does not take", "bogus_option")
    for k in S3_KEYS:
        monkeypatch.delenv(k)
    for k in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(k, str(tmp_path / "nothing"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    r = invoke("run", m, "--set", f"storage_options.endpoint_url={endpoint}//")  # a new s3fs instance, no creds
    assert_one_line_exit_2(r, "NoCredentialsError", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def test_a_store_that_stops_answering_times_out(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: the driver's storage calls give up in seconds."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(16)], daemon=True).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    m = write_manifest(tmp_path, input={"uri": "s3://fdl-bucket/in/"},
                       storage_options={"endpoint_url": f"http://127.0.0.1:{server.getsockname()[1]}",
                                        "config_kwargs": {"read_timeout": 1}})
    t0 = time.monotonic()
    r = invoke("plan", m)
    assert time.monotonic() - t0 < 30
    assert_one_line_exit_2(r, "ReadTimeoutError", "the store did not answer")
    server.close()


def test_wrong_ray_address_is_refused_in_seconds_before_the_output_is_touched(tmp_path):
    write_inputs(tmp_path / "in", n_files=1, rows=3)
    m = write_manifest(tmp_path)
    t0 = time.monotonic()
    r = invoke("run", m, "--address", f"127.0.0.1:{closed_port()}")
    assert time.monotonic() - t0 < 20
    assert_one_line_exit_2(r, "cannot reach the Ray cluster at 127.0.0.1:")
    assert not (tmp_path / "out").exists()


# -- secrets ---------------------------------------------------------------------------------------------------------


def test_secrets_are_redacted_by_key_and_by_value():
    options = {
        "endpoint_url": "http://admin:hunter2@127.0.0.1:9000",
        "key": "${AWS_ACCESS_KEY_ID}",
        "secret": "inline-secret",
        "connection_string": "DefaultEndpointsProtocol=https;AccountName=acc;AccountKey=Zm9vYmFyYmF6==;",
        "client_kwargs": {"headers": {"Authorization": "Bearer abc.def"}},
        "headers": [{"X-Forwarded": "Basic dXNlcjpwYXNz"}],
        "passphrase": "pp",
        "sas_token": "sv=2024&sig=c2lnbmF0dXJl",
        "url": "https://host/b?X-Amz-Signature=deadbeef&x=1",
        "proxy": "http://user:${PROXY_PASSWORD}@proxy:3128",
        "account_name": "acc",
        "anon": False,
    }
    out, hidden = redact(options)
    text = json.dumps(out)
    for secret in ("hunter2", "inline-secret", "Zm9vYmFyYmF6", "abc.def", "dXNlcjpwYXNz", "pp", "c2lnbmF0dXJl",
                   "deadbeef"):
        assert secret not in text, secret
    assert out["endpoint_url"] == "http://admin:<redacted>@127.0.0.1:9000"
    assert out["key"] == "${AWS_ACCESS_KEY_ID}" and out["proxy"] == options["proxy"]  # references stay
    assert out["account_name"] == "acc" and out["anon"] is False
    assert "storage_options.headers[0].X-Forwarded" in hidden
    assert "storage_options.client_kwargs.headers.Authorization" in hidden
    assert "storage_options.key" not in hidden and "storage_options.proxy" not in hidden


def test_secrets_on_the_command_line_are_refused(tmp_path, monkeypatch):
    write_inputs(tmp_path / "in", n_files=1, rows=3)
    m = write_manifest(tmp_path)
    for item in ("storage_options.secret=abc", "storage_options.client_kwargs.aws_secret_access_key=abc",
                 "storage_options.endpoint_url=http://u:p@127.0.0.1:9000",
                 "storage_options={headers: {Authorization: Bearer abc}}"):
        r = invoke("plan", m, "--set", item)
        assert_one_line_exit_2(r, "a secret on the command line", "${VAR}")
    monkeypatch.setenv("SOME_VAR", "from-the-environment")
    r = invoke("plan", m, "--set", "storage_options.secret=${SOME_VAR}")
    assert r.exit_code == 0, r.output
    r = invoke("status", tmp_path / "out", "-o", "secret=abc")
    assert_one_line_exit_2(r, "-o secret: a secret on the command line")


def test_prompt_text_on_the_command_line_is_not_taken_for_a_secret():
    """Only storage options hold secrets: a system prompt or template that says 'basic' or 'token' is text."""
    from fastdllm.jobs.manifest import apply_overrides

    raw = apply_overrides({}, ["model.system_prompt=Explain in basic terms, password=none", "model.chat_template="
                               "{{ bos_token }}{% for m in messages %}Token {{ m.content }}{% endfor %}"])
    assert raw["model"]["system_prompt"] == "Explain in basic terms, password=none"
    assert raw["model"]["chat_template"].startswith("{{ bos_token }}")


# -- joined clusters -------------------------------------------------------------------------------------------------


def test_actors_the_cluster_cannot_place_give_up_with_exit_1(tmp_path, ray_local, caplog):
    """A joined cluster without GPUs: a warning, 'waiting for' lines, then exit 1 naming what was missing."""
    caplog.set_level("INFO", logger="fastdllm")
    write_inputs(tmp_path / "in", n_files=1, rows=6)
    m = write_manifest(tmp_path, workers={"num_gpus": 1, "count": 2, "placement_timeout_s": 3, "heartbeat_s": 1})
    t0 = time.monotonic()
    r = invoke("run", m, "--address", ray_local)
    assert r.exit_code == 1, r.output
    assert time.monotonic() - t0 < 30
    assert "no worker could be placed in 3s: each needs 1 GPU, 1 CPU, the cluster has 0/0 GPU" in r.output
    assert "shard 00000 failed" in r.output and "shard 00001 failed" in r.output
    assert "workers.num_gpus is 1 but the Ray cluster has 0 GPUs" in caplog.text
    assert re.search(r"waiting for 2 actors \(need 1 GPU, 1 CPU each; cluster: 0/0 GPU, \d+/2 CPU free\); giving up",
                     caplog.text), caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["committed"] == 0 and [x["kind"] for x in summary["missing"]] == ["failed", "failed"]


def test_more_actors_than_the_cluster_holds_finish_on_the_placed_ones(tmp_path, ray_local, caplog):
    """3 actors of 1 CPU on a joined 2-CPU cluster: the third waits, shards go only to the placed two."""
    caplog.set_level("INFO", logger="fastdllm")
    ids = write_inputs(tmp_path / "in", n_files=2, rows=6)
    m = parse_manifest(spec(tmp_path, workers={"count": 3, "heartbeat_s": 1}))
    import ray

    deadline = time.monotonic() + 60  # the previous test's actors (the session's Ray is shared) are being ended
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.1)
    result = run_job(m, address=ray_local)
    assert result.ok, result.failed
    assert sorted(r["id"] for r in output_rows(tmp_path / "out")) == ids
    assert "workers.count is 3 but the cluster holds 2 actors of 1 CPU now" in caplog.text
    assert "waiting for 1 actors (need 1 CPU each; cluster: 0/0 GPU, 0/2 CPU free)" in caplog.text
    workers = {json.loads(p.read_text())["worker"] for p in (tmp_path / "out" / "stats").glob("*.json")}
    assert 1 <= len(workers) <= 2


def scrape_metrics(expected: dict[str, float], job: str, timeout: float = 30) -> dict[str, float]:
    """The value of each `ray_<name>{job=...}` series on this node's metrics endpoint, polled until they equal
    `expected` (to float precision; metrics are exported every half second here) or the timeout passes."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, found = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and found != pytest.approx(expected):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in expected:
            m = re.search(rf'^ray_{name}{{[^}}]*job="{job}"[^}}]*}} (\S+)$', text, re.MULTILINE)
            if m:
                found[name] = float(m.group(1))
        time.sleep(0.5)
    return found


def test_derived_timeout_heartbeat_and_attempt_logs(tmp_path, ray_local, caplog):
    """No shard_timeout_s: a shard that hangs after others committed times out at max(floor, 5x slowest), with
    heartbeat lines meanwhile; each failed attempt leaves its traceback in logs/NNNNN-attemptK.txt; the job's
    counters reach Ray's metrics endpoint."""
    caplog.set_level("INFO", logger="fastdllm")
    ids = write_inputs(tmp_path / "in", n_files=1, rows=9)
    m = parse_manifest(spec(tmp_path, name="timeouts", faults={"error": {0: 1}, "hang": {2: 1}},
                            workers={"heartbeat_s": 1, "min_shard_timeout_s": 4}))
    result = run_job(m, address=ray_local)
    assert result.ok, result.failed
    out = tmp_path / "out"
    assert sorted(r["id"] for r in output_rows(out)) == ids
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["00000-attempt0.txt", "00002-attempt0.txt"]
    error_log = (out / "logs" / "00000-attempt0.txt").read_text()
    assert "RuntimeError: injected fault in shard 00000 (attempt 0)" in error_log
    assert re.search(r"File \"\S+workers/shard.py\", line \d+, in _inject_fault", error_log), error_log
    hang_log = (out / "logs" / "00002-attempt0.txt").read_text()
    assert re.search(r"timed out after \d+s \(5x the slowest committed shard", hang_log), hang_log
    assert re.search(r"no shard committed for \d+s: \d/3 committed in this run, \d queued; running: 00002",
                     caplog.text), caplog.text
    assert json.loads((out / "stats" / "00002.json").read_text())["attempt"] == 1
    tokens = sum(r["n_tokens"] for r in output_rows(out))  # the job's metrics reached Ray's metrics endpoint
    expected = {"fastdllm_rows_total": len(ids), "fastdllm_generated_tokens_total": tokens,
                "fastdllm_shards_committed_total": 3, "fastdllm_shard_attempts_failed_total": 2,
                "fastdllm_shard_seconds_count": 3}
    last = max((json.loads(p.read_text()) for p in (out / "stats").glob("*.json")), key=lambda d: d["finished_at"])
    expected["fastdllm_occupancy"] = last["occupancy"]  # the gauge holds the last committed shard's
    assert scrape_metrics(expected, m.name) == pytest.approx(expected)


def test_a_model_that_cannot_load_fails_the_shards_without_using_their_attempts(tmp_path, ray_local):
    import shutil

    import fastdllm

    model = tmp_path / "broken-model"
    shutil.copytree(Path(fastdllm.__file__).parent / "tiny", model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    write_inputs(tmp_path / "in", n_files=1, rows=6)
    m = parse_manifest(spec(tmp_path, model={"source": str(model)}, workers={"count": 1, "max_retries": 0}))
    result = run_job(m, address=ray_local)
    assert sorted(result.failed) == [0, 1]
    for why in result.failed.values():
        assert why.startswith("worker could not load the model: ") and "gave up: 1 worker deaths" in why, why
    logs = tmp_path / "out" / "logs"
    assert not logs.exists() or not list(logs.iterdir())  # no shard attempt was made


# -- SIGTERM / Ctrl-C ------------------------------------------------------------------------------------------------


def start_driver(m: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "fastdllm.jobs.cli", "run", str(m), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_commit(proc: subprocess.Popen, stats: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (stats.exists() and any(stats.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()


@pytest.mark.parametrize("sig, code, local, dashboard", [
    (signal.SIGTERM, 143, False, True),
    pytest.param(signal.SIGINT, 130, True, True, marks=pytest.mark.slow),  # starts a local Ray: ~30 s
    pytest.param(signal.SIGTERM, 143, True, False, marks=pytest.mark.slow),
], ids=["sigterm-joined", "ctrl-c-local-ray", "sigterm-local-ray-no-dashboard"])
def test_signal_stops_the_job_cleanly_and_a_rerun_resumes(tmp_path, ray_local, sig, code, local, dashboard):
    """SIGTERM (ray job stop, Kubernetes) on a driver joined to a cluster, Ctrl-C on one that started its own Ray
    (with the dashboard, or without): actors killed, summary written, 'rerun to resume', the documented exit code."""
    import ray

    ids = write_inputs(tmp_path / "in", n_files=2, rows=12)
    m = write_manifest(tmp_path, decode={"gen_length": 16, "block_length": 4, "steps": 16})
    proc = start_driver(m, "--progress", *(() if local else ("--address", ray_local)),
                        *(() if dashboard else ("--no-dashboard",)))
    wait_for_commit(proc, tmp_path / "out" / "stats")
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "core dumped" not in err.lower(), err
    assert f"stopped by {sig.name}" in err and "rerun the same command to resume" in err, err
    if local:  # a local Ray has the dashboard unless --no-dashboard
        assert bool(re.search(r"Ray dashboard: http://\S+:\d+", err)) == dashboard, err
    assert re.search(r"\d+/24 \[", err), err  # the progress bar ...
    for part in re.split(r"[\r\n]", err):  # ... and log lines that start on a line of their own
        if re.search(r" (INFO|WARNING|ERROR) ", part):
            assert re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", part), part
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run"]["interrupted"] == sig.name and summary["committed"] < 8
    if local:
        return  # its Ray is gone with it; resuming is the same as after SIGTERM
    deadline = time.time() + 30  # the driver's actors are gone: the cluster's CPUs are free again
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
    result = run_job(parse_manifest(yaml.safe_load(m.read_text())), address=ray_local)
    assert result.ok
    assert sorted(r["id"] for r in output_rows(tmp_path / "out")) == ids  # every row exactly once


# -- container recipe ------------------------------------------------------------------------------------------------


def test_container_recipe_matches_the_kuberay_manifest_and_the_tested_ray():
    """docker/Dockerfile builds on the Ray the tests ran with, copies every package the project installs, and its
    CUDA tag is the image the KubeRay manifest runs (docker itself is not available here to build it)."""
    import ray
    import tomllib

    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE).group(1) == ray.__version__
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {setup["package-dir"].get(p, p.replace(".", "/")).split("/")[0] for p in setup["packages"]}
    assert folders == {"fastdllm", "jobs", "workers"}
    for folder in folders:  # every source folder the package installs from
        assert re.search(rf"^COPY .*\b{folder} {folder}$", dockerfile, re.MULTILINE), folder
    rayjob = yaml.safe_load((ROOT / "manifests" / "kuberay-rayjob.yaml").read_text())
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    cuda_tag = re.search(r"--build-arg VARIANT=gpu .*?-t (\S+) \.", dockerfile, re.DOTALL).group(1)
    assert images == {cuda_tag}
    readme = (ROOT / "README.md").read_text()
    assert f"-t {cuda_tag} ." in readme and "docker/Dockerfile" in readme
    assert rayjob["spec"]["entrypoint"].startswith("fastdllm run ")
