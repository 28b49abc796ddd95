"""`Conv2d`: `nn.Conv2d` (same parameters and state dict) that runs weight-dominated convolutions as one GEMM.

At the deep levels of a UNet a 3x3 conv has far more weights than input positions (1280x1280x9 weights for 8x8
positions at SD 1.5's 32x32 latent). PyTorch's CPU kernels then spend their time re-laying-out the weights on every
call; an explicit im2col (`F.unfold`) and one matmul on the weights as stored measured about 2x faster there.
Elsewhere (and on other devices) the stock kernel is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GEMM_RATIO = 8  # use the GEMM path when out_channels >= GEMM_RATIO * output positions


class Conv2d(nn.Conv2d):
    """A drop-in `nn.Conv2d`; on CPU, when out_channels >= 8 x output positions, computed as im2col + matmul."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._use_gemm(x):
            return super().forward(x)
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C*kh*kw, Ho*Wo)
        weight = self.weight.flatten(1)  # (O, C*kh*kw): the stored layout, no reorder
        if b == 1 and self.bias is not None:
            out = torch.addmm(self.bias[:, None], weight, cols[0])[None]  # (1, O, Ho*Wo)
        else:
            out = torch.matmul(weight, cols)  # (B, O, Ho*Wo)
            if self.bias is not None:
                out = out + self.bias[:, None]
        return out.view(b, -1, ho, wo)

    def _use_gemm(self, x: Tensor) -> bool:
        if x.device.type != "cpu" or x.ndim != 4 or self.groups != 1 or self.padding_mode != "zeros":
            return False
        if isinstance(self.padding, str):
            return False
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return self.out_channels >= GEMM_RATIO * ho * wo
