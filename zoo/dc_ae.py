"""DC-AE, the deep-compression autoencoder of Sana (MIT HAN Lab efficientvit `models/efficientvit/dc_ae.py`).

An f-times downsampling (f = 2**(stages - 1): 32, 64, 128) deterministic autoencoder: ResBlock stages at high
resolution, EfficientViT stages (ReLU linear attention + GLUMBConv) at low resolution, and every resampling step
is a residual around a parameter-free space-to-channel shortcut (pixel-unshuffle + channel averaging down,
channel duplication + pixel-shuffle up), which is what lets it compress so far.
Parameter names are the official ones (`encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight`);
`checkpoints_convert.dc_ae` maps them to diffusers' `AutoencoderDC`.

- `encode(x)`: image in [-1, 1] -> raw latent (B, latent_channels, H/f, W/f) (a tensor: the encoder is deterministic);
- `decode(z)`: raw latent -> image;
- `to_model_space(z)` / `from_model_space(z)`: raw <-> diffusion latents, `z * scaling_factor` (0.41407 for
  dc-ae-f32c32-sana-1.0) and back, the same names as `zoo.autoencoder.AutoencoderKL`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from layers import Checkpointed, ConvLayer, GLUMBConv, RMSNorm, linear_attention
from zoo.dc_ae_config import ACTS, DCAEConfig, DecoderConfig, EncoderConfig, per_stage
from zoo.registry import register


# ---- norms and parameter-free shortcuts ----
class RMSNorm2d(RMSNorm):
    """RMS over the channels of (B, C, H, W), gain and bias (official `trms2d`/`rms2d`; eps 1e-5)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps, param_name="weight")
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return (super().forward(x.movedim(1, -1)) + self.bias).movedim(-1, 1)


def build_norm(name: str | None, channels: int) -> nn.Module | None:
    if name is None:
        return None
    return nn.BatchNorm2d(channels) if name == "bn2d" else RMSNorm2d(channels)


class ChannelAveraging(nn.Module):
    """Space-to-channel by `factor`, then the mean of each group of channels down to `c_out` (no parameters)."""

    def __init__(self, c_in: int, c_out: int, factor: int):
        super().__init__()
        self.factor, self.group = factor, c_in * factor**2 // c_out

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H/f, W/f)
        return reduce(F.pixel_unshuffle(x, self.factor), "B (C G) H W -> B C H W", "mean", G=self.group)


class ChannelDuplicating(nn.Module):
    """Each channel repeated up to `c_out * factor^2` channels, then channel-to-space by `factor` (no parameters)."""

    def __init__(self, c_in: int, c_out: int, factor: int):
        super().__init__()
        self.factor, self.repeats = factor, c_out * factor**2 // c_in

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H*f, W*f)
        return F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), self.factor)


