"""AutoencoderKL: official (LDM / Black Forest Labs) <-> diffusers `AutoencoderKL` key map.

Official names: `encoder.down.{i}.block.{j}`, `decoder.up.{i}.block.{j}` (`up.0` = full resolution),
`mid.block_1|attn_1|block_2`, `nin_shortcut`, attention `q|k|v|proj_out` as 1x1 convs; the LDM layout adds
`quant_conv`/`post_quant_conv`, BFL's has none. Diffusers numbers its decoder `up_blocks` from the deepest level
and stores the attention projections as Linear weights.
"""
from __future__ import annotations

from torch import Tensor

from checkpoints_convert.keymap import Entry, block_count, to_diffusers, to_official


def _resnet(official: str, diffusers: str) -> list[Entry]:
    e = [Entry(f"{official}.{n}", (f"{diffusers}.{n}",)) for n in ("norm1", "conv1", "norm2", "conv2")]
    # the 1x1 skip exists only where the width changes
    return e + [Entry(f"{official}.nin_shortcut", (f"{diffusers}.conv_shortcut",), optional=True)]


def _mid(official: str, diffusers: str) -> list[Entry]:
    a, d = f"{official}.attn_1", f"{diffusers}.attentions.0"
    return [
        *_resnet(f"{official}.block_1", f"{diffusers}.resnets.0"),
        Entry(f"{a}.norm", (f"{d}.group_norm",)),
        *(Entry(f"{a}.{n}", (f"{d}.to_{n}",), conv1x1=True) for n in ("q", "k", "v")),
        Entry(f"{a}.proj_out", (f"{d}.to_out.0",), conv1x1=True),
        *_resnet(f"{official}.block_2", f"{diffusers}.resnets.1"),
    ]


def autoencoder_entries(levels: int, num_res_blocks: int, quant_convs: bool) -> list[Entry]:
    """The whole map for `levels` resolutions of `num_res_blocks` encoder blocks (the decoder has one more)."""
    e = [Entry("encoder.conv_in", ("encoder.conv_in",))]
    for i in range(levels):
        for j in range(num_res_blocks):
            e += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            e.append(Entry(f"encoder.down.{i}.downsample.conv", (f"encoder.down_blocks.{i}.downsamplers.0.conv",)))
    e += _mid("encoder.mid", "encoder.mid_block")
    e += [Entry("encoder.norm_out", ("encoder.conv_norm_out",)), Entry("encoder.conv_out", ("encoder.conv_out",))]

    e += [Entry("decoder.conv_in", ("decoder.conv_in",)), *_mid("decoder.mid", "decoder.mid_block")]
    for i in range(levels):
        d = f"decoder.up_blocks.{levels - 1 - i}"  # diffusers counts from the deepest level
        for j in range(num_res_blocks + 1):
            e += _resnet(f"decoder.up.{i}.block.{j}", f"{d}.resnets.{j}")
        if i > 0:
            e.append(Entry(f"decoder.up.{i}.upsample.conv", (f"{d}.upsamplers.0.conv",)))
    e += [Entry("decoder.norm_out", ("decoder.conv_norm_out",)), Entry("decoder.conv_out", ("decoder.conv_out",))]
    if quant_convs:
        e += [Entry("quant_conv", ("quant_conv",)), Entry("post_quant_conv", ("post_quant_conv",))]
    return e


def autoencoder_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official (LDM or BFL) autoencoder state dict -> diffusers `AutoencoderKL` state dict (same tensors, views)."""
    entries = autoencoder_entries(block_count(sd, "encoder.down"), block_count(sd, "encoder.down.0.block"),
                                  "quant_conv.weight" in sd)
    return to_diffusers(entries, sd)


def autoencoder_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `AutoencoderKL` state dict -> the official layout (LDM if it has quant convs, else BFL)."""
    entries = autoencoder_entries(block_count(sd, "encoder.down_blocks"),
                                  block_count(sd, "encoder.down_blocks.0.resnets"), "quant_conv.weight" in sd)
    return to_official(entries, sd)


__all__ = ["autoencoder_entries", "autoencoder_to_diffusers", "autoencoder_from_diffusers"]
