"""The ids' output column (issue 21): it keeps the input id column's name, or output.id_name; derived ids go
under `id`; a name that collides with a generated or kept column is refused at plan time in one line; the name is
part of the job's identity (a rerun with another one is refused). Shards run on the shared tiny worker, without
Ray, from the settings the driver sends (jobs.runner.job_spec)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fastdllm.jobs import parse_manifest
from fastdllm.jobs.cli import main
from fastdllm.jobs.manifest import InvalidJob
from fastdllm.jobs.plan import make_plan
from fastdllm.jobs.runner import job_spec, prepare_output
from fastdllm.workers import InputReader, JobOutput

from .test_rows import DECODE

ROWS = [{"qid": "007", "prompt": "1+2=", "answer": "07"},
        {"qid": "0008", "prompt": "3+4=", "answer": "023333456677999"},
        {"qid": "é\u2028ü", "prompt": "sort:21=", "answer": ""}]
QIDS = [r["qid"] for r in ROWS]


def spec(tmp_path, **over) -> dict:
    m = {"name": "ids", "model": {"source": "tiny"},
         "input": {"uri": str(tmp_path / "in" / "a.jsonl"), "id_column": "qid", "rows_per_shard": 2},
         "output": {"uri": str(tmp_path / "out")}, "decode": dict(DECODE), "workers": {"count": 1, "batch_size": 3}}
    for k, v in over.items():
        m[k] = {**m[k], **v}
    return m


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "in" / "a.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return p


def run(worker, raw: dict) -> JobOutput:
    """Prepare the output (job.json, dataset card) as a run does and decode every planned shard on `worker`."""
    m = parse_manifest(raw)
    plan = make_plan(m)
    out = JobOutput(m.output.uri, ext=m.output.format)
    prepare_output(out, m, plan, force=False)
    s = job_spec(m, plan)
    saved = worker.s, worker.reader, worker.out
    worker.s, worker.out = s, JobOutput(s.output.uri, ext=s.output.format)
    worker.reader = InputReader(s.source, string_columns=(s.input.text_column,), column_types=s.input.column_types)
    try:
        for shard in plan.shards:
            worker.run_shard(shard)
    finally:
        worker.s, worker.reader, worker.out = saved
    return out


def shard_rows(out: JobOutput) -> list[dict]:
    rows = []
    for k in range(2):
        path = f"{out.root}/shards/{k:05d}.{out.ext}"
        if out.ext == "jsonl":
            with open(path, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f]
        else:
            rows += pq.read_table(path).to_pylist()
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_id_column_keeps_its_input_name(tmp_path, worker, data, fmt):
    import datasets

    out = run(worker, spec(tmp_path, input={"keep_columns": "all"}, output={"format": fmt}))
    rows = shard_rows(out)
    assert list(rows[0]) == ["qid", "sample_index", "prompt", "completion", "completion_ids", "n_tokens", "nfe",
                             "finish_reason", "error", "answer"]  # `all` keeps the id column once, as `qid`
    assert [r["qid"] for r in rows] == QIDS and [r["answer"] for r in rows] == [r["answer"] for r in ROWS]
    # a cache of its own: datasets 5.2 keys the cache of a directory whose card names its data files by the
    # directory's base name, so another test's `out` could be read back from ~/.cache
    ds = datasets.load_dataset(out.root, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.column_names[0] == "qid" and "id" not in ds.column_names
    assert sorted(ds["qid"]) == sorted(QIDS)
    assert "Columns: `qid` (the row ids)" in (tmp_path / "out" / "README.md").read_text()


def test_output_id_name_renames_and_derived_ids_stay_under_id(tmp_path, worker, data):
    out = run(worker, spec(tmp_path, output={"id_name": "uid"}, input={"keep_columns": ["qid"]}))
    rows = shard_rows(out)
    assert list(rows[0])[0] == "uid" and "id" not in rows[0]
    assert [r["uid"] for r in rows] == QIDS and [r["qid"] for r in rows] == QIDS  # kept as well, asked for
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["identity"]["output"] == {"format": "parquet", "id_name": "uid"}

    derived = spec(tmp_path, input={"id_column": None}, output={"uri": str(tmp_path / "derived")})
    rows = shard_rows(run(worker, derived))
    assert list(rows[0])[0] == "id" and "qid" not in rows[0]
    assert [r["id"] for r in rows] == ["a.jsonl:0", "a.jsonl:1", "a.jsonl:2"]


def exit2(tmp_path, raw: dict) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True))
    r = CliRunner().invoke(main, ["plan", str(p)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def test_id_name_collisions_are_refused_in_one_line(tmp_path, data):
    out = exit2(tmp_path, spec(tmp_path, output={"id_name": "completion"}))
    assert "output.id_name 'completion' is the name of a generated output column" in out
    assert "set output.id_name to another name" in out
    out = exit2(tmp_path, spec(tmp_path, output={"id_name": "answer"}, input={"keep_columns": ["answer"]}))
    assert "input.keep_columns keeps a column 'answer', but the ids go into the output column of that name" in out
    assert "leave 'answer' out of keep_columns" in out
    # derived ids and an input column `id` kept: the hint says how to use it as the ids instead
    rows = [{"id": i, **r} for i, r in enumerate(ROWS)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = exit2(tmp_path, spec(tmp_path, input={"id_column": None, "keep_columns": "all"}))
    assert "the derived ids (<file>:<row>) go into the output column of that name" in out
    assert "set input.id_column: id to use that column as the ids" in out
    ok = make_plan(parse_manifest(spec(tmp_path, input={"id_column": "qid", "keep_columns": "all"})))
    assert ok.keep_columns == ["id", "answer"]  # an input column `id` is no clash when the ids are `qid`
    with pytest.raises(InvalidJob, match="output.id_name: String should have at least 1 character"):
        parse_manifest(spec(tmp_path, output={"id_name": ""}))


def test_generated_name_as_id_column_is_refused(tmp_path, data):
    rows = [{"error": r["qid"], "prompt": r["prompt"]} for r in ROWS]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = exit2(tmp_path, spec(tmp_path, input={"id_column": "error"}))
    assert "input.id_column 'error' (the ids keep its name unless output.id_name is set) is the name of a " \
           "generated output column" in out
    assert make_plan(parse_manifest(spec(tmp_path, input={"id_column": "error"}, output={"id_name": "eid"})))


def test_rerun_with_another_id_name_is_refused(tmp_path, worker, data):
    run(worker, spec(tmp_path))
    m = parse_manifest(spec(tmp_path, output={"id_name": "uid"}))
    out = JobOutput(m.output.uri)
    with pytest.raises(InvalidJob, match=r"output config changed \(id_name: 'qid' -> 'uid'\)"):
        prepare_output(out, m, make_plan(m), force=False)
    same = parse_manifest(spec(tmp_path, output={"id_name": "qid"}))  # the name it had: the same job
    prepare_output(out, same, make_plan(same), force=False)
    assert out.scan(make_plan(same).shard_rows).committed.keys() == {0, 1}


def test_outputs_written_before_id_name_resume(tmp_path, worker, data):
    """A job.json without identity.output.id_name had its ids in `id`: derived ids resume, a named id column
    (now written under its own name) is refused as a changed output."""
    raw = spec(tmp_path, input={"id_column": None})
    run(worker, raw)
    job_json = tmp_path / "out" / "job.json"
    job = json.loads(job_json.read_text())
    del job["identity"]["output"]["id_name"]
    job_json.write_text(json.dumps(job))
    m = parse_manifest(raw)
    prepare_output(JobOutput(m.output.uri), m, make_plan(m), force=False)
    job = json.loads(job_json.read_text())
    del job["identity"]["output"]["id_name"]
    job["manifest"]["input"]["id_column"] = "qid"
    job_json.write_text(json.dumps(job))
    m = parse_manifest(spec(tmp_path))
    with pytest.raises(InvalidJob, match=r"id_name: 'id' -> 'qid'"):
        prepare_output(JobOutput(m.output.uri), m, make_plan(m), force=False)


def test_openai_batch_output_refuses_id_name(tmp_path):
    p = tmp_path / "in" / "batch.jsonl"
    p.parent.mkdir()
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "1+2="}}
    p.write_text(json.dumps(line) + "\n")
    raw = spec(tmp_path, input={"uri": str(p), "id_column": None}, output={"format": "openai", "id_name": "x"})
    assert "output.id_name does not apply to OpenAI batch answers" in exit2(tmp_path, raw)
