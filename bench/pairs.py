"""Ours and diffusers' model on the same weights and inputs, for the benchmarks that compare them.

Each builder returns a `Pair`: both models (eval mode, on `device` in `dtype`), and one call per side that takes
the model to run (so a `torch.compile`d or checkpointed copy runs the same inputs). The peer is built first with
random weights; ours gets them through the checkpoint converters, sharing the peer's tensors unless `share=False`
(training steps need separate parameters).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import zoo
from checkpoints_convert import autoencoder_to_diffusers, flux_from_diffusers, sana_from_diffusers
from checkpoints_convert.unet import unet_from_diffusers
from zoo.flux import img_ids, txt_ids

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


@dataclass
class Pair:
    """Two models of one architecture on the same weights; `run_*(model)` calls that model on the shared inputs."""

    name: str
    ours: nn.Module
    ref: nn.Module
    run_ours: Callable[[nn.Module], Tensor]
    run_ref: Callable[[nn.Module], Tensor]


def randomize(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Every parameter drawn from N(0, std): trained-like magnitudes, nothing zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def _adopt(ours_spec, sd: dict[str, Tensor], share: bool, **overrides) -> nn.Module:
    """zoo.build on meta, then take the converted tensors (copies unless `share`)."""
    ours = zoo.build(ours_spec, device="meta", **overrides)
    if not share:
        sd = {k: v.clone() for k, v in sd.items()}
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval()


def flux(hidden: int = 1024, heads: int = 16, double: int = 2, single: int = 4, img_tokens: int = 1024,
         txt_tokens: int = 128, axes_dim: tuple[int, int, int] = (16, 24, 24), batch: int = 1, device="cpu",
         dtype: torch.dtype = torch.float32, share: bool = True) -> Pair:
    """Flux-dev's shape at `hidden` width (head dim hidden/heads = sum(axes_dim)), packed 2x2 latent tokens."""
    import diffusers

    with torch.device(device):
        ref = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
            attention_head_dim=hidden // heads, num_attention_heads=heads, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=tuple(axes_dim))
        randomize(ref)
    ref = (ref if dtype == torch.float32 else ref.to(dtype)).eval()  # .to warns needlessly in fp32
    ours = _adopt("flux-dev", flux_from_diffusers(ref.state_dict()), share, hidden_size=hidden, num_heads=heads,
                  depth=double, depth_single_blocks=single, axes_dim=list(axes_dim))
    side = int(img_tokens**0.5)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(batch, side * side, 64, generator=g).to(device, dtype)
    txt = torch.randn(batch, txt_tokens, 4096, generator=g).to(device, dtype)
    y = torch.randn(batch, 768, generator=g).to(device, dtype)
    t, gd = torch.full((batch,), 0.7, device=device, dtype=dtype), torch.full((batch,), 3.5, device=device, dtype=dtype)
    iid, tid = img_ids(batch, 2 * side, 2 * side).to(device), txt_ids(batch, txt_tokens).to(device)
    return Pair(
        f"flux {hidden}w {double}+{single} blocks, {side * side}+{txt_tokens} tokens", ours, ref,
        lambda m: m(img, iid, txt, tid, t, y, guidance=gd),
        lambda m: m(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=iid[0],
                    txt_ids=tid[0], guidance=gd, return_dict=False)[0])


TINY_SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      cross_attention_dim=48, attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=16 + 24)
# kind -> (diffusers config, zoo config, context width, SDXL pooled width (None: no y), size-embedding width)
UNETS = {"sd15": (SD15_UNET, "sd15", 768, None, 0), "sdxl": (SDXL_UNET, "sdxl-base", 2048, 1280, 256),
         "tiny-sdxl": (TINY_SDXL_UNET, "tiny-sdxl", 48, 16, 4)}


