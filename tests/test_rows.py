"""Pipeline-native rows without Ray: Parquet / JSONL / CSV / Hugging Face inputs planned and read, column-type
and clash checks (exit 2), chat messages and system prompts, kept columns, several samples per prompt, JSONL
output and the error policy, on the built-in tiny model."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

import fastdllm
from fastdllm.jobs.cli import main
from fastdllm.jobs.manifest import InvalidJob, parse_manifest
from fastdllm.jobs.plan import make_plan
from fastdllm.jobs.runner import error_policy
from fastdllm.workers import InputReader, Shard, ShardDataError, ShardStats, WorkerSettings, seed_id
from fastdllm.workers.inputs import InputSource

DECODE = {"gen_length": 8, "block_length": 4, "steps": 8}
SAMPLED = {**DECODE, "temperature": 1.0, "seed": 3}
PROMPTS = ["12+34=", "sort:321=", "7+8=", "sort:9182=", "40+2=", "5+5=", "sort:55="]
# A role-marking template (the tiny checkpoint's own one only concatenates contents).
TEMPLATE = "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}|{% else %}{{ m['content'] }}{% endif %}{% endfor %}"


def rows(n=len(PROMPTS)) -> list[dict]:
    """Input rows: a prompt, the same as a conversation, a reference answer and nested metadata."""
    return [{"prompt": p, "messages": [{"role": "user", "content": p}], "answer": f"a{i}",
             "meta": {"k": i, "tags": ["x"] * (i % 3)}} for i, p in enumerate(PROMPTS[:n])]


def write(path, data: list[dict], fmt: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(data), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    elif fmt == "csv":
        flat = [{k: v for k, v in r.items() if k in ("prompt", "answer")} for r in data]
        pacsv.write_csv(pa.Table.from_pylist(flat), path)
    else:
        import datasets

        datasets.Dataset.from_list(data).save_to_disk(str(path))
    return str(path)


def manifest(tmp_path, **over) -> dict:
    m = {"name": "t", "model": {"source": "tiny"}, "input": {"uri": str(tmp_path / "in"), "rows_per_shard": 3},
         "output": {"uri": str(tmp_path / "out")}, "decode": dict(DECODE), "workers": {"count": 1, "batch_size": 4}}
    for k, v in over.items():
        m[k] = {**m[k], **v} if isinstance(v, dict) and isinstance(m.get(k), dict) else v
    return m


def exit2(tmp_path, m) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(m))
    r = CliRunner().invoke(main, ["plan", str(p)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "hf"])
def test_every_format_plans_and_reads_each_row_once(tmp_path, fmt):
    data = rows()
    name = {"parquet": "a.parquet", "jsonl": "a.jsonl", "csv": "a.csv", "hf": "saved"}[fmt]
    write(tmp_path / "in" / name, data, fmt)
    if fmt != "hf":  # a second file: shards never span two
        write(tmp_path / "in" / "sub" / name, data[:2], fmt)
    uri = tmp_path / "in" / ("saved" if fmt == "hf" else "")
    m = parse_manifest(manifest(tmp_path, input={"uri": str(uri), "keep_columns": ["answer"]}))
    plan = make_plan(m)
    assert plan.source.format == fmt and plan.to_dict() == make_plan(m).to_dict()
    files = [(name, 7)] if fmt == "hf" else [(name, 7), (f"sub/{name}", 2)]
    relpaths = ["data" if fmt == "hf" else r for r, _ in files]
    assert [(s.relpath, s.start, s.stop) for s in plan.shards] == [
        (r, a, min(a + 3, n)) for r, (_, n) in zip(relpaths, files) for a in range(0, n, 3)]
    reader = InputReader(plan.source, string_columns=("prompt",))
    got = [r for s in plan.shards for r in reader.read(s, ["prompt", "answer"]).to_pylist()]
    want = data + (data[:2] if fmt != "hf" else [])
    assert got == [{"prompt": r["prompt"], "answer": r["answer"]} for r in want]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_text_files_are_pinned_by_content(tmp_path, fmt):
    path = write(tmp_path / "in" / f"a.{fmt}", rows(), fmt)
    m = parse_manifest(manifest(tmp_path))
    plan = make_plan(m)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:  # same size, one character changed
        f.write(text.replace("12+34=", "12+35="))
    assert make_plan(m).fingerprint != plan.fingerprint  # resume refuses it (changed input)
    s = plan.shards[0]
    with pytest.raises(ShardDataError, match=r"changed since the job was planned \(its content differs\)"):
        InputReader(plan.source).read(s, ["prompt"])


def test_text_shard_storage_errors_are_retried_and_a_deleted_file_is_a_data_error(tmp_path):
    """Like Parquet, a JSONL file the store cannot serve right now is no data error (the driver retries the
    shard); a file that is gone is one."""
    path = write(tmp_path / "in" / "a.jsonl", rows(), "jsonl")
    plan = make_plan(parse_manifest(manifest(tmp_path)))
    os.remove(path)
    os.mkdir(path)  # the store answers with an OSError that is not "no such file"
    with pytest.raises(OSError) as e:
        InputReader(plan.source).read(plan.shards[0], ["prompt"])
    assert not isinstance(e.value, ShardDataError)
    os.rmdir(path)
    with pytest.raises(ShardDataError, match=r"changed since the job was planned \(it no longer exists\)"):
        InputReader(plan.source).read(plan.shards[0], ["prompt"])


def test_compressed_jsonl_is_read_through(tmp_path):
    import gzip

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n"
                                                                       for r in rows())))
    plan = make_plan(parse_manifest(manifest(tmp_path)))
    assert plan.source.format == "jsonl" and plan.rows == len(PROMPTS)
    s = plan.shards[-1]
    assert InputReader(plan.source).read(s, ["prompt"]).column(0).to_pylist() == \
        PROMPTS[6:]


def test_hub_dataset_from_the_local_cache(tmp_path, monkeypatch):
    """A hub dataset present in the datasets cache (the layout `load_dataset` leaves) plans and reads offline."""
    import datasets

    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "p.parquet")
    built = tmp_path / "build"
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "p.parquet")}, cache_dir=str(built))
    src = next(p for p in glob.glob(f"{built}/parquet/*/*/*") if os.path.isdir(p))
    cache = tmp_path / "hub-cache"
    dst = cache / "fdl-org___tiny-prompts" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(src, dst)
    os.rename(dst / "parquet-train.arrow", dst / "tiny-prompts-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    m = parse_manifest(manifest(tmp_path, input={"uri": "fdl-org/tiny-prompts", "format": "hf", "split": "train"}))
    plan = make_plan(m)
    assert [(s.relpath, s.start, s.stop) for s in plan.shards] == [("train", 0, 3), ("train", 3, 6), ("train", 6, 7)]
    reader = InputReader(plan.source)
    got = [r["prompt"] for s in plan.shards for r in reader.read(s, ["prompt"]).to_pylist()]
    assert got == PROMPTS
    with pytest.raises(InvalidJob, match="not a hub dataset in the local cache|nor a hub dataset"):
        make_plan(parse_manifest(manifest(tmp_path, input={"uri": "fdl-org/absent", "format": "hf"})))


def test_exit2_column_types_clashes_and_settings(tmp_path):
    write(tmp_path / "in" / "a.jsonl", rows(), "jsonl")
    out = exit2(tmp_path, manifest(tmp_path, input={"prompt_column": "messages"}, model={"chat_template": True}))
    assert "prompt_column 'messages' has type list<" in out and "use messages_column" in out
    out = exit2(tmp_path, manifest(tmp_path, input={"messages_column": "prompt"}, model={"chat_template": True}))
    assert "messages_column 'prompt' has type string" in out
    assert "prompt_column 'meta' has type struct" in exit2(tmp_path, manifest(tmp_path, input={"prompt_column": "meta"}))
    out = exit2(tmp_path, manifest(tmp_path, input={"messages_column": "messages"}))
    assert "messages_column needs a chat template" in out
    assert "system_prompt" in exit2(tmp_path, manifest(tmp_path, model={"system_prompt": "Be brief."}))
    out = exit2(tmp_path, manifest(tmp_path, model={"chat_template": "{% for m in messages %}"}))
    assert "model.chat_template: the template is not valid Jinja" in out
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # not YAML on its own: --set keeps the text
    assert parse_manifest(manifest(tmp_path), [f"model.chat_template={template}"]).model.chat_template == template
    out = exit2(tmp_path, manifest(tmp_path, decode={**DECODE, "num_samples": 4}))
    assert "num_samples 4 would give identical samples" in out and "temperature" in out
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({**r, "completion": "x"}) + "\n" for r in rows()))
    out = exit2(tmp_path, manifest(tmp_path, input={"keep_columns": "all"}))
    assert "'completion' would clash with output column" in out
    assert "no column 'nope'" in exit2(tmp_path, manifest(tmp_path, input={"keep_columns": ["nope"]}))
    notemplate = tmp_path / "notemplate"
    shutil.copytree(os.path.dirname(fastdllm.tokenizer.__file__) + "/tiny", notemplate)
    (notemplate / "chat_template.jinja").unlink()
    out = exit2(tmp_path, manifest(tmp_path, model={"source": str(notemplate), "chat_template": True}))
    assert "has no chat template" in out
    (tmp_path / "in" / "b.csv").write_text("prompt\n1+1=\n")
    assert "mixes formats (csv, jsonl)" in exit2(tmp_path, manifest(tmp_path))


def test_keep_all_leaves_out_columns_the_output_already_has(tmp_path):
    data = [{"id": 10 + i, **r} for i, r in enumerate(rows())]
    write(tmp_path / "in" / "a.parquet", data, "parquet")
    plan = make_plan(parse_manifest(manifest(tmp_path, input={"keep_columns": "all", "id_column": "id"})))
    assert plan.keep_columns == ["messages", "answer", "meta"]


def run(worker, path, fmt="parquet", **settings) -> list[dict]:
    """Run one shard of the whole file at `path` on the shared worker with `settings` swapped in; its rows."""
    saved = worker.s, worker.reader, worker.out.ext
    worker.s = WorkerSettings(saved[0], source=InputSource(str(path), fmt), **settings)
    worker.reader = InputReader(worker.s.source, string_columns=(worker.s.input.text_column,))
    worker.out.ext = worker.s.output.format
    try:
        n = pq.read_metadata(path).num_rows
        worker.run_shard(Shard(index=0, file=str(path), relpath="a", start=0, stop=n))
        out = f"{worker.out.root}/shards/00000.{worker.s.output.format}"
        if worker.s.output.format == "jsonl":
            with open(out) as f:
                return [json.loads(line) for line in f]
        return pq.read_table(out).to_pylist()
    finally:
        worker.s, worker.reader, worker.out.ext = saved


def test_messages_and_system_prompt_decode_as_the_pretemplated_prompt(tmp_path, worker):
    data = rows()
    data[1]["messages"] = [{"role": "system", "content": "own"}, *data[1]["messages"]]  # keeps its own turn
    data[2]["messages"] = []
    path = write(tmp_path / "a.parquet", data, "parquet")
    chat = run(worker, path, prompt_column=None, messages_column="messages", chat_template=TEMPLATE,
               system_prompt="sys")
    pre = [("own|" if i == 1 else "sys|") + r["prompt"] for i, r in enumerate(data)]
    plain = run(worker, write(tmp_path / "b.parquet", [{"prompt": p} for p in pre], "parquet"))
    assert chat[2]["finish_reason"] == "error" and "empty list" in chat[2]["error"]
    for i, (a, b) in enumerate(zip(chat, plain)):
        if i != 2:
            assert a["error"] is None and a["prompt"] == b["prompt"] == pre[i]
            assert (a["completion_ids"], a["nfe"], a["completion"]) == (b["completion_ids"], b["nfe"], b["completion"])
    # a plain prompt column with a template becomes a user turn after the system turn
    wrapped = run(worker, write(tmp_path / "c.parquet", [{"prompt": r["prompt"]} for r in data], "parquet"),
                  chat_template=TEMPLATE, system_prompt="sys")
    sys_pre = run(worker, write(tmp_path / "d.parquet", [{"prompt": "sys|" + r["prompt"]} for r in data],
                                     "parquet"))
    assert [r["completion_ids"] for r in wrapped] == [r["completion_ids"] for r in sys_pre]


def test_samples_and_kept_columns(tmp_path, worker):
    data = [{"id": 100 + i, **r} for i, r in enumerate(rows(4))]
    data[3]["prompt"] = ""
    path = write(tmp_path / "a.parquet", data, "parquet")
    cfg = fastdllm.DecodeConfig(**SAMPLED)
    out = run(worker, path, decode=cfg, num_samples=4, id_column="id", keep_columns=("answer", "meta"),
              output_format="jsonl")
    assert [(r["id"], r["sample_index"]) for r in out] == [(100 + i, k) for i in range(4) for k in range(4)]
    for r in out:
        src = data[r["id"] - 100]
        assert (r["answer"], r["meta"]) == (src["answer"], src["meta"])  # kept columns arrive unchanged
    good = [r for r in out if r["id"] != 103]
    assert all(r["finish_reason"] == "error" and r["error"] == "prompt is empty" for r in out if r["id"] == 103)
    for r in good:  # each sample equals that sample decoded alone
        alone = fastdllm.generate(worker.model, [worker.tok.encode(r["prompt"])], cfg,
                                  row_ids=[seed_id(r["id"], r["sample_index"])])
        assert r["completion_ids"] == alone.tokens[0] and r["nfe"] == alone.nfe[0]
    per_prompt = [{tuple(r["completion_ids"]) for r in good if r["id"] == i} for i in (100, 101, 102)]
    assert any(len(s) > 1 for s in per_prompt)  # the samples are not all the same draw
    stats = json.loads(open(f"{worker.out.root}/stats/00000.json").read())
    assert (stats["rows"], stats["error_rows"], stats["error_reasons"], stats["config"]["num_samples"]) == (
        4, 1, {"prompt is empty": 1}, 4)


def test_error_policy_line():
    total = ShardStats(rows=10, error_rows=3, error_reasons={"prompt is empty": 2, "prompt is null": 1})
    assert error_policy(total, 1.0) is None and error_policy(total, 0.3) is None
    line = error_policy(total, 0.2)
    assert line == ("3 of 10 rows failed (30.0%), above workers.max_error_rate 0.2; commonest: "
                    "prompt is empty (2); prompt is null (1)")
    every = error_policy(ShardStats(rows=2, error_rows=2, error_reasons={"prompt is null": 2}), 1.0)
    assert every.startswith("2 of 2 rows failed (100.0%), every row failed")
    assert error_policy(ShardStats(), 0.0) is None
    s = ShardStats(error_reasons={"a": 1}) + ShardStats(error_reasons={"a": 2, "b": 1})
    assert s.error_reasons == {"a": 3, "b": 1} and ShardStats.from_dict(s.to_dict()) == s


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 (moto server mode) with a bucket; (storage options, s3fs)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}", "key": "fdl-rows-key", "secret": "fdl-rows-secret"}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("rows-bucket")
    yield opts, fs
    server.stop()


def test_jsonl_and_saved_dataset_on_s3(tmp_path, s3):
    opts, fs = s3
    fs.put(write(tmp_path / "a.jsonl", rows(), "jsonl"), "rows-bucket/in/a.jsonl")
    fs.put(write(tmp_path / "saved", rows(), "hf"), "rows-bucket/saved", recursive=True)
    for uri, fmt in (("s3://rows-bucket/in/", "jsonl"), ("s3://rows-bucket/saved", "hf")):
        plan = make_plan(parse_manifest(manifest(tmp_path, input={"uri": uri}, storage_options=opts)))
        assert plan.source.format == fmt and plan.rows == len(PROMPTS)
        reader = InputReader(plan.source, opts)
        got = [r for s in plan.shards for r in reader.read(s, ["prompt"]).to_pylist()]
        assert [r["prompt"] for r in got] == PROMPTS


def test_hf_dataset_opens_from_many_threads_at_once(tmp_path):
    """A worker runs two shards in threads (workers.shards_per_actor): opening one save_to_disk dataset from several
    threads at once must work every time (datasets races on tqdm's class lock there, huggingface/datasets#7660;
    the race is rare, so this test seldom catches it without the lock in open_hf)."""
    import threading

    from fastdllm.workers.inputs import open_hf

    uri = write(tmp_path / "saved", rows(), "hf")
    errors, n = [], 8

    def opener():
        try:
            for _ in range(10):
                ds, _split = open_hf(InputSource(uri, "hf"), None)
                assert len(ds) == len(rows())
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
