"""pipelines.flux against diffusers' FluxPipeline (dev, schnell) and FluxImg2ImgPipeline on the same tiny weights."""
from __future__ import annotations

import pytest
import torch

import pipelines
import zoo
from checkpoints_convert import autoencoder_from_diffusers, flux_from_diffusers
from tests.conftest import max_rel_err, randomize

diffusers = pytest.importorskip("diffusers")

H, W, L_TXT = 32, 48, 5


def tiny_system(dev: bool):
    """A tiny diffusers Flux + bfl-layout VAE, and our parts loaded from their converted state dicts."""
    tr = randomize(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=dev, axes_dims_rope=(4, 6, 6)),
        seed=1, std=0.05).eval()
    vae = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
        seed=2, std=0.05).eval()
    model = zoo.build({"arch": "flux", "in_channels": 64, "vec_in_dim": 16, "context_in_dim": 24, "hidden_size": 32,
                       "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6],
                       "theta": 10000, "qkv_bias": True, "guidance_embed": dev}).eval()
    model.load_state_dict(flux_from_diffusers(tr.state_dict()), strict=True)
    ae = zoo.build("tiny-vae-flux").eval()
    ae.load_state_dict(autoencoder_from_diffusers(vae.state_dict()), strict=True)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=1.0 if not dev else 3.0, use_dynamic_shifting=dev, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15)
    kw = dict(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
              transformer=tr)
    return kw, pipelines.flux.FluxParts(model=model, ae=ae)


def conditioning(b: int = 2):
    g = torch.Generator().manual_seed(7)
    return {"txt": torch.randn(b, L_TXT, 24, generator=g), "y": torch.randn(b, 16, generator=g)}


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "schnell"])
def test_flux_text_to_image_matches_diffusers_flux_pipeline(dev):
    kw, parts = tiny_system(dev)
    cond = conditioning()
    steps = 3
    pipe = diffusers.FluxPipeline(**kw)
    run = dict(prompt_embeds=cond["txt"], pooled_prompt_embeds=cond["y"], height=H, width=W,
               num_inference_steps=steps, guidance_scale=3.5)
    want = pipe(**run, generator=torch.Generator().manual_seed(0), output_type="pt").images
    want_latents = pipe(**run, generator=torch.Generator().manual_seed(0), output_type="latent").images
    seen = []
    got = pipelines.flux.generate(parts, conditioning=cond, height=H, width=W, steps=steps, guidance=3.5, seed=0,
                                  progress=False, callback=lambda i, n, x: seen.append((i, n, x)))
    assert got.shape == want.shape == (2, 3, H, W)
    assert [(i, n) for i, n, _ in seen] == [(1, steps), (2, steps), (3, steps)]
    assert max_rel_err(seen[-1][2], want_latents) <= 1e-4  # the packed latents before decoding
    assert max_rel_err(got, want) <= 1e-4


def test_flux_img2img_matches_diffusers_flux_img2img_pipeline():
    kw, parts = tiny_system(True)
    cond = conditioning()
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3))
    want = diffusers.FluxImg2ImgPipeline(**kw)(
        prompt_embeds=cond["txt"], pooled_prompt_embeds=cond["y"], image=image, strength=0.6, height=H, width=W,
        num_inference_steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    got = pipelines.flux.generate(parts, conditioning=cond, image=image, strength=0.6, height=H, width=W, steps=4,
                                  guidance=3.5, seed=0, progress=False)
    assert max_rel_err(got, want) <= 1e-4
    # the source image matters: another image, same seed, gives another result
    other = pipelines.flux.generate(parts, conditioning=cond, image=image.flip(-1), strength=0.6, height=H, width=W,
                                    steps=4, seed=0, progress=False)
    assert (other - got).abs().max() > 100 * (got - want).abs().max()
