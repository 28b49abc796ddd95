"""The one vocabulary of model families: the name `detect` reports and `convert` takes, the zoo architecture that
builds it, and the module holding its official <-> diffusers key maps (imported on first use)."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from checkpoints_convert.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str  # what `detect` reports and `convert(family=...)` takes
    arch: str  # the zoo architecture (`arch:` of a config) that builds it
    keymap: tuple[str, str, str] | None = None  # (module, official -> diffusers, diffusers -> official)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("flux", "flux", ("checkpoints_convert.flux", "flux_to_diffusers", "flux_from_diffusers")),
    Family("unet", "unet", ("checkpoints_convert.unet", "unet_to_diffusers", "unet_from_diffusers")),
    Family("controlnet", "controlnet",
           ("checkpoints_convert.unet", "controlnet_to_diffusers", "controlnet_from_diffusers")),
    Family("t2i_adapter", "t2i_adapter",
           ("checkpoints_convert.unet", "t2i_adapter_to_diffusers", "t2i_adapter_from_diffusers")),
    Family("sana", "sana", ("checkpoints_convert.sana", "sana_to_diffusers", "sana_from_diffusers")),
    Family("autoencoder", "autoencoder_kl",
           ("checkpoints_convert.autoencoder", "autoencoder_to_diffusers", "autoencoder_from_diffusers")),
    Family("dc_ae", "dc_ae", ("checkpoints_convert.dc_ae", "dc_ae_to_diffusers", "dc_ae_from_diffusers")),
    Family("clip_text", "clip_text", ("checkpoints_convert.text", "clip_text_to_diffusers",
                                      "clip_text_from_diffusers")),
    Family("t5_encoder", "t5_encoder"),
    Family("gemma2", "gemma2"),
)}
FAMILY_OF_ARCH: dict[str, str] = {f.arch: f.name for f in FAMILIES.values()}


def arch_of(family: str) -> str | None:
    """The zoo architecture of a family name (None for what zoo does not build, e.g. 'lora')."""
    f = FAMILIES.get(family)
    return f.arch if f else None


def family_of(arch: str) -> str | None:
    """The family name of a zoo architecture (None for an arch with no detection signature)."""
    return FAMILY_OF_ARCH.get(arch)


def key_map(family: str, to: str) -> Callable:
    """The function converting `family`'s state dicts into layout `to` ('official' or 'diffusers')."""
    f = FAMILIES.get(family)
    if f is None or f.keymap is None:
        raise CheckpointError(f"no official <-> diffusers key map for family {family!r} yet; "
                              f"available: {sorted(n for n, f in FAMILIES.items() if f.keymap)}")
    module, to_d, from_d = f.keymap
    try:
        return getattr(importlib.import_module(module), to_d if to == "diffusers" else from_d)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"key map for {family!r} ({module}) is not available: {e}") from None
