"""The LDM/SGM UNet of Stable Diffusion 1.x/2.x/SDXL (`openaimodel.UNetModel`), in the official layout.

Keys are the official ones minus `model.diffusion_model.`; config fields are `UNetModel`'s keyword arguments.
`injection_points()` derives, from the config alone, every input block's and the middle block's channels and
stride, which `control` (ControlNet residuals) and `features` (T2I-Adapter / hint-encoder maps) must match.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from layers import (
    Checkpointed,
    Conv2d,
    Downsample,
    GroupNorm32,
    ResBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
)
from zoo.checks import batch_timesteps
from zoo.registry import register
from zoo.unet_config import InjectionPoint, UNetConfig, injection_points


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: ResBlocks get the time embedding, SpatialTransformers the context, others only x."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _transformer(cfg: UNetConfig, ch: int, level: int, depth: int, disable_self_attn: bool) -> SpatialTransformer:
    """The SpatialTransformer of a block at `level` (-1: the middle block), with that level's context width."""
    heads, d_head = cfg.heads(ch)
    return SpatialTransformer(ch, heads, d_head, depth, cfg.dropout, cfg.level_context_dim(level), disable_self_attn,
                              cfg.use_linear_in_transformer)


class UNetEncoder(Checkpointed, nn.Module):
    """What the UNet and the ControlNet share: time/label embeddings, input blocks, middle block, input checks."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        ted = cfg.model_channels * 4
        mc = cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if isinstance(cfg.num_classes, int):
            self.label_emb = nn.Embedding(cfg.num_classes, ted)
        elif cfg.num_classes == "continuous":
            self.label_emb = nn.Linear(1, ted)
        elif cfg.num_classes == "sequential":  # SDXL: pooled text + size/crop embeddings, as `y`
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(),
                                                         nn.Linear(ted, ted)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        ch, ds = mc, 1
        self.skip_channels = [ch]  # channels of every input block's output (the skips the decoder consumes)
        for level, mult in enumerate(cfg.channel_mult):
            for nr in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, ted, cfg.dropout, mult * mc,
                                                   use_scale_shift_norm=cfg.use_scale_shift_norm)]
                ch = mult * mc
                if cfg.has_attention(level, ds, nr):
                    layers.append(_transformer(cfg, ch, level, cfg.transformer_depth[level], cfg.self_attn_off(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = (ResBlock(ch, ted, cfg.dropout, ch, use_scale_shift_norm=cfg.use_scale_shift_norm, down=True)
                        if cfg.resblock_updown else Downsample(ch, cfg.conv_resample))
                self.input_blocks.append(TimestepEmbedSequential(down))
                self.skip_channels.append(ch)
                ds *= 2
        middle_attn = (nn.Identity() if cfg.disable_middle_transformer else
                       _transformer(cfg, ch, -1, cfg.transformer_depth_middle, cfg.disable_middle_self_attn))
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, cfg.dropout, ch, use_scale_shift_norm=cfg.use_scale_shift_norm),
            middle_attn,
            ResBlock(ch, ted, cfg.dropout, ch, use_scale_shift_norm=cfg.use_scale_shift_norm),
        )

    def injection_points(self) -> list[InjectionPoint]:
        """One entry per input block and the middle block: name, channels, stride relative to the latent."""
        return injection_points(self.config)

    def embed(self, timesteps: Tensor, y: Tensor | None) -> Tensor:
        """(B,) timesteps (and `y`) -> (B, 4 * model_channels) embedding, in the weights' dtype."""
        dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.config.model_channels, time_factor=1.0, keep_dtype=False)
        emb = self.time_embed(t_emb.to(dtype))
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y if isinstance(self.config.num_classes, int) else y.to(dtype))
        return emb

    def check_context(self, context: Tensor | None, b: int) -> None:
        """`context` must be (B, T, width) for this UNet's cross-attention; None only where every level's context
        width equals its own (attn2 then attends to the image itself)."""
        cfg, name = self.config, type(self).__name__
        dim = cfg.context_width
        if context is None:
            if cfg.attention_levels() and not cfg.self_context:
                raise ValueError(f"this {name} has cross-attention: pass context of shape (B, T, {dim})")
            return
        if not cfg.attention_levels():
            raise ValueError(f"this {name} has no cross-attention (no SpatialTransformer); got context")
        if dim is None:
            raise ValueError(f"this {name}'s cross_attention_dim {cfg.cross_attention_dim} differs per level, so "
                             "one context tensor fits none: pass context=None (each attn2 attends to the image)")
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"context has shape {tuple(context.shape)}, expected ({b}, T, {dim})")
        if context.shape[-1] != dim:
            raise ValueError(f"context has {context.shape[-1]} features, this {name}'s cross-attention "
                             f"expects {dim} (context shape {tuple(context.shape)})")

    def check_inputs(self, x: Tensor, timesteps, context: Tensor | None, y: Tensor | None) -> Tensor:
        """Clear `ValueError`s for the mistakes that otherwise fail deep inside; returns timesteps as (B,)."""
        cfg, name = self.config, type(self).__name__
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}, this {name} expects (B, in_channels={cfg.in_channels}, "
                             "H, W) latents")
        b, stride = x.shape[0], cfg.total_stride
        if x.shape[2] % stride or x.shape[3] % stride:
            raise ValueError(
                f"x has spatial size {x.shape[2]}x{x.shape[3]}, not divisible by this {name}'s total stride {stride} "
                f"({len(cfg.channel_mult) - 1} downsamplings); pad or resize to a multiple of {stride}")
        timesteps = batch_timesteps(timesteps, b, device=x.device)
        self.check_context(context, b)
        if cfg.num_classes is None:
            if y is not None:
                raise ValueError(f"this {name} has no label/vector conditioning (num_classes=None); got y")
        else:
            want = {"sequential": (b, cfg.adm_in_channels), "continuous": (b, 1)}.get(cfg.num_classes, (b,))
            if y is None:
                raise ValueError(f"this {name} is conditioned on y (num_classes={cfg.num_classes!r}): pass y of "
                                 f"shape {want}" + (" (SDXL: pooled text + size/crop embeddings)"
                                                    if cfg.num_classes == "sequential" else ""))
            if tuple(y.shape) != want:
                raise ValueError(f"y has shape {tuple(y.shape)}, expected {want}")
        return timesteps


