"""Data distributions whose ideal denoiser and probability-flow ODE solution are known in closed form.

Used to measure solver error and order exactly (tests, bench). Under x_t = alpha x0 + sigma eps the marginal of a
Gaussian component N(m, s^2) is N(alpha m, alpha^2 s^2 + sigma^2), and the ideal predictions are posterior means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .guidance import ModelFn
from .schedules import Schedule


def _as_output(schedule: Schedule, x: Tensor, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    """What a perfect model of this schedule returns, given the ideal x0 (eps follows from x)."""
    eps = (x - alpha * x0) / sigma
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "flow": eps - x0}[schedule.prediction]


@dataclass
class Gaussian:
    """Data N(mu, s^2 I): E[x0 | x_t] = mu + alpha s^2 (x - alpha mu) / v with v = alpha^2 s^2 + sigma^2."""

    mu: Tensor  # (D,)
    s: float

    def model_fn(self, schedule: Schedule) -> ModelFn:
        """The exact model for `schedule`'s prediction type."""

        def f(x: Tensor, t: Tensor) -> Tensor:
            alpha, sigma = schedule.alpha_sigma(t[0].item())
            v = alpha**2 * self.s**2 + sigma**2
            x0 = self.mu + (alpha * self.s**2 / v) * (x - alpha * self.mu)
            return _as_output(schedule, x, x0, alpha, sigma)

        return f

    def solve(self, schedule: Schedule, x: Tensor, t0: float, t1: float) -> Tensor:
        """Exact ODE solution: the flow keeps (x - alpha mu) / sqrt(v) constant (it maps the marginals affinely)."""
        (a0, s0), (a1, s1) = schedule.alpha_sigma(t0), schedule.alpha_sigma(t1)
        scale = math.sqrt((a1**2 * self.s**2 + s1**2) / (a0**2 * self.s**2 + s0**2))
        return a1 * self.mu + scale * (x - a0 * self.mu)


@dataclass
class Mixture1D:
    """Every coordinate independently ~ sum_k w_k N(m_k, s_k^2): a non-Gaussian, nonlinear-denoiser problem.

    In 1-D the probability-flow map is monotone and carries marginals, so it keeps the marginal CDF fixed:
    x_t1 = F_t1^{-1}(F_t0(x_t0)), found by bisection to float64 precision.
    """

    w: Tensor  # (K,) weights summing to 1
    m: Tensor  # (K,) means
    s: Tensor  # (K,) standard deviations

    def _marginal(self, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        return alpha * self.m, alpha**2 * self.s**2 + sigma**2  # component means, variances

    def model_fn(self, schedule: Schedule) -> ModelFn:
        """The exact model: responsibilities times per-component posterior means."""

        def f(x: Tensor, t: Tensor) -> Tensor:
            alpha, sigma = schedule.alpha_sigma(t[0].item())
            mean, var = self._marginal(alpha, sigma)
            d = x[..., None] - mean  # (..., K)
            logp = torch.log(self.w) - 0.5 * d**2 / var - 0.5 * torch.log(var)
            resp = (logp - logp.logsumexp(-1, keepdim=True)).exp()  # torch.softmax is ~30x slower on tiny CPU inputs
            x0 = (resp * (self.m + alpha * self.s**2 * d / var)).sum(-1)
            return _as_output(schedule, x, x0, alpha, sigma)

        return f

    def cdf(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Marginal CDF of x_t."""
        mean, var = self._marginal(alpha, sigma)
        return (self.w * 0.5 * torch.erfc((mean - x[..., None]) / torch.sqrt(2 * var))).sum(-1)

    def solve(self, schedule: Schedule, x: Tensor, t0: float, t1: float) -> Tensor:
        """Exact ODE solution from time t0 to t1."""
        u = self.cdf(x, *schedule.alpha_sigma(t0))
        a1, s1 = schedule.alpha_sigma(t1)
        lo, hi = torch.full_like(x, -100.0), torch.full_like(x, 100.0)
        for _ in range(100):  # halves a 200-wide bracket below float64 resolution
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid, a1, s1) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)


def reference_problems() -> tuple[Gaussian, Mixture1D, Tensor]:
    """The fixed problems the order tests and `bench/samplers.py` share: N(mu, 4 I) in 4-D, a 1-D two-Gaussian
    mixture, and (3, 4) float64 noise clamped to +-2.5 (the mixture uses its first column)."""
    gauss = Gaussian(mu=torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), s=2.0)
    mixture = Mixture1D(
        w=torch.tensor([0.3, 0.7], dtype=torch.float64),
        m=torch.tensor([-1.5, 1.0], dtype=torch.float64),
        s=torch.tensor([0.3, 0.6], dtype=torch.float64),
    )
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(-2.5, 2.5)
    return gauss, mixture, noise
