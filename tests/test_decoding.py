"""Decoding contracts: batch invariance, stop tokens, cache exactness, sampling, config validation."""

import itertools

import pytest
import torch

from fastdllm import DecodeConfig, generate
from fastdllm.decoding import CACHE_MODES
from fastdllm.models.common import KVCache, key_mask_from, positions_from_mask
from fastdllm.rules import RULES

from .conftest import random_prompts

LENGTHS = [3, 11, 6, 17, 1]


def _cfg(**kw):
    base = dict(gen_length=32, block_length=8, steps=32, stop_at_eos=False, threshold=0.5, factor=2.0,
                frechet_margin=0.1)
    base.update(kw)
    return DecodeConfig(**base)


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
@pytest.mark.parametrize("cache,rule", list(itertools.product(CACHE_MODES, RULES)))
def test_batch_gives_each_row_its_batch_of_one_result(request, family, cache, rule):
    model = request.getfixturevalue(family)
    prompts = random_prompts(model, LENGTHS, seed=1)
    cfg = _cfg(cache=cache, rule=rule)
    batch = generate(model, prompts, cfg)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], cfg)
        assert batch.tokens[i] == alone.tokens[0], f"row {i} (prompt length {len(p)})"
        assert batch.nfe[i] == alone.nfe[0]
    if rule != "quota":  # parallel rules commit several tokens per step on these models
        assert min(batch.nfe) < cfg.gen_length


@pytest.mark.parametrize("cfg_kw", [dict(temperature=0.7), dict(remasking="random"),
                                    dict(temperature=1.0, remasking="random", rule="threshold")])
def test_sampling_noise_follows_the_row_not_the_batch(llada_tiny, cfg_kw):
    prompts = random_prompts(llada_tiny, LENGTHS, seed=2)
    cfg = _cfg(cache="dual", rule=cfg_kw.pop("rule", "quota"), seed=7, **cfg_kw)
    ids = [101, 7, 55, 3, 900]
    batch = generate(llada_tiny, prompts, cfg, row_ids=ids)
    order = [3, 0, 4]
    sub = generate(llada_tiny, [prompts[i] for i in order], cfg, row_ids=[ids[i] for i in order])
    for j, i in enumerate(order):
        assert sub.tokens[j] == batch.tokens[i] and sub.nfe[j] == batch.nfe[i]
    greedy = generate(llada_tiny, prompts, _cfg(cache="dual", rule=cfg.rule))
    assert batch.tokens != greedy.tokens  # the noise does change the samples
    other_seed = generate(llada_tiny, prompts, DecodeConfig(**{**cfg.to_dict(), "seed": 8}), row_ids=ids)
    assert other_seed.tokens != batch.tokens


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_stop_token_cuts_output_and_saves_forwards(request, family, cache):
    model = request.getfixturevalue(family)
    prompts = random_prompts(model, [5, 9], seed=3)
    full = generate(model, prompts, _cfg(cache=cache, rule="threshold"))
    # Use a token the full decode produces in its second block as the stop token.
    stop_id = full.tokens[0][10]
    stopped = generate(model, prompts, _cfg(cache=cache, rule="threshold", stop_at_eos=True, stop_token_ids=[stop_id]))
    for i in range(len(prompts)):
        row = full.tokens[i]
        cut = row.index(stop_id) if stop_id in row else len(row)
        assert stopped.tokens[i] == row[:cut]
        assert stopped.finish_reasons[i] == ("stop" if cut < len(row) else "length")
    assert stopped.nfe[0] < full.nfe[0]
    assert stopped.stats["forward_passes"] <= full.stats["forward_passes"]
    assert stopped.stats["generated_tokens"] == sum(len(t) for t in stopped.tokens)


def test_default_stop_ids_come_from_the_checkpoint(llada_tiny):
    assert llada_tiny.config.stop_token_ids == (318,)  # eos_token_id in config.json / generation_config.json


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
def test_cached_forward_is_exact_when_nothing_changed(request, family):
    """Right after a refresh, a prefix or dual forward over a block sees the same keys and values as a full one."""
    model = request.getfixturevalue(family)
    prompts = random_prompts(model, [4, 12], seed=4)
    T = 12 + 16
    x = torch.full((2, T), model.config.mask_token_id)
    valid = torch.zeros((2, T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, 12 - len(p) : 12] = torch.tensor(p)
        valid[b, 12 - len(p) :] = True
    x[:, 12:16] = torch.tensor([5, 6, 7, 8])  # some committed generated tokens
    pos, km = positions_from_mask(valid), key_mask_from(valid)
    s, e, shift = 16, 24, model.config.logit_shift
    starts, block = torch.full((2,), s), torch.arange(e - s).expand(2, -1)  # the block [s, e) of each row

    def logits(q0, q1):  # one forward of the queries [q0, q1) through the cache, then the block's logits
        return model.output(model.hidden(x[:, q0:q1], pos[:, q0:q1], km, cache, q0), q0, starts, block)

    with torch.no_grad():
        cache = KVCache.allocate(model.config, 2, T, "cpu", torch.float32)
        full = logits(0, T)
        dual = logits(s - shift, e)
        prefix = logits(s - shift, T)
        plain = model(x, attention_mask=valid)[:, s:e]
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(dual, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(prefix, full, atol=1e-5, rtol=0)


def test_dream_decodes_with_shifted_logits(dream_tiny):
    """Dream's candidate at position i is read from the raw output at i - 1: check one none-mode step by hand."""
    prompt = random_prompts(dream_tiny, [6], seed=5)[0]
    cfg = DecodeConfig(gen_length=4, block_length=4, steps=4, cache="none", rule="quota", stop_at_eos=False)
    out = generate(dream_tiny, [prompt], cfg)
    x = torch.tensor([prompt + [dream_tiny.config.mask_token_id] * 4])
    with torch.no_grad():
        h = dream_tiny.norm(dream_tiny.hidden(x, torch.arange(10)[None]))
        raw = dream_tiny.lm_head(h)[0]
    probs = raw.double().softmax(-1)
    conf, tok = probs[5:9].max(-1)  # raw outputs 5..8 predict positions 6..9
    first = int(conf.argmax())
    assert out.tokens[0][first] == int(tok[first])


def test_invalid_settings_say_what_to_change():
    cases = {
        "block_length (5) must divide gen_length (32)": dict(gen_length=32, block_length=5),
        "steps (30) must be a multiple of the number of blocks": dict(steps=30, rule="quota"),
        "cache 'lru' is not one of": dict(cache="lru"),
        "rule 'greedy' is not one of": dict(rule="greedy"),
        "threshold must be in (0, 1]": dict(threshold=1.5),
        "temperature must be >= 0": dict(temperature=-1.0),
        "remasking 'top' is not one of": dict(remasking="top"),
        "stop_token_ids must be a list": dict(stop_token_ids=5),
    }
    for msg, kw in cases.items():
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            DecodeConfig(**{"gen_length": 32, "block_length": 8, "steps": 32, **kw})
    with pytest.raises(ValueError, match="unknown decode setting"):
        DecodeConfig.from_dict({"gen_len": 3})
    DecodeConfig(gen_length=32, block_length=8, steps=30, rule="threshold")  # steps only matter for quota


def test_bad_prompts_are_refused(llada_tiny):
    cfg = _cfg()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(llada_tiny, [[1, 2], []], cfg)
    with pytest.raises(ValueError, match="exceeds the model's 4096 positions"):
        generate(llada_tiny, [[1] * 4080], cfg)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(llada_tiny, [[1, 10_000]], cfg)
