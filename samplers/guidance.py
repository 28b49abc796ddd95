"""Classifier-free guidance around any `model_fn(x, t)`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Guidance:
    """Classifier-free guidance out = u + scale (c - u) (Ho & Salimans 2022), optionally rescaled.

    `uncond_fn` is the model with its unconditional inputs (empty prompt, null class); if None, the wrapped
    `model_fn` is called once on the batch doubled as [x, x] and must return [uncond, cond] stacked on dim 0.
    `rescale` (phi in Lin et al. 2023, eq. 15-16) pulls the guided output's per-sample std back toward the
    conditional one, which counters over-exposure at high scales with zero-terminal-SNR models.
    """

    scale: float
    uncond_fn: ModelFn | None = None
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {self.rescale}")

    def wrap(self, model_fn: ModelFn) -> ModelFn:
        """A model function returning the guided output in place of the conditional one."""

        def guided(x: Tensor, t: Tensor) -> Tensor:
            if self.uncond_fn is None:
                uncond, cond = model_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
            else:
                uncond, cond = self.uncond_fn(x, t), model_fn(x, t)
            out = uncond + self.scale * (cond - uncond)
            if self.rescale > 0:
                dims = list(range(1, out.ndim))
                rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
                out = self.rescale * rescaled + (1 - self.rescale) * out
            return out

        return guided
