"""Cache policies: what each cache mode does in a decoding step, behind one protocol, in one registry.

With continuous batching the rows in flight are at different blocks and steps: in one step some rows do their
block's refresh (step 0: a full forward that rebuilds every cached position) while others do a cached step. A policy
runs, for the rows that take part (every row in flight), the forwards the step needs: one per kind of row, each
over exactly the rows of that kind, so every row gets one NFE and no row is pushed through the model only to wait.

Protocol (`CachePolicy`): `admit(slots)` sets up rows that joined in those slots, `move(src, dst)` mirrors the
compaction of the rows in flight (`Rows.drop`), `forward(model, rows, starts, select)` returns the step's logits
for every row and what it cost. `CACHE_POLICIES` maps the `DecodeConfig.cache` names to the classes; the CLI and
the benchmark/evaluation sweeps take their choices from it.

What a cached step writes is rewritten before it is read again (a prefix step rewrites [block start, T) and a dual
step the block, and a row's next block starts with a refresh), so cached steps write their fresh keys/values in
place and attend to the cache where it lies; a refresh stores what the row's next cached step will read, and
nothing when the row's block completes in that step (its next forward is a refresh again). See docs/DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .dllm_cache import FeatureCache
from .models.common import DiffusionLM, KVCache

from .config import CACHE_MODES, DecodeConfig

if TYPE_CHECKING:
    from .rows import Rows


@dataclass
class Step:
    logits: torch.Tensor  # (n, M, V) for the selected positions of every row in flight
    batches: list[int]  # rows in each model forward the step ran
    flops: int  # matmul FLOPs of those forwards


class CachePolicy(Protocol):
    def __init__(self, model: DiffusionLM, cfg: DecodeConfig, slots: int, seq_len: int): ...

    def admit(self, slots: list[int]) -> None:
        """Rows joined in these slots; their next forward is their first block's refresh."""

    def move(self, src: list[int], dst: list[int]) -> None:
        """The rows of slots src moved to slots dst."""

    def grow(self, seq_len: int) -> None:
        """The rows' buffers grew to seq_len columns (rows stay right-aligned)."""

    def forward(self, model: DiffusionLM, rows: "Rows", starts: torch.Tensor, select: torch.Tensor) -> Step:
        """Logits for positions starts[:, None] + select (n, M) of every row in flight, with one forward per kind
        of row (their final states share one output projection)."""

    def settle(self, continuing: list[bool]) -> None:
        """After the step's commit: which rows in flight still have masks in their block (a cached step next)."""


def _head_flops(model: DiffusionLM, n_rows: int, n_out: int) -> int:
    c = model.config
    return n_rows * 2 * n_out * c.d_model * c.vocab_size


class NoCache:
    """`none`: every step is a full forward over the whole sequence of every row."""

    def __init__(self, model: DiffusionLM, cfg: DecodeConfig, slots: int, seq_len: int):
        pass

    def admit(self, slots: list[int]) -> None:
        pass

    def move(self, src: list[int], dst: list[int]) -> None:
        pass

    def grow(self, seq_len: int) -> None:
        pass

    def settle(self, continuing: list[bool]) -> None:
        pass

    def forward(self, model, rows, starts, select) -> Step:
        n, w = rows.n, rows.window()
        h = model.hidden(w.x, w.positions, w.key_mask)  # (n, L, d) for the window's L columns
        logits = model.output(h, 0, starts - w.first, select)  # (n, M, V)
        L = w.x.shape[1]
        return Step(logits, [n], n * model.forward_flops(L, L) + _head_flops(model, n, select.shape[1]))


# A refresh keeps its fresh keys/values until the step's commit and stores them only for the rows whose block still
# has masks (the others' next forward is a refresh again), when they take at most this many bytes.
DEFER_BYTES = 1 << 29


