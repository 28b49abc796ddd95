"""Key maps between a model's official layout and diffusers': renames, fused <-> split tensors, swapped halves.

A `KeyMap` is a list of `Entry`s, each naming one official module and the diffusers module(s) it becomes.
Both directions are derived from the same list, so official -> diffusers -> official is bit-exact by
construction (only views, `torch.cat` and `torch.split` touch the tensors). Family files (`flux.py`,
`unet.py`, ...) build their lists; `lora.formats` reuses them to place LoRA factors on fused modules.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PARAMS = ("weight", "bias", "scale")
# wrapper prefixes people save models under (LDM/SGM, ComfyUI, PEFT, DDP, torch.compile, diffusers pipelines)
WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "model.", "module.",
                    "_orig_mod.", "net.", "control_model.", "first_stage_model.", "vae.", "transformer.", "unet.",
                    "controlnet.")


class KeyMapError(ValueError):
    """A state dict that does not fit the key map: the message lists the offending keys."""


@dataclass(frozen=True)
class Entry:
    """One official module -> one or more diffusers modules.

    `split`: the official tensor is the diffusers parts stacked along dim 0; `sizes(rows)` gives the part sizes
    (default: equal). `swap`: the official tensor's two halves come in the other order in diffusers.
    `param_names`: official param name -> diffusers param name where they differ (RMSNorm `scale` -> `weight`).
    `conv1x1`: the official weight is a 1x1 conv's (O, I, 1, 1), diffusers' a Linear's (O, I) (VAE attention).
    """

    official: str
    diffusers: tuple[str, ...]
    sizes: Callable[[int], list[int]] | None = None
    swap: bool = False
    optional: bool = False
    param_names: tuple[tuple[str, str], ...] = ()
    conv1x1: bool = False

    def dparam(self, p: str) -> str:
        return dict(self.param_names).get(p, p)

    def part_sizes(self, rows: int) -> list[int]:
        """Rows of each diffusers part of a fused official tensor with `rows` rows (default: equal parts)."""
        n = len(self.diffusers)
        if self.sizes is not None:
            return self.sizes(rows)
        if rows % n:
            raise KeyMapError(f"{self.official}: {rows} rows cannot be split into {n} equal parts {self.diffusers}")
        return [rows // n] * n


def swap_halves(t: Tensor) -> Tensor:
    """The two halves of dim 0 in the other order (official (shift, scale) <-> diffusers (scale, shift))."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _conv1x1(entry: Entry, key: str, t: Tensor, to_linear: bool) -> Tensor:
    """View a 1x1 conv weight (O, I, 1, 1) as a Linear weight (O, I), or back."""
    if to_linear and t.ndim == 4 and t.shape[2:] == (1, 1):
        return t[:, :, 0, 0]
    if not to_linear and t.ndim == 2:
        return t[:, :, None, None]
    want = "(O, I, 1, 1)" if to_linear else "(O, I)"
    raise KeyMapError(f"{key}: shape {tuple(t.shape)} is not the expected {want} of entry {entry.official}")


def _check_consumed(sd: dict, used: set, direction: str) -> None:
    left = sorted(k for k in sd if k not in used)
    if left:
        more = f" (and {len(left) - 20} more)" if len(left) > 20 else ""
        raise KeyMapError(f"{direction}: {len(left)} key(s) match no entry of the key map: {left[:20]}{more}")


def to_diffusers(entries: list[Entry], sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official-layout state dict -> diffusers layout; every key must be consumed and every required entry present."""
    out, used, missing = {}, set(), []
    for e in entries:
        found = [p for p in PARAMS if f"{e.official}.{p}" in sd]
        if not e.optional and "weight" not in found and "scale" not in found:
            missing.append(f"{e.official}.{'scale' if e.param_names else 'weight'}")
        for p in found:
            key = f"{e.official}.{p}"
            t, used = sd[key], used | {key}
            if e.swap:
                t = swap_halves(t)
            if e.conv1x1 and p == "weight":
                t = _conv1x1(e, key, t, to_linear=True)
            parts = torch.split(t, e.part_sizes(t.shape[0]), dim=0) if len(e.diffusers) > 1 else (t,)
            for name, part in zip(e.diffusers, parts):
                out[f"{name}.{e.dparam(p)}"] = part
    if missing:
        raise KeyMapError(f"official -> diffusers: missing {len(missing)} key(s): {missing[:20]}")
    _check_consumed(sd, used, "official -> diffusers")
    return out


def to_official(entries: list[Entry], sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers-layout state dict -> official layout (the inverse of `to_diffusers`)."""
    out, used, missing = {}, set(), []
    for e in entries:
        back = {d: o for o, d in e.param_names}
        for dp in ("weight", "bias"):
            p = back.get(dp, dp)
            keys = [f"{name}.{dp}" for name in e.diffusers]
            present = [k in sd for k in keys]
            if not any(present):
                continue
            if not all(present):
                missing += [k for k, ok in zip(keys, present) if not ok]
                continue
            used |= set(keys)
            t = torch.cat([sd[k] for k in keys], dim=0) if len(keys) > 1 else sd[keys[0]]
            if e.conv1x1 and dp == "weight":
                t = _conv1x1(e, keys[0], t, to_linear=False)
            out[f"{e.official}.{p}"] = swap_halves(t) if e.swap else t
        if not e.optional and f"{e.official}.weight" not in out and f"{e.official}.scale" not in out:
            missing.append(f"{e.diffusers[0]}.weight")
    if missing:
        raise KeyMapError(f"diffusers -> official: missing {len(missing)} key(s): {missing[:20]}")
    _check_consumed(sd, used, "diffusers -> official")
    return out


def block_count(keys, prefix: str) -> int:
    """Number of numbered blocks `prefix.N.` among `keys` (max N + 1; 0 if none)."""
    idx = [int(k[len(prefix) + 1 :].split(".", 1)[0]) for k in keys if k.startswith(prefix + ".")]
    return max(idx) + 1 if idx else 0
