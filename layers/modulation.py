"""adaLN modulation: a conditioning vector -> shift/scale/gate chunks (DiT's adaLN-Zero, Flux's `Modulation`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, D)
    scale: Tensor
    gate: Tensor


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift, the adaLN affine."""
    return (1 + scale) * x + shift


class Modulation(nn.Module):
    """SiLU(vec) -> Linear -> 3 (single) or 6 (double) chunks of width `dim`."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, D)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None
