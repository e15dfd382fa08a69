"""OpenAI Batch API files in and out: request lines parsed and refused per line, answers validated with the
official `openai` package's types, per-line settings decoded exactly as the engine decodes the same Request alone,
and `fastdllm run-batch` on a real local Ray (a rerun, resume, a killed driver) and on an S3-compatible server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from openai.types import Completion
from openai.types.chat import ChatCompletion

import fastdllm
from fastdllm.jobs import InvalidJob
from fastdllm.jobs.batch import batch_manifest
from fastdllm.jobs.cli import main
from fastdllm.jobs.plan import make_plan
from fastdllm.jobs.runner import absolute_uris, job_spec
from fastdllm import tiny_kit
from fastdllm.tiny_kit import answer_for
from fastdllm.workers import ShardStats, ShardWorker, seed_id
from fastdllm.workers.openai_batch import LineError, batch_table, parse_request

from .conftest import own_local_ray

ROOT = Path(__file__).resolve().parent.parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "fdl-test-key", "AWS_SECRET_ACCESS_KEY": "fdl-test-secret-value",
          "AWS_DEFAULT_REGION": "us-east-1"}
ADDITIONS = ["12+34=", "250+117=", "7+8=", "906+45="]


def chat(cid, content, **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], **body}}


def text(cid, prompt, **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": prompt, **body}}


def mixed_lines() -> list:
    """Chat and completions lines with per-line settings, and bad lines (str: written as they are)."""
    return [
        chat("c-add-0", ADDITIONS[0]),  # gen_length 32 (the job's): room for the answer
        text("t-add-1", ADDITIONS[1], max_tokens=32),
        chat("c-add-2", ADDITIONS[2], max_completion_tokens=32, temperature=0),
        text("t-short", "sort:9371524=", max_tokens=3),  # cut at 3 tokens: "length"
        chat("c-stop", "sort:3141592=", stop="5"),
        text("t-stops", "sort:86420=", stop=["6", "8"]),
        chat("c-n", ADDITIONS[3], n=3, temperature=0.9, seed=7, max_tokens=16),
        chat("bad-stream", "1+1=", stream=True),
        chat("bad-tools", "1+1=", tools=[{"type": "function", "function": {"name": "f"}}]),
        chat("bad-format", "1+1=", response_format={"type": "xml"}),
        text("bad-top-p", "1+1=", top_p=0.5),
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        "this line is not JSON",
        text("t-ids", tiny_kit.encode("40+2="), max_tokens=8),
    ]


def write_batch(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def check_answers(requests: list, answers: list[dict]) -> dict[str, dict]:
    """Every answer line in order, its body valid for the openai types, ids and settings respected; returns the
    answers by custom_id."""
    assert len(answers) == len(requests)
    for req, a in zip(requests, answers):
        assert set(a) == {"id", "custom_id", "response", "error"}
        if isinstance(req, str):
            assert a["custom_id"] is None and a["response"] is None and a["error"]["code"] == "invalid_json"
            continue
        assert a["custom_id"] == req["custom_id"]
        if a["custom_id"].startswith("bad-"):
            assert a["response"] is None and set(a["error"]) == {"code", "message"}
            continue
        assert a["error"] is None and a["response"]["status_code"] == 200
        body, want = a["response"]["body"], req["body"]
        typed = (ChatCompletion if req["url"] == "/v1/chat/completions" else Completion).model_validate(body)
        n = want.get("n", 1)
        assert [c.index for c in typed.choices] == list(range(n))
        limit = want.get("max_tokens", want.get("max_completion_tokens"))
        n_tokens = body["fastdllm"]["n_tokens"]
        assert typed.usage.completion_tokens == sum(n_tokens)
        assert typed.usage.total_tokens == typed.usage.prompt_tokens + typed.usage.completion_tokens > 0
        stops = [want["stop"]] if isinstance(want.get("stop"), str) else want.get("stop", [])
        for c, k in zip(typed.choices, n_tokens):
            out = c.message.content if req["url"] == "/v1/chat/completions" else c.text
            assert c.finish_reason in ("stop", "length")
            if limit is not None:
                assert k <= limit
            assert not any(s in out for s in stops)
    return {a["custom_id"]: a for a in answers if a["custom_id"]}


def content(answer: dict, k: int = 0) -> str:
    c = answer["response"]["body"]["choices"][k]
    return c["message"]["content"] if "message" in c else c["text"]


# -- parsing -----------------------------------------------------------------------------------------------------

def test_request_lines_map_to_settings_or_name_the_field_they_cannot_honour():
    req = parse_request(json.dumps(chat("a", "1+2=", max_completion_tokens=5, temperature=0.5, n=2, seed=3,
                                        stop=["x"], top_p=1, stream=False, user="u", logprobs=None)), "a")
    assert (req.kind, req.max_tokens, req.temperature, req.n, req.seed, req.stop) == ("chat", 5, 0.5, 2, 3, ["x"])
    assert req.messages == [{"role": "user", "content": "1+2="}] and req.model == "tiny"
    parts = chat("p", "")
    parts["body"]["messages"][0]["content"] = [{"type": "text", "text": "1+"}, {"type": "text", "text": "2="}]
    assert parse_request(json.dumps(parts), "p").messages[0]["content"] == "1+2="
    assert parse_request(json.dumps(text("t", ["9+9="], stop="\n")), "t").prompt == "9+9="
    bad = {
        "stream": chat("x", "1", stream=True), "logprobs": chat("x", "1", logprobs=True),
        "tools": chat("x", "1", tools=[]), "top_p": text("x", "1", top_p=0.9),
        "response_format": chat("x", "1", response_format={"type": "json_schema"}),
        "frobnicate": chat("x", "1", frobnicate=1), "max_tokens": text("x", "1", max_tokens=0),
        "temperature": chat("x", "1", temperature=-1), "seed": chat("x", "1", seed=-5), "n": chat("x", "1", n=129), "stop": chat("x", "1", stop=[""]),
        "/v1/embeddings": {"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}},
        "prompt": text("x", ["a", "b"]), "messages": chat("x", "1") | {"body": {"messages": []}},
    }
    for field, line in bad.items():
        with pytest.raises(LineError, match=field):
            parse_request(json.dumps(line), "x")
    with pytest.raises(LineError, match="not valid JSON") as e:
        parse_request("{nope", None)
    assert e.value.code == "invalid_json"
    with pytest.raises(LineError, match="custom_id must be a string"):
        parse_request(json.dumps(chat(5, "1")), None)


def test_batch_table_keeps_every_non_blank_line_in_order():
    data = (json.dumps(chat("a", "1")) + "\n\n  \nnot json\n" + json.dumps(chat(7, "2")) + "\n").encode()
    data += b'{"custom_id": "b\xff"}\n'
    t = batch_table(data, "mem://x")
    assert t.column("custom_id").to_pylist() == ["a", None, None, None]
    assert t.column("request").to_pylist()[1] == "not json"
    with pytest.raises(LineError, match="not valid UTF-8 \\(byte 0xff at offset 16\\)"):
        parse_request(t.column("request")[3].as_py(), None)


# -- planning ----------------------------------------------------------------------------------------------------

def test_plan_detects_batch_files_and_refuses_duplicates_and_mismatched_formats(tmp_path):
    src = write_batch(tmp_path / "in.jsonl", [chat("a", "1+1="), "junk", text("b", "2+2=")])
    m = batch_manifest(str(src), str(tmp_path / "out.jsonl"), "tiny")
    plan = make_plan(m)
    assert plan.source.format == "openai" and plan.rows == 3
    auto = m.model_copy(update={"input": m.input.model_copy(update={"format": "auto"})})
    assert make_plan(auto).source.format == "openai"
    tabular = auto.model_copy(update={"output": m.output.model_copy(update={"format": "parquet"})})
    with pytest.raises(InvalidJob, match="set output.format: openai"):
        make_plan(tabular)
    write_batch(tmp_path / "dup.jsonl", [chat("a", "1+1="), text("b", "2"), chat("a", "3")])
    r = CliRunner().invoke(main, ["run-batch", "-i", str(tmp_path / "dup.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                                  "--model", "tiny"])
    assert r.exit_code == 2 and "duplicate custom_id 'a' (request 1 of dup.jsonl and request 3 of dup.jsonl)" in r.output
    assert not (tmp_path / "o.jsonl").exists()


# -- one worker, no Ray ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch_worker(tmp_path_factory):
    """A ShardWorker for a batch job (tiny model, gen_length 32, block 8, batch size 4) and its job's manifest."""
    tmp = tmp_path_factory.mktemp("batch")
    src = write_batch(tmp / "in.jsonl", mixed_lines())
    m = absolute_uris(batch_manifest(str(src), str(tmp / "out.jsonl"), "tiny", workers={"batch_size": 4},
                                     rows_per_shard=8))
    plan = make_plan(m)
    return ShardWorker(job_spec(m, plan)), plan, m


