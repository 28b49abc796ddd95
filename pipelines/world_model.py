"""World-model rollout: frames generated one at a time from the last k frames and actions, each prediction fed back
as history (GameNGen's autoregressive loop), sampled with the flow DPM-Solver under guidance on the null action.

    frames = rollout(model, first_frames, actions, steps=10, guidance=1.5, seed=0)   # (B, n, 3, H, W) in [-1, 1]
    save_strip("rollout.png", [truth, frames[0]]); save_gif("rollout.gif", frames[0])
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

import samplers
from checkpoints_convert import atomic_path
from pipelines.common import generator_for, randn, to_pil, to_unit
from zoo.world_model import WorldModel


def rollout(model: WorldModel, first_frames: Tensor, actions: Tensor, *, steps: int = 10,
            sampler: str = "dpm-solver-2m", guidance: float = 1.0, shift: float = 1.0, seed: int | None = 0,
            generator: torch.Generator | None = None, history_level: float = 0.0, progress: bool = True) -> Tensor:
    """Generate n = actions.shape[1] - k + 1 frames after `first_frames`.

    first_frames (B, k, 3, H, W) in [-1, 1], oldest first; actions (B, k + n - 1) ids or (B, k + n - 1, A) one-hot:
    action i is taken in frame i (frames counted from the first history frame), so frame k + j is predicted from
    actions j .. j + k - 1. Each frame is sampled from fresh noise with `sampler` over `steps` steps of a flow
    schedule (`shift`); `guidance` > 1 mixes in the null-action prediction. `history_level`: the history noise std
    the model is told (0 = clean). Returns the n frames (B, n, 3, H, W) in [-1, 1].
    """
    k = model.params.history
    if not isinstance(first_frames, Tensor) or first_frames.ndim != 5 or first_frames.shape[1] != k:
        got = tuple(first_frames.shape) if isinstance(first_frames, Tensor) else type(first_frames).__name__
        raise ValueError(f"first_frames has shape {got}, expected (B, {k}, {model.params.frame_channels}, H, W)")
    b = first_frames.shape[0]
    if not isinstance(actions, Tensor) or actions.ndim not in (2, 3) or actions.shape[0] != b or actions.shape[1] < k:
        got = tuple(actions.shape) if isinstance(actions, Tensor) else type(actions).__name__
        raise ValueError(f"actions has shape {got}, expected ({b}, {k} + n - 1) ids or ({b}, {k} + n - 1, A) one-hot "
                         f"for n >= 1 frames")
    if guidance < 1.0:
        raise ValueError(f"guidance must be >= 1 (1 = no guidance), got {guidance}")
    generator = generator_for(seed, generator)
    device = next(model.parameters()).device
    n = actions.shape[1] - k + 1
    history = model.encode(first_frames.to(device))  # (B, k, C, h, w)
    level = torch.full((b,), float(history_level), device=device) if model.level_embedder is not None else None
    schedule = samplers.FlowSchedule(shift=shift, prediction=model.params.prediction)
    out = []
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    with torch.no_grad():
        for j in tqdm(range(n), desc="rollout", unit="frame", disable=None if progress else True, leave=False):
            acts = actions[:, j : j + k].to(device)

            def cond(x: Tensor, t: Tensor, acts=acts, history=history) -> Tensor:
                return model(x, t * 1000, history, acts, history_level=level)

            def uncond(x: Tensor, t: Tensor, history=history) -> Tensor:
                return model(x, t * 1000, history, None, history_level=level)

            noise = randn(tuple(history[:, -1].shape), generator, device)
            x0 = samplers.sample(cond, noise, sampler=sampler, steps=steps, schedule=schedule,
                                 guidance=samplers.Guidance(guidance, uncond_fn=uncond) if guidance > 1 else None)
            latent = model.from_target(x0, history)  # (B, C, h, w)
            if model.autoencoder is None:
                latent = latent.clamp(-1, 1)  # pixels: keep the fed-back frame a valid image
            history = torch.cat([history[:, 1:], latent[:, None]], dim=1)
            out.append(latent)
    model.train(was_training)
    return model.decode(torch.stack(out, dim=1)).clamp(-1, 1)  # (B, n, 3, H, W)


def psnr(pred: Tensor, target: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of frames in [-1, 1] (measured on the [0, 1] scale), over all pixels."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (to_unit(pred) - to_unit(target)).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _atomic_save(image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, **options)
    return path


def strip(rows: Sequence[Tensor], gap: int = 2, scale: int = 1):
    """Rows of frames (n, 3, H, W) in [-1, 1] -> one PIL image, a row per entry, `gap` black pixels apart."""
    if not rows or any(r.ndim != 4 or r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise ValueError(f"strip needs rows of (n, 3, H, W) frames of one size, got {[tuple(r.shape) for r in rows]}")
    _, c, h, w = rows[0].shape
    n = max(r.shape[0] for r in rows)
    canvas = torch.zeros(c, len(rows) * (h + gap) - gap, n * (w + gap) - gap)
    for i, row in enumerate(rows):
        for j, frame in enumerate(to_unit(row.detach().cpu())):
            canvas[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = frame
    image = to_pil(canvas)[0]
    return image.resize((image.width * scale, image.height * scale), 0) if scale > 1 else image  # 0 = nearest


def save_strip(path: str | Path, rows: Sequence[Tensor], gap: int = 2, scale: int = 1) -> Path:
    """Write `strip(rows)` as a PNG, atomically (e.g. rows = [ground truth, model])."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_strip writes .png files, got {path.name!r}")
    return _atomic_save(strip(rows, gap, scale), path)


def save_gif(path: str | Path, frames: Tensor, ms_per_frame: int = 100, scale: int = 1) -> Path:
    """Write frames (n, 3, H, W) in [-1, 1] as a looping GIF, atomically."""
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"save_gif writes .gif files, got {path.name!r}")
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise ValueError(f"save_gif needs frames (n, 3, H, W), got {tuple(frames.shape)}")
    pics = to_pil(to_unit(frames.detach().cpu()))
    if scale > 1:
        pics = [p.resize((p.width * scale, p.height * scale), 0) for p in pics]
    return _atomic_save(pics[0], path, save_all=True, append_images=pics[1:], duration=ms_per_frame, loop=0)


__all__ = ["psnr", "rollout", "save_gif", "save_strip", "strip"]
