"""`Engine(..., compile=True)`: the dense parts of every layer through `torch.compile` (docs/DESIGN.md, "Compile").

A layer's forward is its dense input half (norm, q/k/v projections, rotary), its attention (which writes fresh
keys/values into the cache and reads it where it lies: index writes and a fused attention kernel, left eager), and
its dense output half (output projection, residual, norm, MLP); the final norm and output projection follow the
last layer. The two halves and the output projection are compiled, so the work between the attention calls runs as
fused kernels. Shapes: every forward's rows and query length vary from step to step, so on CPU the halves are
compiled with dynamic shapes (one compilation serves every step); on CUDA they are compiled for CUDA graphs
(`mode="reduce-overhead"`), which record one graph per distinct shape.
"""

from __future__ import annotations

import torch

from .models.common import DiffusionLM


def compile_model(model: DiffusionLM) -> DiffusionLM:
    """Compile the model's layer halves and output projection in place (once; a second call does nothing)."""
    if getattr(model, "_fastdllm_compiled", False):
        return model
    cuda = model.device.type == "cuda"
    opts = dict(mode="reduce-overhead", dynamic=False) if cuda else dict(dynamic=True)
    for block in model.layers:
        block.qkv_in = torch.compile(block.qkv_in, **opts)
        block.finish = torch.compile(block.finish, **opts)
    model.project = torch.compile(model.project, **opts)
    model._fastdllm_compiled = True
    return model
