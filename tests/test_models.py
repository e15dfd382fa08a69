"""Checkpoint loading: single vs sharded, save/load round trips, tied weights, clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import fastdllm
from fastdllm.models import from_config, save_checkpoint
from fastdllm.tiny_kit import tiny_config

from .conftest import REFERENCE, random_prompts


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_checkpoint_loads_like_single_file(tmp_path, family):
    src = REFERENCE / family / f"{family}-tiny"
    single = fastdllm.load_model(src)
    save_checkpoint(single, tmp_path / "sharded", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    sharded = fastdllm.load_model(tmp_path / "sharded")
    _same_weights(single, sharded)
    x = torch.tensor(random_prompts(single, [20], seed=0))
    torch.testing.assert_close(single(x), sharded(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_saved_checkpoint_keeps_the_release_tensor_names(tmp_path, family):
    from safetensors import safe_open

    src = REFERENCE / family / f"{family}-tiny"
    save_checkpoint(fastdllm.load_model(src), tmp_path)
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == json.loads(
        (src / "config.json").read_text())["model_type"]


def test_weight_tying_round_trip(tmp_path):
    cfg = tiny_config(vocab_size=50, mask_token_id=2, pad_token_id=0, stop_token_ids=(1,), d_model=32, n_layers=1,
                      n_heads=2, n_kv_heads=1, mlp_hidden=64, tie_embeddings=True)
    model = from_config(cfg, seed=3)
    assert model.lm_head.weight is model.embed.weight
    save_checkpoint(model, tmp_path)
    loaded = fastdllm.load_model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    x = torch.tensor([[5, 6, 7, 2, 2]])
    torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)
    assert loaded.config.n_kv_heads == 1  # grouped-query attention survives the round trip


def test_dtype_and_builtin_model():
    model = fastdllm.load_model("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not any(p.requires_grad for p in model.parameters())
    assert fastdllm.load_model("tiny").dtype == torch.float32  # CPU default
    tok = fastdllm.load_tokenizer("tiny")
    ids = tok.encode("12+34=")
    assert tok.decode(ids) == "12+34=" and tok.encode("sort:1=", chat_template=True) == tok.encode("sort:1=")
    assert model.config.stop_token_ids == (tok.hf.eos_token_id,)


def test_errors_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="is not a built-in name"):
        fastdllm.load_model("no-such-model")
    with pytest.raises(ValueError, match="has no config.json"):
        fastdllm.load_model(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(REFERENCE / "llada" / "llada-tiny", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'; supported: llada, Dream"):
        fastdllm.load_model(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(ValueError, match="lacks tensors for: layers.2"):
        fastdllm.load_model(bad)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        fastdllm.load_model("tiny", dtype="fp8")


def offline_snapshot(cache: Path, monkeypatch, name: str) -> Path:
    """An empty snapshot directory of repo acme/NAME (its refs/main pointing at it) in a Hugging Face cache at
    `cache`, with HF_HUB_OFFLINE on: what a hub id resolves to without the network."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    repo, rev = cache / f"models--acme--{name}", "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


def test_hub_repo_id_resolves_through_the_local_cache(tmp_path, monkeypatch):
    """A repo id is read from the Hugging Face cache layout (no network): models--owner--name/snapshots/REV/."""
    shutil.copytree(REFERENCE / "llada" / "llada-tiny", offline_snapshot(tmp_path, monkeypatch, "llada-tiny"),
                    dirs_exist_ok=True)
    model = fastdllm.load_model("acme/llada-tiny")
    _same_weights(model, fastdllm.load_model(REFERENCE / "llada" / "llada-tiny"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        fastdllm.load_model("acme/other")


def test_inspect_reads_a_checkpoint_without_its_weights(tmp_path, monkeypatch):
    from fastdllm.models import DTYPE_NAMES, inspect

    info = inspect("tiny")
    assert (info.kind, info.family, info.tokenizer, info.chat_template) == ("builtin", "llada", True, True)
    assert info.stored_dtype == "float32" and info.config.max_seq_len == 512
    ref = inspect(REFERENCE / "dream" / "dream-tiny")  # a checkpoint without tokenizer files
    assert (ref.kind, ref.family, ref.tokenizer, ref.chat_template) == ("local", "dream", False, False)
    with pytest.raises(ValueError, match="has no tokenizer files"):
        fastdllm.load_tokenizer(REFERENCE / "dream" / "dream-tiny")
    assert DTYPE_NAMES[0] == "auto" and {"float32", "bfloat16", "float16"} <= set(DTYPE_NAMES)
    # a home-relative directory is a local checkpoint for every reader; a missing one is no hub repo id
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(fastdllm.models.BUILTIN_DIR, tmp_path / "ckpt")
    assert inspect("~/ckpt").kind == "local" and inspect("~/ckpt").path == tmp_path / "ckpt"
    assert fastdllm.load_model("~/ckpt").config.n_layers == info.config.n_layers
    with pytest.raises(ValueError, match="is not a built-in name .* an existing directory"):
        inspect("~/missing")


def test_a_tokenizer_only_directory_has_no_config(tmp_path):
    from fastdllm.models import inspect
    from fastdllm.tiny_kit import save_char_tokenizer

    save_char_tokenizer(tmp_path)
    info = inspect(tmp_path)
    assert info.config is None and info.tokenizer is True and fastdllm.load_tokenizer(tmp_path).encode("1")
    with pytest.raises(ValueError, match="has no config.json"):
        info.require_config()


def test_a_cached_config_alone_serves_planning_not_loading(tmp_path, monkeypatch):
    """Planning fetches a repo's config.json alone; loading then needs the weights, not that partial snapshot."""
    from fastdllm.models import inspect

    shutil.copy(REFERENCE / "llada" / "llada-tiny" / "config.json", offline_snapshot(tmp_path, monkeypatch, "part"))
    info = inspect("acme/part", config_only=True)
    assert info.kind == "hub" and info.family == "llada" and info.tokenizer is None and info.chat_template is None
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        fastdllm.load_model("acme/part")
