"""The canonical form of one module's LoRA, and how a LoRA on a fused official module relates to diffusers' parts.

Diffusers modules that are parts of one fused official module (q/k/v -> `qkv`; q/k/v/mlp -> Flux `linear1`) are
joined by stacking the A's and placing each B in its own block, so B A is exactly the parts' products.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from checkpoints_convert.keymap import Entry, swap_halves


class Factor(NamedTuple):
    """One module's LoRA: delta W = (alpha / rank) * up @ down, alpha None meaning alpha = rank; with a DoRA
    `magnitude` m (out,) the weight becomes m * (W + delta W) / ||W + delta W||_row."""

    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None
    magnitude: Tensor | None = None  # (out,)

    @property
    def alpha_over_rank(self) -> float:
        """alpha / rank: the factor B A is multiplied by (the user's multiplier comes on top, at load)."""
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


def join(e: Entry, got: dict[int, Factor], sizes: list[int]) -> Factor:
    """diffusers parts (index -> Factor) -> one Factor on the fused official module `e`, exact: B A = the parts'
    B_i A_i stacked in blocks of `sizes` rows."""
    if len(e.diffusers) == 1:
        f = got[0]
        m = f.magnitude
        return Factor(f.down, swap_halves(f.up) if e.swap else f.up, f.alpha,
                      swap_halves(m) if e.swap and m is not None else m)
    fs = [got[i] for i in sorted(got)]
    dora = [f.magnitude is not None for f in fs]
    if any(dora) and not (all(dora) and len(got) == len(sizes)):
        raise ValueError(f"DoRA on some diffusers parts {e.diffusers} of {e.official} only: the fused module's "
                         "magnitude needs every part's (the others' rows would need the base weight's norms)")
    magnitude = torch.cat([f.magnitude.flatten() for f in fs]) if all(dora) else None
    if len(got) == len(sizes) and all(torch.equal(f.down, fs[0].down) and f.alpha == fs[0].alpha for f in fs):
        return Factor(fs[0].down, torch.cat([f.up for f in fs]), fs[0].alpha, magnitude)  # one A shared: split^-1
    rank = sum(f.down.shape[0] for f in fs)
    ratios = {f.alpha_over_rank for f in fs}
    same = len(ratios) == 1  # then the blocks are copied as is and alpha carries the common alpha / rank
    up = fs[0].up.new_zeros((sum(sizes), rank, *fs[0].up.shape[2:]))
    col, starts = 0, [sum(sizes[:i]) for i in range(len(sizes))]
    for i in sorted(got):
        f = got[i]
        if f.up.shape[0] != sizes[i]:
            raise ValueError(f"LoRA {e.diffusers[i]}: B has {f.up.shape[0]} rows, expected {sizes[i]} "
                             f"(part {i} of {e.official})")
        r = f.down.shape[0]
        up[starts[i]: starts[i] + sizes[i], col: col + r] = f.up if same else f.up * f.alpha_over_rank
        col += r
    alpha = ratios.pop() * rank if same else float(rank)
    return Factor(torch.cat([f.down for f in fs]), up, None if alpha == rank else alpha, magnitude)


def split(e: Entry, f: Factor, sizes: list[int]) -> dict[str, Factor]:
    """One Factor on a fused official module -> its diffusers parts (the inverse of `join`)."""
    up = swap_halves(f.up) if e.swap else f.up
    m = f.magnitude
    if len(e.diffusers) == 1:
        return {e.diffusers[0]: Factor(f.down, up, f.alpha, swap_halves(m) if e.swap and m is not None else m)}
    blocks = torch.split(up, sizes, dim=0)
    mags = torch.split(m, sizes) if m is not None else [None] * len(sizes)
    used = [torch.nonzero(b.flatten(2).abs().sum((0, 2)) if b.ndim > 2 else b.abs().sum(0)).flatten() for b in blocks]
    cols = torch.cat(used)
    rank = f.down.shape[0]
    contiguous = all(len(u) == 0 or u[-1] - u[0] + 1 == len(u) for u in used)
    block_placed = len(cols) == rank and len(set(cols.tolist())) == rank and contiguous  # one A per part
    if block_placed and (m is None or all(len(u) for u in used)):
        return {d: Factor(f.down[u[0]: u[-1] + 1], b[:, u[0]: u[-1] + 1], None if f.alpha is None else
                          f.alpha_over_rank * len(u), mg) for d, b, u, mg in zip(e.diffusers, blocks, used, mags)
                if len(u)}
    return {d: Factor(f.down, b, f.alpha, mg) for d, b, mg in zip(e.diffusers, blocks, mags)}  # A copied to each


def fit(name: str, f: Factor, weight: Tensor) -> Factor:
    """Check (and reshape 1x1 conv <-> linear) the factors against the base weight; errors name both shapes."""
    r = f.down.shape[0]
    down_want = (r, *weight.shape[1:])
    up_want = (weight.shape[0], r, *[1] * (weight.ndim - 2))
    down, up = f.down, f.up
    if down.shape != down_want and down.numel() == r * weight[0].numel() and all(k == 1 for k in weight.shape[2:]):
        down = down.reshape(down_want)
    if up.shape != up_want and up.numel() == weight.shape[0] * r and up.shape[1:2] == (r,):
        up = up.reshape(up_want)
    for role, t, want in (("lora_down", down, down_want), ("lora_up", up, up_want)):
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"LoRA {name}.{role}.weight has shape {tuple(t.shape)}, but {name} (weight "
                             f"{tuple(weight.shape)}) needs {tuple(want)}")
    if f.magnitude is not None and f.magnitude.numel() != weight.shape[0]:
        raise ValueError(f"LoRA {name}: DoRA magnitude has shape {tuple(f.magnitude.shape)}, but {name} (weight "
                         f"{tuple(weight.shape)}) needs one entry per output row ({weight.shape[0]}); a per-input "
                         "norm (LyCORIS wd_on_out=False) is not supported")
    return Factor(down, up, f.alpha, f.magnitude)
