"""train: objectives on the samplers' schedules, timestep samplers, and `fit`, the training loop (exact resume,
mixed precision, EMA, LoRA or partial-name trainable sets, DDP/FSDP2 under torchrun)."""

from __future__ import annotations

from . import memory, objectives, timesteps
from .checkpoint import ResumeError, latest_checkpoint
from .ema import EMA
from .forwards import flux_forward
from .loop import FitResult, fit
from .metrics import read_metrics
from .objectives import Objective, bridge_matching, drop_cond, flow_matching, noise_prediction
from .timesteps import Discrete, LogitNormal, Shifted, Uniform
from .trainable import select_trainable

__all__ = [
    "EMA",
    "FitResult",
    "ResumeError",
    "fit",
    "flux_forward",
    "latest_checkpoint",
    "read_metrics",
    "select_trainable",
    "Discrete",
    "LogitNormal",
    "Objective",
    "Shifted",
    "Uniform",
    "bridge_matching",
    "drop_cond",
    "flow_matching",
    "noise_prediction",
    "memory",
    "objectives",
    "timesteps",
]
