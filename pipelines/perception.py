"""OmniX-style panorama perception: RGB panorama -> distance, normal, albedo, roughness, metallic maps with FLUX.1.

Encode the panorama once with the Flux VAE (posterior mean), then for every task: activate that task's LoRA
adapter (one named adapter per task over the 95-layer `omnix` preset, all injected once; switching is
`lora.set_adapter`, never a re-injection), denoise fresh target tokens next to the clean RGB tokens, decode.
The RGB tokens join the image sequence with the target's own position ids, so each target token attends to the
RGB token at its place; only the target half of the model's output drives the sampler, and the RGB tokens stay
clean at every step (as OmniX writes the clean condition latents back after each step).

Differences from HKU-MMLab/OmniX (`pipeline_omnix.py` + `cross_lora.py`), said plainly: OmniX runs the RGB
condition as a second batch element through its own `rgb` adapter with cross-batch attention (the target's keys and
values include the condition's), and blends 6 latent columns across the seam (`blend_extend`). Here the condition
tokens run through the task's adapter in the same sequence, and there is no seam blending (see pipelines.panorama
for wrap padding). The same initial noise serves every task, so a task's map does not depend on which others run.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import lora as lora_lib
import samplers
from pipelines.common import (
    Callback,
    check_size,
    generator_for,
    image_to_model,
    model_dtype,
    randn,
    run_sampler,
    to_unit,
)
from pipelines.flux import FluxParts, prepare_conditioning, velocity_fn
from pipelines.offload import compute_device, on_device
from zoo.flux import img_ids, pack, unpack

TASKS = ("distance", "normal", "albedo", "roughness", "metallic")
PROMPT = "[EQUIRECTANGULAR]"  # OmniX's camera prompt for panoramas


def load_adapters(model: nn.Module, files: Mapping[str, str | Path | dict], scale: float = 1.0) -> dict:
    """Load one LoRA file per task (any format lora.load reads: PEFT/diffusers, kohya, ComfyUI, ours) as the
    adapter named after the task; returns {task: LoadReport}. Adapters take the base weights' dtype (bf16 too)."""
    layers = lora_lib.lora_layers(model)
    have = set().union(*(layer.adapters for layer in layers.values())) if layers else set()
    clash = sorted(set(files) & have)
    if clash:
        raise ValueError(f"the model already has adapter(s) {clash}; remove them (lora.remove) or use other names")
    return {task: lora_lib.load(model, src, adapter=task, multiplier=scale) for task, src in files.items()}


def encode_panorama(parts: FluxParts, panorama: Tensor, device) -> Tensor:
    """RGB panorama (B, 3, H, W) in [0, 1] -> packed clean latent tokens (B, H/16 * W/16, 64), posterior mean."""
    ae = parts.ae
    x = image_to_model(panorama, panorama.shape[-2], panorama.shape[-1], panorama.shape[0], device, model_dtype(ae))
    with on_device(parts, "ae"):
        return pack(ae.to_model_space(ae.encode(x).mode().float()))


@torch.no_grad()
def generate(
    parts: FluxParts,
    panorama: Tensor,
    tasks: Sequence[str] = ("distance", "normal", "albedo"),
    *,
    prompt: str | list[str] | None = None,
    conditioning: Mapping[str, Tensor] | None = None,
    steps: int = 28,
    guidance: float = 3.5,
    sampler: str = "euler",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    progress: bool = True,
) -> dict[str, Tensor]:  # {task: (B, 3, H, W) in [0, 1]}
    """Panorama (B, 3, H, W) in [0, 1] (2:1 for equirectangular input; any multiple of 16 runs) -> {task: map}.
    Each task names a LoRA adapter already on `parts.model` (see `load_adapters`). Without `conditioning`, the prompt
    defaults to OmniX's "[EQUIRECTANGULAR]" (needs the text encoders)."""
    model, ae = parts.model, parts.ae
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError(f"no task given; name adapters on the model, e.g. {list(TASKS[:3])}")
    layers = lora_lib.lora_layers(model)
    have = set().union(*(layer.adapters for layer in layers.values())) if layers else set()
    missing = [t for t in tasks if t not in have]
    if missing:
        raise ValueError(f"task(s) {missing} have no LoRA adapter on the Flux model (it has {sorted(have)}); "
                         "load them with pipelines.perception.load_adapters(model, {task: file})")
    if not isinstance(panorama, Tensor):
        from pipelines.common import from_pil

        panorama = from_pil(panorama)
    panorama = panorama[None] if panorama.ndim == 3 else panorama
    height, width = panorama.shape[-2:]
    check_size(height, width, 16, "perception")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    gen = generator_for(seed, generator)
    device = compute_device(parts, model)
    b, lh, lw = panorama.shape[0], height // 8, width // 8
    if conditioning is None and prompt is None:
        prompt = PROMPT
    cond = prepare_conditioning(parts, prompt, conditioning, 1)
    if cond["txt"].shape[0] not in (1, b):
        raise ValueError(f"conditioning has batch {cond['txt'].shape[0]}, the panorama batch is {b}")

    rgb = encode_panorama(parts, panorama, device)  # (B, L, 64), clean, shared by every task
    noise = pack(randn((b, ae.latent_channels, lh, lw), gen, device))  # one draw for all tasks
    n = noise.shape[1]
    pos = img_ids(b, lh, lw, device=device)
    pos = torch.cat([pos, pos], dim=1)  # the RGB tokens sit at the target's positions
    velocity = velocity_fn(model, pos, cond, guidance, device)
    ts = samplers.flux_schedule(steps, n, shift=model.guidance_in is not None)

    def model_fn(x: Tensor, t: Tensor) -> Tensor:  # x: (B, L, 64) target tokens; returns their velocity
        return velocity(torch.cat([x, rgb], dim=1), t)[:, :n]

    out = {}
    for task in tasks:
        lora_lib.set_adapter(model, task)
        with on_device(parts, "model"):
            z = run_sampler(model_fn, noise, sampler=sampler, schedule=samplers.FlowSchedule(), timesteps=ts,
                            generator=gen, desc=task, progress_bar=progress, callback=callback)
        with on_device(parts, "ae"):
            out[task] = to_unit(ae.decode(ae.from_model_space(unpack(z, lh, lw)).to(model_dtype(ae))))
    return out


__all__ = ["PROMPT", "TASKS", "encode_panorama", "generate", "load_adapters"]