def unet(kind: str = "sd15", latent: int = 32, batch: int = 1, device="cpu", dtype: torch.dtype = torch.float32,
         share: bool = True) -> Pair:
    """A UNet of `UNETS` (SD1.5, SDXL-base at full width; tiny-sdxl), diffusers' default initialisation."""
    from diffusers import UNet2DConditionModel

    ref_cfg, spec, ctx_dim, pooled_dim, size_dim = UNETS[kind]
    torch.manual_seed(0)
    with torch.device(device):
        ref = UNet2DConditionModel(**ref_cfg)
    ref = (ref if dtype == torch.float32 else ref.to(dtype)).eval()  # .to warns needlessly in fp32
    ours = _adopt(spec, unet_from_diffusers(ref.state_dict()), share)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    ctx = torch.randn(batch, 77, ctx_dim, generator=g).to(device, dtype)
    name = f"{kind} unet, {latent}x{latent} latent"
    if pooled_dim is None:
        return Pair(name, ours, ref, lambda m: m(x, t, context=ctx),
                    lambda m: m(x, t, encoder_hidden_states=ctx, return_dict=False)[0])
    from pipelines.sd import sdxl_vector

    pooled = torch.randn(batch, pooled_dim, generator=g).to(device, dtype)
    size = [8 * latent, 8 * latent]
    y = sdxl_vector(pooled, size, (0, 0), size, dim=size_dim)
    cond = {"text_embeds": pooled,
            "time_ids": torch.tensor([[*size, 0, 0, *size]] * batch, device=device, dtype=dtype)}
    return Pair(name, ours, ref, lambda m: m(x, t, context=ctx, y=y),
                lambda m: m(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond, return_dict=False)[0])


def sana(depth: int = 4, size: int = 512, device="cpu", dtype: torch.dtype = torch.float32,
         share: bool = True) -> Pair:
    """Sana-600M's width at `depth` blocks on a `size` px image (latent size/32) with a 120-of-300-token prompt."""
    import diffusers

    with torch.device(device):
        ref = diffusers.SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=depth,
            num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1)
        randomize(ref)
    ref = (ref if dtype == torch.float32 else ref.to(dtype)).eval()  # .to warns needlessly in fp32
    ours = _adopt("sana-600m", sana_from_diffusers(ref.state_dict()), share, depth=depth)
    side = size // 32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, side, side, generator=g).to(device, dtype)
    y = torch.randn(1, 300, 2304, generator=g).to(device, dtype)
    mask = torch.ones(1, 300, dtype=torch.long, device=device)
    mask[:, 120:] = 0
    t = torch.tensor([700.0], device=device, dtype=dtype)
    return Pair(f"sana-600m width, {depth} blocks, {side}x{side} latent", ours, ref,
                lambda m: m(x, t, y[:, None], mask=mask),
                lambda m: m(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, return_dict=False)[0])


def vae_decode(latent: int = 32, family: str = "sd", ch: int = 128, device="cpu", dtype: torch.dtype = torch.float32,
               share: bool = True) -> Pair:
    """The SD (ldm, 4 channels) or Flux (bfl, 16) autoencoder, `ch` wide (128: the releases), on a `latent` x
    `latent` latent (8x that in pixels); `run_*` decode it."""
    import diffusers

    spec, channels = {"sd": ("vae-sd", 4), "flux": ("vae-flux", 16)}[family]
    ours = zoo.build(spec, device=device, ch=ch)
    randomize(ours)
    ours = (ours if dtype == torch.float32 else ours.to(dtype)).eval()
    p = ours.params
    with torch.device(device):
        ref = diffusers.AutoencoderKL(
            block_out_channels=tuple(ch * m for m in p.ch_mult), layers_per_block=p.num_res_blocks,
            latent_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=family == "sd",
            use_post_quant_conv=family == "sd", scaling_factor=p.scale_factor, shift_factor=p.shift_factor)
    ref = (ref if dtype == torch.float32 else ref.to(dtype)).eval()  # .to warns needlessly in fp32
    sd = autoencoder_to_diffusers(ours.state_dict())
    ref.load_state_dict(sd if share else {k: v.clone() for k, v in sd.items()}, strict=True, assign=share)
    z = torch.randn(1, channels, latent, latent, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return Pair(f"{family} vae decode {ch}w, {latent}x{latent} latent", ours, ref, lambda m: m.decode(z),
                lambda m: m.decode(z, return_dict=False)[0])


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| relative to max |b|, in float32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
