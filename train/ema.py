"""Exponential moving average of the trained weights (fp32 shadow copies)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after every optimizer step, for the trained parameters only."""

    def __init__(self, params: Mapping[str, Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: Mapping[str, Tensor]) -> None:
        for n, s in self.shadow.items():
            s.lerp_(params[n].detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (in each parameter's dtype)."""
        params = dict(model.named_parameters())
        for n, s in self.shadow.items():
            params[n].copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        if set(sd) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(sd)), sorted(set(sd) - set(self.shadow))
            raise ValueError(f"EMA state does not match the trained parameters: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        with torch.no_grad():
            for n, t in sd.items():
                self.shadow[n].copy_(t)