class Residual(nn.Module):
    """main(x) + shortcut(x) (official `ResidualBlock`); the shortcut is the identity or parameter-free."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut or nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.shortcut(x)


class OpSequential(nn.Module):
    """Modules in order under `op_list` (the official container; absent norms/activations leave no slot)."""

    def __init__(self, ops: list[nn.Module | None]):
        super().__init__()
        self.op_list = nn.ModuleList(op for op in ops if op is not None)

    def forward(self, x: Tensor) -> Tensor:
        for op in self.op_list:
            x = op(x)
        return x


# ---- resampling ----
class PixelUnshuffleConv(nn.Module):
    """conv to c_out / f^2 channels, then space-to-channel (official `ConvPixelUnshuffleDownSampleLayer`)."""

    def __init__(self, c_in: int, c_out: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = ConvLayer(c_in, c_out // factor**2, 3, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(self.conv(x), self.factor)


class UpsampleConv(nn.Module):
    """`pixel_shuffle`: conv to c_out * f^2 channels then channel-to-space (`ConvPixelShuffleUpSampleLayer`);
    `interpolate`: nearest x f then conv (`InterpolateConvUpSampleLayer`)."""

    def __init__(self, c_in: int, c_out: int, pixel_shuffle: bool, factor: int = 2):
        super().__init__()
        self.factor, self.pixel_shuffle = factor, pixel_shuffle
        self.conv = ConvLayer(c_in, c_out * factor**2 if pixel_shuffle else c_out, 3, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.pixel_shuffle:
            return F.pixel_shuffle(self.conv(x), self.factor)
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


def downsample(kind: str, c_in: int, c_out: int, shortcut: bool) -> nn.Module:
    main = ConvLayer(c_in, c_out, 3, bias=True, stride=2) if kind == "Conv" else PixelUnshuffleConv(c_in, c_out)
    return Residual(main, ChannelAveraging(c_in, c_out, 2)) if shortcut else main


def upsample(kind: str, c_in: int, c_out: int, shortcut: bool) -> nn.Module:
    main = UpsampleConv(c_in, c_out, pixel_shuffle=kind == "ConvPixelShuffle")
    return Residual(main, ChannelDuplicating(c_in, c_out, 2)) if shortcut else main


# ---- blocks ----
class ResBlock(nn.Module):
    """conv3x3 (bias) -> act -> conv3x3 (no bias) -> norm (official `ResBlock`, used inside a `Residual`)."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=ACTS[act]())
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=build_norm(norm, channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention on (B, C, H, W) (official `LiteMLA`, heads of `dim` = 32 channels).

    One 1x1 conv makes q/k/v, laid out per head as [q | k | v]; each scale in `scales` adds a depthwise k x k +
    grouped 1x1 aggregation of them as extra heads. The official code switches to the quadratic form when
    H*W <= dim; both compute sum_m relu(q_n).relu(k_m) v_m / (sum_m relu(q_n).relu(k_m) + eps), so one form is used.
    """

    def __init__(self, channels: int, norm: str, scales: tuple[int, ...], dim: int = 32, eps: float = 1e-15):
        super().__init__()
        self.dim, self.eps = dim, eps
        heads = channels // dim
        total = heads * dim
        self.qkv = ConvLayer(channels, 3 * total, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                          nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False))
            for s in scales
        )
        self.proj = ConvLayer(total * (1 + len(scales)), channels, 1, bias=False, norm=build_norm(norm, channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        h, w = x.shape[-2:]
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)  # (B, heads*(1+scales)*3*dim, H, W)
        q, k, v = rearrange(qkv, "B (H K D) h w -> K B H (h w) D", K=3, D=self.dim)
        out = linear_attention(q, k, v, self.eps)  # (B, h*w, heads*dim), accumulated in float32
        return self.proj(rearrange(out, "B (h w) C -> B C h w", h=h, w=w))


class EfficientViTBlock(nn.Module):
    """Linear attention (global context) then GLUMBConv (local), each residual (official `EfficientViTBlock`)."""

    def __init__(self, channels: int, norm: str, scales: tuple[int, ...]):
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, norm, scales))
        # GLUMBConv with expand_ratio 4, SiLU gates and the stage norm after the point conv
        self.local_module = Residual(GLUMBConvGrid(channels, 4 * channels, point_norm=build_norm(norm, channels)))

    def forward(self, x: Tensor) -> Tensor:
        return self.local_module(self.context_module(x))


class GLUMBConvGrid(GLUMBConv):
    """Sana's GLUMBConv called on the (B, C, H, W) grid directly."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.forward_grid(x)


def build_block(kind: str, channels: int, norm: str, act: str) -> nn.Module:
    if kind == "ResBlock":
        return Residual(ResBlock(channels, norm, act))
    return EfficientViTBlock(channels, norm, scales=(5,) if kind == "EViTS5_GLU" else ())


# ---- encoder / decoder ----
class Encoder(Checkpointed, nn.Module):
    """Image (B, in_channels, H, W) -> raw latent (B, latent_channels, H/f, W/f)."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        n, widths, depths = len(c.width_list), c.width_list, c.depth_list
        kinds = per_stage(c.block_type, n, "block_type")
        if depths[0] > 0:
            self.project_in = ConvLayer(c.in_channels, widths[0], 3, bias=True)
        else:  # the first stage is skipped: project_in already halves the resolution
            self.project_in = downsample(c.downsample_block_type, c.in_channels, widths[1], shortcut=False)
        self.stages = nn.ModuleList()
        for i, (width, depth) in enumerate(zip(widths, depths)):
            ops = [build_block(kinds[i], width, c.norm, c.act) for _ in range(depth)]
            if i < n - 1 and depth > 0:
                ops.append(downsample(c.downsample_block_type, width, widths[i + 1], c.downsample_shortcut is not None))
            self.stages.append(OpSequential(ops))
        out = OpSequential([ConvLayer(widths[-1], c.latent_channels, 3, bias=True)])
        self.project_out = Residual(out, ChannelAveraging(widths[-1], c.latent_channels, 1)) if c.out_shortcut else out

    def forward(self, x: Tensor) -> Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            for op in stage.op_list:
                x = self.run(op, x)
        return self.project_out(x)


class Decoder(Checkpointed, nn.Module):
    """Raw latent (B, latent_channels, h, w) -> image (B, in_channels, h*f, w*f); `stages.0` is full resolution."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        n, widths, depths = len(c.width_list), c.width_list, c.depth_list
        kinds, norms, acts = (per_stage(v, n, name) for v, name in ((c.block_type, "block_type"), (c.norm, "norm"),
                                                                     (c.act, "act")))
        conv_in = ConvLayer(c.latent_channels, widths[-1], 3, bias=True)
        self.project_in = Residual(conv_in, ChannelDuplicating(c.latent_channels, widths[-1], 1)) \
            if c.in_shortcut else conv_in
        self.stages = nn.ModuleList()
        for i, (width, depth) in enumerate(zip(widths, depths)):  # stored by resolution, run from the deepest
            ops = []
            if i < n - 1 and depth > 0:
                ops.append(upsample(c.upsample_block_type, widths[i + 1], width, c.upsample_shortcut is not None))
            ops += [build_block(kinds[i], width, norms[i], acts[i]) for _ in range(depth)]
            self.stages.append(OpSequential(ops))
        last = widths[0] if depths[0] > 0 else widths[1]
        head = ConvLayer(last, c.in_channels, 3, bias=True) if depths[0] > 0 else \
            upsample(c.upsample_block_type, last, c.in_channels, shortcut=False)
        self.project_out = OpSequential([build_norm(c.out_norm, last), ACTS[c.out_act](), head])

    def forward(self, z: Tensor) -> Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            for op in stage.op_list:
                x = self.run(op, x)
        return self.project_out(x)


@register("dc_ae", DCAEConfig)
class DCAE(Checkpointed, nn.Module):
    """The deep-compression autoencoder; `forward(x)` is the round trip encode -> decode."""

    def __init__(self, params: DCAEConfig):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params.encoder)
        self.decoder = Decoder(params.decoder)
        self.scale_factor, self.shift_factor = params.scaling_factor, 0.0
        self.latent_channels = params.latent_channels
        self.downscale = 2 ** (len(params.encoder.width_list) - 1)  # image pixels per latent pixel

    def to_model_space(self, z: Tensor) -> Tensor:
        """Raw latents (from `encode`) -> the diffusion model's latents: z * scaling_factor."""
        return z * self.scale_factor

    def from_model_space(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> raw latents (for `decode`): z / scaling_factor."""
        return z / self.scale_factor

    def encode(self, x: Tensor) -> Tensor:
        """Image (B, in_channels, H, W) in [-1, 1], H and W multiples of f -> raw latent (B, C, H/f, W/f)."""
        return self.encoder(self._check(x, "image", self.params.in_channels, self.downscale))

    def decode(self, z: Tensor) -> Tensor:
        """Raw latent (B, latent_channels, h, w) -> image (B, in_channels, h*f, w*f) in about [-1, 1]."""
        return self.decoder(self._check(z, "latent", self.latent_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def example_inputs(self, batch: int = 1, height: int = 512, width: int = 512, device=None,
                       dtype=torch.float32) -> tuple[tuple, dict]:
        """An image for `forward`, so a trace shows encoder and decoder."""
        x = torch.rand(batch, self.params.in_channels, height, width, device=device, dtype=dtype) * 2 - 1
        return (self._check(x, "image", self.params.in_channels, self.downscale),), {}

    def _check(self, x: Tensor, what: str, channels: int, multiple: int) -> Tensor:
        want = f"(B, {channels}, H, W)" + (f" with H and W multiples of {multiple}" if multiple > 1 else "")
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"DC-AE {what} must be a float tensor {want}, got {got}")
        if x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple or min(x.shape) == 0:
            raise ValueError(f"DC-AE {what} has shape {tuple(x.shape)}; expected {want}")
        return x.to(next(self.parameters()).dtype)


__all__ = ["DCAEConfig", "EncoderConfig", "DecoderConfig", "DCAE", "Encoder", "Decoder", "RMSNorm2d", "LiteMLA",
           "EfficientViTBlock", "ResBlock"]
