"""Which parameters train: LoRA adapters, or the modules named by partial names; everything else is frozen."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

import lora


def _globs(patterns: Sequence[str]) -> list[str]:
    """A pattern without wildcards matches as a substring ("attn1" selects every `...attn1...` name), as in LBM."""
    return [p if any(c in p for c in "*?[") else f"*{p}*" for p in patterns]


def select_trainable(model: nn.Module, trainable: str | Sequence[str] | None = None) -> list[str]:
    """Freeze `model` except the chosen parameters and return their names, in `named_parameters` order.

    None: the LoRA adapters when the model has LoRA layers, else every parameter. A list of partial module names
    (`["attn1", "ff.net"]`, globs allowed): with LoRA layers, the adapters of the matching LoRA layers (LBM's
    `trainable_lora_modules`); without, every parameter of every module whose name matches.
    """
    has_lora = bool(lora.lora_layers(model))
    if isinstance(trainable, str):
        trainable = [trainable]
    if trainable is not None and (not trainable or not all(isinstance(p, str) and p for p in trainable)):
        raise ValueError(f"trainable must be None or a list of non-empty module-name patterns, got {trainable!r}")
    if has_lora:
        chosen = set(lora.trainable(model, "*" if trainable is None else list(trainable)))
    elif trainable is None:
        chosen = {n for n, _ in model.named_parameters()}
    else:
        globs = _globs(trainable)
        chosen = set()
        for name, module in model.named_modules():
            if name and any(fnmatch.fnmatchcase(name, g) for g in globs):
                chosen |= {f"{name}.{p}" for p, _ in module.named_parameters()}
        if not chosen:
            names = [n for n, _ in model.named_modules() if n][:8]
            raise ValueError(f"trainable={list(trainable)} matches no module; module names are e.g. {names}")
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
        if n in chosen:
            names.append(n)
    return names


def to_master_dtype(model: nn.Module, names: Sequence[str]) -> None:
    """Keep the trained parameters in fp32 (half-precision master weights lose small updates); frozen ones stay
    in their storage dtype."""
    params = dict(model.named_parameters())
    for n in names:
        p = params[n]
        if p.is_floating_point() and p.dtype != torch.float32 and p.dtype != torch.float64:
            p.data = p.data.float()
