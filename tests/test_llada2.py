"""LLaDA2.x (`llada2_moe`): loading release-format checkpoints written here on disk, block-causal logits against an
independent straightforward implementation, and decoding traces (cache none and prefix, alone and in mixed batches)
against an independent straightforward decoder that recomputes the whole window every step, as the public
reference `generate` does."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastdllm
from fastdllm import DecodeConfig, generate
from fastdllm.engine import Engine, Request
from fastdllm.models import load_model, save_checkpoint

MASK = 60

SHAPES = {
    # head_dim != hidden / heads, partial rotary, GQA, group-limited routing, a shared expert, a dense first layer
    "a": dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=48, partial_rotary_factor=0.5, num_experts=8, num_experts_per_tok=2,
              n_group=4, topk_group=2, routed_scaling_factor=2.5, moe_intermediate_size=16, num_shared_experts=1,
              first_k_dense_replace=1, use_qkv_bias=False, use_bias=True, use_qk_norm=True),
    # full rotary, top-1 (weights not renormalised), no shared expert, qkv bias, unaligned expert width (the
    # per-expert path), every layer MoE, tied embeddings
    "b": dict(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
              head_dim=8, intermediate_size=40, partial_rotary_factor=1.0, num_experts=4, num_experts_per_tok=1,
              n_group=1, topk_group=1, routed_scaling_factor=1.0, moe_intermediate_size=10, num_shared_experts=None,
              first_k_dense_replace=0, use_qkv_bias=True, use_bias=False, use_qk_norm=True,
              tie_word_embeddings=True),
}


def hf_config(shape: str) -> dict:
    d = dict(SHAPES[shape])
    d.update(model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], rms_norm_eps=1e-6, rope_theta=10000.0,
             max_position_embeddings=512, mask_token_id=MASK, pad_token_id=MASK + 1, eos_token_id=MASK + 2,
             hidden_act="silu")
    d.setdefault("tie_word_embeddings", False)
    return d


def random_tensors(d: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the names the reference's save_pretrained writes (per-expert tensors, fused qkv)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=None):
        return torch.randn(*shape, generator=g) * (std or 1 / math.sqrt(shape[-1]))

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    h, H, Hkv, hd = d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    t = {"model.word_embeddings.weight": w(d["vocab_size"], h, std=1.0), "model.norm.weight": norm(h)}
    if not d["tie_word_embeddings"]:
        t["lm_head.weight"] = w(d["vocab_size"], h)
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "attention.query_key_value.weight"] = w((H + 2 * Hkv) * hd, h)
        if d["use_qkv_bias"]:
            t[p + "attention.query_key_value.bias"] = 0.1 * torch.randn((H + 2 * Hkv) * hd, generator=g)
        t[p + "attention.query_layernorm.weight"] = norm(hd)
        t[p + "attention.key_layernorm.weight"] = norm(hd)
        t[p + "attention.dense.weight"] = w(h, H * hd)
        if d["use_bias"]:
            t[p + "attention.dense.bias"] = 0.1 * torch.randn(h, generator=g)
        if i < d["first_k_dense_replace"]:
            I = d["intermediate_size"]
            t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = w(I, h), w(I, h)
            t[p + "mlp.down_proj.weight"] = w(h, I)
            continue
        I = d["moe_intermediate_size"]
        t[p + "mlp.gate.weight"] = w(d["num_experts"], h)
        t[p + "mlp.gate.expert_bias"] = 0.1 * torch.randn(d["num_experts"], generator=g)
        for e in range(d["num_experts"]):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"], t[q + "up_proj.weight"] = w(I, h), w(I, h)
            t[q + "down_proj.weight"] = w(h, I)
        if d.get("num_shared_experts"):
            S = I * d["num_shared_experts"]
            t[p + "mlp.shared_experts.gate_proj.weight"] = w(S, h)
            t[p + "mlp.shared_experts.up_proj.weight"] = w(S, h)
            t[p + "mlp.shared_experts.down_proj.weight"] = w(h, S)
    return t


def write_checkpoint(path, shape: str, seed: int = 0, shards: int = 1):
    """config.json + safetensors (sharded with an index when shards > 1), as a release checkpoint lays them out."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    d = hf_config(shape)
    t = random_tensors(d, seed)
    (path / "config.json").write_text(json.dumps(d))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": d["eos_token_id"]}))
    names = sorted(t)
    if shards == 1:
        save_file(t, str(path / "model.safetensors"))
    else:
        wm = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: t[k] for k in names[s::shards]}
            save_file(part, str(path / fname))
            wm.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d, t


