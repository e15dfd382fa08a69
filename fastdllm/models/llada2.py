"""LLaDA2.x (`llada2_moe`: LLaDA2.0-mini, LLaDA2.0-flash): a block-diffusion mixture-of-experts decoder.

Differences from the LLaDA/Dream stack in common.py, all read from config.json:
- attention: one fused query_key_value projection, `head_dim` from the config (may differ from d_model / heads),
  RMSNorm on each query/key head (`use_qk_norm`), rotary on the first `partial_rotary_factor` of each head only,
  an output projection with a bias (`use_bias`);
- the first `first_k_dense_replace` layers have a dense SwiGLU MLP, the others a mixture of experts: sigmoid router
  scores, plus `expert_bias` for the choice only, group-limited top-k (`n_group`, `topk_group`), the chosen scores
  renormalised and scaled by `routed_scaling_factor`, plus `num_shared_experts` shared experts;
- attention is block-causal (a query sees its own block and every earlier one; blocks of `block_length` counted
  from each row's position 0), so the keys/values of finished blocks are final (fastdllm/block_causal.py).

On disk (what `save_pretrained` of the reference class writes): `model.word_embeddings.weight`,
`model.layers.N.{input_layernorm, attention.query_key_value, attention.query_layernorm, attention.key_layernorm,
attention.dense, post_attention_layernorm}`, `model.layers.N.mlp.{gate_proj, up_proj, down_proj}` (dense layers),
`model.layers.N.mlp.{gate.weight, gate.expert_bias, experts.E.*_proj, shared_experts.*_proj}` (MoE layers),
`model.norm.weight`, `lm_head.weight`. Expert weights are stacked per layer (E, out, in) when loaded, so routed
tokens go through grouped matmuls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, Attention, DiffusionLM, ModelConfig, RMSNorm, apply_rope, positions_from_mask, rope_tables

MODEL_TYPE = "llada2_moe"
DEFAULT_MASK_ID = 156895  # LLaDA2.0's <|mask|> (the reference generate's default)


@dataclass(kw_only=True)
class Llada2Config(ModelConfig):
    attn_head_dim: int
    rotary_dim: int  # leading dims of each head that rotate
    qk_norm: bool = True
    o_bias: bool = False
    n_experts: int = 0  # 0: every layer dense
    top_k: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    moe_hidden: int = 0
    n_shared: int = 0
    first_dense: int = 0

    block_causal = True  # the engine decodes this family with fastdllm/block_causal.py

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads ({self.n_heads}) must be divisible by num_key_value_heads "
                             f"({self.n_kv_heads})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})"
                             "; set mask_token_id in config.json")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.attn_head_dim:
            raise ValueError(f"head_dim * partial_rotary_factor ({self.rotary_dim}) must be even and in "
                             f"(0, head_dim = {self.attn_head_dim}]")
        if self.n_experts:
            if self.n_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"num_experts ({self.n_experts}) must split into n_group ({self.n_group}) groups "
                                 f"and topk_group ({self.topk_group}) must be in [1, n_group]")
            if not 1 <= self.top_k <= self.n_experts:
                raise ValueError(f"num_experts_per_tok ({self.top_k}) must be in [1, num_experts]")

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.first_dense


def from_hf_config(d: dict) -> Llada2Config:
    n_heads = d["num_attention_heads"]
    hd = d.get("head_dim") or d["hidden_size"] // n_heads
    n_exp = d.get("num_experts") or 0
    return Llada2Config(
        family=MODEL_TYPE,
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        mlp_hidden=d.get("intermediate_size") or 0,
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(d.get("use_qkv_bias", False)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        mask_token_id=int(d.get("mask_token_id", DEFAULT_MASK_ID)),
        max_seq_len=int(d.get("max_position_embeddings", 16384)),
        pad_token_id=d.get("pad_token_id"),
        hf_config=dict(d),
        attn_head_dim=hd,
        rotary_dim=int(hd * float(d.get("partial_rotary_factor", 0.5))),
        qk_norm=bool(d.get("use_qk_norm", True)),
        o_bias=bool(d.get("use_bias", True)),
        n_experts=n_exp,
        top_k=int(d.get("num_experts_per_tok", 2)) if n_exp else 1,
        n_group=int(d.get("n_group") or 1),
        topk_group=int(d.get("topk_group") or 1),
        routed_scaling=float(d.get("routed_scaling_factor", 1.0)),
        moe_hidden=int(d.get("moe_intermediate_size") or 0),
        n_shared=int(d.get("num_shared_experts") or 0),
        first_dense=int(d.get("first_k_dense_replace", 0)),
    )


def to_hf_config(cfg: Llada2Config) -> dict:
    d = dict(cfg.hf_config)
    d.update(model_type=MODEL_TYPE, architectures=["LLaDA2MoeModelLM"], vocab_size=cfg.vocab_size,
             hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.attn_head_dim, intermediate_size=cfg.mlp_hidden,
             rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, use_qkv_bias=cfg.qkv_bias,
             tie_word_embeddings=cfg.tie_embeddings, mask_token_id=cfg.mask_token_id,
             max_position_embeddings=cfg.max_seq_len, pad_token_id=cfg.pad_token_id,
             partial_rotary_factor=cfg.rotary_dim / cfg.attn_head_dim, use_qk_norm=cfg.qk_norm, use_bias=cfg.o_bias,
             num_experts=cfg.n_experts or None, num_experts_per_tok=cfg.top_k, n_group=cfg.n_group,
             topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling, moe_intermediate_size=cfg.moe_hidden,
             num_shared_experts=cfg.n_shared or None, first_k_dense_replace=cfg.first_dense, hidden_act="silu")
    d.setdefault("eos_token_id", cfg.stop_token_ids[0] if cfg.stop_token_ids else None)
    return d


# -- checkpoint names ------------------------------------------------------------------------------------------

TOP_NAMES = {"model.word_embeddings.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
LAYER_NAMES = {  # inside model.layers.N.
    "input_layernorm.weight": "attn_norm.weight",
    "attention.query_key_value.weight": "attn.wqkv.weight",
    "attention.query_key_value.bias": "attn.wqkv.bias",
    "attention.query_layernorm.weight": "attn.q_norm.weight",
    "attention.key_layernorm.weight": "attn.k_norm.weight",
    "attention.dense.weight": "attn.o.weight",
    "attention.dense.bias": "attn.o.bias",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
    "mlp.gate.weight": "mlp.router",
    "mlp.gate.expert_bias": "mlp.expert_bias",
    "mlp.shared_experts.gate_proj.weight": "mlp.shared.gate.weight",
    "mlp.shared_experts.up_proj.weight": "mlp.shared.up.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared.down.weight",
}
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_LAYER = "model.layers."


def ours(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor; an expert's weight maps to `layers.N.mlp.w_gate[E]` etc. (the
    pieces `stack` assembles)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if not name.startswith(_LAYER):
        return None
    idx, rest = name[len(_LAYER):].split(".", 1)
    if rest in LAYER_NAMES:
        return f"layers.{idx}.{LAYER_NAMES[rest]}"
    m = _EXPERT.fullmatch(rest)
    return f"layers.{idx}.mlp.w_{m.group(2)}[{m.group(1)}]" if m else None


def stack(state: dict[str, torch.Tensor], cfg: Llada2Config) -> dict[str, torch.Tensor]:
    """The per-expert tensors of `state` stacked into (E, out, in) weights per layer (one copy of the experts).
    Empty tensors are dropped: the reference writes zero-width shared experts when num_shared_experts is 0."""
    out = {k: v for k, v in state.items() if "[" not in k and v.numel()}
    for i in range(cfg.n_layers):
        if not cfg.is_moe(i):
            continue
        for w in ("gate", "up", "down"):
            parts = [state.pop(f"layers.{i}.mlp.w_{w}[{e}]", None) for e in range(cfg.n_experts)]
            if any(p is None for p in parts):
                raise ValueError(f"checkpoint lacks model.layers.{i}.mlp.experts.*.{w}_proj.weight for some of its "
                                 f"{cfg.n_experts} experts")
            out[f"layers.{i}.mlp.w_{w}"] = torch.stack(parts)
    return out


def export(state: dict[str, torch.Tensor], cfg: Llada2Config) -> dict[str, torch.Tensor]:
    """Our state dict in checkpoint names (experts unstacked)."""
    inv = {v: k for k, v in LAYER_NAMES.items()}
    top = {v: k for k, v in TOP_NAMES.items()}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        _, idx, rest = name.split(".", 2)
        m = re.fullmatch(r"mlp\.w_(gate|up|down)", rest)
        if m:
            for e in range(t.shape[0]):
                out[f"{_LAYER}{idx}.mlp.experts.{e}.{m.group(1)}_proj.weight"] = t[e]
        else:
            out[f"{_LAYER}{idx}.{inv[rest]}"] = t
    return out


# -- modules ---------------------------------------------------------------------------------------------------

class Llada2Attention(Attention):
    """Fused q/k/v, per-head RMSNorm of queries and keys, partial rotary; `attention` / `project` as in common."""

    def __init__(self, cfg: Llada2Config):
        nn.Module.__init__(self)
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.rotary = cfg.n_heads, cfg.n_kv_heads, hd, cfg.rotary_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=cfg.qkv_bias)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.o = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.o_bias)

    def _rope(self, t, cos, sin):
        r = self.rotary
        if r == self.head_dim:
            return apply_rope(t, cos, sin)
        return torch.cat((apply_rope(t[..., :r], cos, sin), t[..., r:]), dim=-1)

    def qkv_(self, x, cos, sin):
        B, L, _ = x.shape
        qkv = self.wqkv(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, L, hd)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        return self._rope(self.q_norm(q), cos, sin), self._rope(self.k_norm(k), cos, sin), v

    def forward(self, x, cos, sin, key_mask, cache=None, layer: int = 0, start=0):
        return self.project(self.mix(*self.qkv_(x, cos, sin), key_mask, cache, layer, start))


class MoE(nn.Module):
    """Routed experts (stacked weights) plus shared experts."""

    def __init__(self, cfg: Llada2Config):
        super().__init__()
        E, I, d = cfg.n_experts, cfg.moe_hidden, cfg.d_model
        self.cfg = cfg
        self.router = nn.Parameter(torch.empty(E, d))
        self.register_buffer("expert_bias", torch.zeros(E))
        self.w_gate = nn.Parameter(torch.empty(E, I, d))
        self.w_up = nn.Parameter(torch.empty(E, I, d))
        self.w_down = nn.Parameter(torch.empty(E, d, I))
        self.shared = MLP(_Dims(d, I * cfg.n_shared)) if cfg.n_shared else None

    def route(self, x: torch.Tensor):
        """Expert ids (N, k) and their float32 weights (N, k) for tokens x (N, d)."""
        c = self.cfg
        scores = torch.sigmoid(F.linear(x.float(), self.router.float()))  # (N, E)
        biased = scores + self.expert_bias.float()
        N = x.shape[0]
        group = biased.view(N, c.n_group, -1).topk(min(2, c.n_experts // c.n_group), dim=-1)[0].sum(-1)  # (N, G)
        keep = torch.zeros_like(group).scatter_(1, group.topk(c.topk_group, dim=-1, sorted=False)[1], 1.0)
        keep = keep.bool()[:, :, None].expand(N, c.n_group, c.n_experts // c.n_group).reshape(N, -1)
        idx = biased.masked_fill(~keep, float("-inf")).topk(c.top_k, dim=-1)[1]  # (N, k)
        w = scores.gather(1, idx)
        if c.top_k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * c.routed_scaling

    def experts(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Outputs (N * k, d) of each (token, chosen expert) pair, in the order of idx.flatten(): the pairs sorted
        by expert and run as one grouped matmul per projection (a loop over experts where grouped matmuls do not
        apply: unaligned widths)."""
        E, k = self.cfg.n_experts, idx.shape[1]
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        xs = x[order // k]  # (N k, d) tokens sorted by expert
        counts = torch.bincount(flat, minlength=E)
        align = 16 // x.element_size()
        if hasattr(torch, "_grouped_mm") and all(n % align == 0 for n in (x.shape[1], self.w_gate.shape[1])):
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(xs, self.w_gate.transpose(1, 2), offs=offs)) \
                * torch._grouped_mm(xs, self.w_up.transpose(1, 2), offs=offs)
            ys = torch._grouped_mm(h, self.w_down.transpose(1, 2), offs=offs)  # (N k, d)
        else:
            ys = torch.empty_like(xs)
            a = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    t = xs[a:a + n]
                    ys[a:a + n] = F.linear(F.silu(F.linear(t, self.w_gate[e])) * F.linear(t, self.w_up[e]),
                                           self.w_down[e])
                    a += n
        out = torch.empty_like(ys)
        out[order] = ys
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        idx, w = self.route(flat)
        y = self.experts(flat, idx).view(*idx.shape, -1)  # (N, k, d)
        y = (y.float() * w[..., None]).sum(1).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(shape)


