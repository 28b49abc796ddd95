"""DiT360-style circular padding of a panorama's packed token grid along its width (equirectangular wrap).

Two ways, both following the DiT360 reference pipeline (pad columns are copies of the opposite edge's
tokens *and* of their position ids, one token column per side by default):
- pipeline style: `pad_panorama` once before the denoising loop, `crop_panorama` once after it;
- per-forward style: a Flux built with `circular_pad=N` (config `dit360`) pads and crops inside every
  forward (`wrap_tokens` / `unwrap_tokens`), so the two edges can never drift apart and the caller
  passes the plain grid.
The per-forward wrap picks the edges by position id, not storage order: a panorama rolled by k columns
(tokens and ids together) gives exactly the rolled output.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def grid_width(ids: Tensor) -> int:
    """Token-grid width of row-major image ids (B, L, 3) = (0, row, col): the number of distinct columns."""
    cols = ids[0, :, 2]
    return int(cols.max().item() - cols.min().item()) + 1 if cols.numel() else 0


def _pad_cols(x: Tensor, width: int, pad: int, left: Tensor, right: Tensor) -> Tensor:
    """(B, h*w, C) -> (B, h*(w+2*pad), C): columns `left` prepended, `right` appended (indices into w)."""
    g = rearrange(x, "b (h w) c -> b h w c", w=width)
    g = torch.cat([g[:, :, left], g, g[:, :, right]], dim=2)
    return rearrange(g, "b h w c -> b (h w) c")


def pad_panorama(tokens: Tensor, ids: Tensor, width: int, pad: int = 1) -> tuple[Tensor, Tensor]:
    """Wrap-pad packed tokens (B, h*w, C) and their ids (B, h*w, 3) by `pad` columns on each side (storage order)."""
    if pad < 1 or pad > width:
        raise ValueError(f"pad must be in [1, {width}] (the token grid width), got {pad}")
    if tokens.shape[1] % width or ids.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)} / ids {tuple(ids.shape)} do not form a grid of width {width}")
    idx = torch.arange(width, device=tokens.device)
    left, right = idx[width - pad :], idx[:pad]  # the last columns go left, the first ones go right
    return _pad_cols(tokens, width, pad, left, right), _pad_cols(ids, width, pad, left, right)


def crop_panorama(tokens: Tensor, width: int, pad: int = 1) -> Tensor:
    """Undo `pad_panorama`: (B, h*(w+2*pad), C) -> (B, h*w, C); `width` is the unpadded grid width."""
    g = rearrange(tokens, "b (h w) c -> b h w c", w=width + 2 * pad)
    return rearrange(g[:, :, pad : pad + width], "b h w c -> b (h w) c")


def wrap_tokens(img: Tensor, ids: Tensor, pad: int) -> tuple[Tensor, Tensor, int]:
    """Per-forward wrap: pad by the columns whose ids are the grid's last/first; returns tokens, ids, grid width."""
    width = grid_width(ids)
    if width < pad or img.shape[1] % max(width, 1):
        raise ValueError(f"circular_pad={pad} needs a row-major token grid at least {pad} wide; ids give width {width}")
    cols = rearrange(ids[0, :, 2], "(h w) -> h w", w=width)[0]  # column id of each stored column
    order = torch.argsort(cols)
    left, right = order[width - pad :], order[:pad]
    return _pad_cols(img, width, pad, left, right), _pad_cols(ids, width, pad, left, right), width


def unwrap_tokens(img: Tensor, width: int, pad: int) -> Tensor:
    """Drop the columns `wrap_tokens` added."""
    return crop_panorama(img, width, pad)
