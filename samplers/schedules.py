"""Noise schedules: the path x_t = alpha_t x0 + sigma_t eps in each family's own time, and its default grids.

Time conventions (what `model_fn(x, t)` receives):
- `FlowSchedule`: the flow time t in [0, 1], 1 = pure noise (Flux/SD3/Sana; Flux multiplies by 1000 inside).
- `VPSchedule`: the training timestep in [0, num_train_timesteps - 1] that SD UNets embed, possibly fractional
  (Karras grids); t = -1 names the noise-free end point (alpha = 1), where the model is never called.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .betas import BETA_SCHEDULES, DEFAULT_BETA_RANGE, karras_sigmas, make_betas, rescale_zero_terminal_snr


class Schedule:
    """A path x_t = alpha_t x0 + sigma_t eps over the schedule's time t, and the model's prediction type."""

    predictions: tuple[str, ...] = ()
    prediction: str
    t_min: float  # smallest valid time: the noise-free end
    t_max: float  # largest valid time: the noisiest
    end_time: float  # where a grid ends unless it says otherwise

    def _check_prediction(self) -> None:
        if self.prediction not in self.predictions:
            raise ValueError(
                f"{type(self).__name__} does not support prediction={self.prediction!r}; "
                f"supported: {', '.join(self.predictions)}"
            )

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t) at time t, in float64."""
        raise NotImplementedError

    def alpha_t(self, t: float) -> float:
        """Signal scale alpha_t."""
        return self.alpha_sigma(t)[0]

    def sigma_t(self, t: float) -> float:
        """Noise scale sigma_t."""
        return self.alpha_sigma(t)[1]

    def lambda_t(self, t: float) -> float:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t); -inf at pure noise, +inf at clean data."""
        return log_snr(*self.alpha_sigma(t))

    def grid(self, steps: int) -> list[float]:
        """The default decreasing grid of steps + 1 times, ending at `end_time`."""
        raise NotImplementedError

    def time_from_lambda(self, lam: float) -> float:
        """The time whose half log-SNR is `lam`: the inverse of `lambda_t`."""
        raise NotImplementedError

    def to_x0_eps(self, out: Tensor, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """Turn a model output at (alpha, sigma) into the predicted clean data x0 and noise eps."""
        # torch.add(a, b, alpha=c) = a + c b in one pass: these run on full latents at every step.
        p = self.prediction
        if p == "eps":
            return torch.add(x, out, alpha=-sigma).div_(alpha), out
        if p == "x0":
            return out, torch.add(x, out, alpha=-alpha).div_(sigma)
        if p == "v":  # v = alpha eps - sigma x0 (Salimans & Ho 2022), with alpha^2 + sigma^2 = 1
            return torch.add(alpha * x, out, alpha=-sigma), torch.add(sigma * x, out, alpha=alpha)
        # flow: out = eps - x0 with alpha + sigma = 1
        return torch.add(x, out, alpha=-sigma), torch.add(x, out, alpha=alpha)


def log_snr(alpha: float, sigma: float) -> float:
    """log(alpha / sigma), with the infinite ends spelled out instead of raising."""
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def shift_time(t: float, shift: float) -> float:
    """Static time shift t' = s t / (1 + (s - 1) t) of SD3 and Sana; s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's mu: the line through (256, base_shift) and (4096, max_shift) at the image token count."""
    m = (max_shift - base_shift) / (4096 - 256)
    return m * image_seq_len + (base_shift - m * 256)


def flux_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """Flux's `get_schedule`: num_steps + 1 times from 1 to 0, exp-shifted by mu; float32 like the original."""
    ts = torch.linspace(1, 0, num_steps + 1)
    if shift:
        e_mu = math.exp(flux_mu(image_seq_len, base_shift, max_shift))
        ts = e_mu / (e_mu + (1 / ts - 1))  # time_shift(mu, sigma=1, t): 1/0 = inf gives exactly 0 at t = 0
    return ts.tolist()


@dataclass
class FlowSchedule(Schedule):
    """Rectified flow x_t = (1 - t) x0 + t eps; the model predicts the velocity eps - x0 (`flow`).

    `shift` is the static shift of SD3/Sana; `mu` is Flux's resolution-dependent shift, and since
    e^mu / (e^mu + 1/t - 1) = s t / (1 + (s - 1) t) with s = e^mu, it is the same map with shift = exp(mu).
    `spacing`: `uniform` (linspace 1 -> 0, then shifted) or Sana's `time_uniform_flow` (starts at the shifted
    1 - 1/num_train_timesteps).
    """

    shift: float = 1.0
    mu: float | None = None
    spacing: str = "uniform"
    prediction: str = "flow"
    num_train_timesteps: int = 1000

    predictions = ("flow", "x0", "eps")
    t_min, t_max, end_time = 0.0, 1.0, 0.0

    def __post_init__(self) -> None:
        self._check_prediction()
        if self.spacing not in ("uniform", "time_uniform_flow"):
            raise ValueError(f"unknown spacing {self.spacing!r}; expected 'uniform' or 'time_uniform_flow'")
        if not self.effective_shift > 0:
            raise ValueError(f"shift must be positive, got {self.effective_shift}")

    @property
    def effective_shift(self) -> float:
        """The static shift s that this schedule applies (exp(mu) when mu is given)."""
        return math.exp(self.mu) if self.mu is not None else self.shift

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        return 1.0 - t, t

    def time_from_lambda(self, lam: float) -> float:
        return 1.0 / (1.0 + math.exp(min(lam, 700.0)))  # lambda = log((1 - t) / t)

    def grid(self, steps: int) -> list[float]:
        top = 1.0 if self.spacing == "uniform" else 1.0 - 1.0 / self.num_train_timesteps
        return [shift_time(top * (steps - i) / steps, self.effective_shift) for i in range(steps + 1)]


