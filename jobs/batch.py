"""`fastdllm run-batch`: an OpenAI Batch API file in, its answers out, as one job with no manifest (the
`vllm run-batch` workflow). The job runs in a work directory (shards, markers, job.json: resumable like any job);
the answer file is written once, atomically, when every request line has its answer line."""

from __future__ import annotations

import os

from fastdllm.workers import JobOutput
from fastdllm.workers.storage import storage_error

from .manifest import InvalidJob, Manifest, parse_manifest
from .runner import JobResult, run_job

# The built-in tiny model's own decode settings (fastdllm.tiny_kit); other models start from DecodeConfig's.
TINY_DECODE = {"gen_length": 32, "block_length": 8}


def batch_manifest(input_uri: str, output_uri: str, model: str, work_dir: str | None = None, decode: dict | None = None,
                   workers: dict | None = None, model_options: dict | None = None, rows_per_shard: int | None = None,
                   storage_options: dict | None = None, overrides=()) -> Manifest:
    """The job that answers `input_uri` (decode / workers / model options left None take their defaults)."""
    dec = dict(TINY_DECODE) if model == "tiny" else {}
    dec.update({k: v for k, v in (decode or {}).items() if v is not None})
    if "steps" not in dec and dec.get("rule") == "quota" and "gen_length" in dec:
        dec["steps"] = dec["gen_length"]
    inp = {"uri": input_uri, "format": "openai"}
    if rows_per_shard is not None:
        inp["rows_per_shard"] = rows_per_shard
    raw = {"name": "run-batch",
           "model": {"source": model, "chat_template": True,
                     **{k: v for k, v in (model_options or {}).items() if v is not None}},
           "input": inp, "output": {"uri": work_dir or default_work_dir(output_uri), "format": "openai"},
           "decode": dec, "workers": {k: v for k, v in (workers or {}).items() if v is not None},
           "storage_options": storage_options or {}}
    return parse_manifest(raw, overrides, source="run-batch")


def default_work_dir(output_uri: str) -> str:
    """Where the job's shards live unless --work-dir says: beside OUT, as OUT.work/."""
    return output_uri.rstrip("/") + ".work"


def _split(uri: str) -> tuple[str, str]:
    """(directory URI, file name) of a file URI; a bare local name lies in the current directory."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or not parent:
        raise InvalidJob(f"output {uri!r} does not name a file")
    return parent, name


def merge_answers(m: Manifest, output_uri: str) -> int:
    """Write the answer lines of every planned shard, in input order, to `output_uri` (atomically: readers see
    the old file or the whole new one). Returns the number of lines."""
    work = JobOutput(m.output.uri, m.storage_options, ext="openai")
    job = work.read_job()
    parts = [work.fs.cat_file(work.path(work.shard_file(s["index"])))
             for s in sorted(job["plan"]["shards"], key=lambda s: s["index"])]
    data = b"".join(parts)
    parent, name = _split(output_uri)
    try:
        JobOutput(parent, m.storage_options).write_bytes(name, data)
    except Exception as e:  # storage errors of any fsspec backend
        raise InvalidJob(f"output {output_uri} is not writable: {storage_error(e)}") from None
    return data.count(b"\n")


def run_batch(m: Manifest, output_uri: str, **run_options) -> tuple[JobResult, int | None]:
    """Run (or resume) the batch job, then write the answer file when every shard is committed. Returns the job's
    result and the answer lines written (None: the file was not written, some shards are missing)."""
    _split(output_uri)  # a bad output name fails before any work
    result = run_job(m, **run_options)
    if not result.summary.complete or result.interrupted is not None:
        return result, None
    return result, merge_answers(m, output_uri)
