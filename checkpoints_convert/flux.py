"""Flux transformer: official (Black Forest Labs) <-> diffusers `FluxTransformer2DModel` key map."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from checkpoints_convert.keymap import Entry, block_count, to_diffusers, to_official

RMS = (("scale", "weight"),)  # RMSNorm's official `scale` is diffusers' `weight`


def _embedder(official: str, diffusers: str, optional: bool = False) -> list[Entry]:
    return [Entry(f"{official}.in_layer", (f"{diffusers}.linear_1",), optional=optional),
            Entry(f"{official}.out_layer", (f"{diffusers}.linear_2",), optional=optional)]


def flux_entries(depth: int, depth_single: int, hidden: int) -> list[Entry]:
    """The whole map for a Flux with `depth` double and `depth_single` single blocks of width `hidden`."""
    e = [Entry("img_in", ("x_embedder",)), Entry("txt_in", ("context_embedder",))]
    e += _embedder("time_in", "time_text_embed.timestep_embedder")
    e += _embedder("vector_in", "time_text_embed.text_embedder")
    e += _embedder("guidance_in", "time_text_embed.guidance_embedder", optional=True)
    for i in range(depth):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        e += [
            Entry(f"{o}.img_mod.lin", (f"{d}.norm1.linear",)),
            Entry(f"{o}.txt_mod.lin", (f"{d}.norm1_context.linear",)),
            Entry(f"{o}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
            Entry(f"{o}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")),
            Entry(f"{o}.img_attn.norm.query_norm", (f"{d}.attn.norm_q",), param_names=RMS),
            Entry(f"{o}.img_attn.norm.key_norm", (f"{d}.attn.norm_k",), param_names=RMS),
            Entry(f"{o}.txt_attn.norm.query_norm", (f"{d}.attn.norm_added_q",), param_names=RMS),
            Entry(f"{o}.txt_attn.norm.key_norm", (f"{d}.attn.norm_added_k",), param_names=RMS),
            Entry(f"{o}.img_attn.proj", (f"{d}.attn.to_out.0",)),
            Entry(f"{o}.txt_attn.proj", (f"{d}.attn.to_add_out",)),
            Entry(f"{o}.img_mlp.0", (f"{d}.ff.net.0.proj",)),
            Entry(f"{o}.img_mlp.2", (f"{d}.ff.net.2",)),
            Entry(f"{o}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",)),
            Entry(f"{o}.txt_mlp.2", (f"{d}.ff_context.net.2",)),
        ]
    qkv_mlp = lambda rows: [hidden, hidden, hidden, rows - 3 * hidden]  # linear1 = [q | k | v | mlp_in]
    for i in range(depth_single):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        e += [
            Entry(f"{o}.modulation.lin", (f"{d}.norm.linear",)),
            Entry(f"{o}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"),
                  sizes=qkv_mlp),
            Entry(f"{o}.norm.query_norm", (f"{d}.attn.norm_q",), param_names=RMS),
            Entry(f"{o}.norm.key_norm", (f"{d}.attn.norm_k",), param_names=RMS),
            Entry(f"{o}.linear2", (f"{d}.proj_out",)),
        ]
    # diffusers' AdaLayerNormContinuous splits (scale, shift); the official LastLayer (shift, scale)
    e += [Entry("final_layer.linear", ("proj_out",)),
          Entry("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True)]
    return e


def flux_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official Flux state dict -> diffusers `FluxTransformer2DModel` state dict (same tensors, split views)."""
    entries = flux_entries(block_count(sd, "double_blocks"), block_count(sd, "single_blocks"),
                           sd["img_in.weight"].shape[0])
    return to_diffusers(entries, sd)


def flux_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `FluxTransformer2DModel` state dict -> official Flux layout."""
    entries = flux_entries(block_count(sd, "transformer_blocks"), block_count(sd, "single_transformer_blocks"),
                           sd["x_embedder.weight"].shape[0])
    return to_official(entries, sd)


def flux_widths(shapes: Mapping[str, Sequence[int]]) -> dict[str, int] | None:
    """Widths and depths of a Flux read off its keys and shapes, official or diffusers layout (no wrapper prefix):
    hidden, mlp_hidden, head_dim (None where no q/k norm is present), depth, depth_single; None if no Flux."""
    o = "img_in.weight" in shapes
    if not o and "x_embedder.weight" not in shapes:
        return None
    blocks, singles = ("double_blocks", "single_blocks") if o else ("transformer_blocks", "single_transformer_blocks")
    hidden = shapes["img_in.weight" if o else "x_embedder.weight"][0]
    norm = shapes.get(f"{blocks}.0.img_attn.norm.query_norm.scale" if o else f"{blocks}.0.attn.norm_q.weight") or \
        shapes.get(f"{singles}.0.norm.query_norm.scale" if o else f"{singles}.0.attn.norm_q.weight")
    mlp = shapes.get(f"{blocks}.0.img_mlp.0.weight" if o else f"{blocks}.0.ff.net.0.proj.weight")
    mlp_hidden = mlp[0] if mlp else None
    if mlp_hidden is None:  # no double block: the single blocks' linear1 is [q | k | v | mlp_in]
        lin1 = shapes.get(f"{singles}.0.linear1.weight" if o else f"{singles}.0.proj_mlp.weight")
        mlp_hidden = (lin1[0] - (3 * hidden if o else 0)) if lin1 else None
    return dict(hidden=hidden, mlp_hidden=mlp_hidden, head_dim=norm[0] if norm else None,
                depth=block_count(shapes, blocks), depth_single=block_count(shapes, singles))
