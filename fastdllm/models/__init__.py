"""Model families, checkpoint loading and saving.

`load_model(source)` reads a Hugging Face checkpoint directory (config.json + safetensors, single or sharded),
builds the family's module on the meta device and assigns the tensors straight from the memory-mapped files, so
an 8B checkpoint never has a second copy in host memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import dream, llada, llada2
from .common import DiffusionLM, KVCache, ModelConfig

FAMILIES = {llada.MODEL_TYPE: llada, dream.MODEL_TYPE: dream, llada2.MODEL_TYPE: llada2}
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "tiny"
BUILTIN = {"tiny": BUILTIN_DIR}
# Special tokens that end a turn in the released tokenizers (LLaDA-8B-Instruct: <|eot_id|>, <|endoftext|>;
# Dream/Qwen: <|im_end|>, <|endoftext|>); added to the stop ids when the checkpoint's tokenizer defines them.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|endoftext|>", "<|im_end|>", "<|eos|>")

__all__ = ["DiffusionLM", "KVCache", "ModelConfig", "load_model", "save_checkpoint", "resolve_source", "from_config"]


def resolve_source(source: str | os.PathLike, revision: str | None = None, require_config: bool = True) -> Path:
    """A checkpoint directory for a built-in name, a local directory, or a Hugging Face repo id in the local cache."""
    s = str(source)
    if s in BUILTIN:
        return BUILTIN[s]
    p = Path(s).expanduser()
    if p.is_dir():
        if require_config and not (p / "config.json").is_file():
            raise ValueError(f"model directory {p} has no config.json; point model.source at a Hugging Face checkpoint")
        return p
    if "/" in s and not s.startswith((".", "/")) and s.count("/") == 1:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        try:
            return Path(snapshot_download(s, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
                raise ValueError(f"model source {s!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
            try:
                return Path(snapshot_download(s, revision=revision, allow_patterns=patterns))
            except Exception as e:
                raise ValueError(
                    f"model source {s!r} is not a built-in name ({', '.join(BUILTIN)}), a local directory, or a "
                    f"Hugging Face repo id that could be found ({type(e).__name__})"
                ) from None
    raise ValueError(
        f"model source {s!r} is not a built-in name ({', '.join(BUILTIN)}), an existing directory, "
        "or a Hugging Face repo id (owner/name)"
    )


def read_config(path: Path) -> ModelConfig:
    d = json.loads((path / "config.json").read_text())
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"{path}/config.json has model_type {mt!r}; supported: {', '.join(FAMILIES)}")
    cfg = FAMILIES[mt].from_hf_config(d)
    return cfg.replace(stop_token_ids=_stop_ids(path, d))


def _stop_ids(path: Path, config: dict) -> tuple[int, ...]:
    ids: list[int] = []

    def add(v):
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)

    gen = path / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(config.get("eos_token_id"))
    tok = path / "tokenizer.json"
    if tok.is_file():
        for t in json.loads(tok.read_text()).get("added_tokens", []):
            if t.get("content") in END_OF_TURN_TOKENS:
                add(t["id"])
    return tuple(ids)


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
    return names[dtype]


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights (pytorch .bin checkpoints are not supported)")
    return files


def _ours(family, name: str) -> str | None:
    if hasattr(family, "ours"):  # a family with its own name map (llada2: experts)
        return family.ours(name)
    if name in family.TOP_NAMES:
        return family.TOP_NAMES[name]
    if name.startswith(family.BLOCK_PREFIX):
        idx, rest = name[len(family.BLOCK_PREFIX) :].split(".", 1)
        if rest in family.BLOCK_NAMES:
            return f"layers.{idx}.{family.BLOCK_NAMES[rest]}"
    return None


def _theirs(family, name: str) -> str:
    for k, v in family.TOP_NAMES.items():
        if v == name:
            return k
    _, idx, rest = name.split(".", 2)
    inv = {v: k for k, v in family.BLOCK_NAMES.items()}
    return f"{family.BLOCK_PREFIX}{idx}.{inv[rest]}"


def from_config(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0, std: float = 0.02) -> DiffusionLM:
    """A randomly initialised model (tiny checkpoints, benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    return _build(cfg).init_weights(std, g).to(device=device, dtype=dtype).eval()


def _build(cfg: ModelConfig) -> DiffusionLM:
    family = FAMILIES.get(cfg.hf_config.get("model_type", cfg.family), FAMILIES.get(cfg.family))
    return family.build(cfg) if family is not None and hasattr(family, "build") else DiffusionLM(cfg)


def load_model(source, device="cpu", dtype=None, revision: str | None = None) -> DiffusionLM:
    """Load a LLaDA or Dream checkpoint (the family comes from config.json's model_type)."""
    from safetensors import safe_open

    path = resolve_source(source, revision)
    cfg = read_config(path)
    device = torch.device(device)
    dt = _dtype(dtype, device)
    family = FAMILIES[cfg.hf_config["model_type"]]
    with torch.device("meta"):
        model = _build(cfg)
    state: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                ours = _ours(family, name)
                if ours is None:
                    if "rotary" in name or name.endswith("inv_freq"):
                        continue
                    raise ValueError(f"{f}: unexpected tensor {name!r} for a {family.MODEL_TYPE} checkpoint")
                state[ours] = sf.get_tensor(name).to(device=device, dtype=dt)
    if hasattr(family, "stack"):
        state = family.stack(state, cfg)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for: {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.source = str(source)
    return model.eval().requires_grad_(False)


def save_checkpoint(model: DiffusionLM, directory, max_shard_bytes: int | None = None) -> Path:
    """Write config.json, generation_config.json and safetensors (sharded with an index past max_shard_bytes)
    in the family's own on-disk format, readable by `load_model` and by the family's reference code."""
    from safetensors.torch import save_file

    cfg = model.config
    family = FAMILIES[cfg.family if cfg.family in FAMILIES else dream.MODEL_TYPE]
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hf = family.to_hf_config(cfg)
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {"eos_token_id": list(cfg.stop_token_ids) if len(cfg.stop_token_ids) > 1 else hf.get("eos_token_id"),
           "pad_token_id": cfg.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tensors = {}
    own = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    named = family.export(own, cfg) if hasattr(family, "export") else {_theirs(family, k): v for k, v in own.items()}
    for name, t in named.items():
        tensors[name] = t.detach().contiguous().cpu()
    if not max_shard_bytes:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return out
