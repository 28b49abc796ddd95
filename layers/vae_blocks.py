"""The autoencoder's blocks (LDM `diffusionmodules/model.py`, BFL `modules/autoencoder.py`): ResnetBlock with no
time embedding, single-head AttnBlock over 1x1-conv projections, and the asymmetric-pad strided Downsample.

These differ from the UNet's `ResBlock`/`Downsample` in the checkpoint names and in the math (no time embedding,
pad (0, 1, 0, 1) instead of padding 1), so they are their own modules; GroupNorm is the shared `GroupNorm32`.
"""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from layers.attention import attention
from layers.norms import GroupNorm32

EPS = 1e-6  # both releases use GroupNorm(32, C, eps=1e-6) throughout the autoencoder


def normalize(channels: int) -> GroupNorm32:
    """The autoencoder's `Normalize(in_channels)`: 32 groups, eps 1e-6, affine."""
    return GroupNorm32(channels, eps=EPS)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3, twice, plus a 1x1 `nin_shortcut` when the width changes (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout (train-time only in the releases) omitted
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """One attention head over all H*W positions; q, k, v and `proj_out` are 1x1 convs as in the checkpoints."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "B C H W -> B 1 (H W) C") for f in (self.q, self.k, self.v))
        out = attention(q, k, v)  # (B, H*W, C); SDPA scales by C**-0.5 as the releases do
        out = rearrange(out, "B (H W) C -> B C H W", H=x.shape[2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row below and one column right (the releases' (0, 1, 0, 1) pad).

    `circular` (set by `zoo.tiling.circular_width` for panoramas) takes the extra column from the left edge.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)
        self.circular = False

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        if self.circular:
            x = F.pad(F.pad(x, (0, 1, 0, 0), mode="circular"), (0, 0, 0, 1))
        else:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


__all__ = ["ResnetBlock", "AttnBlock", "Downsample", "normalize", "EPS"]
