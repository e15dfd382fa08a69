"""Block-wise, cached, confidence-parallel diffusion decoding with continuous batching.

One `generate()` serves every cache mode (the policies of fastdllm/policies.py). It keeps up to `max_batch_size`
rows in flight; each row walks its own blocks (the step after its block has no masks left is its next block's
refresh) and a row that is done leaves at once, its slot going to the next waiting prompt (shortest first). A
step reads: admit rows -> forward (the policy's, one per kind of row) -> propose -> commit -> retire. Prompts are
left-padded to the longest one; pad keys are masked out and RoPE positions count from each row's first real token,
so a row decodes exactly as it would alone (DESIGN.md, "Decoding semantics").
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .models.common import DiffusionLM
from .policies import CACHE_POLICIES
from .rows import Rows, Waiting
from .rules import RULES, quota_schedule, select

CACHE_MODES = tuple(CACHE_POLICIES)
REMASKING = ("low_confidence", "random")
# The proposal step works on chunks of rows holding at most this many (position x vocabulary) entries, so its
# float64 temporaries stay bounded (about 32 MiB each) at any batch size and vocabulary (LLaDA: 126k).
PROPOSE_CHUNK_ELEMENTS = 1 << 22


@dataclass(kw_only=True)
class DecodeConfig:
    """Decoding settings (see DESIGN.md, "Decoding semantics"). Invalid values raise ValueError."""

    gen_length: int = 256
    block_length: int = 32
    steps: int = 256  # total steps for the quota rule; steps / num_blocks per block
    cache: str = "dual"  # a name in fastdllm.policies.CACHE_POLICIES: none | prefix | dual | dllm
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


def _propose(logits: torch.Tensor, cfg: DecodeConfig, gens, mask_id: int, block_length: int, select: torch.Tensor,
             chunk_elements: int = PROPOSE_CHUNK_ELEMENTS):
    """Proposed tokens x0 (B, M) and their confidences (float64) from logits (B, M, V) for the M positions of each
    row's block that `select` (B, M) indexes. Rows are taken in chunks of at most `chunk_elements` draws or logits,
    so no float64 (rows x positions x vocabulary) tensor is ever held at once.

    The mask token itself is never proposed (committing it would leave the position masked forever); its
    probability still counts in the softmax that gives the confidence."""
    B, M, V = logits.shape
    per_row = max(M, block_length if gens is not None else 0) * (V + 1)
    step = max(1, chunk_elements // per_row)
    x0 = torch.empty((B, M), dtype=torch.long, device=logits.device)
    conf = torch.empty((B, M), dtype=torch.float64, device=logits.device)
    for a in range(0, B, step):
        b = min(B, a + step)
        x0[a:b], conf[a:b] = _propose_rows(logits[a:b], cfg, None if gens is None else gens[a:b], mask_id,
                                           block_length, select[a:b])
    return x0, conf


def _propose_rows(logits: torch.Tensor, cfg: DecodeConfig, gens, mask_id: int, block_length: int,
                  select: torch.Tensor):
    """`_propose` for one chunk of rows."""
    V = logits.shape[-1]
    log_z = torch.logsumexp(logits.double(), dim=-1) if cfg.remasking == "low_confidence" else None  # (b, M)
    logits[..., mask_id] = -float("inf")  # in place: the caller's logits are not used again
    if gens is not None:
        # Each row draws from its own generator, for its whole block, at every step it takes part in, so its
        # stream does not depend on the batch or on when it joined.
        u = torch.stack([torch.rand((block_length, V + 1) if cfg.temperature > 0 else (block_length, 1), generator=g,
                                    device=logits.device, dtype=torch.float64) for g in gens])  # (b, bl, V + 1 or 1)
        u = u.gather(1, select[..., None].expand(-1, -1, u.shape[-1]))  # (b, M, V + 1 or 1)
    if cfg.temperature > 0:
        # argmax of exp(logits) / (-log u)^T, in log space: logits - T * log(-log u)
        gumbel = u[..., :V].clamp_min(1e-300)
        x0 = (logits.double() - cfg.temperature * torch.log(-torch.log(gumbel))).argmax(-1)
    else:
        x0 = logits.argmax(-1)  # (b, M)
    if cfg.remasking == "random":
        conf = u[..., -1]
    else:
        conf = torch.exp(logits.gather(-1, x0[..., None]).squeeze(-1).double() - log_z)  # softmax(x0), float64
    return x0, conf


@torch.inference_mode()
def generate(model: DiffusionLM, prompts, config: DecodeConfig | None = None, *, row_ids=None,
             max_batch_size: int | None = None, max_blocks: int | None = None) -> GenerateOutput:
    """Decode prompts (lists of token ids, any lengths, any number) with at most `max_batch_size` rows in flight
    (None: all of them); waiting prompts join shortest first, outputs keep the input order. `row_ids` (ints) seed
    per-row noise; by default a row's id is its index. `max_blocks` (benchmarks) decodes only the first blocks of
    the full-length problem; the tokens of the blocks not decoded are left out."""
    cfg = config or DecodeConfig()
    mc = model.config
    prompts = check_prompts(prompts, model, cfg.gen_length)
    N = len(prompts)
    row_ids = list(range(N)) if row_ids is None else [int(r) for r in row_ids]
    if len(row_ids) != N:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {N} prompts")
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive integer or None, got {max_batch_size!r}")
    t0 = time.perf_counter()
    dev = model.device
    bl = cfg.block_length
    P = max(len(p) for p in prompts)
    mask_id = mc.mask_token_id
    rows = Rows(N if max_batch_size is None else min(N, max_batch_size), P, cfg.gen_length, bl, mask_id,
                mc.pad_token_id if mc.pad_token_id is not None else mask_id, dev)
    policy = CACHE_POLICIES[cfg.cache](model, cfg, rows.slots, P)
    stop_ids = torch.tensor(cfg.stop_token_ids if cfg.stop_token_ids is not None else mc.stop_token_ids,
                            dtype=torch.long, device=dev)
    stop = cfg.stop_at_eos and stop_ids.numel() > 0
    sampling = cfg.temperature > 0 or cfg.remasking == "random"
    # Prompts join shortest first (ties in input order): rows in flight then have similar lengths, and forwards
    # skip the pad columns they share. Outputs keep the input order; a row's result does not depend on when it joins.
    order = sorted(range(N), key=lambda i: len(prompts[i]))
    waiting = deque(Waiting(i, prompts[i], row_ids[i]) for i in order)

    def take(k: int) -> list[Waiting]:
        joined = [waiting.popleft() for _ in range(min(k, len(waiting)))]
        for w in joined:  # a row's generator starts when it joins: seeded by (seed, row id) only
            w.generator = torch.Generator(device=dev).manual_seed(row_seed(cfg.seed, w.row_id)) if sampling else None
        return joined

    schedule = quota_schedule(bl, cfg.steps // cfg.num_blocks)
    rule_params = dict(threshold=cfg.threshold, factor=cfg.factor, frechet_margin=cfg.frechet_margin)
    n_blocks = cfg.num_blocks if max_blocks is None else max(1, min(max_blocks, cfg.num_blocks))
    out_tokens: list[list[int]] = [[] for _ in range(N)]
    nfe_out = [0] * N
    forwards = row_forwards = flops = 0
    offsets = torch.arange(bl, device=dev)

    holes: list[int] = []  # slots of the rows that finished in the last step
    while True:
        # admit: waiting prompts take the finished rows' slots, then free ones; holes left over are closed
        joined = rows.add(take(len(holes) + rows.slots - rows.n), holes)
        if holes:
            src, dst = rows.drop(holes)
            if src:
                policy.move(src, dst)
        policy.admit(joined)
        if not rows.n:
            break

        # forward: the policy runs the step for every row in flight, one forward per kind of row
        n = rows.n
        starts = rows.block_starts()  # (n,)
        idx = starts[:, None] + offsets  # (n, bl) positions of each row's block
        block = rows.x[:n].gather(1, idx)  # (n, bl)
        candidates = block == mask_id
        n_masked = max(rows.left)  # logits only for the masked positions: (n, n_masked) indices, masked first
        if n_masked == bl:
            sel = offsets.expand(n, -1)
        else:
            sel = (~candidates).to(torch.uint8).argsort(dim=-1, stable=True)[:, :n_masked]
        step = policy.forward(model, rows, starts, sel)
        forwards += len(step.batches)
        row_forwards += sum(step.batches)
        flops += step.flops

        # propose and commit, each row on its own schedule
        x0, conf = _propose(step.logits, cfg, rows.generators[:n] if sampling else None, mask_id, bl, sel)
        quota = 1
        if cfg.rule == "quota":
            quota = torch.tensor([schedule[min(k, len(schedule) - 1)] for k in rows.step], device=dev)
        commit_sel = select(conf, candidates.gather(1, sel), cfg.rule, quota=quota, **rule_params)
        commit = torch.zeros_like(candidates).scatter(1, sel, commit_sel)
        block = torch.where(commit, block.scatter(1, sel, x0), block)  # (n, bl)
        rows.x[:n].scatter_(1, idx, block)

        # retire: the one host sync of a step, how many masks each row has left and whether it holds a stop token
        left = (block == mask_id).sum(-1)
        if stop:
            hit = torch.isin(rows.x[:n, P:], stop_ids).any(-1)
            left_host, hit_host = torch.stack((left, hit.long())).tolist()
        else:
            left_host, hit_host = left.tolist(), [0] * n
        holes = rows.advance(left_host, hit_host, n_blocks)
        if holes:
            done = rows.x[torch.tensor(holes, device=dev), P : P + n_blocks * bl].tolist()
            for i, toks in zip(holes, done):
                out_tokens[rows.index[i]], nfe_out[rows.index[i]] = toks, rows.nfe[i]

    tokens, reasons = [], []
    stop_set = set(stop_ids.tolist())
    for row in out_tokens:
        cut = next((i for i, t in enumerate(row) if t in stop_set), None) if stop else None
        tokens.append(row if cut is None else row[:cut])
        reasons.append("length" if cut is None else "stop")
    wall = time.perf_counter() - t0
    n_tok = sum(len(t) for t in tokens)
    nfe = sum(nfe_out)
    stats = dict(rows=N, forward_passes=forwards, nfe=nfe, row_forwards=row_forwards,
                 occupancy=nfe / row_forwards if row_forwards else 1.0, max_batch_size=rows.slots,
                 generated_tokens=n_tok, wall_seconds=wall, tokens_per_second=n_tok / wall if wall > 0 else 0.0,
                 prompt_tokens=sum(len(p) for p in prompts), padded_length=rows.T, forward_flops=flops)
    return GenerateOutput(tokens=tokens, nfe=nfe_out, finish_reasons=reasons, stats=stats)
