"""The request-level engine: requests with their own settings, joining at any time, each decoded exactly as it is
alone; stop strings, max_tokens, growing buffers; a cached step moves no row's cached keys/values."""

import dataclasses
import itertools

import pytest
import torch

import fastdllm
from fastdllm import DecodeConfig, Engine, Request, generate
from fastdllm.movement import count_movement
from fastdllm.policies import CACHE_POLICIES

from .conftest import random_prompts

BASE = dict(gen_length=16, block_length=8, steps=16, threshold=0.5, factor=2.0, frechet_margin=0.1)

# (gen_length, temperature, threshold, stop ids: None = the engine's, seed) per request
SETTINGS = [(16, 0.0, None, None, None), (24, 0.0, 0.3, None, None), (8, 0.9, None, None, 4),
            (16, 0.0, 0.8, (5, 9), None), (24, 0.6, None, None, None), (8, 0.0, None, (), 11)]


def _stops(model):
    return tuple(range(7, model.config.vocab_size, 40))  # every 40th token stops a row: rows end in many blocks


def _alone(model, cfg: DecodeConfig, prompt, *, gen_length, temperature, threshold, stop, seed, row_id):
    """What generate() gives the request alone, with its settings as the call's config."""
    kw = dict(gen_length=gen_length, steps=gen_length // cfg.block_length * cfg.block_steps,
              temperature=temperature, seed=cfg.seed if seed is None else seed)
    if threshold is not None:
        kw["threshold"] = threshold
    if stop is not None:
        kw["stop_token_ids"] = stop
    out = generate(model, [prompt], dataclasses.replace(cfg, **kw), row_ids=[row_id])
    return out.tokens[0], out.nfe[0], out.finish_reasons[0]


def _run(engine: Engine, schedule: dict[int, list[Request]]) -> dict[int, fastdllm.Finished]:
    """Step the engine, adding schedule[k] before step k; returns the finished requests by id."""
    done, ids, k = {}, [], 0
    while engine.pending or any(s >= k for s in schedule):
        for r in schedule.get(k, []):
            ids.append(engine.add(r))
        for f in engine.step():
            assert f.id not in done
            done[f.id] = f
        k += 1
    assert sorted(done) == sorted(ids)
    return done


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
@pytest.mark.parametrize("cache,rule", [(c, r) for c, r in itertools.product(CACHE_POLICIES, fastdllm.rules.RULES)
                                        if c != "dllm"])
def test_mixed_requests_joining_late_each_get_their_alone_result(request, family, cache, rule):
    model = request.getfixturevalue(family)
    cfg = DecodeConfig(**BASE, cache=cache, rule=rule, stop_token_ids=_stops(model), seed=2)
    prompts = random_prompts(model, [3, 11, 6, 17, 1, 8], seed=31)
    reqs = [Request(p, gen_length=g, temperature=t, threshold=th, stop_token_ids=st, seed=sd, row_id=100 + i)
            for i, (p, (g, t, th, st, sd)) in enumerate(zip(prompts, SETTINGS))]
    # two join at once, one while they decode, three more later (into the slots of finished rows and free ones)
    done = _run(Engine(model, cfg, max_batch_size=3), {0: reqs[:2], 2: reqs[2:3], 5: reqs[3:]})
    for i, (p, (g, t, th, st, sd)) in enumerate(zip(prompts, SETTINGS)):
        f = done[i]
        want = _alone(model, cfg, p, gen_length=g, temperature=t, threshold=th, stop=st, seed=sd, row_id=100 + i)
        assert (f.tokens, f.nfe, f.finish_reason) == want, f"request {i}"


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
def test_dllm_requests_joining_late_get_their_alone_result(request, family):
    model = request.getfixturevalue(family)
    cfg = DecodeConfig(**BASE, cache="dllm", stop_token_ids=_stops(model))
    prompts = random_prompts(model, [5, 12, 2, 9], seed=32)
    reqs = [Request(p, temperature=t, row_id=i) for i, (p, t) in enumerate(zip(prompts, (0.0, 0.7, 0.0, 0.4)))]
    done = _run(Engine(model, cfg, max_batch_size=2), {0: reqs[:1], 1: reqs[1:3], 4: reqs[3:]})
    for i, (p, t) in enumerate(zip(prompts, (0.0, 0.7, 0.0, 0.4))):
        want = _alone(model, cfg, p, gen_length=16, temperature=t, threshold=None, stop=None, seed=None, row_id=i)
        assert (done[i].tokens, done[i].nfe, done[i].finish_reason) == want
    with pytest.raises(ValueError, match="cache 'dllm' decodes every request with the engine's gen_length"):
        Engine(model, cfg, max_batch_size=2).add(Request(prompts[0], gen_length=8))


