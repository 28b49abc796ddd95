"""LyCORIS adapters that are no B A product: LoHa (Hyeon-Woo et al. 2022, FedPara: a Hadamard product of two
low-rank products) and LoKr (a Kronecker product), as KohakuBlueleaf's LyCORIS and peft's LoHa/LoKr define them.

    LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b)            w1_a, w2_a (out, r); w1_b, w2_b (r, in * kh * kw)
    LoKr: dW = kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 = lokr_w2 or lokr_w2_a @ lokr_w2_b

reshaped to the base weight. Both are scaled by alpha / rank, the rank being that of the low-rank product(s); a
LoKr with no low-rank product (both factors full) has no rank and scale 1, as LyCORIS and ComfyUI apply it.
The tensors keep the file's own names; Tucker cores (hada_t1, lokr_t2) are refused, not half-applied.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER = ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2")
ROLES = LOHA + LOKR + TUCKER


class Lycoris(NamedTuple):
    """One module's LoHa or LoKr: its tensors under their file names, and alpha (None: alpha = rank)."""

    kind: str  # 'loha' or 'lokr'
    tensors: dict[str, Tensor]
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by: LoHa's r; LoKr's decomposed factor's (None when both are full)."""
        t = self.tensors
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        b = t.get("lokr_w2_b", t.get("lokr_w1_b"))  # LyCORIS reads w2's rank when both are decomposed
        return None if b is None else b.shape[0]

    @property
    def alpha_over_rank(self) -> float:
        return 1.0 if self.alpha is None or self.rank is None else self.alpha / self.rank


def lycoris_of(name: str, parts: dict[str, Tensor], alpha: float | None) -> Lycoris:
    """The LoHa/LoKr of one module from its tensors by role; a clear error for what is missing or unsupported."""
    tucker = [r for r in TUCKER if r in parts]
    if tucker:
        raise ValueError(f"LyCORIS {name}: Tucker-decomposed convolutions ({tucker}) are not supported")
    if any(r in parts for r in LOHA):
        missing = [r for r in LOHA if r not in parts]
        if missing:
            raise ValueError(f"LoHa {name}: missing {missing}")
        return Lycoris("loha", {r: parts[r] for r in LOHA}, alpha)
    have = {r: parts[r] for r in LOKR if r in parts}
    for w in ("lokr_w1", "lokr_w2"):
        if w not in have and not (f"{w}_a" in have and f"{w}_b" in have):
            raise ValueError(f"LoKr {name}: needs {w} or both {w}_a and {w}_b; has {sorted(have)}")
    return Lycoris("lokr", have, alpha)


class LycorisDelta(nn.Module):
    """The tensors of one LoHa/LoKr adapter (parameters under the file's names) and the weight delta they make."""

    def __init__(self, kind: str, tensors: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype, device):
        super().__init__()
        self.kind, self.shape = kind, tuple(shape)
        for k, t in tensors.items():
            self.register_parameter(k, nn.Parameter(t.detach().to(device=device, dtype=dtype).clone()))
        self.delta()  # the shapes are checked once, here

    def dtype_of(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _w(self, which: str) -> Tensor:
        full = getattr(self, f"lokr_{which}", None)
        if full is not None:
            return full.float()
        return getattr(self, f"lokr_{which}_a").float().flatten(1) @ getattr(self, f"lokr_{which}_b").float().flatten(1)

    def delta(self) -> Tensor:
        """dW in fp32, shaped like the base weight (without alpha / rank)."""
        if self.kind == "loha":
            f = lambda a, b: getattr(self, a).float().flatten(1) @ getattr(self, b).float().flatten(1)
            d = f("hada_w1_a", "hada_w1_b") * f("hada_w2_a", "hada_w2_b")  # (out, in * kh * kw)
        else:
            w1, w2 = self._w("w1"), self._w("w2")
            if w2.ndim == 4:  # a full conv w2 (b, d, kh, kw): w1's blocks scale whole kernels
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2)  # (a * b, c * d[...])
        try:
            return d.reshape(self.shape)
        except RuntimeError:
            raise ValueError(f"{self.kind} delta of shape {tuple(d.shape)} does not fit the weight {self.shape}") \
                from None
