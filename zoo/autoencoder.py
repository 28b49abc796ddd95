"""AutoencoderKL in the official layouts: CompVis/Stability LDM (`ldm/models/autoencoder.py` + `diffusionmodules/
model.py`; SD1.x/2.x/SDXL, with quant convs) and Black Forest Labs (`flux/modules/autoencoder.py`; no quant convs).

Which space each function speaks:
- `encode(x)`: image in [-1, 1] -> `DiagonalGaussian` over **raw** latents (what the decoder takes);
- `decode(z)`: **raw** latents -> image in about [-1, 1];
- `to_model_space(z)` / `from_model_space(z)`: raw latents <-> the diffusion model's latents, i.e.
  `(z - shift_factor) * scale_factor` and back (SD 0.18215; SDXL 0.13025; Flux 0.3611 with shift 0.1159).
Both `encode` and `decode` take `tile=` (overlapping tiles, bounded memory) and `circular=` (panoramas: every
convolution wraps around the width), see `zoo.tiling`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers import AttnBlock, Checkpointed, ResnetBlock, Upsample, VAEDownsample, normalize
from zoo.registry import register
from zoo.tiling import circular_width, tiled


@dataclass
class AutoEncoderParams:
    """The LDM `ddconfig` plus `embed_dim` (layout `ldm`) or BFL's `AutoEncoderParams` (layout `bfl`)."""

    layout: str = "ldm"  # "ldm": quant_conv/post_quant_conv around the latent; "bfl": none
    resolution: int = 256  # training resolution; does not change the math (kept so official configs load)
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 4
    double_z: bool = True
    attn_resolutions: list[int] = field(default_factory=list)
    attn_type: str = "vanilla"  # SGM's name for the attention backend; "vanilla-xformers" is the same math
    embed_dim: int | None = None  # ldm: latent channels after quant_conv (None: z_channels); bfl: must stay None
    scale_factor: float = 1.0
    shift_factor: float = 0.0
    IGNORED_FIELDS: ClassVar[frozenset] = frozenset({"dropout"})  # train-time only

    def __post_init__(self):
        if self.layout not in ("ldm", "bfl"):
            raise ValueError(f"AutoEncoderParams.layout must be 'ldm' or 'bfl', got {self.layout!r}")
        if not self.ch_mult or self.num_res_blocks < 1 or min(self.in_channels, self.out_ch, self.z_channels) < 1:
            raise ValueError("AutoEncoderParams: ch_mult must be non-empty, num_res_blocks, in_channels, out_ch "
                             "and z_channels positive")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w < 32 or w % 32 for w in widths):
            raise ValueError(f"AutoEncoderParams: block widths ch * ch_mult = {widths} must be multiples of 32 "
                             "(GroupNorm with 32 groups)")
        if not self.double_z:
            raise ValueError("AutoEncoderParams.double_z must be true: a KL autoencoder predicts mean and log-variance")
        if self.attn_resolutions:
            raise ValueError(f"AutoEncoderParams.attn_resolutions={self.attn_resolutions} is not supported: every "
                             "released AutoencoderKL has attention only in the middle blocks (attn_resolutions: [])")
        if self.attn_type not in ("vanilla", "vanilla-xformers"):
            raise ValueError(f"AutoEncoderParams.attn_type={self.attn_type!r} is not supported; expected 'vanilla' "
                             "or 'vanilla-xformers' (the same math)")
        if self.layout == "bfl" and self.embed_dim not in (None, self.z_channels):
            raise ValueError(f"AutoEncoderParams.embed_dim={self.embed_dim}: layout 'bfl' has no quant convs, "
                             "so the latent has z_channels channels; leave embed_dim unset")
        if self.embed_dim is None:
            self.embed_dim = self.z_channels
        if self.scale_factor == 0:
            raise ValueError("AutoEncoderParams.scale_factor must be non-zero")

    @property
    def latent_channels(self) -> int:
        return self.embed_dim if self.layout == "ldm" else self.z_channels


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): ResnetBlocks, then a resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        if resample is VAEDownsample:
            self.downsample = VAEDownsample(out_ch)
        elif resample is Upsample:
            self.upsample = Upsample(out_ch, use_conv=True)


class Mid(nn.Module):
    """The middle: ResnetBlock, the only attention, ResnetBlock."""

    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch), AttnBlock(ch), ResnetBlock(ch)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(Checkpointed, nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        in_mult = (1, *p.ch_mult)
        last = len(p.ch_mult) - 1
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(p.ch * in_mult[i], p.ch * m, p.num_res_blocks, VAEDownsample if i < last else None)
            for i, m in enumerate(p.ch_mult)
        )
        block_in = p.ch * p.ch_mult[-1]
        self.mid = Mid(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = self.run(block, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.run(self.mid, h))))


