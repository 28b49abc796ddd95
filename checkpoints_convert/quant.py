"""Quantised state dicts named plainly: bitsandbytes nf4/fp4 (packed uint8 weights with `.absmax`, `.quant_map`,
`.quant_state.bitsandbytes__nf4` companions) and LLM.int8 (int8 weights with `.SCB` scales).

zoo does not dequantise bitsandbytes files; `detect` still names the model under the packing (the packed weights
replaced by `meta` tensors of their true shape where the quant state tells it) and the quantisation with it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor

BNB_STATES = {".quant_state.bitsandbytes__nf4": "nf4", ".quant_state.bitsandbytes__fp4": "fp4"}
BNB_COMPANIONS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", *BNB_STATES)
INT8_SCALES = (".SCB", ".weight_format")


def bnb_kind(sd: Mapping[str, Tensor]) -> tuple[str, list[str]] | None:
    """('bitsandbytes nf4' | 'bitsandbytes fp4' | 'bitsandbytes int8', the quantised weight keys) or None."""
    for suffix, kind in BNB_STATES.items():
        weights = [k[: -len(suffix)] for k in sd if k.endswith(suffix)]
        if weights:
            return f"bitsandbytes {kind}", weights
    scaled = [k[: -len(".SCB")] + ".weight" for k in sd if k.endswith(".SCB")]
    return ("bitsandbytes int8", scaled) if scaled else None


def _true_shape(sd: Mapping[str, Tensor], weight: str) -> tuple[int, ...] | None:
    """The unpacked shape from the JSON quant state bitsandbytes stores as a uint8 tensor (None on meta)."""
    state = next((sd[weight + s] for s in BNB_STATES if weight + s in sd), None)
    if state is None or state.is_meta:
        return None
    try:
        shape = json.loads(bytes(state.reshape(-1).tolist()).decode("utf-8")).get("shape")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return tuple(shape) if isinstance(shape, list) else None


def unpacked_view(sd: Mapping[str, Tensor], weights: list[str]) -> dict[str, Tensor]:
    """The state dict without quantisation companions, packed weights as `meta` tensors of their true shape."""
    drop = tuple(BNB_COMPANIONS) + INT8_SCALES
    out = {k: v for k, v in sd.items() if not k.endswith(drop)}
    for w in weights:
        shape = _true_shape(sd, w)
        if shape is not None and w in out:
            out[w] = torch.empty(shape, device="meta")
    return out
