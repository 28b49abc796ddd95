"""Sana's Mix-FFN `GLUMBConv` (NVlabs Sana `diffusion/model/nets/basic_modules.py`): convolutions on the token grid."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class ConvLayer(nn.Module):
    """A conv under the official wrapper name `conv` (EfficientViT `ConvLayer`): conv, optional `norm`, activation.

    `act`: True for SiLU (Sana), or any activation module; `norm` acts on (B, C, H, W) (DC-AE's RMSNorm2d).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, bias: bool, groups: int = 1,
                 act: bool | nn.Module = False, stride: int = 1, norm: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups,
                              bias=bias)
        if norm is not None:  # registered only when present: Sana's keys have no `norm`
            self.norm = norm
        self.act = nn.SiLU() if act is True else (act or None)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        return self.act(x) if self.act is not None else x


class GLUMBConv(nn.Module):
    """1x1 inverted conv (+SiLU) -> 3x3 depthwise conv -> GLU gate (SiLU) -> 1x1 point conv, on (B, N, C) tokens.

    The depthwise conv is what mixes neighbouring tokens, so the tokens are laid back on their (H, W) grid:
    Sana has no positional embedding and learns position from these convolutions.
    """

    def __init__(self, in_features: int, hidden_features: int, kernel_size: int = 3,
                 point_norm: nn.Module | None = None):
        super().__init__()
        self.hidden_features = hidden_features
        # official use_bias=(True, True, False), act=("silu", "silu", None), no norms
        self.inverted_conv = ConvLayer(in_features, hidden_features * 2, 1, bias=True, act=True)
        self.depth_conv = ConvLayer(hidden_features * 2, hidden_features * 2, kernel_size, bias=True,
                                    groups=hidden_features * 2)
        self.point_conv = ConvLayer(hidden_features, in_features, 1, bias=False, norm=point_norm)  # DC-AE: a norm
        self.glu_act = nn.SiLU()

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:  # (B, N, C), (H, W) with H*W = N -> (B, N, C)
        h, w = hw
        if x.ndim != 3 or x.shape[1] != h * w:
            raise ValueError(f"GLUMBConv: tokens {tuple(x.shape)} do not fill a {h}x{w} grid ({h * w} tokens)")
        x = self.forward_grid(rearrange(x, "B (H W) C -> B C H W", H=h, W=w))
        return rearrange(x, "B C H W -> B (H W) C")

    def forward_grid(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W), as DC-AE calls it
        x = self.depth_conv(self.inverted_conv(x))  # (B, 2*hidden, H, W)
        x, gate = torch.chunk(x, 2, dim=1)
        return self.point_conv(x * self.glu_act(gate))  # (B, C, H, W)
