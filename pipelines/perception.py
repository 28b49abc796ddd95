"""OmniX panorama perception (HKU-MMLab/OmniX `pipeline_omnix.py` + `cross_lora.py`): RGB panorama -> depth, normal,
albedo, roughness + metallic (`pbr`), semantic maps with FLUX.1-dev and two LoRA adapters per task.

The official mechanism, step by step. Each task has a pair of adapters (the published files: `rgb_to_<task>/rgb/`
and `rgb_to_<task>/<task>/`, here the adapters `<task>_rgb` and `<task>`). One batch holds two items per panorama:
the condition, the panorama's VAE latent (a posterior sample), kept clean, and the target, drawn from noise. Every
LoRA layer runs the condition item with `<task>_rgb` and the target item with `<task>` in the same forward
(`lora.adapters_per_item`), and every attention is cross-batch: each item's queries attend to the keys and values
of both items (text tokens included), after RoPE. Both items share the prompt "[EQUIRECTANGULAR]", the distilled
guidance 3.5 and the flow time. The latents are 6 columns wider than the panorama (its first 6 appended, position
ids over the wider grid, the schedule's shift from that token count); after every Euler step (diffusers'
FlowMatchEulerDiscreteScheduler, as OmniX; written out here because `samplers.sample` has no hook between steps)
the first 6 columns fade from the appended copy into their own values (`blend_extend`) and the condition is written
back clean, so only the target moves. At the end one more blend, the 6 columns are cropped, and the VAE decodes
with OmniX's wrap-around tiling (`pipelines.omnix_vae`). Maps in [0, 1]: depth is the mean of the 3 channels; `pbr`
gives roughness (channel 0) and metallic (channel 1); the others are RGB.

Different from the official code, said plainly: the posterior sample and the noise come from the call's generator
(OmniX samples the condition latent from the global RNG, after drawing the noise of both items, which we draw
too); several panoramas in one call each get their own pair of items (OmniX runs one); several tasks in one call
reuse the encoded panorama and the same noise, each adapter pair switched per task without re-injecting (OmniX
reloads the files per task). A task loaded without its `<task>_rgb` adapter runs the condition through the base
weights (OmniX files always come in pairs). OmniX resizes inputs above 720 x 1440 itself; here any size whose
sides are multiples of 16 runs. The latents stay float32 between steps (OmniX's are the model's dtype, bf16).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

import lora as lora_lib
import samplers
from layers import attention
from layers.rope import apply_rope
from pipelines import omnix_vae
from pipelines.common import (
    Callback,
    check_latents,
    check_size,
    generator_for,
    image_to_model,
    model_dtype,
    randn,
    to_unit,
)
from pipelines.common import progress as progress_bar
from pipelines.flux import FluxParts, prepare_conditioning, velocity_fn
from pipelines.offload import compute_device, on_device
from zoo.flux import img_ids, pack, unpack

TASKS = ("depth", "normal", "albedo", "pbr", "semantic")  # OmniX's perception adapters (folders rgb_to_<task>)
PROMPT = "[EQUIRECTANGULAR]"  # OmniX's camera prompt for panoramas
BLEND_EXTEND = 6  # latent columns blended across the seam (pipeline_omnix's `blend_extend`)
FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name in every published adapter folder


def condition_adapter(task: str) -> str:
    """The adapter that runs the RGB condition item for `task` (OmniX's per-task `rgb` adapter)."""
    return f"{task}_rgb"


def _adapters(model: nn.Module) -> set[str]:
    layers = lora_lib.lora_layers(model)
    return set().union(*(layer.adapters for layer in layers.values())) if layers else set()


def load_adapters(model: nn.Module, files: Mapping[str, str | Path | dict], conditions: Mapping | None = None,
                  scale: float = 1.0) -> dict:
    """Load each task's LoRA file (`files`: {task: file}) as adapter `task` and its condition file (`conditions`:
    {task: file}) as `<task>_rgb`; any format lora.load reads. Returns {adapter: LoadReport}; adapters take the
    base weights' dtype (bf16 too)."""
    wanted = {**dict(files), **{condition_adapter(t): f for t, f in (conditions or {}).items()}}
    clash = sorted(set(wanted) & _adapters(model))
    if clash:
        raise ValueError(f"the model already has adapter(s) {clash}; remove them (lora.remove) or use other names")
    return {name: lora_lib.load(model, src, adapter=name, multiplier=scale) for name, src in wanted.items()}


def load_published(model: nn.Module, folder: str | Path, tasks: Sequence[str] | None = None,
                   scale: float = 1.0) -> dict:
    """The published OmniX adapters (Hugging Face `KevinHuang/OmniX`): `folder/rgb_to_<task>/{rgb,<task>}/`
    `pytorch_lora_weights.safetensors` (diffusers/PEFT keys). `tasks` defaults to every perception task present."""
    folder = Path(folder)
    found = [t for t in TASKS if (folder / f"rgb_to_{t}" / t / FILE).is_file()]
    tasks = found if tasks is None else list(tasks)
    missing = [str(folder / f"rgb_to_{t}" / sub / FILE) for t in tasks for sub in (t, "rgb")
               if not (folder / f"rgb_to_{t}" / sub / FILE).is_file()]
    if missing or not tasks:
        raise ValueError(f"OmniX adapter file(s) missing: {missing or f'none of {list(TASKS)} in {folder}'}; "
                         "expected the layout rgb_to_<task>/{rgb,<task>}/" + FILE)
    return load_adapters(model, {t: folder / f"rgb_to_{t}" / t / FILE for t in tasks},
                         {t: folder / f"rgb_to_{t}" / "rgb" / FILE for t in tasks}, scale)


def cross_batch(group: int) -> Callable[..., Tensor]:
    """Attention where each item's queries see the keys/values of all `group` consecutive items (cross_lora.py's
    `repeat(key, 'b n s d -> bs n (b s) d')`, per panorama); RoPE is applied per item first, as there."""

    def attend(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None = None) -> Tensor:  # q, k, v (B, H, L, D)
        if pe is not None:
            q, k = apply_rope(q, k, pe)
        k, v = (repeat(rearrange(t, "(b g) h l d -> b h (g l) d", g=group), "b h gl d -> (b g) h gl d", g=group)
                for t in (k, v))  # (B, H, group * L, D)
        return attention(q, k, v)  # (B, L, H*D)

    return attend


@contextmanager
def cross_batch_attention(model: nn.Module, group: int) -> Iterator[nn.Module]:
    """Inside the block, every Flux block attends across groups of `group` batch items (see `cross_batch`)."""
    blocks = [*model.double_blocks, *model.single_blocks]
    try:
        for block in blocks:
            block.attend = cross_batch(group)
        yield model
    finally:
        for block in blocks:
            block.__dict__.pop("attend", None)


def blend_seam(x: Tensor, extent: int) -> Tensor:
    """pipeline_omnix's `blend_h(latents, latents, blend_extend)` on (B, C, h, w + extent) latents: the first
    `extent` columns fade from the appended copy (the last `extent`) into their own values."""
    return omnix_vae.blend(x[..., -extent:], x.clone(), extent, dim=3) if extent else x


def encode_panorama(parts: FluxParts, panorama: Tensor, generator: torch.Generator | None, device,
                    tile: int = omnix_vae.TILE) -> Tensor:
    """RGB panorama (B, 3, H, W) in [0, 1] -> condition latents (B, 16, H/8, W/8) in the model's space: a posterior
    sample of the Flux VAE (tiled as OmniX's diffusers VAE above 1024 pixels)."""
    ae = parts.ae
    x = image_to_model(panorama, panorama.shape[-2], panorama.shape[-1], panorama.shape[0], device, model_dtype(ae))
    with on_device(parts, "ae"):
        post = omnix_vae.encode(ae, x, tile)
    eps = randn(tuple(post.mean.shape), generator, device)
    return ae.to_model_space(post.mean.float() + post.std.float() * eps)


def maps(task: str, image: Tensor) -> dict[str, Tensor]:
    """OmniX's post-processing of a decoded task image (B, 3, H, W) in [0, 1]."""
    if task in ("depth", "distance"):
        return {task: image.mean(dim=1, keepdim=True)}  # (B, 1, H, W)
    if task == "pbr":
        return {"roughness": image[:, 0:1], "metallic": image[:, 1:2]}
    return {task: image}


@torch.no_grad()
def generate(
    parts: FluxParts,
    panorama: Tensor,
    tasks: Sequence[str] = ("depth", "normal", "albedo"),
    *,
    prompt: str | list[str] | None = None,
    conditioning: Mapping[str, Tensor] | None = None,
    steps: int = 28,
    guidance: float = 3.5,
    blend_extend: int = BLEND_EXTEND,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    vae_tile: int = omnix_vae.TILE,
    callback: Callback = None,
    progress: bool = True,
) -> dict[str, Tensor]:  # {map: (B, 1 or 3, H, W) in [0, 1]}
    """Panorama (B, 3, H, W) in [0, 1] (2:1 equirectangular; sides multiples of 16) -> {map name: map}.
    Each task names an adapter pair already on `parts.model` (see `load_published`, `load_adapters`). Without
    `conditioning` the prompt defaults to OmniX's "[EQUIRECTANGULAR]" (needs the text encoders). `latents`: your
    own (2B, 16, H/8, W/8) noise for the [condition, target] items (the condition's is replaced, as in OmniX).
    `vae_tile`: the VAE tile in pixels (the Flux VAE's 1024, as OmniX's diffusers VAE)."""
    model, ae = parts.model, parts.ae
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"no task given; name adapters on the model, e.g. {list(TASKS[:3])}")
    missing = [t for t in tasks if t not in _adapters(model)]
    if missing:
        raise ValueError(f"task(s) {missing} have no LoRA adapter on the Flux model (it has "
                         f"{sorted(_adapters(model))}); load them with pipelines.perception.load_published(model, "
                         "folder) or load_adapters(model, {task: file}, {task: rgb file})")
    if not isinstance(panorama, Tensor):
        from pipelines.common import from_pil

        panorama = from_pil(panorama)
    panorama = panorama[None] if panorama.ndim == 3 else panorama
    height, width = panorama.shape[-2:]
    check_size(height, width, 16, "perception")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    b, lh, lw, e = panorama.shape[0], height // 8, width // 8, blend_extend
    if not isinstance(e, int) or e < 0 or e % 2 or e > lw:
        raise ValueError(f"blend_extend must be an even number of latent columns in [0, {lw}] (the latent width), "
                         f"got {e!r}")
    gen = generator_for(seed, generator)
    device = compute_device(parts, model)
    if conditioning is None and prompt is None:
        prompt = PROMPT
    cond = prepare_conditioning(parts, prompt, conditioning, 1)
    if cond["txt"].shape[0] not in (1, b):
        raise ValueError(f"conditioning has batch {cond['txt'].shape[0]}, the panorama batch is {b}")
    cond = {k: v.repeat_interleave(2 * b // v.shape[0], dim=0) for k, v in cond.items()}  # 2 items per panorama

    # items per panorama: [condition, target]; OmniX draws both items' noise, then the condition latent
    shape = (2 * b, ae.latent_channels, lh, lw)
    noise = randn(shape, gen, device) if latents is None else \
        check_latents(latents, shape, "latents (a condition and a target item per panorama)").to(device)
    rgb = encode_panorama(parts, panorama, gen, device, vae_tile)  # (B, 16, lh, lw)

    def widen(x: Tensor) -> Tensor:  # (.., lw) -> (.., lw + e): the first e columns appended
        return torch.cat([x, x[..., :e]], dim=-1)

    rgb, x0 = widen(rgb), widen(noise[1::2])
    pos = img_ids(2 * b, lh, lw + e, device=device)
    velocity = velocity_fn(model, pos, cond, guidance, device)
    ts = samplers.flux_schedule(steps, (lh // 2) * ((lw + e) // 2), shift=True)  # FLUX.1-dev's dynamic shift

    def model_fn(x: Tensor, t: Tensor) -> Tensor:  # x (B, 16, lh, lw + e) targets -> their velocity
        items = torch.stack([rgb, x], dim=1).flatten(0, 1)  # (2B, ...) condition, target per panorama
        v = velocity(pack(items), t.repeat_interleave(2))
        return unpack(v, lh, lw + e)[1::2]

    out = {}
    for task in tasks:
        rgb_adapter = condition_adapter(task) if condition_adapter(task) in _adapters(model) else None
        cb, close = progress_bar(steps, progress, callback, task)
        try:
            with on_device(parts, "model"), cross_batch_attention(model, 2), \
                    lora_lib.adapters_per_item(model, [rgb_adapter, task] * b):
                x = x0
                for i in range(steps):  # the scheduler's Euler step, then the seam blend (the condition never moves)
                    x = blend_seam(x + (ts[i + 1] - ts[i]) * model_fn(x, torch.full((b,), ts[i], device=device)), e)
                    if cb is not None:
                        cb(i + 1, steps, x)
        finally:
            close()
        z = blend_seam(x, e)[..., :lw]  # one more blend after the loop, as OmniX, then the appended columns go
        with on_device(parts, "ae"):
            image = omnix_vae.decode(ae, ae.from_model_space(z).to(model_dtype(ae)), vae_tile)
        out.update(maps(task, to_unit(image)))
    return out


__all__ = ["BLEND_EXTEND", "PROMPT", "TASKS", "condition_adapter", "cross_batch", "cross_batch_attention",
           "encode_panorama", "generate", "load_adapters", "load_published", "maps"]
