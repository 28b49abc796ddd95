"""The LoRA files people exchange, read into and written from one canonical form on official module names.

Canonical ("ours"): `{official module}.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`; ComfyUI's is the same
with a `diffusion_model.` prefix. kohya (sd-scripts): `lora_unet_{module with _}.lora_down.weight` / `.lora_up.weight`
/ `.alpha`. diffusers/PEFT: `{transformer|unet}.{diffusers module}.lora_A.weight` / `.lora_B.weight`, alphas in the
`lora_adapter_metadata` JSON (or `.alpha` keys). XLabs (x-flux): `double_blocks.N.processor.qkv_lora1.down.weight`...
Diffusers modules that are parts of one fused official module (q/k/v -> `qkv`; q/k/v/mlp -> Flux `linear1`) are
joined by stacking the A's and placing each B in its own block, so B A is exactly the parts' products.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from checkpoints_convert.flux import flux_entries, flux_widths
from checkpoints_convert.io import load_file as read_checkpoint
from checkpoints_convert.io import save_file
from checkpoints_convert.keymap import WRAPPER_PREFIXES, Entry, swap_halves
from checkpoints_convert.unet import (
    diffusers_label,
    diffusers_structure,
    official_label,
    official_structure,
    unet_entries,
)
from lora.inject import inject, list_targets, lora_layers

FORMATS = ("ours", "comfy", "kohya", "diffusers", "xlabs")
_UNET_DIFFUSERS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
                   "add_embedding.", "class_embedding")
LABEL = "add_embedding"  # where diffusers puts SDXL's `label_emb` (text_time)
_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
          ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha"}
_KOHYA = re.compile(r"^lora_(unet|transformer|te\d?)_")
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)\.(down|up)"
                    r"\.weight$")


class Factor(NamedTuple):
    """One module's LoRA: delta W = (alpha / rank) * up @ down, alpha None meaning alpha = rank."""

    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


@dataclass
class Family:
    """How a model's official module names relate to diffusers': the key map entries and their row counts."""

    name: str = "generic"
    entries: list[Entry] = field(default_factory=list)
    prefix: str = ""  # diffusers' component name in pipeline files
    rows: dict[str, int] = field(default_factory=dict)  # official fused module -> out rows

    def __post_init__(self):
        self.part = {d: (e, i) for e in self.entries for i, d in enumerate(e.diffusers)}
        self.official = {e.official: e for e in self.entries}

    def sizes(self, e: Entry) -> list[int]:
        return e.part_sizes(self.rows[e.official])


def flux_family(names: list[str], hidden: int, mlp_hidden: int | None = None) -> Family:
    """The Flux map for the blocks named in `names` (official or diffusers) at width `hidden`."""
    count = lambda pat: max([int(m.group(1)) + 1 for n in names if (m := re.search(pat, n))], default=0)
    depth = max(count(r"(?:^|[._])double_blocks[._](\d+)"), count(r"(?:^|[._])transformer_blocks[._](\d+)"))
    single = max(count(r"single_blocks[._](\d+)"), count(r"single_transformer_blocks[._](\d+)"))
    mlp_hidden = mlp_hidden or 4 * hidden  # every released Flux has mlp_ratio 4
    rows = {f"double_blocks.{i}.{s}_attn.qkv": 3 * hidden for i in range(depth) for s in ("img", "txt")}
    rows |= {f"single_blocks.{i}.linear1": 3 * hidden + mlp_hidden for i in range(single)}
    return Family("flux", flux_entries(depth, single, hidden), "transformer", rows)


def family_of_checkpoint(shapes: dict[str, tuple[int, ...]]) -> Family:
    """The family of a full model checkpoint (official or diffusers layout) from its keys and shapes."""
    p = next((p for p in WRAPPER_PREFIXES[:2] if any(k.startswith(p) for k in shapes)), "")
    shapes = {k[len(p):]: tuple(v) for k, v in shapes.items() if k.startswith(p)}
    keys = set(shapes)
    flux = flux_widths(shapes) if "img_in.weight" in keys or {"x_embedder.weight", "context_embedder.weight"} <= keys \
        else None
    if flux is not None:
        fam = flux_family(list(keys), flux["hidden"], flux["mlp_hidden"])
        fam.rows |= {n: shapes[f"{n}.weight"][0] for n in fam.rows if f"{n}.weight" in shapes}
        return fam
    if "input_blocks.0.0.weight" in keys:
        return Family("unet", unet_entries(official_structure(keys), official_label(keys, LABEL)), "unet")
    if "conv_in.weight" in keys and "down_blocks.0.resnets.0.conv1.weight" in keys:
        return Family("unet", unet_entries(diffusers_structure(keys), diffusers_label(keys)), "unet")
    return Family()


