"""Cache policies: what each cache mode does in a decoding step, behind one protocol, in one registry.

With continuous batching the rows in flight are at different blocks and steps: in one step some rows do their
block's refresh (step 0: a full forward that rebuilds every cached position) while others do a cached step. A policy
runs, for the rows that take part (every row in flight), the forwards the step needs: one per kind of row, each
over exactly the rows of that kind, so every row gets one NFE and no row is pushed through the model only to wait.

Protocol (`CachePolicy`): `admit(slots)` sets up rows that joined in those slots, `move(src, dst)` mirrors the
compaction of the rows in flight (`Rows.drop`), `forward(model, rows, starts, select)` returns the step's logits
for every row and what it cost. `CACHE_POLICIES` maps the `DecodeConfig.cache` names to the classes; the CLI and
the benchmark/evaluation sweeps take their choices from it.

Cached steps never need to persist what they write: a prefix step rewrites [block start, T) and a dual step the
block before reading them, and a row's next block starts with a refresh. So a cached forward over some of the
slots works on a copy of those slots (see `KVCache.update`), and only refreshes store into the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .dllm_cache import FeatureCache
from .models.common import DiffusionLM, KVCache

if TYPE_CHECKING:
    from .decoding import DecodeConfig
    from .rows import Rows


@dataclass
class Step:
    logits: torch.Tensor  # (n, M, V) for the selected positions of every row in flight
    batches: list[int]  # rows in each model forward the step ran
    flops: int  # matmul FLOPs of those forwards


class CachePolicy(Protocol):
    def __init__(self, model: DiffusionLM, cfg: "DecodeConfig", slots: int, prompt_len: int): ...

    def admit(self, slots: list[int]) -> None:
        """Rows joined in these slots; their next forward is their first block's refresh."""

    def move(self, src: list[int], dst: list[int]) -> None:
        """The rows of slots src moved to slots dst."""

    def forward(self, model: DiffusionLM, rows: "Rows", starts: torch.Tensor, select: torch.Tensor) -> Step:
        """Logits for positions starts[:, None] + select (n, M) of every row in flight, with one forward per kind
        of row (their final states share one output projection)."""


def _head_flops(model: DiffusionLM, n_rows: int, n_out: int) -> int:
    c = model.config
    return n_rows * 2 * n_out * c.d_model * c.vocab_size


class NoCache:
    """`none`: every step is a full forward over the whole sequence of every row."""

    def __init__(self, model: DiffusionLM, cfg: "DecodeConfig", slots: int, prompt_len: int):
        pass

    def admit(self, slots: list[int]) -> None:
        pass

    def move(self, src: list[int], dst: list[int]) -> None:
        pass

    def forward(self, model, rows, starts, select) -> Step:
        n, w = rows.n, rows.window()
        h = model.hidden(w.x, w.positions, w.key_mask)  # (n, L, d) for the window's L columns
        logits = model.output(h, 0, starts - w.first, None, select)  # (n, M, V)
        L = w.x.shape[1]
        return Step(logits, [n], n * model.forward_flops(L, L) + _head_flops(model, n, select.shape[1]))


