"""LBM latent bridge matching (Chadebec et al. 2025): image-to-image in 1-4 steps, following the official
`LBMModel.sample` and `lbm.inference.evaluate` (gojasper/LBM).

Encode the source image with the VAE (a posterior sample, as the official `AutoencoderKLDiffusers.encode`), start
the bridge at the source latent (t = 1), take Euler steps of the predicted velocity (source - target) down to t = 0
on the grid linspace(1, 1/n, n) + [0], with fresh bridge noise sigma_b sqrt(t (1 - t)) after every step but the last
(`samplers`' `bridge` sampler), decode. The denoiser sees the timestep t * 1000 (the FlowMatchEulerDiscreteScheduler
timesteps the official loop passes) and, for the conditional models (relighting, shadows), the latents of extra
images and resized masks concatenated to its input channels (official `LatentsConcatEmbedder`: masks, then images).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lora as lora_lib
import samplers
from pipelines.common import Callback, generator_for, image_to_model, model_dtype, run_sampler, to_unit
from pipelines.offload import compute_device, on_device

NUM_TRAIN_TIMESTEPS = 1000  # the official scheduler's timestep = sigma * 1000


@dataclass
class BridgeParts:
    """An LBM system: the denoiser UNet, the VAE and the bridge noise the model was trained with."""

    unet: nn.Module  # zoo.unet.UNet predicting the bridge velocity z_source - z_target
    vae: nn.Module  # zoo.autoencoder.AutoencoderKL
    sigma_b: float = 0.0  # the official config's bridge_noise_sigma
    context: Tensor | None = None  # (1, T, context_dim): a fixed cross-attention input when the UNet has one
    offload: bool = False
    device: torch.device | str | None = None


def set_lora_scale(model: nn.Module, lora_scale: float | None) -> None:
    """Activate every LoRA adapter of `model` at `lora_scale` (None leaves the adapters as they are)."""
    if lora_scale is None:
        return
    layers = lora_lib.lora_layers(model)
    if not layers:
        raise ValueError(f"lora_scale={lora_scale} given, but the bridge UNet has no LoRA adapter; load one with "
                         "lora.load(parts.unet, path) first")
    names = sorted(set().union(*(layer.adapters for layer in layers.values())))
    lora_lib.set_adapter(model, names, weights=[float(lora_scale)] * len(names))


def encode(parts: BridgeParts, image: Tensor, batch: int, device, gen, tile: int | None = None) -> Tensor:
    """An image (B, 3, H, W) in [0, 1] -> a posterior sample in the model's latent space (B, C, H/8, W/8)."""
    vae = parts.vae
    x = image_to_model(image, image.shape[-2], image.shape[-1], batch, device, model_dtype(vae))
    with on_device(parts, "vae"):
        return vae.to_model_space(vae.encode(x, tile=tile).sample(gen).float())


def concat_latents(parts: BridgeParts, masks: Sequence[Tensor], images: Sequence[Tensor], size: tuple[int, int],
                   batch: int, device, gen) -> Tensor | None:
    """The official LatentsConcatEmbedder: masks (B, 1, H, W) in [0, 1] resized to the latent grid, then the
    latents of the conditioning images, stacked along channels -> (B, C_extra, h, w), or None without any."""
    parts_out = []
    for i, m in enumerate(masks):
        if not isinstance(m, Tensor) or m.ndim != 4 or m.shape[0] not in (1, batch):
            raise ValueError(f"masks[{i}] has shape {getattr(m, 'shape', m)}, expected (B, C, H, W) with B 1 or "
                             f"{batch}")
        m = F.interpolate(m.float().to(device), size=size, mode="bilinear", antialias=True, align_corners=False)
        parts_out.append(m.expand(batch, -1, -1, -1))
    for img in images:
        parts_out.append(encode(parts, img, batch, device, gen))
    return torch.cat(parts_out, dim=1) if parts_out else None


@torch.no_grad()
def generate(
    parts: BridgeParts,
    image: Tensor,
    *,
    steps: int = 1,
    masks: Sequence[Tensor] = (),
    condition_images: Sequence[Tensor] = (),
    lora_scale: float | None = None,
    sigma_b: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch: int = 1,
    tile: int | None = None,
    callback: Callback = None,
    progress: bool = True,
) -> Tensor:  # (B, 3, H, W) in [0, 1]
    """Source image (B, 3, H, W) in [0, 1] -> the translated image. `steps`: 1-4 as LBM is trained for (any
    positive count runs). `masks` / `condition_images`: the conditional models' extra inputs (concatenated to the
    latent). `lora_scale`: the weight of every LoRA adapter on the UNet. `sigma_b` overrides `parts.sigma_b`."""
    unet, vae = parts.unet, parts.vae
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(image, Tensor):
        from pipelines.common import from_pil

        image = from_pil(image)
    image = image[None] if image.ndim == 3 else image
    height, width = image.shape[-2], image.shape[-1]
    f = vae.downscale * unet.config.total_stride
    if height % f or width % f:
        raise ValueError(f"LBM: the source image is {height}x{width}, not a multiple of {f} (VAE stride "
                         f"{vae.downscale} x UNet stride {unet.config.total_stride}); resize it")
    gen = generator_for(seed, generator)
    b = image.shape[0] * batch
    device, dtype = compute_device(parts, unet), model_dtype(unet)
    z_source = encode(parts, image.repeat_interleave(batch, dim=0), b, device, gen, tile)  # (B, C, h, w)
    concat = concat_latents(parts, masks, condition_images, tuple(z_source.shape[-2:]), b, device, gen)
    want = z_source.shape[1] + (0 if concat is None else concat.shape[1])
    if want != unet.config.in_channels:
        raise ValueError(f"the bridge UNet takes {unet.config.in_channels} input channels, but the latent "
                         f"({z_source.shape[1]}) plus masks and condition images ({want - z_source.shape[1]}) "
                         f"give {want}")
    context = None
    if parts.context is not None:
        context = parts.context.to(device, dtype).expand(b, -1, -1)
    set_lora_scale(unet, lora_scale)
    schedule = samplers.BridgeSchedule(sigma_b=parts.sigma_b if sigma_b is None else float(sigma_b))

    def model_fn(x: Tensor, t: Tensor) -> Tensor:  # the velocity z_source - z_target at bridge time t
        x_in = x if concat is None else torch.cat([x, concat], dim=1)
        return unet(x_in.to(dtype), (t * NUM_TRAIN_TIMESTEPS).to(dtype), context=context).float()

    with on_device(parts, "unet"):
        z = run_sampler(model_fn, z_source, sampler="bridge", schedule=schedule, steps=steps, generator=gen,
                        desc="bridge", progress_bar=progress, callback=callback)
    with on_device(parts, "vae"):
        return to_unit(vae.decode(vae.from_model_space(z).to(model_dtype(vae)), tile=tile))


__all__ = ["BridgeParts", "concat_latents", "encode", "generate", "set_lora_scale"]
