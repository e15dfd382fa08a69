"""The one job spec (workers/spec.py): frozen, made from the manifest and the plan; one identity() for job.json, the
resume check and the shard markers; job.json read back into the manifest model (older ones too); plan --schema."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

import fastdllm
from fastdllm.jobs.cli import main
from fastdllm.jobs.manifest import InvalidJob, Manifest, parse_manifest
from fastdllm.jobs.plan import make_plan
from fastdllm.jobs.runner import absolute_uris, job_spec, prepare_output
from fastdllm.jobs.status import job_status
from fastdllm.workers import JobOutput
from fastdllm.workers.spec import manifest_schema, recorded_manifest

DECODE = {"gen_length": 8, "block_length": 4, "steps": 8, "threshold": 0.7}


def _job(tmp_path, **decode):
    (tmp_path / "in").mkdir(exist_ok=True)
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2=", "3+3="]}), tmp_path / "in" / "a.parquet")
    m = absolute_uris(parse_manifest({"model": {"source": "tiny"}, "input": {"uri": str(tmp_path / "in")},
                                      "output": {"uri": str(tmp_path / "out")}, "decode": {**DECODE, **decode}}))
    return m, make_plan(m)


def test_the_spec_is_frozen_and_carries_the_manifest_sections_and_the_plan(tmp_path):
    m, plan = _job(tmp_path)
    spec = job_spec(m, plan, "run-1")
    assert (spec.model, spec.input, spec.decode, spec.workers) == (m.model, m.input, m.decode, m.workers)
    assert (spec.source, spec.keep_columns, spec.run_id) == (plan.source, tuple(plan.keep_columns), "run-1")
    with pytest.raises(ValidationError):
        spec.run_id = "other"
    assert spec.identity() == m.identity()


def test_an_output_written_in_the_previous_format_resumes_and_a_changed_config_is_refused(tmp_path):
    m, plan = _job(tmp_path)
    out = JobOutput(m.output.uri)
    # job.json as the driver wrote it before the spec: identity picked from the manifest field by field
    old_identity = {"model": {k: getattr(m.model, k) for k in ("source", "revision", "dtype", "chat_template",
                                                               "system_prompt")},
                    "decode": {**m.decode.config.to_dict(), "num_samples": m.decode.num_samples},
                    "output": {"format": m.output.format}}
    out.write_job({"name": m.name, "manifest": m.model_dump(), "identity": old_identity, "plan": plan.to_dict(),
                   "versions": {}, "created_at": "2026-01-01T00:00:00Z"})
    prepare_output(out, m, plan, force=False)  # the same job: accepted
    assert out.read_job()["created_at"] == "2026-01-01T00:00:00Z"
    # rewritten in today's format: the same keys, plus output.id_name (the ids were in `id` before it existed)
    assert out.read_job()["identity"] == {**old_identity, "output": {"format": "parquet", "id_name": "id"}}
    m2, plan2 = _job(tmp_path, threshold=0.5)
    with pytest.raises(InvalidJob, match=r"decode config changed \(threshold: 0.7 -> 0.5\)"):
        prepare_output(out, m2, plan2, force=False)


def test_job_json_reads_back_into_the_manifest_and_an_unknown_old_field_falls_back(tmp_path):
    m, plan = _job(tmp_path, temperature=0.5, num_samples=2)
    record = json.loads(json.dumps(m.model_dump()))
    assert Manifest.from_record(record) == m
    record["workers"]["max_error_rate"] = 0.25
    record["workers"]["retired_knob"] = 3  # a field an older version wrote and this one no longer has
    record["decode"]["retired_decode_knob"] = 1
    dropped = []
    back = Manifest.from_record(record, dropped)
    assert back.workers.max_error_rate == 0.25 and back.decode.num_samples == 2
    assert sorted(dropped) == ["decode.retired_decode_knob", "workers.retired_knob"]
    del record["output"]
    with pytest.raises(ValidationError):
        Manifest.from_record(record)
    # status parses the same model: an old job.json with the retired field still reads
    out = JobOutput(m.output.uri)
    record["output"] = {"uri": m.output.uri, "format": "parquet"}
    out.write_job({"name": "t", "manifest": record, "identity": m.identity(), "plan": plan.to_dict()})
    st = job_status(m.output.uri)
    assert (st.num_samples, st.max_error_rate, st.shards) == (2, 0.25, len(plan.shards))
    assert recorded_manifest(out.read_job()).decode.config.temperature == 0.5


def test_decode_fields_are_checked_once_in_decode_config():
    with pytest.raises(ValueError, match="^threshold must be a number, got 'x'$"):
        fastdllm.DecodeConfig(threshold="x")
    with pytest.raises(ValueError, match="^stop_at_eos must be true or false, got 1$"):
        fastdllm.DecodeConfig(stop_at_eos=1)
    with pytest.raises(InvalidJob, match="decode.factor must be a number, got 'big'"):
        parse_manifest({"model": {"source": "tiny"}, "input": {"uri": "x"}, "output": {"uri": "y"},
                        "decode": {"factor": "big"}})


def test_plan_schema_lists_every_manifest_and_decode_field_with_its_description():
    rows = {r["name"]: r for r in manifest_schema()}
    for f in dataclasses.fields(fastdllm.DecodeConfig):
        assert rows[f"decode.{f.name}"]["description"] == f.metadata["description"] != ""
        assert rows[f"decode.{f.name}"]["default"] == (list(f.default) if isinstance(f.default, tuple) else f.default)
    expected = []

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            sub = f.annotation
            if isinstance(sub, type) and issubclass(sub, fastdllm.workers.spec.BaseModel):
                if sub is not fastdllm.workers.spec.DecodeSpec:
                    walk(sub, f"{prefix}{name}.")
                continue
            expected.append((prefix + name, f.description))

    walk(Manifest, "")
    expected += [("decode.num_samples", None), ("decode.structured_outputs", None)]
    for name, description in expected:
        assert rows[name]["description"] and rows[name]["description"] == (description or rows[name]["description"])
    r = CliRunner().invoke(main, ["plan", "--schema"])
    assert r.exit_code == 0, r.output
    for name, row in rows.items():
        assert f"{name}: {row['type']}" in r.output and row["description"] in r.output
    assert "model.source: str, required" in r.output and 'decode.threshold: float, default 0.9' in r.output
    as_json = json.loads(CliRunner().invoke(main, ["plan", "--schema", "--json"]).output)
    assert [x["name"] for x in as_json] == list(rows)
    r = CliRunner().invoke(main, ["plan"])
    assert r.exit_code == 2 and "--schema" in r.output
