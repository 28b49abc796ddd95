"""Complete, atomic training checkpoints: one safetensors file per save (`checkpoints_convert.save_file`: temp file
+ rename, so a crash never leaves a half-written checkpoint).

Tensors: the trained weights (`model.<name>`; only the LoRA adapters when those are what trains), the EMA
(`ema.<name>`), the optimizer state (`optim.<name>.<key>`) and the RNG states (`rng.*`). The header metadata
`zoo.train` holds the rest as JSON: step, data position, LR schedule, grad scaler, optimizer hyper-parameters,
Python/NumPy RNG scalars and the fingerprint of the trained parameters (names, shapes, dtypes), which a resume
checks before touching anything.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from checkpoints_convert import CheckpointError, load_file, save_file

from .ema import EMA

FORMAT = "zoo.train/1"
NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")


class ResumeError(ValueError):
    """A checkpoint that cannot resume this run (another model, another trainable set, not a training checkpoint)."""


@dataclass
class TrainParts:
    """What a checkpoint captures besides the step counters."""

    model: nn.Module
    names: list[str]  # the trained parameters, in optimizer order
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the objective's draws (times, noise, condition dropout)
    scaler: torch.amp.GradScaler | None = None
    ema: EMA | None = None

    def params(self) -> dict[str, Tensor]:
        all_params = dict(self.model.named_parameters())
        return {n: all_params[n] for n in self.names}

    def signature(self) -> list[list]:
        """(name, shape, dtype) of every trained parameter: what a checkpoint must match to resume."""
        return [[n, list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in self.params().items()]


def fingerprint(signature: list[list]) -> str:
    return hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:16]


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:07d}.safetensors"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in `output_dir` (a file, or a sharded `.dcp` folder), or None."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = NAME.match(p.name) or re.match(r"^checkpoint-(\d+)\.dcp$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and JSON of the global RNGs of torch (CPU and CUDA), NumPy and Python."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, state, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, pos, has_gauss, cached], "python": [version, list(state), gauss_next]}


def set_rng_state(tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"].clone())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"].clone())
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss_next = info["python"]
    random.setstate((version, tuple(state), gauss_next))


def optimizer_state(parts: TrainParts) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's state keyed by parameter name (tensors) and its param groups (JSON)."""
    sd = parts.optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        name = parts.names[idx]
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{key}"] = value
            else:
                scalars[f"{name}.{key}"] = value
    groups = [{**g, "params": [parts.names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def save_checkpoint(path: str | Path, parts: TrainParts, progress: dict[str, int]) -> Path:
    """Write everything needed to continue bit-exactly; `progress` = {"step": ..., "batches": ...}."""
    params = parts.params()
    tensors = {f"model.{n}": p.detach() for n, p in params.items()}
    if parts.ema is not None:
        tensors.update({f"ema.{n}": s for n, s in parts.ema.state_dict().items()})
    optim_tensors, optim_json = optimizer_state(parts)
    rng_tensors, rng_json = rng_state()
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    tensors["rng.generator"] = parts.generator.get_state()
    signature = parts.signature()
    info = {
        "format": FORMAT,
        "model": type(parts.model).__name__,
        "fingerprint": fingerprint(signature),
        "trained": signature,
        "progress": progress,
        "optimizer": optim_json,
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "ema_decay": parts.ema.decay if parts.ema is not None else None,
        "rng": rng_json,
    }
    return save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"zoo.train": json.dumps(info)})


def read_info(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and JSON of a training checkpoint; `ResumeError` when it is not one."""
    try:
        sd = load_file(path)
    except CheckpointError as e:
        raise ResumeError(f"cannot resume from {path}: {e}") from None
    raw = sd.metadata.get("zoo.train")
    if raw is None:
        raise ResumeError(f"cannot resume from {path}: it is not a train.fit checkpoint (no 'zoo.train' metadata; "
                          "to start from model weights, load them into the model before fit)")
    info = json.loads(raw)
    if info.get("format") != FORMAT:
        raise ResumeError(f"cannot resume from {path}: format {info.get('format')!r}, this version reads {FORMAT!r}")
    return {k: v.clone() for k, v in sd.items()}, info


def check_matches(path: str | Path, info: dict[str, Any], parts: TrainParts) -> None:
    """Refuse a checkpoint of another model or another trainable set, naming the first differences."""
    mine = parts.signature()
    if info["fingerprint"] == fingerprint(mine):
        return
    theirs = {n: (s, d) for n, s, d in info["trained"]}
    ours = {n: (s, d) for n, s, d in mine}
    missing = [n for n in ours if n not in theirs]
    unexpected = [n for n in theirs if n not in ours]
    differ = [f"{n}: checkpoint {theirs[n]} vs model {ours[n]}" for n in ours if n in theirs and ours[n] != theirs[n]]
    raise ResumeError(
        f"cannot resume from {path}: it was written for a {info['model']} with {len(theirs)} trained tensors, this "
        f"run trains a {type(parts.model).__name__} with {len(ours)}. Not in the checkpoint: {missing[:4]}; "
        f"not in this run: {unexpected[:4]}; shape/dtype differs: {differ[:4]}"
    )


def load_checkpoint(path: str | Path, parts: TrainParts) -> dict[str, int]:
    """Restore weights, optimizer, LR schedule, scaler, EMA and RNGs from `path`; returns its progress."""
    tensors, info = read_info(path)
    check_matches(path, info, parts)
    if (info["ema_decay"] is None) != (parts.ema is None):
        raise ResumeError(f"cannot resume from {path}: EMA {'on' if info['ema_decay'] else 'off'} in the checkpoint, "
                          f"{'on' if parts.ema else 'off'} in this run")
    if (info["scaler"] is None) != (parts.scaler is None):
        raise ResumeError(f"cannot resume from {path}: the fp16 grad scaler is {'in' if info['scaler'] else 'not in'} "
                          "the checkpoint but this run's precision disagrees")
    with torch.no_grad():
        for n, p in parts.params().items():
            p.copy_(tensors[f"model.{n}"])
    index = {n: i for i, n in enumerate(parts.names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, field = key[len("optim."):].rsplit(".", 1)
            state.setdefault(index[name], {})[field] = value
    for key, value in info["optimizer"]["scalars"].items():
        name, field = key.rsplit(".", 1)
        state.setdefault(index[name], {})[field] = value
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in info["optimizer"]["param_groups"]]
    parts.optimizer.load_state_dict({"state": state, "param_groups": groups})
    parts.scheduler.load_state_dict(info["scheduler"])
    if parts.scaler is not None:
        parts.scaler.load_state_dict(info["scaler"])
    if parts.ema is not None:
        parts.ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    parts.generator.set_state(tensors["rng.generator"])
    set_rng_state(tensors, info["rng"])
    return dict(info["progress"])
