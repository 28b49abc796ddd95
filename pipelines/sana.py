"""Sana text-to-image (NVlabs `app/sana_pipeline.py`): Gemma-2 prompt features with the complex human instruction,
noise on the f32c32 latent grid, flow DPM-Solver++ (2M) on the shifted `time_uniform_flow` grid with classifier-free
guidance on [negative, prompt], DC-AE decode.

The model gets timestep 1000 t; a Sana built with the official `integer_timesteps: true` (the default) truncates
it to an integer as SanaMS does, which is also what diffusers' SanaPipeline feeds (DPMSolverMultistepScheduler with
flow sigmas: integer timesteps, continuous sigmas for the steps).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import samplers
from pipelines.common import (
    Callback,
    cfg,
    check_conditioning,
    check_latents,
    check_size,
    generator_for,
    model_dtype,
    randn,
    repeat_batch,
    run_sampler,
    to_unit,
)
from pipelines.offload import compute_device, on_device


@dataclass
class SanaParts:
    """The components of a Sana system; Gemma-2 and its tokenizer are needed only for prompt strings."""

    model: nn.Module  # zoo.sana.Sana
    vae: nn.Module  # zoo.dc_ae.DCAE
    gemma: nn.Module | None = None  # zoo.gemma.Gemma2
    tok: Any = None  # zoo.tokenizers.gemma(...)
    offload: bool = False
    device: torch.device | str | None = None


def encode_prompt(parts: SanaParts, prompt: str | list[str], *, max_length: int = 300,
                  instruction: bool = True) -> dict[str, Tensor]:
    """Prompt strings -> {y (B, 1, max_length, C), mask (B, max_length)} through zoo.text.sana_conditioning; the
    complex human instruction only for positive prompts (`instruction`), as the official pipeline does."""
    missing = [n for n in ("gemma", "tok") if getattr(parts, n) is None]
    if missing:
        raise ValueError(f"prompt strings need the text encoder, but the Sana parts lack {missing}; load them or pass "
                         "conditioning= (a dict y, mask as zoo.text.sana_conditioning returns)")
    from zoo import text

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    with on_device(parts, "gemma"):
        return text.sana_conditioning(prompts, parts.gemma, parts.tok, max_length=max_length,
                                      instruction=text.SANA_CHI if instruction else None)


def _conditioning(parts, prompt, conditioning, max_length: int, instruction: bool, what: str) -> dict[str, Tensor]:
    if (prompt is None) == (conditioning is None):
        raise ValueError(f"pass exactly one of {what.replace('conditioning', 'prompt')}= (strings) or {what}= "
                         "(a dict y, mask as zoo.text returns)")
    cond = encode_prompt(parts, prompt, max_length=max_length, instruction=instruction) if conditioning is None \
        else dict(conditioning)
    check_conditioning(cond, ("y", "mask"), what)
    return cond


@torch.no_grad()
def generate(
    parts: SanaParts,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    *,
    conditioning: Mapping[str, Tensor] | None = None,
    negative_conditioning: Mapping[str, Tensor] | None = None,
    height: int = 1024,
    width: int = 1024,
    steps: int = 20,
    guidance: float = 4.5,
    sampler: str = "dpm++2m",
    shift: float = 3.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch: int = 1,
    latents: Tensor | None = None,
    max_length: int = 300,
    callback: Callback = None,
    progress: bool = True,
) -> Tensor:  # (B, 3, height, width) in [0, 1]
    """Prompt (or conditioning) -> images. Defaults: Sana 1024 px, 20 DPM-Solver++ steps, flow shift 3, guidance 4.5
    (off at <= 1; negative prompt default ""). `latents`: your own (B, C, height/f, width/f) noise, f the DC-AE's
    downscale. `max_length`: Gemma tokens kept per prompt (the model's 300)."""
    model, vae = parts.model, parts.vae
    check_size(height, width, vae.downscale * model.params.patch_size, "Sana")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if model.params.in_channels != vae.latent_channels:
        raise ValueError(f"the Sana model takes {model.params.in_channels}-channel latents, but this DC-AE makes "
                         f"{vae.latent_channels}: model and autoencoder do not belong together")
    gen = generator_for(seed, generator)
    guided = cfg(guidance)
    cond = _conditioning(parts, prompt, conditioning, max_length, True, "conditioning")
    if guided is not None:
        n = cond["y"].shape[0]
        if negative_conditioning is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            negative_prompt = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        neg = _conditioning(parts, negative_prompt, negative_conditioning, max_length, False, "negative_conditioning")
        if neg["y"].shape[0] != n or neg["y"].shape[2] != cond["y"].shape[2]:
            raise ValueError(f"negative conditioning y has shape {tuple(neg['y'].shape)}, the prompts' "
                             f"{tuple(cond['y'].shape)}: batch and token count must agree")
        cond = {k: torch.cat([neg[k], cond[k]]) for k in cond}  # [uncond, cond], as samplers.Guidance expects
    cond = repeat_batch(cond, batch)
    b = cond["y"].shape[0] // (2 if guided is not None else 1)
    device, dtype = compute_device(parts, model), model_dtype(model)
    y, mask = cond["y"].to(device, dtype), cond["mask"].to(device)
    c = vae.latent_channels
    shape = (b, c, height // vae.downscale, width // vae.downscale)
    noise = randn(shape, gen, device) if latents is None else check_latents(latents.to(device), shape)
    schedule = samplers.FlowSchedule(shift=shift, spacing="time_uniform_flow")

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(x.to(dtype), t * schedule.num_train_timesteps, y, mask=mask)  # (2B or B, C_out, h, w)
        return out[:, :c].float()  # learned-sigma channels dropped

    with on_device(parts, "model"):
        x = run_sampler(model_fn, noise, sampler=sampler, schedule=schedule, steps=steps, guidance=guided,
                        generator=gen, desc="sana", progress_bar=progress, callback=callback)
    with on_device(parts, "vae"):
        return to_unit(vae.decode(vae.from_model_space(x).to(model_dtype(vae))))


__all__ = ["SanaParts", "encode_prompt", "generate"]
