"""Which model a state dict holds: family, config name and layout, from key names and shapes (ComfyUI's idea).

Each family/layout has a `Signature`: keys that must all be present once a wrapper prefix is removed, and a
function naming the config from shapes. A file may hold several models (a full SD checkpoint: UNet under
`model.diffusion_model.`, VAE under `first_stage_model.`); the diffusion model is reported, the rest listed.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from checkpoints_convert.errors import DetectError
from checkpoints_convert.families import arch_of, key_map
from checkpoints_convert.fields import hints_from, read_fields
from checkpoints_convert.keymap import WRAPPER_PREFIXES
from checkpoints_convert.lora_kinds import LoRAKind, lora_kind, lora_ranks
from checkpoints_convert.quant import bnb_kind, unpacked_view

PREFIXES = WRAPPER_PREFIXES


@dataclass(frozen=True)
class Detection:
    """What `detect` found: `layout` is official/diffusers (for a LoRA: its kind's layout, `lora_kinds.KINDS`)."""

    family: str
    layout: str
    config: str | None = None  # a zoo config name (`zoo.build(config)`), when the shapes match a release
    prefix: str = ""  # wrapper prefix to strip ('' if none)
    fields: dict | None = None  # official config fields read off the shapes, where they all can be
    components: dict[str, str] = field(default_factory=dict)  # other models in the file: prefix -> family
    note: str = ""
    assumed: dict = field(default_factory=dict)  # fields no shape tells, set to the released value: name -> value
    hints: dict = field(default_factory=dict)  # fields no shape tells, read from config.json / our metadata
    quant: str = ""  # a quantisation zoo does not dequantise (bitsandbytes), e.g. 'bitsandbytes nf4'

    def __str__(self) -> str:
        s = f"{self.family} ({self.layout}{f', prefixed {self.prefix!r}' if self.prefix else ''})"
        s += f", config {self.config}" if self.config else ", not a released size" if self.family != "lora" else ""
        if self.components:
            s += "; also holds " + ", ".join(f"{f} under {p!r}" for p, f in self.components.items())
        s += f"; {self.quant}-quantised" if self.quant else ""
        s += f"; assumed {self.assumed} (no shape tells them)" if self.assumed and not self.config else ""
        return s + (f"; {self.note}" if self.note else "")

    @property
    def arch(self) -> str | None:
        """The zoo architecture that builds this family (None for a LoRA)."""
        return arch_of(self.family)


@dataclass(frozen=True)
class Signature:
    family: str
    layout: str
    keys: tuple[str, ...]  # all present (after the prefix) <=> this family in this layout
    name: Callable[[Callable[[str], tuple | None]], str | None] = lambda shape: None  # shape(key) -> config name


def _ctx(shape, key: str) -> int | None:
    s = shape(key)
    return s[1] if s else None


def _unet_name(shape, ctx_key: str, proj_key: str, ch_key: str, adm_key: str, in_key: str) -> str | None:
    """Release by context width, linear/conv proj_in, width and class-embedding input (SGM/LDM configs)."""
    ctx, proj, ch, adm = _ctx(shape, ctx_key), shape(proj_key), (shape(ch_key) or [0])[0], _ctx(shape, adm_key)
    inpaint = "-inpaint" if (shape(in_key) or [0, 4])[1] == 9 else ""
    if ch == 320 and ctx == 768 and adm is None and proj is not None and len(proj) == 4:
        return "sd15" + inpaint
    if ch == 320 and ctx == 1024 and adm is None and proj is not None and len(proj) == 2:
        return "sd21" + inpaint
    if ch == 320 and ctx == 2048 and adm == 2816:
        return "sdxl-base" + inpaint
    if ch == 384 and ctx == 1280 and adm == 2560:
        return "sdxl-refiner"
    return None


def _controlnet_name(shape, ctx_key: str) -> str | None:
    base = {768: "sd15", 1024: "sd21", 2048: "sdxl"}.get(_ctx(shape, ctx_key))
    return f"controlnet-{base}" if base else None


def _vae_name(shape, quant_key: str, conv_out: str) -> str | None:
    z = (shape(conv_out) or [0])[0] // 2
    if (shape("encoder.conv_in.weight") or [0])[0] != 128:  # every release has width 128
        return None
    if z == 4 and shape(quant_key):
        return "vae-sd"  # SD1/2 and SDXL VAEs share every shape; only their scale factors differ
    if z == 16 and not shape(quant_key):
        return "vae-flux"
    return None


def _flux_name(shape, hidden_key: str, guidance_key: str, last: str, past: str) -> str | None:
    if (shape(hidden_key) or [0])[0] == 3072 and shape(last) and not shape(past):  # 38 single blocks
        return "flux-dev" if shape(guidance_key) else "flux-schnell"
    return None


def _sana_name(shape, key: str) -> str | None:
    return {1152: "sana-600m", 2240: "sana-1600m"}.get((shape(key) or [0])[0])


def _text_name(shape, names: dict[tuple[int, int], str], width_key: str, layer: str) -> str | None:
    """A text encoder release by width and layer count (`layer` formatted with a block index)."""
    for (width, depth), name in names.items():
        if (shape(width_key) or [0, 0])[1] == width and shape(layer.format(depth - 1)) and \
                not shape(layer.format(depth)):
            return name
    return None


UNET_CTX, D_UNET_CTX = "middle_block.1.transformer_blocks.0.attn2.to_k.weight", \
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
SIGNATURES = (  # priority order: the first family matched is the one reported
    Signature("flux", "official", ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight",
                                   "final_layer.adaLN_modulation.1.weight"),
              lambda s: _flux_name(s, "img_in.weight", "guidance_in.in_layer.weight", "single_blocks.37.linear1.weight",
                                   "single_blocks.38.linear1.weight")),
    Signature("flux", "diffusers", ("x_embedder.weight", "context_embedder.weight", "norm_out.linear.weight",
                                    "time_text_embed.timestep_embedder.linear_1.weight"),
              lambda s: _flux_name(s, "x_embedder.weight", "time_text_embed.guidance_embedder.linear_1.weight",
                                   "single_transformer_blocks.37.proj_out.weight",
                                   "single_transformer_blocks.38.proj_out.weight")),
    Signature("sana", "official", ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.y_proj.fc1.weight",
                                   "blocks.0.mlp.inverted_conv.conv.weight"),
              lambda s: _sana_name(s, "x_embedder.proj.weight")),
    Signature("sana", "diffusers", ("patch_embed.proj.weight", "caption_projection.linear_1.weight",
                                    "transformer_blocks.0.ff.conv_inverted.weight"),
              lambda s: _sana_name(s, "patch_embed.proj.weight")),
    Signature("controlnet", "official", ("input_hint_block.0.weight", "zero_convs.0.0.weight",
                                         "middle_block_out.0.weight"),
              lambda s: _controlnet_name(s, UNET_CTX)),
    Signature("controlnet", "diffusers", ("controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight",
                                          "controlnet_mid_block.weight"),
              lambda s: _controlnet_name(s, D_UNET_CTX)),
    Signature("t2i_adapter", "official", ("conv_in.weight", "body.0.block1.weight")),
    Signature("t2i_adapter", "official", ("body.0.in_conv.weight", "body.0.body.0.block1.weight"), lambda s: None),
    Signature("t2i_adapter", "diffusers", ("adapter.body.0.resnets.0.block1.weight",)),
    Signature("unet", "official", ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight"),
              lambda s: _unet_name(s, UNET_CTX, "middle_block.1.proj_in.weight", "input_blocks.0.0.weight",
                                   "label_emb.0.0.weight", "input_blocks.0.0.weight")),
    Signature("unet", "diffusers", ("conv_in.weight", "time_embedding.linear_1.weight",
                                    "down_blocks.0.resnets.0.conv1.weight", "conv_norm_out.weight"),
              lambda s: _unet_name(s, D_UNET_CTX, "mid_block.attentions.0.proj_in.weight", "conv_in.weight",
                                   "add_embedding.linear_1.weight", "conv_in.weight")),
    Signature("dc_ae", "official", ("encoder.project_out.main.op_list.0.conv.weight",
                                    "decoder.project_out.op_list.0.weight")),
    Signature("autoencoder", "official", ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight",
                                          "decoder.up.0.block.0.conv1.weight", "decoder.conv_out.weight"),
              lambda s: _vae_name(s, "quant_conv.weight", "encoder.conv_out.weight")),
    Signature("autoencoder", "diffusers", ("encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight",
                                           "decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.conv_out.weight"),
              lambda s: _vae_name(s, "quant_conv.weight", "encoder.conv_out.weight")),
    # after the AutoencoderKL layouts, whose files hold these keys too: any DC-AE structure (its stem and head differ)
    Signature("dc_ae", "diffusers", ("encoder.conv_out.weight", "decoder.norm_out.bias",
                                     "decoder.conv_in.weight")),
    Signature("clip_text", "official", ("text_model.embeddings.token_embedding.weight",
                                        "text_model.final_layer_norm.weight"),
              lambda s: _text_name(s, {(768, 12): "clip-l", (1024, 24): "clip-h", (1280, 32): "clip-g"},
                                   "text_model.embeddings.token_embedding.weight",
                                   "text_model.encoder.layers.{}.mlp.fc1.weight")),
    Signature("clip_text", "diffusers", ("embeddings.token_embedding.weight", "final_layer_norm.weight",
                                         "encoder.layers.0.self_attn.q_proj.weight"),
              lambda s: _text_name(s, {(768, 12): "clip-l", (1024, 24): "clip-h", (1280, 32): "clip-g"},
                                   "embeddings.token_embedding.weight", "encoder.layers.{}.mlp.fc1.weight")),
    Signature("clip_text", "openclip", ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                                        "transformer.resblocks.0.attn.in_proj_weight"),
              lambda s: _text_name(s, {(768, 12): "clip-l", (1024, 24): "clip-h", (1280, 32): "clip-g"},
                                   "token_embedding.weight", "transformer.resblocks.{}.attn.in_proj_weight")),
    Signature("t5_encoder", "official", ("encoder.block.0.layer.0.SelfAttention.q.weight",
                                         "encoder.final_layer_norm.weight"),
              lambda s: _text_name(s, {(4096, 24): "t5-xxl"}, "shared.weight",
                                   "encoder.block.{}.layer.0.SelfAttention.q.weight")),
    Signature("gemma2", "official", ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
                                     "layers.0.pre_feedforward_layernorm.weight", "norm.weight"),
              lambda s: _text_name(s, {(2304, 26): "gemma2-2b"}, "embed_tokens.weight",
                                   "layers.{}.self_attn.q_proj.weight")),
)
MAIN_FAMILIES = ("flux", "sana", "controlnet", "t2i_adapter", "unet")  # preferred over a VAE in the same file