def family_of_model(model: nn.Module) -> Family:
    return family_of_checkpoint({k: tuple(v.shape) for k, v in model.state_dict().items()})


def family_of_keys(modules: list[str], factors: dict[str, Factor]) -> Family:
    """Guess the family from LoRA module names alone (Flux; a UNet's diffusers names need `family_of_checkpoint`)."""
    if any(re.search(r"(double|single)_(transformer_)?blocks|^transformer_blocks", m) for m in modules):
        hidden = next((f.down.shape[1] for m, f in factors.items()
                       if re.search(r"(qkv|linear1|to_q|to_k|to_v|add_[qkv]_proj)$", m)), 3072)
        return flux_family(modules, hidden)
    if any(m.startswith(_UNET_DIFFUSERS) for m in modules):
        return Family("unet")  # diffusers UNet names: their official names depend on the block structure
    return Family()


# ---- reading ----

def detect(sd: dict[str, Tensor]) -> str:
    """The format of a LoRA state dict: one of FORMATS; a ValueError if none fits."""
    keys = list(sd)
    if any(_XLABS.match(k) for k in keys):
        return "xlabs"
    if any(_KOHYA.match(k) and k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "comfy" if any(k.startswith("diffusion_model.") for k in keys) else "ours"
    raise ValueError(f"not a LoRA in any known format {FORMATS}: no lora_down/lora_up, lora_A/lora_B or XLabs "
                     f"processor keys among {len(keys)} key(s), e.g. {keys[:5]}")


def _raw_modules(sd: dict[str, Tensor], fmt: str) -> tuple[dict[str, dict], list[str]]:
    """module name as written -> {"down", "up", "alpha"}; plus the keys of no known role."""
    raw, unknown = {}, []
    for k, t in sd.items():
        if fmt == "xlabs":
            m = _XLABS.match(k)
            if not m:
                unknown.append(k)
                continue
            kind, i, what, n, role = m.groups()
            stream = {"": "", "1": "img_attn.", "2": "txt_attn."}[n] if kind == "double" else ""
            mod = {("single", "qkv"): "linear1", ("single", "proj"): "linear2"}.get((kind, what), f"{stream}{what}")
            raw.setdefault(f"{kind}_blocks.{i}.{mod}", {})[role] = t
            continue
        role = next((r for s, r in _ROLES.items() if k.endswith(s)), None)
        if role is None:
            unknown.append(k)
            continue
        mod = k[: -len(next(s for s in _ROLES if k.endswith(s)))]
        raw.setdefault(mod, {})[role] = t.item() if role == "alpha" else t
    return raw, unknown


def _alphas_from_metadata(metadata: dict | None, raw: dict[str, dict]) -> None:
    """diffusers' `lora_adapter_metadata` (a flattened LoraConfig) -> per-module alphas where no .alpha key is."""
    text = (metadata or {}).get("lora_adapter_metadata")
    if not text:
        return
    cfg = {}
    for k, v in json.loads(text).items():  # "transformer.lora_alpha" -> "lora_alpha"; other components ignored
        comp, _, fieldname = k.rpartition(".")
        if comp in ("", "transformer", "unet"):
            cfg[fieldname] = v
    if cfg.get("use_rslora"):
        raise ValueError("rsLoRA (alpha / sqrt(rank)) adapters are not supported")
    for mod, parts in raw.items():
        if "alpha" in parts or "down" not in parts:
            continue
        name = re.sub(r"^(transformer|unet|base_model\.model)\.", "", mod)
        hit = _pattern(cfg.get("alpha_pattern") or {}, name)
        alpha = hit if hit is not None else cfg.get("lora_alpha")
        if alpha is not None:
            parts["alpha"] = float(alpha)


def _pattern(patterns: dict, name: str):
    """peft's rule for rank/alpha patterns: the first key that matches the name's end at a dot, as a regex."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def _strip(name: str) -> str:
    for p in WRAPPER_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def read(sd: dict[str, Tensor], metadata: dict | None = None, *, model: nn.Module | None = None,
         family: Family | None = None) -> tuple[dict[str, Factor], list[str], str]:
    """Any known LoRA format -> ({official module: Factor}, keys that match no module, format).

    The names are resolved against `model`, else `family` (see `family_of_checkpoint`), else a guess from the keys.
    """
    fmt = detect(sd)
    raw, unmatched = _raw_modules(sd, fmt)
    _alphas_from_metadata(metadata, raw)
    for mod, parts in list(raw.items()):
        if "down" not in parts or "up" not in parts:
            unmatched += [f"{mod} (has {sorted(parts)}, needs down and up)"]
            del raw[mod]
    names = [_strip(m) for m in raw]
    if model is not None:
        targets, family = set(list_targets(model)), family_of_model(model)
    else:
        targets = None
        family = family or family_of_keys(names, {_strip(m): Factor(p["down"], p["up"]) for m, p in raw.items()})
    vocab = set(targets or family.official) | set(family.part)
    underscored = {n.replace(".", "_"): n for n in vocab}
    factors, parts = {}, {}
    for mod, p in raw.items():
        name = _strip(mod)
        if _KOHYA.match(mod):
            stem = _KOHYA.sub("", mod)
            name = underscored.get(stem) if not mod.startswith("lora_te") else None
            if name is None:
                unmatched.append(mod)
                continue
        f = Factor(p["down"], p["up"], p.get("alpha"))
        if name in family.part and name not in family.official:
            e, i = family.part[name]
            parts.setdefault(e.official, {})[i] = f
        elif targets is None and family.name == "unet" and not family.entries and name.startswith(_UNET_DIFFUSERS):
            unmatched.append(mod)  # no structure to map it with: not passed on under a diffusers name
        elif targets is None or name in targets:
            if fmt == "xlabs" and name.endswith("linear1") and name in family.rows:  # x-flux adapts only the qkv rows
                f = Factor(f.down, torch.cat([f.up, f.up.new_zeros(family.rows[name] - f.up.shape[0], f.up.shape[1])]))
            factors[name] = f
        else:
            unmatched.append(mod)
    for official, got in parts.items():
        e = family.official[official]
        if official in factors:
            raise ValueError(f"LoRA has {official} both fused and as diffusers parts {e.diffusers}")
        factors[official] = _join(e, got, family)
    if targets is not None:
        for name in [n for n in factors if n not in targets]:
            unmatched.append(name)
            del factors[name]
    return factors, unmatched, fmt


def _join(e: Entry, got: dict[int, Factor], family: Family) -> Factor:
    """diffusers parts -> one Factor on the fused official module, exact: B A = the parts' B_i A_i stacked."""
    if len(e.diffusers) == 1:
        f = got[0]
        return Factor(f.down, swap_halves(f.up) if e.swap else f.up, f.alpha)
    sizes = family.sizes(e)
    fs = [got[i] for i in sorted(got)]
    if len(got) == len(sizes) and all(torch.equal(f.down, fs[0].down) and f.alpha == fs[0].alpha for f in fs):
        return Factor(fs[0].down, torch.cat([f.up for f in fs]), fs[0].alpha)  # one A shared: the inverse of split
    rank = sum(f.down.shape[0] for f in fs)
    scales = {f.scale for f in fs}
    same = len(scales) == 1  # then the blocks are copied as is and alpha carries the common scale
    up = fs[0].up.new_zeros((sum(sizes), rank, *fs[0].up.shape[2:]))
    col, starts = 0, [sum(sizes[:i]) for i in range(len(sizes))]
    for i in sorted(got):
        f = got[i]
        if f.up.shape[0] != sizes[i]:
            raise ValueError(f"LoRA {e.diffusers[i]}: B has {f.up.shape[0]} rows, expected {sizes[i]} "
                             f"(part {i} of {e.official})")
        r = f.down.shape[0]
        up[starts[i]: starts[i] + sizes[i], col: col + r] = f.up if same else f.up * f.scale
        col += r
    alpha = scales.pop() * rank if same else float(rank)
    return Factor(torch.cat([f.down for f in fs]), up, None if alpha == rank else alpha)


def _split(e: Entry, f: Factor, family: Family) -> dict[str, Factor]:
    """One Factor on a fused official module -> its diffusers parts (the inverse of `_join`)."""
    up = swap_halves(f.up) if e.swap else f.up
    if len(e.diffusers) == 1:
        return {e.diffusers[0]: Factor(f.down, up, f.alpha)}
    family.rows.setdefault(e.official, f.up.shape[0])
    blocks = torch.split(up, family.sizes(e), dim=0)
    used = [torch.nonzero(b.flatten(2).abs().sum((0, 2)) if b.ndim > 2 else b.abs().sum(0)).flatten() for b in blocks]
    cols = torch.cat(used)
    rank = f.down.shape[0]
    contiguous = all(len(u) == 0 or u[-1] - u[0] + 1 == len(u) for u in used)
    if len(cols) == rank and len(set(cols.tolist())) == rank and contiguous:  # block-placed: one A per part
        return {d: Factor(f.down[u[0]: u[-1] + 1], b[:, u[0]: u[-1] + 1], None if f.alpha is None else
                          f.scale * len(u)) for d, b, u in zip(e.diffusers, blocks, used) if len(u)}
    return {d: Factor(f.down, b, f.alpha) for d, b in zip(e.diffusers, blocks)}  # shared A: copied to each part


# ---- writing ----

_XLABS_OUT = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
              "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}


def _alpha_t(f: Factor) -> Tensor:
    return torch.tensor(float(f.down.shape[0] if f.alpha is None else f.alpha))


def _xlabs(name: str, f: Factor, family: Family) -> dict[str, Tensor]:
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name)
    if not m or m.group(3) not in _XLABS_OUT or (m.group(1) == "single") != (m.group(3) in ("linear1", "linear2")):
        raise ValueError(f"the XLabs format has no place for a LoRA on {name}")
    up = f.up * f.scale  # x-flux applies no alpha: fold the scale into B
    if m.group(3) == "linear1":  # x-flux adapts the qkv rows only
        hidden = f.down.shape[1]
        if up[3 * hidden:].any():
            raise ValueError(f"{name}: the LoRA changes the MLP rows of linear1, which XLabs cannot store")
        up = up[: 3 * hidden]
    key = f"{m.group(1)}_blocks.{m.group(2)}.processor.{_XLABS_OUT[m.group(3)]}"
    return {f"{key}.down.weight": f.down, f"{key}.up.weight": up}