class Decoder(Checkpointed, nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); `up.0` is the full-resolution level."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        # built from the deepest level up, stored by resolution index as the releases do (`up.insert(0, ...)`)
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, len(widths) - 1)], w, p.num_res_blocks + 1, Upsample if i > 0 else None)
            for i, w in enumerate(widths)
        )
        self.norm_out = normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.run(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = self.run(block, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over raw latents (LDM `DiagonalGaussianDistribution`)."""

    mean: Tensor  # (B, C, h, w)
    logvar: Tensor  # (B, C, h, w), clamped to [-30, 20] as LDM and diffusers do

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)  # the encoder stacks [mean, logvar] along channels
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | int | None = None) -> Tensor:
        """mean + std * noise; an int seeds a fresh generator on the latent's device (reproducible)."""
        if isinstance(generator, int):
            generator = torch.Generator(self.mean.device).manual_seed(generator)
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


@register("autoencoder_kl", AutoEncoderParams)
class AutoencoderKL(Checkpointed, nn.Module):
    """KL-regularised autoencoder; `forward(x)` is the round trip encode -> posterior mean (or sample) -> decode."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        if params.layout == "ldm":
            self.quant_conv = nn.Conv2d(2 * params.z_channels, 2 * params.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(params.embed_dim, params.z_channels, 1)
        self.scale_factor, self.shift_factor = params.scale_factor, params.shift_factor
        self.latent_channels = params.latent_channels
        self.downscale = 2 ** (len(params.ch_mult) - 1)  # image pixels per latent pixel (8 for every release)

    # ---- the two spaces ----
    def to_model_space(self, z: Tensor) -> Tensor:
        """Raw latents (from `encode`) -> the diffusion model's latents: (z - shift_factor) * scale_factor."""
        return (z - self.shift_factor) * self.scale_factor

    def from_model_space(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> raw latents (for `decode`): z / scale_factor + shift_factor."""
        return z / self.scale_factor + self.shift_factor

    # ---- encode / decode (raw latents) ----
    def encode(self, x: Tensor, *, tile: int | None = None, overlap: int = 16,
               circular: bool = False) -> DiagonalGaussian:
        """Image (B, in_channels, H, W) in [-1, 1] -> posterior over raw latents (B, C, H/8, W/8).

        `tile`/`overlap` in latent pixels (64 = 512 image pixels): encode in blended overlapping tiles when the
        image is larger than one tile. `circular`: the width wraps around (panoramas).
        """
        x = self._check_image(x)
        f = self.downscale
        if tile is not None and max(x.shape[-2], x.shape[-1]) > tile * f:
            moments = tiled(self._moments, x, tile, overlap, in_unit=f, out_unit=1, circular=circular)
        else:
            moments = self._moments(x, circular)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Tensor, *, tile: int | None = None, overlap: int = 16, circular: bool = False) -> Tensor:
        """Raw latents (B, C, h, w) -> image (B, out_ch, 8h, 8w) in about [-1, 1].

        `tile`/`overlap` in latent pixels: decode in blended overlapping tiles when the latent is larger than one
        tile. `circular`: every decoder convolution pads circularly along the width and with zeros along the
        height, so the panorama's left and right edges continue each other.
        """
        z = self._check_latent(z)
        if tile is not None and max(z.shape[-2], z.shape[-1]) > tile:
            return tiled(self._decode, z, tile, overlap, in_unit=1, out_unit=self.downscale, circular=circular)
        return self._decode(z, circular)

    def forward(self, x: Tensor, sample: bool = False, generator: torch.Generator | int | None = None) -> Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode())

    def _moments(self, x: Tensor, wrap: bool) -> Tensor:  # (B, 2C, h, w)
        with circular_width(self.encoder, wrap):
            h = self.encoder(x)
        return self.quant_conv(h) if self.params.layout == "ldm" else h

    def _decode(self, z: Tensor, wrap: bool) -> Tensor:
        if self.params.layout == "ldm":
            z = self.post_quant_conv(z)
        with circular_width(self.decoder, wrap):
            return self.decoder(z)

    def example_inputs(self, batch: int = 1, height: int = 512, width: int = 512, device=None,
                       dtype=torch.float32) -> tuple[tuple, dict]:
        """An image for `forward`, so a trace shows the whole round trip (encoder, then decoder)."""
        x = torch.rand(batch, self.params.in_channels, height, width, device=device, dtype=dtype) * 2 - 1
        self._check_image(x)
        return (x,), {}

    # ---- input checks ----
    def _param_dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def _check_image(self, x: Tensor) -> Tensor:
        c, f = self.params.in_channels, self.downscale
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"encode expects an image tensor (B, {c}, H, W), got {_shape(x)}")
        if not x.is_floating_point():
            raise ValueError(f"encode expects a float image in [-1, 1], got dtype {x.dtype} (convert uint8 with "
                             "x / 127.5 - 1)")
        if x.shape[1] != c:
            raise ValueError(f"image has {x.shape[1]} channels, shape {tuple(x.shape)}; this autoencoder expects "
                             f"(B, {c}, H, W)" + (" (channels-last? use x.permute(0, 3, 1, 2))"
                                                  if x.shape[-1] == c else ""))
        for name, n in (("height", x.shape[2]), ("width", x.shape[3])):
            if n % f or n == 0:
                raise ValueError(f"image {name} {n} (shape {tuple(x.shape)}) is not a positive multiple of {f}, "
                                 f"the autoencoder's stride; crop or pad it to {n // f * f or f} or {(n // f + 1) * f}")
        return x.to(self._param_dtype())

    def _check_latent(self, z: Tensor) -> Tensor:
        c = self.latent_channels
        if not isinstance(z, Tensor) or z.ndim != 4 or min(z.shape) == 0:
            raise ValueError(f"decode expects raw latents (B, {c}, h, w), got {_shape(z)}")
        if z.shape[1] != c:
            hint = ""
            if (z.shape[1], c) in ((16, 4), (4, 16)):
                other = "Flux (bfl, 16" if z.shape[1] == 16 else "SD/SDXL (ldm, 4"
                hint = (f": a {z.shape[1]}-channel latent given to a {c}-channel {self.params.layout} decoder; "
                        f"it looks like a {other}-channel) latent, so decode it with that family's autoencoder")
            raise ValueError(f"latent z has {z.shape[1]} channels, shape {tuple(z.shape)}; this autoencoder expects "
                             f"(B, {c}, h, w){hint}")
        if not z.is_floating_point():
            raise ValueError(f"decode expects float latents, got dtype {z.dtype}")
        return z.to(self._param_dtype())


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


__all__ = ["AutoEncoderParams", "AutoencoderKL", "DiagonalGaussian", "Encoder", "Decoder", "Level", "Mid"]
