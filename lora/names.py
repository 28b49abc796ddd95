"""Per-family name maps: how a model's official module names relate to diffusers', for placing LoRA factors.

The entries are `checkpoints_convert`'s key maps; a fused official module also needs its row count (the sizes of
its diffusers parts), read off a checkpoint's shapes or a LoRA's own factors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from checkpoints_convert.flux import flux_entries, flux_widths
from checkpoints_convert.keymap import WRAPPER_PREFIXES, Entry
from checkpoints_convert.unet import (
    diffusers_label,
    diffusers_structure,
    official_label,
    official_structure,
    unet_entries,
)
from lora.factor import Factor

UNET_DIFFUSERS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
                  "add_embedding.", "class_embedding")
LABEL = "add_embedding"  # where diffusers puts SDXL's `label_emb` (text_time)


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
    if any(m.startswith(UNET_DIFFUSERS) for m in modules):
        return Family("unet")  # diffusers UNet names: their official names depend on the block structure
    return Family()


def strip_wrapper(name: str) -> str:
    """A module name without the wrapper prefix it was saved under (`diffusion_model.`, `transformer.`, ...)."""
    for p in WRAPPER_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name