def test_shard_answers_validate_and_decode_as_the_engine_does_alone(batch_worker):
    worker, plan, m = batch_worker
    lines = mixed_lines()
    answers = []
    for shard in plan.shards:
        rec = worker.run_shard(shard)
        path = Path(m.output.uri) / worker.out.shard_file(shard.index)
        got = read_lines(path)
        assert rec.file.rows == len(got) == shard.rows and rec.stats.rows == shard.rows
        answers += got
    by_id = check_answers(lines, answers)
    # greedy addition lines with room for the answer (no max_tokens: the job's 32; or max_tokens 32) are right
    for cid, prompt in (("c-add-0", ADDITIONS[0]), ("t-add-1", ADDITIONS[1]), ("c-add-2", ADDITIONS[2])):
        assert content(by_id[cid]) == answer_for(prompt), (cid, by_id[cid])
    assert by_id["t-short"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert by_id["t-short"]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert len(by_id["c-n"]["response"]["body"]["choices"]) == 3
    assert [by_id[c]["error"]["code"] for c in ("bad-stream", "bad-tools", "bad-format", "bad-top-p", "bad-url")] == [
        "unsupported_parameter"] * 4 + ["unsupported_url"]
    assert "body.tools" in by_id["bad-tools"]["error"]["message"]
    assert "response_format" in by_id["bad-format"]["error"]["message"]
    # every choice is exactly what one engine gives for the same Request decoded alone
    tok = worker.tok
    for req in lines:
        if isinstance(req, str) or req["custom_id"].startswith("bad-"):
            continue
        b = req["body"]
        prompt = b["messages"][0]["content"] if "messages" in b else b["prompt"]
        ids = prompt if isinstance(prompt, list) else tok.encode_text(prompt)
        for k in range(b.get("n", 1)):
            e = fastdllm.Engine(worker.model, worker.cfg, max_batch_size=1, tokenizer=tok)
            mt = b.get("max_tokens", b.get("max_completion_tokens"))
            e.add(fastdllm.Request(ids, max_tokens=mt, temperature=b.get("temperature"), seed=b.get("seed"),
                                   stop=b.get("stop"), row_id=seed_id(req["custom_id"], k)))
            done = []
            while e.pending:
                done += e.step()
            body = by_id[req["custom_id"]]["response"]["body"]
            assert content(by_id[req["custom_id"]], k) == done[0].text, req["custom_id"]
            assert body["choices"][k]["finish_reason"] == done[0].finish_reason
            assert body["fastdllm"]["nfe"][k] == done[0].nfe
    stats = sum((worker.out.committed_record(s.index, s.rows).stats for s in plan.shards), ShardStats())
    assert stats.error_rows == 6 and sum(stats.error_reasons.values()) == 6


# -- run-batch on a real local Ray ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.update(S3_ENV)
    with own_local_ray() as address:
        yield address


def run_batch(args, address):
    return CliRunner().invoke(main, ["run-batch", *args, "--address", address, "--batch-size", "4",
                                     "--rows-per-shard", "3"])


def test_run_batch_end_to_end_rerun_resume_and_status(tmp_path, ray_cluster):
    lines = mixed_lines()
    src = write_batch(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    args = ["-i", str(src), "-o", str(out), "--model", "tiny"]
    r = run_batch(args, ray_cluster)
    assert r.exit_code == 0, r.output
    assert f"{len(lines)} answer lines, {len(lines) - 6} answered, 6 per-line errors" in r.output
    first = out.read_bytes()
    by_id = check_answers(lines, read_lines(out))
    assert content(by_id["c-add-0"]) == answer_for(ADDITIONS[0])
    work = Path(str(out) + ".work")
    markers = {p.name: p.stat().st_mtime_ns for p in (work / "stats").glob("*.json")}
    assert len(markers) == 5

    r = run_batch(args, ray_cluster)  # the same command again: nothing recomputed, the same file
    assert r.exit_code == 0 and "this run: nothing to run" in r.output, r.output
    assert out.read_bytes() == first
    assert {p.name: p.stat().st_mtime_ns for p in (work / "stats").glob("*.json")} == markers

    (work / "stats" / "00002.json").unlink()  # one shard lost: recomputed alone, the same answers
    out.unlink()
    r = run_batch(args, ray_cluster)
    assert r.exit_code == 0 and "last run 1 shards" in r.output, r.output
    assert timeless(read_lines(out)) == timeless(read_lines_bytes(first))

    st = CliRunner().invoke(main, ["status", str(work)])
    assert st.exit_code == 0 and f"prompts {len(lines)}/{len(lines)} (6 failed)" in st.output, st.output
    assert "bad rows by reason:" in st.output and "body.tools is not supported" in st.output


def timeless(answers: list[dict]) -> list[dict]:
    """Answer lines with `created` (the time a shard was decoded) left out; everything else is deterministic."""
    return [{**a, "response": a["response"] and {**a["response"], "body": {**a["response"]["body"], "created": 0}}}
            for a in answers]


def read_lines_bytes(data: bytes) -> list[dict]:
    return [json.loads(x) for x in data.decode().splitlines()]


@pytest.mark.slow  # ~30 s; a killed driver's resume is in CI through tests/test_jobs.py
def test_killed_run_batch_resumes_to_the_same_lines(tmp_path, ray_cluster):
    lines = [chat(f"c{i}", f"{i * 37 % 500}+{i * 11 % 300}=") if i % 2 else text(f"t{i}", f"{i}+{i}=", max_tokens=16)
             for i in range(24)]
    src = write_batch(tmp_path / "in.jsonl", lines)
    out, killed = tmp_path / "out.jsonl", tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "fastdllm.jobs.cli", "run-batch", "-i", str(src), "-o", str(killed), "--model", "tiny",
           "--address", ray_cluster, "--batch-size", "2", "--rows-per-shard", "3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stats = Path(str(killed) + ".work") / "stats"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (stats.exists() and any(stats.glob("*.json"))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(stats.glob("*.json")))
    assert 1 <= committed < 8 and not killed.exists(), "the driver should have been killed mid-job"
    r = run_batch(["-i", str(src), "-o", str(killed), "--model", "tiny"], ray_cluster)
    assert r.exit_code == 0, r.output
    r = run_batch(["-i", str(src), "-o", str(out), "--model", "tiny"], ray_cluster)  # one uninterrupted run
    assert r.exit_code == 0, r.output
    a, b = read_lines(killed), read_lines(out)
    check_answers(lines, a)
    assert timeless(a) == timeless(b)  # every line once, in input order, the same answers (ids are content hashes)


@pytest.mark.slow  # ~15 s; S3 jobs are in CI through tests/test_jobs.py::test_s3_job_end_to_end
def test_run_batch_on_an_s3_compatible_server(tmp_path, ray_cluster):
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=endpoint)
        fs.mkdir("fdl-batch")
        lines = mixed_lines()[:7]
        fs.pipe("fdl-batch/in/requests.jsonl", write_batch(tmp_path / "in.jsonl", lines).read_bytes())
        r = run_batch(["-i", "s3://fdl-batch/in/requests.jsonl", "-o", "s3://fdl-batch/answers/out.jsonl",
                       "--model", "tiny", "--storage-option", f"endpoint_url={endpoint}"], ray_cluster)
        assert r.exit_code == 0, r.output
        fs.invalidate_cache()
        answers = read_lines_bytes(fs.cat("fdl-batch/answers/out.jsonl"))
        by_id = check_answers(lines, answers)
        assert content(by_id["t-add-1"]) == answer_for(ADDITIONS[1])
        assert len(fs.glob("fdl-batch/answers/out.jsonl.work/stats/*.json")) == 3
    finally:
        server.stop()
