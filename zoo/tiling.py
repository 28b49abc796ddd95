"""Large images and panoramas for convolutional models: overlapping tiles blended by linear ramps, and a call-time
switch that makes every convolution wrap around the image's width (equirectangular panoramas have no side edges).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextmanager
def circular_width(module: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Inside the block, `module`'s convolutions pad circularly along the width and with zeros along the height.

    Every `nn.Conv2d` with zero padding (p_h, p_w) is switched to padding (p_h, 0) plus a forward pre-hook that
    wraps p_w columns from the opposite edge; submodules that pad by hand (the autoencoder's `Downsample`) expose
    a boolean `circular` attribute, which is set. All of it is undone on exit, even after an exception, so the
    module is only changed for this call (do not run the same module from two threads in different modes).
    """
    if not enabled:
        yield module
        return
    convs: list[tuple[nn.Conv2d, tuple[int, int]]] = []
    flagged: list[nn.Module] = []
    handles = []
    try:
        for m in module.modules():
            if getattr(m, "circular", None) is False:
                m.circular = True
                flagged.append(m)
            elif (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
                  and m.padding[1] > 0):
                convs.append((m, m.padding))
                m.padding = (m.padding[0], 0)
                handles.append(m.register_forward_pre_hook(_wrap_columns(convs[-1][1][1])))
        yield module
    finally:
        for h in handles:
            h.remove()
        for m, padding in convs:
            m.padding = padding
        for m in flagged:
            m.circular = False


def _wrap_columns(pad: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (F.pad(args[0], (pad, pad, 0, 0), mode="circular"), *args[1:])

    return hook


def tile_starts(n: int, tile: int, overlap: int, circular: bool = False) -> list[int]:
    """Start offsets of windows of length `tile` covering [0, n), neighbours sharing at least `overlap`.

    Windows are spread evenly; with `circular` the last one wraps past n to the start. One window [0, n) if
    the axis fits in a tile.
    """
    if n <= tile:
        return [0]
    stride = tile - overlap
    if circular:
        count = math.ceil(n / stride)
        return [round(i * n / count) for i in range(count)]
    count = math.ceil((n - tile) / stride) + 1
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, ramp: int, device) -> Tensor:
    """Blend weights along one axis of a tile: rising linearly over `ramp` samples at both ends, then 1."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    if ramp <= 0:
        return torch.ones_like(i)
    return torch.minimum(torch.minimum(i + 0.5, length - i - 0.5) / ramp, torch.ones_like(i))


def tiled(
    fn: Callable[[Tensor, bool], Tensor],
    x: Tensor,  # (B, C, H * in_unit, W * in_unit)
    tile: int,
    overlap: int,
    in_unit: int = 1,
    out_unit: int = 1,
    circular: bool = False,
) -> Tensor:  # (B, C', H * out_unit, W * out_unit)
    """Apply `fn(window, wrap)` to overlapping tiles of `x` and blend the outputs with linear ramps.

    The tile grid is in units of H x W (latent pixels for the autoencoder): a window of `tile` units is
    `tile * in_unit` input and `tile * out_unit` output samples (decode: in 1, out 8; encode: in 8, out 1).
    `circular`: tiles wrap around the width, and when one tile spans the whole width `fn` is told to `wrap`
    (its convolutions then pad circularly). Peak memory is one tile's activations plus the output.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be >= 1 and overlap in [0, tile); got tile={tile}, overlap={overlap}")
    hn, wn = x.shape[-2] // in_unit, x.shape[-1] // in_unit
    rows = tile_starts(hn, tile, overlap)
    cols = tile_starts(wn, tile, overlap, circular)
    th, tw = min(tile, hn), min(tile, wn)
    wrap_whole = circular and tw == wn  # the whole width in one tile: let the model wrap it
    out = weight = None
    for r in rows:
        for c in cols:
            idx = torch.arange(c * in_unit, (c + tw) * in_unit, device=x.device) % (wn * in_unit)
            window = x[..., r * in_unit : (r + th) * in_unit, :].index_select(-1, idx)
            y = fn(window, wrap_whole)  # (B, C', th * out_unit, tw * out_unit)
            if out is None:
                # the canvas is wider by one tile so wrapped tiles can be written in one piece, then folded back
                out = y.new_zeros(*y.shape[:2], hn * out_unit, (wn + tw) * out_unit, dtype=torch.float32)
                weight = y.new_zeros(hn * out_unit, (wn + tw) * out_unit, dtype=torch.float32)
                ramp = overlap * out_unit
                w = _ramp(th * out_unit, ramp if len(rows) > 1 else 0, y.device)[:, None] * \
                    _ramp(tw * out_unit, ramp if len(cols) > 1 and not wrap_whole else 0, y.device)[None, :]
            rs, cs = slice(r * out_unit, (r + th) * out_unit), slice(c * out_unit, (c + tw) * out_unit)
            out[..., rs, cs] += y.float() * w
            weight[rs, cs] += w
    full = wn * out_unit
    out[..., : out.shape[-1] - full] += out[..., full:]
    weight[:, : weight.shape[-1] - full] += weight[:, full:]
    return (out[..., :full] / weight[:, :full]).to(y.dtype)


__all__ = ["circular_width", "tile_starts", "tiled"]
