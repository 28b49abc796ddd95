"""DC-AE: official (MIT HAN Lab efficientvit `DCAE`) <-> diffusers `AutoencoderDC` key map.

Official names nest the EfficientViT containers: `encoder.stages.{i}.op_list.{j}` blocks, `Residual.main`,
`ConvLayer.conv|norm`, attention `context_module.main.qkv|aggreg|proj`, GLUMBConv `local_module.main.*`.
Diffusers flattens them (`encoder.down_blocks.{i}.{j}`, `decoder.up_blocks.{i}.{j}`), splits the fused 1x1 qkv
conv into Linear `to_q|to_k|to_v` and stores the attention's output conv as a Linear `to_out`. The map agrees
key for key with diffusers' single-file converter (`convert_autoencoder_dc_checkpoint_to_diffusers`).
"""
from __future__ import annotations

import re

from torch import Tensor

from checkpoints_convert.keymap import Entry, KeyMapError, to_diffusers, to_official

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm (the mix releases' bn2d stages)
_BLOCK = r"(?P<side>encoder|decoder)\.stages\.(?P<i>\d+)\.op_list\.(?P<j>\d+)"

# official module path (regex) -> diffusers module path(s) (format strings over the groups), per block part
_INNER = [
    (r"main\.conv1\.conv", ("conv1",)),
    (r"main\.conv2\.conv", ("conv2",)),
    (r"main\.conv2\.norm", ("norm",)),
    (r"context_module\.main\.qkv\.conv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    (r"context_module\.main\.aggreg\.(?P<s>\d+)\.0", ("attn.to_qkv_multiscale.{s}.proj_in",)),
    (r"context_module\.main\.aggreg\.(?P<s>\d+)\.1", ("attn.to_qkv_multiscale.{s}.proj_out",)),
    (r"context_module\.main\.proj\.conv", ("attn.to_out",)),
    (r"context_module\.main\.proj\.norm", ("attn.norm_out",)),
    (r"local_module\.main\.inverted_conv\.conv", ("conv_out.conv_inverted",)),
    (r"local_module\.main\.depth_conv\.conv", ("conv_out.conv_depth",)),
    (r"local_module\.main\.point_conv\.conv", ("conv_out.conv_point",)),
    (r"local_module\.main\.point_conv\.norm", ("conv_out.norm",)),
    (r"main\.conv(?:\.conv)?", ("conv",)),  # a resampler: stride-2 conv, or the conv inside (un)shuffle layers
]
_OUTER = [
    (r"encoder\.project_in\.conv", ("encoder.conv_in",)),
    (r"encoder\.project_in\.conv\.conv", ("encoder.conv_in.conv",)),
    (r"encoder\.project_out\.(?:main\.)?op_list\.0\.conv", ("encoder.conv_out",)),
    (r"decoder\.project_in\.(?:main\.)?conv", ("decoder.conv_in",)),
    (r"decoder\.project_out\.op_list\.0", ("decoder.norm_out",)),
    (r"decoder\.project_out\.op_list\.2\.conv", ("decoder.conv_out",)),
    (r"decoder\.project_out\.op_list\.2\.conv\.conv", ("decoder.conv_out.conv",)),
]
_SIDE = {"encoder": "down_blocks", "decoder": "up_blocks"}
_LINEAR = ("attn.to_q", "attn.to_out")  # 1x1 convs officially, Linear layers in diffusers


def _official_to_diffusers_module(module: str) -> tuple[str, ...]:
    for pattern, names in _OUTER:
        if re.fullmatch(pattern, module):
            return names
    m = re.match(_BLOCK + r"\.", module)
    if m:
        rest = module[m.end():]
        for pattern, names in _INNER:
            r = re.fullmatch(pattern, rest)
            if r:
                d = f"{m['side']}.{_SIDE[m['side']]}.{m['i']}.{m['j']}"
                return tuple(f"{d}.{n.format(**r.groupdict())}" for n in names)
    raise KeyMapError(f"official -> diffusers: {module!r} is not a DC-AE module")


def _entry(official: str, diffusers: tuple[str, ...]) -> Entry:
    return Entry(official, diffusers, conv1x1=diffusers[0].endswith(_LINEAR))


def _split_buffers(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    buffers = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] in BUFFERS}
    return {k: v for k, v in sd.items() if k not in buffers}, buffers


def dc_ae_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official DC-AE state dict (optionally under `state_dict`'s prefixes removed) -> diffusers `AutoencoderDC`."""
    params, buffers = _split_buffers(sd)
    modules = dict.fromkeys(k.rsplit(".", 1)[0] for k in params)
    out = to_diffusers([_entry(m, _official_to_diffusers_module(m)) for m in modules], params)
    for k, v in buffers.items():
        module, name = k.rsplit(".", 1)
        out[f"{_official_to_diffusers_module(module)[0]}.{name}"] = v
    return out


def _in_width(sd: dict[str, Tensor], prefix: str) -> int | None:
    """Input channels of the first weight under `prefix` (the width a resampler must produce)."""
    for suffix in ("conv1.weight", "attn.to_q.weight", "weight"):
        for k, v in sd.items():
            if k.startswith(prefix) and k.endswith(suffix):
                return v.shape[1]
    return None


def _diffusers_to_official_module(module: str, sd: dict[str, Tensor]) -> str:
    for pattern, names in _OUTER:
        if module == names[0]:
            return pattern.replace("(?:main\\.)?", "main.").replace("\\", "")
    m = re.match(r"(?P<side>encoder|decoder)\.(?:down|up)_blocks\.(?P<i>\d+)\.(?P<j>\d+)\.", module)
    if m:
        rest = module[m.end():]
        prefix = f"{m['side']}.stages.{m['i']}.op_list.{m['j']}"
        if rest == "conv":  # a resampler: only the encoder's stride-2 `Conv` has no inner conv layer
            weight = sd[f"{module}.weight"]
            nxt = _in_width(sd, f"encoder.down_blocks.{int(m['i']) + 1}.") or _in_width(sd, "encoder.conv_out.")
            plain = m["side"] == "encoder" and weight.shape[0] == nxt
            return f"{prefix}.main.conv" + ("" if plain else ".conv")
        for pattern, names in _INNER:
            for s in range(8):
                if names[0].format(s=s) == rest:
                    return f"{prefix}." + pattern.replace("(?P<s>\\d+)", str(s)).replace("\\", "")
    raise KeyMapError(f"diffusers -> official: {module!r} is not an AutoencoderDC module")


def dc_ae_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `AutoencoderDC` state dict -> the official DC-AE layout (the inverse of `dc_ae_to_diffusers`)."""
    params, buffers = _split_buffers(sd)
    entries: dict[str, Entry] = {}
    for k in params:
        module = k.rsplit(".", 1)[0]
        if module.endswith(("attn.to_k", "attn.to_v")):
            continue  # fused with to_q
        official = _diffusers_to_official_module(module, params)
        entries[official] = _entry(official, _official_to_diffusers_module(official))
    out = to_official(list(entries.values()), params)
    for k, v in buffers.items():
        module, name = k.rsplit(".", 1)
        out[f"{_diffusers_to_official_module(module, params)}.{name}"] = v
    return out


__all__ = ["dc_ae_to_diffusers", "dc_ae_from_diffusers"]