class _KVPolicy:
    """Shared by `prefix` and `dual`: preallocated key/value buffers, one slot per row in flight. Rows at step 0
    take part in a refresh forward (every position); the others in one cached forward whose query window the
    subclass chooses in `cached_step(model, window, cache, starts, select, host rows)`, which returns the final
    states for the selected positions and the query length. A cached forward writes its fresh keys/values in place
    and attends to its rows' slots where they lie (`KVCache.attend`): nothing of a row's cache is copied."""

    def __init__(self, model: DiffusionLM, cfg: DecodeConfig, slots: int, seq_len: int):
        self.cache = KVCache.allocate(model.config, slots, seq_len, model.device, model.dtype)
        self.bl = cfg.block_length
        self.shift = model.config.logit_shift
        self.pending = None  # (refresh rows, their slots or None, first column, [(layer, k, v)]) until `settle`

    def admit(self, slots: list[int]) -> None:
        pass  # the refresh of their first block writes every position

    def move(self, src: list[int], dst: list[int]) -> None:
        dev = self.cache.k.device
        self.cache.move(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))

    def grow(self, seq_len: int) -> None:
        self.cache = self.cache.grow(seq_len)

    def settle(self, continuing: list[bool]) -> None:
        if self.pending is None:
            return
        host, part, first, kvs = self.pending
        self.pending = None
        keep = [j for j, i in enumerate(host) if continuing[i]]
        if not keep:
            return
        runs, a = [], keep[0]  # maximal runs of consecutive kept rows: one store each
        for prev, j in zip(keep, keep[1:] + [None]):
            if j != prev + 1:
                runs.append((a, prev + 1))
                a = j
        for layer, k, v in kvs:
            for a, b in runs:
                if part is None and a == 0:
                    self.cache.store(layer, k[a:b], v[a:b], None, first)
                else:
                    slots = torch.tensor(host[a:b], device=k.device)
                    self.cache.store(layer, k[a:b], v[a:b], slots, first)

    def forward(self, model, rows, starts, select) -> Step:
        n = rows.n
        refresh = [i for i in range(n) if rows.live[i].step == 0]
        cached = [i for i in range(n) if rows.live[i].step != 0]
        groups = [(g, kind) for g, kind in ((refresh, "refresh"), (cached, "cached")) if g]
        states, batches, flops = None, [], 0
        c = model.config
        for host, kind in groups:
            part = None if len(host) == n else torch.tensor(host, device=rows.x.device)  # None: every row
            pick = (lambda t: t[:n]) if part is None else (lambda t: t.index_select(0, part))
            w = rows.window(part, host)
            s, sel = pick(starts) - w.first, pick(select)  # block starts counted from the window's first column
            L = w.x.shape[1]
            if kind == "refresh":
                kv_bytes = 2 * c.n_layers * len(host) * c.n_kv_heads * L * c.head_dim * self.cache.k.element_size()
                defer = [] if kv_bytes <= DEFER_BYTES else None
                if defer is not None:
                    self.pending = (host, part, w.first, defer)
                cache = self.cache.for_rows(part, first=w.first, defer=defer)
                h = model.hidden(w.x, w.positions, w.key_mask, cache, 0)
                hs = model.output_states(h, 0, s, sel)  # h: (b, L, d)
                f = model.forward_flops(L, L)
            else:
                span_mask = None
                if part is not None and any(r.canvas < L for r in rows.live):
                    span_mask = rows.valid[:n, w.first:][:, None, None, :]
                cache = self.cache.for_rows(part, first=w.first, span=n, span_mask=span_mask)
                hs, q_len = self.cached_step(model, w, cache, s, sel, [rows.block_start(i) - w.first for i in host])
                f = model.forward_flops(q_len, L)
            flops += len(host) * f + _head_flops(model, len(host), sel.shape[1])
            batches.append(len(host))
            if part is None:
                states = hs
            else:  # the rows' final states, merged: one output projection (and one logits tensor) per step
                if states is None:
                    states = hs.new_empty((n, *hs.shape[1:]))
                states.index_copy_(0, part, hs)
        return Step(model.project(states), batches, flops)


class PrefixCache(_KVPolicy):
    """`prefix`: a cached step forwards [block start, T); it attends to the cached keys/values of the positions
    before its block plus its own fresh ones. Rows at different blocks share one window [earliest start, T); a row
    does not write its keys/values before its own block (those queries' outputs are not used)."""

    def cached_step(self, model, w, cache, s, sel, host_starts: list[int]):
        L = w.x.shape[1]
        q0 = min(host_starts) - self.shift  # (host) the earliest block start among the rows
        if min(host_starts) != max(host_starts):
            cache.write = torch.arange(q0, L, device=s.device)[None, :] >= (s - self.shift)[:, None]  # (b, L - q0)
        h = model.hidden(w.x[:, q0:], w.positions[:, q0:], w.key_mask, cache, q0)  # (b, L - q0, d)
        return model.output_states(h, q0, s, sel), L - q0


class DualCache(_KVPolicy):
    """`dual`: a cached step forwards each row's own block (gathered per row); it attends to the cached keys/values
    of every position, with the block's entries replaced by the fresh ones."""

    def cached_step(self, model, w, cache, s, sel, host_starts: list[int]):
        L = self.bl + self.shift
        q = (s - self.shift)[:, None] + torch.arange(L, device=s.device)  # (b, L) each row's block window
        h = model.hidden(w.x.gather(1, q), w.positions.gather(1, q), w.key_mask, cache, q)  # (b, L, d)
        return model.output_states(h, s - self.shift, s, sel), L


class DllmCache:
    """`dllm` (dLLM-Cache): per-layer feature caching with per-row refresh intervals; one forward over every row in
    flight, where each row refreshes or updates adaptively on its own step counter (see fastdllm/dllm_cache.py).
    Every row's response region is [T - gen_length - shift, T): the rows in flight share one gen_length."""

    def __init__(self, model: DiffusionLM, cfg: DecodeConfig, slots: int, seq_len: int):
        self.response = cfg.gen_length + model.config.logit_shift
        self.features = FeatureCache(model, slots, seq_len, seq_len - self.response,
                                     prompt_interval=cfg.prompt_interval, response_interval=cfg.response_interval,
                                     adaptive_ratio=cfg.adaptive_ratio)

    def admit(self, slots: list[int]) -> None:
        pass  # a row's step counter is its nfe, 0 when it joins: its first forward computes everything

    def move(self, src: list[int], dst: list[int]) -> None:
        dev = self.features.k.device
        self.features.move(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))

    def grow(self, seq_len: int) -> None:
        self.features.grow(seq_len)

    def settle(self, continuing: list[bool]) -> None:
        pass

    def forward(self, model, rows, starts, select) -> Step:
        n, w = rows.n, rows.window()
        logits, flops = self.features.forward(model, w.x, w.positions, w.key_mask, [r.nfe for r in rows.live],
                                              starts - w.first, select, w.first)
        return Step(logits, [n], flops)


CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    "none": NoCache, "prefix": PrefixCache, "dual": DualCache, "dllm": DllmCache}
assert tuple(CACHE_POLICIES) == CACHE_MODES, "fastdllm.config.CACHE_MODES lists the registry's names"
