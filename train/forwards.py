"""`forward(model, x_t, t, cond)` adapters for families whose forward is not `model(x_t, t, **cond)`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zoo import flux


def flux_forward(model: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
    """Flux on (B, C, H, W) latents: pack 2x2 patches, build the position ids, unpack the predicted velocity.

    `cond`: `txt` (B, L, context_in_dim) T5 states, `y` (B, vec_in_dim) pooled CLIP, optional `guidance` (B,)
    for guidance-distilled models (default 1.0). t is the flow time in [0, 1]; Flux scales it by 1000 inside.
    """
    B, _, H, W = x_t.shape  # (B, C, H, W)
    txt = cond["txt"]
    guidance = cond.get("guidance")
    if guidance is None:
        guidance = torch.ones(B, device=x_t.device, dtype=x_t.dtype)
    out = model(flux.pack(x_t), flux.img_ids(B, H, W, x_t.device, x_t.dtype), txt,
                 flux.txt_ids(B, txt.shape[1], x_t.device, x_t.dtype), t, cond["y"], guidance=guidance)
    return flux.unpack(out, H, W)  # (B, C, H, W)
