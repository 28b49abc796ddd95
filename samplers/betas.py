"""Discrete VP noise tables: DDPM/LDM beta schedules, zero-terminal-SNR rescaling, Karras sigmas."""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# (beta_start, beta_end) each schedule is usually trained with: DDPM for linear, LDM/SD for scaled_linear.
DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def make_betas(name: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas of a named schedule in float64; the formulas of DDPM, LDM (`scaled_linear`) and iDDPM (cosine)."""
    n = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if name == "scaled_linear":
        # LDM: linear in sqrt(beta), so alpha_bar decays more gently at the start than DDPM's.
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":
        # iDDPM eq. 17 with s = 0.008; beta capped at 0.999 so the last alpha_bar stays (barely) positive.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {name!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # Keep sqrt(alpha_bar) at t = 0, send it to exactly 0 at t = T - 1, linear in between.
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """n noise levels sigma/alpha from sigma_max down to sigma_min, uniform in sigma^(1/rho) (EDM eq. 5)."""
    if n == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]
