"""The time-conditioned residual block of the LDM/SGM UNet (`openaimodel.ResBlock`), with its official names."""
from __future__ import annotations

from torch import Tensor, nn

from layers.conv import Conv2d
from layers.norms import GroupNorm32
from layers.updown import Downsample, Upsample


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding (added, or FiLM scale/shift), GroupNorm-SiLU-dropout-conv, + skip.

    `up`/`down` resample inside the block (`resblock_updown`); the skip is identity, a 1x1 conv, or a 3x3 conv
    when `use_conv` and the channels change.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(inplace=True), Conv2d(channels, out_channels, 3, padding=1)
        )  # in-place SiLU on the norm's fresh output: one large allocation fewer (they cost page faults on CPU)
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(inplace=True), nn.Dropout(p=dropout),
            Conv2d(out_channels, out_channels, 3, padding=1),  # zero-initialised in the official code
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # x (B, C, H, W), emb (B, E) -> (B, C', H', W')
        if self.updown:
            # resample between the norm-activation and the conv, on both paths
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C' or 2C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h.add_(emb_out))  # h is the conv's fresh output (its backward does not need it)
        return h.add_(self.skip_connection(x))
