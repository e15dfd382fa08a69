"""The job's settings: the manifest's pydantic models (what a job YAML holds; `fastdllm plan --schema` lists them)
and `JobSpec`, the frozen spec the driver makes once from the validated manifest and its plan and sends to every
worker as it is (docs/DESIGN.md, "The job spec"). Here, under workers/, so that the worker reads the manifest's own
sub-models; jobs/manifest.py re-exports them and keeps the YAML loading and the one-line errors."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

import fastdllm

from .inputs import FORMATS, InputSource

OUTPUT_FORMATS = ("parquet", "jsonl", "openai")  # openai: OpenAI Batch API answer lines (workers/openai_batch.py)
MAX_SAMPLES = 10_000  # decode.num_samples: output rows per prompt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_TYPE_ERROR = re.compile(r"\w+ must be (an integer|a number|true or false|text), got ")


def _decode_config(v: dict) -> fastdllm.DecodeConfig:
    """DecodeConfig.from_dict: its __post_init__ is the one check of the decode fields."""
    try:
        return fastdllm.DecodeConfig.from_dict(v)
    except ValueError as e:
        msg = str(e)  # a wrong type names the field in full, as the manifest spells it (decode.threshold)
        raise ValueError(f"decode.{msg}" if _TYPE_ERROR.match(msg) else msg) from None


class DecodeSpec(BaseModel):
    """The manifest's decode section: fastdllm.DecodeConfig's fields (kept as the typed config that workers
    receive) plus num_samples, the output rows drawn per prompt, and structured_outputs, the constraint of every
    row's output ({json: schema | true, regex: ..., choice: [...], grammar: lark}; README, "Structured outputs")."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    config: fastdllm.DecodeConfig
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES, description=(
        f"Output rows drawn per prompt (1 to {MAX_SAMPLES}); more than 1 needs temperature > 0 or remasking random."))
    structured_outputs: fastdllm.StructuredOutputs | None = Field(None, description=(
        "Every row's output constraint: {json: schema | true}, {regex: ...}, {choice: [...]} or {grammar: lark}; "
        "or {column: NAME}: each row's own constraint, JSON text in input column NAME (null: none)."))
    structured_column: str | None = Field(None, description="Set by structured_outputs: {column: NAME}.")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, dict):
            v = dict(v)
            n = v.pop("num_samples", 1)
            so = v.pop("structured_outputs", None)
            column = None
            if isinstance(so, dict) and "column" in so:
                column, so = so.pop("column"), (so or None)
                if not isinstance(column, str) or not column or so:
                    raise ValueError("structured_outputs {column: NAME} takes one column name and nothing else")
            if so is not None:
                try:
                    so = fastdllm.StructuredOutputs.from_dict(so)
                    so.check()  # the grammar engine is installed and reads the constraint
                except ImportError as e:
                    raise ValueError(str(e)) from None
            return {"config": _decode_config(v), "num_samples": n, "structured_outputs": so,
                    "structured_column": column}
        return v

    @model_validator(mode="after")
    def _samples_differ(self):
        c = self.config
        if self.num_samples > 1 and c.temperature == 0 and c.remasking == "low_confidence":
            raise ValueError(f"num_samples {self.num_samples} would give identical samples: decoding is greedy "
                             "(temperature 0, remasking low_confidence); set temperature > 0 or remasking random")
        return self

    @model_serializer
    def _resolved(self) -> dict:
        """Every DecodeConfig field (defaults filled in) and num_samples, flat as in the manifest; with
        structured_outputs when set (a job without one keeps its identity)."""
        out = {**self.config.to_dict(), "num_samples": self.num_samples}
        if self.structured_outputs is not None:
            out["structured_outputs"] = self.structured_outputs.to_dict()
        if self.structured_column is not None:
            out["structured_outputs"] = {"column": self.structured_column}
        return out


DTYPES = fastdllm.models.DTYPE_NAMES  # defined once, where models are loaded


class ModelSpec(_Strict):
    source: str = Field(description="Built-in name (tiny), a local checkpoint directory, or a Hugging Face repo id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a repo id.")
    dtype: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.")
    device: str | None = Field(None, description="cpu, cuda, ...; default: cuda when the worker has a GPU.")
    chat_template: bool | str = Field(False, description=(
        "true: render prompts with the checkpoint's chat template (a prompt becomes a user turn); a string: this "
        "Jinja template instead; false: prompts go to the model as they are. Required by messages_column."))
    system_prompt: str | None = Field(None, description=(
        "Prepended as a system turn to every conversation that has none of its own (needs a chat template)."))
    trust_remote_code: bool = Field(False, description="Let the tokenizer run code from the checkpoint (opt-in).")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v):
        if isinstance(v, str):
            import jinja2

            if not v.strip():
                raise ValueError("an empty template string; use true (the checkpoint's template) or false")
            try:
                jinja2.Environment().parse(v)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"the template is not valid Jinja (line {e.lineno}: {e.message})") from None
        return v


