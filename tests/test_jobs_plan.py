"""Manifests, shard planning, exit-2 validation and the worker on its own: no Ray here."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fastdllm.jobs.cli import main
from fastdllm.jobs.manifest import InvalidJob, parse_manifest
from fastdllm.jobs.plan import make_plan
from fastdllm.workers import Shard, ShardStats, WorkerSettings
from fastdllm.workers.inputs import read_shard_rows
from fastdllm.workers.storage import expand_env, redact

ROOT = Path(__file__).resolve().parent.parent
DECODE = {"gen_length": 8, "block_length": 4, "steps": 8}


def write_parquet(path, prompts, ids=None, row_group_size=None):
    cols = {"prompt": pa.array(prompts, pa.string())}
    if ids is not None:
        cols["id"] = ids
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def manifest(tmp_path, **over) -> dict:
    m = {"name": "t", "model": {"source": "tiny"},
         "input": {"uri": str(tmp_path / "in"), "prompt_column": "prompt", "rows_per_shard": 4},
         "output": {"uri": str(tmp_path / "out")}, "decode": dict(DECODE), "workers": {"count": 1, "batch_size": 4}}
    for k, v in over.items():
        m[k] = {**m[k], **v} if isinstance(v, dict) and isinstance(m.get(k), dict) else v
    return m


def write_manifest(tmp_path, m) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(m))
    return str(p)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_manifest_messages_name_the_field(tmp_path):
    with pytest.raises(InvalidJob) as e:
        parse_manifest(manifest(tmp_path, input={"colour": "red"}))
    assert "unknown key 'input.colour'" in str(e.value) and "prompt_column" in str(e.value)
    with pytest.raises(InvalidJob, match="decode: block_length"):
        parse_manifest(manifest(tmp_path, decode={"gen_length": 8, "block_length": 3}))
    with pytest.raises(InvalidJob, match="workers.batch_size"):
        parse_manifest(manifest(tmp_path, workers={"batch_size": 0}))
    m = parse_manifest(manifest(tmp_path), ["decode.threshold=0.5", "workers.count=3", "name=x"])
    assert (m.decode.config.threshold, m.workers.count, m.name, m.decode.config.cache) == (0.5, 3, "x", "dual")


def test_storage_options_expand_env_and_redact(monkeypatch):
    monkeypatch.setenv("FDL_TEST_SECRET", "s3cr3t")
    opts = {"endpoint_url": "http://127.0.0.1:1", "secret": "${FDL_TEST_SECRET}", "key": "inline-key"}
    assert expand_env(opts)["secret"] == "s3cr3t"
    shown, hidden = redact(opts)
    assert shown == {"endpoint_url": "http://127.0.0.1:1", "secret": "${FDL_TEST_SECRET}", "key": "<redacted>"}
    assert hidden == ["storage_options.key"]
    with pytest.raises(ValueError, match=r"storage_options.x references \$\{FDL_UNSET_VAR\}"):
        expand_env({"x": "${FDL_UNSET_VAR}"})


def test_plan_is_deterministic_and_derives_ids(tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", [f"{i}+1=" for i in range(10)])
    write_parquet(tmp_path / "in" / "sub" / "b.parquet", ["sort:321="] * 3)
    m = parse_manifest(manifest(tmp_path))
    p1, p2 = make_plan(m), make_plan(m)
    assert p1.to_dict() == p2.to_dict()
    assert [(s.relpath, s.start, s.stop) for s in p1.shards] == [
        ("a.parquet", 0, 4), ("a.parquet", 4, 8), ("a.parquet", 8, 10), ("sub/b.parquet", 0, 3)]
    assert p1.rows == 13
    write_parquet(tmp_path / "in" / "sub" / "b.parquet", ["sort:321="] * 4)
    assert make_plan(m).fingerprint != p1.fingerprint


def test_plan_command_writes_nothing(tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", ["1+1="] * 9)
    r = cli("plan", write_manifest(tmp_path, manifest(tmp_path)))
    assert r.exit_code == 0, r.output
    assert "3 shards, 9 prompts x 1 samples = 9 output rows, 1 files" in r.output
    assert not (tmp_path / "out").exists()


def test_read_shard_rows_reads_across_row_groups(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", [str(i) for i in range(20)], row_group_size=3)
    t = read_shard_rows(Shard(index=0, file=str(path), relpath="a.parquet", start=5, stop=12), ["prompt"])
    assert t.column("prompt").to_pylist() == [str(i) for i in range(5, 12)]


def _exit2(tmp_path, m, *extra):
    r = cli("run", write_manifest(tmp_path, m), *extra)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()
    return r.output


def test_exit2_input_problems(tmp_path):
    assert "does not exist" in _exit2(tmp_path, manifest(tmp_path))
    assert "matched no files" in _exit2(tmp_path, manifest(tmp_path, input={"uri": str(tmp_path / "in/*.parquet")}))
    (tmp_path / "in").mkdir()
    assert "no Parquet, JSONL or CSV files" in _exit2(tmp_path, manifest(tmp_path))
    (tmp_path / "in" / "bad.parquet").write_bytes(b"this is not parquet at all")
    assert "not a Parquet file" in _exit2(tmp_path, manifest(tmp_path))
    (tmp_path / "in" / "bad.parquet").write_bytes(b"PAR1" + b"\x00" * 40 + b"\x10\x00\x00\x00PAR1")
    assert "not valid Parquet" in _exit2(tmp_path, manifest(tmp_path))
    (tmp_path / "in" / "bad.parquet").unlink()
    write_parquet(tmp_path / "in" / "a.parquet", ["1+1=", "2+2="], ids=[1, 2])
    out = _exit2(tmp_path, manifest(tmp_path, input={"prompt_column": "text"}))
    assert "has no column 'text'" in out and "columns: prompt, id" in out and "a.parquet" in out
    assert "has no column 'row'" in _exit2(tmp_path, manifest(tmp_path, input={"id_column": "row"}))
    write_parquet(tmp_path / "in" / "b.parquet", ["3+3="], ids=[2])
    out = _exit2(tmp_path, manifest(tmp_path, input={"id_column": "id"}))
    assert "duplicate ids" in out and "2" in out and "b.parquet" in out


def test_exit2_manifest_model_and_output_problems(tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", ["1+1="])
    assert "unknown key 'decode_settings'" in _exit2(tmp_path, {**manifest(tmp_path), "decode_settings": {}})
    assert "model.source" in _exit2(tmp_path, manifest(tmp_path, model={"source": "no-such-model"}))
    assert "model.source" in _exit2(tmp_path, manifest(tmp_path, model={"source": str(tmp_path / "in")}))
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((ROOT / "fastdllm" / "tiny" / f).read_bytes())
    assert "no tokenizer files" in _exit2(tmp_path, manifest(tmp_path, model={"source": str(notok)}))
    assert "block_length (3) must divide" in _exit2(tmp_path, manifest(tmp_path), "--set", "decode.block_length=3")
    assert "threshold must be in (0, 1]" in _exit2(tmp_path, manifest(tmp_path), "--set", "decode.threshold=2")
    assert "unknown decode setting" in _exit2(tmp_path, manifest(tmp_path), "--set", "decode.speed=9")
    (tmp_path / "afile").write_text("x")
    out = _exit2(tmp_path, manifest(tmp_path, output={"uri": str(tmp_path / "afile" / "out")}))
    assert "not writable" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    r = cli("run", bad)
    assert r.exit_code == 2 and "not valid YAML" in r.output


def test_worker_bad_rows_get_errors_and_the_rest_decodes(tmp_path, worker):
    too_long = "1" * 600  # the tiny model has 512 positions
    prompts = ["12+34=", None, "", too_long, "sort:321=", "   ", "7+8="]
    path = write_parquet(tmp_path / "p.parquet", prompts)
    stats = worker.run_shard(Shard(index=7, file=str(path), relpath="p.parquet", start=0, stop=len(prompts)))
    t = pq.read_table(f"{worker.out.root}/shards/00007.parquet").to_pylist()
    assert [r["id"] for r in t] == [f"p.parquet:{i}" for i in range(len(prompts))]
    errors = {i: r["error"] for i, r in enumerate(t) if r["finish_reason"] == "error"}
    assert set(errors) == {1, 2, 3, 5}
    assert "null" in errors[1] and "empty" in errors[2] and "600 tokens" in errors[3]
    for i in (0, 4, 6):
        r = t[i]
        assert r["error"] is None and r["finish_reason"] in ("stop", "length")
        assert r["n_tokens"] == len(r["completion_ids"]) <= 8 and r["nfe"] > 0 and isinstance(r["completion"], str)
        assert r["prompt"] == prompts[i]
    saved = json.loads(open(f"{worker.out.root}/stats/00007.json").read())
    assert saved == stats.to_dict()
    assert stats.stats.rows == 7 and stats.stats.error_rows == 4 and saved["shard"] == 7
    assert stats.stats.generated_tokens == sum(r["n_tokens"] for r in t)
    for k in ("wall_seconds", "tokens_per_second", "worker", "device", "started_at", "finished_at", "nfe"):
        assert k in saved


def test_worker_output_does_not_depend_on_batch_size(tmp_path, worker):
    prompts = [f"{i}+{i * 7}=" for i in range(5)] + ["sort:9182=", "sort:55="]
    path = write_parquet(tmp_path / "p.parquet", prompts, ids=pa.array(range(100, 107), pa.int64()))
    saved = worker.s
    try:
        outs = []
        for bs in (1, 4):
            worker.s = WorkerSettings(saved, id_column="id", batch_size=bs)
            worker.run_shard(Shard(index=bs, file=str(path), relpath="p.parquet", start=0, stop=7))
            outs.append(pq.read_table(f"{worker.out.root}/shards/{bs:05d}.parquet").to_pylist())
    finally:
        worker.s = saved
    assert outs[0] == outs[1]
    assert [r["id"] for r in outs[0]] == list(range(100, 107))


def test_shard_stats_add_up():
    a = ShardStats(shards=1, rows=4, generated_tokens=30, wall_seconds=1.5)
    b = ShardStats(shards=1, rows=2, error_rows=1, generated_tokens=10, wall_seconds=0.5)
    s = sum([a, b], ShardStats())
    assert (s.shards, s.rows, s.error_rows, s.generated_tokens, s.wall_seconds) == (2, 6, 1, 40, 2.0)
    assert s.tokens_per_second == 20.0
    assert ShardStats.from_dict(s.to_dict()) == s