# -- an independent straightforward implementation (eager attention, dense per-expert MoE) ---------------------

def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x, cos, sin):
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    return torch.cat((xr * cos + torch.cat((-x2, x1), -1) * sin, xp), -1)


def _mlp(x, g, u, dn):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn)


def ref_logits(d: dict, t: dict, ids: torch.Tensor, block_length: int) -> torch.Tensor:
    """Logits (1, L, V) of one unpadded row at positions 0..L-1 under the block-causal mask."""
    L = ids.shape[1]
    h, H, Hkv, hd = d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    eps, rd = d["rms_norm_eps"], int(hd * d["partial_rotary_factor"])
    inv = 1.0 / (d["rope_theta"] ** (torch.arange(0, rd, 2).float() / rd))
    ang = torch.arange(L).float()[:, None] * inv[None, :]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()  # (L, rd)
    blk = torch.arange(L) // block_length
    bias = torch.where(blk[None, :] <= blk[:, None], 0.0, float("-inf"))  # (L, L)
    x = t["model.word_embeddings.weight"][ids[0]]  # (L, h)
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms(x, t[p + "input_layernorm.weight"], eps)
        qkv = F.linear(a, t[p + "attention.query_key_value.weight"], t.get(p + "attention.query_key_value.bias"))
        qkv = qkv.view(L, H + 2 * Hkv, hd)
        q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
        q = _rms(q, t[p + "attention.query_layernorm.weight"], eps)
        k = _rms(k, t[p + "attention.key_layernorm.weight"], eps)
        q = _rotate(q.transpose(0, 1), cos, sin)  # (H, L, hd)
        k = _rotate(k.transpose(0, 1), cos, sin).repeat_interleave(H // Hkv, 0)
        v = v.transpose(0, 1).repeat_interleave(H // Hkv, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + bias, -1) @ v  # (H, L, hd)
        x = x + F.linear(att.transpose(0, 1).reshape(L, H * hd), t[p + "attention.dense.weight"],
                         t.get(p + "attention.dense.bias"))
        m = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if i < d["first_k_dense_replace"]:
            x = x + _mlp(m, t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"])
            continue
        E, k_, G, TG = d["num_experts"], d["num_experts_per_tok"], d["n_group"], d["topk_group"]
        scores = torch.sigmoid(m.float() @ t[p + "mlp.gate.weight"].float().T)  # (L, E)
        biased = scores + t[p + "mlp.gate.expert_bias"]
        y = torch.zeros_like(m)
        for n in range(L):  # token by token: the plain reading of group-limited top-k
            groups = biased[n].view(G, -1)
            gscore = groups.sort(descending=True)[0][:, :2].sum(-1)
            allowed = set(gscore.sort(descending=True)[1][:TG].tolist())
            cand = sorted(((biased[n, e].item(), e) for e in range(E) if e // (E // G) in allowed), reverse=True)
            chosen = [e for _, e in cand[:k_]]
            wts = scores[n, chosen]
            if k_ > 1:
                wts = wts / (wts.sum() + 1e-20)
            wts = wts * d["routed_scaling_factor"]
            for e, wt in zip(chosen, wts):
                q_ = f"{p}mlp.experts.{e}."
                y[n] += wt * _mlp(m[n], t[q_ + "gate_proj.weight"], t[q_ + "up_proj.weight"], t[q_ + "down_proj.weight"])
        if d.get("num_shared_experts"):
            y = y + _mlp(m, t[p + "mlp.shared_experts.gate_proj.weight"], t[p + "mlp.shared_experts.up_proj.weight"],
                         t[p + "mlp.shared_experts.down_proj.weight"])
        x = x + y
    x = _rms(x, t["model.norm.weight"], eps)
    head = t["model.word_embeddings.weight"] if d["tie_word_embeddings"] else t["lm_head.weight"]
    return (x @ head.T)[None]


def ref_generate(model, prompt, gen_length, block_length, steps, threshold, eos, eos_early_stop):
    """The reference `generate` (greedy), written plainly: every step re-runs the whole window [0, block end).
    Returns (tokens before the first eos, forwards, finish reason)."""
    P = len(prompt)
    nb = -(-(P + gen_length) // block_length)
    x = torch.full((1, nb * block_length), MASK, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    base, rem = divmod(block_length, steps)
    sched = [base + (1 if i < rem else 0) for i in range(steps)]
    nfe = 0

    def result(upto):
        gen = x[0, P:upto].tolist()
        if eos in gen:
            return gen[: gen.index(eos)], nfe, "stop"
        return gen, nfe, "length"

    for b in range(P // block_length, nb):
        end = (b + 1) * block_length
        for s in range(steps):
            active = x[0, end - block_length:end] == MASK
            if not active.any():
                break
            logits = model(x[:, :end], block_length=block_length)[0, -block_length:].double()
            nfe += 1
            probs = torch.softmax(logits, -1)
            logits[:, MASK] = -float("inf")  # the engine never proposes the mask token
            x0 = logits.argmax(-1)
            p0 = probs.gather(1, x0[:, None])[:, 0]
            conf = torch.where(active, p0, torch.full_like(p0, -float("inf")))
            high = conf > threshold
            if high.sum() >= sched[s]:
                take = high
            else:
                take = torch.zeros_like(active)
                take[conf.topk(min(sched[s], int(active.sum())))[1]] = True
            x[0, end - block_length:end][take] = x0[take]
            if eos_early_stop and (x0[take] == eos).any():
                gen = x[0, P:].tolist()
                at = gen.index(eos)
                if MASK not in gen[:at]:
                    return gen[:at], nfe, "stop"
        if eos in x[0, P:end].tolist():
            break
    return result(P + gen_length)


# -- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("llada2a")
    d, t = write_checkpoint(path, "a", seed=1, shards=3)
    return path, d, t


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llada2b")
    d, t = write_checkpoint(path, "b", seed=2)
    return path, d, t


def prompts_for(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (n,), generator=g).tolist() for n in lengths]


# -- loading and logits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["ckpt_a", "ckpt_b"])
def test_logits_match_independent_implementation(which, request):
    path, d, t = request.getfixturevalue(which)
    model = load_model(path)
    assert model.config.family == "llada2_moe" and model.config.stop_token_ids == (d["eos_token_id"],)
    ids = torch.tensor([prompts_for([21], seed=3)[0]])
    for bl in (4, 8):
        got = model(ids, block_length=bl)
        want = ref_logits(d, t, ids, bl)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # block-causal, not bidirectional: a later block cannot change earlier logits
    other = ids.clone()
    other[0, 16:] = (other[0, 16:] + 1) % MASK
    torch.testing.assert_close(model(other, block_length=8)[:, :16], model(ids, block_length=8)[:, :16])
    assert not torch.allclose(model(other, block_length=8)[:, 8:16], model(other, block_length=16)[:, 8:16])


def test_left_padding_keeps_blocks_on_each_rows_positions(ckpt_a):
    model = load_model(ckpt_a[0])
    a, b = prompts_for([13, 9], seed=4)
    ids = torch.tensor([a, [MASK + 1] * 4 + b])
    am = torch.tensor([[1] * 13, [0] * 4 + [1] * 9])
    got = model(ids, attention_mask=am, block_length=4)
    torch.testing.assert_close(got[1, 4:], model(torch.tensor([b]), block_length=4)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], model(torch.tensor([a]), block_length=4)[0], atol=1e-5, rtol=1e-5)


def test_forward_needs_block_length(ckpt_b):
    model = load_model(ckpt_b[0])
    with pytest.raises(ValueError, match="block_length"):
        model(torch.tensor([[1, 2, 3]]))


def test_save_checkpoint_round_trip(ckpt_a, tmp_path):
    model = load_model(ckpt_a[0])
    save_checkpoint(model, tmp_path / "again", max_shard_bytes=20_000)
    names = set(json.loads((tmp_path / "again" / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == set(ckpt_a[2])  # the release's tensor names, experts unstacked
    again = load_model(tmp_path / "again")
    ids = torch.tensor([list(range(11))])
    torch.testing.assert_close(again(ids, block_length=4), model(ids, block_length=4))


def test_grouped_experts_match_per_expert_loop(ckpt_a):
    model = load_model(ckpt_a[0])
    moe = model.layers[1].mlp
    x = torch.randn(37, model.config.d_model, generator=torch.Generator().manual_seed(0))
    idx, _ = moe.route(x)
    grouped = moe.experts(x, idx)
    loop = torch.stack([F.linear(F.silu(F.linear(x[n], moe.w_gate[e])) * F.linear(x[n], moe.w_up[e]), moe.w_down[e])
                        for n, e in enumerate(idx.flatten().tolist()) for n in [n // idx.shape[1]]])
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)


# -- cache modes refused at engine and plan time -------------------------------------------------------------

@pytest.mark.parametrize("cache", ["dual", "dllm"])
def test_unsupported_cache_modes_are_refused(ckpt_b, cache):
    model = load_model(ckpt_b[0])
    with pytest.raises(ValueError, match=f"cache '{cache}' does not apply to the block-causal family"):
        Engine(model, DecodeConfig(cache=cache, gen_length=16, block_length=8), max_batch_size=2)


def test_plan_refuses_dual_for_llada2(ckpt_b):
    from fastdllm.jobs.manifest import parse_manifest
    from fastdllm.jobs.plan import InvalidJob, check_model_source

    path = ckpt_b[0]
    (path / "tokenizer.json").write_text("{}") if not (path / "tokenizer.json").exists() else None
    m = parse_manifest({"model": {"source": str(path)}, "input": {"uri": str(path / "in.jsonl")},
                        "output": {"uri": str(path / "out")},
                        "decode": {"cache": "dual", "gen_length": 16, "block_length": 8}})
    with pytest.raises(InvalidJob, match="does not apply to the block-causal family"):
        check_model_source(m)


# -- traces --------------------------------------------------------------------------------------------------

def _eos_for(model, prompt, gen, bl, steps, thr):
    """A token the model emits mid-generation for this prompt (so eos handling is exercised)."""
    toks, _, _ = ref_generate(model, prompt, gen, bl, steps, thr, eos=-1, eos_early_stop=False)
    return toks[len(toks) // 2 - 1]


CASES = [  # (block length, steps per block, threshold)
    (8, 4, 0.95), (8, 8, 0.3), (16, 4, 0.6), (16, 16, 0.95),
]


@pytest.mark.parametrize("bl,steps,thr", CASES)
@pytest.mark.parametrize("early", [False, True])
def test_traces_match_reference_decoder(ckpt_a, bl, steps, thr, early):
    model = load_model(ckpt_a[0])
    gen = 24 if bl == 8 else 32
    prompts = prompts_for([5, 11, 16], seed=bl + steps)
    eos = _eos_for(model, prompts[0], gen, bl, steps, thr)
    want = [ref_generate(model, p, gen, bl, steps, thr, eos, early) for p in prompts]
    assert any(w[2] == "stop" for w in want)
    for cache in ("none", "prefix"):
        cfg = DecodeConfig(gen_length=gen, block_length=bl, steps_per_block=steps, rule="quota_threshold",
                           threshold=thr, cache=cache, eos_early_stop=early, stop_token_ids=(eos,))
        for mbs in (1, 2, 3):  # alone, and in mixed batches (rows at different blocks, left padding)
            out = generate(model, prompts, cfg, max_batch_size=mbs)
            got = list(zip(out.tokens, out.nfe, out.finish_reasons))
            assert got == want, (cache, mbs)


def test_early_stop_ends_rows_sooner(ckpt_a):
    model = load_model(ckpt_a[0])
    p = prompts_for([7], seed=5)[0]
    eos = _eos_for(model, p, 32, 16, 16, 0.99)
    late = ref_generate(model, p, 32, 16, 16, 0.99, eos, False)
    early = ref_generate(model, p, 32, 16, 16, 0.99, eos, True)
    assert early[0] == late[0] and early[1] <= late[1]
    cfg = dict(gen_length=32, block_length=16, steps_per_block=16, rule="quota_threshold", threshold=0.99,
               stop_token_ids=(eos,), cache="prefix")
    a = generate(model, [p], DecodeConfig(**cfg, eos_early_stop=True))
    assert (a.tokens[0], a.nfe[0], a.finish_reasons[0]) == early


@pytest.mark.parametrize("rule", ["threshold", "factor", "frechet", "quota"])
def test_prefix_equals_none_for_fast_dllm_rules(ckpt_b, rule):
    model = load_model(ckpt_b[0])
    prompts = prompts_for([3, 9, 14, 20], seed=7)
    kw = dict(gen_length=16, block_length=8, rule=rule, threshold=0.5, steps=8, stop_token_ids=(), stop_at_eos=False)
    outs = {}
    for cache in ("none", "prefix"):
        for mbs in (1, 3):
            o = generate(model, prompts, DecodeConfig(cache=cache, **kw), max_batch_size=mbs)
            outs[cache, mbs] = (o.tokens, o.nfe)
    first = outs["none", 1]
    assert all(len(t) == 16 for t in first[0])
    assert all(v == first for v in outs.values())


def test_engine_requests_join_mid_flight(ckpt_a):
    """Continuous batching: a request added while others are mid-block decodes as it does alone."""
    model = load_model(ckpt_a[0])
    cfg = DecodeConfig(gen_length=16, block_length=8, steps_per_block=4, rule="quota_threshold", threshold=0.9,
                       cache="prefix", stop_at_eos=False)
    ps = prompts_for([6, 12, 21], seed=9)  # the third one's canvas is longer: the buffers grow mid-flight
    alone = [generate(model, [p], cfg).tokens[0] for p in ps]
    eng = Engine(model, cfg, max_batch_size=2)
    ids = [eng.add(Request(ps[0])), eng.add(Request(ps[1]))]
    got = {}
    steps = 0
    while eng.pending:
        if steps == 2:
            ids.append(eng.add(Request(ps[2])))
        for f in eng.step():
            got[f.id] = f.tokens
        steps += 1
    assert [got[i] for i in ids] == alone


# -- traces recorded from the public reference (LLaDA2MoeModelLM.generate, transformers 4.57, fp32, its sampler
# replaced by argmax with the mask token excluded: true greedy) on the checkpoints in tests/fixtures/llada2 -------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "llada2"


def _fixture_cases():
    p = FIXTURES / "cases.json"
    return json.loads(p.read_text()) if p.is_file() else []


@pytest.mark.skipif(not (FIXTURES / "cases.json").is_file(), reason="no recorded llada2 reference traces")
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_recorded_reference_traces(cache):
    cases = _fixture_cases()
    models = {}
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        key = (c["checkpoint"], c["block_length"], c["steps_per_block"], c["threshold"], c["gen_length"], c["eos"],
               c["eos_early_stop"])
        groups.setdefault(key, []).append(c)
    assert any(c["finish_reason"] == "stop" for c in cases) and any(c["eos_early_stop"] for c in cases)
    for (ck, bl, steps, thr, gen, eos, early), cs in groups.items():
        model = models.setdefault(ck, load_model(FIXTURES / ck))
        cfg = DecodeConfig(gen_length=gen, block_length=bl, steps_per_block=steps, rule="quota_threshold",
                           threshold=thr, cache=cache, eos_early_stop=early, stop_token_ids=(eos,))
        want = [(c["tokens"], c["nfe"], c["finish_reason"]) for c in cs]
        for mbs in (1, len(cs)):  # alone, and all of the group's prompts in one mixed batch
            out = generate(model, [c["prompt"] for c in cs], cfg, max_batch_size=mbs)
            assert list(zip(out.tokens, out.nfe, out.finish_reasons)) == want, (ck, bl, steps, thr, early, mbs)
