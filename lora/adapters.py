"""A model's adapters to and from LoRA files: `load` a file (any known format) into an adapter, `save` one."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from checkpoints_convert.io import save_file
from lora.factor import Factor, fit
from lora.files import load_file, read, write
from lora.inject import inject, lora_layers, wrapped
from lora.lycoris import Lycoris
from lora.names import family_of_model


@dataclass
class LoadReport:
    """What `load` did: the format, the patched modules, and every key it could not place."""

    format: str
    adapter: str
    modules: list[str]
    unmatched: list[str]

    def __str__(self) -> str:
        s = f"{self.format} LoRA -> adapter {self.adapter!r} on {len(self.modules)} module(s)"
        return s + (f"; {len(self.unmatched)} key(s) matched no module: {self.unmatched[:10]}" if self.unmatched
                    else "")


def load(model: nn.Module, src: str | os.PathLike | dict[str, Tensor], *, adapter: str = "default",
         metadata: dict | None = None, strict: bool = False, multiplier: float = 1.0) -> LoadReport:
    """Read a LoRA (path or state dict, any known format) into adapter `adapter` of `model`.

    `multiplier`: the user's strength, on top of the file's alpha / rank. Keys that fit no module are listed
    in the report and warned about; `strict=True` makes them an error.
    """
    sd, file_meta = load_file(src) if isinstance(src, (str, os.PathLike)) else (src, {})
    factors, unmatched, fmt = read(sd, metadata or file_meta, model=model)
    if unmatched and strict:
        raise ValueError(f"{len(unmatched)} LoRA key(s) match no module of the model: {unmatched[:20]}")
    if not factors:
        raise ValueError(f"no key of this {fmt} LoRA matches a module of the model; unmatched: {unmatched[:10]}")
    mods = dict(model.named_modules())
    lyco = {n: f for n, f in factors.items() if isinstance(f, Lycoris)}
    taken = [n for n in lyco if adapter in getattr(mods[n], "adapters", ())]
    if taken:
        raise ValueError(f"adapter {adapter!r} already exists on {len(taken)} layer(s), e.g. {taken[:3]}")
    factors = {n: fit(n, f, mods[n].weight) for n, f in factors.items() if n not in lyco}
    groups: dict[tuple, list[str]] = {}
    for n, f in factors.items():
        groups.setdefault((f.down.shape[0], f.alpha), []).append(n)
    for (r, alpha), names in groups.items():
        inject(model, names, rank=r, alpha=alpha, conv_rank=r, conv_alpha=alpha, adapter=adapter, init="none",
               multiplier=multiplier)
    layers = lora_layers(model)
    for n, f in factors.items():
        layers[n].set_factors(adapter, f.down, f.up)
        if f.magnitude is not None:
            layers[n].set_magnitude(adapter, f.magnitude)
    for n, f in lyco.items():
        wrapped(model, n).add_lycoris(adapter, f, multiplier=multiplier)
    report = LoadReport(fmt, adapter, list(factors) + list(lyco), unmatched)
    if unmatched:
        warnings.warn(str(report), stacklevel=2)
    return report


def factors_of(model: nn.Module, adapter: str = "default") -> dict[str, Factor]:
    """Adapter `adapter` of `model` as {official module: Factor}."""
    out = {n: Factor(*m.factors(adapter), m.alpha[adapter],
                     m.lora_magnitude[adapter].detach() if adapter in m.lora_magnitude else None)
           for n, m in lora_layers(model).items() if adapter in m.adapters}
    if not out:
        raise ValueError(f"the model has no adapter {adapter!r}")
    return out


def save(model: nn.Module, path: str | os.PathLike, *, adapter: str = "default", format: str = "ours") -> Path:
    """Write adapter `adapter` of `model` to a .safetensors file in `format` (atomically)."""
    sd, meta = write(factors_of(model, adapter), format, family_of_model(model))
    return save_file(sd, path, meta)