def _peft_metadata(ranks: dict[str, int], alphas: dict[str, float], prefix: str) -> str:
    """diffusers' `lora_adapter_metadata`: a LoraConfig with the common rank/alpha and patterns for the others."""
    common = lambda d: max(set(d.values()), key=list(d.values()).count)
    r, a = common(ranks), common(alphas)
    # peft matches a pattern key at the end of a name: anchor the keys that end another target's name
    key = lambda n: f"^{re.escape(n)}" if any(m.endswith("." + n) for m in ranks) else n
    cfg = {"r": r, "lora_alpha": a, "rank_pattern": {key(k): v for k, v in ranks.items() if v != r},
           "alpha_pattern": {key(k): v for k, v in alphas.items() if v != a}, "target_modules": sorted(ranks),
           "use_rslora": False, "use_dora": False, "lora_bias": False}
    return json.dumps({f"{prefix}.{k}" if prefix else k: v for k, v in cfg.items()}, sort_keys=True)


def write(factors: dict[str, Factor], to: str, family: Family | None = None) -> tuple[dict[str, Tensor], dict]:
    """{official module: Factor} -> (state dict, safetensors metadata) in format `to`."""
    if to not in FORMATS:
        raise ValueError(f"unknown LoRA format {to!r}; formats: {FORMATS}")
    family = family or family_of_keys(list(factors), factors)
    out, meta = {}, {"format": "pt", "lora_format": to}
    if to in ("ours", "comfy", "kohya"):
        for n, f in factors.items():
            key = "lora_unet_" + n.replace(".", "_") if to == "kohya" else ("diffusion_model." if to == "comfy"
                                                                              else "") + n
            out |= {f"{key}.lora_down.weight": f.down, f"{key}.lora_up.weight": f.up, f"{key}.alpha": _alpha_t(f)}
    elif to == "xlabs":
        for n, f in factors.items():
            out |= _xlabs(n, f, family)
    else:
        pre = f"{family.prefix}." if family.prefix else ""
        ranks, alphas = {}, {}
        for n, f in factors.items():
            e = family.official.get(n)
            for d, pf in (_split(e, f, family) if e else {n: f}).items():
                out |= {f"{pre}{d}.lora_A.weight": pf.down, f"{pre}{d}.lora_B.weight": pf.up}
                ranks[d], alphas[d] = pf.down.shape[0], float(_alpha_t(pf))
        if ranks:
            meta["lora_adapter_metadata"] = _peft_metadata(ranks, alphas, family.prefix)
    return out, meta


