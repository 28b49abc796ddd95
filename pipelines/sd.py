"""Stable Diffusion 1.x/2.x and SDXL: text-to-image, img2img, ControlNet, T2I-Adapter / hint-encoder features.

The loop of the official LDM/SGM samplers: encode the prompts (and the negative prompt for classifier-free guidance),
noise (or noise the encoded image up to the img2img start time), call the UNet on [uncond, cond] with the control
residuals / adapter features, step any of our samplers on the VP schedule, decode. The default schedule is SD's
(`scaled_linear` betas 0.00085..0.012, `leading` spacing with offset 1, ending at timestep 0), i.e. diffusers'
DDIMScheduler as the SD pipelines configure it.

ControlNet guess mode follows the official cldm code, not diffusers: the unconditional half gets no control and
the residuals are weighted strength * 0.825 ** (n - 1 - i) (diffusers uses logspace(-1, 0, n) instead).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import samplers
from layers.embeddings import timestep_embedding
from pipelines.common import (
    Callback,
    cfg,
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


@dataclass
class SDParts:
    """The components of an SD/SDXL system; text encoders are needed only for prompt strings."""

    unet: nn.Module  # zoo.unet.UNet
    vae: nn.Module  # zoo.autoencoder.AutoencoderKL, layout ldm
    clip: nn.Module | None = None  # CLIP-L (SD1.x, SDXL's first encoder) or OpenCLIP-H (SD2.x)
    tok: Any = None
    clip_g: nn.Module | None = None  # SDXL's OpenCLIP-bigG
    tok_g: Any = None
    controlnet: nn.Module | None = None  # zoo.controlnet.ControlNet
    adapter: nn.Module | None = None  # zoo.t2i_adapter.T2IAdapter or zoo.hint_encoder.HintEncoder
    schedule: samplers.VPSchedule | None = None  # None: sd_schedule() with the UNet's prediction
    offload: bool = False
    device: torch.device | str | None = None

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.unet.config, "num_classes", None) == "sequential"


def sd_schedule(prediction: str = "eps") -> samplers.VPSchedule:
    """SD's training schedule with the sampling grid its pipelines use (v prediction for SD2.x 768-v)."""
    return samplers.VPSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012, prediction=prediction,
                               steps_offset=1, set_alpha_to_one=False)


def sdxl_vector(pooled: Tensor, original_size: Sequence[int], crop: Sequence[int], target_size: Sequence[int],
                dim: int = 256) -> Tensor:
    """SDXL's `y`: pooled text (B, P), then the 6 numbers original (h, w), crop (top, left), target (h, w), each a
    `dim`-wide sinusoid (SGM's ConcatTimestepEmbedderND) -> (B, P + 6 dim)."""
    ids = torch.tensor([*original_size, *crop, *target_size], dtype=torch.float32, device=pooled.device)
    if ids.numel() != 6:
        raise ValueError(f"original_size, crop and target_size must be 2 numbers each, got {ids.tolist()}")
    emb = timestep_embedding(ids, dim, time_factor=1.0, keep_dtype=False).reshape(1, -1)  # (1, 6 dim)
    return torch.cat([pooled, emb.to(pooled.dtype).expand(pooled.shape[0], -1)], dim=1)


def encode_prompt(parts: SDParts, prompt: str | list[str], size: tuple[int, int],
                  crop: tuple[int, int] = (0, 0)) -> dict[str, Tensor]:
    """Prompt strings -> {context} (SD) or {context, y} (SDXL) through zoo.text."""
    need = ("clip", "tok", "clip_g", "tok_g") if parts.is_sdxl else ("clip", "tok")
    missing = [n for n in need if getattr(parts, n) is None]
    if missing:
        raise ValueError(f"prompt strings need the text encoders, but the SD parts lack {missing}; load them or pass "
                         "conditioning= (a dict as zoo.text returns)")
    from zoo import text

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    with on_device(parts, *need[::2]):
        if parts.is_sdxl:
            return text.sdxl_conditioning(prompts, parts.clip, parts.tok, parts.clip_g, parts.tok_g, size=size,
                                          crop=crop, target=size)
        return text.sd_conditioning(prompts, parts.clip, parts.tok)


