"""`generate()`: block-wise, cached, confidence-parallel diffusion decoding of a list of prompts, as a loop over the
request-level `Engine` (fastdllm/engine.py). It keeps up to `max_batch_size` rows in flight; each row walks its own
blocks and a row that is done leaves at once, its slot going to the next waiting prompt (shortest first), so a row
decodes exactly as it would alone (docs/DESIGN.md, "Decoding semantics").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .config import CACHE_MODES, REMASKING, RULES, DecodeConfig
from .engine import Engine, Request, row_seed
from .models.common import DiffusionLM
from .proposal import PROPOSE_CHUNK_ELEMENTS, propose

__all__ = ["CACHE_MODES", "REMASKING", "RULES", "DecodeConfig", "GenerateOutput", "generate", "check_prompts",
           "row_seed", "PROPOSE_CHUNK_ELEMENTS"]


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # generated ids per row, cut before the first stop token when stop_at_eos
    nfe: list[int]  # forward passes each row took part in while unfinished
    finish_reasons: list[str]  # "stop" (a stop token ended the row) or "length"
    stats: dict = field(default_factory=dict)  # totals for the call
    texts: list[str] | None = None  # with tokenizer=: the decoded completions


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
    """`fastdllm.proposal.propose` with every row taking the settings of `cfg`."""
    temperature = [cfg.temperature] * logits.shape[0]
    return propose(logits, select, mask_id, block_length, temperature, cfg.remasking, gens, chunk_elements)


@torch.inference_mode()
def generate(model: DiffusionLM, prompts, config: DecodeConfig | None = None, *, row_ids=None,
             max_batch_size: int | None = None, max_blocks: int | None = None, tokenizer=None,
             progress: bool = False, compile: bool = False) -> GenerateOutput:
    """Decode prompts (lists of token ids, or strings with `tokenizer=`; any lengths, any number) with at most
    `max_batch_size` rows in flight (None: all of them); waiting prompts join shortest first, outputs keep the input
    order. `row_ids` (ints) seed per-row noise; by default a row's id is its index. `max_blocks` (benchmarks)
    decodes only the first blocks of the full-length problem; the tokens of the blocks not decoded are left out.
    `progress=True` shows a bar of finished rows; `compile=True` compiles the model's dense parts (see Engine)."""
    cfg = config or DecodeConfig()
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of prompts (a list of strings with tokenizer=, or of token-id "
                         "lists), not one string")
    prompts = list(prompts)
    if any(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are strings: pass tokenizer=fastdllm.load_tokenizer(...) to encode them, "
                             "or give token-id lists")
        prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    prompts = check_prompts(prompts, model, cfg.gen_length)
    N = len(prompts)
    row_ids = list(range(N)) if row_ids is None else [int(r) for r in row_ids]
    if len(row_ids) != N:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {N} prompts")
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be a positive integer or None, got {max_batch_size!r}")
    t0 = time.perf_counter()
    engine = Engine(model, cfg, max_batch_size=N if max_batch_size is None else min(N, max_batch_size),
                    tokenizer=tokenizer, max_blocks=max_blocks, compile=compile)
    engine.reserve(max(len(p) for p in prompts) + cfg.gen_length)
    # Prompts join shortest first (ties in input order): rows in flight then have similar lengths, and forwards
    # skip the pad columns they share. Outputs keep the input order; a row's result does not depend on when it joins.
    order = sorted(range(N), key=lambda i: len(prompts[i]))
    index = {engine.add(Request(prompts[i], row_id=row_ids[i])): i for i in order}
    done = [None] * N
    bar = None
    if progress:
        from .progress import bar as progress_bar

        bar = progress_bar(total=N, unit="row", desc="generate", enabled=True)
    while engine.pending:
        finished = engine.step()
        for f in finished:
            done[index[f.id]] = f
        if bar is not None and finished:
            bar.update(len(finished))
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    tokens = [f.tokens for f in done]
    nfe_out = [f.nfe for f in done]
    n_tok = sum(len(t) for t in tokens)
    nfe = sum(nfe_out)
    es = engine.stats
    rf = es["row_forwards"]
    stats = dict(rows=N, forward_passes=es["forward_passes"], nfe=nfe, row_forwards=rf,
                 occupancy=nfe / rf if rf else 1.0, max_batch_size=engine.max_batch_size,
                 slot_utilisation=es["rows_in_flight"] / (es["steps"] * engine.max_batch_size) if es["steps"] else 0.0,
                 generated_tokens=n_tok, wall_seconds=wall, tokens_per_second=n_tok / wall if wall > 0 else 0.0,
                 prompt_tokens=sum(len(p) for p in prompts), padded_length=engine.rows.T,
                 forward_flops=es["forward_flops"], proposal_rows=es["proposal_rows"], exact_rows=es["exact_rows"])
    return GenerateOutput(tokens=tokens, nfe=nfe_out, finish_reasons=[f.finish_reason for f in done], stats=stats,
                          texts=[f.text for f in done] if tokenizer is not None else None)
