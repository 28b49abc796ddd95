"""The LoRA files people exchange, read into and written from one canonical form ({official module: Factor}).

DoRA magnitudes come as `.dora_scale` (kohya / LyCORIS, (out, 1)) or `.lora_magnitude_vector` (PEFT / diffusers,
(out,) or (1, out, 1, 1) for convs); LyCORIS LoHa / LoKr modules (`.hada_w1_a`..., `.lokr_w1`...) are read into
`lycoris.Lycoris` (applied and merged, not written).

Canonical ("ours"): `{official module}.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`; ComfyUI's is the same
with a `diffusion_model.` prefix. kohya (sd-scripts): `lora_unet_{module with _}.lora_down.weight` / `.lora_up.weight`
/ `.alpha`. diffusers/PEFT: `{transformer|unet}.{diffusers module}.lora_A.weight` / `.lora_B.weight`, alphas in the
`lora_adapter_metadata` JSON (or `.alpha` keys). XLabs (x-flux): `double_blocks.N.processor.qkv_lora1.down.weight`...
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import Tensor, nn

from checkpoints_convert.io import load_file as read_checkpoint
from checkpoints_convert.lora_kinds import FORMATS, KOHYA_PREFIX, XLABS_KEY, lora_kind
from lora.factor import Factor, join, split
from lora.inject import list_targets
from lora.lycoris import ROLES as LYCORIS_ROLES
from lora.lycoris import Lycoris, lycoris_of
from lora.names import UNET_DIFFUSERS, Family, family_of_keys, family_of_model, strip_wrapper

_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
          ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha", ".dora_scale": "magnitude",
          ".lora_magnitude_vector": "magnitude"} | {f".{r}": r for r in LYCORIS_ROLES}


# ---- reading ----

def detect(sd: dict[str, Tensor]) -> str:
    """The format of a LoRA state dict: one of FORMATS; a ValueError if none fits."""
    keys = list(sd)
    kind = lora_kind(keys)
    if kind is not None and not kind.readable:
        raise ValueError(f"this LoRA is of kind {kind.name!r}, which lora cannot read: {kind.note}")
    if kind is not None:
        return kind.name
    raise ValueError(f"not a LoRA in any known format {FORMATS}: no lora_down/lora_up, lora_A/lora_B or XLabs "
                     f"processor keys among {len(keys)} key(s), e.g. {keys[:5]}")


def _raw_modules(sd: dict[str, Tensor], fmt: str) -> tuple[dict[str, dict], list[str]]:
    """module name as written -> {"down", "up", "alpha"}; plus the keys of no known role."""
    raw, unknown = {}, []
    for k, t in sd.items():
        if fmt == "xlabs":
            m = XLABS_KEY.match(k)
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
    """diffusers' `lora_adapter_metadata` (a flattened LoraConfig; a LoHa/LoKrConfig's `alpha` for LyCORIS modules)
    -> per-module alphas where no .alpha key is."""
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
        lycoris = any(r in parts for r in LYCORIS_ROLES)
        if "alpha" in parts or ("down" not in parts and not lycoris):
            continue
        name = re.sub(r"^(transformer|unet|base_model\.model)\.", "", mod)
        hit = _pattern(cfg.get("alpha_pattern") or {}, name)
        alpha = hit if hit is not None else cfg.get("alpha" if lycoris else "lora_alpha")
        if alpha is not None:
            parts["alpha"] = float(alpha)


def _pattern(patterns: dict, name: str):
    """peft's rule for rank/alpha patterns: the first key that matches the name's end at a dot, as a regex."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def read(sd: dict[str, Tensor], metadata: dict | None = None, *, model: nn.Module | None = None,
         family: Family | None = None) -> tuple[dict[str, Factor | Lycoris], list[str], str]:
    """Any known LoRA format -> ({official module: Factor (or Lycoris)}, keys that match no module, format).

    The names are resolved against `model`, else `family` (see `family_of_checkpoint`), else a guess from the keys.
    """
    fmt = detect(sd)
    raw, unmatched = _raw_modules(sd, fmt)
    _alphas_from_metadata(metadata, raw)
    for mod, parts in list(raw.items()):
        if any(r in parts for r in LYCORIS_ROLES):
            continue
        if "down" not in parts or "up" not in parts:
            unmatched += [f"{mod} (has {sorted(parts)}, needs down and up)"]
            del raw[mod]
    names = [strip_wrapper(m) for m in raw]
    if model is not None:
        targets, family = set(list_targets(model)), family_of_model(model)
    else:
        targets = None
        family = family or family_of_keys(names, {strip_wrapper(m): Factor(p["down"], p["up"]) for m, p in raw.items()
                                                  if "down" in p})
    vocab = set(targets or family.official) | set(family.part)
    underscored = {n.replace(".", "_"): n for n in vocab}
    factors, parts = {}, {}
    for mod, p in raw.items():
        name = strip_wrapper(mod)
        if KOHYA_PREFIX.match(mod):
            stem = KOHYA_PREFIX.sub("", mod)
            name = underscored.get(stem) if not mod.startswith("lora_te") else None
            if name is None:
                unmatched.append(mod)
                continue
        if any(r in p for r in LYCORIS_ROLES):
            f = lycoris_of(mod, p, p.get("alpha"))
            if name in family.part and name not in family.official:
                raise ValueError(f"{f.kind} {mod}: a part of the fused module {family.part[name][0].official}; "
                                 f"joining {f.kind} parts is not supported")
        else:
            f = Factor(p["down"], p["up"], p.get("alpha"), p.get("magnitude"))
        if name in family.part and name not in family.official:
            e, i = family.part[name]
            parts.setdefault(e.official, {})[i] = f
        elif targets is None and family.name == "unet" and not family.entries and name.startswith(UNET_DIFFUSERS):
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
        factors[official] = join(e, got, family.sizes(e) if len(e.diffusers) > 1 else [])
    if targets is not None:
        for name in [n for n in factors if n not in targets]:
            unmatched.append(name)
            del factors[name]
    return factors, unmatched, fmt


