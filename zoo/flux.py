"""Flux (Black Forest Labs, `flux/model.py` + `flux/modules/layers.py`): double- and single-stream MMDiT with RoPE.

Parameter names are the official ones, so `flux1-dev.safetensors` loads with `strict=True`.
DiT360 is `zoo.panorama.DiT360`, this model with a panorama wrap around its forward (built for `circular_pad > 0`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from layers import (
    Checkpointed,
    EmbedND,
    MLPEmbedder,
    Modulation,
    QKNorm,
    attention,
    check_axes,
    gelu_mlp,
    modulate,
    timestep_embedding,
)
from zoo.checks import batch_timesteps, positive_ints
from zoo.registry import register


@dataclass
class FluxParams:
    """The official `FluxParams`, plus `circular_pad` (> 0 builds DiT360: token columns wrapped around the forward)."""

    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    out_channels: int | None = None  # None: same as in_channels (as in flux-dev/schnell)
    circular_pad: int = 0

    def __post_init__(self):
        check_params(self)
        if self.out_channels is None:
            self.out_channels = self.in_channels


class SelfAttention(nn.Module):
    """Fused qkv projection, per-head QK RMSNorm and output projection (the attention itself is joint)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> normalised q, k and v, each (B, H, L, D/H)."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined only in one attention over [txt, img]."""

    # the joint attention, q, k, v (B, H, L, D/H) + pe -> (B, L, D); an instance may take another with the same
    # contract for one call (pipelines.perception: OmniX's cross-batch attention), the math here is unchanged
    attend = staticmethod(attention)

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = gelu_mlp(hidden_size, mlp_hidden_dim)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = gelu_mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        txt_qkv = self.txt_attn.heads(modulate(self.txt_norm1(txt), txt_mod1.shift, txt_mod1.scale))
        img_qkv = self.img_attn.heads(modulate(self.img_norm1(img), img_mod1.shift, img_mod1.scale))

        # text tokens first, as the official code orders them (pe is built from [txt_ids, img_ids]); the per-stream
        # q, k, v (and the qkv outputs they view) are dropped as soon as they are joined
        q, k, v = (torch.cat(p, dim=2) for p in zip(txt_qkv, img_qkv))  # each (B, H, L_txt + L_img, D/H)
        del txt_qkv, img_qkv
        attn = self.attend(q, k, v, pe=pe)  # (B, L_txt + L_img, D)
        del q, k, v
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(modulate(self.img_norm2(img), img_mod2.shift, img_mod2.scale))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod2.shift, txt_mod2.scale))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joined sequence: fused input projection `linear1`, output `linear2`."""

    attend = staticmethod(attention)  # as DoubleStreamBlock.attend

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv and mlp_in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # proj and mlp_out
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        d = self.hidden_size
        lin1 = self.linear1(modulate(self.pre_norm(x), mod.shift, mod.scale))  # (B, L, 3 D + mlp_hidden)
        q, k, v = rearrange(lin1[..., : 3 * d], "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        if torch.is_grad_enabled():
            h = torch.cat((self.attend(q, k, v, pe=pe), self.mlp_act(lin1[..., 3 * d :])), dim=2)
        else:
            # Same values, no new buffers: GELU in place, and the attention output written over v once it is
            # consumed, so linear2 reads [attn | mlp] straight out of linear1's output (rows 3 D + mlp_hidden apart).
            h = lin1[..., 2 * d :]  # (B, L, D + mlp_hidden)
            torch.ops.aten.gelu_(h[..., d:], approximate="tanh")
            h[..., :d] = self.attend(q, k, v, pe=pe)
            h = h.flatten(0, 1)  # (B*L, D + mlp_hidden), a view: linear2 as one GEMM, as on the concatenation
        del q, k, v, lin1
        return x + mod.gate * self.linear2(h).view_as(x)


class LastLayer(nn.Module):
    """adaLN (shift, scale) then a linear projection to the patch's channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # each (B, D)
        return self.linear(modulate(self.norm_final(x), shift[:, None, :], scale[:, None, :]))


