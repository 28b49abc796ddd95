"""Shared fixtures: tiny models with random non-zero weights, and the full-size key manifests in tests/manifests/."""
from __future__ import annotations

import json
from pathlib import Path

import torch

MANIFESTS = Path(__file__).resolve().parent / "manifests"  # copies of shared/manifests: a fresh clone has them


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter and buffer with random non-zero values (zero-initialised layers hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.randn(t.shape, generator=g) * std + std / 4)
    return module


def manifest(name: str) -> dict[str, tuple[list[int], str]]:
    """A full-size official key manifest: key -> (shape, dtype)."""
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} is missing (tests/manifests/ ships with the repo)")
    return {k: (list(v[0]), v[1]) for k, v in json.loads(path.read_text()).items()}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output's scale (max |b|)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