@dataclass
class BridgeSchedule(FlowSchedule):
    """Latent bridge matching (LBM, Chadebec et al. 2025): x_t = (1 - t) x_target + t x_source + b_t eps.

    The flow path with the source latent in place of the noise (so alpha, sigma, grid and the `flow` prediction
    x_source - x_target are FlowSchedule's), plus the Brownian-bridge noise b_t = sigma_b sqrt(t (1 - t)) that
    vanishes at both ends. Training draws x_t with `bridge_std`; the `bridge` sampler re-injects it between steps.
    """

    sigma_b: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sigma_b >= 0:
            raise ValueError(f"sigma_b must be >= 0, got {self.sigma_b}")

    def bridge_std(self, t: float) -> float:
        """The bridge noise's standard deviation b_t = sigma_b sqrt(t (1 - t)) at time t."""
        return self.sigma_b * math.sqrt(max(0.0, t * (1.0 - t)))


@dataclass
class VPSchedule(Schedule):
    """Discrete variance-preserving schedule of DDPM/LDM: alpha_t^2 = prod(1 - beta), sigma_t^2 = 1 - alpha_t^2.

    Between integer timesteps log(sigma/alpha) is interpolated linearly (as diffusers' `_sigma_to_t` inverts it).
    `timestep_spacing` follows diffusers' DDIM: `leading` (multiples of T // steps, plus `steps_offset`),
    `trailing` (from T - 1 down, Lin et al. 2023) or `linspace` (0 .. T - 1 rounded); `karras=True` instead
    spaces sigma/alpha as EDM does (rho = 7) over the training range, at fractional timesteps.
    Sampling ends noise-free (t = -1) unless `set_alpha_to_one=False`, which stops at timestep 0 like SD's DDIM.
    """

    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    prediction: str = "eps"
    beta_start: float | None = None
    beta_end: float | None = None
    rescale_zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    karras: bool = False
    set_alpha_to_one: bool = True
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)

    predictions = ("eps", "v", "x0")
    t_min = -1.0

    def __post_init__(self) -> None:
        self._check_prediction()
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected leading|trailing|linspace")
        lo, hi = DEFAULT_BETA_RANGE.get(self.beta_schedule, (0.0, 0.0))
        betas = make_betas(
            self.beta_schedule,
            self.num_train_timesteps,
            lo if self.beta_start is None else self.beta_start,
            hi if self.beta_end is None else self.beta_end,
        )
        if self.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self._ab = self.alphas_cumprod.tolist()
        # log(sigma/alpha) per timestep, increasing in t; +inf where alpha_bar = 0 (zero terminal SNR).
        self._log_ve = [0.5 * (math.log1p(-a) - math.log(a)) if a > 0 else math.inf for a in self._ab]
        self.t_max = float(self.num_train_timesteps - 1)
        self.end_time = -1.0 if self.set_alpha_to_one else 0.0

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        if t < 0:  # between the clean point (t = -1, alpha_bar = 1) and timestep 0, linear in alpha_bar
            ab = 1.0 + (t + 1.0) * (self._ab[0] - 1.0)
            return math.sqrt(ab), math.sqrt(1.0 - ab)
        i = int(t)
        if i == t:
            return math.sqrt(self._ab[i]), math.sqrt(1.0 - self._ab[i])
        w = t - i
        lv = (1 - w) * self._log_ve[i] + w * self._log_ve[i + 1]
        # alpha = 1 / sqrt(1 + e^{2 lv}), sigma = 1 / sqrt(1 + e^{-2 lv}): finite even when lv = inf.
        return 1.0 / math.sqrt(1.0 + math.exp(min(2 * lv, 700.0))), 1.0 / math.sqrt(1.0 + math.exp(-2 * lv))

    def time_from_lambda(self, lam: float) -> float:
        return self.time_from_ve_sigma(math.exp(-lam))

    def time_from_ve_sigma(self, ve_sigma: float) -> float:
        """The (fractional) timestep whose sigma/alpha is `ve_sigma`: the inverse of the interpolation above."""
        lv = math.log(ve_sigma)
        i = min(max(bisect.bisect_right(self._log_ve, lv) - 1, 0), self.num_train_timesteps - 2)
        lo, hi = self._log_ve[i], self._log_ve[i + 1]
        return i + min(max((lv - lo) / (hi - lo), 0.0), 1.0)

    def grid(self, steps: int) -> list[float]:
        T, n = self.num_train_timesteps, steps
        if n > T:
            raise ValueError(f"steps={n} exceeds num_train_timesteps={T}")
        if self.karras:
            ve_max, ve_min = math.exp(self._log_ve[-1]), math.exp(self._log_ve[0])
            if math.isinf(ve_max):
                raise ValueError("karras=True needs a finite sigma_max; it cannot be used with zero terminal SNR")
            ts = [self.time_from_ve_sigma(s) for s in karras_sigmas(ve_min, ve_max, n)]
        elif self.timestep_spacing == "leading":
            ts = [float(i * (T // n) + self.steps_offset) for i in reversed(range(n))]
        elif self.timestep_spacing == "trailing":
            ts = [float(round(T - i * (T / n)) - 1) for i in range(n)]
        else:
            ts = [float(round(i * ((T - 1) / (n - 1)))) if n > 1 else 0.0 for i in reversed(range(n))]
        return ts + [self.end_time] if ts[-1] > self.end_time else ts
