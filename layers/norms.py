"""RMSNorm (computed in float32), the per-head q/k normalisation of Flux, and the LDM float32 GroupNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last dim; statistics in float32, eps 1e-6 as in Flux.

    `param_name` is the gain's checkpoint name: `scale` in Flux, `weight` in Sana (`diffusion/model/norms.py`).
    `unit_offset` (Gemma): the gain is stored as w with scale 1 + w (zeros at init), applied in float32 before the
    cast back, as Gemma's reference does.
    """

    def __init__(self, dim: int, eps: float = 1e-6, param_name: str = "scale", unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.param_name = param_name
        self.unit_offset = unit_offset
        self.register_parameter(param_name, nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * rrms * (1.0 + getattr(self, self.param_name).float())).to(x_dtype)
        return (x * rrms).to(dtype=x_dtype) * getattr(self, self.param_name)


class QKNorm(nn.Module):
    """Separate RMSNorms for queries and keys; both returned in v's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (LDM `normalization()`/`GroupNorm32`; 32 groups by default)."""

    def __init__(self, channels: int, eps: float = 1e-5, num_groups: int = 32, affine: bool = True):
        super().__init__(num_groups, channels, eps=eps, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
