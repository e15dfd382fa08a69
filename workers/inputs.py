"""Input datasets: list, inspect (for planning) and read (for a shard) Parquet, JSON Lines and CSV files, and
Hugging Face datasets (a `save_to_disk` directory, or a hub dataset already in the local cache).

Planning and reading share this module so that both see the same rows in the same order: a shard is rows
[start, stop) of one planned source, and `<relpath>:<row>` is a stable derived row id.

How each format is counted and pinned (what the plan records in each Shard and the worker checks before reading;
a mismatch is a ShardDataError, which the driver does not retry):
- Parquet: rows from the footer; pinned by file size, row count and the sha256 of the footer (file_size,
  file_rows, footer_sha256); the worker reads only the row groups it needs.
- JSONL / CSV: the whole file is read and parsed at planning (there is no footer to count rows from); pinned by
  size and the sha256 of its (decompressed) bytes (file_size, digest). A worker reads the whole file again and
  keeps the last one it parsed, so the consecutive shards it gets from one file are parsed once.
- Hugging Face dataset: rows = len(dataset); pinned by the dataset's own fingerprint (datasets' `_fingerprint`,
  kept in state.json by save_to_disk and in the cache's metadata) as `digest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .storage import expand_env, filesystem, parquet_footer, storage_error

# By extension (a `.json` file may be one JSON document, not lines: name it .jsonl or set input.format: jsonl).
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
FORMATS = ("auto", "parquet", "jsonl", "csv", "hf", "openai")  # openai: OpenAI Batch API request lines (JSONL)
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # read through fsspec's compression="infer"
HF_MARKERS = ("state.json", "dataset_dict.json")  # a directory written by Dataset(Dict).save_to_disk
GLOB_CHARS = "*?["


class InputError(ValueError):
    """The input cannot be listed or planned; the message names the path and what to change."""


class ShardDataError(Exception):
    """The shard's input is wrong (the file changed since planning, values cannot be decoded): retrying cannot
    help, so the driver does not; the message says what to fix."""


def changed(uri: str, what: str) -> ShardDataError:
    return ShardDataError(f"input file {uri} changed since the job was planned ({what}); fix the input: restore "
                          "the planned file, or rerun with --force to plan the new input")


@dataclass(frozen=True)
class InputSource:
    """Where a job's rows come from: `uri` (a file, glob, directory, or hub dataset name), its resolved format,
    and for Hugging Face datasets the config and split."""

    uri: str
    format: str = "parquet"  # parquet | jsonl | csv | hf
    config: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Inspected:
    """What planning learns from one input file (or HF dataset): rows, size, digest, schema, and the ids."""

    uri: str
    relpath: str
    rows: int
    size: int
    digest: str
    schema: pa.Schema
    ids: pa.ChunkedArray | None


def file_format(path: str) -> str | None:
    """The format a file name implies (compression suffixes looked through), or None."""
    p = PurePosixPath(path.lower())
    if p.suffix in COMPRESSIONS:  # JSONL and CSV only: Parquet compresses inside the file
        fmt = FILE_FORMATS.get(p.with_suffix("").suffix)
        return fmt if fmt != "parquet" else None
    return FILE_FORMATS.get(p.suffix)


def _fs(uri: str, storage_options: dict | None):
    try:
        return filesystem(uri, storage_options)
    except ValueError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # an unknown protocol's missing package, bad storage options
        raise InputError(f"cannot open {uri}: {storage_error(e)}") from None


def resolve_input(uri: str, fmt: str, config: str | None, split: str | None, storage_options: dict | None
                   ) -> InputSource:
    """The InputSource a manifest's input names: format `auto` becomes `hf` for a save_to_disk directory, else
    the format of the files' extensions (all files must agree)."""
    if fmt == "auto":
        fs, path = _fs(uri, storage_options)
        try:
            if not any(c in path for c in GLOB_CHARS) and _is_hf_dir(fs, path):
                fmt = "hf"
        except Exception as e:  # permissions, unreachable endpoint, missing bucket or credentials, bad options
            raise InputError(f"cannot list input.uri {uri}: {storage_error(e)}") from None
    if fmt == "hf":
        return InputSource(uri, "hf", config, split)
    if config or split:
        raise InputError("input.config and input.split apply to Hugging Face datasets only (input.format: hf)")
    return InputSource(uri, fmt)


