"""LLaDA (LLaDA-8B-Base/Instruct, LLaDA-1.5): config.json keys and checkpoint tensor names.

The on-disk layout is the OLMo-style one the LLaDA releases use: `model.transformer.wte.weight`,
`model.transformer.blocks.N.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}.weight`,
`model.transformer.ln_f.weight`, `model.transformer.ff_out.weight` (absent with weight tying).
"""

from __future__ import annotations

from .common import ModelConfig

MODEL_TYPE = "llada"

BLOCK_PREFIX = 'model.transformer.blocks.'
BLOCK_NAMES = {  # checkpoint name inside a block -> ours
    "attn_norm.weight": "attn_norm.weight",
    "q_proj.weight": "attn.q.weight",
    "q_proj.bias": "attn.q.bias",
    "k_proj.weight": "attn.k.weight",
    "k_proj.bias": "attn.k.bias",
    "v_proj.weight": "attn.v.weight",
    "v_proj.bias": "attn.v.bias",
    "attn_out.weight": "attn.o.weight",
    "ff_norm.weight": "mlp_norm.weight",
    "ff_proj.weight": "mlp.gate.weight",
    "up_proj.weight": "mlp.up.weight",
    "ff_out.weight": "mlp.down.weight",
}
TOP_NAMES = {
    "model.transformer.wte.weight": "embed.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}


def from_hf_config(d: dict) -> ModelConfig:
    n_heads = d["n_heads"]
    n_kv = d.get("n_kv_heads") or (1 if d.get("multi_query_attention") else n_heads)
    mlp_hidden = d.get("mlp_hidden_size") or d["mlp_ratio"] * d["d_model"]
    return ModelConfig(
        family=MODEL_TYPE,
        vocab_size=d.get("embedding_size") or d["vocab_size"],
        d_model=d["d_model"],
        n_layers=d["n_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        mlp_hidden=mlp_hidden,
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(d.get("include_qkv_bias") or d.get("include_bias")),
        tie_embeddings=bool(d.get("weight_tying", False)),
        mask_token_id=int(d.get("mask_token_id", 126336)),
        max_seq_len=int(d.get("max_sequence_length", 4096)),
        pad_token_id=d.get("pad_token_id"),
        hf_config=dict(d),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    """A config.json in the LLaDA release's format (keys the reference code reads)."""
    d = dict(cfg.hf_config)
    d.update(
        model_type=MODEL_TYPE,
        architectures=["LLaDAModelLM"],
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        mlp_hidden_size=cfg.mlp_hidden,
        mlp_ratio=max(1, cfg.mlp_hidden // cfg.d_model),
        vocab_size=cfg.vocab_size,
        embedding_size=cfg.vocab_size,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        include_qkv_bias=cfg.qkv_bias,
        include_bias=False,
        weight_tying=cfg.tie_embeddings,
        mask_token_id=cfg.mask_token_id,
        max_sequence_length=cfg.max_seq_len,
        pad_token_id=cfg.pad_token_id,
        block_type="llama",
        layer_norm_type="rms",
        activation_type="silu",
        rope=True,
        alibi=False,
        use_cache=False,
    )
    d.setdefault("eos_token_id", cfg.stop_token_ids[0] if cfg.stop_token_ids else None)
    return d
