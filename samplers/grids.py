"""Grids uniform in the half log-SNR lambda = log(alpha/sigma), the variable the exponential integrators step in."""

from __future__ import annotations

import math

from .schedules import FlowSchedule, Schedule

# Flow's ends are at lambda = -inf and +inf, so its uniform part needs a range: |lambda| <= 4 (t in [0.018, 0.982]
# unshifted) was the best of +-3 .. +-6 for UniPC-3 on samplers.analytic's Gaussian at 20 steps (bench/samplers.py).
FLOW_LAMBDA_RANGE = 4.0


def logsnr_grid(
    schedule: Schedule, steps: int, lam_min: float | None = None, lam_max: float | None = None
) -> list[float]:
    """steps + 1 decreasing times, uniform in lambda from lam_min to lam_max (DPM-Solver's `logSNR` skip type).

    The grid runs from `schedule.t_max` to `schedule.end_time`. An end at lambda = -inf (flow's t = 1, zero
    terminal SNR) or +inf (flow's t = 0, VP's clean end point) stays a node of its own and the uniform part spans
    the steps between. lam_min defaults to lambda(t_max) where finite, else -4; lam_max to lambda at the last
    noisy time (VP: timestep 0) where finite, else 4; a FlowSchedule's shift s moves these two by -log(s), as it
    moves every time (flow: lambda = log((1 - t) / t); unshifted, t runs from 0.982 to 0.018).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    lam_top, lam_end = schedule.lambda_t(schedule.t_max), schedule.lambda_t(schedule.end_time)
    start_inf, end_inf = math.isinf(lam_top), math.isinf(lam_end)
    offset = -math.log(schedule.effective_shift) if isinstance(schedule, FlowSchedule) else 0.0
    if lam_min is None:
        lam_min = offset - FLOW_LAMBDA_RANGE if start_inf else lam_top
    if lam_max is None:
        last_noisy = schedule.lambda_t(max(schedule.end_time, 0.0))
        lam_max = offset + FLOW_LAMBDA_RANGE if math.isinf(last_noisy) else last_noisy
    if not lam_min < lam_max:
        raise ValueError(f"lam_min must be below lam_max, got {lam_min} and {lam_max}")
    nodes = steps + 1 - start_inf - end_inf  # the uniform part's node count
    if nodes < 2:
        raise ValueError(f"steps={steps} leaves no uniform part between the infinite ends; take steps >= {3 - nodes}")
    lams = [lam_min + (lam_max - lam_min) * j / (nodes - 1) for j in range(nodes)]
    ts = [min(max(schedule.time_from_lambda(lam), schedule.t_min), schedule.t_max) for lam in lams]  # no rounding out
    return [schedule.t_max] * start_inf + ts + [schedule.end_time] * end_inf
