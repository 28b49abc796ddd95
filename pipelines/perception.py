"""OmniX panorama perception (HKU-MMLab/OmniX `pipeline_omnix.py` + `cross_lora.py`): RGB panorama -> depth, normal,
albedo, roughness + metallic (`pbr`), semantic maps with FLUX.1-dev and a set of LoRA adapters per task.

The official mechanism, step by step. Each task has one adapter per batch item (the published files:
`rgb_to_<task>/rgb/` and `rgb_to_<task>/<task>/`, here the adapters `<task>_rgb` and `<task>`; the ray-conditioned
normal task `normal_camray` adds a `camray` item). One batch holds, per panorama, the condition items, kept clean
(the panorama's VAE latent, a posterior sample; for `camray` the latent of the per-pixel view-ray map), and the
target, drawn from noise. Every LoRA layer runs each item with its own adapter in the same forward
(`lora.adapters_per_item`), and every attention is cross-batch: each item's queries attend to the keys and values of
all items of its panorama (text tokens included), after RoPE. All items share the prompt "[EQUIRECTANGULAR]", the
distilled guidance 3.5 and the flow time. The latents are 6 columns wider than the panorama (its first 6 appended,
position ids over the wider grid, the schedule's shift from that token count); after every Euler step (`samplers`'
euler, as OmniX's FlowMatchEulerDiscreteScheduler; the blend is the step callback) the first 6 columns fade from the
appended copy into their own values (`blend_extend`) and the conditions are written back clean, so only the target
moves. At the end one more blend, the 6 columns are cropped, and the VAE decodes with OmniX's wrap-around tiling
(`pipelines.omnix_vae`). Maps in [0, 1]: depth is the mean of the 3 channels; `pbr` gives roughness (channel 0) and
metallic (channel 1); the others are RGB.

Different from the official code, said plainly: the noise and the posterior samples come from the call's
generator in OmniX's order (the noise of every item, then one sample per condition), but OmniX samples the
condition latents from the global RNG; each task restarts from the generator's state, as separate OmniX calls with
one seed would, and the panorama is encoded once for all tasks; several panoramas in one call each get their own
items (OmniX runs one); adapters are switched per task without re-injecting (OmniX reloads the files per task). A
task loaded without a condition adapter runs that item through the base weights (OmniX files always come in
sets). OmniX resizes inputs above 720 x 1440 itself; here any size whose sides are multiples of 16 runs. The
latents stay float32 between steps (OmniX's are the model's dtype, bf16).
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
from layers import apply_rope, attention
from pipelines import omnix_vae
from pipelines.common import (
    Callback,
    check_latents,
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

# OmniX's perception tasks (pipeline_omnix's TASK_ADAPTERS): task -> (published folder, condition items, target)
TASKS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "depth": ("rgb_to_depth", ("rgb",), "depth"),
    "normal": ("rgb_to_normal", ("rgb",), "normal"),
    "albedo": ("rgb_to_albedo", ("rgb",), "albedo"),
    "pbr": ("rgb_to_pbr", ("rgb",), "pbr"),
    "semantic": ("rgb_to_semantic", ("rgb",), "semantic"),
    "normal_camray": ("rgb_camray_to_normal", ("rgb", "camray"), "normal"),
}
PROMPT = "[EQUIRECTANGULAR]"  # OmniX's camera prompt for panoramas
BLEND_EXTEND = 6  # latent columns blended across the seam (pipeline_omnix's `blend_extend`)
FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name in every published adapter folder


def conditions_of(task: str) -> tuple[str, ...]:
    """The condition items of `task` before its target item: OmniX's, or ("rgb",) for a task of your own."""
    return TASKS[task][1] if task in TASKS else ("rgb",)


def condition_adapter(task: str, condition: str = "rgb") -> str:
    """The adapter that runs condition item `condition` of `task` (OmniX's per-task `rgb` / `camray` adapters)."""
    return f"{task}_{condition}"


def _adapters(model: nn.Module) -> set[str]:
    layers = lora_lib.lora_layers(model)
    return set().union(*(layer.adapters for layer in layers.values())) if layers else set()