class _KVPolicy:
    """Shared by `prefix` and `dual`: preallocated key/value buffers, one slot per row in flight. Rows at step 0
    take part in a refresh forward (every position, stored); the others in one cached forward whose query window
    the subclass chooses in `cached_step(model, window, slots, starts, select, first block, last block, first
    generated column)`, which returns the final states for the selected positions and the query length."""

    def __init__(self, model: DiffusionLM, cfg: "DecodeConfig", slots: int, prompt_len: int):
        self.cache = KVCache.allocate(model.config, slots, prompt_len + cfg.gen_length, model.device, model.dtype)
        self.bl = cfg.block_length
        self.shift = model.config.logit_shift

    def admit(self, slots: list[int]) -> None:
        pass  # the refresh of their first block writes every position

    def move(self, src: list[int], dst: list[int]) -> None:
        dev = self.cache.k.device
        self.cache.move(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))

    def forward(self, model, rows, starts, select) -> Step:
        n = rows.n
        refresh = [i for i in range(n) if rows.step[i] == 0]
        cached = [i for i in range(n) if rows.step[i] != 0]
        groups = [(g, kind) for g, kind in ((refresh, "refresh"), (cached, "cached")) if g]
        states, batches, flops = None, [], 0
        for host, kind in groups:
            part = None if len(host) == n else torch.tensor(host, device=rows.x.device)  # None: every row
            pick = (lambda t: t[:n]) if part is None else (lambda t: t.index_select(0, part))
            w = rows.window(part, host)
            s, sel = pick(starts) - w.first, pick(select)  # block starts counted from the window's first column
            L = w.x.shape[1]
            if kind == "refresh":
                h = model.hidden(w.x, w.positions, w.key_mask, self.cache.for_rows(part, first=w.first), 0)
                hs = model.output_states(h, 0, s, None, sel)  # h: (b, L, d)
                f = model.forward_flops(L, L)
            else:
                hs, q_len = self.cached_step(model, w, part, s, sel, min(rows.block[i] for i in host),
                                             max(rows.block[i] for i in host), rows.P - w.first)
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

    def cached_step(self, model, w, part, s, sel, first_block: int, last_block: int, gen_start: int):
        L = w.x.shape[1]
        q0 = gen_start + first_block * self.bl - self.shift  # (host) the earliest block start among the rows
        write = None
        if first_block != last_block:
            write = torch.arange(q0, L, device=s.device)[None, :] >= (s - self.shift)[:, None]  # (b, L - q0)
        cache = self.cache.for_rows(part, write, w.first)
        h = model.hidden(w.x[:, q0:], w.positions[:, q0:], w.key_mask, cache, q0)  # (b, L - q0, d)
        return model.output_states(h, q0, s, None, sel), L - q0


class DualCache(_KVPolicy):
    """`dual`: a cached step forwards each row's own block (gathered per row); it attends to the cached keys/values
    of every position, with the block's entries replaced by the fresh ones."""

    def cached_step(self, model, w, part, s, sel, first_block: int, last_block: int, gen_start: int):
        L = self.bl + self.shift
        q = (s - self.shift)[:, None] + torch.arange(L, device=s.device)  # (b, L) each row's block window
        cache = self.cache.for_rows(part, first=w.first)
        h = model.hidden(w.x.gather(1, q), w.positions.gather(1, q), w.key_mask, cache, q)  # (b, L, d)
        return model.output_states(h, s - self.shift, s, None, sel), L


class DllmCache:
    """`dllm` (dLLM-Cache): per-layer feature caching with per-row refresh intervals; one forward over every row in
    flight, where each row refreshes or updates adaptively on its own step counter (see fastdllm/dllm_cache.py)."""

    def __init__(self, model: DiffusionLM, cfg: "DecodeConfig", slots: int, prompt_len: int):
        self.features = FeatureCache(model, slots, prompt_len + cfg.gen_length, prompt_len - model.config.logit_shift,
                                     prompt_interval=cfg.prompt_interval, response_interval=cfg.response_interval,
                                     adaptive_ratio=cfg.adaptive_ratio)

    def admit(self, slots: list[int]) -> None:
        self.features.reset(slots)

    def move(self, src: list[int], dst: list[int]) -> None:
        dev = self.features.k.device
        self.features.move(torch.tensor(src, device=dev), torch.tensor(dst, device=dev), src, dst)

    def forward(self, model, rows, starts, select) -> Step:
        n, w = rows.n, rows.window()
        logits, flops = self.features.forward(model, w.x, w.positions, w.key_mask, [True] * n, starts - w.first,
                                              None, select, w.first)
        return Step(logits, [n], flops)


CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    "none": NoCache, "prefix": PrefixCache, "dual": DualCache, "dllm": DllmCache}
