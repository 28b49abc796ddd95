"""`convert(sd, to=...)`: official <-> diffusers for every family, lossless; dtype casts (fp8 included) for files.

A family plugs in with one row of `families.FAMILIES`: its arch, the module and its two functions (official ->
diffusers and back). Modules are imported on first use, so a family whose key map is missing or broken fails alone.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor

from checkpoints_convert.clip import transformers_to_openclip
from checkpoints_convert.detect import DetectError, Detection, detect, detect_all
from checkpoints_convert.errors import CheckpointError
from checkpoints_convert.families import FAMILIES, key_map
from checkpoints_convert.io import Checkpoint

# family -> (module, official -> diffusers, diffusers -> official)
KEY_MAPS: dict[str, tuple[str, str, str]] = {f.name: f.keymap for f in FAMILIES.values() if f.keymap}
LAYOUTS = ("official", "diffusers", "openclip")  # openclip: the CLIP text tower inside SD2.x / SDXL files only
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def select(sd: Mapping[str, Tensor], family: str | None = None,
           det: Detection | None = None) -> tuple[Detection, dict[str, Tensor]]:
    """The model (of `family`, if given) with its wrapper prefix stripped; `det`: `detect(sd)` if already run."""
    if family is not None and family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; known families: {', '.join(sorted(FAMILIES))}")
    det = detect(sd) if det is None else det
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
    """State dict (any layout, prefixed or not) -> layout `to` ('official' or 'diffusers'; 'openclip' for a CLIP text
    tower); bit-exact unless `dtype`."""
    if to not in LAYOUTS:
        raise ValueError(f"convert: to={to!r}; expected one of {LAYOUTS}")
    det, sub = select(sd, family)
    if det.quant:
        raise CheckpointError(f"this file is {det.quant}-quantised ({det.family}, {det.layout} layout): converting "
                              "packed weights is not supported; convert the unquantised file, or dequantise with "
                              "bitsandbytes first")
    if det.family == "lora":
        raise CheckpointError(f"this is a LoRA ({det.layout}, {det.note}): convert LoRA files with "
                              "`python -m lora convert`")
    if to == "openclip":
        if det.family != "clip_text":
            raise CheckpointError(f"to='openclip' is the layout of a CLIP text tower (as inside SD2.x / SDXL "
                                  f"checkpoints); this state dict holds {det}")
        out = sub if det.layout == "openclip" else transformers_to_openclip(
            sub if det.layout == "official" else key_map(det.family, "official")(sub))
    else:
        out = sub if det.layout == to else key_map(det.family, to)(sub)
    if dtype is not None:
        out = cast(out, dtype)
    meta = {"zoo_family": det.family, "zoo_layout": to, **({"zoo_config": det.config} if det.config else {})}
    if det.hints:  # what no shape tells, read from config.json: kept in the file so a later load knows it too
        meta["zoo_fields"] = json.dumps(det.hints)
    return Checkpoint(out, paths=getattr(sd, "paths", ()), metadata=meta)


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
