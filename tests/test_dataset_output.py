"""A newcomer's first hour (issue 21): inputs read as they are (CSV as text, JSONL values as JSON has them, kept
columns and ids back exactly), the output loads as a dataset (datasets, pandas, pyarrow), the job report, one set
of figures, `status` exit codes, `--version`, and a resume refusal that names what changed."""

from __future__ import annotations

import json
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fastdllm
from fastdllm.jobs import parse_manifest, run_job
from fastdllm.jobs.cli import main
from fastdllm.jobs.manifest import InvalidJob
from fastdllm.jobs.plan import make_plan
from fastdllm.workers import InputReader, Shard, WorkerSettings
from fastdllm.workers.inputs import InputSource, parse_text

from .conftest import own_local_ray
from .test_rows import DECODE

# Values a type guesser changes: leading zeros, digits beyond int64 and float precision, empty strings, dates,
# booleans, "NA"/"null", unicode (with U+2028, which str.splitlines would split on).
CSV = ('id,prompt,answer,note\n'
       '007,1+2=,07,\n'
       '008,3+4=,023333456677999,NA\n'
       '010,5+6=,12345678901234567890123,2024-01-02\n'
       '011,7+8=,-0.10,"true"\n'
       '012,9+9=,"1,5",null\n'
       '013,sort:21=,é\u2028ü,"a ""q"""\n')
CSV_ANSWERS = ["07", "023333456677999", "12345678901234567890123", "-0.10", "1,5", "é\u2028ü"]
CSV_NOTES = ["", "NA", "2024-01-02", "true", "null", 'a "q"']

JSONL_ROWS = [
    {"id": "007", "prompt": "1+2=", "when": "2024-01-01", "meta": {"a": 1}, "score": 2, "big": 2 ** 70,
     "mixed": "x", "empty": "", "u": "é\u2028ü"},
    {"id": "008", "prompt": "3+4=", "when": "2024-01-02 10:00:00", "meta": {"b": [1, 2]}, "score": 2.5,
     "big": 1, "mixed": 3, "empty": None, "u": "✓"},
    {"id": "009", "prompt": "5+6=", "when": None, "meta": {}, "score": None, "big": -(2 ** 65), "mixed": [1],
     "empty": "", "u": ""},
]
KEEP = ["when", "meta", "score", "big", "mixed", "empty", "u"]


def spec(tmp_path, uri, **over) -> dict:
    m = {"name": "n", "model": {"source": "tiny"}, "input": {"uri": str(uri), "rows_per_shard": 2},
         "output": {"uri": str(tmp_path / "out")}, "decode": dict(DECODE), "workers": {"count": 1, "batch_size": 4}}
    for k, v in over.items():
        m[k] = {**m[k], **v}
    return m


def write_csv(tmp_path):
    p = tmp_path / "in" / "a.csv"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(CSV, encoding="utf-8")
    return p


def test_csv_is_read_as_text_and_column_types_convert(tmp_path):
    p = write_csv(tmp_path)
    table = parse_text(p.read_bytes(), "csv", str(p))
    assert table.column("id").to_pylist() == ["007", "008", "010", "011", "012", "013"]
    assert table.column("answer").to_pylist() == CSV_ANSWERS
    assert table.column("note").to_pylist() == CSV_NOTES  # "" stays "", "NA" / "null" stay text
    typed = parse_text(p.read_bytes(), "csv", str(p), column_types={"id": "int64", "note": "string"})
    assert typed.column("id").to_pylist() == [7, 8, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="column 'answer' cannot be read as input.column_types 'int64'"):
        parse_text(p.read_bytes(), "csv", str(p), column_types={"answer": "int64"})
    with pytest.raises(InvalidJob, match="input.column_types: column 'x': 'int65' is not an Arrow type name"):
        parse_manifest(spec(tmp_path, p, input={"column_types": {"x": "int65"}}))


def test_jsonl_values_stay_as_json_has_them(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in JSONL_ROWS), encoding="utf-8")
    table = parse_text(p.read_bytes(), "jsonl", str(p), ("prompt",))
    assert str(table.schema.field("when").type) == "string"  # no timestamps guessed from strings
    assert table.column("empty").to_pylist() == ["", None, ""]
    for name in ("meta", "score", "big", "mixed"):  # no Arrow type holds these exactly: their JSON text
        values = [None if v is None else json.loads(v) for v in table.column(name).to_pylist()]
        assert json.dumps(values) == json.dumps([r[name] for r in JSONL_ROWS]), name
    with pytest.raises(ValueError, match="column 'prompt' mixes JSON types"):
        bad = tmp_path / "b.jsonl"
        bad.write_text('{"prompt": "a"}\n{"prompt": 12}\n')
        parse_text(bad.read_bytes(), "jsonl", str(bad), ("prompt",))


