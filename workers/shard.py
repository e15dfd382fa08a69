"""`ShardWorker`: loads a model once, then decodes whole shards: read rows (from the planned file only) ->
validate -> sort by prompt length -> decode (one continuous-batching generate() call, `batch_size` rows in
flight) -> commit through `JobOutput` (shards/NNNNN.parquet, then stats/NNNNN.json, the commit marker, always last).

A plain class: the job driver wraps it with `ray.remote`; tests and notebooks use it directly.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

import fastdllm

from .output import DataFile, JobOutput, ShardRecord, now
from .stats import ShardStats
from .storage import filesystem, parquet_footer

log = logging.getLogger("fastdllm.workers")

OUTPUT_SCHEMA_TAIL = [  # the output columns after `id` (whose type follows the input's id column)
    pa.field("prompt", pa.string()),
    pa.field("completion", pa.string()),
    pa.field("completion_ids", pa.list_(pa.int32())),
    pa.field("n_tokens", pa.int32()),
    pa.field("nfe", pa.int32()),
    pa.field("finish_reason", pa.string()),  # stop | length | error
    pa.field("error", pa.string()),  # null, or why the row was not decoded
]


class ShardDataError(Exception):
    """The shard's input is wrong (the file changed since planning, values cannot be decoded): retrying cannot
    help, so the driver does not; the message says what to fix."""


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one input Parquet file. `relpath` (the file relative to the input root) names
    derived row ids, so they survive moving the dataset. file_size, file_rows and footer_sha256 pin the file as
    planned (None: not checked)."""

    index: int
    file: str
    relpath: str
    start: int
    stop: int
    file_size: int | None = None
    file_rows: int | None = None
    footer_sha256: str | None = None

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


@dataclass
class WorkerSettings:
    """Everything a worker needs, from the resolved manifest. storage_options keep their `${VAR}` references;
    each worker expands them from its own environment."""

    model_source: str
    decode: dict
    output_uri: str
    prompt_column: str = "prompt"
    id_column: str | None = None
    model_revision: str | None = None
    dtype: str = "auto"
    device: str | None = None
    chat_template: bool = False
    trust_remote_code: bool = False
    storage_options: dict = field(default_factory=dict)
    batch_size: int = 16
    # Fault injection, for tests of the driver's retries only: {shard index: attempts to fail}. After decoding
    # the shard's rows, `crash` ends the worker process (os._exit), `error` raises RuntimeError, and
    # `hang` sleeps until the driver's shard timeout gives up on the attempt.
    crash: dict[int, int] = field(default_factory=dict)
    error: dict[int, int] = field(default_factory=dict)
    hang: dict[int, int] = field(default_factory=dict)


def seed_id(row_id) -> int:
    """A stable non-negative int for a row id (ints as they are, anything else hashed): seeds the row's noise."""
    if isinstance(row_id, int) and not isinstance(row_id, bool) and row_id >= 0:
        return row_id
    return int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=8).digest(), "little") >> 1


def _num_rows(f) -> int | None:
    try:
        return pq.ParquetFile(f, pre_buffer=False).metadata.num_rows
    except (pa.ArrowException, OSError):
        return None


