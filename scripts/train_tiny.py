#!/usr/bin/env python
"""Train the built-in `tiny` masked-diffusion model (LLaDA architecture) on the addition and sorting tasks.

The objective is LLaDA's SFT loss: each example is prompt + answer + <|eos|> repeated to fill the 32 generated
positions. Per example a mask ratio t ~ U(eps, 1) is drawn and every generated position (answer and trailing stop
tokens; never the prompt) is replaced by the mask token with probability t. The loss is the cross-entropy on the
masked positions weighted by 1/t, summed per example, divided by the number of generated positions and averaged
over the batch. Prompts are left-padded (with an attention mask), as decoding pads them.

Training is a fixed function of --seed: the batch and the masks of step i are drawn from generators seeded with
(seed, i), so a run resumed from a checkpoint continues exactly as an uninterrupted one would.

The shipped model is three stages of this script: scripts/train_tiny_recipe.sh runs their exact commands.

  # continue a run exactly (its settings are restored; --steps and --decay-steps may be given again)
  python scripts/train_tiny.py --resume runs/train_tiny/state.pt --steps 20000 --decay-steps 2000
  # start from the shipped weights (or a state.pt) with a fresh optimizer, e.g. on a GPU; --add-layers N grows it
  python scripts/train_tiny.py --init-from tiny --steps 20000 --batch-size 256 --lr 1e-3 --out runs/tiny_more
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastdllm
from fastdllm.models import BUILTIN_DIR, save_checkpoint
from fastdllm.models.common import DiffusionLM
from fastdllm.tiny_kit import (EOS, GEN_LENGTH, MASK, PAD, PROBLEM_SETS, SHAPE, VOCAB, decode, decode_config, encode,
                               problem_set, random_problem, save_char_tokenizer, score, tiny_config)

SHAPE_KEYS = tuple(SHAPE)
RUN_LOCAL = ("resume", "init_from", "out", "state_dir", "threads", "device", "max_minutes", "steps", "explicit")


def make_batch(step: int, args) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clean token ids (B, P + 32) with left-padded prompts, their attention mask, and the prompt width P."""
    rng = random.Random(f"batch:{args.seed}:{step}")
    rows = []
    for _ in range(args.batch_size):
        task = "sorting" if rng.random() < args.sort_frac else "addition"
        p = random_problem(task, rng, uniform_digits=rng.random() < args.short_frac)
        answer = encode(p.answer)
        rows.append((encode(p.prompt), answer + [EOS] * (GEN_LENGTH - len(answer))))
    P = max(len(q) for q, _ in rows)
    ids = torch.full((len(rows), P + GEN_LENGTH), PAD, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    for b, (q, a) in enumerate(rows):
        ids[b, P - len(q) : P] = torch.tensor(q)
        ids[b, P:] = torch.tensor(a)
        attn[b, P - len(q) :] = True
    return ids, attn, P


def diffusion_loss(model: DiffusionLM, ids, attn, P: int, step: int, args) -> torch.Tensor:
    """LLaDA's masked-diffusion loss on the generated region of a clean batch."""
    B = ids.shape[0]
    g = torch.Generator().manual_seed(hash_seed(args.seed, step))
    t = args.eps + (1 - args.eps) * torch.rand(B, 1, generator=g)  # (B, 1) mask ratio per example
    masked = torch.rand(B, GEN_LENGTH, generator=g) < t  # (B, G) never the prompt
    ids, attn, t, masked = ids.to(args.device), attn.to(args.device), t.to(args.device), masked.to(args.device)
    target = ids[:, P:]
    noisy = ids.clone()
    noisy[:, P:] = torch.where(masked, torch.full_like(target, MASK), target)
    with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.device.type == "cuda"):
        logits = model(noisy, attn)[:, P:]  # (B, G, V)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    ce = ce.view(B, GEN_LENGTH) * masked / t  # (B, G) weighted by 1/t on masked positions only
    return ce.sum() / (B * GEN_LENGTH)


def hash_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**62)