def _shape_fn(sd: Mapping[str, Tensor], prefix: str):
    def shape(key: str) -> tuple | None:
        t = sd.get(prefix + key)
        return tuple(t.shape) if t is not None else None
    return shape


def _prefixes(keys) -> list[str]:
    return [""] + [p for p in PREFIXES if any(k.startswith(p) for k in keys)]


def _matches(sd: Mapping[str, Tensor]) -> list[tuple[str, Signature]]:
    found, taken, prefixes = [], set(), _prefixes(sd)
    for sig in SIGNATURES:
        for p in prefixes:
            if p not in taken and all(p + k in sd for k in sig.keys):
                found.append((p, sig))
                taken.add(p)
    return found


def official_shapes(sd: Mapping[str, Tensor], family: str, layout: str, prefix: str = "",
                    skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Key -> shape of the model under `prefix` in the official layout (a diffusers layout mapped on `meta`)."""
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not (skip and k.startswith(skip))}
    if layout != "official":
        metas = {k: torch.empty(tuple(v.shape), device="meta") for k, v in sub.items()}
        sub = key_map(family, "official")(metas)
    return {k: tuple(v.shape) for k, v in sub.items()}


def _fields(sd: Mapping[str, Tensor], sig: Signature, prefix: str, skip: tuple[str, ...]) -> tuple:
    hints = hints_from(sig.family, getattr(sd, "config", None), getattr(sd, "metadata", None))
    try:
        shapes = official_shapes(sd, sig.family, sig.layout, prefix, skip)
    except (ValueError, KeyError, IndexError):
        return None, {}, hints
    return (*read_fields(sig.family, shapes, hints), hints)


def _detect_lora(sd: Mapping[str, Tensor], kind: LoRAKind) -> Detection:
    joined = " ".join(list(sd)[:200])
    base = next((fam for fam, pat in (
        ("flux", r"double_blocks|single_blocks"), ("flux", r"single_transformer_blocks"),
        ("sana", r"blocks[._]\d+[._]cross_attn"), ("unet", r"input_blocks|middle_block|down_blocks|mid_block"),
    ) if re.search(pat, joined)), None)
    ranks = lora_ranks(sd, kind)
    note = f"base family {base or 'unknown'}, rank(s) {ranks or '?'}" + (f"; {kind.note}" if kind.note else "")
    return Detection("lora", kind.name, note=note, fields={"base": base, "ranks": ranks})


def detect(sd: Mapping[str, Tensor]) -> Detection:
    """Family, config name, layout and wrapper prefix of a state dict; `DetectError` naming the nearest families."""
    if not sd:
        raise DetectError("empty state dict: nothing to detect")
    kind = lora_kind(sd)
    if kind is not None:
        return _detect_lora(sd, kind)
    bnb = bnb_kind(sd)
    if bnb is not None:  # the model under the packing, named with its quantisation
        view = unpacked_view(sd, bnb[1])
        det = detect(view) if view else None
        if det is None:
            raise DetectError(f"a {bnb[0]} file with nothing but quantisation tensors")
        return replace(det, quant=bnb[0])
    found = _matches(sd)
    if not found:
        raise DetectError(_nearest(sd))
    found.sort(key=lambda m: m[1].family not in MAIN_FAMILIES)  # stable: keeps the signature priority otherwise
    prefix, sig = found[0]
    others = {p: s.family for p, s in found[1:]}
    fields, assumed, hints = _fields(sd, sig, prefix, tuple(others) if not prefix else ())
    name = sig.name(_shape_fn(sd, prefix))
    return Detection(sig.family, sig.layout, name, prefix, fields, others,
                     note="the SDXL VAE has the same shapes (it differs in scale_factor)" if name == "vae-sd" else "",
                     assumed=assumed, hints={k: v for k, v in hints.items() if fields and k in fields})


def detect_all(sd: Mapping[str, Tensor]) -> list[Detection]:
    """Every model found in a state dict (a full checkpoint holds several), one `Detection` per prefix."""
    return [Detection(s.family, s.layout, s.name(_shape_fn(sd, p)), p) for p, s in _matches(sd)]


def _nearest(sd: Mapping[str, Tensor]) -> str:
    scored, prefixes = [], _prefixes(sd)
    for sig in SIGNATURES:
        for p in prefixes:
            have = [k for k in sig.keys if p + k in sd]
            scored.append((len(have) / len(sig.keys), sig, p, [k for k in sig.keys if p + k not in sd]))
    scored.sort(key=lambda x: -x[0])
    lines, seen = [], set()
    for score, sig, p, missing in scored:
        if (sig.family, sig.layout) in seen:
            continue
        seen.add((sig.family, sig.layout))
        where = f" under prefix {p!r}" if p else ""
        lines.append(f"  {sig.family} ({sig.layout}){where}: {score:.0%} of its signature keys; missing {missing}")
        if len(lines) == 3:
            break
    sample = list(sd)[:5]
    return (f"no known model family matches this state dict ({len(sd)} keys, e.g. {sample}); nearest:\n"
            + "\n".join(lines))


def describe(sd: Mapping[str, Tensor]) -> dict[str, str]:
    """Family, layout and config name as safetensors metadata, where `detect` recognises the model ({} if not)."""
    try:
        det = detect(sd)
    except DetectError:
        return {}
    return {"zoo_family": det.family, "zoo_layout": det.layout, **({"zoo_config": det.config} if det.config else {})}
