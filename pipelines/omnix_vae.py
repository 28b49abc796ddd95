"""The Flux VAE as OmniX runs it on panoramas (HKU-MMLab/OmniX `pipeline_omnix.py` enables diffusers' VAE tiling and
swaps in its own `tiled_decode`, `src/modules/blend_h.py`): both tile with diffusers' fixed grid and linear blends.

- `encode`: diffusers' `AutoencoderKL._tiled_encode` once the image exceeds a tile (1024 pixels, the Flux VAE's
  `sample_size`): tiles every 768 pixels, each blended into its upper and left neighbours over 32 latent rows/columns
  and cropped to 96; smaller images are encoded whole.
- `decode`: OmniX's panorama decode: the latent gets its first 2 columns appended, is decoded in full-width row
  tiles of 128 latent rows every 96 (rows blended over 256 pixels, cropped to 768), then the first 16 pixel columns
  fade from the decoded copies of those 2 columns into the image, closing the seam; the copies are dropped.

`blend` is the ramp both use (diffusers' `blend_v` / `blend_h`, OmniX's `blend_h`): the first `extent` rows or
columns of b move from a's last ones (weight 1 - i/extent) to b's own (weight i/extent), written into b.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.autoencoder import DiagonalGaussian

TILE = 1024  # image pixels per tile: the Flux VAE config's sample_size (diffusers' tile_sample_min_size)
OVERLAP = 0.25  # diffusers' tile_overlap_factor
WRAP = 2  # latent columns OmniX appends before decoding


def blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """b with its first `extent` entries along `dim` faded in from a's last ones (in place, as diffusers)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = extent
    w = (torch.arange(extent, device=b.device, dtype=torch.float32) / extent).to(b.dtype).view(shape)  # i / extent
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + head * w)
    return b


def encode(ae: nn.Module, x: Tensor, tile: int = TILE) -> DiagonalGaussian:
    """Image (B, 3, H, W) in [-1, 1] -> posterior over raw latents, tiled as diffusers' `_tiled_encode` beyond
    `tile` pixels (mean and log-variance blended; the log-variance is clamped per tile and again at the end)."""
    if x.shape[-2] <= tile and x.shape[-1] <= tile:
        return ae.encode(x)
    f = ae.downscale
    latent_tile = tile // f
    stride, extent = int(tile * (1 - OVERLAP)), int(latent_tile * OVERLAP)
    keep = latent_tile - extent
    rows = []
    for i in range(0, x.shape[-2], stride):
        row = []
        for j in range(0, x.shape[-1], stride):
            p = ae.encode(x[..., i : i + tile, j : j + tile])
            row.append(torch.cat([p.mean, p.logvar], dim=1))  # (B, 2C, h, w) moments
        rows.append(row)
    out = []
    for i, row in enumerate(rows):
        for j, t in enumerate(row):  # in place and in this order, as diffusers (neighbours are read blended)
            if i > 0:
                blend(rows[i - 1][j], t, extent, dim=2)
            if j > 0:
                blend(row[j - 1], t, extent, dim=3)
        out.append(torch.cat([t[..., :keep, :keep] for t in row], dim=3))
    return DiagonalGaussian.from_moments(torch.cat(out, dim=2))


def decode(ae: nn.Module, z: Tensor, tile: int = TILE) -> Tensor:
    """Raw latents (B, C, h, w) of a panorama -> image (B, 3, 8h, 8w), as OmniX's patched `tiled_decode`."""
    f = ae.downscale
    latent_tile = tile // f
    stride, extent = int(latent_tile * (1 - OVERLAP)), int(tile * OVERLAP)
    keep, width = tile - extent, z.shape[-1] * f
    z = torch.cat([z, z[..., :WRAP]], dim=-1)  # (B, C, h, w + 2): the seam's other side, decoded next to it
    rows = [ae.decode(z[..., i : i + latent_tile, :]) for i in range(0, z.shape[-2], stride)]
    out = []
    for i, t in enumerate(rows):
        if i > 0:
            blend(rows[i - 1], t, extent, dim=2)
        t = t[..., :keep, :]
        out.append(blend(t[..., width:], t[..., :width], t.shape[-1] - width, dim=3))
    return torch.cat(out, dim=2)


__all__ = ["OVERLAP", "TILE", "WRAP", "blend", "decode", "encode"]
