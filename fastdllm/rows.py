"""The rows in flight of the engine: one object holds their sequences and per-row progress (host side).

Rows live in the first `n` of `slots` preallocated slots (static buffers written by index). A row's canvas is its
prompt followed by its gen_length generated positions, all starting as the mask id; canvases are right-aligned in
buffers of T columns (T: the longest canvas so far, grown when a longer one joins), so every row ends at column T
and a row's generated region is [T - gen_length, T). Pad columns before a canvas are masked out as keys and RoPE
positions count from each row's first real token, so a row decodes exactly as it would alone, whatever its slot and
neighbours (docs/DESIGN.md, "Rows and slots").

`add` puts joining requests into free slots (first the slots of rows that just finished), `drop` retires finished
rows and moves the last rows into the holes they leave, so the rows in flight stay in slots [0, n). The cache
policies mirror both (`admit`, `move`) and `grow`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.common import positions_from_mask


@dataclass
class Window:
    """Columns [first, T) of some rows in flight, where every real token of those rows lies: a forward over the
    window skips the pad columns all of them share."""

    first: int
    x: torch.Tensor  # (b, T - first) tokens
    positions: torch.Tensor  # (b, T - first) RoPE positions
    key_mask: torch.Tensor | None  # (b, 1, 1, T - first), or None when no row has a pad in the window


@dataclass
class Live:
    """The host-side state of a row in flight: its request and its progress."""

    request: object  # the engine's admitted request (its settings, its id)
    canvas: int  # prompt + gen_length
    gen_length: int
    n_blocks: int  # blocks it decodes (a benchmark may stop early)
    generator: torch.Generator | None
    block: int = 0  # the block it is decoding
    step: int = 0  # steps taken in that block (0: its next forward is the block's refresh)
    left: int = 0  # masked positions left in that block
    nfe: int = 0  # forwards it took part in
    stopped: bool = False  # a stop token was committed in its generated region
    region: int = 0  # columns it decodes, ending at T (0: gen_length; block-causal rows start at a block boundary)
    lead: int = 0  # prompt tokens at the start of that region (block-causal rows: the prompt's tail)


class Rows:
    """Tokens, positions and key masks of the rows in flight (device buffers) and their host-side state."""

    def __init__(self, slots: int, seq_len: int, block_length: int, mask_id: int, pad_id: int, device):
        self.bl, self.mask_id, self.pad_id, self.device = block_length, mask_id, pad_id, device
        self.x = torch.full((slots, seq_len), mask_id, dtype=torch.long, device=device)  # (S, T) tokens
        self.valid = torch.zeros((slots, seq_len), dtype=torch.bool, device=device)  # (S, T) real positions
        self.positions = torch.zeros((slots, seq_len), dtype=torch.long, device=device)  # (S, T) RoPE positions
        self.live: list[Live] = []  # per live row, in slot order

    @property
    def slots(self) -> int:
        return self.x.shape[0]

    @property
    def T(self) -> int:
        return self.x.shape[1]

    @property
    def n(self) -> int:
        return len(self.live)

    def gen_start(self, i: int) -> int:
        """The first generated column of row i."""
        live = self.live[i]
        return self.T - (live.region or live.gen_length)

    def block_start(self, i: int) -> int:
        return self.gen_start(i) + self.live[i].block * self.bl

    def block_starts(self) -> torch.Tensor:
        """(n,) the first column of each row's current block."""
        return torch.tensor([self.block_start(i) for i in range(self.n)], dtype=torch.long, device=self.device)

    def window(self, rows: torch.Tensor | None = None, host_rows: list[int] | None = None) -> Window:
        """The window of the live rows (or of slots `rows`, the same as `host_rows` on the host), decided from the
        canvas lengths without a device sync."""
        canvases = [r.canvas for r in self.live] if host_rows is None else [self.live[i].canvas for i in host_rows]
        longest = max(canvases)
        first = self.T - longest

        def pick(t: torch.Tensor) -> torch.Tensor:
            return (t[: self.n] if rows is None else t.index_select(0, rows))[:, first:]

        key_mask = None if all(c == longest for c in canvases) else pick(self.valid)[:, None, None, :]
        return Window(first, pick(self.x), pick(self.positions), key_mask)

    def grow(self, seq_len: int) -> int:
        """Room for canvases of `seq_len` columns: every row moves right by the growth, which is returned."""
        d = seq_len - self.T
        if d <= 0:
            return 0
        S = self.slots
        x = torch.full((S, seq_len), self.mask_id, dtype=torch.long, device=self.device)
        valid = torch.zeros((S, seq_len), dtype=torch.bool, device=self.device)
        positions = torch.zeros((S, seq_len), dtype=torch.long, device=self.device)
        x[:, :d] = self.pad_id
        x[:, d:], valid[:, d:], positions[:, d:] = self.x, self.valid, self.positions
        self.x, self.valid, self.positions = x, valid, positions
        return d

    def add(self, joining: list[tuple[list[int], Live]], holes: list[int]) -> list[int]:
        """Put joining rows (prompt, state) into the slots `holes` (rows that just finished), then after the last
        live row; returns the slots used."""
        used = []
        T = self.T
        for prompt, live in joining:
            if holes:
                slot = holes.pop(0)
                self.live[slot] = live
            else:
                slot = self.n
                self.live.append(live)
            p = len(prompt)
            start = T - live.canvas  # the canvas's first column
            row = torch.full((T,), self.mask_id, dtype=torch.long)
            row[:start] = self.pad_id
            row[start : start + p] = torch.tensor(prompt)
            valid = torch.zeros(T, dtype=torch.bool)
            valid[start:] = True
            self.x[slot] = row.to(self.device)
            self.valid[slot] = valid.to(self.device)
            self.positions[slot] = positions_from_mask(valid).to(self.device)
            live.left = self.bl
            used.append(slot)
        return used

    def drop(self, holes: list[int]) -> tuple[list[int], list[int]]:
        """Retire the rows in slots `holes` for good: the last live rows move into the holes below the new row
        count. Returns the moves (source slots, destination slots) for the policies to mirror."""
        n_new = self.n - len(holes)
        gone = set(holes)
        src = [i for i in range(n_new, self.n) if i not in gone]
        dst = sorted(h for h in holes if h < n_new)
        if src:
            s, d = (torch.tensor(v, dtype=torch.long, device=self.device) for v in (src, dst))
            for buf in (self.x, self.valid, self.positions):
                buf.index_copy_(0, d, buf.index_select(0, s))
        for a, b in zip(src, dst):
            self.live[b] = self.live[a]
        del self.live[n_new:]
        return src, dst