def lr_at(step: int, args) -> float:
    """Linear warmup, constant lr, then cosine decay to min_lr_ratio * lr over the last --decay-steps of --steps
    (with --decay-steps 0 the cosine spans everything after the warmup). Before its decay phase the lr does not
    depend on --steps, so a run can be resumed with a larger --steps and ends as a fresh run with that --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    start = args.steps - args.decay_steps if args.decay_steps else args.warmup
    if step < start:
        return args.lr
    frac = min(1.0, (step - start) / max(1, args.steps - start))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def quick_eval(model: DiffusionLM, n: int, seed: int, cache="none", rule="quota") -> dict[str, float]:
    """Greedy exact match on n held-out problems of each problem set with the real decoder and the kit's scoring
    (default: the baseline, no cache and one token per step)."""
    model.eval()
    cfg = decode_config(cache, rule)
    res = {}
    for name in PROBLEM_SETS:
        probs = problem_set(name, n, seed)
        out = fastdllm.generate(model, [encode(p.prompt) for p in probs], cfg, max_batch_size=256)
        res[name] = sum(score(probs, [decode(t) for t in out.tokens])) / n
        res[f"{name}_nfe"] = sum(out.nfe) / n
    model.train()
    return res


def load_init(source: str) -> DiffusionLM:
    """The float32 weights to start from: a training state (.pt file written by this script) or a saved model."""
    if Path(source).is_file():
        state = torch.load(source, map_location="cpu", weights_only=False)
        a = state["args"]
        model = DiffusionLM(tiny_config(**{k: a[k] for k in SHAPE_KEYS}))
        model.load_state_dict(state["model"])
        return model
    try:
        return fastdllm.load_model(source, dtype="float32")
    except ValueError as e:
        sys.exit(f"error: --init-from: {e}")


def grow(model: DiffusionLM, extra: int) -> DiffusionLM:
    """`model` with `extra` more layers, spread evenly between its own (new layer i goes after old layer
    ceil((i + 1) * n / extra) - 1). A new layer is a fresh one with zero attention-output and MLP-down weights: its
    residual branches add nothing, so the grown model computes what `model` did until training moves them."""
    old = model.config
    n = old.n_layers
    grown = DiffusionLM(dataclasses.replace(old, n_layers=n + extra))
    grown.init_weights(0.02, torch.Generator().manual_seed(n * 1000 + extra))
    after = [-(-(i + 1) * n // extra) - 1 for i in range(extra)]  # the old layer each new one follows
    order = []  # order[k]: the old layer index that grown layer k copies, or None for a new layer
    for i in range(n):
        order += [i] + [None] * after.count(i)
    with torch.no_grad():
        grown.embed.weight.copy_(model.embed.weight)
        grown.norm.weight.copy_(model.norm.weight)
        grown.lm_head.weight.copy_(model.lm_head.weight)
        for k, src in enumerate(order):
            if src is None:
                grown.layers[k].attn.o.weight.zero_()
                grown.layers[k].mlp.down.weight.zero_()
            else:
                grown.layers[k].load_state_dict(model.layers[src].state_dict())
    return grown


def export(model: DiffusionLM, out: Path, dtype: torch.dtype):
    """Write the model in the LLaDA checkpoint format with the char tokenizer, loadable by fastdllm.load_model."""
    copy = DiffusionLM(model.config)
    copy.load_state_dict({k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()})
    save_checkpoint(copy.to(dtype), out)
    save_char_tokenizer(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="total optimizer steps (also the cosine horizon)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-steps", type=int, default=0,
                    help="cosine decay over the last N steps, constant lr before (0: cosine right after the warmup)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    ap.add_argument("--eps", type=float, default=1e-3, help="smallest mask ratio t")
    ap.add_argument("--sort-frac", type=float, default=0.5, help="fraction of sorting examples")
    ap.add_argument("--short-frac", type=float, default=0.3,
                    help="fraction of addition examples whose operands have a uniform digit count (more short numbers)")
    ap.add_argument("--d-model", type=int, default=SHAPE["d_model"])
    ap.add_argument("--n-layers", type=int, default=SHAPE["n_layers"])
    ap.add_argument("--n-heads", type=int, default=SHAPE["n_heads"])
    ap.add_argument("--mlp-hidden", type=int, default=SHAPE["mlp_hidden"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    ap.add_argument("--out", default=str(BUILTIN_DIR), help="where the trained model is written (default: fastdllm/tiny)")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--state-dir", default="runs/train_tiny", help="training state (for --resume), logs, snapshots")
    ap.add_argument("--resume", default=None, help="a state.pt to continue from (its shape and seed are used)")
    ap.add_argument("--init-from", default=None,
                    help="start from the weights of a saved model (e.g. tiny: the shipped one) or of a training state "
                         "(a state.pt), with its shape, a fresh optimizer and schedule")
    ap.add_argument("--add-layers", type=int, default=0,
                    help="with --init-from: grow the model by N layers spread between the loaded ones, each starting "
                         "as the identity (zero attention-output and MLP-down weights), so training resumes from the "
                         "loaded model's function with more depth")
    ap.add_argument("--eval-every", type=int, default=500, help="quick eval every N steps (0: only at the end)")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out problems per task in the quick eval")
    ap.add_argument("--ckpt-every", type=int, default=500, help="save the training state every N steps")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop (saving state and model) after this much wall time; 0: no limit")
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.explicit = {a.dest for a in ap._actions
                     if any(g == o or g.startswith(o + "=") for g in given for o in a.option_strings)}
    positive = ("steps", "batch_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "threads", "eval_n", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup", "decay_steps", "eval_every", "ckpt_every", "seed"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0 or not 0 <= args.min_lr_ratio <= 1:
        ap.error("--lr must be positive and --min-lr-ratio in [0, 1]")
    if not 0 < args.eps < 1:
        ap.error(f"--eps must be in (0, 1), got {args.eps}")
    for name in ("sort_frac", "short_frac"):
        if not 0 <= getattr(args, name) <= 1:
            ap.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.d_model % args.n_heads:
        ap.error(f"--d-model ({args.d_model}) must be divisible by --n-heads ({args.n_heads})")
    if args.resume and not Path(args.resume).is_file():
        ap.error(f"--resume {args.resume}: no such file")
    if args.add_layers < 0 or (args.add_layers and not args.init_from):
        ap.error("--add-layers needs --init-from and must be >= 0")
    if args.resume and args.init_from:
        ap.error("--resume and --init-from exclude each other (--resume already restores the weights)")
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(dev)
    except RuntimeError:
        ap.error(f"--device {dev!r} is not a torch device (auto, cpu, cuda, cuda:N)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda was asked for but no CUDA device is available")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    start_step, state = 0, None
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=False)
        # The model shape and data stream come from the checkpoint; other settings too unless given again.
        for k, v in state["args"].items():
            if k in SHAPE_KEYS + ("seed",) or (k not in args.explicit and k not in RUN_LOCAL):
                setattr(args, k, v)
        start_step = state["step"]
        if start_step >= args.steps:
            sys.exit(f"error: --resume {args.resume} is already at step {start_step}; pass --steps above it")
    init = None
    if args.init_from:
        init = load_init(args.init_from)
        c = init.config
        if c.family != "llada" or c.vocab_size != len(VOCAB) or c.mask_token_id != MASK:
            sys.exit(f"error: --init-from {args.init_from} is not a character-level LLaDA model like tiny")
        args.d_model, args.n_layers, args.n_heads, args.mlp_hidden = c.d_model, c.n_layers, c.n_heads, c.mlp_hidden
        if args.add_layers:
            init, args.n_layers = grow(init, args.add_layers), c.n_layers + args.add_layers
    cfg = tiny_config(**{k: getattr(args, k) for k in SHAPE_KEYS})
    torch.manual_seed(args.seed)
    model = DiffusionLM(cfg).init_weights(0.02, torch.Generator().manual_seed(args.seed))
    model.to(args.device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    if init is not None:
        model.load_state_dict(init.state_dict())
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    n_params = model.num_parameters()
    print(f"model: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, mlp {cfg.mlp_hidden}: "
          f"{n_params:,} parameters; device {args.device}, threads {args.threads}; steps {start_step}->{args.steps}",
          flush=True)
    log = open(state_dir / "log.jsonl", "a")
    eval_seed = 10_000 + args.seed  # held out: training batches are drawn from other seeds

    def save_state(step):
        saved_args = {k: v for k, v in vars(args).items() if k not in ("device", "explicit")}
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "train_seconds": prior + time.perf_counter() - t0, "args": saved_args}, state_dir / "state.tmp")
        (state_dir / "state.tmp").replace(state_dir / "state.pt")

    t0 = time.perf_counter()
    prior = state.get("train_seconds", 0.0) if state else 0.0
    run_loss, run_n, step = 0.0, 0, start_step
    while step < args.steps:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, attn, P = make_batch(step, args)
        loss = diffusion_loss(model, ids, attn, P, step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        run_loss, run_n = run_loss + loss.item(), run_n + 1
        elapsed = time.perf_counter() - t0
        if step % args.log_every == 0 or step == args.steps:
            rec = dict(step=step, loss=run_loss / run_n, lr=lr, minutes=(prior + elapsed) / 60,
                       sec_per_step=elapsed / (step - start_step))
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            run_loss, run_n = 0.0, 0
        out_of_time = args.max_minutes > 0 and elapsed > args.max_minutes * 60
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps or out_of_time:
            acc = quick_eval(model, args.eval_n, eval_seed)
            rec = dict(step=step, eval=acc, minutes=(prior + time.perf_counter() - t0) / 60)
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == args.steps or out_of_time:
            save_state(step)
        if out_of_time:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    train_seconds = prior + time.perf_counter() - t0
    export(model, Path(args.out), getattr(torch, args.save_dtype))
    print(f"done: step {step}, {train_seconds / 60:.1f} min of training; model written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