class InputSpec(_Strict):
    uri: str = Field(description=(
        "A Parquet, JSONL or CSV file, a glob, or a directory of them; any fsspec URI (file, s3://, gs://, "
        "memory://, hf://datasets/owner/name/...). Or a Hugging Face dataset: a save_to_disk directory, or "
        "(format: hf) a hub dataset name present in the local cache."))
    format: Literal[FORMATS] = Field("auto", description=(
        "auto (from the file extensions; a save_to_disk directory is hf), parquet, jsonl, csv or hf."))
    config: str | None = Field(None, description="Hub dataset config name (format hf).")
    split: str | None = Field(None, description="Dataset split (format hf; needed when it has several).")
    prompt_column: str | None = Field(None, description="Column holding the prompt text (default: prompt).")
    messages_column: str | None = Field(None, description=(
        "Column holding a conversation instead: a list of {role, content}; needs model.chat_template."))
    id_column: str | None = Field(None, description="Column of unique row ids; without it, ids are derived as "
                                                    "'<file relative to the input root>:<row>'.")
    keep_columns: list[str] | Literal["all"] = Field(default_factory=list, description=(
        "Input columns copied to the output next to the generated ones: a list, or all."))
    rows_per_shard: int = Field(1000, gt=0, description="Rows per shard (a shard never spans two files).")
    column_types: dict[str, str] = Field(default_factory=dict, description=(
        "CSV and JSONL only: {column: Arrow type} (int64, float64, bool, timestamp[s] ...) for columns to convert. "
        "Without it every CSV column is read as text, exactly as written (\"007\" stays \"007\"), and JSONL "
        "values as JSON has them."))

    @field_validator("column_types")
    @classmethod
    def _types(cls, v):
        from fastdllm.workers.inputs import arrow_type

        for name, t in v.items():
            try:
                arrow_type(t)
            except ValueError as e:
                raise ValueError(f"column {name!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_prompt_source(self):
        if self.prompt_column and self.messages_column:
            raise ValueError("set prompt_column or messages_column, not both")
        if not self.messages_column and not self.prompt_column:
            self.prompt_column = "prompt"
        return self

    @property
    def text_column(self) -> str:
        """The column the prompt comes from (text or conversation)."""
        return self.messages_column or self.prompt_column


class OutputSpec(_Strict):
    uri: str = Field(description="Directory (fsspec URI) for job.json, shards/, stats/, summary.json.")
    format: Literal[OUTPUT_FORMATS] = Field("parquet", description="Shard files: parquet or jsonl.")
    id_name: str | None = Field(None, min_length=1, description=(
        "The output column holding each row's id. Default: input.id_column's own name when one is set, else `id` "
        "(derived `<file>:<row>` ids). It must not be a generated column's name or a kept column's."))
    lease_s: float = Field(60, gt=0, le=86400, allow_inf_nan=False, description=(
        "Seconds the running driver's lease on the output lasts unless renewed (it renews every lease_s / 4). "
        "Another run is refused while it holds; a driver killed on another host blocks new runs this long."))


class WorkersSpec(_Strict):
    count: int = Field(1, gt=0, description="Number of actors, each holding one model.")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (Ray resource).")
    num_cpus: float = Field(1, ge=0, description="CPUs per actor (Ray resource; also its torch threads).")
    batch_size: int = Field(16, gt=0, description="Rows in flight per worker (continuous batching; a shard's "
                                                  "prompts join in length order).")
    shards_per_actor: int = Field(2, ge=1, le=8, description=(
        "Shards in flight on one actor: its current one and the next ones, whose rows join the actor's decoding "
        "engine as the current shard's last rows finish (1: each shard drains before the next starts). An actor "
        "that dies loses all of its shards' attempts."))
    max_retries: int = Field(2, ge=0, description="Extra attempts for a shard whose worker died, raised or timed out.")
    shard_timeout_s: float | None = Field(None, gt=0, description=(
        "Give up on a shard attempt after this many seconds from dispatch to a loaded actor; the actor is replaced "
        "and the shard retried. None: 5x the slowest shard committed so far, at least min_shard_timeout_s (no "
        "limit until one has committed)."))
    min_shard_timeout_s: float = Field(600, gt=0, description="Floor of the derived shard timeout.")
    placement_timeout_s: float = Field(900, gt=0, description=(
        "On a joined cluster, give up on the remaining shards (exit 1) when no actor could be placed for this "
        "long: the cluster lacks the GPUs/CPUs each actor asks for, and no autoscaler added them."))
    heartbeat_s: float = Field(60, gt=0, description=(
        "Log a progress line this often while nothing commits, and a 'waiting for N actors' line while actors "
        "wait for resources."))
    max_error_rate: float = Field(1.0, ge=0, le=1, description=(
        "The job exits 1 when more than this share of its input rows ended in error (always when all did)."))


class FaultSpec(_Strict):
    """Fault injection for testing the driver (never in production manifests): {shard index: attempts}."""

    crash: dict[int, int] = Field(default_factory=dict, description="Worker process exits mid-shard on the "
                                                                    "shard's first N attempts.")
    error: dict[int, int] = Field(default_factory=dict, description="Worker raises mid-shard on the shard's "
                                                                    "first N attempts.")
    hang: dict[int, int] = Field(default_factory=dict, description="Worker sleeps (forever) mid-shard on the "
                                                                   "shard's first N attempts.")


class Manifest(_Strict):
    name: str = Field("job", description="A label for logs and job.json.")
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "fsspec options for input and output, e.g. {endpoint_url: http://127.0.0.1:9000}. Credentials as "
        "environment references: {key: '${AWS_ACCESS_KEY_ID}'} (or none: s3fs reads AWS_* itself)."))
    decode: DecodeSpec = Field(default_factory=lambda: DecodeSpec.model_validate({}),
                               description="fastdllm.DecodeConfig fields, num_samples and "
                                                           "structured_outputs.")
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    faults: FaultSpec = Field(default_factory=FaultSpec, description="Testing only: injected worker failures.")

    @property
    def id_name(self) -> str:
        """The output column of the rows' ids (output.id_name, else the input's id column's name, else `id`)."""
        return self.output.id_name or self.input.id_column or "id"

    @model_validator(mode="after")
    def _templating(self):
        template = self.model.chat_template
        if self.input.messages_column and template is False:
            raise ValueError(f"input.messages_column needs a chat template to turn conversations into prompts; "
                             "set model.chat_template to true (the checkpoint's) or to a Jinja template string")
        if self.model.system_prompt is not None and template is False:
            raise ValueError("model.system_prompt is added as a system turn, which needs a chat template; set "
                             "model.chat_template to true or a template string")
        return self

    def identity(self) -> dict:
        """What decides the output's content, as job.json's `identity` records it: a rerun must match it to reuse
        committed shards (the resume check), and each shard's marker carries its decode part (`config`)."""
        return {"model": self.model.model_dump(include={"source", "revision", "dtype", "chat_template",
                                                        "system_prompt"}),
                "decode": self.decode.model_dump(), "output": {"format": self.output.format, "id_name": self.id_name}}

    @classmethod
    def from_record(cls, d: dict, dropped: list | None = None) -> "Manifest":
        """The manifest as a job.json records it (`manifest`), read back into the model. An older job.json may
        hold a key this version no longer knows or a value it no longer takes: that field alone falls back to
        its default (its dotted name is appended to `dropped`); a required one missing still raises."""
        d = _copy(d)
        for _ in range(64):
            try:
                return cls.model_validate(d)
            except ValidationError as e:
                gone = [n for err in e.errors() if err["type"] != "missing"
                        for n in _drop(d, [p for p in err["loc"] if isinstance(p, str)])]
                if not gone:
                    raise
                if dropped is not None:
                    dropped.extend(gone)
        raise ValueError("job.json's manifest does not validate")