def test_a_longer_request_joining_later_grows_the_buffers(llada_tiny):
    cfg = DecodeConfig(**BASE, cache="dual", stop_at_eos=False)
    short, long_ = random_prompts(llada_tiny, [4, 90], seed=33)
    engine = Engine(llada_tiny, cfg, max_batch_size=4)
    done = _run(engine, {0: [Request(short)], 1: [Request(long_, gen_length=24)]})
    assert engine.rows.T >= 90 + 24
    assert (done[0].tokens, done[0].nfe) == _alone(llada_tiny, cfg, short, gen_length=16, temperature=0.0,
                                                   threshold=None, stop=None, seed=None, row_id=0)[:2]
    assert (done[1].tokens, done[1].nfe) == _alone(llada_tiny, cfg, long_, gen_length=24, temperature=0.0,
                                                   threshold=None, stop=None, seed=None, row_id=1)[:2]


def test_generate_is_a_loop_over_the_engine(llada_tiny):
    cfg = DecodeConfig(**BASE, cache="prefix", stop_token_ids=_stops(llada_tiny))
    prompts = random_prompts(llada_tiny, [3, 11, 6, 17], seed=34)
    out = generate(llada_tiny, prompts, cfg, max_batch_size=2)
    order = sorted(range(4), key=lambda i: len(prompts[i]))
    engine = Engine(llada_tiny, cfg, max_batch_size=2)
    engine.reserve(max(map(len, prompts)) + cfg.gen_length)
    done = _run(engine, {0: [Request(prompts[i], row_id=i) for i in order]})
    by_prompt = {order[k]: done[k] for k in range(4)}
    for i in range(4):
        assert (by_prompt[i].tokens, by_prompt[i].nfe, by_prompt[i].finish_reason) == (
            out.tokens[i], out.nfe[i], out.finish_reasons[i])
    assert out.stats["slot_utilisation"] == engine.stats["rows_in_flight"] / (engine.stats["steps"] * 2)


@pytest.fixture(scope="module")
def tiny():
    return fastdllm.load_model("tiny"), fastdllm.load_tokenizer("tiny")


def test_stop_strings_cut_the_text_and_end_decoding_early(tiny):
    model, tok = tiny
    cfg = DecodeConfig(gen_length=32, block_length=8, steps=32, cache="dual", rule="quota")
    prompt = tok.encode("sort:918273645=")
    engine = Engine(model, cfg, max_batch_size=2, tokenizer=tok)
    full = _run(engine, {0: [Request(prompt)]})[0]
    assert full.text == "123456789" and full.finish_reason == "stop"
    engine = Engine(model, cfg, max_batch_size=2, tokenizer=tok)
    cut = _run(engine, {0: [Request(prompt, stop=["45", "9"]), Request(prompt, stop="x")]})
    assert (cut[0].text, cut[0].finish_reason) == ("123", "stop")
    assert cut[0].tokens == full.tokens[:3] and cut[0].nfe < full.nfe  # stopped once "12345" was final
    assert (cut[1].text, cut[1].tokens, cut[1].nfe) == (full.text, full.tokens, full.nfe)  # never occurs
    with pytest.raises(ValueError, match="stop strings need the engine's tokenizer"):
        Engine(model, cfg, max_batch_size=1).add(Request(prompt, stop=["1"]))