def _check_pinned(shard: Shard, f) -> None:
    """ShardDataError when the open input file is not the one planned: its size, else its footer (which holds
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
        raise ShardDataError(f"input file {shard.file} changed since the job was planned ({why}); fix the input: "
                             "restore the planned file, or rerun with --force to plan the new input")


def read_shard_rows(shard: Shard, columns: list[str], storage_options: dict | None = None) -> pa.Table:
    """The shard's rows of `columns`, reading only the row groups that overlap it. The file must still be the
    planned one, and its values must decode: otherwise ShardDataError."""
    fs, path = filesystem(shard.file, storage_options)
    with fs.open(path, "rb") as f:
        _check_pinned(shard, f)
        try:
            pf = pq.ParquetFile(f, pre_buffer=False)  # no background reads: see jobs/plan.py
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
            raise ShardDataError(f"input file {shard.file} rows [{shard.start}, {shard.stop}) cannot be decoded "
                                 f"({type(e).__name__}: {e}); fix the input file") from None
    return table.select(columns).slice(shard.start - (first or 0), shard.rows)


def decode_text(column: pa.ChunkedArray) -> tuple[list, dict[int, str]]:
    """The column's values as Python objects, string and binary values decoded as UTF-8; a value that is not
    valid UTF-8 becomes None and is reported in {row within the column: why}, so one bad value costs one row."""
    t = column.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        return column.to_pylist(), {}
    values, bad = [], {}
    for i, raw in enumerate(column.cast(pa.large_binary()).to_pylist()):
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            values.append(None)
            bad[i] = f"not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
    return values, bad


class ShardWorker:
    """Holds one loaded model and tokenizer; `run_shard` decodes and commits one shard at a time."""

    def __init__(self, settings: WorkerSettings):
        import torch

        self.s = settings
        self.device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = fastdllm.load_model(settings.model_source, device=self.device, dtype=settings.dtype,
                                         revision=settings.model_revision)
        self.tok = fastdllm.load_tokenizer(settings.model_source, revision=settings.model_revision,
                                           trust_remote_code=settings.trust_remote_code)
        self.cfg = fastdllm.DecodeConfig.from_dict(settings.decode)
        self.max_prompt = self.model.config.max_seq_len - self.cfg.gen_length
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._warm_up()
        self.out = JobOutput(settings.output_uri, settings.storage_options)

    def _warm_up(self) -> None:
        """Decode one full batch of a one-token prompt, so the first shard does not pay for lazy kernel set-up
        and for growing the allocator's pools to a batch's KV caches and activations."""
        ids = self.tok.encode("0") or [0]
        fastdllm.generate(self.model, [ids] * self.s.batch_size, self.cfg)

    def ready(self) -> str:
        return self.name

    def _encode(self, prompt) -> tuple[list[int] | None, str | None]:
        """(ids, None) for a usable prompt, else (None, why)."""
        if prompt is None:
            return None, "prompt is null"
        if not isinstance(prompt, str):
            return None, f"prompt is a {type(prompt).__name__}, not a string"
        if not prompt.strip():
            return None, "prompt is empty"
        try:
            ids = self.tok.encode(prompt, chat_template=self.s.chat_template)
        except Exception as e:  # a tokenizer failure belongs to the row, not the shard
            return None, f"prompt could not be tokenized: {type(e).__name__}: {e}"
        if not ids:
            return None, "prompt encodes to no tokens"
        if len(ids) > self.max_prompt:
            return None, (f"prompt has {len(ids)} tokens; the model takes at most {self.max_prompt} with "
                          f"gen_length {self.cfg.gen_length} ({self.model.config.max_seq_len} positions)")
        return ids, None

    def _inject_fault(self, shard: Shard, attempt: int) -> None:
        if attempt < self.s.crash.get(shard.index, 0):
            log.warning("fault injection: worker %s exits during shard %s (attempt %d)", self.name, shard.name,
                        attempt)
            os._exit(17)
        if attempt < self.s.error.get(shard.index, 0):
            raise RuntimeError(f"injected fault in shard {shard.name} (attempt {attempt})")
        if attempt < self.s.hang.get(shard.index, 0):
            log.warning("fault injection: worker %s hangs in shard %s (attempt %d)", self.name, shard.name, attempt)
            while True:
                time.sleep(60)

    def run_shard(self, shard: Shard, attempt: int = 0) -> ShardRecord:
        """Decode one shard and commit it; returns its commit record (what stats/NNNNN.json holds). A shard
        whose input is wrong raises ShardDataError (the driver does not retry it)."""
        t0 = time.perf_counter()
        started = now()
        cols = [self.s.prompt_column] + ([self.s.id_column] if self.s.id_column else [])
        table = read_shard_rows(shard, cols, self.s.storage_options)
        read_seconds = time.perf_counter() - t0
        prompts, undecodable = decode_text(table.column(self.s.prompt_column))
        if self.s.id_column:
            id_col = table.column(self.s.id_column)
            ids, bad_ids = decode_text(id_col)
            if bad_ids:
                i, why = next(iter(bad_ids.items()))
                raise ShardDataError(f"input file {shard.file} row {shard.start + i}: id column "
                                     f"{self.s.id_column!r} is {why}; fix the input")
            id_type = id_col.type
        else:
            ids = [f"{shard.relpath}:{shard.start + i}" for i in range(len(prompts))]
            id_type = pa.string()

        n = len(prompts)
        completion_ids: list[list[int] | None] = [None] * n
        nfe = [0] * n
        reasons = ["error"] * n
        errors: list[str | None] = [None] * n
        encoded = []
        for i, p in enumerate(prompts):
            if i in undecodable:
                errors[i] = f"prompt is {undecodable[i]} ({shard.relpath} row {shard.start + i})"
                continue
            enc, why = self._encode(p)
            if why is None:
                encoded.append((len(enc), i, enc))
            else:
                errors[i] = why
        encoded.sort(key=lambda t: (t[0], t[1]))  # rows join in length order: similar lengths are in flight together

        counters = ShardStats(shards=1, rows=n, error_rows=n - len(encoded), read_seconds=read_seconds)
        t_dec = time.perf_counter()
        if encoded:  # the whole shard in one call: a finished row's slot goes to the next prompt at once
            out = fastdllm.generate(self.model, [e for _, _, e in encoded], self.cfg,
                                    row_ids=[seed_id(ids[i]) for _, i, _ in encoded],
                                    max_batch_size=self.s.batch_size)
            for (_, i, _), toks, k, why in zip(encoded, out.tokens, out.nfe, out.finish_reasons):
                completion_ids[i], nfe[i], reasons[i] = toks, k, why
            counters.forward_passes += out.stats["forward_passes"]
            counters.row_forwards += out.stats["row_forwards"]
        counters.decode_seconds = time.perf_counter() - t_dec
        self._inject_fault(shard, attempt)

        texts = [self.tok.decode(t) if t is not None else None for t in completion_ids]
        n_tokens = [len(t) if t is not None else 0 for t in completion_ids]
        counters.generated_tokens = sum(n_tokens)
        counters.nfe = sum(nfe)
        schema = pa.schema([pa.field("id", id_type)] + OUTPUT_SCHEMA_TAIL)
        out_table = pa.table([ids, [p if isinstance(p, str) else None for p in prompts], texts, completion_ids,
                              n_tokens, nfe, reasons, errors], schema=schema)
        t_write = time.perf_counter()
        buf = io.BytesIO()
        pq.write_table(out_table, buf)

        def record(file: DataFile) -> ShardRecord:  # called once the data file is written, before the marker
            counters.write_seconds = time.perf_counter() - t_write
            counters.wall_seconds = time.perf_counter() - t0
            return ShardRecord(shard=shard.index, stats=counters, file=file, worker=self.name, device=self.device,
                               model=self.s.model_source, config=self.cfg.to_dict(), attempt=attempt,
                               started_at=started,
                               finished_at=now())

        return self.out.commit(shard.index, buf.getvalue(), out_table.num_rows, record)