def _conditioning(parts, prompt, conditioning, size, what) -> dict[str, Tensor]:
    if prompt is not None and conditioning is not None:
        raise ValueError(f"pass either {what.replace('conditioning', 'prompt')}= or {what}=, not both")
    cond = encode_prompt(parts, prompt, size) if conditioning is None else dict(conditioning)
    check_conditioning(cond, ("context", "y") if parts.is_sdxl else ("context",), what)
    return cond


def control_scales(n: int, strength: float, guess_mode: bool, blocks: Sequence[int] | None) -> list[float]:
    """Per-residual ControlNet weights: `strength` (guess mode: official cldm's strength * 0.825 ** (n - 1 - i)),
    zero outside `blocks` (indices into the n residuals: input blocks, then the middle block at n - 1)."""
    scales = [strength * (0.825 ** (n - 1 - i) if guess_mode else 1.0) for i in range(n)]
    if blocks is not None:
        bad = [i for i in blocks if not isinstance(i, int) or not 0 <= i < n]
        if bad:
            raise ValueError(f"control_blocks {bad} are not residual indices 0..{n - 1} (input blocks, then middle)")
        scales = [s if i in set(blocks) else 0.0 for i, s in enumerate(scales)]
    return scales


def check_controlnet(unet: nn.Module, controlnet: nn.Module) -> None:
    """A ControlNet must produce one residual per UNet injection point with that point's channels and stride."""
    ours = [(p.channels, p.stride) for p in unet.injection_points()]
    theirs = [(p.channels, p.stride) for p in controlnet.injection_points()]
    if ours != theirs:
        raise ValueError(f"the ControlNet does not fit the UNet: its residuals (channels, stride) are {theirs}, "
                         f"the UNet's injection points need {ours}")


def adapter_features(parts: SDParts, image: Tensor, strength: float, batch: int, device) -> dict[int, Tensor]:
    """T2I-Adapter / hint-encoder maps for the UNet's input blocks, scaled by `strength`."""
    adapter, unet = parts.adapter, parts.unet
    image = image.to(device, model_dtype(adapter))
    with on_device(parts, "adapter"):
        out = adapter(image)
    feats = adapter.features_for(unet, out) if isinstance(out, list) else out
    return {i: (f * strength).expand(batch, -1, -1, -1) if f.shape[0] == 1 else f * strength
            for i, f in feats.items()}