@register("unet", UNetConfig)
class UNet(UNetEncoder):
    """Noise-prediction UNet: input blocks, middle block, output blocks fed by the skips, then `out`."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        cfg, mc, ted = config, config.model_channels, config.model_channels * 4
        skips = list(self.skip_channels)
        ch, ds = skips[-1], config.total_stride
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks[level] + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), ted, cfg.dropout, mc * mult,
                                                   use_scale_shift_norm=cfg.use_scale_shift_norm)]
                ch = mc * mult
                if cfg.has_attention(level, ds, i):
                    layers.append(_transformer(cfg, ch, level, cfg.transformer_depth[level], cfg.self_attn_off(level)))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(ResBlock(ch, ted, cfg.dropout, ch, use_scale_shift_norm=cfg.use_scale_shift_norm,
                                           up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        # official: conv(model_channels, ...), which is `ch` whenever channel_mult[0] == 1 (every released model)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(
        self,
        x: Tensor,  # (B, in_channels, H, W) latents
        timesteps: Tensor,  # (B,) or scalar, in [0, 1000)
        context: Tensor | None = None,  # (B, T, context_dim) text features; None: self-context (LBM)
        y: Tensor | None = None,  # (B,) class ids, or (B, adm_in_channels) vector (SDXL)
        control: list[Tensor] | None = None,  # ControlNet residuals: one per input block, then the middle
        features: dict[int, Tensor] | None = None,  # {input-block index: (B, C, H/s, W/s)} added after that block
    ) -> Tensor:  # (B, out_channels, H, W)
        timesteps = self.check_inputs(x, timesteps, context, y)
        self.check_injections(x, control, features)
        emb = self.embed(timesteps, y)
        h, hs = x.to(emb.dtype), []
        for i, block in enumerate(self.input_blocks):
            h = self.run(block, h, emb, context)
            if features and i in features:
                h = h + features[i]  # T2I-Adapter: the sum is also the skip
            hs.append(h)
        h = self.run(self.middle_block, h, emb, context)
        control = list(control) if control is not None else None
        if control is not None:
            h = h + control.pop()  # the official ControlledUnetModel pops from the end: middle first
        for block in self.output_blocks:
            skip = hs.pop()
            if control is not None:
                skip = skip + control.pop()
            h = self.run(block, torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).to(x.dtype)

    def check_injections(self, x: Tensor, control: list[Tensor] | None, features: dict[int, Tensor] | None) -> None:
        """`control` and `features` must match `injection_points()` at this x's size (batch 1 broadcasts)."""
        points = self.injection_points()
        b, h, w = x.shape[0], x.shape[2], x.shape[3]

        def check(what: str, t: Tensor, p: InjectionPoint) -> None:
            want = (b, p.channels, h // p.stride, w // p.stride)
            if not isinstance(t, Tensor) or t.ndim != 4 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != want[1:]:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{what} (for {p.name}) has shape {got}, expected {want}")

        if control is not None:
            if len(control) != len(points):
                raise ValueError(f"control has {len(control)} entries, expected {len(points)}: one per input block "
                                 f"({len(points) - 1}) then the middle block, in the official ControlNet order")
            for i, (t, p) in enumerate(zip(control, points)):
                check(f"control[{i}]", t, p)
        for idx, t in (features or {}).items():
            if not isinstance(idx, int) or not 0 <= idx < len(self.input_blocks):
                raise ValueError(f"features index {idx!r} is not an input block: this UNet has input_blocks.0 .. "
                                 f"input_blocks.{len(self.input_blocks) - 1}")
            check(f"features[{idx}]", t, points[idx])

    def example_inputs(self, batch: int = 1, height: int | None = None, width: int | None = None, txt_len: int = 77,
                       device=None, dtype=torch.float32) -> tuple[tuple, dict]:
        """Random inputs for a `height` x `width` pixel image (latent = pixels / 8): x, timesteps, context, y."""
        cfg = self.config
        default = 1024 if cfg.num_classes == "sequential" else 512
        height, width = height or default, width or height or default
        unit = 8 * cfg.total_stride
        if height % unit or width % unit:
            raise ValueError(f"this UNet needs image sizes that are multiples of {unit} pixels, got {height}x{width}")
        x = torch.randn(batch, cfg.in_channels, height // 8, width // 8, device=device, dtype=dtype)
        t = torch.full((batch,), 500.0, device=device, dtype=dtype)
        kwargs = {}
        if cfg.context_width is not None:
            kwargs["context"] = torch.randn(batch, txt_len, cfg.context_width, device=device, dtype=dtype)
        if cfg.num_classes == "sequential":
            kwargs["y"] = torch.randn(batch, cfg.adm_in_channels, device=device, dtype=dtype)
        elif cfg.num_classes == "continuous":
            kwargs["y"] = torch.randn(batch, 1, device=device, dtype=dtype)
        elif cfg.num_classes is not None:
            kwargs["y"] = torch.zeros(batch, dtype=torch.long, device=device)
        return (x, t), kwargs


__all__ = ["UNet", "UNetConfig", "UNetEncoder", "InjectionPoint", "injection_points", "TimestepEmbedSequential"]
