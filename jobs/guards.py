"""Checks a run makes before it writes anything: the output must not overlap the input (a job must never write
over its own input files), and the output must be a place, not an empty string."""

from __future__ import annotations

import os
import re

from fastdllm.workers.storage import filesystem, scrub

from .manifest import InvalidJob, Manifest
from .plan import Plan

_GLOB = re.compile(r"[*?\[]")


def check_output_uri(m: Manifest) -> None:
    """An empty output.uri would be the current directory: refuse it (before paths are made absolute)."""
    if not m.output.uri.strip():
        raise InvalidJob("output.uri is empty; set it to the directory (or s3://bucket/prefix) the job writes to")


def _where(uri: str, storage_options: dict | None) -> tuple[str, str]:
    """(protocol, path without a trailing slash) of a URI, as its file system names it."""
    fs, path = filesystem(uri, storage_options)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    proto = "file" if proto in ("file", "local") else proto
    return proto, path.rstrip("/") or "/"


def _inside(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """True when `a` is `b` or lies under it (same protocol, `b` a prefix at a path boundary)."""
    return a[0] == b[0] and (a[1] == b[1] or a[1].startswith(b[1].rstrip("/") + "/"))


def check_no_overlap(m: Manifest, plan: Plan) -> None:
    """InvalidJob when the output and the input overlap: the output inside the input's directory (or glob's
    directory), the input inside the output, or any planned input file under the output. Local paths and
    object-store prefixes alike; a Hugging Face hub dataset (not a path) is never inside an output."""
    uri = m.input.uri
    if plan.source.format == "hf" and "://" not in uri and not os.path.exists(uri):
        return
    opts = m.storage_options
    try:
        out = _where(m.output.uri, opts)
        base = uri
        if _GLOB.search(base):  # the directory the glob searches
            base = base[: _GLOB.search(base).start()].rsplit("/", 1)[0] or "/"
        inp = _where(base, opts)
        files = [_where(f.uri, opts) for f in plan.files]
    except (ValueError, ImportError, OSError):  # a URI its file system cannot take is reported where it is used
        return
    how = None
    if _inside(out, inp):
        how = "the output is inside the input"
    elif _inside(inp, out):
        how = "the input is inside the output"
    else:
        hit = next((f for f, (proto, path) in zip(plan.files, files) if _inside((proto, path), out)), None)
        if hit is not None:
            how = f"input file {hit.uri} is inside the output"
    if how:
        raise InvalidJob(scrub(f"input.uri {m.input.uri} and output.uri {m.output.uri} overlap ({how}): the job "
                               "would write over its own input; choose an output.uri outside the input"))
