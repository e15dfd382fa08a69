"""The rows in flight of a continuous-batching decode: one object holds their sequences and per-row progress.

Rows live in the first `n` of `slots` preallocated slots (static buffers written by index). Every slot holds a
sequence of the same length T = P + gen_length: the prompt left-padded to P (the longest prompt of the call), then
the generated positions, all starting as the mask id. Pad keys are masked out and RoPE positions count from each
row's first real token, so a row decodes exactly as it would alone, whatever its slot and neighbours.

`add` puts waiting prompts into free slots (first the slots of rows that just finished), `drop` retires finished
rows and moves the last rows into the holes they leave, so the rows in flight stay in slots [0, n). The cache
policies mirror both (`admit`, `move`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.common import positions_from_mask


@dataclass
class Window:
    """Columns [first, T) of some rows in flight, where every real token of those rows lies: a forward over the
    window skips the pad columns all of them share (rows join in length order when the caller sorts them)."""

    first: int
    x: torch.Tensor  # (b, T - first) tokens
    positions: torch.Tensor  # (b, T - first) RoPE positions
    key_mask: torch.Tensor | None  # (b, 1, 1, T - first), or None when no row has a pad in the window


@dataclass
class Waiting:
    """A prompt that has not joined yet."""

    index: int  # its place in the input (outputs keep the input order)
    prompt: list[int]
    row_id: int  # seeds its noise
    generator: torch.Generator | None = None  # made when it joins (sampled decoding only)


class Rows:
    """Tokens, positions and key masks of the rows in flight, their input index, block, step, NFE and generator."""

    HOST = ("index", "length", "block", "step", "left", "nfe", "generators")  # the per-row lists, in slot order

    def __init__(self, slots: int, prompt_len: int, gen_length: int, block_length: int, mask_id: int, pad_id: int,
                 device):
        T = prompt_len + gen_length
        self.P, self.T, self.bl = prompt_len, T, block_length
        self.mask_id, self.pad_id = mask_id, pad_id
        self.x = torch.full((slots, T), mask_id, dtype=torch.long, device=device)  # (S, T) tokens
        self.valid = torch.zeros((slots, T), dtype=torch.bool, device=device)  # (S, T) real (non-pad) positions
        self.positions = torch.zeros((slots, T), dtype=torch.long, device=device)  # (S, T) RoPE positions
        self.n = 0
        # per live row, in slot order (host side: no device sync needed to schedule)
        self.index: list[int] = []  # input index
        self.length: list[int] = []  # prompt length
        self.block: list[int] = []  # the block it is decoding
        self.step: list[int] = []  # steps taken in that block (0: its next forward is the block's refresh)
        self.left: list[int] = []  # masked positions left in that block
        self.nfe: list[int] = []  # forwards it took part in
        self.generators: list[torch.Generator | None] = []

    @property
    def slots(self) -> int:
        return self.x.shape[0]

    def block_starts(self) -> torch.Tensor:
        """(n,) the first position of each row's current block."""
        return torch.tensor([self.P + k * self.bl for k in self.block], dtype=torch.long, device=self.x.device)

    def window(self, rows: torch.Tensor | None = None, host_rows: list[int] | None = None) -> Window:
        """The window of the live rows (or of slots `rows`, the same as `host_rows` on the host), decided from the
        prompt lengths without a device sync."""
        lengths = self.length if host_rows is None else [self.length[i] for i in host_rows]
        longest = max(lengths)
        first = self.P - longest

        def pick(t: torch.Tensor) -> torch.Tensor:
            return (t[: self.n] if rows is None else t.index_select(0, rows))[:, first:]

        key_mask = None if all(n == longest for n in lengths) else pick(self.valid)[:, None, None, :]
        return Window(first, pick(self.x), pick(self.positions), key_mask)

    def add(self, waiting: list[Waiting], holes: list[int]) -> list[int]:
        """Put waiting prompts into the slots `holes` (rows that just finished), then after the last live row;
        returns the slots used."""
        used = []
        for w in waiting:
            if holes:
                slot = holes.pop(0)
            else:
                slot = self.n
                self.n += 1
                for name in self.HOST:
                    getattr(self, name).append(None)
            p = len(w.prompt)
            row = torch.full((self.T,), self.mask_id, dtype=torch.long)
            row[: self.P - p] = self.pad_id
            row[self.P - p : self.P] = torch.tensor(w.prompt)
            valid = torch.zeros(self.T, dtype=torch.bool)
            valid[self.P - p :] = True
            self.x[slot] = row.to(self.x.device)
            self.valid[slot] = valid.to(self.x.device)
            self.positions[slot] = positions_from_mask(valid).to(self.x.device)
            self.index[slot], self.length[slot], self.generators[slot] = w.index, p, w.generator
            self.block[slot], self.step[slot], self.left[slot], self.nfe[slot] = 0, 0, self.bl, 0
            used.append(slot)
        return used

    def advance(self, left: list[int], stopped: list[int], n_blocks: int) -> list[int]:
        """After a step every row took part in: count its NFE and step, and move a row whose block has no masks
        `left` to its next block (its next step is that block's refresh). Returns the slots of the rows that are
        done: block complete and a stop token committed (`stopped`) or the last block complete."""
        done = []
        for i in range(self.n):
            self.nfe[i] += 1
            self.step[i] += 1
            self.left[i] = left[i]
            if left[i]:
                continue
            if stopped[i] or self.block[i] + 1 == n_blocks:
                done.append(i)
            else:
                self.block[i], self.step[i], self.left[i] = self.block[i] + 1, 0, self.bl
        return done

    def drop(self, holes: list[int]) -> tuple[list[int], list[int]]:
        """Retire the rows in slots `holes` for good: the last live rows move into the holes below the new row
        count. Returns the moves (source slots, destination slots) for the policies to mirror."""
        n_new = self.n - len(holes)
        gone = set(holes)
        src = [i for i in range(n_new, self.n) if i not in gone]
        dst = sorted(h for h in holes if h < n_new)
        if src:
            s, d = (torch.tensor(v, dtype=torch.long, device=self.x.device) for v in (src, dst))
            for buf in (self.x, self.valid, self.positions):
                buf.index_copy_(0, d, buf.index_select(0, s))
        for name in self.HOST:
            lst = getattr(self, name)
            for a, b in zip(src, dst):
                lst[b] = lst[a]
            del lst[n_new:]
        self.n = n_new
        return src, dst
