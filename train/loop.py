"""`fit`: the training loop, readable top-down. The same call runs on one process or under torchrun (DDP/FSDP2)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import TrainParts, checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import Parallel, load_sharded, save_sharded
from .ema import EMA
from .loader import batches
from .metrics import Metrics
from .trainable import select_trainable, to_master_dtype

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("constant", "cosine")


def default_forward(model: nn.Module, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
    """model(x_t, t), model(x_t, t, cond) or model(x_t, t, **cond) for a dict condition (UNet: {"context": ...})."""
    if cond is None:
        return model(x_t, t)
    if isinstance(cond, dict):
        return model(x_t, t, **cond)
    return model(x_t, t, cond)


def default_prepare(batch: Any) -> dict[str, Any]:
    """A batch as the objective's arguments: a tensor is x0; a tuple is (x0[, cond[, source]]); a dict has
    `x0` and optionally `cond`, `source`."""
    if isinstance(batch, Tensor):
        return {"x0": batch}
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        return dict(zip(("x0", "cond", "source"), batch))
    if isinstance(batch, dict) and "x0" in batch and set(batch) <= {"x0", "cond", "source"}:
        return dict(batch)
    keys = sorted(batch) if isinstance(batch, dict) else ""
    raise ValueError("a batch must be a tensor, a tuple (x0, cond, source) or a dict with keys x0/cond/source; "
                     f"got {type(batch).__name__}{keys}: pass prepare= to map it")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then constant or a half cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


@dataclass
class FitResult:
    """What a run leaves: per-step losses of this run, the final step, the trained names, EMA and last checkpoint."""

    losses: list[float] = field(default_factory=list)
    step: int = 0
    trainable: list[str] = field(default_factory=list)
    ema: EMA | None = None
    checkpoint: Path | None = None


def fit(
    model: nn.Module,
    objective: Callable[..., Tensor],
    data: Any,
    *,
    steps: int,
    lr: float,
    batch_size: int | None = None,
    forward: Callable[[nn.Module, Tensor, Tensor, Any], Tensor] = default_forward,
    prepare: Callable[[Any], dict[str, Any]] = default_prepare,
    trainable: Sequence[str] | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    warmup: int = 0,
    lr_schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    precision: str = "fp32",
    ema_decay: float | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    save_every: int | None = None,
    resume: str | Path | None = None,
    log_every: int = 1,
    preview: Callable[[nn.Module, int], None] | None = None,
    preview_every: int | None = None,
    progress: bool = True,
    parallel: str = "auto",
    stop_at: int | None = None,
) -> FitResult:
    """Train `model` on `objective` for `steps` optimizer steps of AdamW.

    Each step averages `accumulate` micro-batches from `data` (see `train.loader`: a map-style dataset with
    `batch_size`, or an iterable of batches); `prepare(batch)` gives the objective's x0/cond/source and
    `forward(model, x_t, t, cond)` is the model function. `trainable`: partial module names to train (default:
    the LoRA adapters if the model has any, else everything); the rest is frozen in its storage dtype, the trained
    parameters are kept in fp32. `precision`: fp32, bf16 (autocast) or fp16 (autocast + grad scaler).
    With `output_dir`, metrics go to metrics.jsonl and a complete checkpoint every `save_every` steps and at the
    end; `resume` = a checkpoint path, "latest" (error if none) or "auto" (the latest if any) continues exactly.
    `stop_at` ends this run early at that step (saving there), with the LR schedule still planned for `steps`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if steps < 1 or accumulate < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1, accumulate >= 1, warmup >= 0; got {steps}, {accumulate}, {warmup}")
    if (save_every or resume) and output_dir is None and not (resume and Path(str(resume)).exists()):
        raise ValueError("save_every / resume='latest'|'auto' need output_dir")
    device = next(model.parameters()).device
    par = Parallel.setup(parallel, device)

    # 1. what trains: the chosen parameters in fp32; everything else frozen, in its storage dtype
    names = select_trainable(model, trainable)
    to_master_dtype(model, names)
    model.train()
    net = par.wrap(model, device, PRECISIONS[precision])  # DDP wrapper, or the model sharded in place by FSDP2
    all_params = dict(model.named_parameters())
    params = [all_params[n] for n in names]

    # 2. optimizer, LR schedule, grad scaler, EMA, the objective's random generator
    plain = all(type(p.data) is Tensor for p in params) and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=adam_eps, weight_decay=weight_decay,
                                  fused=plain or None, foreach=None if plain else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=warmup, total=steps, schedule=lr_schedule, min_ratio=min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ema = EMA({n: all_params[n] for n in names}, ema_decay) if ema_decay is not None else None
    generator = torch.Generator(device).manual_seed(seed)
    parts = TrainParts(model, names, optimizer, scheduler, generator, scaler, ema)

    # 3. resume: everything above, the step and the data position, or a clear error
    start, consumed = 0, 0
    path = _resume_path(resume, output_dir)
    if path is not None:
        restored = load_sharded(path, parts) if path.is_dir() else load_checkpoint(path, parts)
        start, consumed = restored["step"], restored["batches"]
    data_iter = batches(data, batch_size, seed=seed, start=consumed, rank=par.rank, world=par.world)

    metrics = Metrics(output_dir, enabled=par.rank == 0)
    bar = tqdm(total=steps, initial=start, disable=True if not progress or par.rank != 0 else None,
               desc="train", unit="step")  # None: no bar (no \r frames) in a redirected log
    result = FitResult(step=start, trainable=names, ema=ema)
    autocast = partial(torch.autocast, device.type, dtype=PRECISIONS[precision] or torch.float32,
                       enabled=precision != "fp32")
    tic = time.perf_counter()
    end = steps if stop_at is None else min(steps, stop_at)
    for step in range(start, end):
        # 4. one optimizer step: accumulate micro-batches, unscale, clip, step, schedule, EMA
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(accumulate):
            inputs = _to(prepare(next(data_iter)), device)
            consumed += 1
            with par.sync_context(net, sync=micro == accumulate - 1), autocast():
                extra = {"source": inputs["source"]} if inputs.get("source") is not None else {}
                if par.world > 1:
                    extra["shard"] = par.shard
                loss = objective(partial(forward, net), inputs["x0"], inputs.get("cond"), generator, **extra)
                (scaler.scale(loss / accumulate) if scaler else loss / accumulate).backward()
            total += loss.detach().float() / accumulate
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm) if clip_grad_norm else None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update({n: all_params[n] for n in names})

        # 5. report, preview, save
        loss_value = par.mean(total).item()
        result.losses.append(loss_value)
        result.step = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if log_every and (step + 1) % log_every == 0:
            row = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "time": time.perf_counter() - tic}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            metrics.log(step + 1, **row)
        if preview is not None and preview_every and (step + 1) % preview_every == 0 and par.rank == 0:
            with torch.no_grad():
                preview(model, step + 1)
            model.train()
        last = step + 1 == end
        if output_dir is not None and ((save_every and (step + 1) % save_every == 0) or last):
            result.checkpoint = _save(output_dir, step + 1, parts, {"step": step + 1, "batches": consumed}, par)
    bar.close()
    metrics.close()
    return result


def _resume_path(resume: str | Path | None, output_dir: str | Path | None) -> Path | None:
    if resume is None:
        return None
    if str(resume) in ("latest", "auto"):
        found = latest_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None and str(resume) == "latest":
            raise FileNotFoundError(f"resume='latest': no checkpoint-*.safetensors or checkpoint-*.dcp in {output_dir}")
        return found
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume: {path} does not exist")
    return path


def _save(output_dir: str | Path, step: int, parts: TrainParts, progress: dict[str, int], par: Parallel) -> Path:
    """Sharded folder under FSDP2 (every rank writes), else one file written by rank 0."""
    path = checkpoint_path(output_dir, step)
    if par.mode == "fsdp":
        return save_sharded(path.with_suffix(".dcp"), parts, progress, par)
    if par.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, parts, progress)
    par.barrier()
    return path