@pytest.mark.parametrize("out_fmt", ["jsonl", "parquet"])
def test_jsonl_kept_columns_and_ids_come_out_exactly(tmp_path, worker, out_fmt):
    p = tmp_path / "in" / "a.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in JSONL_ROWS), encoding="utf-8")
    plan = make_plan(parse_manifest(spec(tmp_path, p, input={"id_column": "id", "keep_columns": KEEP,
                                                             "rows_per_shard": 10})))
    saved = worker.s, worker.reader, worker.out.ext
    worker.s = WorkerSettings(saved[0], source=plan.source, id_column="id", keep_columns=tuple(KEEP),
                              output_format=out_fmt)
    worker.reader = InputReader(plan.source, string_columns=("prompt",))
    worker.out.ext = out_fmt
    try:
        worker.run_shard(plan.shards[0])
    finally:
        worker.s, worker.reader, worker.out.ext = saved
    data = f"{worker.out.root}/shards/00000.{out_fmt}"
    if out_fmt == "jsonl":
        got = [json.loads(line) for line in open(data, encoding="utf-8")]
        for g, r in zip(got, JSONL_ROWS, strict=True):
            assert g["id"] == r["id"] and g["error"] is None
            assert json.dumps({k: g[k] for k in KEEP}) == json.dumps({k: r[k] for k in KEEP})
    else:
        got = pq.read_table(data).to_pylist()
        assert [g["id"] for g in got] == ["007", "008", "009"]
        assert [g["when"] for g in got] == [r["when"] for r in JSONL_ROWS]
        assert [json.loads(g["big"]) for g in got] == [r["big"] for r in JSONL_ROWS]  # JSON text in Parquet


@pytest.fixture(scope="module")
def ray_address():
    with own_local_ray() as address:
        yield address


def test_csv_job_loads_as_a_dataset_with_a_report(tmp_path, ray_address):
    import datasets
    import pandas as pd
    import pyarrow.dataset as pads

    import yaml

    p = write_csv(tmp_path)
    runner = CliRunner()
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(spec(tmp_path, p, input={"id_column": "id", "keep_columns": ["answer", "note"]})))
    out = tmp_path / "out"
    r = runner.invoke(main, ["run", str(manifest), "--address", ray_address])
    assert r.exit_code == 0, r.output
    assert "6 prompts (0 failed), 6 output rows" in r.output and "job " in r.output and "start-up" in r.output

    # the card's configs: the shards, not job.json (a cache of the test's own, not the user's ~/.cache)
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    rows = sorted(ds.to_list(), key=lambda x: x["id"])
    assert [x["id"] for x in rows] == ["007", "008", "010", "011", "012", "013"]
    assert [x["answer"] for x in rows] == CSV_ANSWERS and [x["note"] for x in rows] == CSV_NOTES
    frame = pd.read_parquet(out / "shards")
    assert sorted(frame["id"]) == [x["id"] for x in rows]
    assert pads.dataset(out / "shards").count_rows() == 6

    card = (out / "README.md").read_text()
    assert "path: shards/*.parquet" in card
    assert "3/3 shards committed (complete)" in card
    page = (out / "report.html").read_text()
    assert page.count("<svg") >= 4 and "decode tokens/s" in page and "job tokens/s" in page
    assert not any(x in page for x in ("<script", "src=", "href=", "@import"))  # self-contained, nothing fetched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["finish_reasons"] and sum(summary["totals"]["finish_reasons"].values()) == 6
    first_run = summary["run"]
    assert first_run["shards_run"] == 3 and first_run["startup_seconds"] > 0
    assert first_run["job_tokens_per_second"] == pytest.approx(
        first_run["generated_tokens"] / (first_run["wall_seconds"] - first_run["startup_seconds"]))

    r = runner.invoke(main, ["run", str(manifest), "--address", ray_address])  # nothing to do
    assert r.exit_code == 0 and "nothing to run" in r.output, r.output
    assert json.loads((out / "summary.json").read_text())["run"] == first_run  # the figures stay

    r = runner.invoke(main, ["status", str(out)])
    assert r.exit_code == 0 and "prompts 6/6" in r.output, r.output
    (out / "stats" / "00001.json").unlink()
    r = runner.invoke(main, ["status", str(out)])
    assert r.exit_code == 1 and "incomplete: 1 shards pending" in r.output, r.output

    r = runner.invoke(main, ["report", str(out)])
    assert r.exit_code == 0 and f"{out}/report.html" in r.output, r.output
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The input grows by a row: the refusal names the file and what changed in it.
    extra = "014,1+1=,x,y\n"
    p.write_text(CSV + extra, encoding="utf-8")
    r = runner.invoke(main, ["run", str(manifest), "--address", ray_address])
    assert r.exit_code == 2, r.output
    n = len(CSV.encode())
    assert f"the input changed (a.csv: size {n} -> {n + len(extra)}, rows 6 -> 7, " \
           "content hash differs)" in r.output


