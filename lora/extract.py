"""LoRA extraction: the best rank-r approximation of each weight difference (Eckart-Young, by SVD), as kohya's
`networks/extract_lora_from_models.py` does: B = U_r S_r, A = V_r^T, convs flattened to (out, in * kh * kw)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from checkpoints_convert.keymap import WRAPPER_PREFIXES
from lora.factor import Factor
from lora.files import write

_WRAPPERS = WRAPPER_PREFIXES[:2]  # LDM's `model.diffusion_model.`, ComfyUI's `diffusion_model.`


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, ...]
    rank: int
    rel_err: float  # ||dW - B A||_F / ||dW||_F
    norm: float  # ||dW||_F


@dataclass
class ExtractReport:
    """Per module and overall reconstruction errors, and what was skipped (unchanged or not a linear/conv)."""

    modules: list[ModuleReport] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def rel_err(self) -> float:
        """Over all modules: sqrt(sum ||dW - B A||^2) / sqrt(sum ||dW||^2)."""
        den = sum(m.norm**2 for m in self.modules)
        return math.sqrt(sum((m.rel_err * m.norm) ** 2 for m in self.modules) / den) if den else 0.0

    def __str__(self) -> str:
        rows = [f"{'module':<56} {'shape':<22} {'rank':>5} {'rel err':>9}"]
        rows += [f"{m.name:<56} {str(m.shape):<22} {m.rank:>5} {m.rel_err:>9.2e}" for m in self.modules]
        worst = max(self.modules, key=lambda m: m.rel_err, default=None)
        rows.append(f"{len(self.modules)} module(s) extracted, {len(self.unchanged)} unchanged; overall relative "
                    f"error {self.rel_err:.3e}" + (f", worst {worst.name} {worst.rel_err:.3e}" if worst else ""))
        return "\n".join(rows)


def low_rank(delta: Tensor, rank: int, *, method: str = "svd", niter: int = 4, oversample: int = 8,
             clamp_quantile: float | None = None) -> tuple[Tensor, Tensor]:
    """(out, in) matrix -> up (out, r), down (r, in) with up @ down the best rank-r approximation."""
    r = min(rank, *delta.shape)
    if method == "randomized" and r + oversample < min(delta.shape):
        u, s, v = torch.svd_lowrank(delta, q=r + oversample, niter=niter)  # Halko et al. 2011
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    elif method in ("svd", "randomized"):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        raise ValueError(f"method must be 'svd' or 'randomized', got {method!r}")
    up, down = u * s, vh
    if clamp_quantile is not None:  # kohya's outlier clamp, on the magnitudes of both factors together
        if not 0 < clamp_quantile <= 1:
            raise ValueError(f"clamp_quantile must be in (0, 1], got {clamp_quantile}")
        flat = torch.cat([up.flatten(), down.flatten()]).abs()
        hi = flat.kthvalue(max(1, math.ceil(clamp_quantile * flat.numel()))).values
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up, down


def _prefix(sd) -> str:
    """The wrapper prefix of a full checkpoint's diffusion model (LDM's `model.diffusion_model.`), or ''."""
    return next((p for p in _WRAPPERS if any(k.startswith(p) for k in sd)), "")


def extract(base_sd, tuned_sd, *, rank: int | None = 32, conv_rank: int | None = None,
            clamp_quantile: float | None = None, min_diff: float = 1e-6, method: str = "svd",
            device: str | torch.device | None = None, dtype: torch.dtype | None = None, format: str = "ours",
            progress: Callable[[int, int, str], None] | None = None) -> tuple[dict[str, Tensor], ExtractReport]:
    """LoRA of `tuned_sd - base_sd`: linears (and 1x1 convs) at `rank`, k x k convs at `conv_rank` (default `rank`;
    None = full rank); modules whose max |dW| <= `min_diff` are skipped. Returns (LoRA state dict, report).

    The state dicts may be lazy mappings (each tensor is read once); factors are stored in `dtype` (default: the
    base's floating dtype, fp32 for fp8) and the errors are those of the fp32 factors.
    """
    for name, r in (("rank", rank), ("conv_rank", conv_rank)):
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
            raise ValueError(f"{name} must be a positive integer or None (full rank), got {r!r}")
    pb, pt = _prefix(base_sd), _prefix(tuned_sd)
    keys = [k for k in base_sd if k.startswith(pb) and k.endswith(".weight") and ".lora_" not in k  # not adapters'
            and pt + k[len(pb):] in tuned_sd]
    if not keys:
        raise ValueError("base and tuned state dicts share no .weight key")
    factors, report = {}, ExtractReport()
    for i, k in enumerate(keys):
        name = k[len(pb): -len(".weight")]
        if progress:
            progress(i, len(keys), name)
        w0, w1 = base_sd[k], tuned_sd[pt + k[len(pb):]]
        if w0.ndim not in (2, 4):  # norms, biases, embeddings of other ranks: not LoRA targets
            continue
        if w1.shape != w0.shape:
            raise ValueError(f"{k}: base has shape {tuple(w0.shape)}, tuned {tuple(w1.shape)}")
        delta = w1.to(device=device, dtype=torch.float32) - w0.to(device=device, dtype=torch.float32)
        for sd, w in ((base_sd, w0), (tuned_sd, w1)):
            if hasattr(sd, "release"):  # a memory-mapped checkpoint: drop the file pages just read
                sd.release(w)
        if delta.abs().max() <= min_diff:
            report.unchanged.append(name)
            continue
        is_conv = delta.ndim == 4 and delta.shape[2:] != (1, 1)
        r = (conv_rank if conv_rank is not None else rank) if is_conv else rank
        mat = delta.flatten(1)  # (out, in * kh * kw)
        up, down = low_rank(mat, r or min(mat.shape), method=method, clamp_quantile=clamp_quantile)
        norm = mat.norm().item()
        report.modules.append(ModuleReport(name, tuple(delta.shape), down.shape[0],
                                           (mat - up @ down).norm().item() / norm, norm))
        if delta.ndim == 4:
            up, down = up[:, :, None, None], down.reshape(-1, *delta.shape[1:])
        out = dtype or (w0.dtype if w0.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                        else torch.float32)
        factors[name] = Factor(down.to("cpu", out).contiguous(), up.to("cpu", out).contiguous(), None)
    if progress:
        progress(len(keys), len(keys), "")
    if not factors:
        warnings.warn(f"the LoRA is empty: base and tuned differ by at most min_diff={min_diff:g} in every one of "
                      f"{len(report.unchanged)} linear/conv weight(s) (are they the same checkpoint?)", stacklevel=2)
    return write(factors, format)[0], report
