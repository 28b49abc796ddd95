"""Preview samples during training: `fit`'s `preview(model, step)` callbacks that run a system's pipeline on the
first training example (its sketch, source image or caption) and save `step-NNNNNNN.png` (one row: the
example, then the sample). Seeded, so previews of different steps differ only by what the model learnt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipelines import bridge as bridge_pipeline
from pipelines import flux as flux_pipeline
from pipelines import scribble as scribble_pipeline
from pipelines.common import save_png

Preview = Callable[[nn.Module, int], None]


def _save(folder: Path, step: int, images: list[Tensor]) -> None:
    """Images (1, C, H, W) in [0, 1] side by side (grey expanded to RGB) as folder/step-NNNNNNN.png."""
    row = torch.cat([x.float().cpu().expand(-1, 3, -1, -1) for x in images], dim=-1)  # (1, 3, H, n * W)
    save_png(row, folder / f"step-{step:07d}.png")


def _options(spec: dict[str, Any]) -> dict[str, Any]:
    return {"steps": int(spec.get("steps", 20)), "seed": int(spec.get("seed", 0)), "progress": False}


def scribble_preview(folder: Path, spec: dict[str, Any], *, unet, hint, vae, data, clip, clip_tok) -> Preview:
    """Sketch + caption of the first pair -> DDIM sample with CFG `preview.guidance` (default 7.5)."""
    first = data[0]
    sketch, prompt = first["source"][None], spec.get("prompt", first["caption"])
    parts = scribble_pipeline.ScribbleParts(unet=unet, vae=vae, clip=clip, tok=clip_tok, adapter=hint)

    def preview(model: nn.Module, step: int) -> None:
        image = scribble_pipeline.generate(parts, sketch, prompt, guidance=float(spec.get("guidance", 7.5)),
                                           **_options(spec))
        _save(folder, step, [sketch, image])

    return preview


def bridge_preview(folder: Path, spec: dict[str, Any], *, unet, vae, data, sigma_b, context) -> Preview:
    """The first source image through the bridge in `preview.steps` steps (default 1, as LBM is used)."""
    source = (data[0]["source"][None] + 1) / 2  # [-1, 1] -> [0, 1]
    parts = bridge_pipeline.BridgeParts(unet=unet, vae=vae, sigma_b=sigma_b, context=context)

    def preview(model: nn.Module, step: int) -> None:
        image = bridge_pipeline.generate(parts, source, **{**_options(spec), "steps": int(spec.get("steps", 1))})
        _save(folder, step, [source, image])

    return preview


def flux_preview(folder: Path, spec: dict[str, Any], *, flux, ae, data, guidance, max_length, prompt, clip, clip_tok,
                 t5, t5_tok) -> Preview:
    """The first caption (or the fixed prompt) at the training size, guidance `preview.guidance` (default the
    training one)."""
    first = data[0]
    text = spec.get("prompt", prompt if prompt is not None else first["caption"])
    height, width = first["image"].shape[-2:]
    parts = flux_pipeline.FluxParts(model=flux, ae=ae, clip=clip, clip_tok=clip_tok, t5=t5, t5_tok=t5_tok)

    def preview(model: nn.Module, step: int) -> None:
        image = flux_pipeline.generate(parts, text, height=height, width=width, max_length=max_length,
                                       guidance=float(spec.get("guidance", guidance)), **_options(spec))
        _save(folder, step, [(first["image"][None] + 1) / 2, image])

    return preview


__all__ = ["bridge_preview", "flux_preview", "scribble_preview"]
