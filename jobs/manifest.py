"""The job manifest (its pydantic models, with field descriptions, in workers/spec.py); unknown keys and bad values
are errors that name the field. `load_manifest(path, overrides)` reads YAML, applies `--set key.path=value` and
validates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

# The models live under workers/ (the worker reads them from its JobSpec); re-exported here for the driver and users.
from fastdllm.workers.spec import (DTYPES, MAX_SAMPLES, DecodeSpec, FaultSpec, InputSpec, JobSpec,  # noqa: F401
                                   Manifest, ModelSpec, OutputSpec, WorkersSpec)


MAX_NODES = 100_000  # values a manifest may expand to (YAML aliases included)


class InvalidJob(ValueError):
    """The manifest, the input or the output cannot make a job: exit 2 with this one-line message."""


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
