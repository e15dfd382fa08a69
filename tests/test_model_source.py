"""A local model.source given relative to the driver's working directory (or to ~) reaches the workers, and
job.json, as an absolute path, like input.uri and output.uri; built-in names and hub repo ids stay as they are."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from click.testing import CliRunner

import fastdllm
from fastdllm.jobs import parse_manifest
from fastdllm.jobs.cli import main
from fastdllm.jobs.plan import make_plan
from fastdllm.jobs.runner import absolute_uris, job_spec
from fastdllm.workers import ShardWorker

from .conftest import own_local_ray

DECODE = {"gen_length": 8, "block_length": 4, "steps": 8}


def _manifest(source: str) -> dict:
    return {"name": "rel", "model": {"source": source}, "input": {"uri": "in/part.parquet", "rows_per_shard": 2},
            "output": {"uri": "out"}, "decode": dict(DECODE), "workers": {"count": 1, "batch_size": 2}}


def _setup(tmp_path, monkeypatch):
    shutil.copytree(fastdllm.models.BUILTIN_DIR, tmp_path / "ckpt")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["1+2=", "sort:31=", "4+4="]}), tmp_path / "in" / "part.parquet")
    monkeypatch.chdir(tmp_path)


def test_relative_and_home_model_sources_become_absolute(tmp_path, monkeypatch):
    _setup(tmp_path, monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    for given in ("ckpt", "./ckpt", "~/ckpt"):
        m = absolute_uris(parse_manifest(_manifest(given)))
        assert m.model.source == str(tmp_path / "ckpt"), given
        assert (m.input.uri, m.output.uri) == (str(tmp_path / "in" / "part.parquet"), str(tmp_path / "out"))
    for kept in ("tiny", "acme/llada-tiny"):  # a built-in name, a repo id (no such directory here)
        assert absolute_uris(parse_manifest(_manifest(kept))).model.source == kept

    # the job spec carries the absolute path: a worker started in another directory loads the same model
    m = absolute_uris(parse_manifest(_manifest("ckpt")))
    settings = job_spec(m, make_plan(m))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    w = ShardWorker(settings)
    assert w.model.config.n_layers == fastdllm.load_model("tiny").config.n_layers


def test_a_job_with_a_relative_model_directory_runs_and_records_its_absolute_path(tmp_path, monkeypatch):
    _setup(tmp_path, monkeypatch)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_manifest("ckpt")))
    with own_local_ray() as address:
        r = CliRunner().invoke(main, ["run", "job.yaml", "--address", address])
    assert r.exit_code == 0, r.output
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["manifest"]["model"]["source"] == job["identity"]["model"]["source"] == str(tmp_path / "ckpt")
    rows = [row for p in sorted((tmp_path / "out" / "shards").glob("*.parquet")) for row in pq.read_table(p).to_pylist()]
    assert len(rows) == 3 and all(row["error"] is None for row in rows)
    assert os.path.isabs(job["manifest"]["input"]["uri"])
