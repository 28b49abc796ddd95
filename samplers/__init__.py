"""samplers: noise schedules, flow-matching Euler/Heun, DPM-Solver(++) and UniPC multistep, DDIM, the LBM bridge
sampler and classifier-free guidance.

A model is any function `model_fn(x, t)`; see `sample` for what t is under each schedule.
"""

from __future__ import annotations

from .grids import logsnr_grid
from .guidance import Guidance
from .sampling import SAMPLERS, sample
from .schedules import BridgeSchedule, FlowSchedule, Schedule, VPSchedule, flux_mu, flux_schedule, shift_time
from .solvers import Callback

__all__ = [
    "SAMPLERS",
    "BridgeSchedule",
    "Callback",
    "FlowSchedule",
    "Guidance",
    "Schedule",
    "VPSchedule",
    "flux_mu",
    "flux_schedule",
    "logsnr_grid",
    "sample",
    "shift_time",
]
