"""The zoo's one attention function: optional RoPE, then `F.scaled_dot_product_attention`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from layers.rope import apply_rope


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pe: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Multi-head attention on (B, H, L, D) heads, returned merged as (B, L, H*D).

    `pe` are RoPE rotations from `layers.rope.EmbedND` (applied to q and k, as Flux does);
    `mask` is anything SDPA accepts: a bool keep-mask or an additive float bias, broadcastable to (B, H, Lq, Lk).
    `scale` replaces 1/sqrt(D) (T5: 1.0); k/v with fewer heads than q are shared by groups of query heads (GQA).
    `softcap`: logits -> softcap * tanh(logits / softcap) before the mask (Gemma-2); SDPA has no such hook, so
    that path computes the softmax itself, in float32 as the reference does.
    """
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each k/v head serves H_q / H_kv query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if softcap is None:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, L, D)
    else:
        logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, Lq, Lk)
        logits = softcap * torch.tanh(logits / softcap)
        if mask is not None and mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        elif mask is not None:
            logits = logits + mask
        x = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return rearrange(x, "B H L D -> B L (H D)")


def key_padding_mask(keep: Tensor) -> Tensor:
    """(B, Lk) bool/0-1 keep-mask -> (B, 1, 1, Lk) bool mask for `attention`."""
    return keep.bool()[:, None, None, :]