# ---- writing ----

_XLABS_OUT = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
              "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}


def _alpha_t(f: Factor) -> Tensor:
    return torch.tensor(float(f.down.shape[0] if f.alpha is None else f.alpha))


def _xlabs(name: str, f: Factor) -> dict[str, Tensor]:
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name)
    if not m or m.group(3) not in _XLABS_OUT or (m.group(1) == "single") != (m.group(3) in ("linear1", "linear2")):
        raise ValueError(f"the XLabs format has no place for a LoRA on {name}")
    if f.magnitude is not None:
        raise ValueError(f"{name}: the XLabs format has no place for a DoRA magnitude")
    up = f.up * f.alpha_over_rank  # x-flux applies no alpha: fold it into B
    if m.group(3) == "linear1":  # x-flux adapts the qkv rows only
        hidden = f.down.shape[1]
        if up[3 * hidden:].any():
            raise ValueError(f"{name}: the LoRA changes the MLP rows of linear1, which XLabs cannot store")
        up = up[: 3 * hidden]
    key = f"{m.group(1)}_blocks.{m.group(2)}.processor.{_XLABS_OUT[m.group(3)]}"
    return {f"{key}.down.weight": f.down, f"{key}.up.weight": up}


def _peft_metadata(ranks: dict[str, int], alphas: dict[str, float], prefix: str, dora: bool) -> str:
    """diffusers' `lora_adapter_metadata`: a LoraConfig with the common rank/alpha and patterns for the others."""
    common = lambda d: max(set(d.values()), key=list(d.values()).count)
    r, a = common(ranks), common(alphas)
    # peft matches a pattern key at the end of a name: anchor the keys that end another target's name
    key = lambda n: f"^{re.escape(n)}" if any(m.endswith("." + n) for m in ranks) else n
    cfg = {"r": r, "lora_alpha": a, "rank_pattern": {key(k): v for k, v in ranks.items() if v != r},
           "alpha_pattern": {key(k): v for k, v in alphas.items() if v != a}, "target_modules": sorted(ranks),
           "use_rslora": False, "use_dora": dora, "lora_bias": False}
    return json.dumps({f"{prefix}.{k}" if prefix else k: v for k, v in cfg.items()}, sort_keys=True)


def write(factors: dict[str, Factor], to: str, family: Family | None = None) -> tuple[dict[str, Tensor], dict]:
    """{official module: Factor} -> (state dict, safetensors metadata) in format `to`."""
    if to not in FORMATS:
        raise ValueError(f"unknown LoRA format {to!r}; formats: {FORMATS}")
    lyco = [n for n, f in factors.items() if isinstance(f, Lycoris)]
    if lyco:
        raise ValueError(f"{factors[lyco[0]].kind} adapters are read and applied, not written; {len(lyco)} module(s), "
                         f"e.g. {lyco[:3]}: merge them into the model (lora.merge) instead")
    family = family or family_of_keys(list(factors), factors)
    out, meta = {}, {"format": "pt", "lora_format": to}
    if to in ("ours", "comfy", "kohya"):
        for n, f in factors.items():
            key = "lora_unet_" + n.replace(".", "_") if to == "kohya" else ("diffusion_model." if to == "comfy"
                                                                              else "") + n
            out |= {f"{key}.lora_down.weight": f.down, f"{key}.lora_up.weight": f.up, f"{key}.alpha": _alpha_t(f)}
            if f.magnitude is not None:  # LyCORIS' wd_on_out shape
                out[f"{key}.dora_scale"] = f.magnitude.reshape(-1, *[1] * (f.up.ndim - 1))
    elif to == "xlabs":
        for n, f in factors.items():
            out |= _xlabs(n, f)
    else:
        pre = f"{family.prefix}." if family.prefix else ""
        ranks, alphas = {}, {}
        for n, f in factors.items():
            e = family.official.get(n)
            if e is not None and len(e.diffusers) > 1:
                family.rows.setdefault(e.official, f.up.shape[0])
            for d, pf in (split(e, f, family.sizes(e) if len(e.diffusers) > 1 else []) if e else {n: f}).items():
                out |= {f"{pre}{d}.lora_A.weight": pf.down, f"{pre}{d}.lora_B.weight": pf.up}
                if pf.magnitude is not None:  # peft's shapes: (out,), convs (1, out, 1, 1)
                    m = pf.magnitude.flatten()
                    out[f"{pre}{d}.lora_magnitude_vector"] = m if pf.up.ndim == 2 else m.reshape(1, -1, 1, 1)
                ranks[d], alphas[d] = pf.down.shape[0], float(_alpha_t(pf))
        if ranks:
            dora = any(f.magnitude is not None for f in factors.values())
            meta["lora_adapter_metadata"] = _peft_metadata(ranks, alphas, family.prefix, dora)
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


def load_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """A LoRA file -> (state dict, safetensors metadata); checkpoints_convert.io reads it (mmap'd safetensors,
    weights-only pickles)."""
    ck = read_checkpoint(path)
    return ck, ck.metadata
