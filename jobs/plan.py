"""Shard planning: list the input Parquet files, check their columns and ids, fingerprint them, and cut them
into deterministic shards (rows [start, stop) of one file, `rows_per_shard` at most). Reads only footers and
the id column; every problem raises InvalidJob naming the path."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers import Shard
from workers.storage import filesystem, parquet_footer, storage_error

from .manifest import InvalidJob, Manifest

log = logging.getLogger("fastdllm.jobs")
GLOB_CHARS = "*?["
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class InputFile:
    uri: str
    relpath: str
    rows: int
    size: int
    footer_sha256: str


@dataclass
class Plan:
    files: list[InputFile]
    shards: list[Shard]
    fingerprint: str  # hash of the files (names, sizes, row counts, footers) and the columns read

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "rows": self.rows,
                "files": [vars(f) for f in self.files], "shards": [vars(s) for s in self.shards]}


def _fs(uri: str, storage_options: dict):
    try:
        return filesystem(uri, storage_options)
    except ValueError as e:
        raise InvalidJob(str(e)) from None
    except (ImportError, OSError) as e:
        raise InvalidJob(f"cannot open {uri}: {type(e).__name__}: {e}") from None


def list_input_files(uri: str, storage_options: dict) -> list[tuple[str, str]]:
    """(path, relpath) of the Parquet files `uri` names (a file, a glob, or a directory searched recursively)."""
    fs, path = _fs(uri, storage_options)
    try:
        if any(c in path for c in GLOB_CHARS):
            base = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            found = [p for p in sorted(fs.glob(path)) if fs.isfile(p)]
            if not found:
                raise InvalidJob(f"input.uri {uri} matched no files")
        elif fs.isdir(path):
            base = path.rstrip("/")
            found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
            if not found:
                raise InvalidJob(f"input.uri {uri} is a directory with no *.parquet files")
        elif fs.isfile(path):
            base, found = path.rsplit("/", 1)[0] if "/" in path else "", [path]
        else:
            raise InvalidJob(f"input.uri {uri} does not exist")
    except InvalidJob:
        raise
    except Exception as e:  # permissions, unreachable endpoint, missing bucket or credentials, bad options
        raise InvalidJob(f"cannot list input.uri {uri}: {storage_error(e)}") from None
    out = []
    for p in found:
        rel = p[len(base) :].lstrip("/") if base and p.startswith(base) else Path(p).name
        out.append((fs.unstrip_protocol(p) if "://" in uri else p, rel))
    return out


def _inspect(uri: str, relpath: str, m: Manifest) -> tuple[InputFile, pa.Array | None]:
    """Row count, footer hash and (when there is an id column) the ids of one file; checks its columns."""
    fs, path = _fs(uri, m.storage_options)
    try:
        with fs.open(path, "rb") as f:
            size = f.size if f.size is not None else fs.size(path)
            footer = parquet_footer(f, size)
            if footer is None:
                raise InvalidJob(f"input file {uri} is not a Parquet file (no PAR1 footer)")
            f.seek(0)
            # No pre-buffering or reader threads on a Python file object: arrow's pool would release its buffers
            # after we return, and a release racing interpreter exit aborts the process ("terminate called
            # without an active exception"), seen on `fastdllm plan` about one run in ten.
            pf = pq.ParquetFile(f, pre_buffer=False)
            columns = pf.schema_arrow.names
            wanted = [m.input.prompt_column] + ([m.input.id_column] if m.input.id_column else [])
            for kind, col in zip(("prompt_column", "id_column"), wanted):
                if col not in columns:
                    raise InvalidJob(f"input {uri} has no column {col!r} (input.{kind}; columns: "
                                     f"{', '.join(columns)})")
            ids = pf.read(columns=[m.input.id_column], use_threads=False).column(0) if m.input.id_column else None
            rows = pf.metadata.num_rows
    except InvalidJob:
        raise
    except Exception as e:  # storage errors of any fsspec backend, arrow errors
        raise InvalidJob(f"input file {uri} is unreadable or not valid Parquet: {storage_error(e)}") from None
    return InputFile(uri, relpath, rows, size, hashlib.sha256(footer).hexdigest()), ids


def _check_ids(ids: list[pa.ChunkedArray], files: list[InputFile], column: str) -> None:
    for arr, f in zip(ids, files):
        if arr.null_count:
            raise InvalidJob(f"input {f.uri} has {arr.null_count} null ids in column {column!r}; every row needs one")
        if not (pa.types.is_integer(arr.type) or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
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


def make_plan(m: Manifest) -> Plan:
    """The deterministic shard plan of a manifest's input (same input + rows_per_shard -> same shards)."""
    files, ids = [], []
    for uri, rel in list_input_files(m.input.uri, m.storage_options):
        info, file_ids = _inspect(uri, rel, m)
        files.append(info)
        ids.append(file_ids)
    if m.input.id_column:
        _check_ids(ids, files, m.input.id_column)
    shards, n = [], m.input.rows_per_shard
    for f in files:
        for start in range(0, f.rows, n):
            shards.append(Shard(index=len(shards), file=f.uri, relpath=f.relpath, start=start,
                                stop=min(start + n, f.rows), file_size=f.size, file_rows=f.rows,
                                footer_sha256=f.footer_sha256))
    h = hashlib.sha256()
    h.update(f"{m.input.prompt_column}|{m.input.id_column}|{n}\n".encode())
    for f in files:
        h.update(f"{f.relpath}|{f.size}|{f.rows}|{f.footer_sha256}\n".encode())
    if not shards:
        raise InvalidJob(f"input.uri {m.input.uri} has no rows")
    return Plan(files=files, shards=shards, fingerprint=h.hexdigest())


def check_model_source(m: Manifest) -> dict:
    """Fail early (InvalidJob) on a model source that cannot be found; returns its config.json summary.
    A hub id is checked by fetching config.json only, never the weights."""
    from fastdllm.models import BUILTIN, read_config, resolve_source

    src = m.model.source
    try:
        if src in BUILTIN or Path(src).expanduser().is_dir():
            path = resolve_source(src, m.model.revision)
        elif src.count("/") == 1 and not src.startswith((".", "/", "~")):
            path = _hub_config_dir(src, m.model.revision)
        else:
            path = resolve_source(src, m.model.revision)  # raises the library's message
        cfg = read_config(Path(path))
        if Path(src).expanduser().is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"model directory {path} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})")
    except (ValueError, OSError) as e:
        raise InvalidJob(f"model.source: {e}") from None
    gen = m.decode["gen_length"]
    if gen >= cfg.max_seq_len:  # every prompt would be too long: fail here, not after loading the model everywhere
        raise InvalidJob(f"decode.gen_length is {gen} but model {src} takes {cfg.max_seq_len} positions (prompt + "
                         f"generated); lower decode.gen_length below {cfg.max_seq_len}")
    return {"family": cfg.family, "max_seq_len": cfg.max_seq_len}


def _hub_config_dir(repo: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision, local_files_only=True)).parent
    except Exception:
        pass
    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision)).parent
    except Exception as e:
        raise ValueError(f"model source {repo!r} is not a built-in name, a local directory, or a Hugging Face "
                         f"repo id that could be found ({type(e).__name__})") from None
