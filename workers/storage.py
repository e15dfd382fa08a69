"""fsspec access shared by the driver and the workers: storage options with `${VAR}` references expanded from
the environment of the process that uses them, so credentials never travel in job.json, logs or Ray task args."""

from __future__ import annotations

import os
import re

import fsspec

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Keys whose inline values are secrets: they must be written as ${VAR} references (redacted in job.json otherwise).
SECRET_KEY = re.compile(r"secret|passw|passphrase|token|credential|connection_?string|authori[sz]ation|signature|"
                        r"(^|[_-])sas($|[_-])|private|key$|^key", re.IGNORECASE)
# Secrets recognised by their value, whatever the key: (pattern, replacement).
SECRET_VALUES = [
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/:@\s]*):(?!\$\{\w+\}@)[^/@\s]+@", re.IGNORECASE), r"\1:<redacted>@"),  # URL user:pass@
    (re.compile(r"\b(Bearer|Basic|Token|SharedKey)\s+\S+", re.IGNORECASE), r"\1 <redacted>"),  # Authorization values
    (re.compile(r"\b(AccountKey|SharedAccessSignature|SharedAccessKey|sig|password|pwd|secret|token|"
                r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=(?!\$\{\w+\})[^;&\s]+", re.IGNORECASE),
     r"\1=<redacted>"),  # connection-string fields, SAS and presigned-URL parameters
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "<redacted>"),  # AWS access key ids
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL),
     "<redacted private key>"),
]
# Defaults for S3 (s3fs + botocore), so no storage call waits for minutes: a connection in 5 s, each response
# within 30 s, three attempts with backoff (botocore's standard retries: throttling, 5xx, dropped connections).
# storage_options.config_kwargs / retries override them.
S3_DEFAULTS = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3, "mode": "standard"}}


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


def scrub(text: str) -> str:
    """`text` with every secret recognised by its value (see SECRET_VALUES) replaced; for messages and logs."""
    for pattern, repl in SECRET_VALUES:
        text = pattern.sub(repl, text)
    return text


def scrub_all(obj):
    """`obj` (JSON-like) with scrub() applied to every string in it, keys included: job.json, summary.json and
    the logs record URIs and messages, never the credentials inside them."""
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {scrub_all(k): scrub_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_all(v) for v in obj]
    return obj


def redact(options, path: str = "storage_options") -> tuple:
    """(`options` with inline secrets replaced, [where each was]). A string is a secret when its key names one
    (secret, password, token, key, connection_string, Authorization, sas...; everything below such a key counts)
    or when its value holds one (URL credentials, Authorization schemes, account keys, SAS signatures); dicts and
    lists are searched through. `${VAR}` references are kept: they are how secrets should be written."""
    hidden: list[str] = []

    def walk(v, where: str, secret: bool):
        if isinstance(v, dict):
            return {k: walk(x, f"{where}.{k}", secret or bool(SECRET_KEY.search(str(k)))) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{where}[{i}]", secret) for i, x in enumerate(v)]
        if not isinstance(v, str) or _REF.fullmatch(v.strip()):
            return v
        clean = "<redacted>" if secret else scrub(v)
        if clean != v:
            hidden.append(where)
        return clean

    return walk(options if options is not None else {}, path, False), hidden


def _with_defaults(uri: str, options: dict) -> dict:
    """S3 options with S3_DEFAULTS under whatever the user set in config_kwargs."""
    if not uri.startswith(("s3://", "s3a://")):
        return options
    return {**options, "config_kwargs": {**S3_DEFAULTS, **options.get("config_kwargs", {})}}


def filesystem(uri: str, storage_options: dict | None = None):
    """(fs, path) for an fsspec URI; `${VAR}` references in storage_options are expanded here. Options the
    file system does not take are a ValueError naming them."""
    options = _with_defaults(uri, expand_env(storage_options))
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except TypeError as e:
        raise ValueError(f"storage_options do not fit {uri.split('://')[0] if '://' in uri else 'file'}://: "
                         f"{scrub(str(e))}") from None
    if uri.startswith(("s3://", "s3a://")):
        # s3fs retries timeouts itself, 5 times around botocore's own attempts (no option sets it): one try of
        # botocore's retries is enough, and 5 x 3 x 30 s of silence is not.
        fs.retries = 1
    return fs, path


def storage_error(e: BaseException) -> str:
    """One line for a failed storage call, with what to change where the cause is known (credentials, endpoint,
    an option the file system does not take); secrets in the message are scrubbed."""
    name = type(e).__name__
    text = scrub(str(e).strip().splitlines()[0] if str(e).strip() else "")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"{name}: {text}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment of the driver "
                "and the workers, or storage_options {key: '${VAR}', secret: '${VAR}'}")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
        return f"{name}: {text}; check storage_options.endpoint_url and that the store is up"
    if name == "ReadTimeoutError":
        return f"{name}: {text}; the store did not answer (storage_options.config_kwargs.read_timeout)"
    if isinstance(e, TypeError):
        return f"storage_options has an option the file system does not take ({text})"
    return f"{name}: {text}"


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