def load_adapters(model: nn.Module, files: Mapping[str, str | Path | dict], scale: float = 1.0) -> dict:
    """Load LoRA files as named adapters, {adapter: file} (any format lora.load reads): a task's target adapter is
    named after the task ("depth"), its condition adapters `<task>_<condition>` ("depth_rgb"). Returns {adapter:
    LoadReport}; adapters take the base weights' dtype (bf16 too)."""
    clash = sorted(set(files) & _adapters(model))
    if clash:
        raise ValueError(f"the model already has adapter(s) {clash}; remove them (lora.remove) or use other names")
    return {name: lora_lib.load(model, src, adapter=name, multiplier=scale) for name, src in files.items()}


def load_published(model: nn.Module, folder: str | Path, tasks: Sequence[str] | None = None,
                   scale: float = 1.0) -> dict:
    """The published OmniX adapters (Hugging Face `KevinHuang/OmniX`): `folder/<task folder>/<adapter>/`
    `pytorch_lora_weights.safetensors` (diffusers/PEFT keys), e.g. rgb_to_depth/{rgb,depth}/. `tasks` defaults to
    every task of `TASKS` whose folder is there."""
    folder = Path(folder)

    def files(task: str) -> dict[str, Path]:
        sub, conds, target = TASKS[task]
        out = {condition_adapter(task, c): folder / sub / c / FILE for c in conds}
        return {**out, task: folder / sub / target / FILE}

    unknown = [t for t in tasks or () if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown OmniX task(s) {unknown}; the published ones are {list(TASKS)}")
    tasks = [t for t in TASKS if (folder / TASKS[t][0]).is_dir()] if tasks is None else list(tasks)
    wanted = {name: f for t in tasks for name, f in files(t).items()}
    missing = [str(f) for f in wanted.values() if not f.is_file()]
    if missing or not tasks:
        raise ValueError(f"OmniX adapter file(s) missing: {missing or f'no task folder of {list(TASKS)} in {folder}'}"
                         "; expected e.g. rgb_to_depth/rgb/" + FILE + " and rgb_to_depth/depth/" + FILE)
    return load_adapters(model, wanted, scale)


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


def ray_map(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """OmniX's `get_camray`: the unit view ray of every equirectangular pixel (1, 3, H, W), x front, y up, z left,
    computed in `dtype` as there (the pipeline's bf16)."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                          torch.arange(width, device=device, dtype=dtype), indexing="ij")
    lon = (0.5 - (u + 0.5) / width) * 2 * torch.pi  # pi .. -pi, left to right
    lat = (0.5 - (v + 0.5) / height) * torch.pi  # pi/2 .. -pi/2, top to bottom
    rays = torch.stack([torch.cos(lat) * torch.cos(lon), torch.sin(lat), torch.cos(lat) * torch.sin(lon)])
    return rays[None]  # (1, 3, H, W), already in [-1, 1]


def encode_condition(parts: FluxParts, image: Tensor, tile: int = omnix_vae.TILE) -> tuple[Tensor, Tensor]:
    """A condition image (B, 3, H, W) in [-1, 1] -> the Flux VAE posterior's (mean, std) in float32 (tiled as
    OmniX's diffusers VAE above `tile` pixels)."""
    with on_device(parts, "ae"):
        post = omnix_vae.encode(parts.ae, image.to(model_dtype(parts.ae)), tile)
    return post.mean.float(), post.std.float()


def target_velocity(velocity: Callable[[Tensor, Tensor], Tensor], clean: list[Tensor]) -> Callable:
    """The model function of the target items (B, 16, h, w) at flow time t (B,): each panorama's clean condition
    latents (B, 16, h, w each) go before its target as batch items, only the targets' velocity comes back."""
    k = len(clean) + 1

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        items = torch.stack([*clean, x], dim=1).flatten(0, 1)  # (kB, 16, h, w): conditions, target per panorama
        v = velocity(pack(items), t.repeat_interleave(k))  # (kB, h/2 * w/2, 64)
        return unpack(v, x.shape[-2], x.shape[-1])[k - 1 :: k]

    return model_fn


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
    Each task names adapters already on `parts.model` (see `load_published`, `load_adapters`). Without
    `conditioning` the prompt defaults to OmniX's "[EQUIRECTANGULAR]" (needs the text encoders). `latents`: your
    own target noise (B, 16, H/8, W/8) instead of the generator's.
    `vae_tile`: the VAE tile in pixels (the Flux VAE's 1024, as OmniX's diffusers VAE)."""
    model, ae = parts.model, parts.ae
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"no task given; name adapters on the model, e.g. {list(TASKS[:3])}")
    missing = [t for t in tasks if t not in _adapters(model)]
    if missing:
        hint = "; roughness and metallic are the maps of task 'pbr'" if {"roughness", "metallic"} & set(missing) else ""
        raise ValueError(f"task(s) {missing} have no LoRA adapter on the Flux model (it has "
                         f"{sorted(_adapters(model))}); load them with pipelines.perception.load_published(model, "
                         "folder) or load_adapters(model, {adapter: file})" + hint)
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
    if latents is not None:
        latents = check_latents(latents, (b, ae.latent_channels, lh, lw), "latents (the target noise)").to(device)
    images = {"rgb": image_to_model(panorama, height, width, b, device),
              "camray": ray_map(height, width, device, model_dtype(ae)).expand(b, -1, -1, -1)}
    posteriors: dict[str, tuple[Tensor, Tensor]] = {}  # condition -> (mean, std), encoded once per call
    state = gen.get_state() if gen is not None else None
    ts = samplers.flux_schedule(steps, (lh // 2) * ((lw + e) // 2), shift=True)  # FLUX.1-dev's dynamic shift

    def widen(x: Tensor) -> Tensor:  # (.., lw) -> (.., lw + e): the first e columns appended
        return torch.cat([x, x[..., :e]], dim=-1)

    out = {}
    for task in tasks:
        conds, k = conditions_of(task), len(conditions_of(task)) + 1  # items per panorama: conditions, target
        if gen is not None:
            gen.set_state(state)  # every task draws as an OmniX call with this seed: all items' noise, then samples
        noise = randn((k * b, ae.latent_channels, lh, lw), gen, device)[k - 1 :: k] if latents is None else latents
        clean = []
        for c in conds:
            if c not in posteriors:
                posteriors[c] = encode_condition(parts, images[c], vae_tile)
            mean, std = posteriors[c]
            clean.append(widen(ae.to_model_space(mean + std * randn(tuple(mean.shape), gen, device))))
        velocity = velocity_fn(model, img_ids(k * b, lh, lw + e, device=device),
                               {n: v.repeat_interleave(k * b // v.shape[0], dim=0) for n, v in cond.items()},
                               guidance, device)
        model_fn = target_velocity(velocity, clean)

        names = [condition_adapter(task, c) if condition_adapter(task, c) in _adapters(model) else None
                 for c in conds] + [task]
        def blend(i: int, n: int, x: Tensor) -> Tensor:  # after every Euler step: the seam blend, then yours
            x = blend_seam(x, e)
            out = callback(i, n, x) if callback is not None else None
            return out if isinstance(out, Tensor) else x

        with on_device(parts, "model"), cross_batch_attention(model, k), lora_lib.adapters_per_item(model, names * b):
            x = run_sampler(model_fn, widen(noise), desc=task, progress_bar=progress, callback=blend, sampler="euler",
                            schedule=samplers.FlowSchedule(), timesteps=ts)
        z = blend_seam(x, e)[..., :lw]  # one more blend after the loop, as OmniX, then the appended columns go
        with on_device(parts, "ae"):
            image = omnix_vae.decode(ae, ae.from_model_space(z).to(model_dtype(ae)), vae_tile)
        out.update(maps(task, to_unit(image)))
    return out


__all__ = ["BLEND_EXTEND", "PROMPT", "TASKS", "condition_adapter", "conditions_of", "cross_batch",
           "cross_batch_attention", "encode_condition", "generate", "load_adapters", "load_published", "maps",
           "ray_map"]