@dataclass
class _Dims:  # the two sizes `common.MLP` reads
    d_model: int
    mlp_hidden: int


class Llada2Block(nn.Module):
    def __init__(self, cfg: Llada2Config, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Llada2Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)

    def forward(self, x, cos, sin, key_mask, cache=None, layer: int = 0, start=0):
        heads = self.attn.mix(*self.qkv_in(x, cos, sin), key_mask, cache, layer, start)  # (B, H, L, hd)
        return self.finish(x, heads)

    # the dense halves around the attention, as in common.Block (what `compile=True` compiles)
    def qkv_in(self, x, cos, sin):
        return self.attn.qkv_(self.attn_norm(x), cos, sin)

    def finish(self, x, heads):
        x = x + self.attn.project(heads)
        return x + self.mlp(self.mlp_norm(x))


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None,
                      block_length: int) -> torch.Tensor:
    """(B, 1, Lq, Lk) boolean mask: query at position p sees keys whose position is in p's block or an earlier one
    (positions count from each row's first real token), and only real keys."""
    allowed = (k_pos // block_length)[:, None, :] <= (q_pos // block_length)[:, :, None]  # (B, Lq, Lk)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    return allowed[:, None]


class Llada2LM(DiffusionLM):
    """The LLaDA2 stack with the DiffusionLM interface the engine and the policies use (`hidden`, `output`,
    `project`); `forward` needs the block length."""

    def __init__(self, cfg: Llada2Config):
        nn.Module.__init__(self)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Llada2Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden(self, input_ids, positions, key_mask=None, cache=None, start=0):
        x = self.embed(input_ids)  # (B, L, d)
        cos, sin = rope_tables(positions, self.config.rotary_dim, self.config.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, key_mask, cache, i, start)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                block_length: int | None = None) -> torch.Tensor:
        """Logits (B, L, V) under the block-causal mask of `block_length` (required); rows may be left-padded."""
        if block_length is None or isinstance(block_length, bool) or not isinstance(block_length, int) \
                or block_length < 1:
            raise ValueError(f"{MODEL_TYPE} attention is block-causal: pass block_length=B (a positive integer), "
                             f"got {block_length!r}")
        B, L = input_ids.shape
        if attention_mask is None:
            positions, valid = torch.arange(L, device=input_ids.device).expand(B, L), None
        else:
            valid = attention_mask.to(input_ids.device).bool()
            positions = positions_from_mask(valid)
        mask = block_causal_mask(positions, positions, valid, block_length)
        return self.project(self.hidden(input_ids, positions, mask))

    def forward_flops(self, n_queries: int, n_keys: int, values: bool = True) -> int:
        c = self.config
        hd = c.head_dim
        proj = 2 * n_queries * c.d_model * hd * (2 * c.n_heads + 2 * c.n_kv_heads)
        attn = 2 * 2 * n_queries * n_keys * c.n_heads * hd
        total = 0
        for i in range(c.n_layers):
            width = c.moe_hidden * (c.top_k + c.n_shared) if c.is_moe(i) else c.mlp_hidden
            total += proj + attn + 2 * 3 * n_queries * c.d_model * width
        return total

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        super().init_weights(std, generator)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, MoE):
                    m.expert_bias.normal_(0.0, 0.1, generator=generator)
        return self


def build(cfg: Llada2Config) -> Llada2LM:
    return Llada2LM(cfg)
