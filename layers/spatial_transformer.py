"""LDM `attention.py`: SpatialTransformer = GroupNorm, proj_in, transformer blocks (self-, cross-attn, GEGLU), proj_out.

Attention goes through `layers.attention` (SDPA). A `CrossAttention` whose `capture` is a list also appends its
attention probabilities (B, heads, Lq, Lk) to it (opt-in, see `zoo.attention_capture`); the output is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from layers.attention import attention


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (itself when None); bias-free q/k/v as in the official file."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.capture: list[Tensor] | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # x (B, L, D), context (B, T, Dc)
        context = x if context is None else context
        q, k, v = (rearrange(p(t), "B L (H D) -> B H L D", H=self.heads)
                   for p, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        if self.capture is not None:
            # recorded beside the SDPA path (which never materialises them), in float32 for visualisation
            logits = torch.einsum("bhld,bhtd->bhlt", q.float(), k.float()) * q.shape[-1] ** -0.5
            self.capture.append(logits.softmax(dim=-1))  # (B, H, L, T)
        return self.to_out(attention(q, k, v))  # (B, L, D)


class GEGLU(nn.Module):
    """Linear to 2x width, then value * GELU(gate) (Shazeer 2020); the gate is the second half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU (or Linear-GELU when not `glu`) to `mult` x width, dropout, Linear back (keys `net.0`, `net.2`)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention (`attn1`), cross-attention (`attn2`) and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn  # then attn1 attends to the context too
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # (B, L, D)
        # the residual adds go in place into each branch's fresh output (a Linear's, whose backward does not need it)
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on `context`; residual around it all."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, disable_self_attn: bool = False, use_linear: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.context_dim = context_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)  # plain GroupNorm (no float32 upcast) in the original
        if use_linear:  # SD 2.x / SDXL
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:  # SD 1.x: 1x1 convs
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, disable_self_attn=disable_self_attn)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # x (B, C, H, W), context (B, T, Dc)
        h, w = x.shape[-2:]
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "B C H W -> B (H W) C")
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "B (H W) C -> B C H W", H=h, W=w)  # a channels-last strided view, no copy
        if not self.use_linear:
            x = self.proj_out(x)
        # x_in first: the sum takes x_in's contiguous NCHW layout; a channels-last activation reaching the next
        # 3x3 convs would make PyTorch reorder their (NCHW) weights on every call
        return x_in + x
