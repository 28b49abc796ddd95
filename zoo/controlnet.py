"""ControlNet (Zhang et al. 2023, the official `cldm/cldm.py`): a trainable copy of the UNet encoder fed a hint image.

Keys are the official ones (`input_hint_block`, `zero_convs`, `middle_block_out` plus the encoder copy) minus
`control_model.`; `forward` returns the residuals in the order `UNet(control=...)` consumes them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from zoo.registry import register
from zoo.unet import TimestepEmbedSequential, UNet, UNetEncoder
from zoo.unet_config import UNetConfig

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # the official input_hint_block; stride 2 into widths 32, 96 and 256
ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")


@dataclass
class ControlNetConfig(UNetConfig):
    """cldm `ControlNet` arguments: the UNet's plus `hint_channels` (out_channels is accepted and unused)."""

    hint_channels: int = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.hint_channels < 1:
            raise ValueError(f"ControlNetConfig.hint_channels must be positive, got {self.hint_channels}")


@register("controlnet", ControlNetConfig)
class ControlNet(UNetEncoder):
    """UNet encoder + hint encoder; one zero-initialised 1x1 conv per input block and one after the middle."""

    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        widths = (config.hint_channels, *HINT_WIDTHS)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
        layers.append(nn.Conv2d(HINT_WIDTHS[-1], config.model_channels, 3, padding=1))
        self.input_hint_block = TimestepEmbedSequential(*layers)  # (B, hint, 8H, 8W) -> (B, model_channels, H, W)
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(nn.Conv2d(c, c, 1)) for c in self.skip_channels)
        ch = self.skip_channels[-1]
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))
        # zero-initialised as in the official code, so a fresh ControlNet leaves the UNet's output unchanged
        for conv in [layers[-1], *(z[0] for z in self.zero_convs), self.middle_block_out[0]]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(
        self,
        x: Tensor,  # (B, in_channels, H, W) noisy latents
        hint: Tensor,  # (B, hint_channels, 8H, 8W) control image in pixel space
        timesteps: Tensor,  # (B,) or scalar
        context: Tensor | None = None,  # (B, T, context_dim)
        y: Tensor | None = None,  # (B, adm_in_channels) for SDXL-style ControlNets
    ) -> list[Tensor]:  # one (B, C_i, H/s_i, W/s_i) per input block, then the middle block's
        timesteps = self.check_inputs(x, timesteps, context, y)
        b, _, h, w = x.shape
        want = (b, self.config.hint_channels, 8 * h, 8 * w)
        if hint.ndim != 4 or hint.shape[0] not in (1, b) or tuple(hint.shape[1:]) != want[1:]:
            raise ValueError(f"hint has shape {tuple(hint.shape)}, expected {want} (pixel space, 8x the latent x "
                             f"{tuple(x.shape)})")
        emb = self.embed(timesteps, y)
        guided_hint = self.input_hint_block(hint.to(emb.dtype), emb, context)
        outs, h = [], x.to(emb.dtype)
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self.run(block, h, emb, context)
            if i == 0:
                h = h + guided_hint  # the hint enters once, after the first conv
            outs.append(zero_conv(h, emb, context))
        h = self.run(self.middle_block, h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3) -> ControlNet:
        """A ControlNet whose encoder is a copy of `unet`'s (how training starts); hint block and zero convs fresh."""
        fields = {f.name: getattr(unet.config, f.name) for f in dataclasses.fields(unet.config)}
        ref = next(unet.parameters())
        with torch.device(ref.device):
            net = cls(ControlNetConfig(**fields, hint_channels=hint_channels)).to(ref.dtype)
        encoder = {k: v for k, v in unet.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
        missing, unexpected = net.load_state_dict(encoder, strict=False)
        fresh = ("input_hint_block.", "zero_convs.", "middle_block_out.")
        if unexpected or any(not k.startswith(fresh) for k in missing):
            raise ValueError(f"UNet encoder does not fit the ControlNet: missing {missing}, unexpected {unexpected}")
        return net

    def example_inputs(self, batch: int = 1, height: int | None = None, width: int | None = None, txt_len: int = 77,
                       device=None, dtype=torch.float32) -> tuple[tuple, dict]:
        """x, a pixel-space hint, timesteps and context (and y) for a `height` x `width` image."""
        (x, t), kwargs = UNet.example_inputs(self, batch, height, width, txt_len, device, dtype)
        hint = torch.rand(batch, self.config.hint_channels, 8 * x.shape[2], 8 * x.shape[3], device=device,
                          dtype=dtype)
        return (x, hint, t), kwargs


__all__ = ["ControlNet", "ControlNetConfig"]
