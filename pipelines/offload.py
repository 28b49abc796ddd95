"""`offload=True`: each component sits on the CPU and visits the compute device only while it runs."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def on_device(parts, *names: str) -> Iterator[None]:
    """Move the named components of `parts` to `parts.device` for the block, and back to the CPU after it
    (a no-op unless `parts.offload`)."""
    if not getattr(parts, "offload", False):
        yield
        return
    device = torch.device(parts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules = [m for m in (getattr(parts, n) for n in names) if isinstance(m, torch.nn.Module)]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


def compute_device(parts, model: torch.nn.Module) -> torch.device:
    """Where the denoising runs: `parts.device`, else (offloading) CUDA when present, else the model's device."""
    if parts.device is not None:
        return torch.device(parts.device)
    if getattr(parts, "offload", False):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return next(model.parameters()).device
