"""The job manifest: pydantic models with field descriptions; unknown keys and bad values are errors that name
the field. `load_manifest(path, overrides)` reads YAML, applies `--set key.path=value` and validates."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

import fastdllm
from fastdllm.workers.inputs import FORMATS
from fastdllm.workers.shard import OUTPUT_FORMATS


MAX_SAMPLES = 10_000  # decode.num_samples: output rows per prompt
MAX_NODES = 100_000  # values a manifest may expand to (YAML aliases included)


class InvalidJob(ValueError):
    """The manifest, the input or the output cannot make a job: exit 2 with this one-line message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecodeSpec(BaseModel):
    """The manifest's decode section: fastdllm.DecodeConfig's fields (kept as the typed config that workers
    receive) plus num_samples, the output rows drawn per prompt, and structured_outputs, the constraint of every
    row's output ({json: schema | true, regex: ..., choice: [...], grammar: lark}; README, "Structured outputs")."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    config: fastdllm.DecodeConfig
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES)
    structured_outputs: fastdllm.StructuredOutputs | None = None
    structured_column: str | None = None  # structured_outputs: {column: NAME}: each row's constraint from NAME

    @model_validator(mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, dict):
            v = dict(v)
            n = v.pop("num_samples", 1)
            for f in dataclasses.fields(fastdllm.DecodeConfig):  # a string where a number goes: one line
                kinds = [k.strip() for k in str(f.type).replace("'", "").split("|")]
                want = {"float": (int, float), "int": (int,)}.get(kinds[0])
                x = v.get(f.name)
                if want and f.name in v and not (x is None and "None" in kinds) and (
                        isinstance(x, bool) or not isinstance(x, want)):
                    raise ValueError(f"decode.{f.name} must be {'an integer' if kinds[0] == 'int' else 'a number'}, "
                                     f"got {x!r}")
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
            return {"config": fastdllm.DecodeConfig.from_dict(v), "num_samples": n, "structured_outputs": so,
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


def _known_keys(loc: tuple) -> list[str]:
    model: Any = Manifest
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _one_line(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            parts.append(f"unknown key '{where}'" + (f" (known: {', '.join(known)})" if known else ""))
        elif e["type"] == "missing":
            parts.append(f"'{where}' is required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    return f"{source}: " + "; ".join(parts)


def _yaml_value(text: str):
    """A --set value as YAML (numbers, booleans, lists), or the text itself when it is not YAML on its own (a
    Jinja template such as "{% for m in messages %}...")."""
    if not text.strip():
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides) -> dict:
    """Set `key.path=value` items (value parsed as YAML: numbers, booleans, lists) into a copy of `raw`."""
    raw = dict(raw)
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidJob(f"--set {item!r} is not key.path=value")
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = _yaml_value(value)
        if parts[0] == "storage_options":  # where secrets go, as ${VAR} references; a prompt or template is text
            refuse_inline_secret("--set", key.strip(), node[parts[-1]])
    return raw


def refuse_inline_secret(flag: str, key: str, value) -> None:
    """A storage option's secret given on the command line shows in shell history, process lists and the Ray jobs
    API (the entrypoint): refuse it (InvalidJob) and point to an environment reference instead (storage_options
    expand `${VAR}`). Only storage options are checked: a system prompt saying "basic" or "token" is no secret."""
    from fastdllm.workers.storage import redact

    _, hidden = redact({key.rsplit(".", 1)[-1]: value}, path=key.rsplit(".", 1)[0] if "." in key else "")
    if hidden:
        raise InvalidJob(f"{flag} {key}: a secret on the command line shows in shell history, process lists and the "
                         f"Ray jobs API; put it in an environment variable and write {flag} '{key}=${{VAR}}' (or "
                         "the reference in the manifest)")


def parse_manifest(raw, overrides=(), source: str = "manifest") -> Manifest:
    if not isinstance(raw, dict):
        raise InvalidJob(f"{source}: expected a mapping of manifest fields, got {type(raw).__name__}")
    try:
        return Manifest.model_validate(apply_overrides(raw, overrides))
    except ValidationError as e:
        raise InvalidJob(_one_line(e, source)) from None


def load_manifest(path, overrides=()) -> Manifest:
    """Read, override and validate a YAML manifest; any problem raises InvalidJob with a one-line message."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise InvalidJob(f"cannot read manifest {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InvalidJob(f"manifest {p} is not a text (UTF-8) YAML file: byte {e.start} is {e.object[e.start]:#04x}; "
                         "pass the job's .yaml file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise InvalidJob(f"manifest {p} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    _check_size(raw, str(p))
    return parse_manifest(raw, overrides, source=str(p))


def _check_size(raw, source: str) -> None:
    """Refuse a manifest whose values expand past MAX_NODES (YAML aliases can nest into billions: the
    'billion laughs'); counted with the expansion, stopping at the limit, so the check itself is quick."""
    n, todo = 0, [raw]
    while todo:
        v = todo.pop()
        n += 1
        if n > MAX_NODES:
            raise InvalidJob(f"{source} expands to more than {MAX_NODES} values (nested YAML aliases?); write the "
                             "manifest out without them")
        if isinstance(v, dict):
            todo += list(v.values())
        elif isinstance(v, list):
            todo += v
