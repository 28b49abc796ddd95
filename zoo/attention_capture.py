"""Opt-in recording of attention probabilities (e.g. cross-attention maps for visualisation).

    with capture_attention(unet) as maps:       # {"input_blocks.1.1.transformer_blocks.0.attn2": [probs, ...]}
        unet(x, t, context=c)
    probs = maps["middle_block.1.transformer_blocks.0.attn2"][0]   # (B, heads, H*W, tokens), rows sum to 1

Outside the context the model runs on SDPA alone; inside, each recorded module also computes softmax(q k^T / sqrt(d))
beside it, so outputs are identical with capture on or off.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from layers import BasicTransformerBlock

KINDS = {"cross": ("attn2",), "self": ("attn1",), "both": ("attn1", "attn2")}


@contextmanager
def capture_attention(model: nn.Module, which: str = "cross") -> Iterator[dict[str, list[Tensor]]]:
    """Record every transformer block's attention probabilities (`which`: cross, self or both), one entry per call."""
    if which not in KINDS:
        raise ValueError(f"capture_attention(which={which!r}): expected one of {sorted(KINDS)}")
    maps: dict[str, list[Tensor]] = {}
    hooked = []
    for path, module in model.named_modules():
        if isinstance(module, BasicTransformerBlock):
            for name in KINDS[which]:
                attn = getattr(module, name)
                attn.capture = maps.setdefault(f"{path}.{name}", [])
                hooked.append(attn)
    if not hooked:
        raise ValueError(f"{type(model).__name__} has no SpatialTransformer blocks to capture attention from")
    try:
        yield maps
    finally:
        for attn in hooked:
            attn.capture = None


__all__ = ["capture_attention"]