def _is_hf_dir(fs, path: str) -> bool:
    """Whether `path` is a directory written by save_to_disk (storage errors propagate)."""
    return fs.isdir(path) and any(fs.isfile(f"{path.rstrip('/')}/{m}") for m in HF_MARKERS)


def list_files(source: InputSource, storage_options: dict | None) -> tuple[str, list[tuple[str, str]]]:
    """(format, [(uri, relpath)]) of the files `source.uri` names: a file, a glob, or a directory searched
    recursively for files of the format (any known format when it is `auto`; then they must all agree)."""
    uri, fmt = source.uri, source.format
    fs, path = _fs(uri, storage_options)
    by_name = "jsonl" if fmt == "openai" else fmt  # an OpenAI batch file is a JSONL file
    wanted = (lambda p: file_format(p) is not None) if fmt == "auto" else (lambda p: file_format(p) == by_name)
    try:
        if any(c in path for c in GLOB_CHARS):
            base = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            found = [p for p in sorted(fs.glob(path)) if fs.isfile(p)]
            if not found:
                raise InputError(f"input.uri {uri} matched no files")
        elif fs.isdir(path):
            base = path.rstrip("/")
            found = sorted(p for p in fs.find(path) if wanted(p))
            if not found:
                what = "Parquet, JSONL or CSV" if fmt == "auto" else fmt
                raise InputError(f"input.uri {uri} is a directory with no {what} files "
                                 f"({', '.join(k for k, v in FILE_FORMATS.items() if fmt in ('auto', v))})")
        elif fs.isfile(path):
            base, found = path.rsplit("/", 1)[0] if "/" in path else "", [path]
        else:
            raise InputError(f"input.uri {uri} does not exist")
    except InputError:
        raise
    except Exception as e:  # permissions, unreachable endpoint, missing bucket or credentials, bad options
        raise InputError(f"cannot list input.uri {uri}: {storage_error(e)}") from None
    if fmt == "auto":
        kinds = {p: file_format(p) for p in found}
        unknown = [p for p, k in kinds.items() if k is None]
        if unknown:
            raise InputError(f"cannot tell the format of {unknown[0]} from its name; set input.format "
                             f"({', '.join(FORMATS[1:])})")
        if len(set(kinds.values())) > 1:
            raise InputError(f"input.uri {uri} mixes formats ({', '.join(sorted(set(kinds.values())))}); "
                             "point it at one format, or set input.format to read only that one")
        fmt = next(iter(kinds.values()))
    out = []
    for p in found:
        rel = p[len(base):].lstrip("/") if base and p.startswith(base) else PurePosixPath(p).name
        out.append((fs.unstrip_protocol(p) if "://" in uri else p, rel))
    return fmt, out


# -- Parquet ---------------------------------------------------------------------------------------------------

def inspect_parquet(uri: str, relpath: str, id_column: str | None, storage_options: dict | None) -> Inspected:
    """Rows, footer hash, schema and ids of a Parquet file, reading only its footer and the id column."""
    fs, path = _fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            size = f.size if f.size is not None else fs.size(path)
            footer = parquet_footer(f, size)
            if footer is None:
                raise InputError(f"input file {uri} is not a Parquet file (no PAR1 footer)")
            f.seek(0)
            # No pre-buffering or reader threads on a Python file object: arrow's pool would release its buffers
            # after we return, and a release racing interpreter exit aborts the process ("terminate called
            # without an active exception"), seen on `fastdllm plan` about one run in ten.
            pf = pq.ParquetFile(f, pre_buffer=False)
            schema = pf.schema_arrow
            ids = None
            if id_column and id_column in schema.names:
                ids = pf.read(columns=[id_column], use_threads=False).column(0)
            rows = pf.metadata.num_rows
    except InputError:
        raise
    except Exception as e:  # storage errors of any fsspec backend, arrow errors
        raise InputError(f"input file {uri} is unreadable or not valid Parquet: {storage_error(e)}") from None
    return Inspected(uri, relpath, rows, size, hashlib.sha256(footer).hexdigest(), schema, ids)


