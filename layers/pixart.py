"""Pieces Sana shares with PixArt-style DiTs (NVlabs Sana `diffusion/model/nets/sana_blocks.py`, `sana.py`).

adaLN-single: one `t_block` turns the timestep embedding into 6 modulation chunks for every block, and each
block adds its own learned `scale_shift_table`; captions are projected once and attended to in every block.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from layers.attention import attention, key_padding_mask
from layers.embeddings import timestep_embedding
from layers.modulation import modulate
from layers.norms import RMSNorm


def scale_shift_chunks(table: Tensor, t: Tensor, name: str = "scale_shift_table") -> tuple[Tensor, ...]:
    """(n, C) learned table + conditioning -> n chunks of (B, 1, C).

    The conditioning is (B, n*C) (a block's share of `t_block`) or (B, C), added to every chunk (final layer).
    """
    if table.ndim != 2 or t.ndim != 2 or t.shape[1] not in (table.numel(), table.shape[-1]):
        raise ValueError(
            f"{name} has shape {tuple(table.shape)} but the timestep conditioning is {tuple(t.shape)}; "
            f"expected (n, C) with the conditioning (B, n*C) or (B, C)"
        )
    n, c = table.shape
    t = t.reshape(t.shape[0], n, c) if t.shape[1] == n * c else t[:, None]
    return (table[None] + t).chunk(n, dim=1)


def t_block(hidden_size: int, chunks: int = 6) -> nn.Sequential:
    """SiLU -> Linear to `chunks` modulation vectors, shared by all blocks (keys `t_block.1.*`)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size, bias=True))


class TimestepEmbedder(nn.Module):
    """256-channel sinusoidal embedding of t (not rescaled; float32) -> Linear -> SiLU -> Linear (keys `mlp.0/2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, D)
        t_freq = timestep_embedding(t, self.frequency_embedding_size, time_factor=1.0, keep_dtype=False)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """timm's `Mlp` as the caption projection uses it: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features (B, L, C_cap) -> (B, L, D); `y_embedding` is the learned null caption for CFG dropout."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        # a persistent buffer in the official checkpoints; used only to drop captions while training
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)

    def forward(self, caption: Tensor) -> Tensor:
        return self.y_proj(caption)


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padded caption tokens are masked out (`q_linear`, `kv_linear`, `proj`)."""

    def __init__(self, d_model: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"cross-attention width {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)
        # official `cross_norm`: RMSNorm across all heads, eps 1e-6
        self.q_norm = RMSNorm(d_model, eps=1e-6, param_name="weight") if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d_model, eps=1e-6, param_name="weight") if qk_norm else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, D), cond (B, L, D), mask (B, L) bool keep-mask or None -> (B, N, D)."""
        k, v = self.kv_linear(cond).chunk(2, dim=-1)  # each (B, L, D): kv_linear rows are [k | v]
        q, k = self.q_norm(self.q_linear(x)), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D/H)
        return self.proj(attention(q, k, v, mask=None if mask is None else key_padding_mask(mask)))


class T2IFinalLayer(nn.Module):
    """LayerNorm, modulation by (`scale_shift_table` + t), linear to the patch's channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # (B, N, D), (B, D) -> (B, N, p*p*C_out)
        shift, scale = scale_shift_chunks(self.scale_shift_table, t, "final_layer.scale_shift_table")
        return self.linear(modulate(self.norm_final(x), shift, scale))  # PixArt's t2i_modulate


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int, pe_interpolation: float = 1.0,
                        device=None) -> Tensor:
    """PixArt's `get_2d_sincos_pos_embed` for an h x w grid -> (h*w, dim) float32, tokens row-major.

    Grid coordinates are rescaled to `base_size` (so every resolution spans the same range); the first half of
    the channels encodes the column, the second the row, each as [sin | cos] (the official channel order).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / pe_interpolation
    cols = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / pe_interpolation
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))

    def embed(pos: Tensor) -> Tensor:  # (M,) -> (M, dim/2)
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    col_emb = embed(cols)[None, :, :].expand(h, w, dim // 2)  # (h, w, dim/2)
    row_emb = embed(rows)[:, None, :].expand(h, w, dim // 2)
    return torch.cat([col_emb, row_emb], dim=-1).reshape(h * w, dim).float()


__all__ = [
    "scale_shift_chunks", "t_block", "TimestepEmbedder", "Mlp", "CaptionEmbedder",
    "MultiHeadCrossAttention", "T2IFinalLayer", "sincos_pos_embed_2d",
]
