"""`sample()`: validate the request, lay out the grid, wrap the model as a denoiser, run the named solver."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from .guidance import Guidance, ModelFn
from .multistep import dpm_multistep
from .schedules import BridgeSchedule, Schedule, log_snr
from .solvers import Callback, Denoiser, Grid, bridge, ddim, euler, heun
from .unipc import unipc

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "ddim": ddim,
    "euler_a": ddim,  # DDIM with eta = 1 is exactly the ancestral Euler step (see solvers.ddim)
    "dpm++1s": partial(dpm_multistep, order=1),
    "dpm++2m": partial(dpm_multistep, order=2),
    "dpm++3m": partial(dpm_multistep, order=3),
    "dpm-solver-2m": partial(dpm_multistep, order=2, data=False),
    "dpm-solver-3m": partial(dpm_multistep, order=3, data=False),
    "unipc": partial(unipc, order=2, variant="bh1"),
    "unipc-bh2": partial(unipc, order=2, variant="bh2"),
    "unipc-3": partial(unipc, order=3, variant="bh1"),
    "unipc-bh2-3": partial(unipc, order=3, variant="bh2"),
    "unipc-3f": partial(unipc, order=3, variant="bh2", final_order=3),  # ours: + a 3rd-order step to sigma = 0
    "bridge": bridge,
}
DEFAULT_ETA = {"ddim": 0.0, "euler_a": 1.0}  # the samplers that take `eta`
MULTISTEP = tuple(name for name in SAMPLERS if name.startswith(("dpm", "unipc")))  # take `lower_order_final`


def sample(
    model_fn: ModelFn,
    noise: Tensor,
    *,
    sampler: str,
    steps: int | None = None,
    schedule: Schedule,
    timesteps: Sequence[float] | Tensor | None = None,
    guidance: Guidance | None = None,
    callback: Callback = None,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    lower_order_final: float | None = None,
) -> Tensor:
    """Integrate from `noise` at the first grid time to the last and return the sample.

    `model_fn(x, t)` gets x in noise's shape and dtype and t as a (B,) tensor in the schedule's time (FlowSchedule:
    flow time in [0, 1]; VPSchedule: training timestep in [0, T), as SD UNets take it) and returns what
    `schedule.prediction` names. The grid is `schedule.grid(steps)` or `timesteps` (strictly decreasing, schedule
    time); a grid that stops above `schedule.end_time` gets a final step there appended. `noise` is taken as the
    state at the first time (pure noise for the default grids; the source latent for `bridge`, which needs a
    BridgeSchedule and re-injects its bridge noise between steps, drawn from `generator`). `eta` sets the
    stochasticity of `ddim` (default 0) and `euler_a` (default 1); `generator` draws that noise.
    `lower_order_final` (multistep samplers): on grids of fewer steps than this, the last steps drop to orders 1
    and 2 (default 15 for `dpm*` as diffusers, always for `unipc*`; the official DPM-Solver uses 10, 0 never lowers).
    `callback(step, total, x)` runs after every step; a tensor it returns replaces x (the state the next step
    starts from: a seam blend, an inpainting mask, clean condition latents written back).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid names: {', '.join(SAMPLERS)}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a samplers.Schedule (FlowSchedule, VPSchedule), got {type(schedule)}")
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {getattr(noise, 'dtype', type(noise))}")
    if not torch.isfinite(noise).all():
        raise ValueError(f"noise contains NaN or inf ({(~torch.isfinite(noise)).sum().item()} of {noise.numel()})")
    if eta is not None and sampler not in DEFAULT_ETA:
        raise ValueError(f"eta applies only to {', '.join(DEFAULT_ETA)}, not to {sampler!r}")
    if lower_order_final is not None and sampler not in MULTISTEP:
        raise ValueError(f"lower_order_final applies only to the multistep samplers {', '.join(MULTISTEP)}")
    grid = _make_grid(schedule, steps, timesteps)
    if guidance is not None:
        model_fn = guidance.wrap(model_fn)
    options: dict = {"callback": callback}
    if sampler == "bridge":
        if not isinstance(schedule, BridgeSchedule):
            raise ValueError(f"sampler 'bridge' needs a samplers.BridgeSchedule, got {type(schedule).__name__}")
        options.update(noise_std=[schedule.bridge_std(t) for t in grid.t], generator=generator)
    if sampler in DEFAULT_ETA:
        options.update(eta=DEFAULT_ETA[sampler] if eta is None else float(eta), generator=generator)
    if lower_order_final is not None:
        options.update(lower_order_final=lower_order_final)
    return SAMPLERS[sampler](_denoiser(model_fn, noise, schedule), noise, grid, **options)


def _make_grid(schedule: Schedule, steps: int | None, timesteps: Sequence[float] | Tensor | None) -> Grid:
    """Grid nodes from the schedule's default spacing or an explicit decreasing sequence."""
    if timesteps is None:
        if steps is None or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        ts = schedule.grid(int(steps))
    else:
        ts = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
        if not ts:
            raise ValueError("timesteps is empty")
        bad = next((i for i in range(1, len(ts)) if not ts[i] < ts[i - 1]), None)
        if bad is not None:
            raise ValueError(
                f"timesteps must be strictly decreasing; timesteps[{bad - 1}]={ts[bad - 1]} "
                f"is followed by timesteps[{bad}]={ts[bad]}"
            )
        if not (schedule.t_min <= ts[-1] and ts[0] <= schedule.t_max) or any(math.isnan(t) for t in ts):
            raise ValueError(
                f"timesteps must lie in [{schedule.t_min}, {schedule.t_max}] for "
                f"{type(schedule).__name__}, got {ts[0]} .. {ts[-1]}"
            )
        if ts[-1] > schedule.end_time:
            ts.append(schedule.end_time)
        if steps is not None and steps != len(ts) - 1:
            raise ValueError(f"steps={steps} disagrees with the {len(ts) - 1} steps of the given timesteps")
    if len(ts) < 2:
        raise ValueError(f"the grid {ts} has no step to take")
    alpha, sigma = zip(*(schedule.alpha_sigma(t) for t in ts))
    if any(s == 0 for s in sigma[:-1]):
        raise ValueError("only the last grid time may be noise-free (sigma = 0): the model is never called there")
    if schedule.prediction == "eps" and any(a == 0 for a in alpha[:-1]):
        raise ValueError(
            "an eps-prediction model cannot be sampled from alpha = 0 (zero terminal SNR): x0 is "
            "undefined there; use prediction='v' or start the grid below the last timestep"
        )
    return Grid(ts, list(alpha), list(sigma), [log_snr(a, s) for a, s in zip(alpha, sigma)])


def _denoiser(model_fn: ModelFn, x: Tensor, schedule: Schedule) -> Denoiser:
    """denoise(x, t, alpha, sigma) -> (x0, eps): the model at time t, its output turned into both predictions."""

    def denoise(x_t: Tensor, t: float, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        out = model_fn(x_t, torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device))
        if out.shape != x_t.shape:
            raise ValueError(f"model_fn returned shape {tuple(out.shape)} for input shape {tuple(x_t.shape)}")
        return schedule.to_x0_eps(out.to(x_t.dtype), x_t, alpha, sigma)

    return denoise