def _num_rows(f) -> int | None:
    try:
        return pq.ParquetFile(f, pre_buffer=False).metadata.num_rows
    except (pa.ArrowException, OSError):
        return None


def _check_pinned(shard, f) -> None:
    """ShardDataError when the open Parquet file is not the one planned: its size, else its footer (which holds
    the row count and the schema), differs. Checked before Parquet parses anything, so a file caught half
    rewritten is reported as changed too."""
    size = f.size if getattr(f, "size", None) is not None else f.seek(0, 2)
    why = None
    if shard.file_size is not None and size != shard.file_size:
        why = f"{shard.file_size} -> {size} bytes"
        rows = _num_rows(f)
        if rows is not None and rows != shard.file_rows:
            why += f", {shard.file_rows} -> {rows} rows"
    elif shard.footer_sha256 is not None:
        footer = parquet_footer(f, size)
        if footer is None or hashlib.sha256(footer).hexdigest() != shard.footer_sha256:
            why = "its Parquet footer differs"
    if why:
        raise changed(shard.file, why)


def _recheck_pin(shard, storage_options: dict | None) -> None:
    """After a failed read: ShardDataError when the file is no longer the planned one (gone, or its size or
    footer changed), else nothing. A file rewritten while a worker reads it fails in arrow with errors that look
    like storage errors ("Column cannot have more than one dictionary", a short read): only the pin tells a
    changed input, which is never retried, from a transient storage error, which is."""
    try:
        fs, path = filesystem(shard.file, storage_options)
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise changed(shard.file, "it no longer exists") from None
    except Exception:  # the store is unreachable: the read error stays what it was
        return
    with f:
        _check_pinned(shard, f)


def read_shard_rows(shard, columns: list[str], storage_options: dict | None = None) -> pa.Table:
    """A Parquet shard's rows of `columns`, reading only the row groups that overlap it. The file must still be
    the planned one, and its values must decode: otherwise ShardDataError. Any other error is re-checked against
    the pin first (see _recheck_pin); only an error on a file that still matches it propagates (the driver
    retries the shard). The pin is checked again after a read that succeeded: a file rewritten in place after
    the first check can read "fine" with the new file's rows."""
    try:
        table = _read_shard_rows(shard, columns, storage_options)
    except ShardDataError:
        raise
    except Exception:
        _recheck_pin(shard, storage_options)
        raise
    _recheck_pin(shard, storage_options)
    if table.num_rows != shard.rows:
        raise changed(shard.file, f"rows [{shard.start}, {shard.stop}) read as {table.num_rows} rows")
    return table


