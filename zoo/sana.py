"""Sana (NVlabs, `diffusion/model/nets/sana_multi_scale.py` + `sana.py`): linear-attention DiT on f32c32 latents.

Parameter names are the official ones (`SanaMS`), so a released Sana checkpoint loads with `strict=True`.
The arch `sana` is the multi-scale model (any H x W per call); `multi_scale: false` is the square-only original.
Timesteps are truncated to integers as the official SanaMS does (`timestep.long()`; it was trained on integer
timesteps); `integer_timesteps: false` uses them as given (continuous, as diffusers does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from layers import (
    CaptionEmbedder,
    Checkpointed,
    GLUMBConv,
    LiteLA,
    MultiHeadCrossAttention,
    RMSNorm,
    T2IFinalLayer,
    TimestepEmbedder,
    modulate,
    scale_shift_chunks,
    sincos_pos_embed_2d,
    t_block,
)
from zoo.checks import batch_timesteps, positive_ints
from zoo.registry import register


@dataclass
class SanaConfig:
    """The official `SanaMS` constructor arguments (defaults as there), plus `multi_scale` (the config's switch)."""

    input_size: int = 32  # latent side at the training resolution (1024 px / 32); sizes pos_embed
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16  # cross-attention heads; linear self-attention uses hidden_size / linear_head_dim
    mlp_ratio: float = 4.0
    pred_sigma: bool = True
    caption_channels: int = 2304
    pe_interpolation: float = 1.0
    model_max_length: int = 300
    qk_norm: bool = False
    y_norm: bool = False
    norm_eps: float = 1e-5
    attn_type: str = "linear"  # the official default "flash" is the softmax PixArt layout, not built here
    ffn_type: str = "glumbconv"
    use_pe: bool = True
    y_norm_scale_factor: float = 1.0
    patch_embed_kernel: int | None = None
    mlp_acts: list = field(default_factory=lambda: ["silu", "silu", None])
    linear_head_dim: int = 32
    cross_norm: bool = False
    cross_attn_type: str = "flash"
    pos_embed_type: str = "sincos"
    cfg_embed: bool = False
    logvar: bool = False
    timestep_norm_scale_factor: float = 1.0
    multi_scale: bool = True
    integer_timesteps: bool = True  # official: timestep.long(); False = diffusers' continuous timesteps

    # official arguments that only steer training, kernels or logging
    IGNORED_FIELDS: ClassVar[frozenset] = frozenset({
        "class_dropout_prob", "learn_sigma", "drop_path", "config", "lr_scale", "null_embed_path",
        "use_fp32_attention", "fp32_attention", "logvar_scale_factor", "cfg_embed_scale",
    })

    def __post_init__(self):
        check_config(self)


class PatchEmbed(nn.Module):
    """Strided conv over (B, C, H, W) latents -> (B, H/p * W/p, D) tokens (official `PatchEmbedMS`, key `proj`)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, kernel_size: int | None = None):
        super().__init__()
        kernel_size = kernel_size or patch_size
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=patch_size,
                              padding=kernel_size // 2 if kernel_size % 2 else 0, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "B D H W -> B (H W) D")


class SanaMSBlock(nn.Module):
    """Linear self-attention, cross-attention to the caption, Mix-FFN; adaLN-single modulation with gates."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, cross_norm: bool,
                 linear_head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = LiteLA(hidden_size, hidden_size // linear_head_dim, qk_norm=qk_norm)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads, qk_norm=cross_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = GLUMBConv(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, y: Tensor, t: Tensor, mask: Tensor | None, hw: tuple[int, int]) -> Tensor:
        """x (B, N, D) image tokens, y (B, L, D) caption, t (B, 6D) from `t_block`, mask (B, L) bool or None."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = scale_shift_chunks(self.scale_shift_table, t)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), hw)


@register("sana", SanaConfig)
class Sana(Checkpointed, nn.Module):
    """Text-to-image flow model on (B, 32, H/32, W/32) latents with Gemma-2 caption features; predicts velocity."""

    def __init__(self, config: SanaConfig):
        super().__init__()
        p = self.params = config
        d = p.hidden_size
        self.out_channels = p.in_channels * 2 if p.pred_sigma else p.in_channels
        self.x_embedder = PatchEmbed(p.patch_size, p.in_channels, d, p.patch_embed_kernel)
        self.t_embedder = TimestepEmbedder(d)
        self.base_size = p.input_size // p.patch_size
        # kept for the official layout; the forward recomputes it for each grid (it is a function of the grid)
        pos = sincos_pos_embed_2d(d, self.base_size, self.base_size, self.base_size, p.pe_interpolation)
        self.register_buffer("pos_embed", pos[None] if p.use_pe else torch.zeros(1, self.base_size**2, d))
        self.t_block = t_block(d)
        self.y_embedder = CaptionEmbedder(p.caption_channels, d, p.model_max_length)
        if p.y_norm:  # RMS-normalised caption tokens; gain initialised to y_norm_scale_factor
            self.attention_y_norm = RMSNorm(d, eps=p.norm_eps, param_name="weight")
            nn.init.constant_(self.attention_y_norm.weight, p.y_norm_scale_factor)
        self.blocks = nn.ModuleList(
            SanaMSBlock(d, p.num_heads, p.mlp_ratio, p.qk_norm, p.cross_norm, p.linear_head_dim)
            for _ in range(p.depth)
        )
        self.final_layer = T2IFinalLayer(d, p.patch_size, self.out_channels)
        self._weights_checked = False

    def forward(self, x: Tensor, timestep: Tensor, y: Tensor, mask: Tensor | None = None,
                features: Tensor | None = None) -> Tensor:
        """x (B, C, H, W) latents, timestep (B,) or scalar in [0, 1000], y (B, 1, L, C_cap) or (B, L, C_cap),
        mask (B, L) caption keep-mask -> (B, out_channels, H, W). `features` (B, N, D): added to the patch
        tokens (the world model's history encoder)."""
        if not self._weights_checked and not torch.compiler.is_compiling():
            check_weights(self)  # once: load_state_dict already refuses mis-shaped tensors
            self._weights_checked = True
        x, timestep, y, mask = check_inputs(self, x, timestep, y, mask)
        p = self.params.patch_size
        hw = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.x_embedder(x)  # (B, N, D)
        if features is not None:
            if features.shape != x.shape:
                raise ValueError(f"features has shape {tuple(features.shape)}, expected the patch tokens' "
                                 f"{tuple(x.shape)}")
            x = x + features.to(x.dtype)
        if self.params.use_pe:
            x = x + sincos_pos_embed_2d(x.shape[-1], *hw, self.base_size, self.params.pe_interpolation,
                                        device=x.device).to(x.dtype)
        if self.params.timestep_norm_scale_factor != 1.0:  # Sana-Sprint: continuous, rescaled
            timestep = timestep / self.params.timestep_norm_scale_factor
        elif self.params.integer_timesteps:  # the official SanaMS was trained on integer timesteps
            timestep = timestep.long().float()
        t = self.t_embedder(timestep)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        y = self.y_embedder(y)  # (B, L, D)
        if self.params.y_norm:
            y = self.attention_y_norm(y)
        for block in self.blocks:
            x = self.run(block, x, y, t0, mask, hw)
        x = self.final_layer(x, t)  # (B, N, p*p*C_out)
        return rearrange(x, "B (h w) (p q c) -> B c (h p) (w q)", h=hw[0], p=p, q=p)

    def example_inputs(self, batch: int = 1, height: int = 1024, width: int = 1024, txt_len: int | None = None,
                       device=None, dtype=torch.float32) -> tuple[tuple, dict]:
        """Random inputs for a `height` x `width` image (latent = pixels / 32, the f32c32 autoencoder)."""
        p = self.params
        if height % (32 * p.patch_size) or width % (32 * p.patch_size):
            raise ValueError(f"Sana image sizes must be multiples of {32 * p.patch_size} pixels, got {height}x{width}")
        txt_len = txt_len or p.model_max_length
        x = torch.randn(batch, p.in_channels, height // 32, width // 32, device=device, dtype=dtype)
        y = torch.randn(batch, 1, txt_len, p.caption_channels, device=device, dtype=dtype)
        t = torch.full((batch,), 500.0, device=device)
        mask = torch.ones(batch, txt_len, dtype=torch.bool, device=device)
        return (x, t, y), {"mask": mask}


# ---- checks: the config, the weights (once) and the inputs at the model's boundary ----

def check_config(c: SanaConfig) -> None:
    """Clear errors for a config this implementation cannot build (named field, what is supported)."""
    positive_ints(c, ("input_size", "patch_size", "in_channels", "hidden_size", "num_heads", "caption_channels",
                      "linear_head_dim", "model_max_length"))
    for name, divisor in (("num_heads", c.num_heads), ("linear_head_dim", c.linear_head_dim)):
        if c.hidden_size % divisor:
            raise ValueError(f"SanaConfig.hidden_size {c.hidden_size} is not divisible by {name} {divisor}")
    supported = {"attn_type": ("linear",), "ffn_type": ("glumbconv",), "pos_embed_type": ("sincos",),
                 "cross_attn_type": ("flash", "linear", "vanilla"), "cfg_embed": (False,), "logvar": (False,)}
    for name, ok in supported.items():
        if getattr(c, name) not in ok:
            raise ValueError(f"SanaConfig.{name}={getattr(c, name)!r} is not supported; expected one of {ok}")
    if list(c.mlp_acts) != ["silu", "silu", None]:
        raise ValueError(f"SanaConfig.mlp_acts={list(c.mlp_acts)!r}: only ['silu', 'silu', None] is supported")
    if c.depth < 0 or c.mlp_ratio <= 0 or c.timestep_norm_scale_factor <= 0:
        raise ValueError("SanaConfig.depth must be >= 0, mlp_ratio and timestep_norm_scale_factor > 0")


def check_weights(model: Sana) -> None:
    """Every adaLN table must fit the config (a hand-assigned parameter is named, not a broadcast error)."""
    d = model.params.hidden_size
    tables = [(f"blocks.{i}.scale_shift_table", b.scale_shift_table, 6) for i, b in enumerate(model.blocks)]
    for name, table, rows in tables + [("final_layer.scale_shift_table", model.final_layer.scale_shift_table, 2)]:
        if tuple(table.shape) != (rows, d):
            raise ValueError(f"{name} has shape {tuple(table.shape)}, expected ({rows}, {d}) for hidden_size={d}")


def check_inputs(model: Sana, x: Tensor, timestep, y: Tensor, mask: Tensor | None):
    """Clear errors for inputs that would otherwise fail deep inside as a shape mismatch; returns them normalised."""
    p = model.params
    if x.ndim != 4 or x.shape[1] != p.in_channels:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {p.in_channels}, H, W) latents")
    b, (h, w) = x.shape[0], x.shape[-2:]
    if h % p.patch_size or w % p.patch_size:
        raise ValueError(f"x has latent size {h}x{w}, expected multiples of patch_size={p.patch_size}")
    if not p.multi_scale and (h != w or (p.use_pe and h != p.input_size)):
        want = f"{p.input_size}x{p.input_size}" if p.use_pe else "square"
        raise ValueError(f"x has latent size {h}x{w}; this square-only Sana (multi_scale=false) expects {want}")
    y_shape = tuple(y.shape)
    if y.ndim == 4 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 3 or y.shape[0] != b or y.shape[-1] != p.caption_channels:
        raise ValueError(f"y (caption) has shape {y_shape}, expected ({b}, 1, L, {p.caption_channels}) "
                         f"or ({b}, L, {p.caption_channels})")
    if mask is not None:
        if mask.ndim == 4 and mask.shape[1:3] == (1, 1):
            mask = mask[:, 0, 0]
        if mask.ndim != 2 or mask.shape[0] not in (1, b) or mask.shape[1] != y.shape[1]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({b}, {y.shape[1]}) "
                             f"to match the caption y {y_shape}")
        mask = mask.bool().expand(b, -1)
        # a fully masked row would make the softmax 0/0 (a data check: skipped on meta and inside torch.compile,
        # where branching on tensor values would break the graph)
        if mask.device.type != "meta" and not torch.compiler.is_compiling() and not mask.any(dim=1).all():
            raise ValueError(f"mask rows {torch.nonzero(~mask.any(dim=1)).flatten().tolist()} keep no caption "
                             "token; keep at least one")
    timestep = batch_timesteps(timestep, b, device=x.device, dtype=torch.float32, name="timestep")
    dtype = model.x_embedder.proj.weight.dtype
    return x.to(dtype), timestep, y.to(dtype), mask


__all__ = ["SanaConfig", "Sana", "SanaMSBlock", "PatchEmbed"]
