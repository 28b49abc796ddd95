"""Sinusoidal timestep embedding (one implementation for every family) and Flux's `MLPEmbedder`."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor, dim: int, *, time_factor: float, keep_dtype: bool, max_period: float = 10000
) -> Tensor:
    """(N,) timesteps -> (N, dim) embedding, [cos | sin] with frequencies exp(-ln(max_period) * i / (dim/2)).

    The family settings are explicit: Flux `time_factor=1000` (its t lives in [0, 1]) and the result cast to t's
    dtype (`keep_dtype=True`); LDM/SGM UNets and PixArt/Sana `time_factor=1`, `keep_dtype=False` (always float32).
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if keep_dtype and torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, with Flux's names `in_layer` / `out_layer`."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))
