"""The one vocabulary of model families: the name `detect` reports and `convert` takes, the zoo architecture that
builds it, and the module holding its official <-> diffusers key maps (imported on first use)."""
from __future__ import annotations

from dataclasses import dataclass


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
)}
FAMILY_OF_ARCH: dict[str, str] = {f.arch: f.name for f in FAMILIES.values()}


def arch_of(family: str) -> str | None:
    """The zoo architecture of a family name (None for what zoo does not build, e.g. 'lora')."""
    f = FAMILIES.get(family)
    return f.arch if f else None


def family_of(arch: str) -> str | None:
    """The family name of a zoo architecture (None for an arch with no detection signature)."""
    return FAMILY_OF_ARCH.get(arch)
