"""`convert(sd, to=...)`: official <-> diffusers for every family, lossless; dtype casts (fp8 included) for files.

A family plugs in with one row of `KEY_MAPS`: the module and its two functions (official -> diffusers and back).
Modules are imported on first use, so a family whose key map is missing or broken fails alone, with its name.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from checkpoints_convert.detect import DetectError, Detection, detect, detect_all
from checkpoints_convert.io import Checkpoint, CheckpointError

# family -> (module, official -> diffusers, diffusers -> official)
KEY_MAPS: dict[str, tuple[str, str, str]] = {
    "flux": ("checkpoints_convert.flux", "flux_to_diffusers", "flux_from_diffusers"),
    "unet": ("checkpoints_convert.unet", "unet_to_diffusers", "unet_from_diffusers"),
    "controlnet": ("checkpoints_convert.unet", "controlnet_to_diffusers", "controlnet_from_diffusers"),
    "t2i_adapter": ("checkpoints_convert.unet", "t2i_adapter_to_diffusers", "t2i_adapter_from_diffusers"),
    "sana": ("checkpoints_convert.sana", "sana_to_diffusers", "sana_from_diffusers"),
    "autoencoder": ("checkpoints_convert.autoencoder", "autoencoder_to_diffusers", "autoencoder_from_diffusers"),
    "dc_ae": ("checkpoints_convert.dc_ae", "dc_ae_to_diffusers", "dc_ae_from_diffusers"),
}
LAYOUTS = ("official", "diffusers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def key_map(family: str, to: str) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """The function converting `family`'s state dicts into layout `to`."""
    if family not in KEY_MAPS:
        raise CheckpointError(f"no official <-> diffusers key map for family {family!r} yet; "
                              f"available: {sorted(KEY_MAPS)}")
    module, to_d, from_d = KEY_MAPS[family]
    try:
        return getattr(importlib.import_module(module), to_d if to == "diffusers" else from_d)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"key map for {family!r} ({module}) is not available: {e}") from None


def select(sd: Mapping[str, Tensor], family: str | None = None) -> tuple[Detection, dict[str, Tensor]]:
    """Detect the model (of `family`, if given) and return it with its wrapper prefix stripped."""
    det = detect(sd)
    if family is not None and det.family != family:
        found = [d for d in detect_all(sd) if d.family == family]
        if not found:
            raise DetectError(f"asked for family {family!r} but this state dict holds {det}")
        det = found[0]
    p = det.prefix
    # with no prefix, keys of the other models in the file (e.g. `first_stage_model.`) stay out
    others = tuple(det.components) if not p else ()
    sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and not (others and k.startswith(others))}
    return det, sub


def convert(sd: Mapping[str, Tensor], to: str, family: str | None = None, *,
            dtype: str | torch.dtype | None = None) -> Checkpoint:
    """State dict (any layout, prefixed or not) -> layout `to` ('official' or 'diffusers'); bit-exact unless `dtype`."""
    if to not in LAYOUTS:
        raise ValueError(f"convert: to={to!r}; expected one of {LAYOUTS}")
    det, sub = select(sd, family)
    if det.family == "lora":
        raise CheckpointError(f"this is a LoRA ({det.layout}, {det.note}): convert LoRA files with "
                              "`python -m lora convert`")
    out = sub if det.layout == to else key_map(det.family, to)(sub)
    if dtype is not None:
        out = cast(out, dtype)
    return Checkpoint(out, paths=getattr(sd, "paths", ()),
                      metadata={"zoo_family": det.family, "zoo_layout": to, **({"zoo_config": det.config}
                                                                                if det.config else {})})


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32'/'bf16'/'fp16'/'fp8' (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def cast_tensor(t: Tensor, dtype: str | torch.dtype) -> Tensor:
    """One tensor of `cast`: floating only; fp8 (e4m3fn) only for matmul/conv weights (ndim >= 2), the rest to
    bf16, as the fp8 Flux files people share. Casting to fp8 saturates at +-448 (e4m3fn has no inf)."""
    dtype = parse_dtype(dtype)
    if not t.is_floating_point():
        return t
    return t.to(torch.bfloat16 if dtype.itemsize == 1 and t.ndim < 2 else dtype)


def cast(sd: Mapping[str, Tensor], dtype: str | torch.dtype) -> dict[str, Tensor]:
    """Every tensor through `cast_tensor` (all at once; `save_file(transform=...)` casts one at a time)."""
    dtype = parse_dtype(dtype)
    return {k: cast_tensor(t, dtype) for k, t in sd.items()}
