"""LDM/SGM UNet, cldm ControlNet and T2I-Adapter: official <-> diffusers key maps.

The block structure (res blocks per level, transformer depth per block, resamplers) is read from the keys of
whichever side is given, then one list of `Entry`s serves both directions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from checkpoints_convert.keymap import Entry, block_count, to_diffusers, to_official

LABEL_TARGETS = ("add_embedding", "class_embedding")  # SDXL's text_time vs a "projection" class embedding


@dataclass
class Level:
    attn: list[int] = field(default_factory=list)  # transformer depth per res block (0: no SpatialTransformer)
    resample: bool = False  # down_blocks: a downsampler after it; up_blocks: an upsampler


@dataclass
class Structure:
    down: list[Level]
    mid_depth: int
    up: list[Level]  # diffusers order (deepest first), as the official output_blocks


def _resnet(o: str, d: str) -> list[Entry]:
    names = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
    return [Entry(f"{o}.{a}", (f"{d}.{b}",)) for a, b in names] + [
        Entry(f"{o}.skip_connection", (f"{d}.conv_shortcut",), optional=True)]


def _transformer(o: str, d: str, depth: int) -> list[Entry]:
    e = [Entry(f"{o}.{n}", (f"{d}.{n}",)) for n in ("norm", "proj_in", "proj_out")]
    for k in range(depth):
        names = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"]
        e += [Entry(f"{o}.transformer_blocks.{k}.{n}", (f"{d}.transformer_blocks.{k}.{n}",)) for n in names]
    return e


def _block(o: str, d: str, j: int, depth: int) -> list[Entry]:
    """Official block `o` (ResBlock `.0`, SpatialTransformer `.1`) <-> `d`.resnets.j and `d`.attentions.j."""
    e = _resnet(f"{o}.0", f"{d}.resnets.{j}")
    return e + (_transformer(f"{o}.1", f"{d}.attentions.{j}", depth) if depth else [])


def _encoder_entries(s: Structure, label: str | None) -> list[Entry]:
    """time/label embeddings, conv_in, input blocks and the middle block (UNet and ControlNet alike)."""
    e = [Entry("time_embed.0", ("time_embedding.linear_1",)), Entry("time_embed.2", ("time_embedding.linear_2",)),
         Entry("input_blocks.0.0", ("conv_in",))]
    if label == "class_table":
        e.append(Entry("label_emb", ("class_embedding",)))
    elif label is not None:
        e += [Entry("label_emb.0.0", (f"{label}.linear_1",)), Entry("label_emb.0.2", (f"{label}.linear_2",))]
    n = 1
    for i, lv in enumerate(s.down):
        for j, depth in enumerate(lv.attn):
            e += _block(f"input_blocks.{n}", f"down_blocks.{i}", j, depth)
            n += 1
        if lv.resample:
            e.append(Entry(f"input_blocks.{n}.0.op", (f"down_blocks.{i}.downsamplers.0.conv",)))
            n += 1
    e += _resnet("middle_block.0", "mid_block.resnets.0") + _resnet("middle_block.2", "mid_block.resnets.1")
    if s.mid_depth:
        e += _transformer("middle_block.1", "mid_block.attentions.0", s.mid_depth)
    return e


def unet_entries(s: Structure, label: str | None = None) -> list[Entry]:
    """The whole UNet map; `label`: diffusers module of `label_emb` (None, 'class_table' or a LABEL_TARGETS)."""
    e = _encoder_entries(s, label)
    n = 0
    for i, lv in enumerate(s.up):
        for j, depth in enumerate(lv.attn):
            e += _block(f"output_blocks.{n}", f"up_blocks.{i}", j, depth)
            if lv.resample and j == len(lv.attn) - 1:
                e.append(Entry(f"output_blocks.{n}.{2 if depth else 1}.conv", (f"up_blocks.{i}.upsamplers.0.conv",)))
            n += 1
    return e + [Entry("out.0", ("conv_norm_out",)), Entry("out.2", ("conv_out",))]


# ---- structure from keys ----

def official_structure(keys: set[str]) -> Structure:
    """Levels, res blocks per level, transformer depth per block and resamplers of an official UNet/ControlNet."""
    depth = lambda prefix: block_count(keys, f"{prefix}.transformer_blocks")
    down = [Level()]
    for n in range(1, block_count(keys, "input_blocks")):
        if f"input_blocks.{n}.0.op.weight" in keys:
            down[-1].resample = True
            down.append(Level())
        else:
            down[-1].attn.append(depth(f"input_blocks.{n}.1"))
    up, n = [], 0
    for lv in reversed(down):
        level = Level()
        for _ in range(len(lv.attn) + 1):
            level.attn.append(depth(f"output_blocks.{n}.1"))
            level.resample |= any(f"output_blocks.{n}.{k}.conv.weight" in keys for k in (1, 2))
            n += 1
        up.append(level)
    return Structure(down, depth("middle_block.1"), up)


def _diffusers_levels(keys: set[str], prefix: str) -> list[Level]:
    sampler = "downsamplers" if prefix == "down_blocks" else "upsamplers"
    return [Level([block_count(keys, f"{prefix}.{i}.attentions.{j}.transformer_blocks")
                   for j in range(block_count(keys, f"{prefix}.{i}.resnets"))],
                  f"{prefix}.{i}.{sampler}.0.conv.weight" in keys)
            for i in range(block_count(keys, prefix))]


def diffusers_structure(keys: set[str]) -> Structure:
    """The same `Structure` read off diffusers keys (`down_blocks` / `mid_block` / `up_blocks`)."""
    up = _diffusers_levels(keys, "up_blocks") if any(k.startswith("up_blocks.") for k in keys) else []
    return Structure(_diffusers_levels(keys, "down_blocks"),
                     block_count(keys, "mid_block.attentions.0.transformer_blocks"), up)


def official_label(keys: set[str], target: str) -> str | None:
    """Where the official `label_emb` goes in diffusers: None, 'class_table' or `target` (a LABEL_TARGETS)."""
    if target not in LABEL_TARGETS:
        raise ValueError(f"label_target {target!r}: expected one of {LABEL_TARGETS}")
    if "label_emb.weight" in keys:
        return "class_table"
    return target if "label_emb.0.0.weight" in keys else None


def diffusers_label(keys: set[str]) -> str | None:
    """The diffusers module holding the label embedding: None, 'class_table' or one of LABEL_TARGETS."""
    if "class_embedding.weight" in keys:
        return "class_table"
    return next((t for t in LABEL_TARGETS if f"{t}.linear_1.weight" in keys), None)


# ---- public functions ----

def unet_to_diffusers(sd: dict[str, Tensor], label_target: str = "add_embedding") -> dict[str, Tensor]:
    """Official UNet state dict -> diffusers `UNet2DConditionModel` (`label_target`: where `label_emb.0` goes)."""
    keys = set(sd)
    return to_diffusers(unet_entries(official_structure(keys), official_label(keys, label_target)), sd)


def unet_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `UNet2DConditionModel` state dict -> official LDM/SGM layout."""
    keys = set(sd)
    return to_official(unet_entries(diffusers_structure(keys), diffusers_label(keys)), sd)


