"""Model families, checkpoint loading and saving.

`load_model(source)` reads a Hugging Face checkpoint directory (config.json + safetensors, single or sharded),
builds the family's module on the meta device and assigns the tensors straight from the memory-mapped files, so
an 8B checkpoint never has a second copy in host memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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

# The dtype names a model may be loaded in (model.dtype in a job manifest, --dtype in the CLI): "auto" (bf16 on
# CUDA, fp32 elsewhere) or one of these.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # what a hub checkpoint download fetches

__all__ = ["DiffusionLM", "KVCache", "ModelConfig", "CheckpointInfo", "DTYPE_NAMES", "inspect", "load_model",
           "save_checkpoint", "from_config"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a model source is, as far as it can be known without loading weights (see `inspect`)."""

    source: str  # as given
    kind: str  # builtin | local | hub
    path: Path  # the checkpoint directory (hub: the cached snapshot, or where config.json alone was fetched)
    config: ModelConfig | None  # from config.json (None: the directory has none, e.g. a tokenizer-only one)
    tokenizer: bool | None  # tokenizer files present (None: not known, a hub id whose files were not fetched)
    chat_template: bool | None  # the tokenizer carries a chat template (None: not known)
    stored_dtype: str | None = None  # config.json's torch_dtype, the dtype the weights are stored in

    @property
    def family(self) -> str | None:
        return self.config.family if self.config else None

    def require_config(self) -> ModelConfig:
        if self.config is None:
            raise ValueError(f"model directory {self.path} has no config.json; point model.source at a Hugging "
                             "Face checkpoint")
        return self.config

    def require_tokenizer(self) -> Path:
        if self.tokenizer is False:
            raise ValueError(f"model directory {self.path} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})")
        return self.path


def source_kind(source: str | os.PathLike) -> str | None:
    """builtin, local (an existing directory, `~` expanded), hub (owner/name) or None (none of them): the one rule
    every reader of a model source follows."""
    s = str(source)
    if s in BUILTIN:
        return "builtin"
    if Path(s).expanduser().is_dir():
        return "local"
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/")):
        return "hub"
    return None


def local_path(source: str | os.PathLike) -> str | None:
    """The absolute path of a local directory source (None for a built-in name or a repo id): what a job sends
    to workers, whose working directory may differ from the driver's."""
    if source_kind(source) != "local":
        return None
    return os.path.abspath(os.path.expanduser(str(source)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read as huggingface_hub reads it (1 / ON / YES / TRUE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _has_weights(path: Path) -> bool:
    return (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))


def _hub_dir(repo: str, revision: str | None, config_only: bool) -> tuple[Path, bool]:
    """(directory, complete) for a repo id: the local cache first; then, unless HF_HUB_OFFLINE is set, the hub
    (config.json alone with config_only, else the checkpoint's files). complete: the weights are there."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
        if config_only or _has_weights(path):  # a snapshot may hold only the config.json planning fetched
            return path, _has_weights(path)
    except Exception:
        pass
    if hub_offline():
        raise ValueError(f"model source {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        if config_only:
            return Path(hf_hub_download(repo, "config.json", revision=revision)).parent, False
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS)), True
    except Exception as e:
        raise ValueError(f"model source {repo!r} is not a built-in name ({', '.join(BUILTIN)}), a local directory, "
                         f"or a Hugging Face repo id that could be found ({type(e).__name__})") from None


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer files in `path` carry a chat template (in tokenizer_config.json, or the
    chat_template.jinja / chat_template.json files newer transformers write)."""
    if any((path / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
        return True
    cfg = path / "tokenizer_config.json"
    try:
        return bool(json.loads(cfg.read_text()).get("chat_template")) if cfg.is_file() else False
    except (OSError, ValueError):
        return False


def inspect(source: str | os.PathLike, revision: str | None = None, *, config_only: bool = False) -> CheckpointInfo:
    """Find a checkpoint (a built-in name, a local directory, or a Hugging Face repo id: the local cache first) and
    read what it is from its files, without its weights. config_only: for a repo id not in the cache, fetch
    config.json alone (planning), not the whole checkpoint. ValueError, saying what to change, when it cannot be
    found or its config.json names an unsupported family."""
    s = str(source)
    kind = source_kind(s)
    if kind is None:
        raise ValueError(f"model source {s!r} is not a built-in name ({', '.join(BUILTIN)}), an existing directory, "
                         "or a Hugging Face repo id (owner/name)")
    if kind == "builtin":
        path, known = BUILTIN[s], True
    elif kind == "local":
        path, known = Path(s).expanduser(), True
    else:
        path, known = _hub_dir(s, revision, config_only)
    has_config = (path / "config.json").is_file()
    cfg = read_config(path) if has_config else None
    stored = json.loads((path / "config.json").read_text()).get("torch_dtype") if has_config else None
    tok = any((path / f).is_file() for f in TOKENIZER_FILES) if known else None
    return CheckpointInfo(source=s, kind=kind, path=path, config=cfg, tokenizer=tok,
                          chat_template=has_chat_template(path) if known else None, stored_dtype=stored)


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


CPU_BF16_ENV = "FASTDLLM_CPU_BF16"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 dot products (oneDNN uses them)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively: a flag of BF16_CPU_FLAGS in /proc/cpuinfo (Linux; elsewhere no).
    A flag check, not a timing probe: it is free, gives the same answer on every run and every worker of a kind
    (a job's shards never mix dtypes by the luck of a noisy probe), and the flags are what oneDNN keys on; without
    them torch emulates bf16 matmuls, slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()


_CPU_BF16: bool | None = None


def cpu_prefers_bf16() -> bool:
    """`dtype: auto` on CPU: bf16 when FASTDLLM_CPU_BF16=1, fp32 when 0, else bf16 where `cpu_has_bf16` (cached)."""
    global _CPU_BF16
    v = os.environ.get(CPU_BF16_ENV, "")
    if v in ("0", "1"):
        return v == "1"
    if v:
        raise ValueError(f"{CPU_BF16_ENV}={v!r}: set it to 1 (bf16), 0 (fp32) or leave it unset (detect)")
    if _CPU_BF16 is None:
        _CPU_BF16 = cpu_has_bf16()
    return _CPU_BF16


def torch_dtype(dtype, device) -> torch.dtype:
    """The torch dtype for a name in DTYPE_NAMES (or a torch.dtype) on `device`; None / auto: bf16 on CUDA, on CPU
    bf16 where `cpu_prefers_bf16`, else fp32."""
    if dtype is None or dtype == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if kind == "cpu" and cpu_prefers_bf16() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[dtype]


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

    info = inspect(source, revision)
    path, cfg = info.path, info.require_config()
    device = torch.device(device)
    dt = torch_dtype(dtype, device)
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
