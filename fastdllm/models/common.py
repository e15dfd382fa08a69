"""Transformer pieces shared by the LLaDA and Dream families.

Both families are pre-norm decoder stacks with RMSNorm, rotary embeddings, SwiGLU MLPs and *bidirectional*
attention. They differ only in names on disk, q/k/v biases, grouped-query attention, and Dream's logit shift,
all of which live in `ModelConfig`. The model takes an optional `KVCache` of preallocated buffers: a forward over
query positions [start, start + L) writes their keys/values into the cache at that slice and attends over the whole
cached sequence, which is exactly what the refresh, prefix and dual steps of cached decoding need.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class ModelConfig:
    family: str  # "llada" | "dream"
    vocab_size: int  # rows of the embedding == width of the logits
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    mask_token_id: int
    max_seq_len: int
    logit_shift: int = 0  # 1 for Dream: the logits used for position i are the raw output at i - 1
    pad_token_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    hf_config: dict = field(default_factory=dict, repr=False)  # the checkpoint's config.json, kept for saving

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


class KVCache:
    """Per-layer key/value buffers (n_layers, slots, n_kv_heads, T, head_dim), written by index, never concatenated.

    A forward uses the cache through `update`: its queries' fresh keys/values go in at their positions and it attends
    over the row's whole sequence. `for_rows` makes the view a forward over some slots uses (continuous batching:
    rows at different steps share the buffers). A forward whose queries cover every position stores what it
    computed (a refresh); any other forward of a subset of slots works on a copy of those slots, because decoding
    rewrites a cached step's positions before it reads them again (see fastdllm/policies.py)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None,
                 write: torch.Tensor | None = None):
        self.k, self.v = k, v
        self.rows = rows  # (B,) slots the forward's rows use, or None: the first B slots
        self.write = write  # (B, L) which queries' keys/values may be written, or None: all of them

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, seq_len: int, device, dtype) -> "KVCache":
        """Zeroed buffers: a forward may attend over (masked) pad columns no forward wrote, which must be finite."""
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, seq_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def for_rows(self, rows: torch.Tensor | None, write: torch.Tensor | None = None, first: int = 0) -> "KVCache":
        """The cache as a forward over slots `rows` (None: the first slots) and columns [first, T) sees it (its
        positions count from `first`); `write` (B, L) masks the queries whose keys/values must not replace the
        cached ones (their outputs are not used)."""
        return KVCache(self.k[:, :, :, first:], self.v[:, :, :, first:], rows, write)

    def move(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy slots src into slots dst (compacting the rows in flight)."""
        self.k.index_copy_(1, dst, self.k.index_select(1, src))
        self.v.index_copy_(1, dst, self.v.index_select(1, src))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start) -> tuple[torch.Tensor, torch.Tensor]:
        """Put fresh keys/values k, v (B, Hkv, L, hd) of queries at [start, start + L) (start an int) or at
        per-row positions start (B, L); return the keys/values (B, Hkv, T, hd) the queries attend over."""
        kb, vb = self.k[layer], self.v[layer]  # (slots, Hkv, T, hd)
        B, L, T = k.shape[0], k.shape[2], kb.shape[2]
        if isinstance(start, int) and start == 0 and L == T and self.write is None:  # a refresh: store, read fresh
            if self.rows is None:
                kb[:B], vb[:B] = k, v
            else:
                kb.index_copy_(0, self.rows, k)
                vb.index_copy_(0, self.rows, v)
            return k, v
        if self.rows is None:
            kb, vb = kb[:B], vb[:B]
        else:
            kb, vb = kb.index_select(0, self.rows), vb.index_select(0, self.rows)
        _put(kb, k, start, self.write)
        _put(vb, v, start, self.write)
        return kb, vb


def _put(buf: torch.Tensor, new: torch.Tensor, start, write: torch.Tensor | None):
    """buf (B, H, T, hd) <- new (B, H, L, hd) at [start, start + L) or at per-row positions start (B, L), only where
    write (B, L) is true (None: everywhere)."""
    if isinstance(start, int):
        view = buf[:, :, start : start + new.shape[2]]
        view.copy_(new if write is None else torch.where(write[:, None, :, None], new, view))
        return
    idx = start[:, None, :, None].expand_as(new)
    if write is not None:
        new = torch.where(write[:, None, :, None], new, buf.gather(2, idx))
    buf.scatter_(2, idx, new)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, L, head_dim) in float32 for integer positions (B, L)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32 (as both reference implementations do), result in x's dtype."""
    h = x.float()
    h1, h2 = h.chunk(2, dim=-1)
    rotated = torch.cat((-h2, h1), dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, n * hd) -> (B, n, L, hd)"""
        B, L, _ = t.shape
        return t.view(B, L, -1, self.head_dim).transpose(1, 2)

    def qk(self, x, cos, sin):
        """Rotated queries (B, H, L, hd) and keys (B, Hkv, L, hd)."""
        return apply_rope(self.heads(self.q(x)), cos, sin), apply_rope(self.heads(self.k(x)), cos, sin)

    def qkv(self, x, cos, sin):
        """Rotated queries (B, H, L, hd), rotated keys and values (B, Hkv, L, hd)."""
        return *self.qk(x, cos, sin), self.heads(self.v(x))

    def attend(self, q, k, v, key_mask):
        """Attention of queries (B, H, L, hd) over keys/values (B, Hkv, T, hd), through the output projection."""
        gqa = self.n_kv_heads != self.n_heads  # grouped heads read the shared keys without copying them
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=gqa)  # (B, H, L, hd)
        B, _, L, _ = q.shape
        return self.o(out.transpose(1, 2).reshape(B, L, -1))  # (B, L, d)

    def forward(self, x, cos, sin, key_mask, cache: "KVCache | None" = None, layer: int = 0, start=0):
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:  # put this forward's keys/values, attend over every position of the row
            k, v = cache.update(layer, k, v, start)
        return self.attend(q, k, v, key_mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, key_mask, cache=None, layer: int = 0, start=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask, cache, layer, start)
        return x + self.mlp(self.mlp_norm(x))


def block_positions(lo, hi: int | None, select: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """Absolute positions (B, M) a step reads logits for: the block [lo, hi), or its `select`ed entries (select
    (B, M) indices into the block; lo then may be a (B,) tensor of per-row block starts)."""
    if select is None:
        return torch.arange(lo, hi, device=device).expand(batch, -1)
    return select + (lo[:, None] if isinstance(lo, torch.Tensor) else lo)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions counting from each row's first real token (pads get 0; they are never attended to)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def key_mask_from(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, 1, T) boolean key mask for SDPA, or None when nothing is padded (the fast path)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class DiffusionLM(nn.Module):
    """A bidirectional transformer returning logits aligned for masked-diffusion decoding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random initialisation (for tiny models and benchmarks); norms start at one."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)
        return self

    def hidden(self, input_ids, positions, key_mask=None, cache: KVCache | None = None, start=0):
        """Final hidden states (B, L, d) for the query tokens input_ids at sequence positions [start, start + L)
        (or, with a cache, at per-row positions start (B, L))."""
        x = self.embed(input_ids)  # (B, L, d)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, key_mask, cache, i, start)
        return x

    def output(self, h: torch.Tensor, h_start, lo, hi: int | None = None,
               select: torch.Tensor | None = None) -> torch.Tensor:
        """Aligned logits for positions [lo, hi) from final hidden states h (B, L, d) of positions
        [h_start, h_start + L), applying the family's logit shift (position 0 keeps its own output); with
        `select` (B, M), indices into [lo, hi), only those rows go through the norm and output projection.
        Per row (continuous batching): h_start and lo may be (B,) tensors; `select` is then required."""
        return self.project(self.output_states(h, h_start, lo, hi, select))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, M, V) from final hidden states (B, M, d): the final norm and the output projection."""
        return self.lm_head(self.norm(h))

    def output_states(self, h: torch.Tensor, h_start, lo, hi: int | None = None,
                      select: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states (B, M, d) `output` projects (so forwards of different rows can share one projection)."""
        if isinstance(lo, int) and isinstance(h_start, int) and lo - self.config.logit_shift < h_start \
                and (lo or h_start):
            raise ValueError(f"hidden states from position {h_start} do not cover logits for [{lo}, {hi})")
        pos = block_positions(lo, hi, select, h.shape[0], h.device)  # (B, M)
        raw = (pos - self.config.logit_shift).clamp_min(0)  # the output each position reads
        raw = raw - (h_start[:, None] if isinstance(h_start, torch.Tensor) else h_start)
        return h.gather(1, raw[..., None].expand(-1, -1, h.shape[-1]))  # (B, M, d)

    def logits_for(self, x, positions, key_mask, cache, q_start: int, q_end: int, lo: int, hi: int,
                   select: torch.Tensor | None = None):
        """Aligned logits (B, hi - lo, V) for positions [lo, hi), from one forward of the queries [q_start, q_end).

        x and positions are the whole sequence (B, T). The query range must cover the raw outputs that positions
        [lo, hi) read: [lo - shift, hi - shift) for a family with a logit shift (position 0 keeps its own).
        Only the needed rows go through the final norm and the (large) output projection: with `select` (B, M),
        indices into [lo, hi), only those M per row (logits (B, M, V)).
        """
        h = self.hidden(x[:, q_start:q_end], positions[:, q_start:q_end], key_mask, cache, q_start)
        return self.output(h, q_start, lo, hi, select)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V); logits[:, i] is what decoding uses for position i. Rows may be left-padded."""
        B, L = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(L, device=input_ids.device).expand(B, L)
        else:
            attention_mask = attention_mask.to(input_ids.device)
            positions = positions_from_mask(attention_mask)
        return self.logits_for(input_ids, positions, key_mask_from(attention_mask), None, 0, L, 0, L)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self, n_queries: int, n_keys: int, values: bool = True) -> int:
        """Matmul FLOPs of one forward of n_queries tokens attending over n_keys (output projection excluded;
        values=False: their value projections were computed elsewhere)."""
        c = self.config
        hd = c.head_dim
        proj = 2 * n_queries * c.d_model * hd * (2 * c.n_heads + (2 if values else 1) * c.n_kv_heads)
        attn = 2 * 2 * n_queries * n_keys * c.n_heads * hd
        mlp = 2 * 3 * n_queries * c.d_model * c.mlp_hidden
        return c.n_layers * (proj + attn + mlp)


def default_std(cfg: ModelConfig) -> float:
    return 1.0 / math.sqrt(cfg.d_model)
