"""Shard planning: list the input (Parquet, JSONL or CSV files, or a Hugging Face dataset), check its columns,
their types and the ids, fingerprint it, and cut it into deterministic shards (rows [start, stop) of one file,
`rows_per_shard` at most). Parquet is read by footer and id column; see workers/inputs.py for the other formats.
Every problem raises InvalidJob naming the path."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from fastdllm.workers import InputSource, Shard
from fastdllm.workers.inputs import InputError, Inspected, inspect_hf, inspect_parquet, inspect_text, list_files
from fastdllm.workers.inputs import resolve_input
from fastdllm.workers.shard import GENERATED_COLUMNS

from .manifest import InvalidJob, Manifest

log = logging.getLogger("fastdllm.jobs")


@dataclass
class InputFile:
    uri: str
    relpath: str
    rows: int
    size: int
    digest: str  # Parquet: sha256 of the footer; JSONL/CSV: sha256 of the content; HF: the dataset fingerprint


@dataclass
class Plan:
    source: InputSource
    files: list[InputFile]
    shards: list[Shard]
    fingerprint: str  # hash of the files (names, sizes, row counts, digests) and the columns read
    keep_columns: list[str] = field(default_factory=list)  # resolved: `all` becomes the input's columns

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def shard_rows(self) -> dict[int, int]:
        """{shard: rows}, what JobOutput.scan checks commit markers against."""
        return {s.index: s.rows for s in self.shards}

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "rows": self.rows, "format": self.source.format,
                "keep_columns": self.keep_columns, "files": [vars(f) for f in self.files],
                "shards": [vars(s) for s in self.shards]}


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_messages(t: pa.DataType) -> bool:
    """list<struct<role: string, content: string, ...>> (the OpenAI / Ray Data LLM / distilabel chat format)."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(k in fields and _is_text(fields[k]) for k in ("role", "content"))


def check_columns(info: Inspected, m: Manifest) -> None:
    """The input has the columns the manifest names, with usable types (InvalidJob otherwise)."""
    names = info.schema.names
    inp = m.input
    named = [("messages_column" if inp.messages_column else "prompt_column", inp.text_column),
             ("id_column", inp.id_column), ("decode.structured_outputs", m.decode.structured_column)]
    named += [("keep_columns", c) for c in (inp.keep_columns if isinstance(inp.keep_columns, list) else [])]
    for kind, col in named:
        if col and col not in names:
            raise InvalidJob(f"input {info.uri} has no column {col!r} (input.{kind}; columns: {', '.join(names)})")
    t = info.schema.field(inp.text_column).type
    if inp.messages_column and not _is_messages(t):
        raise InvalidJob(f"input {info.uri}: messages_column {inp.text_column!r} has type {t}; it must be a list of "
                         "{role, content} strings (use prompt_column for plain text)")
    if inp.prompt_column and not _is_text(t):
        hint = "; use messages_column for a list of {role, content}" if _is_messages(t) else ""
        raise InvalidJob(f"input {info.uri}: prompt_column {inp.text_column!r} has type {t}; it must hold "
                         f"strings{hint}")


def resolve_keep(m: Manifest, schema: pa.Schema) -> list[str]:
    """The kept columns (`all`: every input column), less those already in the output under their own name
    with the same values (the id column when the ids keep its name, a prompt column named `prompt`). The ids'
    column (m.id_name) must be free: no generated column and no other kept column has its name; any other name
    a generated column has is a clash too (InvalidJob)."""
    inp, name = m.input, m.id_name
    if name in GENERATED_COLUMNS:
        what = (f"output.id_name {name!r}" if m.output.id_name else
                f"input.id_column {name!r} (the ids keep its name unless output.id_name is set)")
        raise InvalidJob(f"{what} is the name of a generated output column ({', '.join(GENERATED_COLUMNS)}); set "
                         "output.id_name to another name")
    wanted = list(schema.names) if inp.keep_columns == "all" else list(inp.keep_columns)
    same = {c for c, out in ((inp.id_column, name), (inp.prompt_column, "prompt")) if c == out}
    keep = [c for c in dict.fromkeys(wanted) if c not in same]
    if name in keep:
        ids = "the ids" if inp.id_column else "the derived ids (<file>:<row>)"
        fix = "" if inp.id_column or name != "id" else ", set input.id_column: id to use that column as the ids,"
        raise InvalidJob(f"input.keep_columns keeps a column {name!r}, but {ids} go into the output column of that "
                         f"name; set output.id_name to another name{fix} or leave {name!r} out of keep_columns")
    clash = [c for c in keep if c in GENERATED_COLUMNS]
    if clash:
        raise InvalidJob(f"input.keep_columns: {', '.join(map(repr, clash))} would clash with output column(s) of "
                         f"that name ({', '.join((name,) + GENERATED_COLUMNS)}); rename the input column or leave "
                         "it out")
    return keep