@torch.no_grad()
def generate(
    parts: SDParts,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    *,
    conditioning: Mapping[str, Tensor] | None = None,
    negative_conditioning: Mapping[str, Tensor] | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    sampler: str = "ddim",
    eta: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch: int = 1,
    latents: Tensor | None = None,
    image: Tensor | None = None,
    strength: float = 0.8,
    control_image: Tensor | None = None,
    control_strength: float = 1.0,
    guess_mode: bool = False,
    control_blocks: Sequence[int] | None = None,
    adapter_image: Tensor | None = None,
    adapter_strength: float = 1.0,
    tile: int | None = None,
    callback: Callback = None,
    progress: bool = True,
) -> Tensor:  # (B, 3, height, width) in [0, 1]
    """Prompt (or conditioning) -> images with classifier-free guidance `guidance` (off at <= 1).

    `image` + `strength`: img2img. `control_image` (B, hint_channels, H, W) in [0, 1] drives `parts.controlnet`
    with `control_strength`, `guess_mode` and `control_blocks` (a subset of residual indices). `adapter_image` drives
    `parts.adapter` (T2I-Adapter or hint encoder) scaled by `adapter_strength`. Negative prompt default: "".
    """
    unet, vae = parts.unet, parts.vae
    default = 1024 if parts.is_sdxl else 512
    height, width = height or default, width or default
    check_size(height, width, vae.downscale * unet.config.total_stride, "SD")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    gen = generator_for(seed, generator)
    guided = cfg(guidance)
    cond = _conditioning(parts, prompt, conditioning, (height, width), "conditioning")
    if guided is not None:
        if negative_conditioning is None and negative_prompt is None:
            negative_prompt = ""
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * next(iter(cond.values())).shape[0]
        neg = _conditioning(parts, negative_prompt, negative_conditioning, (height, width), "negative_conditioning")
        if neg["context"].shape[0] != cond["context"].shape[0]:
            raise ValueError(f"negative conditioning has batch {neg['context'].shape[0]}, the prompts "
                             f"{cond['context'].shape[0]}")
        # [uncond, cond] in one batch, as samplers.Guidance without uncond_fn expects
        cond = {k: torch.cat([neg[k], cond[k]]) for k in cond}
    cond = repeat_batch(cond, batch)
    halves = 2 if guided is not None else 1
    b = cond["context"].shape[0] // halves
    device, dtype = compute_device(parts, unet), model_dtype(unet)
    context = cond["context"].to(device, dtype)
    y = cond["y"].to(device, dtype) if "y" in cond else None
    schedule = parts.schedule or sd_schedule()
    lh, lw = height // vae.downscale, width // vae.downscale

    controlnet, hint, scales = parts.controlnet, None, None
    if control_image is not None:
        if controlnet is None:
            raise ValueError("control_image given, but the SD parts have no controlnet")
        check_controlnet(unet, controlnet)
        c = controlnet.config.hint_channels
        if control_image.ndim != 4 or control_image.shape[1] != c or tuple(control_image.shape[-2:]) != (height, width):
            raise ValueError(f"control_image has shape {tuple(control_image.shape)}, expected (B, {c}, {height}, "
                             f"{width}) in [0, 1] for this ControlNet")
        hint = control_image.to(device, model_dtype(controlnet)).expand(b, -1, -1, -1)
        scales = control_scales(len(unet.injection_points()), control_strength, guess_mode, control_blocks)
    features = None
    if adapter_image is not None:
        if parts.adapter is None:
            raise ValueError("adapter_image given, but the SD parts have no adapter (T2I-Adapter / hint encoder)")
        if adapter_image.ndim != 4 or tuple(adapter_image.shape[-2:]) != (height, width):
            raise ValueError(f"adapter_image has shape {tuple(adapter_image.shape)}, expected (B, C, {height}, "
                             f"{width}): the adapter's features must land on this image's latent grid")
        features = adapter_features(parts, adapter_image, adapter_strength, b, device)
        if halves == 2:
            features = {i: torch.cat([f, f]) for i, f in features.items()}

    ts = schedule.grid(steps)
    x0 = None
    if image is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        with on_device(parts, "vae"):
            posterior = vae.encode(image_to_model(image, height, width, b, device, model_dtype(vae)))
            x0 = vae.to_model_space(posterior.sample(gen).float())
        ts = ts[steps - min(int(steps * strength), steps):]  # diffusers' img2img start index
        if len(ts) < 2:
            raise ValueError(f"strength={strength} with steps={steps} leaves no step to take")
    c_lat = unet.config.in_channels
    noise = randn((b, c_lat, lh, lw), gen, device) if latents is None else \
        check_latents(latents.to(device), (b, c_lat, lh, lw))
    if x0 is not None:
        alpha, sigma = schedule.alpha_sigma(ts[0])
        noise = alpha * x0 + sigma * noise

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        control = None
        if hint is not None:
            if guess_mode and halves == 2:  # official cldm: the unconditional half gets no control
                res = controlnet(x[b:], hint, t[b:], context[b:], None if y is None else y[b:])
                control = [torch.cat([torch.zeros_like(r), r * s]) for r, s in zip(res, scales)]
            else:
                h = torch.cat([hint] * halves)
                control = [r * s for r, s in zip(controlnet(x, h, t, context, y), scales)]
        return unet(x, t, context=context, y=y, control=control, features=features)

    with on_device(parts, "unet", "controlnet"):
        x = run_sampler(model_fn, noise, sampler=sampler, schedule=schedule, timesteps=ts, guidance=guided,
                        eta=eta, generator=gen, desc="sd", progress_bar=progress, callback=callback)
    with on_device(parts, "vae"):
        return to_unit(vae.decode(vae.from_model_space(x).to(model_dtype(vae)), tile=tile))


__all__ = ["SDParts", "sd_schedule", "sdxl_vector", "encode_prompt", "generate", "control_scales",
           "check_controlnet", "adapter_features"]
