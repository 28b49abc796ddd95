"""DiT360 (panorama Flux): circular padding of a panorama's packed token grid along its width (equirectangular wrap).

Two ways, both following the DiT360 reference pipeline (pad columns are copies of the opposite edge's
tokens *and* of their position ids, one token column per side by default):
- pipeline style: `pad_panorama` once before the denoising loop, `crop_panorama` once after it, around a plain Flux;
- per-forward style: `DiT360`, the model a Flux config with `circular_pad=N` builds (config `dit360`). It is Flux
  with the same state dict; its forward pads, runs the official Flux forward and crops, so the two edges can never
  drift apart and the caller passes the plain grid.
The per-forward wrap picks the edges by position id, not storage order: a panorama rolled by k columns
(tokens and ids together) gives exactly the rolled output.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from zoo.flux import Flux, FluxParams
from zoo.registry import register


@register("flux", FluxParams, when=lambda params: params.circular_pad > 0)
class DiT360(Flux):
    """Flux whose every forward wraps the token grid's width by `params.circular_pad` columns per side."""

    def forward(
        self,
        img: Tensor,  # (B, h*w, in_channels) the plain (unpadded) panorama grid, row-major
        img_ids: Tensor,  # (B, h*w, 3) or (h*w, 3)
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        *,
        width: int | None = None,  # token-grid width w; read off img_ids when omitted (needed on meta tensors)
    ) -> Tensor:  # (B, h*w, out_channels)
        pad = self.params.circular_pad
        if img_ids.ndim == 2:
            img_ids = img_ids[None].expand(img.shape[0], -1, -1)
        img, img_ids, width = wrap_tokens(img, img_ids, pad, width)
        out = super().forward(img, img_ids, txt, txt_ids, timesteps, y, guidance)  # (B, h*(w+2*pad), C)
        return unwrap_tokens(out, width, pad)

    def example_inputs(self, batch: int = 1, height: int = 2048, width: int = 4096, **kwargs) -> tuple[tuple, dict]:
        """Flux's random inputs for a `height` x `width` pixel panorama, plus the token-grid width."""
        args, kw = super().example_inputs(batch=batch, height=height, width=width, **kwargs)
        return args, {**kw, "width": width // 16}


# ---- helpers: the wrap itself ----

def grid_width(ids: Tensor) -> int:
    """Token-grid width of row-major image ids (B, L, 3) = (0, row, col): the number of distinct columns."""
    if ids.is_meta:
        raise ValueError("the token-grid width cannot be read off meta position ids (they hold no values); "
                         "pass width= (pixels / 16)")
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


def wrap_tokens(img: Tensor, ids: Tensor, pad: int, width: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Pad by the columns whose ids are the grid's last/first; returns tokens, ids and the grid width.

    `width` (the token-grid width) is read off the ids when omitted; give it on meta tensors.
    """
    if ids.ndim != 3 or ids.shape[:2] != img.shape[:2]:
        raise ValueError(f"img_ids {tuple(ids.shape)} do not match img {tuple(img.shape)}: expected (B, L, 3)")
    width = grid_width(ids) if width is None else int(width)
    if width < max(pad, 1) or img.shape[1] % width:
        raise ValueError(f"circular_pad={pad} needs a row-major token grid at least {pad} wide; ids give width {width}")
    cols = rearrange(ids[0, :, 2], "(h w) -> h w", w=width)[0]  # column id of each stored column
    order = torch.argsort(cols)
    left, right = order[width - pad :], order[:pad]
    return _pad_cols(img, width, pad, left, right), _pad_cols(ids, width, pad, left, right), width


def unwrap_tokens(img: Tensor, width: int, pad: int) -> Tensor:
    """Drop the columns `wrap_tokens` added."""
    return crop_panorama(img, width, pad)


__all__ = ["DiT360", "pad_panorama", "crop_panorama", "wrap_tokens", "unwrap_tokens", "grid_width"]
