"""LDM up/down-sampling (`openaimodel.Upsample`/`Downsample`): nearest x2 then a 3x3 conv, and a stride-2 conv."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from layers.conv import Conv2d


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (if `use_conv`) a 3x3 conv named `conv` (UNet and VAE decoders alike)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample without a conv cannot change channels ({channels} -> {self.out_channels})")

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C', 2H, 2W)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv named `op` (or 2x2 average pooling when not `use_conv`)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample without a conv cannot change channels ({channels} -> {self.out_channels})")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C', H/2, W/2)
        return self.op(x)
