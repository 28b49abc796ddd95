"""Put LoRA adapters on any `nn.Module` by glob patterns over module names, switch, merge, remove them."""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lora.layer import LoRALayer, wrap
from lora.presets import PRESETS


def list_targets(model: nn.Module) -> list[str]:
    """Every module name a LoRA could go on (linears and convs, wrapped or not; not the adapters' own)."""
    out, inside = [], ()
    for n, m in model.named_modules():
        if inside and n.startswith(inside):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d, LoRALayer)) and n:
            out.append(n)
            inside = (n + ".",) if isinstance(m, LoRALayer) else inside
    return out


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _near(pattern: str, names: Sequence[str], n: int = 8) -> list[str]:
    last = pattern.rsplit(".", 1)[-1].replace("*", "")
    close = difflib.get_close_matches(pattern, names, n=n, cutoff=0.5)
    same_leaf = [x for x in names if last and x.rsplit(".", 1)[-1] == last and x not in close]
    return (close + same_leaf)[:n]


def _as_patterns(targets: str | Iterable[str]) -> tuple[list[str], bool]:
    """Patterns of `targets` and whether they came from a preset."""
    if isinstance(targets, str):
        if targets in PRESETS:
            return list(PRESETS[targets]), True
        return [targets], False
    pats = list(targets)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise ValueError(f"targets must be a preset name, a pattern or a list of patterns, got {targets!r}")
    return pats, False


def match(names: Sequence[str], targets: str | Iterable[str]) -> list[str]:
    """The names matching `targets` (a preset, a glob, or a list of globs); a glob matching nothing is an error."""
    patterns, preset = _as_patterns(targets)
    hits, empty, exact = [], [], set(names)
    for p in patterns:
        found = ([p] if p in exact else []) if not any(c in p for c in "*?[") else [
            n for n in names if fnmatch.fnmatchcase(n, p)]
        if not found:
            empty.append(p)
        hits += found
    if empty and not (preset and hits):  # a preset covers several families: only all-empty is an error
        near = {p: _near(p, names) for p in empty}
        what = f"preset {targets!r}" if preset else "pattern(s)"
        if isinstance(targets, str) and not preset and not any(c in targets for c in "*?[."):
            what = f"target {targets!r} is no preset ({sorted(PRESETS)}) and as a pattern it"
        raise ValueError(f"LoRA {what} matched no linear/conv module: " +
                         "; ".join(f"{p!r} (near: {near[p] or 'nothing close'})" for p in empty))
    hit = set(hits)
    return [n for n in names if n in hit]  # model order, no duplicates


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def wrapped(model: nn.Module, name: str) -> LoRALayer:
    """The LoRA wrapper of module `name` of `model`, put in its place if the module is not wrapped yet."""
    module = model.get_submodule(name)
    layer = wrap(module)
    if layer is not module:
        _set(model, name, layer)
    return layer