def convert(sd: dict[str, Tensor], to: str, metadata: dict | None = None, *, family: Family | None = None,
            drop_unmatched: bool = False) -> tuple[dict[str, Tensor], dict, list[str]]:
    """Any known format -> `to`, without a model; returns (state dict, metadata, keys that were not placed).

    A UNet LoRA needs `family=family_of_checkpoint(shapes of a UNet checkpoint)` to map diffusers names.
    """
    factors, unmatched, _ = read(sd, metadata, family=family)
    if unmatched and not drop_unmatched:
        hint = "" if family else " (a UNet LoRA needs the base checkpoint's keys: family_of_checkpoint / --base)"
        raise ValueError(f"{len(unmatched)} LoRA key(s) match no module of a known family{hint}: {unmatched[:10]}")
    out, meta = write(factors, to, family)
    return out, meta, unmatched


# ---- files (checkpoints_convert.io: mmap'd safetensors, weights-only pickles, atomic writes) ----

def load_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """A LoRA file -> (state dict, safetensors metadata)."""
    ck = read_checkpoint(path)
    return ck, ck.metadata


# ---- a model's adapters ----

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


def _fit(name: str, f: Factor, weight: Tensor) -> Factor:
    """Check (and reshape 1x1 conv <-> linear) the factors against the base weight; errors name both shapes."""
    r = f.down.shape[0]
    down_want = (r, *weight.shape[1:])
    up_want = (weight.shape[0], r, *[1] * (weight.ndim - 2))
    down, up = f.down, f.up
    if down.shape != down_want and down.numel() == r * weight[0].numel() and all(k == 1 for k in weight.shape[2:]):
        down = down.reshape(down_want)
    if up.shape != up_want and up.numel() == weight.shape[0] * r and up.shape[1:2] == (r,):
        up = up.reshape(up_want)
    for role, t, want in (("lora_down", down, down_want), ("lora_up", up, up_want)):
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"LoRA {name}.{role}.weight has shape {tuple(t.shape)}, but {name} (weight "
                             f"{tuple(weight.shape)}) needs {tuple(want)}")
    return Factor(down, up, f.alpha)


