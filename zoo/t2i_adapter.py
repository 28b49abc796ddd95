"""T2I-Adapter (Mou et al. 2023), the official full `Adapter` (TencentARC `ldm/modules/encoders/adapter.py`).

Keys are the official ones (`conv_in`, `body.{level * nums_rb + j}.{in_conv,block1,block2,skep}`); the released
SD 1.4/1.5 adapters use `nums_rb=2, ksize=1, sk=True, use_conv=False`. Its features go to the UNet's input
blocks at the end of each level (`features_for`), added after the block as the official UNet does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from layers import Downsample
from zoo.registry import register
from zoo.unet_config import InjectionPoint


@dataclass
class T2IAdapterConfig:
    """The official `Adapter` arguments (defaults are the official constructor's)."""

    channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    nums_rb: int = 3
    cin: int = 64  # channels after the 8x8 pixel unshuffle: 64 * image channels
    ksize: int = 3
    sk: bool = False  # True: identity skips (no `skep` conv), an `in_conv` only where the width changes
    use_conv: bool = True  # downsample with a stride-2 conv (`down_opt.op`) instead of 2x2 average pooling

    def __post_init__(self):
        self.channels = list(self.channels)
        if not self.channels or self.nums_rb < 1 or self.cin % 64:
            raise ValueError(f"T2IAdapterConfig: need channels, nums_rb >= 1 and cin a multiple of 64 (8x8 unshuffle "
                             f"of the image), got channels={self.channels}, nums_rb={self.nums_rb}, cin={self.cin}")
        if self.ksize % 2 == 0:
            raise ValueError(f"T2IAdapterConfig.ksize must be odd, got {self.ksize}")
        if not self.sk and len(set(self.channels)) > 1:
            # the official block applies `skep` (in_c -> out_c) after `in_conv` already made out_c channels
            raise ValueError(f"T2IAdapterConfig: sk=False only works with equal channels, got {self.channels}")


class ResnetBlock(nn.Module):
    """Optional downsample and width change, then conv3x3-ReLU-conv(ksize), plus an identity or `skep` conv skip."""

    def __init__(self, in_c: int, out_c: int, down: bool, ksize: int = 3, sk: bool = False, use_conv: bool = True):
        super().__init__()
        ps = ksize // 2
        self.in_conv = nn.Conv2d(in_c, out_c, ksize, 1, ps) if (in_c != out_c or not sk) else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, ksize, 1, ps)
        self.skep = None if sk else nn.Conv2d(in_c, out_c, ksize, 1, ps)
        self.down_opt = Downsample(in_c, use_conv=use_conv) if down else None

    def forward(self, x: Tensor) -> Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        h = self.block2(self.act(self.block1(x)))
        return h + (self.skep(x) if self.skep is not None else x)


@register("t2i_adapter", T2IAdapterConfig)
class T2IAdapter(nn.Module):
    """Condition image (B, cin/64, H, W) -> one feature map per level, at 1/8, 1/16, ... of the image."""

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = c = config
        self.unshuffle = nn.PixelUnshuffle(8)
        self.conv_in = nn.Conv2d(c.cin, c.channels[0], 3, 1, 1)
        self.body = nn.ModuleList(
            ResnetBlock(c.channels[i - 1] if i and not j else c.channels[i], c.channels[i], down=bool(i and not j),
                        ksize=c.ksize, sk=c.sk, use_conv=c.use_conv)
            for i in range(len(c.channels)) for j in range(c.nums_rb)
        )

    def forward(self, x: Tensor) -> list[Tensor]:  # (B, cin/64, H, W) -> [(B, channels[i], H/8/2^i, W/8/2^i)]
        unit = 8 * 2 ** (len(self.config.channels) - 1)
        if x.ndim != 4 or x.shape[1] * 64 != self.config.cin or x.shape[2] % unit or x.shape[3] % unit:
            raise ValueError(f"T2I-Adapter input has shape {tuple(x.shape)}, expected "
                             f"(B, {self.config.cin // 64}, H, W) with H and W multiples of {unit}")
        x = self.conv_in(self.unshuffle(x))
        features = []
        for i in range(len(self.config.channels)):
            for j in range(self.config.nums_rb):
                x = self.body[i * self.config.nums_rb + j](x)
            features.append(x)
        return features

    @staticmethod
    def level_ends(points: list[InjectionPoint]) -> list[InjectionPoint]:
        """The last input block of each level (the one before each downsampling, and the final one)."""
        blocks = points[:-1]  # drop the middle block
        ends = [blocks[i - 1] for i in range(1, len(blocks)) if blocks[i].stride != blocks[i - 1].stride]
        return ends + [blocks[-1]]

    def features_for(self, unet: nn.Module, features: list[Tensor]) -> dict[int, Tensor]:
        """Place this adapter's per-level features at `unet`'s level ends, checking channels and count first."""
        ends = self.level_ends(unet.injection_points())
        if len(features) != len(ends) or any(f.shape[1] != p.channels for f, p in zip(features, ends)):
            raise ValueError(f"adapter features with channels {[f.shape[1] for f in features]} do not fit the UNet's "
                             f"level ends {[(p.name, p.channels) for p in ends]}")
        return {p.index: f for p, f in zip(ends, features)}

    def example_inputs(self, batch: int = 1, height: int = 512, width: int = 512, device=None,
                       dtype=torch.float32) -> tuple[tuple, dict]:
        """A random condition image of `height` x `width` pixels."""
        return (torch.rand(batch, self.config.cin // 64, height, width, device=device, dtype=dtype),), {}


__all__ = ["T2IAdapter", "T2IAdapterConfig", "ResnetBlock"]