def inject(model: nn.Module, targets: str | Iterable[str], *, rank: int, alpha: float | None = None,
           adapter: str = "default", init: str = "zeros", conv_rank: int | None = None,
           conv_alpha: float | None = None, multiplier: float = 1.0, dtype: torch.dtype | None = None) -> list[str]:
    """Add adapter `adapter` to every linear/conv matching `targets`; returns the patched names.

    `alpha` defaults to the rank (alpha / rank 1); `multiplier` is the user's strength on top. k x k convs get
    `conv_rank` and `conv_alpha` (default `rank`, `alpha`, or the conv rank when neither alpha is given); adapters
    are stored in the base's dtype (bf16 for an fp8 base) unless `dtype` is given, and compute in it whatever the
    input's dtype.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if conv_rank is not None and (not isinstance(conv_rank, int) or conv_rank <= 0):
        raise ValueError(f"LoRA conv_rank must be a positive integer, got {conv_rank!r}")
    names = match(list_targets(model), targets)
    modules = dict(model.named_modules())
    taken = [n for n in names if isinstance(modules[n], LoRALayer) and adapter in modules[n].adapters]
    if taken:
        raise ValueError(f"adapter {adapter!r} already exists on {len(taken)} layer(s), e.g. {taken[:3]}")
    for n in names:
        layer = wrap(modules[n])
        is_conv = isinstance(layer.base, nn.Conv2d) and layer.base.kernel_size != (1, 1)
        r, a = ((conv_rank or rank), (alpha if conv_alpha is None else conv_alpha)) if is_conv else (rank, alpha)
        layer.add_adapter(adapter, r, a, multiplier=multiplier, init=init, dtype=dtype)
        if layer is not modules[n]:
            _set(model, n, layer)
    return names


def _weights(names: str | Sequence[str] | None, weights) -> dict[str, float]:
    if names is None:
        return {}
    names = [names] if isinstance(names, str) else list(names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter(s) {names} but {len(weights)} weight(s) {list(weights)}")
    return dict(zip(names, map(float, weights)))


def set_adapter(model: nn.Module, names: str | Sequence[str] | None, weights=None) -> None:
    """Activate one adapter, several with `weights` (each adapter's weight at inference), or none (`None`)."""
    active = _weights(names, weights)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layers; call lora.inject first")
    known = set().union(*(layer.adapters for layer in layers.values()))
    unknown = [n for n in active if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")
    for layer in layers.values():
        layer.set_active({n: w for n, w in active.items() if n in layer.adapters})


@contextmanager
def adapters_per_item(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch item i of every LoRA layer's input runs with adapter `names[i]` alone (weight 1;
    None or an adapter a layer lacks: that layer's base alone), all items in one forward, as peft's mixed-adapter
    batches and OmniX's cross-LoRA. Inputs must have len(names) items; on exit every layer runs `set_adapter`'s
    active adapters for all items again."""
    names = list(names)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layers; call lora.inject first")
    known = set().union(*(layer.adapters for layer in layers.values()))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")
    try:
        for layer in layers.values():
            layer.set_per_item([n if n in layer.adapters else None for n in names])
        yield model
    finally:
        for layer in layers.values():
            layer.set_per_item(None)


def merge(model: nn.Module) -> list[str]:
    """Fold the active adapters into the base weights (forward cost of the base alone)."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return list(layers)


def unmerge(model: nn.Module) -> None:
    """Restore the base weights bit-exactly."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove(model: nn.Module, adapter: str | None = None, *, merge: bool = False) -> list[str]:
    """Delete `adapter` (or all); a layer left without adapters becomes its original module again.

    `merge=True` bakes the active adapters into the base first (the LoRA becomes permanent).
    """
    restored = []
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge(permanent=True)
        else:
            layer.unmerge()
        for a in [adapter] if adapter else layer.adapters:
            if a in layer.adapters:
                layer.delete_adapter(a)
        if not layer.adapters:
            base = layer.base
            base.weight, base.bias = layer.weight, layer.bias  # the wrapper's may have been reassigned on load
            _set(model, name, base)
            restored.append(name)
    return restored


def trainable(model: nn.Module, patterns: str | Iterable[str] = "*", adapter: str | None = None) -> list[str]:
    """Freeze everything except the LoRA parameters of modules whose name matches `patterns`.

    A pattern without wildcards matches as a substring ("attn1" selects every `...attn1...` module).
    Returns the names of the parameters left trainable.
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    globs = [p if any(c in p for c in "*?[") else f"*{p}*" for p in pats]
    layers = lora_layers(model)
    chosen = {n for n in layers if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    if not chosen:
        raise ValueError(f"trainable: {pats} match no LoRA layer; LoRA layers are e.g. {list(layers)[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for n in sorted(chosen):
        layer = layers[n]
        for a in [adapter] if adapter else layer.adapters:
            if a not in layer.adapters:
                continue
            for key, param in layer.adapter_parameters(a).items():
                param.requires_grad_(True)
                out.append(f"{n}.{key}")
    if not out:
        raise ValueError(f"trainable: adapter {adapter!r} is not on the selected layers")
    return out