def _check_ids(ids: list[pa.ChunkedArray], files: list[InputFile], column: str) -> None:
    for arr, f in zip(ids, files):
        if arr.null_count:
            raise InvalidJob(f"input {f.uri} has {arr.null_count} null ids in column {column!r}; every row needs one")
        if not (pa.types.is_integer(arr.type) or _is_text(arr.type)):
            raise InvalidJob(f"input {f.uri}: id column {column!r} has type {arr.type}; use integers or strings")
    types = {}
    for arr, f in zip(ids, files):
        types.setdefault(str(arr.type), f.relpath)
    if len(types) > 1:
        raise InvalidJob(f"input files disagree on the type of id column {column!r} ("
                         f"{', '.join(f'{t} in {rel}' for t, rel in types.items())}); write every file with one type")
    allids = pa.chunked_array([c for a in ids for c in a.chunks], type=ids[0].type)
    if len(pc.unique(allids)) != len(allids):
        counts = pc.value_counts(allids)
        dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        where = [f.relpath for a, f in zip(ids, files) if pc.any(pc.equal(a, dup)).as_py()]
        raise InvalidJob(f"input has duplicate ids in column {column!r}, e.g. {dup!r} (in {', '.join(where)}); "
                         "ids must be unique, or drop input.id_column to derive them")


def inspect_input(m: Manifest) -> tuple[InputSource, list[Inspected]]:
    """The input's resolved source and what planning learns from each of its files (or its HF dataset)."""
    inp, opts = m.input, m.storage_options
    try:
        source = resolve_input(inp.uri, inp.format, inp.config, inp.split, opts)
        if source.format == "hf":
            return source, [inspect_hf(source, inp.id_column, opts)]
        fmt, files = list_files(source, opts)
        if fmt == "jsonl" and inp.format == "auto" and files and _first_line_is_batch(files[0][0], opts):
            fmt = "openai"  # OpenAI Batch API request lines (workers/openai_batch.py)
        source = InputSource(source.uri, fmt)
        text = (inp.text_column,)
        return source, [inspect_parquet(u, rel, inp.id_column, opts) if fmt == "parquet"
                        else inspect_text(u, rel, fmt, "custom_id" if fmt == "openai" else inp.id_column, text, opts,
                                          inp.column_types)
                        for u, rel in files]
    except InputError as e:
        raise InvalidJob(str(e)) from None


def _first_line_is_batch(uri: str, opts: dict | None) -> bool:
    """Whether a JSONL file's first non-blank line is an OpenAI batch request ({custom_id, ..., body})."""
    from fastdllm.workers.inputs import _read_bytes
    from fastdllm.workers.openai_batch import is_batch_line

    first = next((ln for ln in _read_bytes(uri, opts).splitlines() if ln.strip()), b"")
    return is_batch_line(first)


def check_batch_input(m: Manifest, inspected: list[Inspected]) -> None:
    """An OpenAI batch input: answers go out as OpenAI lines, the custom_id is the id, and no custom_id repeats
    (InvalidJob otherwise)."""
    from fastdllm.workers.openai_batch import duplicate_ids

    inp = m.input
    if m.output.format != "openai":
        raise InvalidJob(f"input {inspected[0].uri} holds OpenAI batch requests; set output.format: openai (or use "
                         "`fastdllm run-batch`)")
    if inp.id_column or inp.keep_columns or inp.messages_column or inp.prompt_column != "prompt":
        raise InvalidJob("input.id_column, prompt_column, messages_column and keep_columns do not apply to an OpenAI "
                         "batch file (each line's custom_id is its id and its body the request); remove them")
    if m.output.id_name:
        raise InvalidJob("output.id_name does not apply to OpenAI batch answers (each answer line keeps its request's "
                         "custom_id); remove it")
    dup = duplicate_ids([(i.relpath, i.ids) for i in inspected])
    if dup:
        raise InvalidJob(dup)


