"""The zoo's one attention function: optional RoPE, then `F.scaled_dot_product_attention`."""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from layers.rope import apply_rope


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention on (B, H, L, D) heads, returned merged as (B, L, H*D).

    `pe` are RoPE rotations from `layers.rope.EmbedND` (applied to q and k, as Flux does);
    `mask` is anything SDPA accepts: a bool keep-mask or an additive float bias, broadcastable to (B, H, Lq, Lk).
    """
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D)
    return rearrange(x, "B H L D -> B L (H D)")


def key_padding_mask(keep: Tensor) -> Tensor:
    """(B, Lk) bool/0-1 keep-mask -> (B, 1, 1, Lk) bool mask for `attention`."""
    return keep.bool()[:, None, None, :]
