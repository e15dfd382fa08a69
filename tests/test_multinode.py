"""Slow: jobs on multi-node Ray clusters started on this machine. A node removed mid-job (its shards are retried on
another node, every row exactly once), and `ray job submit` against a cluster started with `ray start --head`
(the manifest and input shipped in the runtime env's working_dir)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from fastdllm.jobs import parse_manifest, run_job
from tests.test_jobs import SHADOWS, output_rows, spec, write_inputs

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent


def test_node_loss_mid_job_retries_its_shards_elsewhere(tmp_path, caplog):
    """A head without CPUs and three 1-CPU nodes; two actors. Once a shard has committed, a node holding an actor
    is killed with its processes (as when a machine goes down): its shard goes to the survivor or to a fresh actor
    on the spare node."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 3}})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        ids = write_inputs(tmp_path / "in", n_files=2, rows=12)
        m = parse_manifest(spec(tmp_path, decode={"gen_length": 16, "block_length": 4, "steps": 16},
                                workers={"count": 2, "max_retries": 2, "heartbeat_s": 5}))
        result = {}
        driver = threading.Thread(target=lambda: result.update(r=run_job(m, address=cluster.address)))
        driver.start()
        stats = tmp_path / "out" / "stats"
        deadline = time.time() + 240
        while time.time() < deadline and driver.is_alive() and not (stats.exists() and any(stats.iterdir())):
            time.sleep(0.05)
        assert driver.is_alive() and len(list(stats.iterdir())) < 8, "the job should still be running"
        free = ray._private.state.available_resources_per_node()
        busy = [n for n in nodes if free.get(n.node_id, {}).get("CPU", 0) < 1]  # nodes holding an actor
        assert busy, free
        raylet = busy[0].all_processes["raylet"][0].process.pid
        workers = _children(raylet)  # its worker processes (the actor among them) die with the machine
        cluster.remove_node(busy[0], allow_graceful=False)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        driver.join(timeout=300)
        assert not driver.is_alive()
        assert result["r"].ok, result["r"].failed
        assert sorted(r["id"] for r in output_rows(tmp_path / "out")) == ids  # every row exactly once
        assert "is a local path but the cluster has 4 nodes" in caplog.text
        attempts = [json.loads(p.read_text())["attempt"] for p in stats.iterdir()]
        assert max(attempts) >= 1 and len(attempts) == 8  # the lost node's shard was retried
    finally:
        ray.shutdown()
        cluster.shutdown()


def _children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is `pid`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_naming(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _stop_cluster(marker: str) -> None:
    """Stop the cluster we started, by the PIDs of its processes (their command lines name our temp dir); never a
    bare `ray stop`, which would stop other Ray clusters on this machine too."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_naming(marker):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and _pids_naming(marker):
            time.sleep(0.2)


def test_ray_job_submit_runs_a_shipped_manifest(tmp_path):
    """`ray start --head` (own ports and temp dir), then `ray job submit --working-dir wd -- fastdllm run job.yaml`:
    the manifest and the input travel in the working_dir; the output lands at the manifest's absolute path."""
    temp = tempfile.mkdtemp(prefix="rfd", dir="/tmp")  # short: Ray's socket paths live under it
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}  # the cluster's and the client's
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run([VENV_BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                        f"--temp-dir={temp}", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                       timeout=120)
        wd = tmp_path / "wd"
        ids = write_inputs(wd / "in", n_files=2, rows=6)
        m = spec(tmp_path, input={"uri": "in/*.parquet"}, output={"uri": str(tmp_path / "out")},
                 workers={"count": 2})
        (wd / "job.yaml").write_text(yaml.safe_dump(m))
        for name, text in SHADOWS.items():  # the user's own modules in the working_dir shadow nothing
            (wd / name).write_text(text)
        for _ in range(30):  # the head's job agent may take a moment after `ray start` returns
            r = subprocess.run([VENV_BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                                "--working-dir", str(wd), "--", "fastdllm", "run", "job.yaml"],
                               env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4/4 shards committed" in r.stdout, r.stdout
        assert sorted(x["id"] for x in output_rows(tmp_path / "out")) == ids
        job = json.loads((tmp_path / "out" / "job.json").read_text())
        assert all("runtime_resources" in f["uri"] for f in job["plan"]["files"])  # read from the shipped copy

        # `ray job stop` sends SIGTERM (then SIGKILL after a few seconds): the driver stops cleanly in time
        write_inputs(wd / "in", n_files=2, rows=90)  # 60 shards: still running when the stop arrives
        m["output"]["uri"] = str(tmp_path / "out2")
        m["decode"] = {"gen_length": 16, "block_length": 4, "steps": 16}
        (wd / "job.yaml").write_text(yaml.safe_dump(m))
        ray_job = [VENV_BIN / "ray", "job"]
        addr = ["--address", f"http://127.0.0.1:{dash}"]
        subprocess.run([*ray_job, "submit", *addr, "--submission-id", "fdl-stop", "--no-wait", "--working-dir",
                        str(wd), "--", "fastdllm", "run", "job.yaml"], env=env, check=True, capture_output=True,
                       timeout=120)
        stats = tmp_path / "out2" / "stats"
        deadline = time.time() + 240
        while time.time() < deadline and not (stats.exists() and any(stats.iterdir())):
            time.sleep(0.1)
        subprocess.run([*ray_job, "stop", *addr, "fdl-stop"], env=env, check=True, capture_output=True, timeout=120)
        summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
        logs = subprocess.run([*ray_job, "logs", *addr, "fdl-stop"], env=env, capture_output=True, text=True,
                              timeout=60).stdout
        assert summary["run"]["interrupted"] == "SIGTERM" and 1 <= summary["committed"] < 60, (summary, logs)
        assert "stopped by SIGTERM" in logs and "rerun the same command to resume" in logs, logs
        assert "Traceback" not in logs, logs
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
