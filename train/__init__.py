"""train: objectives on the samplers' schedules, timestep samplers, and `fit`, the training loop (exact resume,
mixed precision, EMA, LoRA or partial-name trainable sets, DDP/FSDP2 under torchrun)."""

from __future__ import annotations

from . import objectives, timesteps
from .objectives import Objective, bridge_matching, drop_cond, flow_matching, noise_prediction
from .timesteps import Discrete, LogitNormal, Shifted, Uniform

__all__ = [
    "Discrete",
    "LogitNormal",
    "Objective",
    "Shifted",
    "Uniform",
    "bridge_matching",
    "drop_cond",
    "flow_matching",
    "noise_prediction",
    "objectives",
    "timesteps",
]
