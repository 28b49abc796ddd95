"""CLIP text encoders inside SD checkpoints <-> the transformers `CLIPTextModel(WithProjection)` names (zoo's native).

Two layouts hold them:
- SD1.x / SDXL's first encoder (`FrozenCLIPEmbedder`): the transformers model under a prefix,
  `cond_stage_model.transformer.text_model...` / `conditioner.embedders.0.transformer.text_model...`;
- OpenCLIP (SD2.x's ViT-H, SDXL's bigG, `FrozenOpenCLIPEmbedder`): `cond_stage_model.model.` /
  `conditioner.embedders.1.model.` + `transformer.resblocks.N.attn.in_proj_weight` (q, k, v stacked on dim 0),
  `ln_1`/`ln_2`, `mlp.c_fc`/`mlp.c_proj`, `positional_embedding` (a bare tensor), `ln_final`, and `text_projection`
  stored (width, embed_dim) for `x @ text_projection` where transformers keeps the Linear weight (embed_dim, width).

Buffers that carry no weights (`position_ids`, OpenCLIP's `attn_mask`) and the contrastive `logit_scale` are
dropped: round trips are bit-exact on everything else.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from checkpoints_convert.keymap import KeyMapError

SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
SDXL_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_G_PREFIX = "conditioner.embedders.1.model."
IGNORED = ("text_model.embeddings.position_ids", "attn_mask", "logit_scale")

# OpenCLIP name -> transformers name, outside the blocks
_OUTER = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# OpenCLIP block part -> transformers block part (`transformer.resblocks.N.` <-> `text_model.encoder.layers.N.`)
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OC_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OC_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_TF_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _strip(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sub:
        raise KeyMapError(f"no key starts with {prefix!r}; first keys: {list(sd)[:5]}")
    return {k: v for k, v in sub.items() if k not in IGNORED}


def is_openclip(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether the keys under `prefix` are an OpenCLIP text tower (fused in_proj blocks, a bare positional table)."""
    return f"{prefix}positional_embedding" in sd or any(k.startswith(f"{prefix}transformer.resblocks.") for k in sd)


def openclip_to_transformers(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """OpenCLIP text tower keys (under `prefix`, e.g. `SD2_PREFIX`) -> transformers CLIP text keys."""
    out, left = {}, []
    for k, v in _strip(sd, prefix).items():
        if k in _OUTER:
            out[_OUTER[k]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()  # (width, embed) -> Linear (embed, width)
        elif m := _OC_IN_PROJ.match(k):
            if v.shape[0] % 3:
                raise KeyMapError(f"{prefix}{k} has shape {tuple(v.shape)}: dim 0 must stack q, k and v equally")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part.clone()
        elif (m := _OC_BLOCK.match(k)) and m[2] in _BLOCK:
            out[f"text_model.encoder.layers.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"] = v
        else:
            left.append(prefix + k)
    if left:
        raise KeyMapError(f"{len(left)} key(s) are not part of an OpenCLIP text tower: {left[:8]}")
    return out


def transformers_to_openclip(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """transformers CLIP text keys -> OpenCLIP text tower keys under `prefix` (q/k/v fused into in_proj)."""
    outer = {t: o for o, t in _OUTER.items()}
    block = {t: o for o, t in _BLOCK.items()}
    sd = {k: v for k, v in sd.items() if k not in IGNORED}
    out, left, qkv = {}, [], {}
    for k, v in sd.items():
        if k in outer:
            out[prefix + outer[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif (m := _TF_BLOCK.match(k)) and m[2].startswith("self_attn.") and m[2][10:] in ("q_proj", "k_proj",
                                                                                            "v_proj"):
            qkv.setdefault((m[1], m[3]), {})[m[2][10:]] = v
        elif m and m[2] in block:
            out[f"{prefix}transformer.resblocks.{m[1]}.{block[m[2]]}.{m[3]}"] = v
        else:
            left.append(k)
    for (i, kind), parts in qkv.items():
        missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in parts]
        if missing:
            raise KeyMapError(f"layer {i}: self_attn {kind} lacks {missing} (in_proj needs q, k and v)")
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    if left:
        raise KeyMapError(f"{len(left)} key(s) are not CLIP text model keys: {left[:8]}")
    return out


def ldm_clip_to_transformers(sd: Mapping[str, Tensor], prefix: str = SD1_PREFIX) -> dict[str, Tensor]:
    """SD1.x-style `cond_stage_model.transformer.text_model...` (or SDXL's `conditioner.embedders.0.transformer.`)
    -> transformers CLIP text keys: the prefix removed."""
    return _strip(sd, prefix)


def transformers_to_ldm_clip(sd: Mapping[str, Tensor], prefix: str = SD1_PREFIX) -> dict[str, Tensor]:
    """transformers CLIP text keys -> the SD1.x layout (`prefix` + `text_model...`)."""
    return {prefix + k: v for k, v in sd.items() if k not in IGNORED}


def text_encoders(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The CLIP text encoders of a full SD1.x / SD2.x / SDXL checkpoint, in transformers names, by the prefix they sit
    under: {"cond_stage_model.transformer.": ..., "conditioner.embedders.1.model.": ...}."""
    found = {}
    for prefix, fn in ((SD1_PREFIX, ldm_clip_to_transformers), (SDXL_L_PREFIX, ldm_clip_to_transformers),
                       (SD2_PREFIX, openclip_to_transformers), (SDXL_G_PREFIX, openclip_to_transformers)):
        if any(k.startswith(prefix) for k in sd):
            found[prefix] = fn(sd, prefix)
    return found


__all__ = ["SD1_PREFIX", "SD2_PREFIX", "SDXL_L_PREFIX", "SDXL_G_PREFIX", "IGNORED", "is_openclip",
           "openclip_to_transformers",
           "transformers_to_openclip", "ldm_clip_to_transformers", "transformers_to_ldm_clip", "text_encoders"]
