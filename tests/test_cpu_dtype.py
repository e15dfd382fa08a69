"""dtype "auto" on CPU: bf16 where the CPU multiplies bf16 natively (or FASTDLLM_CPU_BF16=1), fp32 elsewhere."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import fastdllm
from fastdllm import models
from fastdllm.models import torch_dtype as _dtype, cpu_has_bf16

CPU = torch.device("cpu")
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_the_flag_check_reads_cpuinfo_flags():
    assert cpu_has_bf16(SAPPHIRE) == torch.backends.mkldnn.is_available()
    assert not cpu_has_bf16(ZEN3)
    assert not cpu_has_bf16("model name\t: avx512_bf16 in a name is not a flag\n")


def test_the_switch_decides_auto_and_an_explicit_dtype_wins(monkeypatch):
    monkeypatch.setenv("FASTDLLM_CPU_BF16", "1")
    assert _dtype("auto", CPU) == torch.bfloat16 and _dtype(None, CPU) == torch.bfloat16
    assert _dtype("float32", CPU) == torch.float32
    monkeypatch.setenv("FASTDLLM_CPU_BF16", "0")
    assert _dtype("auto", CPU) == torch.float32 and _dtype("bfloat16", CPU) == torch.bfloat16
    monkeypatch.setenv("FASTDLLM_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="FASTDLLM_CPU_BF16='yes': set it to 1"):
        _dtype("auto", CPU)


def test_unset_switch_follows_this_cpu(monkeypatch):
    monkeypatch.delenv("FASTDLLM_CPU_BF16", raising=False)
    monkeypatch.setattr(models, "_CPU_BF16", None)
    want = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert _dtype("auto", CPU) == want


def test_a_bf16_shard_decodes_and_its_marker_records_the_dtype(monkeypatch, tmp_path):
    from fastdllm.workers.shard import Shard, ShardWorker, WorkerSettings

    monkeypatch.setenv("FASTDLLM_CPU_BF16", "1")
    prompts = ["12+34=", "sort:9182="]
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), tmp_path / "p.parquet")
    decode = fastdllm.DecodeConfig(gen_length=8, block_length=8, steps=8, cache="dual", rule="threshold",
                                   threshold=0.9)
    w = ShardWorker(WorkerSettings(model_source="tiny", decode=decode, output_uri=str(tmp_path / "out"),
                                   batch_size=2))
    assert w.model.dtype == torch.bfloat16
    w.run_shard(Shard(index=0, file=str(tmp_path / "p.parquet"), relpath="p.parquet", start=0, stop=2))
    saved = json.loads((tmp_path / "out" / "stats" / "00000.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["generated_tokens"] > 0
    rows = pq.read_table(next((tmp_path / "out" / "shards").glob("*.parquet"))).to_pylist()
    assert [r["prompt"] for r in rows] == prompts and all(r["completion"] for r in rows)
