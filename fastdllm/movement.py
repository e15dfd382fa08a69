"""Counting data movement: the bytes that copy, gather and index ops write while decoding.

A forward's matmuls, norms and attention read the weights and the cache and write their results; on top of that,
an engine may move data that the math does not need (gathering a subset of rows' cached keys/values before
attending, copying a fresh tensor into a buffer). `count_movement()` counts what those ops write, per op name,
under a TorchDispatchMode, so a benchmark can put the bytes beside the row-forwards that caused them
(docs/DESIGN.md, "Data movement"). It changes nothing that is computed.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose only work is moving data: what they write counts.
_MOVES = {"copy_", "_to_copy", "clone", "index_select", "index", "gather", "scatter", "scatter_", "scatter_add",
          "scatter_add_", "index_copy", "index_copy_", "index_put", "index_put_", "_index_put_impl_", "cat", "stack",
          "masked_scatter", "masked_scatter_", "put_", "take", "repeat", "slice_scatter", "select_scatter",
          "expand_copy", "_unsafe_index", "_unsafe_index_put", "masked_select", "where"}


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _MOVES:
            if name in ("index_copy_", "index_copy"):
                written = _bytes(args[3] if len(args) > 3 else kwargs.get("source"))
            elif name in ("index_put_", "index_put", "_index_put_impl_", "_unsafe_index_put"):
                # one write per element of self[indices]: the broadcast index entries times the dims not indexed
                dest, indices = args[0], list(args[1])
                idx = [i for i in indices if i is not None]
                n = torch.broadcast_shapes(*(i.shape for i in idx)).numel() if idx else 0
                rest = 1
                for d, size in enumerate(dest.shape):
                    if d >= len(indices) or indices[d] is None:
                        rest *= size
                written = n * rest * dest.element_size()
            elif name in ("scatter_", "scatter", "scatter_add", "scatter_add_"):
                written = args[2].numel() * args[0].element_size()  # one write per index entry
            else:
                written = sum(_bytes(o) for o in (out if isinstance(out, (tuple, list)) else (out,)))
            self.bytes[name] += written
        return out


@contextmanager
def count_movement():
    """`with count_movement() as moved:` ... `moved` is a Counter {aten op name: bytes written}."""
    mode = _Counter()
    with mode:
        yield mode.bytes
