"""Multistep exponential integrators in lambda = log(alpha/sigma): DPM-Solver(++); UniPC is in `unipc.py`.

Both integrate the probability-flow ODE exactly for a model output that is a polynomial in lambda, built from the
last few predictions. In data form (`data=True`, the "++" solvers) the prediction is x0 and
    x' = (sigma'/sigma) x + sigma' int e^lambda x0(lambda) dlambda,
in noise form it is eps and
    x' = (alpha'/alpha) x - alpha' int e^-lambda eps(lambda) dlambda.
Same signature as the one-step solvers (`solvers.py`): `solver(denoise, x, grid, *, callback=None, **options)`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .solvers import Callback, Denoiser, Grid, after_step


def step_order(i: int, n: int, order: int, lower_order_final: float, final_zero: bool) -> int:
    """Order of step i of n: warm up from order 1, then lower the last steps when n < `lower_order_final`.

    The step order is min(order, i + 1, n - i) on grids of fewer than `lower_order_final` steps (the last step
    first order, the one before at most second; diffusers' DPMSolverMultistep uses 15, the official DPM-Solver 10,
    UniPC always), and min(order, i + 1) otherwise. A step to sigma = 0 (lambda' = inf) is always first order: in
    data form the integral of e^lambda times any non-constant polynomial diverges there.
    """
    k = min(order, i + 1)
    if n < lower_order_final:
        k = min(k, n - i)
    if i == n - 1 and final_zero:
        k = 1
    return k


def dpm_multistep(
    denoise: Denoiser,
    x: Tensor,
    g: Grid,
    *,
    order: int = 2,
    data: bool = True,
    lower_order_final: float = 15,
    callback: Callback = None,
) -> Tensor:
    """Multistep DPM-Solver++ (data form, `data=True`) or DPM-Solver (noise form) of order 1-3.

    Order 2 is the `midpoint` form, order 3 the multistep formula of the DPM-Solver++ paper (Lu et al. 2022b,
    Alg. 2 / diffusers' DPMSolverMultistepScheduler, whose second difference lacks a factor 2: see README).
    """
    n, preds = g.steps, []  # the last model predictions (x0 or eps), newest first
    for i in range(n):
        x0, eps = denoise(x, *g.node(i))
        preds = [x0 if data else eps, *preds[:2]]
        k = step_order(i, n, order, lower_order_final, final_zero=g.sigma[n] == 0)
        sigma, alpha_next, sigma_next = g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        h = g.lam[i + 1] - g.lam[i]
        if data:
            # x' = (sigma'/sigma) x + alpha' phi x0 with phi = 1 - e^{-h}: finite at both infinite ends of lambda.
            phi = -math.expm1(-h)
            x = torch.add((sigma_next / sigma) * x, preds[0], alpha=alpha_next * phi)
            c_mid = 0.5 * alpha_next * phi
            c_d1 = alpha_next * (1 - phi / h)
            c_d2 = -alpha_next * ((h - phi) / h**2 - 0.5)
        else:
            # x' = (alpha'/alpha) x - sigma' (e^h - 1) eps, written as DDIM so a start at alpha = 0 stays finite.
            x = torch.add(alpha_next * x0, eps, alpha=sigma_next)
            em1 = math.expm1(h) if k > 1 else 0.0  # e^h - 1
            c_mid = -0.5 * sigma_next * em1
            c_d1 = -sigma_next * (em1 / h - 1)
            c_d2 = -sigma_next * ((em1 - h) / h**2 - 0.5)
        if k >= 2:
            # Backward differences in lambda, scaled by h: d1_0 ~ h m'(lambda_i), d1_1 ~ h m'(lambda_{i-1}).
            r0 = (g.lam[i] - g.lam[i - 1]) / h
            d1_0 = (preds[0] - preds[1]) * (1 / r0)
            if k == 2:
                x = torch.add(x, d1_0, alpha=c_mid)
            else:
                r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
                d1_1 = (preds[1] - preds[2]) * (1 / r1)
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # h m', second-order accurate
                d2 = (d1_0 - d1_1) * (2 / (r0 + r1))  # h^2 m''; the reference code omits this 2
                x = x + c_d1 * d1 + c_d2 * d2
        x = after_step(callback, i + 1, n, x)
    return x
