"""DiT360 panoramas: FLUX.1-dev (with the DiT360 LoRA) on an equirectangular 2:1 canvas whose token grid wraps
around its width, following Insta360's `DiT360Pipeline` (src/pipeline.py).

As the reference: draw the noise, pack it, pad the token grid once by one column per side with copies of the
opposite edge's tokens *and* position ids (`zoo.panorama.pad_panorama`), take the resolution shift from the padded
token count, run Euler over the whole padded grid, crop the pad columns once at the end. Then decode with circular
width padding in every decoder convolution (the reference decodes plainly; ours keeps the seam continuous down to
the pixels), in blended tiles for 2048x4096 and larger. A model built with `circular_pad` (`zoo.panorama.DiT360`)
wraps inside every forward instead; the pipeline then passes the plain grid.

`seam_score` measures the wrap: the largest difference between the image's last and first columns over the median
of the same measure for every pair of neighbouring columns; ~1 is a seam at noise level.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

import samplers
from pipelines.common import (
    Callback,
    check_latents,
    check_size,
    generator_for,
    model_dtype,
    randn,
    run_sampler,
    to_unit,
)
from pipelines.flux import FluxParts, prepare_conditioning, set_adapters, velocity_fn
from pipelines.offload import compute_device, on_device
from zoo.flux import img_ids, pack, unpack
from zoo.panorama import DiT360, crop_panorama, pad_panorama

BIG = 2048 * 4096  # pixels from which the decode is tiled by default
DEFAULT_TILE = 128  # latent pixels per decode tile (1024 image pixels)


def seam_score(images: Tensor) -> float:
    """(B, C, H, W) -> max |last column - first column| / median over neighbouring column pairs of max |difference|
    (maxima over batch, channels and rows). ~1: the wrap seam looks like any other column boundary."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"seam_score takes images (B, C, H, W) with W >= 3, got {tuple(images.shape)}")
    x = images.float()
    neighbours = (x[..., 1:] - x[..., :-1]).abs().amax(dim=(0, 1, 2))  # (W - 1,)
    seam = (x[..., -1] - x[..., 0]).abs().max()
    return (seam / neighbours.median().clamp_min(1e-12)).item()


def check_panorama_size(height: int, width: int) -> None:
    check_size(height, width, 16, "panorama")
    if width != 2 * height:
        raise ValueError(f"an equirectangular panorama is 2:1, got height x width = {height}x{width}; use "
                         f"{height}x{2 * height} or {width // 2}x{width}")


@torch.no_grad()
def generate(
    parts: FluxParts,
    prompt: str | list[str] | None = None,
    *,
    conditioning: Mapping[str, Tensor] | None = None,
    height: int = 1024,
    width: int = 2048,
    steps: int = 28,
    guidance: float = 3.5,
    sampler: str = "euler",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch: int = 1,
    latents: Tensor | None = None,
    wrap: bool = True,
    circular_decode: bool | None = None,
    tile: int | None = None,
    adapters: Mapping[str, float] | None = None,
    max_length: int = 512,
    callback: Callback = None,
    progress: bool = True,
) -> Tensor:  # (B, 3, height, width) in [0, 1]
    """Prompt (or conditioning) -> 2:1 panoramas. `wrap=False` runs plain Flux (a visible seam; for comparison).
    `circular_decode` defaults to `wrap`. `tile`: decode tile in latent pixels (default: tiled from 2048x4096 up).
    `adapters`: {LoRA adapter name: scale}, e.g. the DiT360 LoRA loaded onto FLUX.1-dev."""
    model, ae = parts.model, parts.ae
    check_panorama_size(height, width)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    in_model = isinstance(model, DiT360)  # the model wraps inside every forward
    if in_model and not wrap:
        raise ValueError("wrap=False, but this model (circular_pad="
                         f"{model.params.circular_pad}) wraps inside every forward; build it without circular_pad")
    circular_decode = wrap if circular_decode is None else circular_decode
    gen = generator_for(seed, generator)
    cond = prepare_conditioning(parts, prompt, conditioning, batch, max_length)
    b, lh, lw = cond["txt"].shape[0], height // 8, width // 8
    h, w = lh // 2, lw // 2  # the token grid
    device = compute_device(parts, model)

    noise = randn((b, ae.latent_channels, lh, lw), gen, device) if latents is None else \
        check_latents(latents.to(device), (b, ae.latent_channels, lh, lw))
    x, pos = pack(noise), img_ids(b, lh, lw, device=device)  # (B, h*w, 64), (B, h*w, 3)
    pad = 1 if wrap and not in_model else 0
    if pad:  # the reference pads once, before the loop: last column | grid | first column
        x, pos = pad_panorama(x, pos, w, pad)
    distilled = model.guidance_in is not None
    ts = samplers.flux_schedule(steps, h * (w + 2 * pad), shift=distilled)  # mu from the padded token count

    set_adapters(model, adapters)
    model_fn = velocity_fn(model, pos, cond, guidance, device)
    with on_device(parts, "model"):
        x = run_sampler(model_fn, x, sampler=sampler, schedule=samplers.FlowSchedule(), timesteps=ts,
                        generator=gen, desc="panorama", progress_bar=progress, callback=callback)
    if pad:
        x = crop_panorama(x, w, pad)  # (B, h*w, 64)
    if tile is None and height * width >= BIG:
        tile = DEFAULT_TILE
    with on_device(parts, "ae"):
        z = ae.from_model_space(unpack(x, lh, lw)).to(model_dtype(ae))
        overlap = min(16, tile // 4) if tile is not None else 16  # latent pixels blended between tiles
        return to_unit(ae.decode(z, tile=tile, overlap=overlap, circular=circular_decode))


__all__ = ["check_panorama_size", "generate", "seam_score"]
