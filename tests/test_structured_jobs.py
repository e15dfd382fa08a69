"""A job-level constraint (decode.structured_outputs) through a real local Ray job on Parquet files."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastdllm
from fastdllm import StructuredOutputs, tiny_kit
from fastdllm.jobs import InvalidJob, parse_manifest, run_job
from .conftest import own_local_ray

DECODE = {"gen_length": 16, "block_length": 8, "steps": 16, "rule": "threshold", "cache": "dual"}


def manifest(tmp_path, structured) -> dict:
    return {"name": "s", "model": {"source": "tiny"},
            "input": {"uri": str(tmp_path / "in.parquet"), "id_column": "id", "rows_per_shard": 4},
            "output": {"uri": str(tmp_path / "out")},
            "decode": {**DECODE, "structured_outputs": structured}, "workers": {"count": 1, "batch_size": 4}}


def test_manifest_constraint_is_validated_and_part_of_the_identity(tmp_path):
    m = parse_manifest(manifest(tmp_path, {"choice": ["yes", "no"]}))
    assert m.decode.structured_outputs == StructuredOutputs(choice=["yes", "no"])
    assert m.decode.model_dump()["structured_outputs"] == {"choice": ["yes", "no"]}
    free = dict(manifest(tmp_path, None))
    free["decode"] = DECODE
    assert "structured_outputs" not in parse_manifest(free).decode.model_dump()  # old jobs keep their identity
    for bad, match in [({"regex": "[0-9"}, "regex is not usable"), ({"regexp": "a"}, "unknown key"),
                       ({"regex": "a", "choice": ["a"]}, "exactly one")]:
        with pytest.raises(InvalidJob, match=match):
            parse_manifest(manifest(tmp_path, bad))


def test_job_outputs_follow_the_constraint(tmp_path):
    prompts = [f"{a}+{b}=" for a, b in [(12, 30), (7, 8), (305, 99), (41, 1), (999, 1), (60, 6)]]
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), tmp_path / "in.parquet")
    schema = {"type": "object", "properties": {"sum": {"type": "integer", "maximum": 99999}}, "required": ["sum"]}
    per_row = [json.dumps({"regex": "[0-9]+"}), json.dumps({"choice": ["yes", "no"]}), None,
               json.dumps({"regex": "[0-9"}), json.dumps({"json": schema}), "{not json"]
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts, "c": per_row}),
                   tmp_path / "cols.parquet")
    by_column = manifest(tmp_path, {"column": "c"})
    by_column["input"]["uri"], by_column["output"]["uri"] = str(tmp_path / "cols.parquet"), str(tmp_path / "out2")
    with own_local_ray() as address:
        assert run_job(parse_manifest(manifest(tmp_path, {"json": schema})), address=address).ok
        run_job(parse_manifest(by_column), address=address)

    def rows(out):
        return sorted((r for p in (tmp_path / out / "shards").glob("*.parquet") for r in pq.read_table(p).to_pylist()),
                      key=lambda r: r["id"])

    job = rows("out")
    assert [r["id"] for r in job] == list(range(len(prompts)))
    assert all(r["finish_reason"] == "stop" and re.fullmatch(r'\{"sum":(0|[1-9][0-9]*)\}', r["completion"])
               for r in job), job
    assert all(json.loads(r["completion"])["sum"] <= 99999 for r in job)
    col = rows("out2")
    assert re.fullmatch("[0-9]+", col[0]["completion"]) and col[1]["completion"] in ("yes", "no")
    model, tok = fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")  # a null constraint: a free row
    free = fastdllm.generate(model, [tok.encode(prompts[2])], fastdllm.DecodeConfig(**DECODE))
    assert col[2]["error"] is None and col[2]["completion_ids"] == free.tokens[0]
    assert "regex is not usable" in col[3]["error"] and col[3]["finish_reason"] == "error"
    assert json.loads(col[4]["completion"]).keys() == {"sum"}
    assert "structured_outputs column 'c'" in col[5]["error"]


def test_worker_takes_each_rows_constraint_from_its_column(tmp_path):
    """The shard worker alone (as the Ray actor runs it): per-row constraints, a null one decodes free, bad ones
    become error rows and the rest of the shard goes on."""
    from fastdllm.workers.shard import Shard, ShardWorker, WorkerSettings

    prompts = ["12+30=", "7+8=", "41+1=", "305+99=", "sort:9182="]
    per_row = [json.dumps({"regex": "[0-9]+"}), json.dumps({"choice": ["yes", "no"]}), None,
               json.dumps({"json": {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}}),
               json.dumps({"grammar": "start: ("})]
    pq.write_table(pa.table({"prompt": prompts, "c": per_row}), tmp_path / "p.parquet")
    decode = fastdllm.DecodeConfig(**DECODE)
    w = ShardWorker(WorkerSettings(model_source="tiny", decode=decode, output_uri=str(tmp_path / "out"),
                                   batch_size=3, structured_column="c"))
    w.run_shard(Shard(index=0, file=str(tmp_path / "p.parquet"), relpath="p.parquet", start=0, stop=len(prompts)))
    rows = pq.read_table(next((tmp_path / "out" / "shards").glob("*.parquet"))).to_pylist()
    assert re.fullmatch("[0-9]+", rows[0]["completion"]) and rows[1]["completion"] in ("yes", "no")
    model, tok = fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")
    assert rows[2]["completion_ids"] == fastdllm.generate(model, [tok.encode(prompts[2])], decode).tokens[0]
    assert json.loads(rows[3]["completion"]) in ({"n": 1}, {"n": 2})
    assert rows[4]["finish_reason"] == "error" and "grammar is not usable" in rows[4]["error"]
    assert all(r["error"] is None for r in rows[:4])


@pytest.mark.slow  # ~15 s of run-batch on Ray; the line -> constraint mapping is in CI through tests/test_structured.py
def test_run_batch_lines_with_constraints(tmp_path):
    """`fastdllm run-batch` on OpenAI batch lines asking for regex, choice, JSON schema and JSON object outputs:
    every finished answer is valid for its line's constraint; a bad constraint is its line's error."""
    from click.testing import CliRunner
    from openai.types.chat import ChatCompletion

    from fastdllm.jobs.cli import main

    def chat(cid, content, **body):
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], **body}}

    schema = {"type": "object", "properties": {"sum": {"type": "integer", "maximum": 99999}}, "required": ["sum"]}
    adds = [f"{a}+{b}=" for a, b in [(12, 34), (250, 117), (7, 8), (906, 45), (3333, 4444), (18, 9)]]
    lines = ([chat(f"re-{i}", p, structured_outputs={"regex": "[0-9]+"}) for i, p in enumerate(adds)]
             + [chat(f"ch-{i}", p, guided_choice=["yes", "no"]) for i, p in enumerate(adds[:3])]
             + [chat(f"js-{i}", p,
                     response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
                for i, p in enumerate(adds[:3])]
             + [chat("bad", "1+1=", structured_outputs={"regex": "[0-9"})])
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    with own_local_ray() as address:
        r = CliRunner().invoke(main, ["run-batch", "-i", str(src), "-o", str(out), "--model", "tiny",
                                      "--address", address, "--batch-size", "4", "--rows-per-shard", "8"])
    assert r.exit_code == 0, r.output
    by_id = {a["custom_id"]: a for a in map(json.loads, out.read_text().splitlines())}
    assert by_id["bad"]["error"] and "regex is not usable" in by_id["bad"]["error"]["message"]
    finished = 0
    for cid, a in by_id.items():
        if cid == "bad":
            continue
        choice = ChatCompletion.model_validate(a["response"]["body"]).choices[0]
        if choice.finish_reason != "stop":
            continue
        finished += 1
        text = choice.message.content
        if cid.startswith("re-"):
            assert re.fullmatch("[0-9]+", text), (cid, text)
        elif cid.startswith("ch-"):
            assert text in ("yes", "no"), (cid, text)
        else:
            assert json.loads(text)["sum"] <= 99999 and set(json.loads(text)) == {"sum"}, (cid, text)
    assert finished >= 0.9 * (len(lines) - 1)
    texts = [by_id[f"re-{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in range(len(adds))]
    assert sum(tiny_kit.score(adds, texts)) >= 0.9 * len(adds), texts
