"""OpenAI Batch API files in and out (docs/DESIGN.md, "OpenAI batch files").

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}`;
its answer is `{"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <chat.completion |
text_completion>}, "error": null}`, or `{"response": null, "error": {"code", "message"}}` for a line that cannot
be answered. A bad line (not JSON, an unsupported parameter, a prompt too long) is that line's error; the other
lines go on.

Planning reads a batch file as a table of two columns, `custom_id` (null where the line has none) and `request`
(the line's text), one row per non-blank line, so the job runner shards, pins and resumes it like any JSONL file.
A worker parses each line (`parse_request`), turns it into one engine Request per choice (`n`), and writes one
response line per request line (`run_batch_shard`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import pyarrow as pa

import fastdllm

from .output import DataFile, ShardRecord, now
from .shard import Shard, reason_kind, seed_id
from .stats import ShardStats

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
COLUMNS = ("custom_id", "request")  # the table planning and workers see for a batch file
OBJECTS = {"chat": "chat.completion", "completion": "text_completion"}
ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}
MAX_N = 128

# Body fields the engine honours (mapped below) or that do not change the output (recorded or ignored).
HONOURED = {"model", "max_tokens", "max_completion_tokens", "temperature", "n", "seed", "stop", "user", "metadata",
            "store", "top_p", "stream", "logprobs", "frequency_penalty", "presence_penalty", "response_format",
            "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"}
# Fields accepted only at the value that means "off" (a request that sets them otherwise cannot be honoured).
NEUTRAL = {"top_p": (1, 1.0), "stream": (False,), "logprobs": (False,), "frequency_penalty": (0, 0.0),
           "presence_penalty": (0, 0.0), "echo": (False,), "best_of": (1,)}


class LineError(ValueError):
    """A request line that cannot be answered: `code` and a message that names the field and what to change."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def structured_constraint(body: dict, kind: str):
    """The line's output constraint for `fastdllm.Request(structured=...)` (fastdllm.StructuredOutputs:
    `response_format` json_schema / json_object, vLLM's `structured_outputs` and guided_* fields), or None for an
    unconstrained line; a constraint that cannot be read is that line's error."""
    from fastdllm.structured import StructuredOutputs

    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") not in ("text", "json_object", "json_schema"):
        raise LineError("unsupported_parameter", f"body.response_format type {rf.get('type')!r} is not supported; "
                                                 "use json_schema, json_object or text")
    try:
        spec = StructuredOutputs.from_request_body(body)
        if spec is not None:
            spec.check()
    except ImportError as e:
        raise LineError("unsupported_parameter", str(e)) from None
    except ValueError as e:
        raise LineError("invalid_request", f"body: {str(e).splitlines()[0]}") from None
    return spec


@dataclass
class BatchRequest:
    """One parsed request line: what to decode and with which per-request settings (None: the job's)."""

    custom_id: str
    kind: str  # chat | completion
    model: str | None
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completion: text, or token ids
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    structured: object | None = None


def batch_table(data: bytes, uri: str) -> pa.Table:
    """A batch file's bytes as the (custom_id, request) table: one row per non-blank line, in file order. A line
    that is not JSON, or has no string custom_id, still gets its row (with a null custom_id): it is answered
    with an error, not dropped."""
    ids, lines = [], []
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            obj = json.loads(line)
        except UnicodeDecodeError as e:  # kept as text that is not JSON: the line's error says why
            line, obj = f"\ufffd not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})", None
        except ValueError:
            obj = None
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        ids.append(cid if isinstance(cid, str) else None)
        lines.append(line)
    return pa.table({"custom_id": pa.array(ids, pa.string()), "request": pa.array(lines, pa.string())})


