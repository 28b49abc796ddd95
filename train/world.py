"""`python -m train world-model`: the Ms. Pac-Man world model end to end, in about five minutes on two CPU cores.

    collect frames (once) -> train the pixel-space world model with the flow objective -> next-frame PSNR on
    held-out episodes against copy-last-frame -> roll out 16 frames from held-out starts under their actions

Writes into the output folder (default runs/world-model): pacman.npz (the frames; reused when present), metrics.jsonl,
loss.png, rollout.png (per start: the ground-truth row above the model's row), rollout.gif and summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import zoo
from pipelines.world_model import psnr, rollout, save_gif, save_strip
from samplers import FlowSchedule
from zoo.world_model import WorldModel

from . import objectives
from .data import atari
from .loader import collate
from .loop import FitResult, fit
from .timesteps import LogitNormal, Shifted


@dataclass
class Batches:
    """Turns dataset windows into the objective's inputs, and the model's training call (history noise, action
    dropout for guidance) drawing from its own seeded generator."""

    model: WorldModel
    action_drop: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.action_drop < 1.0:
            raise ValueError(f"action_drop must be in [0, 1), got {self.action_drop}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def prepare(self, batch: tuple[Tensor, Tensor]) -> dict:
        """(frames (B, k+1, 3, H, W), actions (B, k)) -> x0 = the next frame's target, cond = history + actions."""
        frames, actions = batch
        k = self.model.params.history
        latents = self.model.encode(frames)  # (B, k+1, C, h, w)
        history = latents[:, :k]
        return {"x0": self.model.to_target(latents[:, k], history), "cond": {"history": history, "actions": actions}}

    def forward(self, net: torch.nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The model at flow time t (timestep = 1000 t), its history noised and some actions nulled."""
        history, level = cond["history"], None
        if self.model.params.history_noise > 0:
            history, level = self.model.noise_history(history, self.generator)
        keep = torch.rand(x_t.shape[0], generator=self.generator) >= self.action_drop
        return net(x_t, t * 1000, history, cond["actions"], history_level=level, keep_actions=keep)


def train(model: WorldModel, windows: atari.Windows, *, steps: int, batch_size: int = 16, lr: float = 1e-3,
          action_drop: float = 0.1, shift: float = 1.0, seed: int = 0, warmup: int = 20,
          output_dir: str | Path | None = None, progress: bool = True) -> FitResult:
    """`train.fit` on the flow objective (logit-normal times pushed toward noise by `shift`, as the sampling grid
    of `rollout(shift=)`), cosine LR, gradient clipping."""
    batches = Batches(model, action_drop, seed)
    schedule = FlowSchedule(prediction=model.params.prediction)  # the rectified-flow path; velocity or x0 target
    objective = objectives.flow_matching(schedule, timesteps=Shifted(LogitNormal(), shift))
    return fit(model, objective, windows, steps=steps, lr=lr, batch_size=batch_size, forward=batches.forward,
               prepare=batches.prepare, trainable=["sana", "history_embedder", "action_embedder", "level_embedder"],
               warmup=warmup, lr_schedule="cosine", min_lr_ratio=0.1, clip_grad_norm=1.0, seed=seed,
               output_dir=output_dir, progress=progress, log_every=1)


def next_frame_psnr(model: WorldModel, windows: atari.Windows, indices: list[int], *, batch_size: int = 32,
                    **sample) -> tuple[float, float]:
    """(model, copy-last-frame) PSNR in dB of the next frame predicted from the true history, over `indices`."""
    preds, lasts, truths = [], [], []
    for i in range(0, len(indices), batch_size):
        frames, actions = collate([windows[j] for j in indices[i : i + batch_size]])
        k = model.params.history
        preds.append(rollout(model, frames[:, :k], actions, progress=False, **sample)[:, 0])
        lasts.append(frames[:, k - 1])
        truths.append(frames[:, k])
    truth = torch.cat(truths)
    return psnr(torch.cat(preds), truth), psnr(torch.cat(lasts), truth)


def save_loss_plot(path: str | Path, losses: list[float], width: int = 640, height: int = 360) -> Path:
    """The training loss per step (and its running mean) as a PNG line chart drawn with Pillow, log-scaled."""
    from PIL import Image, ImageDraw

    if not losses:
        raise ValueError("save_loss_plot needs at least one loss value")
    values = torch.tensor(losses, dtype=torch.float64).clamp_min(1e-8).log10()
    window = max(1, len(losses) // 20)
    smooth = torch.nn.functional.avg_pool1d(values[None, None], window, 1, padding=0)[0, 0]
    lo, hi = values.min().item(), values.max().item()
    hi = hi if hi > lo else lo + 1
    pad = 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def xy(i: float, v: float) -> tuple[float, float]:
        return (pad + (width - 2 * pad) * i / max(1, len(losses) - 1),
                height - pad - (height - 2 * pad) * (v - lo) / (hi - lo))

    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    draw.line([xy(i, v) for i, v in enumerate(values.tolist())], fill=(160, 190, 230), width=1)
    if len(smooth) > 1:
        draw.line([xy(i + (window - 1) / 2, v) for i, v in enumerate(smooth.tolist())], fill=(20, 60, 160), width=2)
    draw.text((pad, 10), f"flow-matching loss per step (log10), {len(losses)} steps; "
                         f"first {losses[0]:.4f}, last {losses[-1]:.4f}", fill="black")
    draw.text((pad, height - pad + 8), "step 1", fill="black")
    draw.text((width - pad - 60, height - pad + 8), f"step {len(losses)}", fill="black")
    draw.text((4, pad), f"{10 ** hi:.3g}", fill="black")
    draw.text((4, height - pad - 10), f"{10 ** lo:.3g}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def idle_cores() -> int:
    """Cores not busy by the 1-minute load average (at least 1, at most torch's default thread count)."""
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - round(busy)))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train world-model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/world-model", help="output folder (default: runs/world-model)")
    p.add_argument("--data", default=None, help="dataset .npz (default: OUT/pacman.npz; collected when absent)")
    p.add_argument("--config", default="world-model", help="world model config name or YAML (default: world-model)")
    p.add_argument("--frames", type=int, default=5000, help="frames to collect (default: 5000)")
    p.add_argument("--episode-frames", type=int, default=500, help="episode length cap while collecting")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels when collecting (default: 64)")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of frames (whole episodes) held out")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (default: 500)")
    p.add_argument("--batch", type=int, default=8, help="windows per step (default: 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--shift", type=float, default=3.0, help="flow time shift of training and sampling (default: 3)")
    p.add_argument("--sample-steps", type=int, default=4, help="sampler steps per generated frame (default: 4)")
    p.add_argument("--sampler", default="dpm-solver-2m")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance on the null action")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the next-frame PSNR")
    p.add_argument("--rollout", type=int, default=16, help="frames rolled out from each held-out start")
    p.add_argument("--starts", type=int, default=2, help="held-out starts to roll out from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores the load average leaves idle, at least 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse([] if argv is None else list(argv))
    # small tensors: threads beyond the idle cores stall each other on a shared machine
    torch.set_num_threads(args.threads or idle_cores())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tic, progress = time.perf_counter(), not args.no_progress
    torch.manual_seed(args.seed)

    # 1. data: Ms. Pac-Man frames, collected once; held-out episodes never seen in training
    data_path = Path(args.data) if args.data else out / "pacman.npz"
    if not data_path.is_file():
        print(f"collecting {args.frames} Ms. Pac-Man frames (seed {args.seed}) -> {data_path}")
        atari.save(atari.collect(args.frames, seed=args.seed, size=args.size, max_episode_frames=args.episode_frames,
                                 progress=progress), data_path)
    episodes = atari.load(data_path)
    train_eps, held_eps = episodes.split(1.0 - args.held_out)
    model = zoo.build(args.config)
    if not isinstance(model, WorldModel):
        raise ValueError(f"--config {args.config!r} builds a {type(model).__name__}, not a world model")
    k = model.params.history
    if episodes.num_actions != model.params.num_actions:
        raise ValueError(f"the data has {episodes.num_actions} actions, the model config {model.params.num_actions}")
    train_set, held_set = atari.Windows(train_eps, k), atari.Windows(held_eps, k)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{torch.get_num_threads()} CPU thread(s); {len(episodes)} frames in {len(episodes.starts)} episodes: "
          f"{len(train_set)} training windows, "
          f"{len(held_set)} held-out; model {args.config} ({n_params:.2f} M parameters), history {k}")

    # 2. train the pixel-space world model with the flow objective
    result = train(model, train_set, steps=args.steps, batch_size=args.batch, lr=args.lr, shift=args.shift,
                   seed=args.seed, output_dir=out, progress=progress)
    trained = time.perf_counter()
    save_loss_plot(out / "loss.png", result.losses)

    # 3. held-out next-frame PSNR: the model (true history, sampled next frame) vs copying the last frame
    sample = {"steps": args.sample_steps, "sampler": args.sampler, "guidance": args.guidance, "shift": args.shift,
              "seed": args.seed}
    g = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(held_set), generator=g)[: args.eval_windows].tolist()
    model_psnr, copy_psnr = next_frame_psnr(model, held_set, picks, **sample)

    # 4. roll out from held-out starts under the held-out actions: ground truth row vs model row
    rows, stills, n = [], [], args.rollout
    lengths = held_eps.ends - held_eps.starts
    long_enough = [e for e in range(len(held_eps.starts)) if lengths[e] > k + n]
    if not long_enough:
        raise ValueError(f"no held-out episode has more than {k + n} frames; collect more or lower --rollout")
    for s in range(args.starts):
        e = long_enough[s % len(long_enough)]
        start = int(held_eps.starts[e]) + (s // len(long_enough)) * n + lengths[e] // 3  # into the play
        start = min(start, int(held_eps.ends[e]) - k - n - 1)
        frames = atari.to_model(held_eps.frames[start : start + k + n])[None]  # (1, k + n, 3, H, W)
        actions = torch.from_numpy(held_eps.actions[start : start + k + n - 1].copy())[None]
        generated = rollout(model, frames[:, :k], actions, progress=progress, **sample)[0]
        rows += [frames[0, k:], generated]
        stills.append(frames[0, k - 1].expand_as(generated))  # the baseline: the last given frame held still
    truth, ours, still = (torch.cat(r) for r in (rows[0::2], rows[1::2], stills))
    rollout_psnr, still_psnr = psnr(ours, truth), psnr(still, truth)
    save_strip(out / "rollout.png", rows, scale=2)
    save_gif(out / "rollout.gif", torch.cat([rows[0], rows[1]], dim=-1), scale=2)

    total = time.perf_counter() - tic
    summary = {"psnr_model": model_psnr, "psnr_copy_last_frame": copy_psnr, "eval_windows": len(picks),
               "train_seconds": trained - tic, "total_seconds": total, "steps": args.steps, "batch": args.batch,
               "final_loss": result.losses[-1], "config": args.config, "sample": sample,
               "rollout_frames": n, "psnr_rollout_model": rollout_psnr, "psnr_rollout_last_frame_held": still_psnr}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    verdict = "beats" if model_psnr > copy_psnr else "does not beat"
    print(f"held-out next-frame PSNR over {len(picks)} windows: model {model_psnr:.2f} dB, copy-last-frame "
          f"{copy_psnr:.2f} dB -> the model {verdict} the baseline")
    print(f"{n}-frame rollouts from {args.starts} held-out start(s), PSNR over all frames: "
          f"model {rollout_psnr:.2f} dB, last given frame held {still_psnr:.2f} dB")
    print(f"wrote {out / 'rollout.png'}, {out / 'rollout.gif'}, {out / 'loss.png'} in {total:.0f} s")
    return 0
