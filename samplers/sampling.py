"""`sample()`: validate the request, lay out the grid, wrap the model as a denoiser, run the named solver."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from .guidance import Guidance, ModelFn
from .schedules import BridgeSchedule, Schedule, log_snr
from .solvers import Callback, Grid, bridge, ddim, dpm_multistep, euler, heun

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
    "bridge": bridge,
}
DEFAULT_ETA = {"ddim": 0.0, "euler_a": 1.0}  # the samplers that take `eta`


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
) -> Tensor:
    """Integrate from `noise` at the first grid time to the last and return the sample.

    `model_fn(x, t)` gets x in noise's shape and dtype and t as a (B,) tensor in the schedule's time (FlowSchedule:
    flow time in [0, 1]; VPSchedule: training timestep in [0, T), as SD UNets take it) and returns what
    `schedule.prediction` names. The grid is `schedule.grid(steps)` or `timesteps` (strictly decreasing, schedule
    time); a grid that stops above `schedule.end_time` gets a final step there appended. `noise` is taken as the
    state at the first time (pure noise for the default grids; the source latent for `bridge`, which needs a
    BridgeSchedule and re-injects its bridge noise between steps, drawn from `generator`). `eta` sets the
    stochasticity of `ddim` (default 0) and `euler_a` (default 1); `generator` draws that noise.
    `callback(step, total, x)` runs after every step.
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
    grid = _make_grid(schedule, steps, timesteps)
    if guidance is not None:
        model_fn = guidance.wrap(model_fn)
    options = {"callback": callback}
    if sampler == "bridge":
        if not isinstance(schedule, BridgeSchedule):
            raise ValueError(f"sampler 'bridge' needs a samplers.BridgeSchedule, got {type(schedule).__name__}")
        options.update(noise_std=[schedule.bridge_std(t) for t in grid.t], generator=generator)
    if sampler in DEFAULT_ETA:
        options.update(eta=DEFAULT_ETA[sampler] if eta is None else float(eta), generator=generator)
    return SAMPLERS[sampler](_denoiser(model_fn, noise, schedule, grid), noise, grid, **options)


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


def _denoiser(model_fn: ModelFn, x: Tensor, schedule: Schedule, grid: Grid) -> Callable[[Tensor, int], tuple]:
    """denoise(x, i) -> (x0, eps) at grid node i, with t prepared once per node."""
    t_vecs = [torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device) for t in grid.t[:-1]]
    # The heun corrector may call the last node only when it has noise, so it is included then.
    if grid.sigma[-1] > 0:
        t_vecs.append(torch.full((x.shape[0],), grid.t[-1], dtype=x.dtype, device=x.device))

    def denoise(x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        out = model_fn(x, t_vecs[i])
        if out.shape != x.shape:
            raise ValueError(f"model_fn returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}")
        return schedule.to_x0_eps(out.to(x.dtype), x, grid.alpha[i], grid.sigma[i])

    return denoise