def test_max_tokens_decodes_whole_blocks_and_cuts(tiny):
    model, tok = tiny
    cfg = DecodeConfig(gen_length=32, block_length=8, steps=32, cache="dual", rule="quota")
    prompt = tok.encode("sort:918273645=")
    engine = Engine(model, cfg, max_batch_size=2, tokenizer=tok)
    done = _run(engine, {0: [Request(prompt, max_tokens=5), Request(prompt, max_tokens=12)]})
    one_block = generate(model, [prompt], dataclasses.replace(cfg, gen_length=8, steps=8))  # gen_length 8 alone
    assert len(one_block.tokens[0]) == 8 and one_block.finish_reasons[0] == "length"
    assert (done[0].tokens, done[0].finish_reason, done[0].nfe) == (one_block.tokens[0][:5], "length", 8)
    assert done[0].text == tok.decode(one_block.tokens[0][:5])
    two_blocks = generate(model, [prompt], dataclasses.replace(cfg, gen_length=16, steps=16))
    assert two_blocks.finish_reasons[0] == "stop" and len(two_blocks.tokens[0]) <= 12  # the stop token came first
    assert (done[1].tokens, done[1].finish_reason) == (two_blocks.tokens[0], "stop")


def test_bad_requests_say_what_to_change(llada_tiny):
    engine = Engine(llada_tiny, DecodeConfig(**BASE), max_batch_size=2)
    cases = {"gen_length must be a positive multiple of block_length": dict(gen_length=12),
             "max_tokens \\(20\\) is more than gen_length": dict(max_tokens=20, gen_length=16),
             "temperature must be >= 0": dict(temperature=-1.0),
             "threshold must be in \\(0, 1\\]": dict(threshold=0.0),
             "stop_token_ids must be a list": dict(stop_token_ids=3),
             "seed must be a non-negative integer": dict(seed=-1)}
    for msg, kw in cases.items():
        with pytest.raises(ValueError, match=msg):
            engine.add(Request([1, 2], **kw))
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add(Request([]))
    with pytest.raises(ValueError, match="exceeds the model's"):
        engine.add(Request([1] * 4090))
    with pytest.raises(ValueError, match="encode the text first"):
        engine.add(Request("12+3="))
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        Engine(llada_tiny, DecodeConfig(**BASE), max_batch_size=0)
    assert engine.pending == 0 and engine.step() == []


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_a_cached_step_moves_no_rows_cached_keys_and_values(llada_tiny, cache):
    """Rows at different steps share steps here; in a step's forwards no copy, gather or index op reads the cache
    buffers (a gather of the cached rows would): cached steps attend to the cache where it lies, and only write
    their fresh keys/values into it. (Closing the slot of a finished row moves the last row's cache once, at
    admission; that is not a step's forward.)"""
    cfg = DecodeConfig(gen_length=32, block_length=8, steps=32, cache=cache, rule="threshold", threshold=0.5,
                       stop_token_ids=_stops(llada_tiny))
    prompts = random_prompts(llada_tiny, [3, 11, 6, 17, 1, 8, 5, 9], seed=35)
    engine = Engine(llada_tiny, cfg, max_batch_size=8)
    engine.reserve(17 + 32)
    for p in prompts:
        engine.add(Request(p))
    reads = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("index_select", "index", "gather", "clone", "cat", "stack", "copy_",
                                                "_to_copy", "contiguous"):
                buffers = {engine.policy.cache.k.untyped_storage().data_ptr(),
                           engine.policy.cache.v.untyped_storage().data_ptr()}
                sources = args[1:] if func.overloadpacket.__name__ == "copy_" else args
                for a in sources:
                    for t in a if isinstance(a, (list, tuple)) else [a]:
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in buffers:
                            reads.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    forward = engine.policy.forward

    def watched(*a, **kw):
        with Watch():
            return forward(*a, **kw)

    engine.policy.forward = watched
    mixed = 0
    while engine.pending:
        mixed += {r.step == 0 for r in engine.rows.live} == {True, False} if engine.rows else 0
        engine.step()
    assert mixed >= 3  # the test saw steps with refresh and cached rows together
    assert reads == []


