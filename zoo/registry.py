"""The model registry: architecture name -> (model class, config dataclass); configs from YAML, dicts or dataclasses."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import configs

CONFIG_DIR = Path(configs.__file__).parent
_ARCHS: dict[str, tuple[type[nn.Module], type]] = {}
_VARIANTS: dict[str, list[tuple[Callable[[Any], bool], type[nn.Module]]]] = {}


def register(arch: str, config_cls: type, *, when: Callable[[Any], bool] | None = None):
    """Class decorator: `@register("flux", FluxParams)` makes `arch: flux` configs build this model.

    With `when` (a predicate on the config) the class is a variant of the arch's model, built instead of it for the
    configs the predicate accepts: `@register("flux", FluxParams, when=lambda p: p.circular_pad > 0)` is DiT360.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config class for arch {arch!r} must be a dataclass, got {config_cls!r}")

    def wrap(model_cls: type[nn.Module]) -> type[nn.Module]:
        if when is not None:
            if arch not in _ARCHS or _ARCHS[arch][1] is not config_cls:
                raise ValueError(
                    f"variant {model_cls.__name__} needs arch {arch!r} registered first with {config_cls.__name__}"
                )
            if all(cls is not model_cls for _, cls in _VARIANTS.get(arch, [])):
                _VARIANTS.setdefault(arch, []).append((when, model_cls))
            model_cls.arch = arch
            return model_cls
        if arch in _ARCHS and _ARCHS[arch][0] is not model_cls:
            raise ValueError(f"arch {arch!r} is already registered to {_ARCHS[arch][0].__name__}")
        _ARCHS[arch] = (model_cls, config_cls)
        model_cls.arch = arch
        return model_cls

    return wrap


def list_archs() -> list[str]:
    """Registered architecture names."""
    return sorted(_ARCHS)


def list_models(arch: str | None = None) -> list[str]:
    """Names of the configs shipped in `configs/` (each builds with `zoo.build(name)`); of `arch` only, if given."""
    return sorted(n for n, a in config_index().items() if arch is None or a == arch)


def config_index() -> dict[str, str]:
    """Shipped config name -> its arch, each YAML read once (again only when its file changes)."""
    index = {}
    for path in CONFIG_DIR.glob("*.yaml"):
        stamp = (path, path.stat().st_mtime_ns)
        if stamp not in _INDEX:
            fields = yaml.safe_load(path.read_text())
            _INDEX[stamp] = fields.get("arch") if isinstance(fields, dict) else None
        index[path.stem] = _INDEX[stamp]
    return index


_INDEX: dict[tuple[Path, int], str | None] = {}


def _read_spec(spec: str | Path | dict) -> dict[str, Any]:
    """A config name, a YAML path or a dict -> a plain dict with an `arch` entry."""
    if isinstance(spec, dict):
        fields = dict(spec)
    else:
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml"):
            path = CONFIG_DIR / f"{spec}.yaml"
            if not path.is_file():
                near = difflib.get_close_matches(str(spec), list_models(), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(list_models())}"
                raise ValueError(f"unknown model config {str(spec)!r}{hint}")
        elif not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        fields = yaml.safe_load(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of fields, got {type(fields).__name__}")
    if "arch" not in fields:
        raise ValueError(f"config has no 'arch' field; expected one of {list_archs()}")
    return fields


def _arch_of(config: Any) -> str:
    for arch, (_, cls) in _ARCHS.items():
        if type(config) is cls:
            return arch
    raise ValueError(f"{type(config).__name__} is not a registered config class")


def make_config(arch: str, fields: dict[str, Any]) -> Any:
    """Fill `arch`'s config dataclass from `fields`: unknown or missing fields are errors; ignored ones dropped."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; registered: {list_archs()}")
    cls = _ARCHS[arch][1]
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    ignored = getattr(cls, "IGNORED_FIELDS", frozenset())
    unknown = [k for k in fields if k not in known and k not in ignored]
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for arch {arch!r} ({cls.__name__}); valid fields: {sorted(known)}"
        )
    missing = [
        n for n, f in known.items()
        if n not in fields and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required field(s) {missing} for arch {arch!r} ({cls.__name__})")
    return cls(**{k: v for k, v in fields.items() if k in known})


def model_class(config: Any) -> type[nn.Module]:
    """The class that `build` makes for a config: the arch's model, or the first registered variant accepting it."""
    arch = _arch_of(config)
    return next((cls for when, cls in _VARIANTS.get(arch, []) if when(config)), _ARCHS[arch][0])


def get_config(spec: str | Path | dict | Any, **overrides: Any) -> Any:
    """The config dataclass for a config name, YAML path, dict (with `arch`) or config instance, plus overrides."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        arch, fields = _arch_of(spec), dataclasses.asdict(spec)
    else:
        fields = _read_spec(spec)
        arch = fields.pop("arch")
    fields.update(overrides)
    return make_config(arch, fields)


def build(
    spec: str | Path | dict | Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a model from a config name / YAML path / dict / config; `device="meta"` builds with no memory."""
    config = get_config(spec, **overrides)
    model_cls = model_class(config)
    with torch.device(device or "cpu"):
        model = model_cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
