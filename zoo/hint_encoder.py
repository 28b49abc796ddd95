"""HintEncoder, a ControlNet-lite: a small conv encoder from a hint image (e.g. a 1-channel scribble) to one
feature map per chosen UNet injection point, passed as `UNet(features=...)`.

Its output channels and strides are computed from the UNet config's `injection_points()` at construction,
so it fits any UNet config; a mismatch is a construction error, never a shape error mid-forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zoo.registry import get_config, register
from zoo.t2i_adapter import T2IAdapter
from zoo.unet_config import InjectionPoint, UNetConfig, injection_points


@dataclass
class HintEncoderConfig:
    """`unet`: the UNet it feeds (config name, YAML path, or dict with `arch: unet`); `points`: input-block indices
    (None: the last block of every level, as the T2I-Adapter)."""

    unet: Any
    points: list[int] | None = None
    hint_channels: int = 1
    base_channels: int = 16
    max_channels: int = 256
    zero_init: bool = True  # zero heads: a fresh encoder leaves the UNet's output unchanged

    def __post_init__(self):
        if self.hint_channels < 1 or self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError(f"HintEncoderConfig: hint_channels, base_channels must be positive and max_channels >= "
                             f"base_channels; got {self.hint_channels}, {self.base_channels}, {self.max_channels}")
        blocks = self.injection_points()[:-1]
        if self.points is not None:
            bad = [i for i in self.points if not isinstance(i, int) or not 0 <= i < len(blocks)]
            if bad or not self.points or len(set(self.points)) != len(self.points):
                raise ValueError(f"HintEncoderConfig.points {self.points}: expected distinct input-block indices in "
                                 f"0..{len(blocks) - 1} (input_blocks.0 .. input_blocks.{len(blocks) - 1})")

    def unet_config(self) -> UNetConfig:
        cfg = self.unet if isinstance(self.unet, UNetConfig) else get_config(self.unet)
        if type(cfg) is not UNetConfig:
            raise ValueError(f"HintEncoderConfig.unet must describe a UNet, got a {type(cfg).__name__}")
        return cfg

    def injection_points(self) -> list[InjectionPoint]:
        return injection_points(self.unet_config())

    def chosen(self) -> list[InjectionPoint]:
        pts = self.injection_points()
        return [pts[i] for i in self.points] if self.points is not None else T2IAdapter.level_ends(pts)


@register("hint_encoder", HintEncoderConfig)
class HintEncoder(nn.Module):
    """Stem to the latent grid (three stride-2 convs), a stride-2 conv per deeper level, a 1x1 head per point."""

    def __init__(self, config: HintEncoderConfig):
        super().__init__()
        self.config = config
        self.points = config.chosen()
        b = config.base_channels
        width = lambda stride: min(8 * b * stride, config.max_channels)  # trunk width at a latent stride
        widths = [config.hint_channels, b, 2 * b, 4 * b, width(1)]
        stem: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            stem += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU()]
        self.stem = nn.Sequential(*stem)  # (B, hint, 8H, 8W) -> (B, width(1), H, W)
        self.max_stride = max(p.stride for p in self.points)
        self.downs = nn.ModuleList()
        s = 1
        while s < self.max_stride:
            self.downs.append(nn.Sequential(nn.Conv2d(width(s), width(2 * s), 3, stride=2, padding=1), nn.SiLU()))
            s *= 2
        self.heads = nn.ModuleList(nn.Conv2d(width(p.stride), p.channels, 1) for p in self.points)
        if config.zero_init:
            for head in self.heads:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def forward(self, hint: Tensor) -> dict[int, Tensor]:  # (B, hint_channels, 8H, 8W) -> {block: (B, C, H/s, W/s)}
        unit = 8 * self.max_stride
        if hint.ndim != 4 or hint.shape[1] != self.config.hint_channels or hint.shape[2] % unit or hint.shape[3] % unit:
            raise ValueError(f"hint has shape {tuple(hint.shape)}, expected (B, {self.config.hint_channels}, H, W) "
                             f"with H and W multiples of {unit} pixels")
        h = self.stem(hint)
        by_stride, s = {1: h}, 1
        for down in self.downs:
            h, s = down(h), 2 * s
            by_stride[s] = h
        return {p.index: head(by_stride[p.stride]) for p, head in zip(self.points, self.heads)}

    @classmethod
    def for_unet(cls, unet: nn.Module, points: list[int] | None = None, **fields: Any) -> HintEncoder:
        """A HintEncoder sized from a built UNet's config (on the UNet's device)."""
        unet_fields = {"arch": "unet", **dataclasses.asdict(unet.config)}
        with torch.device(next(unet.parameters()).device):
            return cls(HintEncoderConfig(unet=unet_fields, points=points, **fields))

    def example_inputs(self, batch: int = 1, height: int = 512, width: int = 512, device=None,
                       dtype=torch.float32) -> tuple[tuple, dict]:
        """A random hint image of `height` x `width` pixels."""
        return (torch.rand(batch, self.config.hint_channels, height, width, device=device, dtype=dtype),), {}


__all__ = ["HintEncoder", "HintEncoderConfig"]
