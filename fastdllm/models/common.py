"""Transformer pieces shared by the LLaDA and Dream families.

Both families are pre-norm decoder stacks with RMSNorm, rotary embeddings, SwiGLU MLPs and *bidirectional*
attention. They differ only in names on disk, q/k/v biases, grouped-query attention, and Dream's logit shift,
all of which live in `ModelConfig`. The model takes an optional `KVCache` of preallocated buffers: a forward over
query positions [start, start + L) writes their keys/values into the cache at that slice and attends over the whole
cached sequence, which is exactly what the refresh, prefix and dual steps of cached decoding need.
"""

from __future__ import annotations

import dataclasses
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
    """Per-layer key/value buffers (n_layers, slots, n_kv_heads, T + 1, head_dim), written by index in place, never
    concatenated or copied per step (docs/DESIGN.md, "Caches").

    Column T is a scratch column: writes that must not land (the queries of a prefix step before their row's own
    block) are sent there, and no forward ever reads it, so a write needs no read-modify-write of the old values.

    A forward uses the cache through `attend`. A forward whose queries cover every position of its rows (a refresh)
    attends over its fresh keys/values and stores them. Any other forward writes its fresh keys/values into its rows'
    slots and attends to the cache where it lies: over the first rows (`rows` None), or, for rows spread over the
    slots, with its queries placed among the `span` rows in flight (the other rows' outputs are dropped), so no
    row's cached keys/values are gathered. `for_rows` makes the view one forward uses."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None,
                 write: torch.Tensor | None = None, first: int = 0, span: int | None = None,
                 span_mask: torch.Tensor | None = None, defer: list | None = None):
        self.k, self.v = k, v  # the whole buffers
        self.rows = rows  # (B,) slots the forward's rows use, or None: the first B slots
        self.write = write  # (B, L) which queries' keys/values may be written, or None: all of them
        self.first = first  # the forward's column 0 is buffer column `first`
        self.span = span  # rows placed among the first `span` slots when `rows` is given
        self.span_mask = span_mask  # (span, 1, 1, T - first) key mask of those slots, or None
        self.defer = defer  # a refresh appends (layer, k, v) here instead of storing (see `store`)

    @property
    def seq_len(self) -> int:
        return self.k.shape[3] - 1

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, seq_len: int, device, dtype) -> "KVCache":
        """Zeroed buffers: a forward may attend over (masked) pad columns no forward wrote, which must be finite."""
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, seq_len + 1, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def for_rows(self, rows: torch.Tensor | None, write: torch.Tensor | None = None, first: int = 0,
                 span: int | None = None, span_mask: torch.Tensor | None = None, defer: list | None = None
                 ) -> "KVCache":
        """The cache as a forward over slots `rows` (None: the first slots) and columns [first, T) sees it (its
        positions count from `first`); `write` (B, L) masks the queries whose keys/values must not replace the
        cached ones (their outputs are not used). Rows spread over the slots attend among the first `span` slots,
        whose key mask is `span_mask`."""
        return KVCache(self.k, self.v, rows, write, first, span, span_mask, defer)

    def move(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy slots src into slots dst (compacting the rows in flight)."""
        self.k.index_copy_(1, dst, self.k.index_select(1, src))
        self.v.index_copy_(1, dst, self.v.index_select(1, src))

    def grow(self, seq_len: int) -> "KVCache":
        """The buffers with room for `seq_len` positions, the old ones right-aligned in them (rows end at T)."""
        L, S, H, T1, hd = self.k.shape
        d = seq_len + 1 - T1
        k = self.k.new_zeros((L, S, H, seq_len + 1, hd))
        v = torch.zeros_like(k)
        k[:, :, :, d : d + T1 - 1] = self.k[:, :, :, : T1 - 1]
        v[:, :, :, d : d + T1 - 1] = self.v[:, :, :, : T1 - 1]
        return KVCache(k, v)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None, first: int):
        """Keys/values k, v (B, Hkv, L, hd) of a refresh, at columns [first, first + L) of slots `rows` (None: the
        first B)."""
        kb, vb = self.k[layer], self.v[layer]
        cols = slice(first, first + k.shape[2])
        if rows is None:
            kb[: k.shape[0], :, cols] = k
            vb[: k.shape[0], :, cols] = v
        else:
            kb[:, :, cols].index_copy_(0, rows, k)
            vb[:, :, cols].index_copy_(0, rows, v)

    def attend(self, attn: "Attention", layer: int, q, k, v, start, key_mask) -> torch.Tensor:
        """Attention outputs (B, H, L, hd) of queries q (B, H, L, hd) at [start, start + L) (start an int) or at
        per-row positions start (B, L), whose fresh keys/values are k, v (B, Hkv, L, hd)."""
        T, f = self.seq_len, self.first
        B, L = k.shape[0], k.shape[2]
        if isinstance(start, int) and start == 0 and L == T - f and self.write is None:  # a refresh
            if self.defer is not None:
                self.defer.append((layer, k, v))
            else:
                self.store(layer, k, v, self.rows, f)
            return attn.attention(q, k, v, key_mask)
        kb, vb = self.k[layer], self.v[layer]  # (slots, Hkv, T + 1, hd)
        if isinstance(start, int):
            cols = torch.arange(start + f, start + f + L, device=k.device).expand(B, L)
        else:
            cols = start + f
        if self.write is not None:
            cols = torch.where(self.write, cols, T)  # the scratch column
        rows = self.rows if self.rows is not None else torch.arange(B, device=k.device)
        kb[rows[:, None], :, cols] = k.transpose(1, 2)  # (B, L, Hkv, hd) into place
        vb[rows[:, None], :, cols] = v.transpose(1, 2)
        if self.rows is None:
            return attn.attention(q, kb[:B, :, f:T], vb[:B, :, f:T], key_mask)
        n = self.span
        placed = q.new_zeros((n, *q.shape[1:]))  # (span, H, L, hd): zero queries for the rows not in this forward
        placed[self.rows] = q
        out = attn.attention(placed, kb[:n, :, f:T], vb[:n, :, f:T], self.span_mask)  # (span, H, L, hd)
        return out[self.rows]


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
    """cos/sin tables (B, 1, L, head_dim / 2) in float32 for integer positions (B, L): both halves of a head rotate
    by the same angles, so the tables hold one half (the reference implementations repeat it)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, L, hd/2)
    return freqs.cos()[:, None], freqs.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding in float32 (as both reference implementations do), result in x's dtype (written into `out`
    when given). Computed half by half, x1 cos - x2 sin and x2 cos + x1 sin: the same roundings as the reference's
    x cos + rotate_half(x) sin, without materialising the rotated copy."""
    h = x.float()
    h1, h2 = h.chunk(2, dim=-1)
    if (torch.is_grad_enabled() and h.requires_grad) or torch.compiler.is_compiling():  # no out= (grad, graphs)
        return torch.cat((h1 * cos - h2 * sin, h2 * cos + h1 * sin), dim=-1).to(x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.sub(h1 * cos, h2 * sin, out=o1)  # computed in float32, rounded once to out's dtype
    torch.add(h2 * cos, h1 * sin, out=o2)
    return out


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

    def attention(self, q, k, v, key_mask):
        """Attention of queries (B, H, L, hd) over keys/values (B, Hkv, T, hd): (B, H, L, hd)."""
        gqa = self.n_kv_heads != self.n_heads  # grouped heads read the shared keys without copying them
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=gqa)

    def project(self, out):
        """(B, H, L, hd) attention outputs through the output projection: (B, L, d)."""
        B, _, L, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(B, L, -1))

    def attend(self, q, k, v, key_mask):
        """Attention of queries (B, H, L, hd) over keys/values (B, Hkv, T, hd), through the output projection."""
        return self.project(self.attention(q, k, v, key_mask))

    def mix(self, q, k, v, key_mask, cache: "KVCache | None" = None, layer: int = 0, start=0):
        """Attention outputs (B, H, L, hd) of queries q over fresh keys/values k, v, or through the cache."""
        if cache is None:
            return self.attention(q, k, v, key_mask)
        return cache.attend(self, layer, q, k, v, start, key_mask)  # through the cached keys/values of the rows

    def forward(self, x, cos, sin, key_mask, cache: "KVCache | None" = None, layer: int = 0, start=0):
        return self.project(self.mix(*self.qkv(x, cos, sin), key_mask, cache, layer, start))


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
        heads = self.attn.mix(*self.qkv_in(x, cos, sin), key_mask, cache, layer, start)  # (B, H, L, hd)
        return self.finish(x, heads)

    # The two dense halves of a layer, around its attention (which reads and writes the cache): the parts that
    # `compile=True` compiles (fastdllm/compiled.py).
    def qkv_in(self, x, cos, sin):
        return self.attn.qkv(self.attn_norm(x), cos, sin)

    def finish(self, x, heads):
        x = x + self.attn.project(heads)
        return x + self.mlp(self.mlp_norm(x))


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

    def output(self, h: torch.Tensor, h_start, starts: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """Aligned logits (B, M, V) for positions starts[:, None] + select (starts (B,) per-row block starts, select
        (B, M) indices into each block), from final hidden states h (B, L, d) of the positions [h_start, h_start + L)
        (h_start an int or a (B,) tensor), applying the family's logit shift (position 0 keeps its own output).
        Only those M rows per row go through the final norm and the (large) output projection."""
        return self.project(self.output_states(h, h_start, starts, select))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, M, V) from final hidden states (B, M, d): the final norm and the output projection."""
        return self.lm_head(self.norm(h))

    def output_states(self, h: torch.Tensor, h_start, starts: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, M, d) `output` projects (so forwards of different rows can share one projection)."""
        pos = starts[:, None] + select  # (B, M) absolute positions
        raw = (pos - self.config.logit_shift).clamp_min(0)  # the output each position reads
        raw = raw - (h_start[:, None] if isinstance(h_start, torch.Tensor) else h_start)
        return h.gather(1, raw[..., None].expand(-1, -1, h.shape[-1]))  # (B, M, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V); logits[:, i] is what decoding uses for position i. Rows may be left-padded."""
        B, L = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            positions = torch.arange(L, device=dev).expand(B, L)
        else:
            attention_mask = attention_mask.to(dev)
            positions = positions_from_mask(attention_mask)
        h = self.hidden(input_ids, positions, key_mask_from(attention_mask))  # (B, L, d)
        every = torch.arange(L, device=dev).expand(B, L)
        return self.output(h, 0, torch.zeros(B, dtype=torch.long, device=dev), every)

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