def recorded_manifest(job: dict) -> Manifest:
    """The manifest a job.json records, as the model, for the readers of an output (status, report):
    Manifest.from_record (an older job.json's unknown fields fall back to their defaults, each logged), and a
    required text field the record lacks (model.source, input.uri, output.uri) reads as "?", as these readers
    always showed it."""
    record = _copy(job.get("manifest") or {})
    for name, f in Manifest.model_fields.items():
        sub = f.annotation
        if f.is_required() and isinstance(sub, type) and issubclass(sub, BaseModel):
            section = record.setdefault(name, {})
            if isinstance(section, dict):
                for key, g in sub.model_fields.items():
                    if g.is_required() and g.annotation is str:
                        section.setdefault(key, "?")
    dropped: list[str] = []
    m = Manifest.from_record(record, dropped)
    if dropped:
        logging.getLogger("fastdllm.workers").info("job.json: %s not read (not a field of this version's manifest, "
                                                   "or a value it no longer takes); default used", ", ".join(dropped))
    return m


def _copy(d):
    return {k: _copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def _drop(d: dict, loc: list) -> list[str]:
    """Remove the field at `loc` (section, key) from a raw manifest; the decode section is validated whole, so
    there the keys this version does not know go. Returns the dotted names removed."""
    node = d.get(loc[0])
    if not isinstance(node, dict):
        return []
    if len(loc) >= 2 and loc[1] in node:
        del node[loc[1]]
        return [".".join(loc[:2])]
    if loc == ["decode"]:
        known = {f.name for f in dataclasses.fields(fastdllm.DecodeConfig)} | set(DecodeSpec.model_fields) | {
            "structured_outputs"}
        unknown = [k for k in node if k not in known]
        for k in unknown:
            del node[k]
        return [f"decode.{k}" for k in unknown]
    return []


class JobSpec(Manifest):
    """One job as its workers run it: the validated manifest (local paths already absolute: jobs/runner.py
    `absolute_uris`), what planning found (the input source, the kept columns) and the run id of the driver's
    lease. Made once by the driver and sent to every actor as it is; frozen. storage_options keep their `${VAR}`
    references: each worker expands them from its own environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: InputSource = Field(default_factory=lambda: InputSource(""), description=(
        "The input as planned: its resolved format (and for Hugging Face datasets: uri, config, split)."))
    keep_columns: tuple[str, ...] = Field((), description="The input columns copied to the output, resolved.")
    run_id: str | None = Field(None, description="The driver's lease run id: each commit checks the lease is its.")

    @classmethod
    def of(cls, m: Manifest, source: InputSource, keep_columns, run_id: str | None = None) -> "JobSpec":
        return cls(**{k: getattr(m, k) for k in Manifest.model_fields}, source=source,
                   keep_columns=tuple(keep_columns), run_id=run_id)

    @property
    def input_columns(self) -> list[str]:
        """The input columns a shard reads: prompt or messages, id, structured column, kept columns (each once)."""
        cols = [self.input.text_column, self.input.id_column, self.decode.structured_column, *self.keep_columns]
        return list(dict.fromkeys(c for c in cols if c))

    @classmethod
    def local(cls, base: "JobSpec | None" = None, /, **settings) -> "JobSpec":
        """A spec for a worker used without the driver (tests, notebooks): `base` (or a bare job) with settings
        by their field name in any section (batch_size, id_column, chat_template ...), or prefixed with the section
        (model_source, output_uri, output_format); `decode` takes a fastdllm.DecodeConfig, `structured` a
        StructuredOutputs. Unknown or ambiguous names raise."""
        d = base.model_dump() if base is not None else {"model": {"source": "tiny"}, "input": {"uri": ""},
                                                       "output": {"uri": ""}}
        sections = {k: f.annotation for k, f in Manifest.model_fields.items() if isinstance(f.annotation, type)
                    and issubclass(f.annotation, BaseModel) and k != "decode"}
        for name, value in settings.items():
            if name == "decode":
                d["decode"] = {**d.get("decode", {}), **value.to_dict()}
            elif name == "structured":
                d.setdefault("decode", {})["structured_outputs"] = value.to_dict() if value is not None else None
            elif name == "structured_column":
                d.setdefault("decode", {})["structured_outputs"] = {"column": value} if value else None
            elif name == "num_samples":
                d.setdefault("decode", {})["num_samples"] = value
            elif name in cls.model_fields:
                d[name] = value
            else:
                head, _, rest = name.partition("_")
                where = [(head, rest)] if head in sections and rest in sections[head].model_fields else [
                    (k, name) for k, model in sections.items() if name in model.model_fields]
                if len(where) != 1:
                    raise TypeError(f"JobSpec.local: {name!r} names {len(where) or 'no'} manifest fields")
                k, field = where[0]
                d.setdefault(k, {})[field] = value
        if isinstance(d.get("source"), InputSource):
            d["source"] = dataclasses.asdict(d["source"])
        return cls.model_validate(d)


def _type_name(t) -> str:
    if isinstance(t, type) and not getattr(t, "__args__", None):
        return {"NoneType": "null"}.get(t.__name__, t.__name__)
    text = str(t).replace("typing.", "").replace("NoneType", "null").replace("fastdllm.structured.", "")
    return text.replace(" | None", " | null")


def manifest_schema() -> list[dict]:
    """Every manifest field, decode's included, in manifest order: {name (dotted), type, default, description};
    default None where the field is required. What `fastdllm plan --schema` prints."""
    rows: list[dict] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            t = f.annotation
            if model is DecodeSpec and name in ("config", "structured_column"):
                if name == "config":  # the decode fields are fastdllm.DecodeConfig's, described there
                    for d in dataclasses.fields(fastdllm.DecodeConfig):
                        rows.append({"name": f"{prefix}{d.name}", "type": str(d.type).replace("None", "null"),
                                     "default": _plain(d.default), "required": False,
                                     "description": d.metadata.get("description", "")})
                continue
            if isinstance(t, type) and issubclass(t, BaseModel):
                walk(t, f"{prefix}{name}.")
                continue
            required = f.is_required()
            rows.append({"name": prefix + name, "type": _type_name(t), "required": required,
                         "default": None if required else _plain(f.get_default(call_default_factory=True)),
                         "description": f.description or ""})

    walk(Manifest, "")
    return rows


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
