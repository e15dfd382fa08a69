"""dLLM-Cache (Liu et al., 2025): adaptive per-layer feature caching, the `cache="dllm"` decoding mode.

Each layer caches, for every position, its keys and values and the outputs of its attention (after the output
projection) and of its MLP (after the down projection). The prompt and the response region are refreshed on
their own intervals (`prompt_interval`, `response_interval` steps); step 0 computes everything. On the other
steps each layer recomputes the values of the response region, compares them with the cached ones (cosine
similarity), and recomputes queries, keys, attention and MLP only for the `adaptive_ratio` least similar
positions of each row; a layer's output is its input plus the cached attention and MLP outputs.

The step counter is per row (the forwards the row took part in, `Live.nfe`), so a row refreshes on its own
schedule and its result does not depend on its batch or on when it joined. When some rows refresh a region and
others do not, the region is computed for all rows and each row writes back only what its own schedule allows. The
buffers have one slot per row in flight; a forward of B rows uses the first B slots (the engine keeps the rows
there).

The response region starts at the first generated position, or one earlier for families with a logit shift
(Dream reads position i's logits from the output at i - 1, so that output belongs with the response).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.common import DiffusionLM, rope_tables


class FeatureCache:
    """Per-layer feature buffers, one slot per row in flight. The per-row step counters are the rows' own
    (`Live.nfe`: the forwards each row took part in), passed to every `forward`."""

    def __init__(self, model: DiffusionLM, batch: int, seq_len: int, response_start: int, *, prompt_interval: int,
                 response_interval: int, adaptive_ratio: float):
        c = model.config
        dev, dt = model.device, model.dtype
        L, B, T = c.n_layers, batch, seq_len
        self.k = torch.zeros((L, B, c.n_kv_heads, T, c.head_dim), device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self.attn = torch.zeros((L, B, T, c.d_model), device=dev, dtype=dt)  # attention outputs
        self.mlp = torch.zeros_like(self.attn)  # MLP outputs
        self.r0 = response_start
        self.kp, self.kr, self.ratio = prompt_interval, response_interval, adaptive_ratio

    def grow(self, seq_len: int):
        """Room for `seq_len` positions: rows stay right-aligned (they and their response region end at T)."""
        d = seq_len - self.k.shape[3]
        for name, dim in (("k", 3), ("v", 3), ("attn", 2), ("mlp", 2)):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[dim] = seq_len
            new = old.new_zeros(shape)
            new.narrow(dim, d, old.shape[dim]).copy_(old)
            setattr(self, name, new)
        self.r0 += d

    def move(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy slots src into slots dst (compacting the rows in flight)."""
        for buf in (self.k, self.v, self.attn, self.mlp):
            buf.index_copy_(1, dst, buf.index_select(1, src))

    @torch.inference_mode()
    def forward(self, model: DiffusionLM, x, positions, key_mask, steps: list[int], starts: torch.Tensor,
                select: torch.Tensor, first: int = 0):
        """One decoding step of the rows in the first B slots, row b at its step steps[b] (0: its first forward,
        which computes everything): aligned logits (B, M, V) for positions starts[:, None] + select (as in
        `DiffusionLM.output`) and the matmul FLOPs spent. x, positions, key_mask and starts cover the columns
        [first, T) only (see `Rows.window`): the pad columns before `first` are neither computed nor read."""
        c = model.config
        B, T = x.shape
        dev = x.device
        r0 = self.r0 - first
        G = T - r0  # response positions
        kc, vc = (buf[:, :B, :, first:] for buf in (self.k, self.v))  # the rows' slots and columns
        ac, mc = (buf[:, :B, first:] for buf in (self.attn, self.mlp))
        refresh_p = [s % self.kp == 0 for s in steps]
        refresh_r = [s % self.kr == 0 for s in steps]
        adaptive = [not r for r in refresh_r]
        n_pick = int(self.ratio * G) if any(adaptive) else 0
        t0 = 0 if any(refresh_p) else r0  # the positions whose residual stream this step carries: [t0, T)
        N, P0 = T - t0, r0 - t0  # carried positions; where the response starts among them
        full = any(refresh_p) or any(refresh_r)  # compute every carried position (each row writes its own part)

        # write[b, j]: may row b store what it computes for carried position j
        write = torch.zeros((B, N), dtype=torch.bool, device=dev)
        write[:, :P0] = torch.tensor(refresh_p, device=dev)[:, None]
        write[:, P0:] = torch.tensor(refresh_r, device=dev)[:, None]
        adaptive_t = torch.tensor(adaptive, device=dev)

        h = model.embed(x[:, t0:])  # (B, N, d) residual stream of the carried positions
        cos, sin = rope_tables(positions[:, t0:], c.head_dim, c.rope_theta)  # (B, 1, N, hd)
        flops = 0
        for li, layer in enumerate(model.layers):
            att = layer.attn
            n = layer.attn_norm(h)
            w = write
            if n_pick:
                # fresh values of the whole response, compared with the cached ones
                v_new = att.heads(att.v(n[:, P0:]))  # (B, Hkv, G, hd)
                v_old = vc[li, :, :, r0:]
                sim = F.cosine_similarity(v_new.transpose(1, 2).flatten(2), v_old.transpose(1, 2).flatten(2), dim=-1)
                picked = sim.topk(n_pick, dim=-1, largest=False).indices  # (B, n_pick) least similar
                vc[li, :, :, r0:] = torch.where(adaptive_t[:, None, None, None], v_new, v_old)
                pick_mask = torch.zeros((B, G), dtype=torch.bool, device=dev).scatter(1, picked, True)
                w = write.clone()
                w[:, P0:] |= pick_mask & adaptive_t[:, None]
                flops += B * 2 * G * c.d_model * c.n_kv_heads * c.head_dim
            if full:
                idx = None  # every carried position, as a slice
                nq, hq, cq, sq, wq = n, h, cos, sin, w
            elif n_pick:
                idx = picked + P0  # (B, n_pick) indices among the carried positions
                nq, hq = _rows(n, idx), _rows(h, idx)
                cq, sq = _rows(cos[:, 0], idx)[:, None], _rows(sin[:, 0], idx)[:, None]
                wq = adaptive_t[:, None].expand_as(idx)
            else:  # nothing to recompute in this layer: reuse the cached outputs
                h = h + ac[li, :, t0:] + mc[li, :, t0:]
                continue
            if full:
                q, k, v = att.qkv(nq, cq, sq)
                _store(vc[li], 2, t0, idx, v, wq)
            else:  # the values of every response position are fresh already
                q, k = att.qk(nq, cq, sq)
            _store(kc[li], 2, t0, idx, k, wq)
            a = att.attend(q, kc[li], vc[li], key_mask)  # (B, nq, d)
            _store(ac[li], 1, t0, idx, a, wq)
            m = layer.mlp(layer.mlp_norm(hq + a))
            _store(mc[li], 1, t0, idx, m, wq)
            h = h + ac[li, :, t0:] + mc[li, :, t0:]
            flops += B * model.forward_flops(nq.shape[1], T, values=full) // c.n_layers
        flops += B * 2 * select.shape[1] * c.d_model * c.vocab_size
        return model.output(h, t0, starts, select), flops


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, N, D) gathered at per-row indices idx (B, K) -> (B, K, D)"""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def _store(buf: torch.Tensor, dim: int, t0: int, idx: torch.Tensor | None, new: torch.Tensor, w: torch.Tensor):
    """Write `new` into buf along `dim` (the position axis: 2 for (B, H, T, hd), 1 for (B, T, d)) where w (B, K) is
    true. idx (B, K) gives the positions relative to t0, or None for the contiguous slice [t0, T)."""
    wm = w[:, None, :, None] if dim == 2 else w[:, :, None]
    if idx is None:
        view = buf.narrow(dim, t0, new.shape[dim])
        view.copy_(torch.where(wm, new, view))
        return
    pos = idx + t0
    pos = pos[:, None, :, None].expand_as(new) if dim == 2 else pos[..., None].expand_as(new)
    buf.scatter_(dim, pos, torch.where(wm, new, buf.gather(dim, pos)))
