"""Pipeline-native rows through whole jobs on a real local Ray: JSONL / CSV / save_to_disk inputs run and resume
with every row exactly once; the synthetic-data manifest (messages, kept columns, samples, JSONL output); the
error policy's exit 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fastdllm.jobs import parse_manifest, run_job
from fastdllm.jobs.cli import main

from .test_rows import DECODE, rows, write
from .conftest import own_local_ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_demo_data import write_chat_data  # noqa: E402


@pytest.fixture(scope="module")
def ray_address():
    with own_local_ray() as address:
        yield address


def output_rows(out: Path) -> list[dict]:
    got = []
    for p in sorted((out / "shards").iterdir()):
        if p.suffix == ".jsonl":
            got += [json.loads(line) for line in p.read_text().splitlines()]
        else:
            import pyarrow.parquet as pq

            got += pq.read_table(p).to_pylist()
    return got


# ~20 s each. In CI: a text-input job through Ray in test_dataset_output (CSV), JSONL and hf inputs through a worker
# in test_dataset_output / test_id_name / test_rows, resume-every-row-once in test_jobs.
@pytest.mark.parametrize("fmt,out_fmt", [pytest.param("jsonl", "parquet", marks=pytest.mark.slow),
                                         pytest.param("hf", "parquet", marks=pytest.mark.slow),
                                         pytest.param("csv", "jsonl", marks=pytest.mark.slow)])
def test_format_runs_and_resumes_every_row_once(tmp_path, ray_address, fmt, out_fmt):
    data = rows()
    uri = write(tmp_path / "in" / {"jsonl": "a.jsonl", "csv": "a.csv", "hf": "saved"}[fmt], data, fmt)
    spec = {"name": "t", "model": {"source": "tiny"},
            "input": {"uri": uri, "rows_per_shard": 3, "keep_columns": ["answer"]},
            "output": {"uri": str(tmp_path / "out"), "format": out_fmt}, "decode": dict(DECODE),
            "workers": {"count": 1, "batch_size": 4}}
    m = parse_manifest(spec)
    first = run_job(m, address=ray_address)
    assert first.ok, (first.failed, first.summary.too_many_errors)
    out = tmp_path / "out"
    (out / "stats" / "00001.json").unlink()  # as if the worker died before committing shard 1
    (out / "shards" / f"00001.{out_fmt}").write_bytes(b"half-written")
    again = run_job(m, address=ray_address)
    assert again.ok and again.summary.run.shards_run == 1 and again.summary.committed == 3
    got = output_rows(out)
    rel = "data" if fmt == "hf" else "a." + fmt
    assert sorted(r["id"] for r in got) == sorted(f"{rel}:{i}" for i in range(len(data)))
    by_id = {r["id"]: r for r in got}
    for i, src in enumerate(data):
        r = by_id[f"{rel}:{i}"]
        assert (r["prompt"], r["answer"], r["sample_index"], r["error"]) == (src["prompt"], src["answer"], 0, None)


def test_synthetic_manifest_then_the_error_policy(tmp_path, ray_address):
    """manifests/synthetic.yaml (messages, kept columns, 4 samples, JSONL out) on 6 good conversations and 1 empty
    one: above workers.max_error_rate 0.1 the job exits 1 with the reason, in one line and in summary.json."""
    write_chat_data(tmp_path / "in", rows=6, files=2)
    with open(tmp_path / "in" / "part-001.jsonl", "a") as f:
        f.write(json.dumps({"id": 6, "messages": [], "answer": "", "task": "none"}) + "\n")
    over = [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}", "input.rows_per_shard=2",
            "decode.gen_length=16", "decode.steps=16", "workers.count=1", "workers.max_error_rate=0.1"]
    run = ["run", str(ROOT / "manifests" / "synthetic.yaml"), "--address", ray_address,
           *[a for o in over for a in ("--set", o)]]
    r = CliRunner().invoke(main, run)
    line = "1 of 7 rows failed (14.3%), above workers.max_error_rate 0.1; commonest: messages is an empty list (1)"
    assert r.exit_code == 1 and f"error: {line}" in r.output, r.output
    got = output_rows(tmp_path / "out")
    src = {r["id"]: r for p in sorted((tmp_path / "in").iterdir())
           for r in map(json.loads, p.read_text().splitlines())}
    assert sorted((g["id"], g["sample_index"]) for g in got) == [(i, k) for i in range(7) for k in range(4)]
    for g in got:
        s = src[g["id"]]
        assert (g["answer"], g["task"]) == (s["answer"], s["task"])  # kept columns, unchanged, on every sample
        if g["id"] == 6:
            assert g["finish_reason"] == "error" and g["error"] == "messages is an empty list"
        else:
            assert g["prompt"] == s["messages"][0]["content"] and g["finish_reason"] in ("stop", "length")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["totals"]["rows"] == 7 and summary["too_many_errors"] == line and summary["complete"]
    r = CliRunner().invoke(main, ["status", str(tmp_path / "out")])  # verifies every JSONL shard's checksum
    assert r.exit_code == 1 and "4/4 shards committed, 0 pending, 0 failed, 0 damaged" in r.output, r.output
    assert f"too many errors: {line}" in r.output and "incomplete: too many error rows" in r.output
    r = CliRunner().invoke(main, [*run, "--set", "workers.max_error_rate=0.2"])
    assert r.exit_code == 0 and "nothing to run" in r.output, r.output  # same shards, a new verdict
