"""Continuous batching: rows join mid-flight and leave at once, and every row still gets its batch-of-one result."""

import itertools

import pytest
import torch

from fastdllm import DecodeConfig, generate
from fastdllm.decoding import _propose
from fastdllm.policies import CACHE_POLICIES
from fastdllm.rules import RULES

from .conftest import random_prompts

LENGTHS = [3, 11, 6, 17, 1, 8, 5]


def _cfg(model, **kw):
    # Every 40th token stops a row: rows stop in different blocks, so slots free up while others are mid-block.
    base = dict(gen_length=24, block_length=8, steps=12, threshold=0.5, factor=2.0, frechet_margin=0.1,
                stop_token_ids=tuple(range(7, model.config.vocab_size, 40)))
    base.update(kw)
    return DecodeConfig(**base)


def _assert_rows_equal_alone(model, prompts, cfg, sizes, row_ids=None):
    ids = row_ids or list(range(len(prompts)))
    alone = [generate(model, [p], cfg, row_ids=[r]) for p, r in zip(prompts, ids)]
    for size in sizes:
        out = generate(model, prompts, cfg, row_ids=row_ids, max_batch_size=size)
        for i, a in enumerate(alone):
            got = (out.tokens[i], out.nfe[i], out.finish_reasons[i])
            assert got == (a.tokens[0], a.nfe[0], a.finish_reasons[0]), f"row {i}, max_batch_size {size}"
        assert out.stats["row_forwards"] == sum(out.nfe)  # only rows that take part go through the model
        assert out.stats["occupancy"] == 1.0
        assert out.stats["max_batch_size"] == min(size, len(prompts))
    return alone


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
@pytest.mark.parametrize("cache,rule", list(itertools.product(CACHE_POLICIES, RULES)))
def test_rows_joining_mid_flight_get_their_batch_of_one_result(request, family, cache, rule):
    model = request.getfixturevalue(family)
    prompts = random_prompts(model, LENGTHS, seed=21)
    cfg = _cfg(model, cache=cache, rule=rule)
    _assert_rows_equal_alone(model, prompts, cfg, sizes=(1, 3, 10))


@pytest.mark.parametrize("family", ["llada_tiny", "dream_tiny"])
@pytest.mark.parametrize("cache", ["dual", "dllm"])
def test_sampled_rows_keep_their_noise_when_they_join_late(request, family, cache):
    model = request.getfixturevalue(family)
    prompts = random_prompts(model, LENGTHS, seed=22)
    cfg = _cfg(model, cache=cache, rule="threshold", temperature=0.8, remasking="random", seed=3)
    _assert_rows_equal_alone(model, prompts, cfg, sizes=(2, 5), row_ids=[40, 2, 17, 900, 5, 61, 33])


def test_a_step_runs_refresh_rows_and_cached_rows_in_their_own_forwards(llada_tiny):
    prompts = random_prompts(llada_tiny, LENGTHS, seed=21)
    out = generate(llada_tiny, prompts, _cfg(llada_tiny, cache="dual", rule="threshold"), max_batch_size=4)
    assert set(out.finish_reasons) == {"stop", "length"}  # the stop ids end some rows early and not others
    # rows are at different steps: some steps need two forwards, and more forwards than one row's NFE happen
    assert out.stats["forward_passes"] > max(out.nfe)
    assert out.stats["row_forwards"] == sum(out.nfe)


def test_max_batch_size_is_checked(llada_tiny):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
            generate(llada_tiny, [[1, 2]], _cfg(llada_tiny), max_batch_size=bad)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.9), dict(remasking="random"),
                                dict(temperature=0.5, remasking="random")])
def test_proposal_in_row_chunks_equals_one_piece(kw):
    """The float64 proposal step is chunked over rows; the chunking must not change a single proposal."""
    B, M, bl, V = 6, 3, 4, 50
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((B, M, V), generator=g) * 3
    sel = torch.stack([torch.randperm(bl, generator=g)[:M] for _ in range(B)])
    cfg = DecodeConfig(gen_length=8, block_length=bl, steps=8, **kw)

    def run(chunk):
        gens = [torch.Generator().manual_seed(100 + b) for b in range(B)]
        return _propose(logits.clone(), cfg, gens, 7, bl, sel, chunk_elements=chunk)

    whole, rowwise, pairs = run(1 << 30), run(1), run(2 * bl * (V + 1))
    for other in (rowwise, pairs):
        assert torch.equal(whole[0], other[0]) and torch.equal(whole[1], other[1])
    assert not (whole[0] == 7).any()  # the mask id is never proposed


def test_a_shard_records_row_forwards_and_occupancy(tmp_path):
    """The worker decodes a whole shard in one call; its stats file carries the summable row_forwards and the
    occupancy, and `fastdllm status --shards` shows the occupancy."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastdllm.jobs.status import throughput_table
    from fastdllm.workers import ShardStats
    from fastdllm.workers.shard import Shard, ShardWorker, WorkerSettings

    prompts = [f"{i}+{i * 3}=" for i in range(6)] + ["sort:9182=", "sort:5531200="]
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), tmp_path / "p.parquet")
    decode = DecodeConfig(gen_length=16, block_length=8, steps=16, cache="dual", rule="threshold",
                          threshold=0.9)
    w = ShardWorker(WorkerSettings(model_source="tiny", decode=decode, output_uri=str(tmp_path / "out"),
                                   batch_size=3))
    record = w.run_shard(Shard(index=0, file=str(tmp_path / "p.parquet"), relpath="p.parquet", start=0, stop=8))
    saved = json.loads((tmp_path / "out" / "stats" / "00000.json").read_text())
    assert saved["row_forwards"] == saved["nfe"] > 0 and saved["occupancy"] == 1.0
    total = record.stats + ShardStats(nfe=10, row_forwards=20)
    assert total.row_forwards == saved["row_forwards"] + 20
    assert total.occupancy == (saved["nfe"] + 10) / (saved["row_forwards"] + 20)
    table = throughput_table({0: record}).splitlines()
    assert "occup" in table[0] and " 1.00 " in table[1]
