"""`ShardWorker`: loads a model once, then decodes whole shards: read rows (from the planned input only) ->
validate and template -> sort by prompt length -> decode (one Request per row and sample, through the worker's one
`fastdllm.Engine`, `batch_size` rows in flight) -> commit through `JobOutput` (shards/NNNNN.parquet or .jsonl, then
stats/NNNNN.json, the commit marker, always last).

The engine lives as long as the worker: `run_shard` may run for two shards at once (the driver hands an actor its
next shard before the current one ends), and the next shard's rows join the engine as the current shard's last
rows finish, instead of those decoding in a half-empty batch. Each call still commits exactly its own rows.

A plain class: the job driver wraps it with `ray.remote`; tests and notebooks use it directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

import fastdllm

from .inputs import InputReader, ShardDataError, is_json_text
from .output import DataFile, JobOutput, ShardRecord, now, shard_name
from .spec import OUTPUT_FORMATS, JobSpec  # noqa: F401 - OUTPUT_FORMATS: re-exported
from .stats import ShardStats

log = logging.getLogger("fastdllm.workers")

OUTPUT_SCHEMA_TAIL = [  # the output columns after the id column (JobSpec.id_name; its type is the input's)
    pa.field("sample_index", pa.int32()),  # 0 .. decode.num_samples - 1
    pa.field("prompt", pa.string()),  # the text the model got (after the chat template, when one applies)
    pa.field("completion", pa.string()),
    pa.field("completion_ids", pa.list_(pa.int32())),
    pa.field("n_tokens", pa.int32()),
    pa.field("nfe", pa.int32()),
    pa.field("finish_reason", pa.string()),  # stop | length | error
    pa.field("error", pa.string()),  # null, or why the row was not decoded
]
GENERATED_COLUMNS = tuple(f.name for f in OUTPUT_SCHEMA_TAIL)  # after the id column, before the kept ones


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one planned input file (or HF dataset). `relpath` (the file relative to the input
    root) names derived row ids, so they survive moving the dataset. file_size, file_rows and footer_sha256
    (Parquet) or digest (JSONL/CSV content, HF fingerprint) pin the input as planned (None: not checked; see
    workers/inputs.py)."""

    index: int
    file: str
    relpath: str
    start: int
    stop: int
    file_size: int | None = None
    file_rows: int | None = None
    footer_sha256: str | None = None
    digest: str | None = None

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return shard_name(self.index)


WorkerSettings = JobSpec.local  # a worker's spec without the driver, from settings by name (tests, notebooks)


def seed_id(row_id, sample_index: int = 0) -> int:
    """A stable non-negative int for (row id, sample index) that seeds the sample's noise (passed to
    fastdllm.generate as its row id), so any sample can be recomputed alone. Sample 0 of a non-negative int id is
    the id itself; anything else is hashed."""
    if sample_index == 0 and isinstance(row_id, int) and not isinstance(row_id, bool) and row_id >= 0:
        return row_id
    key = str(row_id) if sample_index == 0 else f"{row_id}\x00{sample_index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def reason_kind(why: str) -> str:
    """An error message with its numbers blanked, so rows failing for the same reason count together."""
    return re.sub(r"\d+", "N", why)


def encode_rows(table: pa.Table, fmt: str) -> bytes:
    """A shard's output table as the bytes of its data file: Parquet, or JSON Lines (one object per row; values
    JSON cannot hold, such as timestamps or bytes, as their text)."""
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()
    rows = table.to_pylist()
    for f in table.schema:  # JSONL values kept as JSON text (workers/inputs.py) go back as the JSON they were
        if is_json_text(f):
            for row in rows:
                if row[f.name] is not None:
                    row[f.name] = json.loads(row[f.name])
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows).encode()


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