def _read_shard_rows(shard, columns: list[str], storage_options: dict | None) -> pa.Table:
    fs, path = filesystem(shard.file, storage_options)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise changed(shard.file, "it no longer exists") from None
    with f:
        _check_pinned(shard, f)
        try:
            pf = pq.ParquetFile(f, pre_buffer=False)  # no background reads: see inspect_parquet
            groups, offset, first = [], 0, None
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < shard.stop and offset + n > shard.start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            if not groups:
                return pf.schema_arrow.empty_table().select(columns)
            table = pf.read_row_groups(groups, columns=columns, use_threads=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            _recheck_pin(shard, storage_options)  # a file rewritten under the reader: changed, not undecodable
            raise ShardDataError(f"input file {shard.file} rows [{shard.start}, {shard.stop}) cannot be decoded "
                                 f"({type(e).__name__}: {e}); fix the input file") from None
    return table.select(columns).slice(shard.start - (first or 0), shard.rows)


# -- JSON Lines and CSV ----------------------------------------------------------------------------------------

def _fetch(uri: str, storage_options: dict | None) -> bytes:
    """A file's (decompressed) bytes; storage errors propagate as they are."""
    fs, path = _fs(uri, storage_options)
    with fs.open(path, "rb", compression="infer") as f:
        return f.read()


def _read_bytes(uri: str, storage_options: dict | None) -> bytes:
    """`_fetch` for planning: any storage error is an InputError naming the file."""
    try:
        return _fetch(uri, storage_options)
    except InputError:
        raise
    except Exception as e:  # storage errors of any fsspec backend
        raise InputError(f"input file {uri} is unreadable: {storage_error(e)}") from None


# Field metadata of a JSONL column kept as each value's JSON text: its values had no Arrow type that holds them
# exactly (mixed types, objects with differing keys, ints beyond int64, 2 beside 2.5). A JSONL output writes the
# values back as the JSON they were; a Parquet output holds the text.
JSON_TEXT = {b"fastdllm.json": b"text"}


def is_json_text(f: pa.Field) -> bool:
    return bool(f.metadata) and f.metadata.get(b"fastdllm.json") == b"text"


def arrow_type(name: str) -> pa.DataType:
    """An Arrow type from its name (string, int64, float64, bool, date32, timestamp[s] ...); ValueError naming it."""
    try:
        return pa.type_for_alias(name)
    except (ValueError, KeyError):
        raise ValueError(f"{name!r} is not an Arrow type name (e.g. string, int64, float64, bool, timestamp[s])") \
            from None


def _json_column(name: str, values: list, typed: bool) -> tuple[pa.Field, pa.Array]:
    """A JSONL column: Arrow's own type when it gives every value back exactly (compared as JSON), else the values'
    JSON text (marked JSON_TEXT). `typed`: the prompt or conversation column, which the worker needs as values."""
    if all(v is None for v in values):
        return pa.field(name, pa.string()), pa.nulls(len(values), pa.string())
    try:
        arr = pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        arr = None
    if arr is None and typed:
        kinds = sorted({type(v).__name__ for v in values if v is not None})
        raise InputError(f"column {name!r} mixes JSON types ({', '.join(kinds)}); a prompt or conversation column "
                         "must hold one kind of value")
    if arr is not None and (typed or json.dumps(arr.to_pylist(), sort_keys=True) == json.dumps(values, sort_keys=True)):
        return pa.field(name, arr.type), arr
    text = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
    return pa.field(name, pa.string(), metadata=JSON_TEXT), pa.array(text, pa.string())


def _parse_jsonl(data: bytes, uri: str, typed: tuple[str, ...]) -> pa.Table:
    """JSON Lines as a table, every value as it was: strings stay strings (no timestamps guessed from them),
    numbers keep int or float, missing keys are nulls."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"input file {uri} is not valid JSON Lines: line {line} is not UTF-8") from None
    columns: dict[str, list] = {}
    n = 0
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InputError(f"input file {uri} is not valid JSON Lines (one JSON object per line): line {lineno}: "
                             f"{e}") from None
        if not isinstance(row, dict):
            raise InputError(f"input file {uri} is not valid JSON Lines (one JSON object per line): line {lineno} "
                             f"is a JSON {type(row).__name__}")
        for k, v in row.items():
            columns.setdefault(k, [None] * n).append(v)
        n += 1
        for vs in columns.values():
            if len(vs) < n:
                vs.append(None)
    built = [_json_column(k, vs, k in typed) for k, vs in columns.items()]
    return pa.Table.from_arrays([a for _, a in built], schema=pa.schema([f for f, _ in built]))


def _parse_csv(data: bytes) -> pa.Table:
    # Arrow's own buffer, not a Python file object: arrow's reader threads (open_csv reads ahead in the background)
    # would call back into Python, and one still doing so when the interpreter exits aborts the process
    # ("terminate called without an active exception", exit 134; see inspect_parquet)
    names = pacsv.open_csv(pa.BufferReader(data)).schema.names
    opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in names}, strings_can_be_null=False)
    return pacsv.read_csv(pa.BufferReader(data), convert_options=opts)


def parse_text(data: bytes, fmt: str, uri: str, string_columns: tuple[str, ...] = (),
               column_types: dict[str, str] | None = None) -> pa.Table:
    """A JSONL or CSV file's bytes as a table with the values as they are in the file: every CSV column as text
    (an empty field is "", never null; "007" stays "007"), JSONL values as JSON has them (see _json_column).
    `column_types` ({column: Arrow type name}, input.column_types) converts the columns it names.
    `string_columns` (the prompt column) stay typed values in JSONL for the worker. An OpenAI batch file (fmt
    openai) becomes its (custom_id, request) table: see workers/openai_batch.py."""
    if fmt == "openai":
        from .openai_batch import batch_table

        return batch_table(data, uri)
    try:
        table = _parse_jsonl(data, uri, string_columns) if fmt == "jsonl" else _parse_csv(data)
    except pa.ArrowException as e:
        what = "JSON Lines (one JSON object per line)" if fmt == "jsonl" else "CSV with a header row"
        raise InputError(f"input file {uri} is not valid {what}: {str(e).splitlines()[0]}") from None
    except InputError as e:
        if str(e).startswith("column "):
            raise InputError(f"input file {uri}: {e}") from None
        raise
    for name, type_name in (column_types or {}).items():
        if name not in table.column_names:
            continue  # names the file lacks: planning reports a missing required column itself
        i = table.schema.get_field_index(name)
        col = table.column(i)
        if is_json_text(table.schema.field(i)):
            col = pa.array([None if v is None else json.loads(v) for v in col.to_pylist()])
        if fmt == "csv":  # empty fields of a typed CSV column are nulls
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        try:
            col = col.cast(arrow_type(type_name))
        except (pa.ArrowException, ValueError) as e:
            raise InputError(f"input file {uri}: column {name!r} cannot be read as input.column_types "
                             f"{type_name!r}: {str(e).splitlines()[0]}") from None
        table = table.set_column(i, pa.field(name, col.type), col)
    return table


def inspect_text(uri: str, relpath: str, fmt: str, id_column: str | None, string_columns: tuple[str, ...],
                 storage_options: dict | None, column_types: dict[str, str] | None = None) -> Inspected:
    """Rows, content hash, schema and ids of a JSONL or CSV file (read and parsed whole)."""
    data = _read_bytes(uri, storage_options)
    table = parse_text(data, fmt, uri, string_columns, column_types)
    ids = table.column(id_column) if id_column and id_column in table.column_names else None
    return Inspected(uri, relpath, table.num_rows, len(data), hashlib.sha256(data).hexdigest(), table.schema, ids)


# -- Hugging Face datasets -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _hub_offline():
    """Make `datasets` resolve a hub dataset from the local cache only: no request leaves the process. Both
    libraries read their offline switch from the environment at import, so the switch is flipped here for the
    duration of the call (a job reads what is cached, never downloads on a worker)."""
    import datasets
    import huggingface_hub.constants as hub

    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


# One `datasets` open at a time per process: a worker runs two shards in threads (workers.shards_per_actor), and
# `datasets` is not thread-safe there — its progress bars race on tqdm's class-level lock (seen as "type object
# 'tqdm' has no attribute '_lock'") and _hub_offline flips process-wide switches.
_HF_OPEN = threading.Lock()


def open_hf(source: InputSource, storage_options: dict | None):
    """The `datasets.Dataset` of a save_to_disk directory (any fsspec URI) or of a hub dataset in the local
    cache, with `source.split` chosen from a DatasetDict (required when it has several splits), and the split's
    name."""
    with _HF_OPEN:
        return _open_hf(source, storage_options)


def _open_hf(source: InputSource, storage_options: dict | None):
    import datasets

    fs, path = _fs(source.uri, storage_options)
    try:
        if _is_hf_dir(fs, path):
            if source.config:
                raise InputError(f"input.config applies to hub datasets; {source.uri} is a save_to_disk directory")
            ds = datasets.load_from_disk(source.uri, storage_options=expand_env(storage_options) or None)
        else:
            with _hub_offline():
                ds = datasets.load_dataset(source.uri, source.config, split=source.split)
    except InputError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, its own errors)
        raise InputError(f"input.uri {source.uri} is neither a save_to_disk directory nor a hub dataset in the "
                         f"local cache{f' (config {source.config!r})' if source.config else ''}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if source.split is None and len(splits) == 1:
            return ds[splits[0]], splits[0]
        if source.split not in ds:
            raise InputError(f"input {source.uri} has splits {', '.join(splits)}; set input.split to one of them")
        return ds[source.split], source.split
    if source.split and ds.split is not None and str(ds.split) != source.split:
        raise InputError(f"input {source.uri} holds split {ds.split}, not input.split {source.split!r}")
    return ds, source.split or (str(ds.split) if ds.split is not None else "data")


def inspect_hf(source: InputSource, id_column: str | None, storage_options: dict | None) -> Inspected:
    """Rows, fingerprint, schema and ids of an HF dataset; derived row ids start with its split name (`data`
    for a dataset without one)."""
    ds, split = open_hf(source, storage_options)
    table = ds.with_format("arrow")
    schema = table[:0].schema
    ids = table.select_columns([id_column])[:].column(0) if id_column and id_column in schema.names else None
    return Inspected(source.uri, split, len(ds), 0, ds._fingerprint, schema, ids)


# -- Reading planned shards ------------------------------------------------------------------------------------

class InputReader:
    """Reads the rows of planned shards of one job's input. It keeps the last parsed JSONL/CSV file and the
    opened HF dataset, so the consecutive shards a worker gets from one file are parsed once."""

    def __init__(self, source: InputSource, storage_options: dict | None = None,
                 string_columns: tuple[str, ...] = (), column_types: dict[str, str] | None = None):
        self.source = source
        self.storage_options = storage_options
        self.string_columns = string_columns
        self.column_types = column_types
        self._text: tuple[tuple, pa.Table] | None = None  # ((uri, digest), parsed table)
        self._hf = None

    def read(self, shard, columns: list[str]) -> pa.Table:
        """The rows of a planned shard (workers.Shard), `columns` of them; input that is no longer what the plan
        saw (or is gone) raises ShardDataError (the shard fails as a data error, not retried); other storage
        errors propagate, so the driver retries the shard."""
        try:
            return self._read(shard, columns)
        except InputError as e:  # the planned file no longer parses, the HF dataset is gone
            raise ShardDataError(str(e)) from None

    def _read(self, shard, columns: list[str]) -> pa.Table:
        fmt = self.source.format
        if fmt == "parquet":
            return read_shard_rows(shard, columns, self.storage_options)
        if fmt == "hf":
            if self._hf is None:
                self._hf = open_hf(self.source, self.storage_options)[0]
            if shard.digest is not None and self._hf._fingerprint != shard.digest:
                raise changed(shard.file, f"dataset fingerprint {shard.digest} -> {self._hf._fingerprint}")
            return self._hf.select_columns(columns).with_format("arrow")[shard.start : shard.stop]
        key = (shard.file, shard.digest)
        if self._text is None or self._text[0] != key or shard.digest is None:
            try:  # a storage error (a timeout...) propagates: the driver retries the shard, as for Parquet
                data = _fetch(shard.file, self.storage_options)
            except FileNotFoundError:
                raise changed(shard.file, "it no longer exists") from None
            if shard.file_size is not None and len(data) != shard.file_size:
                raise changed(shard.file, f"{shard.file_size} -> {len(data)} bytes")
            if shard.digest is not None and hashlib.sha256(data).hexdigest() != shard.digest:
                raise changed(shard.file, "its content differs")
            self._text = (key, parse_text(data, fmt, shard.file, self.string_columns,
                                                 self.column_types))
        return self._text[1].select(columns).slice(shard.start, shard.rows)
