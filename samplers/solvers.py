"""ODE/SDE solvers over a grid of (t, alpha, sigma) nodes; each is one loop, k-diffusion style.

A solver sees the model only through `denoise(x, i) -> (x0, eps)` at grid node i, so one implementation serves
every schedule and prediction type. Scalars are Python floats (float64); tensors stay in the caller's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, int], tuple[Tensor, Tensor]]
Callback = Callable[[int, int, Tensor], None] | None


@dataclass
class Grid:
    """Sampling nodes t_0 > ... > t_N with alpha, sigma and lambda = log(alpha/sigma); the model runs at t_0..t_N-1."""

    t: list[float]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]

    @property
    def steps(self) -> int:
        return len(self.t) - 1


def _flow_coords(g: Grid, i: int) -> tuple[float, float]:
    """(n, s) with n = alpha + sigma, s = sigma / n: x / n = (1 - s) x0 + s eps is a straight rectified-flow path."""
    n = g.alpha[i] + g.sigma[i]
    return n, g.sigma[i] / n


def _euler_step(x: Tensor, x0: Tensor, eps: Tensor, g: Grid, i: int) -> Tensor:
    """One Euler step from node i to i + 1 of dz/ds = eps - x0 (z = x/n, s); see `euler`."""
    (n0, s0), (n1, s1) = _flow_coords(g, i), _flow_coords(g, i + 1)
    return torch.add(x if n1 == n0 else (n1 / n0) * x, eps - x0, alpha=n1 * (s1 - s0))


def euler(denoise: Denoiser, x: Tensor, g: Grid, callback: Callback = None) -> Tensor:
    """Euler on the probability-flow ODE dz/ds = eps - x0 in rectified-flow coordinates (z = x/n, s).

    For FlowSchedule this is Flux's `x + (t_next - t) v`; on any schedule it equals DDIM (eta = 0).
    """
    for i in range(g.steps):
        x = _euler_step(x, *denoise(x, i), g, i)
        if callback is not None:
            callback(i + 1, g.steps, x)
    return x


def heun(denoise: Denoiser, x: Tensor, g: Grid, callback: Callback = None) -> Tensor:
    """Heun's 2nd-order method in the same coordinates as `euler` (EDM Alg. 1); Euler on a step to sigma = 0."""
    for i in range(g.steps):
        x0, eps = denoise(x, i)
        (n0, s0), (n1, s1) = _flow_coords(g, i), _flow_coords(g, i + 1)
        z, d = x / n0, eps - x0
        x = n1 * (z + (s1 - s0) * d)
        if g.sigma[i + 1] > 0:  # the model is never evaluated at the noise-free end
            x0_next, eps_next = denoise(x, i + 1)
            x = n1 * (z + (0.5 * (s1 - s0)) * (d + eps_next - x0_next))
        if callback is not None:
            callback(i + 1, g.steps, x)
    return x


def bridge(
    denoise: Denoiser,
    x: Tensor,
    g: Grid,
    noise_std: list[float],
    generator: torch.Generator | None = None,
    callback: Callback = None,
) -> Tensor:
    """LBM's sampler: an `euler` step of the bridge, then fresh bridge noise noise_std[i+1] z after every step
    but the last (the official `LBMModel.sample`); with noise_std all zero it is `euler`."""
    for i in range(g.steps):
        x = _euler_step(x, *denoise(x, i), g, i)
        if i < g.steps - 1 and noise_std[i + 1] > 0:
            x = x + noise_std[i + 1] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i + 1, g.steps, x)
    return x


def ddim(
    denoise: Denoiser,
    x: Tensor,
    g: Grid,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x' = alpha' x0 + sqrt(sigma'^2 - s_up^2) eps + s_up z.

    s_up = eta sigma' sqrt(1 - e^{-2h}) in any (alpha, sigma) parameterisation; eta = 1 is DDPM's ancestral step,
    which is also k-diffusion's `euler_ancestral` and first-order SDE-DPM-Solver++ (they coincide).
    """
    for i in range(g.steps):
        x0, eps = denoise(x, i)
        a1, s1 = g.alpha[i + 1], g.sigma[i + 1]
        s_up = 0.0
        if eta > 0 and s1 > 0:
            e_mh = g.alpha[i] * s1 / (a1 * g.sigma[i])  # e^{-h}, h = lambda' - lambda
            s_up = min(s1, eta * s1 * math.sqrt(max(0.0, 1.0 - e_mh * e_mh)))
        x = torch.add(a1 * x0, eps, alpha=math.sqrt(s1 * s1 - s_up * s_up))
        if s_up > 0:
            x = x + s_up * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i + 1, g.steps, x)
    return x


def _step_order(i: int, n: int, order: int, final_zero: bool) -> int:
    """Order of multistep step i of n, as diffusers' DPMSolverMultistep: warm up, then lower order at the end.

    The step to sigma = 0 is always first order (lambda' = inf); with fewer than 15 steps the last two drop to
    1 and 2 (`lower_order_final`), which stabilises few-step sampling.
    """
    k = min(order, i + 1)
    if i == n - 1 and (final_zero or n < 15):
        return 1
    if i == n - 2 and n < 15:
        return min(k, 2)
    return k


def dpm_multistep(
    denoise: Denoiser, x: Tensor, g: Grid, order: int = 2, data: bool = True, callback: Callback = None
) -> Tensor:
    """Multistep DPM-Solver++ (data prediction, `data=True`) or DPM-Solver (noise prediction) of order 1-3.

    Exponential integrators in lambda (Lu et al. 2022a/b); order 2 is the `midpoint` form, order 3 the
    multistep formula of the DPM-Solver++ paper, exactly as diffusers' DPMSolverMultistepScheduler.
    """
    n, hist = g.steps, []  # hist: the last model predictions (x0 or eps), newest first
    for i in range(n):
        x0, eps = denoise(x, i)
        hist = [x0 if data else eps, *hist[:2]]
        k = _step_order(i, n, order, g.sigma[n] == 0)
        s0, a1, s1 = g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        h = g.lam[i + 1] - g.lam[i]
        if data:
            # DPM-Solver++(1): x' = (s1/s0) x + a1 (1 - e^{-h}) x0, finite at both infinite ends of lambda.
            phi = -math.expm1(-h)
            x = torch.add((s1 / s0) * x, hist[0], alpha=a1 * phi)
            mid, b1, b2 = 0.5 * a1 * phi, a1 * (1 - phi / h), -a1 * ((h - phi) / h**2 - 0.5)
        else:
            # DPM-Solver(1) = (a1/a0) x - s1 (e^h - 1) eps, written as DDIM so a start at alpha = 0 stays finite.
            x = torch.add(a1 * x0, eps, alpha=s1)
            em1 = math.expm1(h) if k > 1 else 0.0
            mid, b1, b2 = -0.5 * s1 * em1, -s1 * (em1 / h - 1), -s1 * ((em1 - h) / h**2 - 0.5)
        if k >= 2:
            r0 = (g.lam[i] - g.lam[i - 1]) / h
            d1_0 = (hist[0] - hist[1]) * (1 / r0)
            if k == 2:
                x = torch.add(x, d1_0, alpha=mid)
            else:
                r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
                d1_1 = (hist[1] - hist[2]) * (1 / r1)
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) * (2 / (r0 + r1))  # h^2 x0''; the reference code omits this 2
                x = x + b1 * d1 + b2 * d2
        if callback is not None:
            callback(i + 1, n, x)
    return x
