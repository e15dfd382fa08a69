"""Structured outputs under diffusion decoding: a request's output is kept inside a JSON schema, a regex, a list of
choices or a Lark grammar, through llguidance against the model's own tokenizer (README, "Structured outputs").

A diffusion step proposes a token at every masked position at once; a grammar reads left to right. A constrained row
therefore commits only at its *frontier* (the first masked position of its generated text; everything before it is
committed and is a valid prefix of the language) and in a contiguous run from there:

1. forced tokens: the tokens the grammar allows alone at the frontier (llguidance's fast-forward tokens, e.g. the
   `{"name":` of a schema) are committed at once, without the model;
2. the frontier position's logits are masked by the grammar state (disallowed tokens at -inf; a stop token is allowed
   only where the grammar accepts, and it is the only choice once the grammar is complete), so its proposal and its
   confidence (the softmax over the allowed tokens) are those of the constrained distribution;
3. the positions after it keep their unmasked proposals; the *valid run* is the longest run of them, from the
   frontier, that the grammar accepts in order. A proposal the grammar allows is also the proposal under the masked
   logits (argmax and Gumbel-max over a subset keep an allowed maximum), so the run is exactly what masked decoding
   would propose there, and it ends at the first position where the mask would change the proposal;
4. the step's rule (threshold, quota, ...) selects among the run's positions as among any candidates; the row commits
   the selected positions that are contiguous from the frontier, and always the frontier itself (one token per step
   at least, as unconstrained rows). A committed stop token closes the output: the rest of its block is filled with
   it (the engine cuts there), so no step is spent behind a finished output.

When the generated region (gen_length / max_tokens) ends before the grammar accepts, the row finishes with reason
"length" and its text is a valid prefix of the language, not a complete output.

Rows without a constraint never reach this module: their tokens are bit-identical to decoding without it.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass

import torch

INSTALL_HINT = "structured outputs need llguidance: pip install 'fastdllm[structured]' (or pip install llguidance)"
KINDS = ("json", "regex", "choice", "grammar")


def _llg():
    try:
        import llguidance
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return llguidance


@dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on a request's output: exactly one of `json` (a JSON schema as a dict or JSON text; True for
    any JSON object), `regex` (the whole output matches it), `choice` (the output is one of these strings) or
    `grammar` (a Lark grammar in llguidance's dialect)."""

    json: dict | str | bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None:
            j = self.json
            if isinstance(j, str):
                try:
                    j = _json.loads(j)
                except ValueError as e:
                    raise ValueError(f"structured json is not valid JSON text: {e}") from None
            if j is False or not isinstance(j, (dict, bool)):
                raise ValueError(f"structured json must be a JSON schema (an object) or true, got {self.json!r}")
            object.__setattr__(self, "json", j)
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured regex must be a non-empty string, got {self.regex!r}")
        if self.choice is not None:
            c = self.choice
            if isinstance(c, str) or not all(isinstance(s, str) and s for s in c) or not c:
                raise ValueError(f"structured choice must be a non-empty list of non-empty strings, got {c!r}")
            object.__setattr__(self, "choice", tuple(c))
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"structured grammar must be a non-empty Lark grammar string, got {self.grammar!r}")

    @classmethod
    def from_dict(cls, d) -> StructuredOutputs:
        """From {json | regex | choice | grammar: ...} (the manifest's decode.structured_outputs, vLLM's
        `structured_outputs` field); an already built StructuredOutputs passes through."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"structured_outputs must be a mapping with one of {', '.join(KINDS)}, got {d!r}")
        unknown = sorted(set(d) - set(KINDS))
        if unknown:
            raise ValueError(f"structured_outputs has unknown key(s) {', '.join(unknown)}; use one of "
                             f"{', '.join(KINDS)}")
        return cls(**{k: v for k, v in d.items() if v is not None})

    def to_dict(self) -> dict:
        k = self.kind
        v = getattr(self, k)
        return {k: list(v) if k == "choice" else v}

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @classmethod
    def from_request_body(cls, body: dict) -> StructuredOutputs | None:
        """The constraint an OpenAI chat/completions request body asks for, or None: `response_format`
        ({"type": "json_schema", "json_schema": {"name", "schema"}}, {"type": "json_object"}; "text" is none),
        vLLM's `structured_outputs` ({json | regex | choice | grammar}) and its older guided_json / guided_regex /
        guided_choice / guided_grammar fields. More than one of them is an error."""
        found: list[tuple[str, StructuredOutputs]] = []
        rf = body.get("response_format")
        if rf is not None:
            if not isinstance(rf, dict) or "type" not in rf:
                raise ValueError(f"response_format must be an object with a type, got {rf!r}")
            t = rf["type"]
            if t == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or "schema" not in js:
                    raise ValueError("response_format json_schema needs "
                                     "{'json_schema': {'name': ..., 'schema': {...}}}")
                found.append(("response_format", cls(json=js["schema"])))
            elif t == "json_object":
                found.append(("response_format", cls(json=True)))
            elif t != "text":
                raise ValueError(f"response_format type {t!r} is not supported; use json_schema, json_object or text")
        so = body.get("structured_outputs")
        if so is not None:
            found.append(("structured_outputs", cls.from_dict(so)))
        guided = {k: body[f"guided_{k}"] for k in KINDS if body.get(f"guided_{k}") is not None}
        if guided:
            found.append(("guided_*", cls.from_dict(guided)))
        if len(found) > 1:
            raise ValueError(f"the request asks for several constraints ({', '.join(n for n, _ in found)}); "
                             "keep one")
        return found[0][1] if found else None

    def check(self) -> None:
        """Raise ValueError (one line) when llguidance cannot read the constraint (a bad regex, schema or grammar),
        ImportError when llguidance is not installed."""
        err = _llg().LLMatcher.validate_grammar(self.llg_grammar())
        if err:
            raise ValueError(f"structured {self.kind} is not usable: {_first_line(err)}")

    def llg_grammar(self) -> str:
        """The constraint as an llguidance grammar (JSON text)."""
        M = _llg().LLMatcher
        if self.json is not None:
            schema = {"type": "object"} if self.json is True else _closed(self.json)
            # compact JSON (no free whitespace: a model could pad forever); a schema's x-guidance may say otherwise
            return M.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        if self.regex is not None:
            return M.grammar_from_regex(self.regex)
        if self.choice is not None:
            return M.grammar_from_lark("start: " + " | ".join(_json.dumps(c) for c in self.choice))
        return M.grammar_from_lark(self.grammar)


def _first_line(err: str) -> str:
    return next((line.strip() for line in err.splitlines() if line.strip()), "unknown error")


def _closed(schema):
    """The schema with every object that lists properties and says nothing of others closed to them
    (additionalProperties false, as xgrammar's strict mode and OpenAI's strict schemas): the output carries only the
    declared keys, and stays valid for the schema as given."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for k in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: _closed(s) for name, s in schema[k].items()}
    if "properties" in schema and not {"additionalProperties", "patternProperties",
                                       "unevaluatedProperties"} & set(schema):
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "contains",
               "additionalProperties", "additionalItems")


