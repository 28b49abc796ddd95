"""Linear layers whose weight stays GGUF-quantised (ggml blocks, as the quantised Flux/SD files ComfyUI users run
are shipped) and is dequantised for each matmul, like fp8 storage in `layers.cast`: a Q4_K Flux keeps ~4.5 bits a
weight in memory instead of 32.

The block formats (llama.cpp's ggml-quants: fp16 scales little-endian, 4/5/6/8-bit codes) are decoded here in
torch, on whatever device the blocks live; other GGML types fall back to the `gguf` package's numpy decoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QK_K = 256
# GGML type -> (values per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def _f16(b: Tensor) -> Tensor:
    """(N, 2) uint8 little-endian halves -> (N, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(N, ..., n) bytes -> (N, ..., 2n) 4-bit codes: the low nibbles first, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: Tensor, n: int) -> Tensor:
    """(N, 4) bytes read as one little-endian 32-bit word -> its first `n` bits, (N, n) in {0, 1}."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :n]  # byte j holds bits 8j .. 8j+7


def _k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, (N, 8) each."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    low = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scale.float(), low.float()


def _q8_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, low = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()  # 4 runs of 32 bytes -> 8 sub-blocks
    d = (_f16(b[:, :2]) * scale).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * low).unsqueeze(-1)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, low = _k_scales(b[:, 4:16])
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 8, 1)
    qh = (b[:, 16:48].unsqueeze(1) >> shifts) & 1  # bit i of the 32 high bytes belongs to sub-block i
    q = (ql | (qh << 4)).float()
    d = (_f16(b[:, :2]) * scale).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * low).unsqueeze(-1)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = torch.cat([b[:, :128].reshape(n, 2, 64) & 0x0F, b[:, :128].reshape(n, 2, 64) >> 4], dim=-1)  # (n, 2, 128)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 2, 128)
    q = (ql | (qh << 4)).to(torch.int16) - 32  # 6-bit codes centred on 0
    scales = b[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16): one per 16 values
    d = (_f16(b[:, 208:210]) * scales).unsqueeze(-1)
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
            "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: Tensor, qtype: str, shape: tuple[int, ...]) -> Tensor:
    """GGML blocks (uint8, the rows of a `shape` tensor) -> float32 `shape`, on `raw`'s device."""
    blocks = raw.reshape(-1, BLOCKS[qtype][1]) if qtype in BLOCKS else raw
    if qtype in DECODERS:
        return DECODERS[qtype](blocks).reshape(shape)
    try:
        import gguf
        from gguf.quants import dequantize as np_dequantize
    except ImportError:
        raise ImportError(f"dequantising GGML type {qtype} needs the `gguf` package: pip install 'zoo[gguf]'") from None
    out = np_dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(out).reshape(shape).to(raw.device)


class GGUFLinear(nn.Module):
    """A Linear whose `weight` is a buffer of GGML blocks (uint8, one row of blocks per output feature), decoded for
    each matmul into the input's dtype (or `compute_dtype` when set); the float weight lives for that matmul only."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = True, device=None):
        super().__init__()
        per_block, nbytes = BLOCKS.get(qtype, (None, None))
        if per_block is not None and in_features % per_block:
            raise ValueError(f"{qtype} packs rows in blocks of {per_block} values; in_features={in_features} is not "
                             "a multiple")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.compute_dtype: torch.dtype | None = None
        row = in_features // per_block * nbytes if per_block else 0
        self.register_buffer("weight", torch.empty(out_features, row, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, qtype: str) -> GGUFLinear:
        """The quantised twin of `linear` (same features and bias; its weight to be assigned)."""
        return cls(linear.in_features, linear.out_features, qtype, linear.bias is not None, device="meta")

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype or x.dtype
        w = dequantize(self.weight, self.qtype, (self.out_features, self.in_features)).to(cd)
        return F.linear(x.to(cd), w, self.bias.to(cd) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"
