"""Linear/Conv layers whose weights stay stored in a low-precision dtype (fp8, bf16, fp16) and are upcast to a
`compute_dtype` for each matmul, as the fp8 Flux files people share are run (ComfyUI's "weight dtype").

The swapped layers keep the same parameters under the same names, so `state_dict()` keys do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.conv import Conv2d as GemmConv2d


class CastLinear(nn.Linear):
    """`nn.Linear` computing in `compute_dtype` whatever dtype its weight is stored in.

    `weight_scale` (a non-persistent buffer, so not in `state_dict()`): the true weight is `weight * scale`, as
    in ComfyUI's "scaled fp8" files; applied to the matmul's output, so the fp8 weight is never rescaled.
    """

    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        bias = self.bias.to(cd) if self.bias is not None else None
        scale = self._buffers.get("weight_scale")
        if scale is None:
            return F.linear(x.to(cd), self.weight.to(cd), bias)  # the upcast copy lives for this matmul only
        y = F.linear(x.to(cd), self.weight.to(cd)) * scale.to(cd)
        return y + bias if bias is not None else y


class CastConv1d(nn.Conv1d):
    """`nn.Conv1d` computing in `compute_dtype`."""

    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        return self._conv_forward(x.to(cd), self.weight.to(cd), self.bias.to(cd) if self.bias is not None else None)


class CastConv2d(nn.Conv2d):
    """`nn.Conv2d` computing in `compute_dtype`."""

    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        return self._conv_forward(x.to(cd), self.weight.to(cd), self.bias.to(cd) if self.bias is not None else None)


# exact types only: a subclass may compute something else (a LoRA layer); `layers.conv.Conv2d` computes a plain
# conv (its GEMM path is a CPU speed-up), so its cast twin is the stock conv in the compute dtype
CAST_OF = {nn.Linear: CastLinear, nn.Conv1d: CastConv1d, nn.Conv2d: CastConv2d, GemmConv2d: CastConv2d}
CASTS = tuple(CAST_OF.values())


def cast_layers(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Swap every plain Linear/Conv1d/Conv2d of `model` (in place) for its cast twin; returns their names.

    The twin shares the original's parameters, hooks and submodules (a shallow copy of its state under the
    twin's class), so this works on `meta` models before loading and on loaded ones alike.
    """
    if not compute_dtype.is_floating_point or compute_dtype.itemsize == 1:
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    if type(model) in CAST_OF:
        raise ValueError("cast_layers swaps the layers inside a model; wrap a bare layer in a module first")
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, CASTS):
                child.compute_dtype = compute_dtype
                swapped.append(f"{name}.{child_name}".lstrip("."))
            elif type(child) in CAST_OF:
                twin = CAST_OF[type(child)].__new__(CAST_OF[type(child)])
                twin.__dict__.update(child.__dict__)
                twin.compute_dtype = compute_dtype
                setattr(module, child_name, twin)
                swapped.append(f"{name}.{child_name}".lstrip("."))
    return swapped
