"""Scale-out with torch's own engines: DDP, or FSDP2 (`fully_shard` per block) with `torch.distributed.checkpoint`.

`fit` runs unchanged under `torchrun --nproc_per_node N`: every process takes its slice of each global batch and
of the objective's random draws, gradients are averaged by DDP or reduce-scattered by FSDP2, so the update
equals one process on the global batch. FSDP2 checkpoints are sharded folders (`checkpoint-NNNNNNN.dcp/`, written
by every rank, with `train.json` beside the shards) that resume under any world size, one process included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import FORMAT, ResumeError, TrainParts, check_matches, fingerprint, rng_state, set_rng_state

MODES = ("auto", "none", "ddp", "fsdp")


@dataclass
class Parallel:
    """How this process takes part: `none` (one process), `ddp` or `fsdp`, its rank and the world size."""

    mode: str = "none"
    rank: int = 0
    world: int = 1

    @classmethod
    def setup(cls, mode: str, device: torch.device) -> Parallel:
        """`auto` is DDP under torchrun (WORLD_SIZE > 1), else one process; joins the process group if needed."""
        if mode not in MODES:
            raise ValueError(f"parallel must be one of {MODES}, got {mode!r}")
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())
        if mode == "none" or (mode == "auto" and not launched):
            return cls()
        if not launched:
            raise ValueError(f"parallel={mode!r} needs several processes: launch with torchrun --nproc_per_node N")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls("ddp" if mode == "auto" else mode, dist.get_rank(), dist.get_world_size())

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def wrap(self, model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
        """The module to call in the forward: DDP around `model`, or `model` itself sharded in place by FSDP2."""
        if self.mode == "ddp":
            return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            for block in blocks(model):
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        return model

    def sync_context(self, module: nn.Module, sync: bool):
        """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
        if self.mode == "ddp" and not sync:
            return module.no_sync()
        if self.mode == "fsdp":
            module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def mean(self, x: Tensor) -> Tensor:
        """The mean of `x` over processes (for logging the global loss)."""
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The items of the outermost `ModuleList`s (Flux's double/single blocks, the UNet's input/output blocks, ...):
    the units FSDP2 gathers one at a time."""
    out, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, nn.ModuleList):
            out.extend(b for b in m if any(True for _ in b.parameters()))
            inside.append(name + ".")
    return out


def _dcp_state(parts: TrainParts) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(parts.model, parts.optimizer,
                                        options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_sd, "optim": optim_sd}
    if parts.ema is not None:
        state["ema"] = parts.ema.shadow
    return state


def save_sharded(path: str | Path, parts: TrainParts, progress: dict[str, int], par: Parallel) -> Path:
    """Every rank writes its shards to a temporary folder; rank 0 adds `train.json` and renames it into place."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if par.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    par.barrier()
    dcp.save(_dcp_state(parts), checkpoint_id=str(tmp))
    if par.rank == 0:
        rng_tensors, rng_json = rng_state()
        signature = parts.signature()
        info = {
            "format": FORMAT, "model": type(parts.model).__name__, "fingerprint": fingerprint(signature),
            "trained": signature, "progress": progress, "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "ema_decay": parts.ema.decay if parts.ema is not None else None, "world_size": par.world,
            "rng": {**rng_json, **{k: v.tolist() for k, v in rng_tensors.items()},
                    "generator": parts.generator.get_state().tolist()},
        }
        (tmp / "train.json").write_text(json.dumps(info))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    par.barrier()
    return path


def load_sharded(path: str | Path, parts: TrainParts) -> dict[str, int]:
    """Restore a sharded checkpoint into this run, whatever its world size (one process, no FSDP, included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    meta = path / "train.json"
    if not meta.is_file():
        raise ResumeError(f"cannot resume from {path}: no train.json (an incomplete or foreign sharded checkpoint)")
    info = json.loads(meta.read_text())
    if info.get("format") != FORMAT:
        raise ResumeError(f"cannot resume from {path}: format {info.get('format')!r}, this version reads {FORMAT!r}")
    check_matches(path, info, parts)
    if (info["ema_decay"] is None) != (parts.ema is None) or (info["scaler"] is None) != (parts.scaler is None):
        raise ResumeError(f"cannot resume from {path}: EMA or fp16 scaler settings differ from this run")
    state = _dcp_state(parts)
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=single)
    set_state_dict(parts.model, parts.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True))
    parts.scheduler.load_state_dict(info["scheduler"])
    if parts.scaler is not None:
        parts.scaler.load_state_dict(info["scaler"])
    rng = info["rng"]
    parts.generator.set_state(torch.tensor(rng["generator"], dtype=torch.uint8))
    tensors = {k: torch.tensor(rng[k], dtype=torch.uint8) for k in ("rng.torch", "rng.cuda") if k in rng}
    tensors["rng.numpy"] = torch.tensor(rng["rng.numpy"], dtype=torch.int64)
    set_rng_state(tensors, rng)
    return dict(info["progress"])
