"""DC-AE configs: the official efficientvit `DCAEConfig` / `EncoderConfig` / `DecoderConfig` fields, checked once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

BLOCKS = ("ResBlock", "EViT_GLU", "EViTS5_GLU")  # EViTS5: the attention also sees a 5x5-aggregated q/k/v
NORMS = ("trms2d", "rms2d", "bn2d")
ACTS = {"silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6}


@dataclass
class EncoderConfig:
    """The official `EncoderConfig` (in/latent channels default to the autoencoder's, as its `${..}` links do)."""

    in_channels: int | None = None
    latent_channels: int | None = None
    width_list: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    depth_list: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2, 2])
    block_type: Any = "ResBlock"  # one name or one per stage
    norm: str = "trms2d"
    act: str = "silu"
    downsample_block_type: str = "ConvPixelUnshuffle"  # or "Conv" (a stride-2 conv, the Sana release)
    downsample_match_channel: bool = True
    downsample_shortcut: str | None = "averaging"
    out_norm: str | None = None
    out_act: str | None = None
    out_shortcut: str | None = "averaging"
    double_latent: bool = False
    temporal_downsample: list = field(default_factory=list)


@dataclass
class DecoderConfig:
    """The official `DecoderConfig`; `norm`/`act`/`block_type` may be one value or one per stage."""

    in_channels: int | None = None
    latent_channels: int | None = None
    in_shortcut: str | None = "duplicating"
    width_list: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    depth_list: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2, 2])
    block_type: Any = "ResBlock"
    norm: Any = "trms2d"
    act: Any = "silu"
    upsample_block_type: str = "ConvPixelShuffle"  # or "InterpolateConv" (nearest x2 then conv, the Sana release)
    upsample_match_channel: bool = True
    upsample_shortcut: str | None = "duplicating"
    out_norm: str = "trms2d"
    out_act: str = "relu"
    temporal_upsample: list = field(default_factory=list)


@dataclass
class DCAEConfig:
    """The official `DCAEConfig` plus `scaling_factor` (the released models' latent scale)."""

    in_channels: int = 3
    latent_channels: int = 32
    encoder: EncoderConfig | dict = field(default_factory=EncoderConfig)
    decoder: DecoderConfig | dict = field(default_factory=DecoderConfig)
    use_quant_conv: bool = False
    scaling_factor: float = 1.0
    IGNORED_FIELDS: ClassVar[frozenset] = frozenset({"pretrained_path", "pretrained_source", "cache_dir"})

    def __post_init__(self):
        for name, cls in (("encoder", EncoderConfig), ("decoder", DecoderConfig)):
            sub = getattr(self, name)
            if isinstance(sub, dict):
                known = {f.name for f in dataclasses.fields(cls)}
                unknown = sorted(set(sub) - known)
                if unknown:
                    raise ValueError(f"DCAEConfig.{name}: unknown field(s) {unknown}; valid: {sorted(known)}")
                sub = cls(**sub)
            for link in ("in_channels", "latent_channels"):
                if getattr(sub, link) in (None, f"${{..{link}}}"):
                    setattr(sub, link, getattr(self, link))
                elif getattr(sub, link) != getattr(self, link):
                    raise ValueError(f"DCAEConfig.{name}.{link}={getattr(sub, link)} differs from {link}="
                                     f"{getattr(self, link)}")
            setattr(self, name, sub)
            _check_side(name, sub)
        if self.use_quant_conv:
            raise ValueError("DCAEConfig.use_quant_conv=True is not supported (no released DC-AE uses it)")
        if self.encoder.double_latent:
            raise ValueError("DCAEConfig.encoder.double_latent=True is not supported (no released DC-AE uses it)")
        if self.scaling_factor == 0:
            raise ValueError("DCAEConfig.scaling_factor must be non-zero")


def per_stage(value: Any, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"DCAEConfig {what}: {len(values)} entries for {n} stages")
    return values


def _check_side(name: str, c: EncoderConfig | DecoderConfig) -> None:
    n = len(c.width_list)
    if n < 2 or len(c.depth_list) != n or min(c.width_list) < 1 or min(c.depth_list) < 0:
        raise ValueError(f"DCAEConfig.{name}: width_list {c.width_list} and depth_list {c.depth_list} must have the "
                         "same length >= 2, positive widths and non-negative depths")
    if c.depth_list[0] == 0 and c.depth_list[1] == 0:
        raise ValueError(f"DCAEConfig.{name}.depth_list: the first two stages cannot both be empty")
    for what, values, ok in (("block_type", c.block_type, BLOCKS), ("norm", c.norm, NORMS), ("act", c.act, ACTS)):
        bad = sorted({v for v in per_stage(values, n, f"{name}.{what}") if v not in ok}, key=str)
        if bad:
            raise ValueError(f"DCAEConfig.{name}.{what}: {bad} not supported; expected one of {list(ok)}")
    for i, (b, a) in enumerate(zip(per_stage(c.block_type, n, ""), per_stage(c.act, n, ""))):
        if b != "ResBlock" and a != "silu" and c.depth_list[i]:
            raise ValueError(f"DCAEConfig.{name}: stage {i} {b} needs act 'silu' (GLUMBConv's gate), got {a!r}")
    side = {"encoder": ("downsample_block_type", ("Conv", "ConvPixelUnshuffle"), "downsample_shortcut", "averaging"),
            "decoder": ("upsample_block_type", ("InterpolateConv", "ConvPixelShuffle"), "upsample_shortcut",
                        "duplicating")}[name]
    if getattr(c, side[0]) not in side[1]:
        raise ValueError(f"DCAEConfig.{name}.{side[0]}={getattr(c, side[0])!r}; expected one of {side[1]}")
    if getattr(c, side[2]) not in (None, side[3]):
        raise ValueError(f"DCAEConfig.{name}.{side[2]}={getattr(c, side[2])!r}; expected {side[3]!r} or null")
    if (c.temporal_downsample if name == "encoder" else c.temporal_upsample):
        raise ValueError(f"DCAEConfig.{name}: temporal (video) resampling is not supported")
    if name == "encoder" and (c.out_norm or c.out_act or c.out_shortcut not in (None, "averaging")):
        raise ValueError("DCAEConfig.encoder: out_norm/out_act must be null and out_shortcut 'averaging' or null")
    if name == "decoder" and (c.out_norm not in NORMS or c.out_act not in ACTS or
                              c.in_shortcut not in (None, "duplicating")):
        raise ValueError(f"DCAEConfig.decoder: out_norm must be one of {NORMS}, out_act one of {list(ACTS)}, "
                         "in_shortcut 'duplicating' or null")
    if not (c.downsample_match_channel if name == "encoder" else c.upsample_match_channel):
        raise ValueError(f"DCAEConfig.{name}: *_match_channel=false is not supported (every release matches)")


__all__ = ["DCAEConfig", "EncoderConfig", "DecoderConfig", "per_stage", "ACTS", "BLOCKS", "NORMS"]
