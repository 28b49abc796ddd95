"""ScribbleDiffusion: text + a sketch -> image. The sketch goes through a `zoo.hint_encoder.HintEncoder` into the
UNet's injection points (features added after the chosen input blocks), the UNet is sampled with DDIM on the
cosine (`squaredcos_cap_v2`, iDDPM) schedule under classifier-free guidance; the loop itself is `pipelines.sd`'s.

Opt-in cross-attention maps (`attention_maps=True`): every SpatialTransformer's attn2 probabilities are recorded
(`zoo.attention_capture`), the conditional half kept, averaged over heads, blocks and steps at the latent grid
(bilinear resizing keeps each pixel's distribution over tokens summing to 1), and `save_attention_maps` writes one
heatmap PNG per token.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import samplers
from pipelines import sd
from pipelines.common import Callback, from_pil, save_png
from zoo.attention_capture import capture_attention


def scribble_schedule(prediction: str = "eps") -> samplers.VPSchedule:
    """The cosine schedule of iDDPM (diffusers' `squaredcos_cap_v2`) on the grid diffusers' SD pipelines give DDIM
    (`leading` spacing with steps_offset 1, which they force), ending noise-free."""
    return samplers.VPSchedule("squaredcos_cap_v2", prediction=prediction, steps_offset=1)


@dataclass
class ScribbleParts(sd.SDParts):
    """SD parts whose `adapter` is the sketch's HintEncoder and whose schedule defaults to the cosine one."""

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = scribble_schedule(getattr(self.unet.config, "parameterization", "eps"))


def sketch_to_hint(sketch, channels: int) -> Tensor:
    """A sketch (PIL image, or a (B, 1 or 3, H, W) float tensor in [0, 1]) -> (B, channels, H, W) in [0, 1]; RGB is
    reduced to luminance for a 1-channel encoder."""
    x = from_pil(sketch) if not isinstance(sketch, Tensor) else sketch
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise ValueError(f"sketch must be a float tensor (B, 1 or 3, H, W) in [0, 1] or a PIL image, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"sketch values lie in [{x.min().item():.3g}, {x.max().item():.3g}], expected [0, 1]")
    if x.shape[1] == channels:
        return x
    if channels == 1:  # ITU-R BT.601 luma, as PIL's convert("L")
        return (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(f"sketch has {x.shape[1]} channels, the hint encoder takes {channels}")


def token_maps(maps: Mapping[str, list[Tensor]], batch: int, size: tuple[int, int]) -> Tensor:
    """Recorded attn2 probabilities {block: [(B', heads, h*w, T) per call]} -> (batch, T, *size): the last `batch`
    rows of every call (the conditional half under CFG), mean over heads, calls and blocks."""
    total, n = None, 0
    for path, calls in maps.items():
        for p in calls:
            p = p[-batch:].float().mean(1)  # (batch, h*w, T)
            w = round((p.shape[1] * size[1] / size[0]) ** 0.5)  # the block's grid is (H/s, W/s)
            h = p.shape[1] // w
            if h * w != p.shape[1] or h * size[1] != w * size[0]:
                raise ValueError(f"{path}: {p.shape[1]} attention rows do not form a grid of aspect {size}")
            grid = p.transpose(1, 2).reshape(batch, -1, h, w)  # (batch, T, h, w)
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False) if (h, w) != size else grid
            total = grid if total is None else total + grid
            n += 1
    if total is None:
        raise ValueError("no cross-attention was recorded (the UNet has no attn2 layers)")
    return total / n


def heatmap(m: Tensor) -> Tensor:
    """(h, w) non-negative map -> (3, h, w) RGB in [0, 1]: black -> red -> yellow -> white, scaled to its max."""
    v = m / m.max().clamp_min(1e-12)
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)])


def token_heatmaps(maps: Tensor, n: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """One image's token maps (T, h, w) -> heatmaps (n, 3, *size) of the first `n` tokens (all T by default),
    upscaled to `size` (e.g. the image's) when given."""
    if maps.ndim != 3:
        raise ValueError(f"token maps are one image's (T, h, w), got shape {tuple(maps.shape)}")
    n = maps.shape[0] if n is None else n
    if n > maps.shape[0]:
        raise ValueError(f"{n} tokens asked for, {maps.shape[0]} token maps recorded")
    maps = maps[:n]
    if size is not None:
        maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    return torch.stack([heatmap(m) for m in maps])


def save_attention_maps(maps: Tensor, path: str | Path, labels: Sequence[str] | None = None,
                        size: tuple[int, int] | None = None) -> list[Path]:
    """One image's token maps (T, h, w) -> heatmap PNGs `stem-tokNN[-label].png` beside `path`, for the first
    len(labels) tokens (all T without labels), upscaled to `size` (e.g. the image's) when given."""
    heat = token_heatmaps(maps, None if labels is None else len(labels), size)
    path, out = Path(path), []
    for i in range(heat.shape[0]):
        safe = "" if labels is None else "-" + "".join(c for c in labels[i] if c.isalnum())[:24]
        out += save_png(heat[i], path.with_name(f"{path.stem}-tok{i:02d}{safe}.png"))
    return out


@torch.no_grad()
def generate(
    parts: ScribbleParts,
    sketch,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    *,
    conditioning: Mapping[str, Tensor] | None = None,
    negative_conditioning: Mapping[str, Tensor] | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    sketch_strength: float = 1.0,
    sampler: str = "ddim",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    batch: int = 1,
    latents: Tensor | None = None,
    attention_maps: bool = False,
    callback: Callback = None,
    progress: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sketch + prompt -> images (B, 3, H, W) in [0, 1] at the sketch's size. `sketch_strength` scales the hint
    features. `attention_maps=True` also returns the token maps (B, T, H/8, W/8), summing to 1 over T."""
    if parts.adapter is None:
        raise ValueError("the scribble parts have no hint encoder (parts.adapter); build one with "
                         "zoo.hint_encoder.HintEncoder.for_unet(unet)")
    hint = sketch_to_hint(sketch, parts.adapter.config.hint_channels)
    height, width = hint.shape[-2:]
    run = dict(prompt=prompt, negative_prompt=negative_prompt, conditioning=conditioning,
               negative_conditioning=negative_conditioning, height=height, width=width, steps=steps,
               guidance=guidance, sampler=sampler, seed=seed, generator=generator, batch=batch, latents=latents,
               adapter_image=hint, adapter_strength=sketch_strength, callback=callback, progress=progress)
    if not attention_maps:
        return sd.generate(parts, **run)
    with capture_attention(parts.unet) as maps:
        images = sd.generate(parts, **run)
    down = parts.vae.downscale
    return images, token_maps(maps, images.shape[0], (height // down, width // down))


__all__ = ["ScribbleParts", "generate", "heatmap", "save_attention_maps", "scribble_schedule", "sketch_to_hint",
           "token_heatmaps", "token_maps"]
