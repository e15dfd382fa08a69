"""Dream (Dream-v0-7B Base/Instruct): a Qwen2 layout with q/k/v biases and grouped-query attention.

Dream predicts position i from the hidden state at i - 1, so `logit_shift` is 1: the model's aligned logits for
position i are its raw output at i - 1, and position 0 keeps its own.
"""

from __future__ import annotations

from .common import ModelConfig

MODEL_TYPE = "Dream"

BLOCK_PREFIX = 'model.layers.'
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.q_proj.bias": "attn.q.bias",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.k_proj.bias": "attn.k.bias",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.v_proj.bias": "attn.v.bias",
    "self_attn.o_proj.weight": "attn.o.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def from_hf_config(d: dict) -> ModelConfig:
    n_heads = d["num_attention_heads"]
    return ModelConfig(
        family="dream",
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        mlp_hidden=d["intermediate_size"],
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        mask_token_id=int(d.get("mask_token_id", 151666)),
        max_seq_len=int(d.get("max_position_embeddings", 32768)),
        logit_shift=1,
        pad_token_id=d.get("pad_token_id"),
        hf_config=dict(d),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    d = dict(cfg.hf_config)
    d.update(
        model_type=MODEL_TYPE,
        architectures=["DreamModel"],
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        intermediate_size=cfg.mlp_hidden,
        vocab_size=cfg.vocab_size,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        mask_token_id=cfg.mask_token_id,
        max_position_embeddings=cfg.max_seq_len,
        pad_token_id=cfg.pad_token_id,
        hidden_act="silu",
    )
    d.setdefault("eos_token_id", cfg.stop_token_ids[0] if cfg.stop_token_ids else None)
    return d

