"""fsspec access shared by the driver and the workers: storage options with `${VAR}` references expanded from
the environment of the process that uses them, so credentials never travel in job.json, logs or Ray task args."""

from __future__ import annotations

import os
import re

import fsspec

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Keys whose inline values are secrets: they must be written as ${VAR} references (redacted in job.json otherwise).
SECRET_KEY = re.compile(r"(secret|password|token|credential|^key$|_key$|access_key)", re.IGNORECASE)


def expand_env(options: dict | None, where: str = "storage_options") -> dict:
    """A copy of `options` with every "${VAR}" in a string value replaced by the environment variable's value."""

    def expand(v, path):
        if isinstance(v, str):
            def sub(m):
                name = m.group(1)
                if name not in os.environ:
                    raise ValueError(f"{path} references ${{{name}}}, which is not set in the environment")
                return os.environ[name]

            return _REF.sub(sub, v)
        if isinstance(v, dict):
            return {k: expand(x, f"{path}.{k}") for k, x in v.items()}
        if isinstance(v, list):
            return [expand(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return v

    return expand(dict(options or {}), where)


def redact(options: dict | None, path: str = "storage_options") -> tuple[dict, list[str]]:
    """`options` with inline secret values replaced by "<redacted>" (`${VAR}` references stay), and where."""
    out, hidden = {}, []
    for k, v in (options or {}).items():
        where = f"{path}.{k}"
        if isinstance(v, dict):
            out[k], inner = redact(v, where)
            hidden += inner
        elif isinstance(v, str) and SECRET_KEY.search(k) and not _REF.fullmatch(v):
            out[k] = "<redacted>"
            hidden.append(where)
        else:
            out[k] = v
    return out, hidden


def filesystem(uri: str, storage_options: dict | None = None):
    """(fs, path) for an fsspec URI; `${VAR}` references in storage_options are expanded here."""
    return fsspec.core.url_to_fs(uri, **expand_env(storage_options))


def parquet_footer(f, size: int) -> bytes | None:
    """The Parquet footer (file metadata) of an open file of `size` bytes; None when it is not a Parquet file.
    Its hash pins a file: the planner records it and a worker compares it before reading."""
    if size < 12:
        return None
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        return None
    footer_len = int.from_bytes(tail[:4], "little")
    f.seek(max(size - 8 - footer_len, 0))
    return f.read(footer_len)