class SharedEngine:
    """One Engine that the shards a worker runs at once share: each caller adds its requests and, holding the
    lock, steps the engine until all of them are back (whoever holds the lock steps for everyone); finished
    requests are handed to their own caller. Per caller it counts the steps its rows took part in."""

    def __init__(self, engine: fastdllm.Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.done: dict[int, fastdllm.Finished] = {}
        self.owner: dict[int, ShardStats] = {}  # request id -> the counters of the shard it belongs to
        self.finished_rows = 0  # output rows decoded so far, all callers together (the driver's live progress)

    def run(self, requests: list[fastdllm.Request], counters: ShardStats) -> list[fastdllm.Finished]:
        e = self.engine
        with self.lock:
            ids = [e.add(r) for r in requests]
            self.owner.update((i, counters) for i in ids)
        try:
            while True:
                with self.lock:
                    if all(i in self.done for i in ids):
                        return [self.done.pop(i) for i in ids]
                    forwards = e.stats["forward_passes"]
                    finished = e.step()
                    self.done.update((f.id, f) for f in finished)
                    self.finished_rows += len(finished)
                    took_part: dict[int, list] = {}  # the shards whose rows were in this step: [counters, rows]
                    for r in e.rows.live:
                        c = self.owner[r.request.id]
                        took_part.setdefault(id(c), [c, 0])[1] += 1
                    for c, n_rows in took_part.values():
                        c.forward_passes += e.stats["forward_passes"] - forwards
                        c.row_forwards += n_rows  # each row in flight is in one of the step's forwards
                        c.slot_steps += e.max_batch_size
                        c.rows_in_flight += e.rows.n
        finally:
            with self.lock:
                for i in ids:
                    self.owner.pop(i, None)


class ShardWorker:
    """Holds one loaded model, tokenizer and decoding engine; `run_shard` decodes and commits one shard (two may
    run at once, sharing the engine)."""

    def __init__(self, settings: JobSpec):
        import torch

        self.s = settings
        m = settings.model
        self.device = m.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = fastdllm.load_model(m.source, device=self.device, dtype=m.dtype, revision=m.revision)
        self.tok = fastdllm.load_tokenizer(m.source, revision=m.revision, trust_remote_code=m.trust_remote_code)
        self.max_prompt = self.model.config.max_seq_len - self.cfg.gen_length
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.reader = InputReader(settings.source, settings.storage_options,
                                  string_columns=(settings.input.text_column,),
                                  column_types=settings.input.column_types)
        self._warm_up()
        self._shared: SharedEngine | None = None
        self._shared_lock = threading.Lock()
        self._running = threading.Condition()  # shards in run_shard now, and those of them crashing (faults)
        self._in_flight = self._crashing = 0
        self.out = JobOutput(settings.output.uri, settings.storage_options, ext=settings.output.format)

    @property
    def cfg(self) -> fastdllm.DecodeConfig:
        return self.s.decode.config

    def engine(self) -> SharedEngine:
        """The worker's engine, for the current decode settings and batch size (made anew only when they changed,
        which a notebook or test may do between shards)."""
        with self._shared_lock:
            e = self._shared
            if e is None or e.engine.cfg != self.cfg or e.engine.max_batch_size != self.s.workers.batch_size:
                e = self._shared = SharedEngine(fastdllm.Engine(self.model, self.cfg, tokenizer=self.tok,
                                                                max_batch_size=self.s.workers.batch_size))
            return e

    def rows_decoded(self) -> int:
        """Output rows this worker's engine has decoded so far, committed or not (0 before the first shard)."""
        shared = self._shared
        return shared.finished_rows if shared is not None else 0

    def _warm_up(self) -> None:
        """Decode one full batch of a one-token prompt, so the first shard does not pay for lazy kernel set-up
        and for growing the allocator's pools to a batch's KV caches and activations."""
        ids = self.tok.encode("0") or [0]
        fastdllm.generate(self.model, [ids] * self.s.workers.batch_size, self.cfg)

    def _prompt_text(self, value) -> tuple[str | None, str | None]:
        """(the text the model gets, None) for a usable prompt or conversation, else (None, why)."""
        if value is None:
            return None, f"{'messages' if self.s.input.messages_column else 'prompt'} is null"
        if self.s.input.messages_column:
            if not value:
                return None, "messages is an empty list"
            if any(not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get("role")
                   for m in value):
                return None, "messages has a turn without a role or a text content"
            turns = [{"role": m["role"], "content": m["content"]} for m in value]
            try:
                return self.tok.render(turns, self.s.model.chat_template, self.s.model.system_prompt), None
            except Exception as e:  # a template that raises belongs to the row, not the shard
                return None, f"messages could not be rendered by the chat template: {type(e).__name__}: {e}"
        if not isinstance(value, str):
            return None, f"prompt is a {type(value).__name__}, not a string"
        if not value.strip():
            return None, "prompt is empty"
        try:
            return self.tok.prompt_text(value, self.s.model.chat_template, self.s.model.system_prompt), None
        except Exception as e:
            return None, f"prompt could not be rendered by the chat template: {type(e).__name__}: {e}"

    def _encode(self, value) -> tuple[str | None, list[int] | None, str | None]:
        """(text, ids, None) for a usable prompt, else (text or None, None, why)."""
        text, why = self._prompt_text(value)
        if why is not None:
            return None, None, why
        try:
            ids = self.tok.encode_text(text)
        except Exception as e:  # a tokenizer failure belongs to the row, not the shard
            return text, None, f"prompt could not be tokenized: {type(e).__name__}: {e}"
        if not ids:
            return text, None, "prompt encodes to no tokens"
        if len(ids) > self.max_prompt:
            return text, None, (f"prompt has {len(ids)} tokens; the model takes at most {self.max_prompt} with "
                                f"gen_length {self.cfg.gen_length} ({self.model.config.max_seq_len} positions)")
        return text, ids, None

    def _inject_fault(self, shard: Shard, attempt: int) -> None:
        if attempt < self.s.faults.crash.get(shard.index, 0):
            with self._running:
                self._crashing += 1
                self._running.notify_all()
                self._running.wait_for(lambda: self._in_flight == self._crashing)
            log.warning("fault injection: worker %s exits during shard %s (attempt %d)", self.name, shard.name,
                        attempt)
            os._exit(17)
        if attempt < self.s.faults.error.get(shard.index, 0):
            raise RuntimeError(f"injected fault in shard {shard.name} (attempt {attempt})")
        if attempt < self.s.faults.hang.get(shard.index, 0):
            log.warning("fault injection: worker %s hangs in shard %s (attempt %d)", self.name, shard.name, attempt)
            while True:
                time.sleep(60)

    def _ids(self, table: pa.Table, shard: Shard) -> tuple[list, pa.DataType]:
        """The rows' ids and their type: the id column's, or derived '<relpath>:<row>' strings."""
        if not self.s.input.id_column:
            return [f"{shard.relpath}:{shard.start + i}" for i in range(table.num_rows)], pa.string()
        column = table.column(self.s.input.id_column)
        ids, bad = decode_text(column)
        if bad:
            i, why = next(iter(bad.items()))
            raise ShardDataError(f"input file {shard.file} row {shard.start + i}: id column {self.s.input.id_column!r} "
                                 f"is {why}; fix the input")
        return ids, column.type

    def _prompts(self, table: pa.Table, shard: Shard) -> tuple[list, list, list]:
        """Per input row: the prompt text (as the model gets it; a bad prompt as it came), its token ids (None for
        a bad row) and why it is bad (None for a good one)."""
        values, undecodable = decode_text(table.column(self.s.input.text_column))
        texts, encoded, errors = [], [], []
        for i, v in enumerate(values):
            if i in undecodable:
                text, enc, why = None, None, f"prompt is {undecodable[i]} ({shard.relpath} row {shard.start + i})"
            else:
                text, enc, why = self._encode(v)
            texts.append(text if text is not None or not isinstance(v, str) else v)
            encoded.append(enc)
            errors.append(why)
        return texts, encoded, errors

    def _constraints(self, table: pa.Table, shard: Shard, encoded: list, errors: list) -> list:
        """Each row's output constraint: the job's, or (structured_column) the row's own; a row whose constraint
        cannot be read becomes an error row (encoded and errors are updated in place)."""
        if not self.s.decode.structured_column:
            return [self.s.decode.structured_outputs] * len(encoded)
        from fastdllm.structured import StructuredOutputs

        values, undecodable = decode_text(table.column(self.s.decode.structured_column))
        out = []
        for i, v in enumerate(values):
            spec, why = None, undecodable.get(i)
            if why is None and v is not None:
                try:
                    spec = StructuredOutputs.from_dict(json.loads(v) if isinstance(v, str) else v)
                    spec.check()
                except ValueError as e:
                    why = f"structured_outputs column {self.s.decode.structured_column!r}: {str(e).splitlines()[0]}"
            if why is not None and errors[i] is None:
                errors[i], encoded[i] = why, None
            out.append(spec)
        return out

    def _decode(self, encoded: list, ids: list, counters: ShardStats, shard: Shard, attempt: int,
                constraints: list) -> tuple[list, list, list]:
        """Decode num_samples samples of every good row through the worker's engine (batch_size rows in flight,
        joining in length order: similar lengths are in flight together), sample k of row i seeded by
        seed_id(ids[i], k). Returns completion ids, nfe and finish reasons per output row i * num_samples + k."""
        ns = self.s.decode.num_samples
        todo = sorted((len(e), i, k) for i, e in enumerate(encoded) if e is not None for k in range(ns))
        completion_ids: list[list[int] | None] = [None] * (len(encoded) * ns)
        nfe = [0] * len(completion_ids)
        reasons = ["error"] * len(completion_ids)
        t0 = time.perf_counter()
        if todo:  # a finished row's slot goes to the next prompt at once, of this shard or the next one
            requests = [fastdllm.Request(encoded[i], row_id=seed_id(ids[i], k), structured=constraints[i])
                        for _, i, k in todo]
            for (_, i, k), f in zip(todo, self.engine().run(requests, counters)):
                completion_ids[i * ns + k], nfe[i * ns + k], reasons[i * ns + k] = f.tokens, f.nfe, f.finish_reason
        counters.decode_seconds = time.perf_counter() - t0
        self._inject_fault(shard, attempt)
        counters.nfe = sum(nfe)
        counters.generated_tokens = sum(len(t) for t in completion_ids if t is not None)
        counters.finish_reasons = {r: reasons.count(r) for r in sorted(set(reasons))}
        return completion_ids, nfe, reasons

    def run_shard(self, shard: Shard, attempt: int = 0) -> ShardRecord:
        """Decode one shard and commit it; returns its commit record (what stats/NNNNN.json holds). Each input row
        gives num_samples output rows (row-major, with sample_index), followed by the kept input columns. A shard
        whose input is wrong raises ShardDataError (the driver does not retry it)."""
        with self._running:
            self._in_flight += 1
        try:
            return self._run_shard(shard, attempt)
        finally:
            with self._running:
                self._in_flight -= 1
                self._running.notify_all()

    def _run_shard(self, shard: Shard, attempt: int) -> ShardRecord:
        if self.s.source.format == "openai":  # OpenAI batch request lines in, answer lines out
            from .openai_batch import run_batch_shard

            return run_batch_shard(self, shard, attempt)
        t0 = time.perf_counter()
        started = now()
        table = self.reader.read(shard, self.s.input_columns)
        read_seconds = time.perf_counter() - t0
        ids, id_type = self._ids(table, shard)
        texts, encoded, errors = self._prompts(table, shard)
        constraints = self._constraints(table, shard, encoded, errors)
        bad = [reason_kind(e) for e in errors if e is not None]
        counters = ShardStats(shards=1, rows=table.num_rows, error_rows=len(bad), read_seconds=read_seconds,
                              error_reasons={k: bad.count(k) for k in set(bad)})
        completion_ids, nfe, reasons = self._decode(encoded, ids, counters, shard, attempt, constraints)

        ns = self.s.decode.num_samples
        rows = [i for i in range(table.num_rows) for _ in range(ns)]  # the input row of each output row
        id_column = self.s.input.id_column
        id_meta = table.schema.field(id_column).metadata if id_column else None  # JSON text ids
        schema = pa.schema([pa.field(self.s.id_name, id_type, metadata=id_meta)] + OUTPUT_SCHEMA_TAIL)
        out_table = pa.table([[ids[i] for i in rows], [k for _ in range(table.num_rows) for k in range(ns)],
                              [texts[i] for i in rows],
                              [self.tok.decode(t) if t is not None else None for t in completion_ids],
                              completion_ids, [len(t) if t is not None else 0 for t in completion_ids], nfe, reasons,
                              [errors[i] for i in rows]], schema=schema)
        kept = table.select(list(self.s.keep_columns)).take(pa.array(rows, pa.int64()))
        for f, column in zip(kept.schema, kept.columns):
            out_table = out_table.append_column(f, column)  # the field, so its metadata (JSON text) stays
        t_write = time.perf_counter()
        data = encode_rows(out_table, self.s.output.format)

        def record(file: DataFile) -> ShardRecord:  # called once the data file is written, before the marker
            counters.write_seconds = time.perf_counter() - t_write
            counters.wall_seconds = time.perf_counter() - t0
            return ShardRecord(shard=shard.index, stats=counters, file=file, worker=self.name, device=self.device,
                               dtype=str(self.model.dtype).removeprefix("torch."), model=self.s.model.source,
                               config=self.s.identity()["decode"],
                               attempt=attempt, started_at=started, finished_at=now())

        return self.out.commit(shard.index, data, out_table.num_rows, record, run_id=self.s.run_id)