@register("flux", FluxParams)
class Flux(Checkpointed, nn.Module):
    """Flow-matching transformer on packed 2x2 latent patches; predicts the velocity (noise - data)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.hidden_size // params.num_heads, theta=params.theta,
                                   axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def forward(
        self,
        img: Tensor,  # (B, L_img, in_channels) packed latents
        img_ids: Tensor,  # (B, L_img, 3) or (L_img, 3)
        txt: Tensor,  # (B, L_txt, context_in_dim) T5 features
        txt_ids: Tensor,  # (B, L_txt, 3) or (L_txt, 3)
        timesteps: Tensor,  # (B,) flow time in [0, 1]
        y: Tensor,  # (B, vec_in_dim) pooled CLIP features
        guidance: Tensor | None = None,  # (B,) distilled guidance strength
    ) -> Tensor:  # (B, L_img, out_channels)
        img_ids, txt_ids, timesteps, guidance = check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256, time_factor=1000.0, keep_dtype=True))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256, time_factor=1000.0, keep_dtype=True))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # (B, 1, L, D/2, 2, 2)

        for block in self.double_blocks:
            img, txt = self.run(block, img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            img = self.run(block, img, vec=vec, pe=pe)
        return self.final_layer(img[:, txt.shape[1] :, ...], vec)

    def example_inputs(self, batch: int = 1, height: int = 1024, width: int = 1024, txt_len: int = 512,
                       device=None, dtype=torch.float32) -> tuple[tuple, dict]:
        """Random inputs for an image of `height` x `width` pixels (latent / 8, 2x2 patches) and `txt_len` tokens."""
        if height % 16 or width % 16:
            raise ValueError(f"Flux image sizes must be multiples of 16 pixels, got {height}x{width}")
        lh, lw = height // 8, width // 8
        p = self.params
        img = torch.randn(batch, (lh // 2) * (lw // 2), p.in_channels, device=device, dtype=dtype)
        txt = torch.randn(batch, txt_len, p.context_in_dim, device=device, dtype=dtype)
        y = torch.randn(batch, p.vec_in_dim, device=device, dtype=dtype)
        t = torch.full((batch,), 0.5, device=device, dtype=dtype)
        kwargs = {"guidance": torch.full((batch,), 3.5, device=device, dtype=dtype)} if p.guidance_embed else {}
        ids = img_ids(batch, lh, lw, device=device), txt_ids(batch, txt_len, device=device)
        return (img, ids[0], txt, ids[1], t, y), kwargs


# ---- checks: the config, and the inputs at the model's boundary ----

def check_params(p: FluxParams) -> None:
    """Clear errors for a config that cannot build (named field, expected value)."""
    positive_ints(p, ("in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads"))
    if p.depth < 0 or p.depth_single_blocks < 0 or p.circular_pad < 0:
        raise ValueError("FluxParams.depth, depth_single_blocks and circular_pad must be >= 0")
    if p.hidden_size % p.num_heads:
        raise ValueError(
            f"FluxParams.hidden_size {p.hidden_size} is not divisible by num_heads {p.num_heads}; "
            f"expected a multiple of {p.num_heads}"
        )
    check_axes(p.axes_dim, p.hidden_size // p.num_heads, "FluxParams.hidden_size / num_heads")


def check_inputs(model: Flux, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    """Clear errors for the mistakes that would otherwise surface as a matmul shape error deep inside.

    Returns the ids as (B, L, 3), timesteps as (B,) and guidance as (B,) (or None without a guidance embedding).
    """
    p = model.params
    if img.ndim != 3 or txt.ndim != 3:
        raise ValueError(
            f"img and txt must be (B, L, C) token tensors; got img {tuple(img.shape)}, txt {tuple(txt.shape)} "
            "(pack latents with zoo.flux.pack)"
        )
    b = img.shape[0]
    if img.shape[-1] != p.in_channels:
        raise ValueError(f"img has {img.shape[-1]} channels, this Flux expects in_channels={p.in_channels}")
    if txt.shape[-1] != p.context_in_dim:
        raise ValueError(f"txt has {txt.shape[-1]} features, this Flux expects context_in_dim={p.context_in_dim}")
    if txt.shape[0] != b:
        raise ValueError(f"txt has batch {txt.shape[0]}, img has batch {b}")
    n_axes = len(p.axes_dim)
    ids = []
    for name, t, ids_ in (("img", img, img_ids), ("txt", txt, txt_ids)):
        if ids_.ndim == 2:
            ids_ = ids_[None].expand(b, -1, -1)
        if ids_.ndim != 3 or ids_.shape[0] != b or ids_.shape[1] != t.shape[1] or ids_.shape[2] != n_axes:
            raise ValueError(
                f"{name}_ids has shape {tuple(ids_.shape)}, expected ({b}, {t.shape[1]}, {n_axes}) "
                f"to match {name} {tuple(t.shape)}"
            )
        ids.append(ids_)
    if y.ndim != 2 or y.shape != (b, p.vec_in_dim):
        raise ValueError(f"y has shape {tuple(y.shape)}, expected ({b}, {p.vec_in_dim})")
    timesteps = batch_timesteps(timesteps, b, device=img.device, scalar_dtype=img.dtype)
    if model.guidance_in is not None:
        if guidance is None:
            raise ValueError("this Flux has a guidance embedding (guidance-distilled, e.g. flux-dev): pass guidance=")
        guidance = torch.as_tensor(guidance, device=img.device, dtype=timesteps.dtype).reshape(-1)
        if guidance.shape[0] not in (1, b):
            raise ValueError(f"guidance has shape {tuple(guidance.shape)}, expected ({b},) or a scalar")
        guidance = guidance.expand(b)
    return ids[0], ids[1], timesteps, guidance


# ---- helpers: packing latents into tokens and their position ids ----

def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens of 2x2 patches, channel-major as the official code."""
    if latents.ndim != 4 or latents.shape[-2] % 2 or latents.shape[-1] % 2:
        raise ValueError(f"pack expects (B, C, H, W) latents with even H and W, got {tuple(latents.shape)}")
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H/2 * W/2, C*4) tokens -> (B, C, H, W) latents; `height`, `width` are the latent's (pixels / 8)."""
    if tokens.ndim != 3 or height % 2 or width % 2 or tokens.shape[1] != (height // 2) * (width // 2):
        raise ValueError(
            f"unpack: tokens {tuple(tokens.shape)} do not fit an even latent of {height}x{width} "
            f"({(height // 2) * (width // 2)} tokens)"
        )
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, ph=2, pw=2)


def img_ids(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids (B, h*w, 3) = (0, row, col) of a latent of `height` x `width` (token grid h = height/2)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return rearrange(ids, "h w c -> (h w) c")[None].repeat(batch, 1, 1)


def txt_ids(batch: int, length: int, device=None, dtype=torch.float32) -> Tensor:
    """Text position ids (B, L, 3): all zeros, as the official sampling code."""
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)


__all__ = [
    "FluxParams", "Flux", "DoubleStreamBlock", "SingleStreamBlock", "LastLayer", "SelfAttention",
    "pack", "unpack", "img_ids", "txt_ids",
]
