"""FLUX.1 text-to-image and img2img, following Black Forest Labs' `flux/sampling.py` (`get_noise`, `prepare`,
`get_schedule`, `denoise`, `unpack`): encode the prompt, make the noise, pack it into 2x2 tokens, Euler on the
resolution-shifted flow schedule with the distilled guidance as a model input, unpack, decode.

diffusers' FluxPipeline computes the same thing (its sigma grid is `get_schedule`'s, and `timestep / 1000` gives the
same t up to float rounding); its `true_cfg_scale` (a second, negative-prompt pass) is not in the official code
and is not offered here. img2img follows diffusers' FluxImg2ImgPipeline (BFL has no img2img): the grid starts at
index int(steps - steps * strength) and the image latent (a posterior sample) is noised to that time.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import lora as lora_lib
import samplers
from pipelines.common import (
    Callback,
    check_conditioning,
    check_latents,
    check_size,
    generator_for,
    image_to_model,
    model_dtype,
    randn,
    repeat_batch,
    run_sampler,
    to_unit,
)
from pipelines.offload import compute_device, on_device
from zoo.flux import img_ids, pack, txt_ids, unpack


@dataclass
class FluxParts:
    """The components of a Flux system; the text encoders are needed only for prompt strings."""

    model: nn.Module  # zoo.flux.Flux
    ae: nn.Module  # zoo.autoencoder.AutoencoderKL, layout bfl
    clip: nn.Module | None = None
    clip_tok: Any = None
    t5: nn.Module | None = None
    t5_tok: Any = None
    offload: bool = False  # keep every component on the CPU except while it runs
    device: torch.device | str | None = None  # the compute device when offloading


def encode_prompt(parts: FluxParts, prompt: str | list[str], max_length: int = 512) -> dict[str, Tensor]:
    """Prompt strings -> {txt, txt_ids, y} through CLIP-L (pooled) and T5 (sequence), as zoo.text builds them."""
    missing = [n for n in ("clip", "clip_tok", "t5", "t5_tok") if getattr(parts, n) is None]
    if missing:
        raise ValueError(f"prompt strings need the text encoders, but the Flux parts lack {missing}; load them or "
                         "pass conditioning= (a dict txt, y as zoo.text.flux_conditioning returns)")
    from zoo import text

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    with on_device(parts, "clip", "t5"):
        return text.flux_conditioning(prompts, parts.clip, parts.clip_tok, parts.t5, parts.t5_tok,
                                      max_length=max_length)


def prepare_conditioning(parts, prompt, conditioning, batch: int, max_length: int = 512) -> dict[str, Tensor]:
    """The conditioning dict for this call (prompt encoded, or given), repeated `batch` times per prompt."""
    if (prompt is None) == (conditioning is None):
        raise ValueError("pass exactly one of prompt= (strings) or conditioning= (a dict as zoo.text returns)")
    cond = encode_prompt(parts, prompt, max_length) if conditioning is None else dict(conditioning)
    check_conditioning(cond, ("txt", "y"))
    return repeat_batch(cond, batch)


def set_adapters(model: nn.Module, adapters: Mapping[str, float] | None) -> None:
    """Activate the named LoRA adapters with their scales (None leaves the model's adapters as they are)."""
    if adapters is not None:
        lora_lib.set_adapter(model, list(adapters), weights=[float(s) for s in adapters.values()])


def velocity_fn(model: nn.Module, img_pos: Tensor, cond: Mapping[str, Tensor], guidance: float,
                device) -> Callable[[Tensor, Tensor], Tensor]:
    """The sampler's model function: packed tokens x (B, L, C) at flow time t -> velocity (float32), with the image
    ids (B, L, 3), the text, pooled vector and distilled guidance (dev only) fixed; conditioning of batch 1 is
    broadcast."""
    dtype, b = model_dtype(model), img_pos.shape[0]
    txt = cond["txt"].to(device, dtype).expand(b, -1, -1)
    txt_pos = cond["txt_ids"].to(device) if "txt_ids" in cond else txt_ids(b, txt.shape[1], device=device)
    y = cond["y"].to(device, dtype).expand(b, -1)
    g = torch.full((b,), float(guidance), device=device, dtype=dtype) if model.guidance_in is not None else None

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        return model(x.to(dtype), img_pos, txt, txt_pos, t.to(dtype), y, guidance=g).float()

    return model_fn


@torch.no_grad()
def generate(
    parts: FluxParts,
    prompt: str | list[str] | None = None,
    *,
    conditioning: Mapping[str, Tensor] | None = None,
    height: int = 1024,
    width: int = 1024,
    steps: int | None = None,
    guidance: float = 3.5,
    sampler: str = "euler",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch: int = 1,
    latents: Tensor | None = None,
    image: Tensor | None = None,
    strength: float = 0.6,
    adapters: Mapping[str, float] | None = None,
    shift: bool | None = None,
    max_length: int = 512,
    tile: int | None = None,
    callback: Callback = None,
    progress: bool = True,
) -> Tensor:  # (B, 3, height, width) in [0, 1]
    """Prompt (or conditioning) -> images. Defaults: dev (guidance embedding) 28 steps with the shifted schedule,
    schnell 4 steps unshifted. `latents`: your own (B, 16, height/8, width/8) noise. `image` + `strength`: img2img.
    `adapters`: {LoRA adapter name: scale} to activate. `tile`: tiled VAE decode (latent pixels per tile)."""
    model, ae = parts.model, parts.ae
    distilled = getattr(model, "guidance_in", None) is not None  # dev has the guidance embedding, schnell not
    steps = (28 if distilled else 4) if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_size(height, width, 16, "Flux")
    if not model.in_channels == model.out_channels == 4 * ae.latent_channels:
        raise ValueError(f"the Flux model takes/returns {model.in_channels}/{model.out_channels} channels per token, "
                         f"but 2x2 patches of this autoencoder's {ae.latent_channels}-channel latent have "
                         f"{4 * ae.latent_channels}: "
                         "model and autoencoder do not belong together")
    gen = generator_for(seed, generator)
    cond = prepare_conditioning(parts, prompt, conditioning, batch, max_length)
    b, lh, lw = cond["txt"].shape[0], 2 * (height // 16), 2 * (width // 16)
    device = compute_device(parts, model)

    # official get_schedule: linspace(1, 0), exp-shifted by mu(token count) unless schnell
    ts = samplers.flux_schedule(steps, (lh // 2) * (lw // 2), shift=distilled if shift is None else shift)
    x0 = None
    if image is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        with on_device(parts, "ae"):
            posterior = ae.encode(image_to_model(image, height, width, b, device, model_dtype(ae)))
            x0 = ae.to_model_space(posterior.sample(gen).float())  # drawn before the noise, as diffusers
        ts = ts[int(max(steps - steps * strength, 0)):]
        if len(ts) < 2:
            raise ValueError(f"strength={strength} with steps={steps} leaves no step to take")
    noise = randn((b, ae.latent_channels, lh, lw), gen, device) if latents is None else \
        check_latents(latents.to(device), (b, ae.latent_channels, lh, lw))
    x = noise if x0 is None else ts[0] * noise + (1.0 - ts[0]) * x0  # the flow path at the first grid time
    x = pack(x)  # (B, lh/2 * lw/2, 64)

    set_adapters(model, adapters)
    model_fn = velocity_fn(model, img_ids(b, lh, lw, device=device), cond, guidance, device)
    with on_device(parts, "model"):
        x = run_sampler(model_fn, x, sampler=sampler, schedule=samplers.FlowSchedule(), timesteps=ts,
                        generator=gen, desc="flux", progress_bar=progress, callback=callback)
    with on_device(parts, "ae"):
        z = ae.from_model_space(unpack(x, lh, lw))
        return to_unit(ae.decode(z.to(model_dtype(ae)), tile=tile))


__all__ = ["FluxParts", "encode_prompt", "generate", "prepare_conditioning", "set_adapters", "velocity_fn"]