def test_count_movement_counts_what_moving_ops_write():
    kb = torch.zeros(4, 3, 10, 5)
    rows, cols, val = torch.tensor([0, 2]), torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 2, 3, 5)
    with count_movement() as moved:
        kb[rows[:, None], :, cols] = val
        kb.index_select(0, rows)
        kb[:2, :, 0:2] = val.transpose(1, 2)
        kb.matmul(torch.ones(5, 5))  # compute, not counted
    assert dict(moved) == {"index_put_": val.numel() * 4, "index_select": 2 * 3 * 10 * 5 * 4, "copy_": 240}


@pytest.mark.slow  # compiling takes 20-100 s here (the machine is shared)
def test_compiled_engine_gives_the_eager_tokens(tmp_path):
    """compile=True (torch.compile of each layer's dense halves, dynamic shapes on CPU) decodes the same rows."""
    from fastdllm.models import from_config
    from fastdllm.tiny_kit import tiny_config

    model = from_config(tiny_config().replace(n_layers=1), seed=3, std=0.2)
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16, cache="dual", rule="threshold", threshold=0.3,
                       stop_at_eos=False)
    prompts = random_prompts(model, [3, 9, 5, 12, 7, 2], seed=36)
    eager = generate(model, prompts, cfg, max_batch_size=4)
    compiled = generate(model, prompts, cfg, max_batch_size=4, compile=True)
    assert (compiled.tokens, compiled.nfe) == (eager.tokens, eager.nfe)
    assert model._fastdllm_compiled  # compiled in place: the model's later forwards run the compiled halves


def test_two_shards_share_one_workers_engine_and_each_commits_its_own_rows(tmp_path):
    """The driver hands an actor its next shard before the current one ends: both calls share the worker's engine,
    the second shard's rows join while the first's last rows finish, and each commits exactly its own rows, equal
    to the rows decoded one shard at a time."""
    import json
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastdllm.workers.shard import Shard, ShardWorker, WorkerSettings

    prompts = [f"{i}+{i * 7 % 50}=" for i in range(10)] + [f"sort:{9182 + i * 37}=" for i in range(10)]
    pq.write_table(pa.table({"prompt": prompts, "id": list(range(20))}), tmp_path / "p.parquet")
    decode = DecodeConfig(gen_length=16, block_length=8, steps=16, cache="dual", rule="threshold", threshold=0.9)

    def shards(out):
        w = ShardWorker(WorkerSettings(model_source="tiny", decode=decode, output_uri=str(tmp_path / out),
                                       batch_size=4, id_column="id"))
        return w, [Shard(index=k, file=str(tmp_path / "p.parquet"), relpath="p.parquet", start=10 * k,
                         stop=10 * k + 10) for k in range(2)]

    w, (a, b) = shards("one-by-one")
    alone = [w.run_shard(a), w.run_shard(b)]
    w, (a, b) = shards("together")
    both_in_flight = []
    step = w.engine().engine.step

    def watched():
        out = step()
        both_in_flight.append(len({r.request.row_id >= 10 for r in w.engine().engine.rows.live}) == 2)
        return out

    w.engine().engine.step = watched
    records = [None, None]
    threads = [threading.Thread(target=lambda k=k, s=s: records.__setitem__(k, w.run_shard(s)))
               for k, s in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        one = pq.read_table(tmp_path / "one-by-one" / "shards" / f"{k:05d}.parquet").to_pylist()
        two = pq.read_table(tmp_path / "together" / "shards" / f"{k:05d}.parquet").to_pylist()
        assert [r["id"] for r in two] == list(range(10 * k, 10 * k + 10))
        assert [(r["completion_ids"], r["nfe"]) for r in two] == [(r["completion_ids"], r["nfe"]) for r in one]
        saved = json.loads((tmp_path / "together" / "stats" / f"{k:05d}.json").read_text())
        assert 0 < saved["slot_utilisation"] <= 1 and saved["row_forwards"] == saved["nfe"]
        assert records[k].stats.nfe == alone[k].stats.nfe