def _pin(f: InputFile, fmt: str) -> dict:
    """The Shard fields that let a worker check it reads the file the plan saw (see workers/inputs.py)."""
    if fmt == "parquet":
        return {"file_size": f.size, "file_rows": f.rows, "footer_sha256": f.digest}
    if fmt == "hf":
        return {"file_rows": f.rows, "digest": f.digest}
    return {"file_size": f.size, "file_rows": f.rows, "digest": f.digest}


def make_plan(m: Manifest) -> Plan:
    """The deterministic shard plan of a manifest's input (same input + rows_per_shard -> same shards)."""
    source, inspected = inspect_input(m)
    if source.format == "openai":
        check_batch_input(m, inspected)
    elif m.output.format == "openai":
        raise InvalidJob(f"output.format openai answers OpenAI batch requests, but input {m.input.uri} is "
                         f"{source.format}; give an OpenAI batch file (or choose parquet or jsonl output)")
    for info in inspected if source.format != "openai" else ():
        check_columns(info, m)
    keep = resolve_keep(m, inspected[0].schema) if source.format != "openai" else []
    for info in inspected[1:]:
        missing = [c for c in keep if c not in info.schema.names]
        if missing:
            raise InvalidJob(f"input {info.uri} lacks kept column(s) {', '.join(missing)} that "
                             f"{inspected[0].relpath} has; list input.keep_columns explicitly")
    files = [InputFile(i.uri, i.relpath, i.rows, i.size, i.digest) for i in inspected]
    if m.input.id_column:
        _check_ids([i.ids for i in inspected], files, m.input.id_column)
    shards, n = [], m.input.rows_per_shard
    for f in files:
        pin = _pin(f, source.format)
        for start in range(0, f.rows, n):
            shards.append(Shard(index=len(shards), file=f.uri, relpath=f.relpath, start=start,
                                stop=min(start + n, f.rows), **pin))
    h = hashlib.sha256()
    h.update(f"{source.format}|{m.input.text_column}|{m.input.id_column}|{keep}|{n}\n".encode())
    if m.input.column_types:  # (absent from older plans' fingerprints, which stay as they were)
        h.update(f"types {sorted(m.input.column_types.items())}\n".encode())
    for f in files:
        h.update(f"{f.relpath}|{f.size}|{f.rows}|{f.digest}\n".encode())
    if not shards:
        raise InvalidJob(f"input.uri {m.input.uri} has no rows")
    return Plan(source=source, files=files, shards=shards, fingerprint=h.hexdigest(), keep_columns=keep)


def check_model_source(m: Manifest) -> None:
    """Fail early (InvalidJob) on a model source that cannot be found or cannot serve the manifest (no tokenizer,
    no chat template when asked for one, too few positions). A hub id not in the local cache is checked by fetching
    its config.json only, never the weights."""
    from fastdllm.models import inspect

    src = m.model.source
    try:
        info = inspect(src, m.model.revision, config_only=True)
        cfg = info.require_config()
        info.require_tokenizer()
        from fastdllm.block_causal import check_cache

        check_cache(cfg, m.decode.config.cache)
    except (ValueError, OSError) as e:
        raise InvalidJob(f"model.source: {e}") from None
    if m.model.chat_template is True and info.chat_template is False:
        raise InvalidJob(f"model.chat_template: the tokenizer of {src} has no chat template; give a Jinja "
                         "template string instead, or set it to false")
    gen = m.decode.config.gen_length
    if gen >= cfg.max_seq_len:  # every prompt would be too long: fail here, not after loading the model everywhere
        raise InvalidJob(f"decode.gen_length is {gen} but model {src} takes {cfg.max_seq_len} positions (prompt + "
                         f"generated); lower decode.gen_length below {cfg.max_seq_len}")
