"""Sana transformer: official (NVlabs `SanaMS`) <-> diffusers `SanaTransformer2DModel` key map."""
from __future__ import annotations

import torch
from torch import Tensor

from checkpoints_convert.keymap import Entry, KeyMapError, block_count, to_diffusers, to_official

# official-only buffers: the training-grid position table (unused by the multi-scale forward, zeros when
# use_pe is off) and the learned null caption used only for caption dropout while training
OFFICIAL_ONLY = ("pos_embed", "y_embedder.y_embedding")


def sana_entries(depth: int) -> list[Entry]:
    """The module map for a Sana with `depth` blocks (q/k norms and the caption norm are optional)."""
    e = [
        Entry("x_embedder.proj", ("patch_embed.proj",)),
        Entry("t_embedder.mlp.0", ("time_embed.emb.timestep_embedder.linear_1",)),
        Entry("t_embedder.mlp.2", ("time_embed.emb.timestep_embedder.linear_2",)),
        Entry("t_block.1", ("time_embed.linear",)),
        Entry("y_embedder.y_proj.fc1", ("caption_projection.linear_1",)),
        Entry("y_embedder.y_proj.fc2", ("caption_projection.linear_2",)),
        Entry("attention_y_norm", ("caption_norm",), optional=True),
        Entry("final_layer.linear", ("proj_out",)),
    ]
    for i in range(depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        e += [
            Entry(f"{o}.attn.qkv", (f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v")),
            Entry(f"{o}.attn.proj", (f"{d}.attn1.to_out.0",)),
            Entry(f"{o}.attn.q_norm", (f"{d}.attn1.norm_q",), optional=True),
            Entry(f"{o}.attn.k_norm", (f"{d}.attn1.norm_k",), optional=True),
            Entry(f"{o}.cross_attn.q_linear", (f"{d}.attn2.to_q",)),
            Entry(f"{o}.cross_attn.kv_linear", (f"{d}.attn2.to_k", f"{d}.attn2.to_v")),
            Entry(f"{o}.cross_attn.proj", (f"{d}.attn2.to_out.0",)),
            Entry(f"{o}.cross_attn.q_norm", (f"{d}.attn2.norm_q",), optional=True),
            Entry(f"{o}.cross_attn.k_norm", (f"{d}.attn2.norm_k",), optional=True),
            Entry(f"{o}.mlp.inverted_conv.conv", (f"{d}.ff.conv_inverted",)),
            Entry(f"{o}.mlp.depth_conv.conv", (f"{d}.ff.conv_depth",)),
            Entry(f"{o}.mlp.point_conv.conv", (f"{d}.ff.conv_point",)),
        ]
    return e


def _tables(depth: int) -> list[tuple[str, str]]:
    """The bare `scale_shift_table` parameters (no module of their own): official key -> diffusers key."""
    return [(f"blocks.{i}.scale_shift_table", f"transformer_blocks.{i}.scale_shift_table") for i in range(depth)] + \
        [("final_layer.scale_shift_table", "scale_shift_table")]


def _move_tables(sd: dict[str, Tensor], pairs: list[tuple[str, str]], direction: str) -> dict[str, Tensor]:
    missing = [src for src, _ in pairs if src not in sd]
    if missing:
        raise KeyMapError(f"{direction}: missing {len(missing)} key(s): {missing[:20]}")
    return {dst: sd.pop(src) for src, dst in pairs}


def sana_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official Sana state dict -> diffusers `SanaTransformer2DModel` (same tensors, split views).

    `pos_embed` and `y_embedder.y_embedding` have no diffusers counterpart and are dropped, as diffusers does.
    """
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    depth = block_count(sd, "blocks")
    out = _move_tables(sd, _tables(depth), "official -> diffusers")
    for key in OFFICIAL_ONLY:
        sd.pop(key, None)
    out.update(to_diffusers(sana_entries(depth), sd))
    return out


def sana_from_diffusers(sd: dict[str, Tensor], *, sample_size: int = 32, model_max_length: int = 300,
                        extras: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Diffusers `SanaTransformer2DModel` state dict -> official Sana layout.

    The official-only buffers are taken from `extras` when given, else made as zeros: `pos_embed`
    (1, (sample_size / patch)^2, D) and `y_embedder.y_embedding` (model_max_length, caption_channels);
    the forward uses neither (pass the originals in `extras` for a bit-exact round trip).
    """
    sd = dict(sd)
    depth = block_count(sd, "transformer_blocks")
    out = _move_tables(sd, [(d, o) for o, d in _tables(depth)], "diffusers -> official")
    out.update(to_official(sana_entries(depth), sd))
    patch = out["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, grid = patch.shape[0], sample_size // patch.shape[-1]
    caption_channels = out["y_embedder.y_proj.fc1.weight"].shape[1]
    made = {"pos_embed": torch.zeros(1, grid * grid, hidden, dtype=patch.dtype, device=patch.device),
            "y_embedder.y_embedding": torch.zeros(model_max_length, caption_channels, dtype=patch.dtype,
                                                  device=patch.device)}
    unknown = sorted(set(extras or {}) - set(made))
    if unknown:
        raise KeyMapError(f"extras may hold only {list(made)}, got {unknown}")
    out.update({**made, **(extras or {})})
    return out


__all__ = ["sana_entries", "sana_to_diffusers", "sana_from_diffusers", "OFFICIAL_ONLY"]
