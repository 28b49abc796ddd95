"""Sana's ReLU linear attention (NVlabs Sana `LiteLA` in `diffusion/model/nets/sana_blocks.py`): O(N) in tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from layers.norms import RMSNorm

# SanaBlock / SanaMSBlock build LiteLA with eps=1e-8 (the class default 1e-15 is what diffusers uses)
EPS = 1e-8
PAD_VAL = 1.0  # LiteLA.PAD_VAL: a row of ones appended to v turns k^T v into [numerator | normaliser]


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """ReLU-kernel attention on (B, H, N, D) heads, returned merged as (B, N, H*D) in q's dtype.

    out_n = sum_m relu(q_n).relu(k_m) v_m / (sum_m relu(q_n).relu(k_m) + eps), accumulated in float32
    whatever the input dtype (half-precision sums over N tokens overflow), as the official `fp32_attention`.
    """
    dtype = q.dtype
    q, k, v = F.relu(q).float(), F.relu(k).float(), v.float()
    v = F.pad(v, (0, 1), mode="constant", value=PAD_VAL)  # (B, H, N, D+1), last channel all ones
    kv = torch.matmul(k.transpose(-1, -2), v)  # (B, H, D, D+1): the whole sequence summarised once
    out = torch.matmul(q, kv)  # (B, H, N, D+1) = [sum_m (q.k_m) v_m | sum_m q.k_m]
    out = out[..., :-1].div_(out[..., -1:] + eps)  # (B, H, N, D), in place: one N x D buffer fewer
    return rearrange(out, "B H N D -> B N (H D)").to(dtype)


class LiteLA(nn.Module):
    """Self-attention with `linear_attention`: bias-free fused qkv, optional RMS q/k norm over the width, proj."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, norm_eps: float = 1e-5, eps: float = EPS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"LiteLA width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.eps = eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        # official `q_norm.weight` / `k_norm.weight`: one RMSNorm across all heads (diffusers "rms_norm_across_heads")
        self.q_norm = RMSNorm(dim, eps=norm_eps, param_name="weight") if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, eps=norm_eps, param_name="weight") if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        q, k, v = rearrange(self.qkv(x), "B N (K C) -> K B N C", K=3)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (rearrange(t, "B N (H D) -> B H N D", H=self.heads) for t in (q, k, v))
        return self.proj(linear_attention(q, k, v, self.eps))
