"""Convergence order of every solver against exact probability-flow ODE solutions.

Problems (samplers.analytic): Gaussian data N(mu, s^2 I), whose ODE keeps (x - alpha mu) / sqrt(v) fixed with
v = alpha^2 s^2 + sigma^2, and a 1-D two-component Gaussian mixture per coordinate, whose ODE keeps the marginal CDF
fixed. DDIM is not exact on a Gaussian: relative to the exact map, one step scales (x - alpha mu) by
(alpha alpha' s^2 + sigma sigma') / sqrt(v v') < 1 (Cauchy-Schwarz), an O(h^2) local error, so its order shows.

Errors are measured for steps in {5, 10, 20, 40, 80}; slopes are fitted on {20, 40, 80}, because below 15 steps the
multistep solvers switch to diffusers' lower-order final steps (a different scheme). Errors stay above 1e-9, far from
float64 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import samplers
from samplers.analytic import reference_problems

STEPS = (5, 10, 20, 40, 80)
FIT = (20, 40, 80)

GAUSS, MIXTURE, NOISE = reference_problems()

FLOW = samplers.FlowSchedule(shift=3.0)
VP = samplers.VPSchedule("scaled_linear", set_alpha_to_one=False)  # grids end at timestep 0, sigma = 0.03


def vp_lambda_grid(n: int, graded: bool = False) -> list[float]:
    """n steps uniform in lambda from timestep 999 to 0; `graded` first takes an extra O(h^2) step.

    A k-th order multistep method needs start-up values accurate to O(h^k); the first step of any multistep
    solver is DDIM (error O(h^2)), so third order shows only when that first step is O(h^2) long.
    """
    lo, hi = VP.lambda_t(999), VP.lambda_t(0)
    h = (hi - lo) / n
    lams = [lo + h * i for i in range(n + 1)]
    if graded:
        lams.insert(1, lo + h / n)
    return [999.0] + [VP.time_from_ve_sigma(math.exp(-lam)) for lam in lams[1:-1]] + [0.0]


def errors(problem, schedule, grid, sampler: str) -> list[float]:
    """Relative error of the final sample against the exact solution, per step count."""
    out = []
    for n in STEPS:
        ts = grid(n)
        x = samplers.sample(problem.model_fn(schedule), NOISE, sampler=sampler, schedule=schedule, timesteps=ts)
        exact = problem.solve(schedule, NOISE, ts[0], schedule.end_time if ts[-1] > schedule.end_time else ts[-1])
        out.append(((x - exact).norm() / exact.norm()).item())
    return out


def order(errs: list[float]) -> float:
    """Slope of -log(error) against log(steps) on the fitted range."""
    idx = [STEPS.index(n) for n in FIT]
    return -np.polyfit(np.log(FIT), np.log([errs[i] for i in idx]), 1)[0]


CASES = [
    # (problem, schedule, grid, sampler, expected order, tolerance)
    ("gauss", "flow", "default", "euler", 1, 0.15),
    ("gauss", "flow", "default", "ddim", 1, 0.15),
    ("gauss", "flow", "default", "heun", 2, 0.2),
    ("gauss", "vp", "lambda", "euler", 1, 0.15),
    ("gauss", "vp", "lambda", "ddim", 1, 0.15),
    ("gauss", "vp", "lambda", "dpm++1s", 1, 0.15),
    ("gauss", "vp", "lambda", "heun", 2, 0.2),
    ("gauss", "vp", "lambda", "dpm++2m", 2, 0.2),
    ("gauss", "vp", "lambda", "dpm-solver-2m", 2, 0.2),
    ("mixture", "vp", "lambda", "heun", 2, 0.2),
    ("mixture", "vp", "lambda", "dpm++2m", 2, 0.2),
    ("mixture", "vp", "graded", "dpm++3m", 3, 0.35),
    ("mixture", "vp", "graded", "dpm-solver-3m", 3, 0.35),  # 2.64 then 2.85: approaches 3 from below
]


@pytest.mark.parametrize(("problem", "schedule", "grid", "sampler", "expected", "tol"), CASES)
def test_solver_converges_with_its_order(problem, schedule, grid, sampler, expected, tol):
    prob = GAUSS if problem == "gauss" else MIXTURE
    sched = FLOW if schedule == "flow" else VP
    grid_fn = {"default": sched.grid, "lambda": vp_lambda_grid, "graded": lambda n: vp_lambda_grid(n, True)}[grid]
    errs = errors(prob, sched, grid_fn, sampler)
    assert errs[-1] < errs[2] / 2**expected * 1.5, f"{sampler}: errors {errs}"
    assert abs(order(errs) - expected) < tol, f"{sampler}: fitted order {order(errs):.2f}, errors {errs}"


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "dpm++2m", "dpm++3m", "dpm-solver-2m"])
def test_prediction_types_give_the_same_sample_for_the_same_model(sampler):
    # One exact model, expressed as eps, v and x0 (VP) or flow and x0 (flow): the conversions must agree.
    for kind, preds in ((samplers.VPSchedule, ("eps", "v", "x0")), (samplers.FlowSchedule, ("flow", "x0"))):
        outs = [
            samplers.sample(
                GAUSS.model_fn(kind(prediction=p)), NOISE, sampler=sampler, steps=12, schedule=kind(prediction=p)
            )
            for p in preds
        ]
        for p, out in zip(preds[1:], outs[1:]):
            torch.testing.assert_close(out, outs[0], atol=1e-10, rtol=0, msg=f"{kind.__name__} {p} vs {preds[0]}")


def test_exact_solution_reaches_the_data_marginal():
    # Sanity of the references themselves: pushing N(0, 1) through the exact flow gives the data statistics.
    z = torch.randn(50_000, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = GAUSS.solve(FLOW, z, 1.0, 0.0)
    torch.testing.assert_close(x.mean(0), GAUSS.mu, atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((4,), GAUSS.s, dtype=torch.float64), atol=0.05, rtol=0)
    y = MIXTURE.solve(FLOW, z[:4000, 0], 1.0, 0.0)
    phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))
    mass = 0.3 * phi((-0.25 + 1.5) / 0.3) + 0.7 * phi((-0.25 - 1.0) / 0.6)  # P(x0 < -0.25) under the mixture
    assert abs((y < -0.25).double().mean().item() - mass) < 0.025