def test_version_and_help_examples():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"fastdllm {fastdllm.__version__}"
    for cmd in ([], ["run"], ["plan"], ["status"], ["report"]):
        r = CliRunner().invoke(main, [*cmd, "--help"])
        assert r.exit_code == 0 and "Example:" in r.output, cmd


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    """The report page as a browser draws it (a screenshot of report.html of a job written here)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    from fastdllm.workers import JobOutput, ShardRecord, ShardStats
    from fastdllm.jobs.report import write_report

    out = JobOutput(str(tmp_path / "out"))
    job = {"name": "r", "manifest": {"model": {"source": "tiny"}, "decode": {"num_samples": 1}},
           "plan": {"rows": 4, "shards": [{"index": i, "start": 2 * i, "stop": 2 * i + 2} for i in range(2)]}}
    out.write_job(job)
    for i in range(2):
        stats = ShardStats(shards=1, rows=2, generated_tokens=10 + i, nfe=5, row_forwards=6, decode_seconds=1.0,
                           wall_seconds=1.5, finish_reasons={"stop": 2})
        out.commit(i, b"x" * (i + 1), 2, lambda f, i=i, s=stats: ShardRecord(
            shard=i, stats=s, file=f, started_at=f"2026-01-01T00:00:0{i}+00:00",
            finished_at=f"2026-01-01T00:00:0{i + 2}+00:00"))
    write_report(out, png=False)
    shot = tmp_path / "screenshot.png"
    keep = __import__("os").environ.get("FASTDLLM_REPORT_SHOT")  # where to keep the screenshot (README image)
    shot = __import__("pathlib").Path(keep) if keep else shot
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=800,1400", f"file://{out.root}/report.html"], check=True, timeout=120,
                   capture_output=True)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a drawn page, not a blank one


def test_generate_cli_reads_stdin_and_prints_json():
    args = ["generate", "--gen-length", "8", "--block-length", "4", "--input", "-", "--json", "--num-samples", "2",
            "--temperature", "1", "--seed", "3", "--max-batch-size", "2", "12+34="]
    r = CliRunner().invoke(main, args, input="7+8=\n\n5+5=\n")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["prompt"], x["sample_index"]) for x in lines] == [(p, k) for p in ("12+34=", "7+8=", "5+5=")
                                                                 for k in (0, 1)]
    again = CliRunner().invoke(main, args, input="7+8=\n\n5+5=\n")
    assert [json.loads(x) for x in again.stdout.splitlines()] == lines  # --seed: the same samples
    r = CliRunner().invoke(main, ["generate"])
    assert r.exit_code == 2 and "no prompts" in r.output


def test_encode_batch_refuses_one_string():
    tok = fastdllm.load_tokenizer("tiny")
    with pytest.raises(ValueError, match="not one string"):
        tok.encode_batch("1234+5678=")
    assert tok.encode_batch(["1234+5678="]) == [tok.encode("1234+5678=")]


def _output_with(root, fingerprint: str, values: list[str], summary=None) -> None:
    """An output directory as a job leaves it for loaders: a shard data file, job.json's keys, the card."""
    import pyarrow as pa

    from fastdllm.jobs.report import write_card
    from fastdllm.workers import JobOutput

    (root / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"{i:03d}" for i in range(len(values))], "completion": values}),
                   root / "shards" / "00000.parquet")
    job = {"name": "n", "plan": {"fingerprint": fingerprint, "rows": len(values)}, "identity": {"decode": {}}}
    write_card(JobOutput(str(root), {}), job, summary)


def test_two_outputs_of_one_name_and_a_rerun_load_their_own_rows(tmp_path):
    """`datasets` caches a card's config under the directory's base name and the config's name: the card names
    its config after the data (plan, identity, last run), so another output called `out`, or the same output after
    another run, never loads rows cached from the first."""
    import datasets

    from fastdllm.workers import JobSummary, RunStats, ShardStats

    cache = str(tmp_path / "hf-cache")  # one cache for every load, as a user's ~/.cache is
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    _output_with(a, "fp-a", ["first", "first"])
    _output_with(b, "fp-b", ["second"])

    def load(p):
        return [r["completion"] for r in datasets.load_dataset(str(p), split="train", cache_dir=cache)]

    assert load(a) == ["first", "first"] and load(b) == ["second"]
    later = JobSummary(shards=1, committed=1, missing=[], totals=ShardStats(), run=RunStats(shards_run=1),
                       finished_at="2026-12-02T16:00:00+00:00")
    _output_with(a, "fp-a", ["again"], later)  # the same job's files after a --force rerun
    assert load(a) == ["again"]
