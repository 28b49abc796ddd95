"""Timestep samplers for training: which times t a batch is noised to.

Each sampler's `sample(n, generator, device)` returns a (n,) float32 tensor in a schedule's time: flow time in
[0, 1] (1 = pure noise) for the continuous ones, the integer training timestep 0 .. T - 1 for `Discrete`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from samplers import flux_mu, shift_time


class TimestepSampler:
    """Draws (n,) training times; `discrete` says whether they are VP training timesteps or flow times."""

    discrete: bool = False

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        raise NotImplementedError


@dataclass
class Uniform(TimestepSampler):
    """t ~ U(low, high) in flow time."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"Uniform needs 0 <= low < high <= 1, got low={self.low}, high={self.high}")

    def sample(self, n, generator=None, device="cpu"):
        u = torch.rand(n, generator=generator, device=device)
        return self.low + (self.high - self.low) * u


@dataclass
class LogitNormal(TimestepSampler):
    """t = sigmoid(N(mean, std^2)) (SD3, Esser et al. 2024, sec. 3.1): more weight on the middle times."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"LogitNormal std must be positive, got {self.std}")

    def sample(self, n, generator=None, device="cpu"):
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))


@dataclass
class Shifted(TimestepSampler):
    """Another sampler's times pushed toward noise by the static shift t' = s t / (1 + (s - 1) t) (samplers.shift_time).

    `Shifted.flux(base, image_seq_len)` uses Flux's resolution-dependent shift s = exp(mu(image_seq_len)), the same
    map Flux's sampling grid applies, so training and sampling see one definition of the shift.
    """

    base: TimestepSampler
    shift: float

    def __post_init__(self) -> None:
        if self.base.discrete:
            raise ValueError("Shifted applies to flow-time samplers (Uniform, LogitNormal), not Discrete")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    @classmethod
    def flux(cls, base: TimestepSampler, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15):
        return cls(base, math.exp(flux_mu(image_seq_len, base_shift, max_shift)))

    def sample(self, n, generator=None, device="cpu"):
        return shift_time(self.base.sample(n, generator, device), self.shift)


@dataclass
class Discrete(TimestepSampler):
    """Integer training timesteps t ~ U{0, ..., T - 1} of DDPM/LDM (as float32, the dtype SD UNets embed)."""

    num_train_timesteps: int = 1000
    discrete = True

    def __post_init__(self) -> None:
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise ValueError(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")

    def sample(self, n, generator=None, device="cpu"):
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device).float()