def is_batch_line(line: bytes | str) -> bool:
    """Whether a JSONL file's first line is an OpenAI batch request (has `custom_id` and `body`)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def duplicate_ids(files: list[tuple[str, pa.ChunkedArray]]) -> str | None:
    """A one-line message naming the first custom_id that occurs twice across the files, else None."""
    seen: dict[str, tuple[str, int]] = {}
    for rel, column in files:
        for i, cid in enumerate(column.to_pylist()):
            if cid is None:
                continue
            if cid in seen:
                f, j = seen[cid]
                return (f"input has duplicate custom_id {cid!r} (request {j + 1} of {f} and request {i + 1} of {rel}); "
                        "every request line needs its own custom_id")
            seen[cid] = (rel, i)
    return None


def _int(body: dict, name: str, low: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise LineError("invalid_request", f"body.{name} must be an integer >= {low}, got {v!r}")
    return v


def _content(m, i: int) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise LineError("invalid_request", f"body.messages[{i}].content must be a string or a list of text parts "
                                       "(images, audio and files are not supported)")


def parse_request(raw: str, custom_id: str | None) -> BatchRequest:
    """A request line as a BatchRequest; LineError (code, message naming the field) when it cannot be answered."""
    if raw.startswith("\ufffd not valid UTF-8"):  # see batch_table
        raise LineError("invalid_json", f"the line is{raw[1:]}")
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise LineError("invalid_json", f"the line is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise LineError("invalid_request", f"the line is a JSON {type(obj).__name__}, not a request object")
    if custom_id is None:
        raise LineError("invalid_request", "custom_id must be a string")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineError("invalid_request", f"unknown request key(s) {', '.join(unknown)} (known: custom_id, method, "
                                           "url, body)")
    if obj.get("method", "POST") != "POST":
        raise LineError("invalid_request", f"method must be POST, got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        raise LineError("unsupported_url", f"url {url!r} is not supported (supported: {', '.join(URLS)})")
    kind = URLS[url]
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_request", "body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # null means "not set", as in the API
    source = "messages" if kind == "chat" else "prompt"
    extra = sorted(set(body) - HONOURED - {source} - ({"echo", "best_of"} if kind == "completion" else set()))
    if extra:
        raise LineError("unsupported_parameter", f"body.{extra[0]} is not supported by fastdllm "
                                                 f"({url}; remove it)")
    for name, ok in NEUTRAL.items():
        if name in body and (isinstance(body[name], bool) != isinstance(ok[0], bool) or body[name] not in ok):
            raise LineError("unsupported_parameter", f"body.{name} {json.dumps(body[name])} is not supported; remove "
                                                     f"it or set it to {json.dumps(ok[0])}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise LineError("invalid_request", "body.model must be a string")
    req = BatchRequest(custom_id=custom_id, kind=kind, model=model)
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise LineError("invalid_request", "body.messages must be a non-empty list of {role, content}")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise LineError("invalid_request", f"body.messages[{i}] needs a role and a content")
            turns.append({"role": m["role"], "content": _content(m, i)})
        req.messages = turns
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            req.prompt = p
        elif isinstance(p, str) and p.strip():
            req.prompt = p
        else:
            raise LineError("invalid_request", "body.prompt must be a non-empty string or a list of token ids (one "
                                               "prompt per line)")
    mt, mct = _int(body, "max_tokens", 1), _int(body, "max_completion_tokens", 1)
    if mt is not None and mct is not None and mt != mct:
        raise LineError("invalid_request", f"body.max_tokens ({mt}) and body.max_completion_tokens ({mct}) differ; "
                                           "set one")
    req.max_tokens = mct if mct is not None else mt
    req.n = _int(body, "n", 1) or 1
    if req.n > MAX_N:
        raise LineError("invalid_request", f"body.n is {req.n}; at most {MAX_N} choices per request (as the API)")
    req.seed = _int(body, "seed", 0)
    t = body.get("temperature")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise LineError("invalid_request", f"body.temperature must be a number >= 0, got {t!r}")
        req.temperature = float(t)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise LineError("invalid_request", "body.stop must be a non-empty string or a list of them")
        req.stop = list(stop)
    req.structured = structured_constraint(body, kind)
    return req


def error_line(custom_id: str | None, code: str, message: str) -> dict:
    return {"id": _batch_id(custom_id, message), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _batch_id(custom_id, salt: str) -> str:
    return "batch_req_" + hashlib.sha256(f"{custom_id}\x00{salt}".encode()).hexdigest()[:24]


def response_line(req: BatchRequest, raw: str, prompt_tokens: int, done: list, seeds: list[int], model: str,
                  created: int) -> dict:
    """The answer line of a decoded request: `done` holds its n fastdllm.Finished, in choice order. Ids are a
    hash of the request line, so the same request answered again gets the same ids."""
    digest = hashlib.sha256(raw.encode()).hexdigest()[:24]
    choices = []
    for k, f in enumerate(done):
        c = {"index": k, "finish_reason": f.finish_reason, "logprobs": None}
        if req.kind == "chat":
            c["message"] = {"role": "assistant", "content": f.text}
        else:
            c["text"] = f.text
        choices.append(c)
    completion = sum(len(f.tokens) for f in done)
    body = {"id": ID_PREFIX[req.kind] + digest, "object": OBJECTS[req.kind], "created": created,
            "model": req.model or model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            # fastdllm's own per-choice figures, in a field OpenAI clients ignore
            "fastdllm": {"nfe": [f.nfe for f in done], "n_tokens": [len(f.tokens) for f in done], "seeds": seeds}}
    return {"id": _batch_id(req.custom_id, digest), "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": "req_" + digest, "body": body}, "error": None}


def _encode(worker, req: BatchRequest) -> tuple[list[int], int]:
    """The request's prompt ids and generated length; LineError when it cannot be decoded."""
    s, cfg, mc = worker.s, worker.cfg, worker.model.config
    if req.kind == "chat":
        if s.model.chat_template is False:
            raise LineError("invalid_request", "a /v1/chat/completions line needs a chat template; set "
                                               "model.chat_template to true (run-batch does) or a template string")
        try:
            text = worker.tok.render(req.messages, s.model.chat_template, s.model.system_prompt)
        except Exception as e:  # a template that raises belongs to the line
            raise LineError("invalid_request", f"body.messages could not be rendered by the chat template: "
                                               f"{type(e).__name__}: {e}") from None
        ids = worker.tok.encode_text(text)
    elif isinstance(req.prompt, list):
        ids = req.prompt
        if min(ids) < 0 or max(ids) >= mc.vocab_size:
            raise LineError("invalid_request", f"body.prompt has token ids outside the vocabulary [0, {mc.vocab_size})")
    else:
        ids = worker.tok.encode_text(req.prompt)
    if not ids:
        raise LineError("invalid_request", "the prompt encodes to no tokens")
    bl = cfg.block_length
    gen = cfg.gen_length if req.max_tokens is None else -(-req.max_tokens // bl) * bl
    if cfg.cache == "dllm" and gen != cfg.gen_length:
        raise LineError("unsupported_parameter", f"body.max_tokens {req.max_tokens}: cache 'dllm' decodes every "
                                                 f"request with gen_length {cfg.gen_length}; use another cache mode")
    if len(ids) + gen > mc.max_seq_len:
        raise LineError("context_length_exceeded", f"the prompt has {len(ids)} tokens; with {gen} generated it "
                                                   f"exceeds the model's {mc.max_seq_len} positions: shorten it or "
                                                   "lower max_tokens")
    if req.stop and worker.tok is None:
        raise LineError("unsupported_parameter", "body.stop needs the model's tokenizer")
    return list(ids), gen


def run_batch_shard(worker, shard: Shard, attempt: int) -> ShardRecord:
    """Decode one shard of a batch file through the worker's shared engine and commit its answer lines
    (shards/NNNNN.jsonl, one line per request line, in input order), then its marker."""
    t0 = time.perf_counter()
    started = now()
    table = worker.reader.read(shard, list(COLUMNS))
    read_seconds = time.perf_counter() - t0
    cids, raws = table.column("custom_id").to_pylist(), table.column("request").to_pylist()
    parsed: list[tuple[BatchRequest, list[int], int] | LineError] = []
    for cid, raw in zip(cids, raws):
        try:
            req = parse_request(raw, cid)
            ids, gen = _encode(worker, req)
            parsed.append((req, ids, gen))
        except LineError as e:
            parsed.append(e)
    bad = [reason_kind(str(p)) for p in parsed if isinstance(p, LineError)]
    counters = ShardStats(shards=1, rows=table.num_rows, error_rows=len(bad), read_seconds=read_seconds,
                          error_reasons={k: bad.count(k) for k in set(bad)})
    cfg = worker.cfg
    todo = sorted((len(p[1]), i, k) for i, p in enumerate(parsed) if not isinstance(p, LineError)
                  for k in range(p[0].n))
    requests, seeds = [], {}
    for _, i, k in todo:
        req, ids, gen = parsed[i]
        row = seed_id(req.custom_id, k)
        seeds[i, k] = row
        requests.append(fastdllm.Request(ids, gen_length=gen, max_tokens=req.max_tokens, temperature=req.temperature,
                                         seed=req.seed, stop=req.stop or None, row_id=row, structured=req.structured))
    t_dec = time.perf_counter()
    finished = {}
    if requests:  # a finished row's slot goes to the next request at once, of this shard or the next one
        for (_, i, k), f in zip(todo, worker.engine().run(requests, counters)):
            finished[i, k] = f
    counters.decode_seconds = time.perf_counter() - t_dec
    worker._inject_fault(shard, attempt)
    counters.nfe = sum(f.nfe for f in finished.values())
    counters.generated_tokens = sum(len(f.tokens) for f in finished.values())
    created = int(time.time())
    lines = []
    for i, p in enumerate(parsed):
        if isinstance(p, LineError):
            lines.append(error_line(cids[i], p.code, str(p)))
            continue
        req, ids, _ = p
        done = [finished[i, k] for k in range(req.n)]
        lines.append(response_line(req, raws[i], len(ids), done, [seeds[i, k] for k in range(req.n)],
                                   worker.s.model.source, created))
    t_write = time.perf_counter()
    data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()

    def record(file: DataFile) -> ShardRecord:
        counters.write_seconds = time.perf_counter() - t_write
        counters.wall_seconds = time.perf_counter() - t0
        return ShardRecord(shard=shard.index, stats=counters, file=file, worker=worker.name, device=worker.device,
                           model=worker.s.model.source, config=worker.s.identity()["decode"],
                           attempt=attempt, started_at=started, finished_at=now())

    return worker.out.commit(shard.index, data, len(lines), record)
