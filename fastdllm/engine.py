"""The request-level engine: requests join at any time with their own settings, and every step decodes the rows in
flight (docs/DESIGN.md, "The engine").

    engine = Engine(model, cfg, max_batch_size=64)        # cfg: the defaults of every request
    rid = engine.add(Request(prompt_ids, gen_length=64, temperature=0.7, stop=["\\n"]))
    while engine.pending:
        for done in engine.step():                           # rows that finished in this step
            done.id, done.tokens, done.nfe, done.finish_reason, done.text

A step is four named parts, in the spirit of vLLM's schedule / execute / update split:
  1. plan (`_plan`): from host-side row state only — which rows join, each row's block, the masked positions to
     read logits for; no device sync;
  2. forward (`CachePolicy.forward`): the policy's model forwards, one per kind of row (refresh or cached);
  3. propose and commit (`fastdllm.proposal.propose_commit`): one pure function of the logits, the blocks and
     the rows' settings;
  4. update (`_update`): write the blocks, one host sync (masks left, stop tokens), advance or retire rows.

A request decodes exactly as it would alone with its own settings, whenever it joins and whoever shares its steps
(batch invariance, up to float rounding in the logits): its blocks, steps and noise follow its own state only.
Engine-wide: the model, cache mode, block length, rule, remasking, steps per block (quota rule) and stop_at_eos.
Per request: gen_length (or max_tokens), temperature, threshold / factor / frechet_margin, stop token ids, stop
strings, seed and row id (its noise), and a structured-output constraint where one is supported.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import KW_ONLY, dataclass, field

import torch

from . import block_causal
from .config import DecodeConfig
from .models.common import DiffusionLM
from .policies import CACHE_POLICIES
from .proposal import RowSettings, propose_commit
from .rows import Live, Rows
from .rules import quota_schedule

GROW_COLUMNS = 64  # buffers grow in steps of this many columns when a longer request joins


def row_seed(seed: int, row_id: int) -> int:
    """A 63-bit generator seed from (seed, row id), so a row's noise does not depend on its batch or worker."""
    h = (seed * 0x9E3779B97F4A7C15 + (row_id + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    h ^= h >> 31
    h = (h * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (h ^ (h >> 29)) & ((1 << 63) - 1)


@dataclass
class Request:
    """One prompt (token ids) to decode; every setting left None takes the engine's DecodeConfig value."""

    prompt: list[int]
    _: KW_ONLY
    gen_length: int | None = None  # a multiple of block_length; None: cfg.gen_length, or max_tokens in whole blocks
    max_tokens: int | None = None  # the output is cut at this many tokens (finish_reason "length" when cut)
    temperature: float | None = None
    threshold: float | None = None
    factor: float | None = None
    frechet_margin: float | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None  # None: cfg.stop_token_ids or the checkpoint's
    stop: list[str] | str | None = None  # stop strings (the engine needs a tokenizer)
    seed: int | None = None  # with row_id, seeds the request's noise
    row_id: int | None = None  # None: the request's id
    structured: object | None = None  # fastdllm.StructuredOutputs or its dict form (README, "Structured outputs")


@dataclass
class Finished:
    """A request that finished: its generated ids (cut before the first stop token or stop string, and at
    max_tokens), the forwards it took part in, and why it ended ("stop" or "length")."""

    id: int
    tokens: list[int]
    nfe: int
    finish_reason: str
    text: str | None = None  # with the engine's tokenizer
    prompt_tokens: int = 0


@dataclass
class _Admitted:
    """A validated request with every setting resolved."""

    id: int
    prompt: list[int]
    gen_length: int
    max_tokens: int | None
    temperature: float
    threshold: float
    factor: float
    frechet_margin: float
    stop_ids: tuple[int, ...]
    stop: tuple[str, ...]
    seed: int
    row_id: int
    sampling: bool
    done_tokens: list[int] = field(default_factory=list)  # completed blocks (stop-string rows only)
    structured: object | None = None  # a fastdllm.structured.RowConstraint (its grammar state)


def _number(name: str, v, ok, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return float(v)


class Engine:
    """Decodes requests with at most `max_batch_size` rows in flight; see the module docstring."""

    def __init__(self, model: DiffusionLM, cfg: DecodeConfig | None = None, *, max_batch_size: int,
                 compile: bool = False, tokenizer=None, max_blocks: int | None = None):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self.model, self.cfg, self.tokenizer = model, cfg or DecodeConfig(), tokenizer
        self.max_batch_size = max_batch_size
        self.max_blocks = max_blocks  # benchmarks: decode only the first blocks of each request
        mc = model.config
        self.block_causal = block_causal.is_block_causal(mc)
        block_causal.check_cache(mc, self.cfg.cache)
        self.mask_id = mc.mask_token_id
        self.pad_id = mc.pad_token_id if mc.pad_token_id is not None else mc.mask_token_id
        cfg = self.cfg
        self.default_stop = (tuple(cfg.stop_token_ids if cfg.stop_token_ids is not None else mc.stop_token_ids)
                             if cfg.stop_at_eos else ())
        self.schedule = quota_schedule(cfg.block_length, cfg.block_steps)
        self.offsets = torch.arange(cfg.block_length, device=model.device)
        self.waiting: deque[_Admitted] = deque()
        self.rows: Rows | None = None
        self.policy = None
        self.holes: list[int] = []  # slots of rows that finished in the last step
        self.compile = compile
        if compile:
            from .compiled import compile_model

            compile_model(model)
        self._next = 0
        self.stats = dict(steps=0, forward_passes=0, row_forwards=0, forward_flops=0, rows_in_flight=0,
                          proposal_rows=0, exact_rows=0)  # exact_rows: decided by the float64 fallback

    # -- requests ----------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests added and not yet returned by `step`."""
        live = self.rows.n - len(self.holes) if self.rows is not None else 0
        return len(self.waiting) + live

    def add(self, request: Request) -> int:
        """Queue a request (it joins at the next step with a free slot); returns its id. Bad settings raise
        ValueError with what to change."""
        r = self._resolve(request)
        self.waiting.append(r)
        return r.id

    def reserve(self, seq_len: int) -> None:
        """Size the buffers for canvases (prompt + gen_length) of up to seq_len positions before the first step."""
        if self.rows is None:
            self._allocate(seq_len)
        elif seq_len > self.rows.T:
            self._grow(seq_len)

    def _resolve(self, q: Request) -> _Admitted:
        cfg, mc = self.cfg, self.model.config
        rid = self._next
        p = q.prompt
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, (str, bytes)):
            raise ValueError("Request.prompt is token ids; encode the text first (fastdllm.load_tokenizer(...).encode)")
        p = list(p)
        if not p:
            raise ValueError("the prompt is empty; every prompt needs at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in p):
            raise ValueError("Request.prompt must be a list of token ids (ints)")
        if min(p) < 0 or max(p) >= mc.vocab_size:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {mc.vocab_size})")
        bl = cfg.block_length
        mt = q.max_tokens
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {mt!r}")
        g = q.gen_length
        if g is None:
            g = cfg.gen_length if mt is None else -(-mt // bl) * bl
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or g % bl:
            raise ValueError(f"gen_length must be a positive multiple of block_length ({bl}), got {g!r}")
        if mt is not None and mt > g:
            raise ValueError(f"max_tokens ({mt}) is more than gen_length ({g}); raise gen_length or leave it unset")
        if cfg.cache == "dllm" and g != cfg.gen_length:
            raise ValueError(f"cache 'dllm' decodes every request with the engine's gen_length ({cfg.gen_length}); "
                             f"got {g}: use another cache mode for per-request lengths")
        if self._layout(len(p), g)[0] > mc.max_seq_len:
            raise ValueError(f"the prompt has {len(p)} tokens; with gen_length {g} it exceeds the model's "
                             f"{mc.max_seq_len} positions: shorten it or lower gen_length")
        temperature = _number("temperature", cfg.temperature if q.temperature is None else q.temperature,
                              lambda v: v >= 0, ">= 0")
        threshold = _number("threshold", cfg.threshold if q.threshold is None else q.threshold,
                            lambda v: 0 < v <= 1, "in (0, 1]")
        factor = _number("factor", cfg.factor if q.factor is None else q.factor, lambda v: v > 0, "positive")
        margin = _number("frechet_margin", cfg.frechet_margin if q.frechet_margin is None else q.frechet_margin,
                         lambda v: v >= 0, ">= 0")
        stop_ids = self.default_stop
        if q.stop_token_ids is not None:
            ids = q.stop_token_ids
            if isinstance(ids, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
            stop_ids = tuple(ids)
        stop = q.stop
        if stop is None:
            stop = ()
        else:
            stop = (stop,) if isinstance(stop, str) else tuple(stop)
            if not all(isinstance(s, str) and s for s in stop):
                raise ValueError(f"stop must be a string or a list of non-empty strings, got {q.stop!r}")
            if stop and self.tokenizer is None:
                raise ValueError("stop strings need the engine's tokenizer: Engine(..., tokenizer=...)")
        seed = cfg.seed if q.seed is None else q.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        row_id = rid if q.row_id is None else q.row_id
        if isinstance(row_id, bool) or not isinstance(row_id, int):
            raise ValueError(f"row_id must be an integer, got {row_id!r}")
        constraint = self._constraint(q.structured, stop_ids) if q.structured is not None else None
        self._next += 1
        return _Admitted(rid, p, g, mt, temperature, threshold, factor, margin, stop_ids, stop, seed, row_id,
                         sampling=temperature > 0 or cfg.remasking == "random", structured=constraint)

    def _constraint(self, spec, stop_ids):
        """The grammar state of a constrained request (llguidance against the engine's tokenizer)."""
        from .structured import RowConstraint, StructuredOutputs, llg_tokenizer

        spec = StructuredOutputs.from_dict(spec)
        if self.tokenizer is None:
            raise ValueError("structured outputs need the engine's tokenizer: Engine(..., tokenizer=...)")
        if getattr(self, "_llg_tok", None) is None:
            self._llg_tok = llg_tokenizer(self.tokenizer.hf, self.model.config.vocab_size, list(self.default_stop))
        return RowConstraint(spec, self._llg_tok, stop_ids, self.mask_id)

    def _layout(self, prompt_len: int, gen_length: int) -> tuple[int, int, int]:
        """(canvas, decoded region, prompt tokens in it) of a row; block-causal rows keep whole blocks from 0."""
        if self.block_causal:
            return block_causal.layout(prompt_len, gen_length, self.cfg.block_length)
        return prompt_len + gen_length, gen_length, 0

    # -- buffers -----------------------------------------------------------------------------------------------

    def _allocate(self, seq_len: int) -> None:
        cfg, model = self.cfg, self.model
        self.rows = Rows(self.max_batch_size, seq_len, cfg.block_length, self.mask_id, self.pad_id, model.device)
        policies = block_causal.POLICIES if self.block_causal else CACHE_POLICIES
        self.policy = policies[cfg.cache](model, cfg, self.max_batch_size, seq_len)

    def _grow(self, seq_len: int) -> None:
        seq_len = min(self.model.config.max_seq_len, -(-seq_len // GROW_COLUMNS) * GROW_COLUMNS)
        self.rows.grow(seq_len)
        self.policy.grow(seq_len)

    # -- the step ----------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Waiting requests take the slots of rows that finished, then free slots; holes left over are closed."""
        rows, holes = self.rows, self.holes
        if rows is None:
            if not self.waiting:
                return
            first = list(self.waiting)[: self.max_batch_size]
            self._allocate(max(self._layout(len(r.prompt), r.gen_length)[0] for r in first))
            rows = self.rows
        free = len(holes) + rows.slots - rows.n
        joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        need = max((self._layout(len(r.prompt), r.gen_length)[0] for r in joining), default=0)
        if need > rows.T:
            self._grow(need)
        dev = self.model.device
        bl = self.cfg.block_length
        states = []
        for r in joining:  # a row's generator starts when it joins: seeded by (seed, row id) only
            gen = torch.Generator(device=dev).manual_seed(row_seed(r.seed, r.row_id)) if r.sampling else None
            canvas, region, lead = self._layout(len(r.prompt), r.gen_length)
            n_blocks = region // bl
            if self.max_blocks is not None:
                n_blocks = max(1, min(self.max_blocks, n_blocks))
            states.append((r.prompt, Live(r, canvas, r.gen_length, n_blocks, gen, region=region, lead=lead)))
        joined = rows.add(states, holes)
        if holes:
            src, dst = rows.drop(holes)
            if src:
                self.policy.move(src, dst)
        self.holes = []
        self.policy.admit(joined)

    def _plan(self):
        """Each row's block (its columns, tokens) and the block positions to read logits for: every masked one,
        masked first (host state decides the shapes: the most masks any row has left)."""
        rows = self.rows
        n = rows.n
        starts = rows.block_starts()  # (n,)
        idx = starts[:, None] + self.offsets  # (n, bl) columns of each row's block
        block = rows.x[:n].gather(1, idx)  # (n, bl)
        bl = self.cfg.block_length
        n_masked = max(r.left for r in rows.live)
        if n_masked == bl:
            sel = self.offsets.expand(n, -1)
        else:
            sel = (block != self.mask_id).to(torch.uint8).argsort(dim=-1, stable=True)[:, :n_masked]
        return starts, idx, block, sel

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One decoding step of every row in flight (after waiting requests joined); returns the rows that
        finished in it."""
        if self.rows is None and not self.waiting:
            return []
        self._admit()
        rows = self.rows
        if not rows.n:
            return []
        starts, idx, block, sel = self._plan()
        step = self.policy.forward(self.model, rows, starts, sel)
        live = rows.live
        settings = RowSettings(
            temperature=[r.request.temperature for r in live], threshold=[r.request.threshold for r in live],
            factor=[r.request.factor for r in live], frechet_margin=[r.request.frechet_margin for r in live],
            quota=[self.schedule[min(r.step, len(self.schedule) - 1)] for r in live])
        gens = [r.generator for r in live] if any(r.request.sampling for r in live) else None
        structured = self._structured_step(sel) if any(r.request.structured for r in live) else None
        old = block
        block = propose_commit(step.logits, block, sel, self.mask_id, self.cfg.rule, self.cfg.remasking, settings,
                               gens, structured=structured, tally=self.stats)
        rows.x[: rows.n].scatter_(1, idx, block)
        s = self.stats
        s["steps"] += 1
        s["forward_passes"] += len(step.batches)
        s["row_forwards"] += sum(step.batches)
        s["forward_flops"] += step.flops
        s["rows_in_flight"] += rows.n
        return self._update(block, old)

    def _structured_step(self, sel: torch.Tensor):
        """The constrained rows of this step (their frontier: the first masked block position; they commit in
        order, so it is block_length - left)."""
        from .structured import StructuredStep

        bl = self.cfg.block_length
        live = [(i, r) for i, r in enumerate(self.rows.live) if r.request.structured is not None]
        return StructuredStep([i for i, _ in live], [r.request.structured for _, r in live],
                              [bl - r.left for _, r in live], [r.left for _, r in live], bl, sel.shape[1] == bl)

    def _update(self, block: torch.Tensor, old: torch.Tensor) -> list[Finished]:
        """After the commit: one host sync (masks left per row, stop tokens committed), then advance each row;
        rows that are done leave (their slots are taken at the next step)."""
        rows = self.rows
        live = rows.live
        n = rows.n
        left = (block == self.mask_id).sum(-1)  # (n,)
        stop_sets = [r.request.stop_ids for r in live]
        early_host = [0] * n
        if any(stop_sets):
            leads = [r.lead if r.block == 0 else 0 for r in live]  # prompt tokens in the block are not output
            seen = block
            if any(leads):
                lead_t = torch.tensor(leads, device=block.device)
                seen = block.masked_fill(self.offsets[None, :] < lead_t[:, None], -1)
            if all(st == stop_sets[0] for st in stop_sets):
                hit = torch.isin(seen, torch.tensor(stop_sets[0], device=block.device)).any(-1)
            else:
                width = max(len(st) for st in stop_sets)
                table = torch.tensor([list(st) + [-1] * (width - len(st)) for st in stop_sets], device=block.device)
                hit = (seen[:, :, None] == table[:, None, :]).any(-1).any(-1)
            parts = [left, hit.long()]
            if self.cfg.eos_early_stop:
                width = max(len(st) for st in stop_sets)
                table = torch.tensor([list(st) + [-1] * (width - len(st)) for st in stop_sets], device=block.device)
                parts.append(block_causal.early_stop(old, block, torch.tensor(leads, device=block.device), table,
                                                     self.mask_id).long())
            synced = torch.stack(parts).tolist()
            left_host, hit_host = synced[0], synced[1]
            if self.cfg.eos_early_stop:
                early_host = synced[2]
        else:
            left_host, hit_host = left.tolist(), [0] * n
        with_strings = [i for i in range(n) if live[i].request.stop]
        blocks_host = dict(zip(with_strings, block[with_strings].tolist())) if with_strings else {}
        done: list[tuple[int, Finished | None]] = []
        for i, r in enumerate(live):
            r.nfe += 1
            r.step += 1
            r.left = left_host[i]
            r.stopped = r.stopped or bool(hit_host[i])
            if i in blocks_host:
                finished = self._stop_string(r, blocks_host[i])
                if finished is not None:
                    done.append((i, finished))
                    continue
            if r.left and not early_host[i]:
                continue
            if r.stopped or r.block + 1 == r.n_blocks:
                done.append((i, None))
            else:
                r.block, r.step, r.left = r.block + 1, 0, self.cfg.block_length
        gone = {i for i, _ in done}
        self.policy.settle([i not in gone and live[i].step != 0 for i in range(n)])  # still in their block
        out = []
        need = [i for i, f in done if f is None]
        if need:
            T, bl = rows.T, self.cfg.block_length
            first = min(rows.gen_start(i) for i in need)
            got = rows.x[torch.tensor(need, device=rows.device), first:].tolist()  # (rows, T - first)
            tokens = {}
            for i, toks in zip(need, got):
                r = live[i]
                g0 = rows.gen_start(i) - first + r.lead  # block-causal rows: past the prompt's tail
                tokens[i] = toks[g0 : g0 + min(r.gen_length, r.n_blocks * bl - r.lead)]
        for i, finished in done:
            if finished is None:
                finished = self._finish(live[i], tokens[i])
            out.append(finished)
        self.holes = [i for i, _ in done]
        return out

    def _finish(self, r: Live, toks: list[int]) -> Finished:
        """The output of a finished row: cut before the first stop token, then at max_tokens."""
        q = r.request
        stop = set(q.stop_ids)
        cut = next((k for k, t in enumerate(toks) if t in stop), None) if stop else None
        reason = "length"
        if cut is not None:
            toks, reason = toks[:cut], "stop"
        if q.max_tokens is not None and len(toks) > q.max_tokens:
            toks, reason = toks[: q.max_tokens], "length"
        text = self.tokenizer.decode(toks) if self.tokenizer is not None else None
        return Finished(q.id, toks, r.nfe, reason, text, len(q.prompt))

    def _stop_string(self, r: Live, block: list[int]) -> Finished | None:
        """For a row with stop strings: the text of its tokens known final (its completed blocks and the committed
        run at the start of its block, up to a stop token); a stop string in it ends the row there."""
        q = r.request
        if r.block == 0 and r.lead:
            block = block[r.lead:]  # the prompt's tail (block-causal rows)
        run = []
        for t in block:
            if t == self.mask_id:
                break
            run.append(t)
        toks = q.done_tokens + run
        stop = set(q.stop_ids)
        cut = next((k for k, t in enumerate(toks) if t in stop), None)
        if cut is not None:
            toks = toks[:cut]
        if q.max_tokens is not None:
            toks = toks[: q.max_tokens]
        text = self.tokenizer.decode(toks)
        at = min((k for k in (text.find(s) for s in q.stop) if k >= 0), default=-1)
        if at < 0:
            if not r.left:  # the block is complete: its tokens are final
                q.done_tokens.extend(block)
                del q.done_tokens[r.gen_length:]  # block-causal rows: the last block's tokens past gen_length
            return None
        keep = 0  # the tokens whose text lies wholly before the stop string
        while keep < len(toks) and len(self.tokenizer.decode(toks[: keep + 1])) <= at:
            keep += 1
        return Finished(q.id, toks[:keep], r.nfe, "stop", text[:at], len(q.prompt))
