"""One-step ODE/SDE solvers over a grid of (t, alpha, sigma) nodes; each is one loop, k-diffusion style.

Every solver has the signature `solver(denoise, x, grid, *, callback=None, **options) -> x` and sees the model only
through `denoise(x, t, alpha, sigma) -> (x0, eps)`, so one implementation serves every schedule and prediction type.
Scalars are Python floats (float64); tensors stay in the caller's dtype. Multistep solvers are in `multistep.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, float, float, float], tuple[Tensor, Tensor]]
Callback = Callable[[int, int, Tensor], Tensor | None] | None


def after_step(callback: Callback, step: int, total: int, x: Tensor) -> Tensor:
    """Run `callback(step, total, x)` after a step; a tensor it returns replaces x as the state the next step starts
    from (as diffusers' callback_on_step_end may return new latents); anything else leaves x as it is."""
    if callback is None:
        return x
    out = callback(step, total, x)
    if not isinstance(out, Tensor):
        return x
    if out.shape != x.shape:
        raise ValueError(f"the callback after step {step} returned a tensor of shape {tuple(out.shape)}; the state "
                         f"it replaces has shape {tuple(x.shape)}")
    return out.to(x.dtype)


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

    def node(self, i: int) -> tuple[float, float, float]:
        """(t, alpha, sigma) of node i: what the denoiser is called with."""
        return self.t[i], self.alpha[i], self.sigma[i]


def flow_coords(alpha: float, sigma: float) -> tuple[float, float]:
    """(n, s) with n = alpha + sigma, s = sigma / n: x / n = (1 - s) x0 + s eps is a straight rectified-flow path."""
    n = alpha + sigma
    return n, sigma / n


def euler_step(x: Tensor, x0: Tensor, eps: Tensor, g: Grid, i: int) -> Tensor:
    """One Euler step from node i to i + 1 of dz/ds = eps - x0 in flow coordinates: x' = (n'/n) x + n' (s' - s) v."""
    (n, s), (n_next, s_next) = flow_coords(g.alpha[i], g.sigma[i]), flow_coords(g.alpha[i + 1], g.sigma[i + 1])
    scale, step = n_next / n, n_next * (s_next - s)
    return torch.add(x if scale == 1 else scale * x, eps - x0, alpha=step)


def euler(denoise: Denoiser, x: Tensor, g: Grid, *, callback: Callback = None) -> Tensor:
    """Euler on the probability-flow ODE dz/ds = eps - x0 in rectified-flow coordinates (z = x/n, s).

    For FlowSchedule this is Flux's `x + (t_next - t) v`; on any schedule it equals DDIM (eta = 0).
    """
    for i in range(g.steps):
        x = euler_step(x, *denoise(x, *g.node(i)), g, i)
        x = after_step(callback, i + 1, g.steps, x)
    return x


def heun(denoise: Denoiser, x: Tensor, g: Grid, *, callback: Callback = None) -> Tensor:
    """Heun's 2nd-order method in the same coordinates as `euler` (EDM Alg. 1); Euler on a step to sigma = 0."""
    for i in range(g.steps):
        x0, eps = denoise(x, *g.node(i))
        (n, s), (n_next, s_next) = flow_coords(g.alpha[i], g.sigma[i]), flow_coords(g.alpha[i + 1], g.sigma[i + 1])
        z, v = x / n, eps - x0  # position and velocity at node i
        x = n_next * (z + (s_next - s) * v)  # the Euler predictor
        if g.sigma[i + 1] > 0:  # the model is never evaluated at the noise-free end
            x0_next, eps_next = denoise(x, *g.node(i + 1))
            v_mean = 0.5 * (v + eps_next - x0_next)  # trapezoidal rule: the mean of both end velocities
            x = n_next * (z + (s_next - s) * v_mean)
        x = after_step(callback, i + 1, g.steps, x)
    return x


def bridge(
    denoise: Denoiser,
    x: Tensor,
    g: Grid,
    *,
    noise_std: list[float],
    generator: torch.Generator | None = None,
    callback: Callback = None,
) -> Tensor:
    """LBM's sampler: an `euler` step of the bridge, then fresh bridge noise noise_std[i+1] z after every step
    but the last (the official `LBMModel.sample`); with noise_std all zero it is `euler`."""
    for i in range(g.steps):
        x = euler_step(x, *denoise(x, *g.node(i)), g, i)
        if i < g.steps - 1 and noise_std[i + 1] > 0:
            x = x + noise_std[i + 1] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = after_step(callback, i + 1, g.steps, x)
    return x


def ddim(
    denoise: Denoiser,
    x: Tensor,
    g: Grid,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x' = alpha' x0 + sqrt(sigma'^2 - s_up^2) eps + s_up z.

    s_up = eta sigma' sqrt(1 - e^{-2h}) in any (alpha, sigma) parameterisation; eta = 1 is DDPM's ancestral step,
    which is also k-diffusion's `euler_ancestral` and first-order SDE-DPM-Solver++ (they coincide).
    """
    for i in range(g.steps):
        x0, eps = denoise(x, *g.node(i))
        alpha_next, sigma_next = g.alpha[i + 1], g.sigma[i + 1]
        s_up = 0.0
        if eta > 0 and sigma_next > 0:
            e_minus_h = g.alpha[i] * sigma_next / (alpha_next * g.sigma[i])  # e^{-h}, h = lambda' - lambda
            s_up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1.0 - e_minus_h * e_minus_h)))
        x = torch.add(alpha_next * x0, eps, alpha=math.sqrt(sigma_next * sigma_next - s_up * s_up))
        if s_up > 0:
            x = x + s_up * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = after_step(callback, i + 1, g.steps, x)
    return x