def load(model: nn.Module, src: str | os.PathLike | dict, *, adapter: str = "default", metadata: dict | None = None,
         strict: bool = False, scale: float = 1.0) -> LoadReport:
    """Read a LoRA (path or state dict, any known format) into adapter `adapter` of `model`.

    Keys that fit no module are listed in the report and warned about; `strict=True` makes them an error.
    """
    sd, file_meta = load_file(src) if isinstance(src, (str, os.PathLike)) else (src, {})
    factors, unmatched, fmt = read(sd, metadata or file_meta, model=model)
    if unmatched and strict:
        raise ValueError(f"{len(unmatched)} LoRA key(s) match no module of the model: {unmatched[:20]}")
    if not factors:
        raise ValueError(f"no key of this {fmt} LoRA matches a module of the model; unmatched: {unmatched[:10]}")
    mods = dict(model.named_modules())
    factors = {n: _fit(n, f, mods[n].weight) for n, f in factors.items()}
    groups: dict[tuple, list[str]] = {}
    for n, f in factors.items():
        groups.setdefault((f.down.shape[0], f.alpha), []).append(n)
    for (r, alpha), names in groups.items():
        inject(model, names, rank=r, alpha=alpha, conv_rank=r, conv_alpha=alpha, adapter=adapter, init="none",
               scale=scale)
    layers = lora_layers(model)
    for n, f in factors.items():
        layers[n].set_factors(adapter, f.down, f.up)
    report = LoadReport(fmt, adapter, list(factors), unmatched)
    if unmatched:
        warnings.warn(str(report), stacklevel=2)
    return report


def factors_of(model: nn.Module, adapter: str = "default") -> dict[str, Factor]:
    """Adapter `adapter` of `model` as {official module: Factor}."""
    out = {n: Factor(*m.factors(adapter), m.alpha[adapter]) for n, m in lora_layers(model).items()
           if adapter in m.adapters}
    if not out:
        raise ValueError(f"the model has no adapter {adapter!r}")
    return out


def save(model: nn.Module, path: str | os.PathLike, *, adapter: str = "default", format: str = "ours") -> Path:
    """Write adapter `adapter` of `model` to a .safetensors file in `format` (atomically)."""
    sd, meta = write(factors_of(model, adapter), format, family_of_model(model))
    return save_file(sd, path, meta)