def llg_tokenizer(hf_tokenizer, vocab_size: int, eos: list[int]):
    """An llguidance tokenizer for a Hugging Face one. Byte-level and SentencePiece tokenizers go through
    llguidance's own reader; others it cannot read (the tiny model's character tokenizer, whose decoder is Fuse) get
    each token's text as its bytes."""
    llg = _llg()
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos or None)
    except ValueError:
        pass
    special = set(hf_tokenizer.all_special_ids)
    n = len(hf_tokenizer)

    class _Table:  # what llguidance's TokenizerWrapper reads
        eos_token_id = eos[0] if eos else hf_tokenizer.eos_token_id
        bos_token_id = hf_tokenizer.bos_token_id
        tokens = [(hf_tokenizer.convert_ids_to_tokens(i) if i in special else hf_tokenizer.decode([i])).encode()
                  if i < n else b"" for i in range(vocab_size)]
        special_token_ids = sorted(special | set(range(n, vocab_size)))

        def __call__(self, s):
            return hf_tokenizer(s, add_special_tokens=False)["input_ids"]

    return llg.LLTokenizer(llg.TokenizerWrapper(_Table()), n_vocab=vocab_size, eos_token=eos or None)


class RowConstraint:
    """One row's grammar state: an llguidance matcher over the tokens committed so far."""

    fast_forward = True  # commit forced tokens without the model (benchmarks turn it off for the baseline)

    def __init__(self, spec: StructuredOutputs, tokenizer, stop_ids: tuple[int, ...], mask_id: int):
        llg = _llg()
        if not stop_ids:
            raise ValueError("a structured output needs a stop token to end on: set stop_token_ids or stop_at_eos")
        self.spec, self.stop_ids, self.mask_id = spec, stop_ids, mask_id
        self.m = llg.LLMatcher(tokenizer, spec.llg_grammar(), log_level=0)
        if self.m.is_error():
            raise ValueError(f"structured {spec.kind} is not usable: {_first_line(self.m.get_error())}")
        self.V = tokenizer.vocab_size
        self.words = (self.V + 31) // 32
        self.llg_eos = set(tokenizer.eos_tokens)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens allowed at the frontier; stop ids only where the grammar accepts."""
        bits = torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[: self.V].bool()
        for t in self.llg_eos | set(self.stop_ids) | {self.mask_id}:
            if t < self.V:
                allowed[t] = False
        if self.m.is_accepting() or not allowed.any():  # (nothing allowed: a dead end of the tokenizer; end here)
            allowed[list(self.stop_ids)] = True
        return allowed

    def run_length(self, tokens: list[int]) -> int:
        """How many of `tokens` (from the frontier) the grammar accepts in order: a stop token counts (and ends
        the run) where the grammar accepts. The matcher is left as it was."""
        k = 0
        stops = set(self.stop_ids)
        while k < len(tokens) and tokens[k] not in stops:
            k += 1
        v = self.m.validate_tokens(tokens[:k]) if k else 0
        if v == k and k < len(tokens):  # a stop token right after a valid run: only where the grammar accepts
            if self.m.consume_tokens(tokens[:k]) and self.m.is_accepting():
                v += 1
            if k:
                self.m.rollback(k)
        return v


class StructuredStep:
    """The constrained rows of one engine step, and the hooks `propose_commit` calls for them."""

    def __init__(self, rows: list[int], constraints: list[RowConstraint], frontiers: list[int], lefts: list[int],
                 block_length: int, full_sel: bool):
        self.rows, self.cons, self.bl = rows, constraints, block_length
        self.front, self.left = frontiers, lefts  # block offset of the first masked position; masked positions
        self.first_col = frontiers if full_sel else [0] * len(rows)  # its column in select_idx
        self.ff: list[list[int]] = []

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Forced tokens are taken (the matchers consume them), then each row's logits at its frontier are masked
        by its grammar state. logits (B, M, V) are modified in place."""
        rows_i, cols, masks = [], [], []
        for j, (i, c) in enumerate(zip(self.rows, self.cons)):
            ff = c.m.compute_ff_tokens()[: self.left[j]] if c.fast_forward else []
            if ff:
                c.m.consume_tokens(ff)
            self.ff.append(ff)
            if len(ff) < self.left[j]:
                rows_i.append(i)
                cols.append(self.first_col[j] + len(ff))
                masks.append(c.allowed())
        if rows_i:
            V = logits.shape[-1]
            allowed = torch.zeros((len(rows_i), V), dtype=torch.bool)
            allowed[:, : masks[0].shape[0]] = torch.stack(masks)
            r = torch.tensor(rows_i, device=logits.device)
            k = torch.tensor(cols, device=logits.device)
            logits[r, k] = logits[r, k].masked_fill(~allowed.to(logits.device), -float("inf"))

    def candidates(self, x0: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The rule's candidates (B, M): in constrained rows only the valid run from the frontier."""
        self.x0 = x0[self.rows].tolist()
        candidates = candidates.clone()
        self.runs = []
        for j, (i, c) in enumerate(zip(self.rows, self.cons)):
            a = self.first_col[j] + len(self.ff[j])
            b = self.first_col[j] + self.left[j]
            k = max(1, c.run_length(self.x0[j][a:b])) if a < b else 0
            self.runs.append((a, k))
            candidates[i] = False
            candidates[i, a : a + k] = True
        return candidates

    def commit(self, out: torch.Tensor, commit_sel: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """The final block (B, bl) of the step: in constrained rows the forced tokens and the contiguous selected
        run from the frontier (at least the frontier), and after a committed stop token, stop tokens to the block's
        end. The matchers consume what was committed."""
        sel = commit_sel[self.rows].tolist()
        out = out.clone()
        for j, (i, c) in enumerate(zip(self.rows, self.cons)):
            a, k = self.runs[j]
            n = 0
            while n < k and (n == 0 or sel[j][a + n]):
                n += 1
            run = self.x0[j][a : a + n]
            toks = self.ff[j] + run
            f = self.front[j]
            stopped = bool(run) and run[-1] in c.stop_ids
            if stopped:
                c.m.consume_tokens(run[:-1])
                toks = toks + [run[-1]] * (self.bl - f - len(toks))
            elif run:
                c.m.consume_tokens(run)
            row = block[i].clone()
            row[f : f + len(toks)] = torch.tensor(toks, dtype=row.dtype, device=row.device)
            out[i] = row
        return out
