"""N-axis rotary position embedding as Flux uses it (`flux/math.py`, `EmbedND` in `modules/layers.py`)."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices for positions (B, L) -> (B, L, dim/2, 2, 2); frequencies in float64 as upstream."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # (dim/2,)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)  # (B, L, dim/2)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate consecutive pairs of q and k channels (B, H, L, D) in float32; returns them in their dtype.

    Upstream multiplies each pair by the 2x2 matrix [[cos, -sin], [sin, cos]]; writing the two rows out with
    cos and sin gives the same products and sums, bit for bit, without strided reads of the matrix.
    """
    cos, sin = freqs_cis[..., 0, 0], freqs_cis[..., 1, 0]  # (B, 1, L, D/2)

    def rotate(x: Tensor) -> Tensor:
        x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, H, L, D/2) each
        return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).reshape(x.shape).type_as(x)

    return rotate(xq), rotate(xk)


class EmbedND(nn.Module):
    """Position ids (B, L, n_axes) -> RoPE rotations (B, 1, L, sum(axes_dim)/2, 2, 2), one band of channels per axis."""

    def __init__(self, dim: int, theta: float, axes_dim: list[int]):
        super().__init__()
        check_axes(axes_dim, dim)
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"position ids have {ids.shape[-1]} axes, expected {len(self.axes_dim)} (axes_dim)")
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


def check_axes(axes_dim: list[int], head_dim: int, head_dim_is: str | None = None) -> None:
    """RoPE bands must be even (channel pairs rotate) and fill the head dim; `head_dim_is` says where it comes from."""
    if sum(axes_dim) != head_dim:
        expected = f"; expected the head dim {head_dim_is} = {head_dim}" if head_dim_is else ""
        expected = expected or f", expected the head dim {head_dim}"
        raise ValueError(f"axes_dim {list(axes_dim)} sums to {sum(axes_dim)}{expected}")
    if any(d % 2 for d in axes_dim):
        raise ValueError(f"axes_dim {list(axes_dim)}: every entry must be even (RoPE rotates channel pairs)")
