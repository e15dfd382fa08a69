"""Block-wise, cached, confidence-parallel diffusion decoding over real batches.

One `generate()` serves every cache mode. A batch of mixed-length prompts is left-padded to its longest prompt;
pad keys are masked out and RoPE positions count from each row's first real token, so a row decodes exactly as it
would alone. Blocks are decoded in lock-step across the batch: within a block each row commits on its own
schedule and stops taking part (and counting NFE) once its block is full; rows that hit a stop token leave the
batch at the next block boundary, where the full refresh forward makes compaction free.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from .dllm_cache import FeatureCache
from .models.common import DiffusionLM, KVCache, key_mask_from, positions_from_mask
from .rules import RULES, quota_schedule, select

CACHE_MODES = ("none", "prefix", "dual", "dllm")
REMASKING = ("low_confidence", "random")


@dataclass(kw_only=True)
class DecodeConfig:
    """Decoding settings (see DESIGN.md, "Decoding semantics"). Invalid values raise ValueError."""

    gen_length: int = 256
    block_length: int = 32
    steps: int = 256  # total steps for the quota rule; steps / num_blocks per block
    cache: str = "dual"  # none | prefix | dual | dllm
    rule: str = "threshold"  # quota | threshold | factor | frechet
    threshold: float = 0.9
    factor: float = 1.0
    frechet_margin: float = 0.25
    temperature: float = 0.0
    remasking: str = "low_confidence"  # or "random"
    stop_at_eos: bool = True
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's stop ids
    seed: int = 0
    # dLLM-Cache (cache="dllm"): refresh intervals in steps for the prompt (K_p) and the response (K_r), and the
    # share of response positions recomputed per layer on the other steps (rho). Defaults: the paper's LLaDA setting.
    prompt_interval: int = 50
    response_interval: int = 7
    adaptive_ratio: float = 0.25

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        for name in ("gen_length", "block_length", "steps", "seed", "prompt_interval", "response_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f"{name} must be an integer, got {v!r}")
        if self.gen_length < 1 or self.block_length < 1:
            bad(f"gen_length ({self.gen_length}) and block_length ({self.block_length}) must be positive")
        if self.gen_length % self.block_length:
            bad(f"block_length ({self.block_length}) must divide gen_length ({self.gen_length})")
        if self.cache not in CACHE_MODES:
            bad(f"cache {self.cache!r} is not one of: {', '.join(CACHE_MODES)}")
        if self.rule not in RULES:
            bad(f"rule {self.rule!r} is not one of: {', '.join(RULES)}")
        if self.remasking not in REMASKING:
            bad(f"remasking {self.remasking!r} is not one of: {', '.join(REMASKING)}")
        if self.steps < 1:
            bad(f"steps must be at least 1, got {self.steps}")
        if self.rule == "quota" and self.steps % self.num_blocks:
            bad(f"steps ({self.steps}) must be a multiple of the number of blocks "
                f"({self.num_blocks} = gen_length / block_length) for rule 'quota'")
        if not 0.0 < self.threshold <= 1.0:
            bad(f"threshold must be in (0, 1], got {self.threshold}")
        if not (self.factor > 0 and math.isfinite(self.factor)):
            bad(f"factor must be a positive number, got {self.factor}")
        if not (self.frechet_margin >= 0 and math.isfinite(self.frechet_margin)):
            bad(f"frechet_margin must be a non-negative number, got {self.frechet_margin}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.prompt_interval < 1 or self.response_interval < 1:
            bad(f"prompt_interval ({self.prompt_interval}) and response_interval ({self.response_interval}) "
                "must be at least 1 step")
        if not 0.0 <= self.adaptive_ratio <= 1.0:
            bad(f"adaptive_ratio must be in [0, 1], got {self.adaptive_ratio}")
        if self.seed < 0:
            bad(f"seed must be >= 0, got {self.seed}")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if isinstance(ids, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                bad(f"stop_token_ids must be a list of token ids, got {ids!r}")
            self.stop_token_ids = tuple(ids)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown decode setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["stop_token_ids"] is not None:
            d["stop_token_ids"] = list(d["stop_token_ids"])
        return d


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # generated ids per row, cut before the first stop token when stop_at_eos
    nfe: list[int]  # forward passes each row took part in while unfinished
    finish_reasons: list[str]  # "stop" (a stop token ended the row) or "length"
    stats: dict = field(default_factory=dict)  # totals for the call


def row_seed(seed: int, row_id: int) -> int:
    """A 63-bit generator seed from (seed, row id), so a row's noise does not depend on its batch or worker."""
    h = (seed * 0x9E3779B97F4A7C15 + (row_id + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    h ^= h >> 31
    h = (h * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (h ^ (h >> 29)) & ((1 << 63) - 1)


def check_prompts(prompts, model: DiffusionLM, gen_length: int) -> list[list[int]]:
    """Validate prompts (non-empty lists of in-vocabulary ids that fit the model with gen_length)."""
    mc = model.config
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(p) + gen_length > mc.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with gen_length {gen_length} it exceeds the "
                             f"model's {mc.max_seq_len} positions: shorten it or lower gen_length")
        if min(p) < 0 or max(p) >= mc.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {mc.vocab_size})")
        out.append(p)
    return out


def _propose(logits: torch.Tensor, cfg: DecodeConfig, gens, active: list[bool], mask_id: int, block_length: int,
             select: torch.Tensor | None):
    """Proposed tokens x0 and their confidences (float64). logits: (B, L, V) for the block's positions, or for
    the L positions `select` (B, L) indexes.

    The mask token itself is never proposed (committing it would leave the position masked forever); its
    probability still counts in the softmax that gives the confidence."""
    B, L, V = logits.shape
    log_z = torch.logsumexp(logits.double(), dim=-1) if cfg.remasking == "low_confidence" else None  # (B, L)
    logits[..., mask_id] = -float("inf")  # in place: the caller's logits are not used again
    if cfg.temperature > 0 or cfg.remasking == "random":
        # Each row draws from its own generator, for the whole block, and only while it takes part, so its
        # stream does not depend on the batch.
        draws = [torch.rand((block_length, V + 1) if cfg.temperature > 0 else (block_length, 1), generator=g,
                            device=logits.device, dtype=torch.float64) if a else None for g, a in zip(gens, active)]
        filler = next(d for d in draws if d is not None)
        u = torch.stack([d if d is not None else torch.ones_like(filler) for d in draws])  # (B, bl, V + 1 or 1)
        if select is not None:
            u = u.gather(1, select[..., None].expand(-1, -1, u.shape[-1]))  # (B, L, V + 1 or 1)
    if cfg.temperature > 0:
        # argmax of exp(logits) / (-log u)^T, in log space: logits - T * log(-log u)
        gumbel = u[..., :V].clamp_min(1e-300)
        x0 = (logits.double() - cfg.temperature * torch.log(-torch.log(gumbel))).argmax(-1)
    else:
        x0 = logits.argmax(-1)  # (B, L)
    if cfg.remasking == "random":
        conf = u[..., -1]
    else:
        conf = torch.exp(logits.gather(-1, x0[..., None]).squeeze(-1).double() - log_z)  # softmax(x0), float64
    return x0, conf


@torch.inference_mode()
def generate(model: DiffusionLM, prompts, config: DecodeConfig | None = None, *, row_ids=None,
             max_blocks: int | None = None) -> GenerateOutput:
    """Decode a batch of prompts (lists of token ids, any lengths). `row_ids` (ints) seed per-row noise; by
    default a row's id is its index. `max_blocks` (benchmarks) decodes only the first blocks of the full-length
    problem; the tokens of the blocks not decoded are left out."""
    cfg = config or DecodeConfig()
    mc = model.config
    prompts = check_prompts(prompts, model, cfg.gen_length)
    t0 = time.perf_counter()
    dev = model.device
    B, G, bl = len(prompts), cfg.gen_length, cfg.block_length
    P = max(len(p) for p in prompts)
    T = P + G
    mask_id = mc.mask_token_id
    pad_id = mc.pad_token_id if mc.pad_token_id is not None else mask_id

    x = torch.full((B, T), mask_id, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, : P - len(p)] = pad_id
        x[b, P - len(p) : P] = torch.tensor(p)
        valid[b, P - len(p) :] = True
    x, valid = x.to(dev), valid.to(dev)
    positions = positions_from_mask(valid)  # (B, T)
    key_mask = key_mask_from(valid)  # (B, 1, 1, T) or None
    stop_ids = torch.tensor(cfg.stop_token_ids if cfg.stop_token_ids is not None else mc.stop_token_ids,
                            dtype=torch.long, device=dev)
    stop = cfg.stop_at_eos and stop_ids.numel() > 0

    row_ids = list(range(B)) if row_ids is None else [int(r) for r in row_ids]
    if len(row_ids) != B:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {B} prompts")
    gens = None
    if cfg.temperature > 0 or cfg.remasking == "random":
        gens = [torch.Generator(device=dev).manual_seed(row_seed(cfg.seed, r)) for r in row_ids]
    shift = mc.logit_shift
    cache = KVCache.allocate(mc, B, T, dev, model.dtype) if cfg.cache in ("prefix", "dual") else None
    features = None
    if cfg.cache == "dllm":
        features = FeatureCache(model, B, T, P - shift, prompt_interval=cfg.prompt_interval,
                                response_interval=cfg.response_interval, adaptive_ratio=cfg.adaptive_ratio)
    schedule = quota_schedule(bl, cfg.steps // cfg.num_blocks)
    rule_params = dict(threshold=cfg.threshold, factor=cfg.factor, frechet_margin=cfg.frechet_margin)

    out = x[:, P:].clone()  # (B, G) final tokens by original row
    nfe_out = torch.zeros(B, dtype=torch.long, device=dev)
    live = torch.arange(B, device=dev)  # original index of each live row
    nfe = torch.zeros(B, dtype=torch.long, device=dev)
    forwards, flops = 0, 0
    n_blocks = cfg.num_blocks if max_blocks is None else max(1, min(max_blocks, cfg.num_blocks))
    for k in range(n_blocks):
        s, e = P + k * bl, P + (k + 1) * bl
        active = [True] * x.shape[0]
        active_t = torch.ones(x.shape[0], dtype=torch.bool, device=dev)
        n_masked = bl  # the most masked positions any row has left in this block
        step = 0
        while True:
            block = x[:, s:e]
            candidates = block == mask_id  # (B, bl)
            sel = None  # logits only for the masked positions: (B, n_masked) indices, masked ones first
            if n_masked < bl:
                sel = (~candidates).to(torch.uint8).argsort(dim=-1, stable=True)[:, :n_masked]
            if features is not None:  # dLLM-Cache: refresh on its own intervals, else adaptive partial update
                logits, f = features.forward(model, x, positions, key_mask, active, s, e, sel)
                flops += f
            else:
                if step == 0 or cfg.cache == "none":  # full forward; refreshes every cached position
                    q0, q1 = 0, T
                elif cfg.cache == "prefix":  # [s, T) over the cached prefix
                    q0, q1 = s - shift, T
                else:  # dual: the block alone over the cached prefix and suffix
                    q0, q1 = s - shift, e
                logits = model.logits_for(x, positions, key_mask, cache, q0, q1, s, e, sel)  # (B, n_masked, V)
                flops += x.shape[0] * (model.forward_flops(q1 - q0, T) + 2 * n_masked * mc.d_model * mc.vocab_size)
            forwards += 1
            nfe += active_t
            x0, conf = _propose(logits, cfg, gens, active, mask_id, bl, sel)
            quota = schedule[min(step, len(schedule) - 1)]
            if sel is None:
                commit = select(conf, candidates, cfg.rule, quota=quota, **rule_params)
            else:
                commit_sel = select(conf, candidates.gather(1, sel), cfg.rule, quota=quota, **rule_params)
                commit = torch.zeros_like(candidates).scatter(1, sel, commit_sel)
                x0 = block.scatter(1, sel, x0)
            x[:, s:e] = torch.where(commit, x0, block)
            step += 1
            left = (x[:, s:e] == mask_id).sum(-1)
            left_host = left.tolist()  # the one host sync of a step: how many masks each row has left here
            n_masked = max(left_host)
            if n_masked == 0:
                break
            active_t = left > 0
            active = [n > 0 for n in left_host]
        if stop and k + 1 < n_blocks:
            finished = torch.isin(x[:, P:e], stop_ids).any(-1)
            if bool(finished.any()):
                out[live[finished]] = x[finished, P:]
                nfe_out[live[finished]] = nfe[finished]
                keep = ~finished
                keep_host = keep.tolist()
                x, positions, valid, live, nfe = x[keep], positions[keep], valid[keep], live[keep], nfe[keep]
                key_mask = key_mask_from(valid)
                if gens is not None:
                    gens = [g for g, kk in zip(gens, keep_host) if kk]
                if x.shape[0] == 0:
                    break
                if cache is not None:
                    cache = cache.first_rows(x.shape[0])  # refreshed by the next block's full forward
                if features is not None:
                    features.keep(keep, keep_host)
    if x.shape[0]:
        out[live] = x[:, P:]
        nfe_out[live] = nfe

    tokens, reasons = [], []
    out_host, stop_set = out[:, : n_blocks * bl].tolist(), set(stop_ids.tolist())
    for row in out_host:
        cut = next((i for i, t in enumerate(row) if t in stop_set), None) if stop else None
        tokens.append(row if cut is None else row[:cut])
        reasons.append("length" if cut is None else "stop")
    wall = time.perf_counter() - t0
    n_tok = sum(len(t) for t in tokens)
    nfe_list = nfe_out.tolist()
    stats = dict(rows=B, forward_passes=forwards, nfe=sum(nfe_list), generated_tokens=n_tok, wall_seconds=wall,
                 tokens_per_second=n_tok / wall if wall > 0 else 0.0, prompt_tokens=sum(len(p) for p in prompts),
                 padded_length=T, forward_flops=flops)
    return GenerateOutput(tokens=tokens, nfe=nfe_list, finish_reasons=reasons, stats=stats)
