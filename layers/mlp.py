"""The transformer feed-forward: Linear -> GELU(tanh) -> Linear (keys `0.*` and `2.*`, as in Flux and DiT)."""
from __future__ import annotations

from torch import nn


def gelu_mlp(dim: int, hidden_dim: int, bias: bool = True) -> nn.Sequential:
    """(..., dim) -> (..., dim) through `hidden_dim` with the tanh-approximated GELU."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=bias), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim, bias=bias)
    )