def controlnet_entries(s: Structure, label: str | None, hint_convs: int) -> list[Entry]:
    """The cldm ControlNet map: the encoder, `input_hint_block` (convs at even indices), zero convs."""
    e = _encoder_entries(s, label)
    e.append(Entry("input_hint_block.0", ("controlnet_cond_embedding.conv_in",)))
    e += [Entry(f"input_hint_block.{2 * k}", (f"controlnet_cond_embedding.blocks.{k - 1}",))
          for k in range(1, hint_convs - 1)]
    e.append(Entry(f"input_hint_block.{2 * (hint_convs - 1)}", ("controlnet_cond_embedding.conv_out",)))
    n_in = 1 + sum(len(lv.attn) + lv.resample for lv in s.down)
    e += [Entry(f"zero_convs.{i}.0", (f"controlnet_down_blocks.{i}",)) for i in range(n_in)]
    return e + [Entry("middle_block_out.0", ("controlnet_mid_block",))]


def controlnet_to_diffusers(sd: dict[str, Tensor], label_target: str = "add_embedding") -> dict[str, Tensor]:
    """Official cldm ControlNet state dict -> diffusers `ControlNetModel`."""
    keys = set(sd)
    hint = len({k.split(".")[1] for k in keys if k.startswith("input_hint_block.")})
    s = official_structure(keys)
    return to_diffusers(controlnet_entries(s, official_label(keys, label_target), hint), sd)


def controlnet_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `ControlNetModel` state dict -> official cldm layout."""
    keys = set(sd)
    hint = 2 + block_count(keys, "controlnet_cond_embedding.blocks")
    return to_official(controlnet_entries(diffusers_structure(keys), diffusers_label(keys), hint), sd)


def t2i_adapter_entries(levels: int, nums_rb: int, in_convs: list[bool]) -> list[Entry]:
    """Official full `Adapter` (body.{level * nums_rb + j}) <-> diffusers (adapter.body.{level}.resnets.{j})."""
    e = [Entry("conv_in", ("adapter.conv_in",))]
    for i in range(levels):
        if in_convs[i]:
            e.append(Entry(f"body.{i * nums_rb}.in_conv", (f"adapter.body.{i}.in_conv",)))
        for j in range(nums_rb):
            e += [Entry(f"body.{i * nums_rb + j}.{b}", (f"adapter.body.{i}.resnets.{j}.{b}",))
                  for b in ("block1", "block2")]
    return e


def t2i_adapter_to_diffusers(sd: dict[str, Tensor], nums_rb: int = 2) -> dict[str, Tensor]:
    """Official T2I-Adapter (full adapter; `nums_rb` res blocks per level, 2 in every release) -> diffusers."""
    blocks = block_count(sd, "body")
    if blocks % nums_rb:
        raise ValueError(f"T2I-Adapter has {blocks} body blocks, not a multiple of nums_rb={nums_rb}")
    levels = blocks // nums_rb
    in_convs = [f"body.{i * nums_rb}.in_conv.weight" in sd for i in range(levels)]
    return to_diffusers(t2i_adapter_entries(levels, nums_rb, in_convs), sd)


def t2i_adapter_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `T2IAdapter` (full_adapter) state dict -> official layout."""
    levels = block_count(sd, "adapter.body")
    nums_rb = block_count(sd, "adapter.body.0.resnets")
    in_convs = [f"adapter.body.{i}.in_conv.weight" in sd for i in range(levels)]
    return to_official(t2i_adapter_entries(levels, nums_rb, in_convs), sd)


__all__ = [
    "unet_to_diffusers", "unet_from_diffusers", "controlnet_to_diffusers", "controlnet_from_diffusers",
    "t2i_adapter_to_diffusers", "t2i_adapter_from_diffusers", "unet_entries", "controlnet_entries",
    "t2i_adapter_entries", "Structure", "Level", "official_structure", "diffusers_structure", "official_label",
    "diffusers_label", "LABEL_TARGETS",
]
