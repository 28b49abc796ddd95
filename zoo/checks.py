"""Config and input checks the families share, run once at the API boundary (never per layer)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def positive_ints(config: object, names: Iterable[str]) -> None:
    """Each named config field must be an integer >= 1; the error names the config class and the field."""
    for name in names:
        value = getattr(config, name)
        if int(value) < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def batch_timesteps(
    timesteps: Tensor | float,
    batch: int,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    scalar_dtype: torch.dtype | None = None,
    name: str = "timesteps",
) -> Tensor:
    """A scalar or (B,) timestep -> a (B,) tensor on `device`; cast to `dtype` if given (a scalar to `scalar_dtype`)."""
    t = torch.as_tensor(timesteps, device=device)
    if dtype is not None:
        t = t.to(dtype)
    if t.ndim == 0:
        t = (t if scalar_dtype is None else t.to(scalar_dtype)).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({batch},) or a scalar")
    return t


__all__ = ["positive_ints", "batch_timesteps"]
