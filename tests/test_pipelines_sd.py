"""pipelines.sd against diffusers' StableDiffusion(XL|ControlNet)Pipeline on the same tiny weights and latents."""
from __future__ import annotations

import pytest
import torch

import pipelines
import zoo
from checkpoints_convert import autoencoder_from_diffusers, controlnet_from_diffusers, unet_from_diffusers
from tests.conftest import max_rel_err, randomize, sd15_like, sd_vae_like, sdxl_like

diffusers = pytest.importorskip("diffusers")

H, W = 64, 32


def ddim():
    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def ours(unet_name, unet, v, **extra):
    u = zoo.build(unet_name).eval()
    u.load_state_dict(unet_from_diffusers(unet.state_dict()), strict=True)
    a = zoo.build("tiny-vae").eval()
    a.load_state_dict(autoencoder_from_diffusers(v.state_dict()), strict=True)
    return pipelines.sd.SDParts(unet=u, vae=a, **extra)


def embeds(b, dim, seed, length=5):
    return torch.randn(b, length, dim, generator=torch.Generator().manual_seed(seed))


def test_sd_text_to_image_matches_stable_diffusion_pipeline():
    u, v = sd15_like(std=0.05), sd_vae_like()
    pos, neg = embeds(2, 32, 0), embeds(2, 32, 1)
    pipe = diffusers.StableDiffusionPipeline(vae=v, text_encoder=None, tokenizer=None, unet=u, scheduler=ddim(),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    want = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=H, width=W, num_inference_steps=4,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    parts = ours("tiny-unet", u, v)
    got = pipelines.sd.generate(parts, conditioning={"context": pos}, negative_conditioning={"context": neg},
                                height=H, width=W, steps=4, guidance=5.0, seed=0, progress=False)
    assert got.shape == want.shape == (2, 3, H, W)
    assert max_rel_err(got, want) <= 1e-4
    # img2img: the same start index and noised posterior sample as StableDiffusionImg2ImgPipeline
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(4))
    want = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)(
        prompt_embeds=pos, negative_prompt_embeds=neg, image=image, strength=0.5, num_inference_steps=4,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    got = pipelines.sd.generate(parts, conditioning={"context": pos}, negative_conditioning={"context": neg},
                                image=image, strength=0.5, height=H, width=W, steps=4, guidance=5.0, seed=0,
                                progress=False)
    assert max_rel_err(got, want) <= 1e-4


def test_sdxl_matches_stable_diffusion_xl_pipeline_with_size_and_crop():
    u, v = sdxl_like(std=0.05), sd_vae_like()
    g = torch.Generator().manual_seed(5)
    pos, neg = embeds(1, 48, 0), embeds(1, 48, 1)
    pooled, neg_pooled = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    size, crop = (96, 80), (8, 4)
    pipe = diffusers.StableDiffusionXLPipeline(vae=v, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=u, scheduler=ddim())
    want = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled, original_size=size, crops_coords_top_left=crop,
                target_size=(H, W), height=H, width=W, num_inference_steps=3, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images
    y = pipelines.sd.sdxl_vector(pooled, size, crop, (H, W), dim=4)
    y_neg = pipelines.sd.sdxl_vector(neg_pooled, size, crop, (H, W), dim=4)
    got = pipelines.sd.generate(ours("tiny-sdxl", u, v), conditioning={"context": pos, "y": y},
                                negative_conditioning={"context": neg, "y": y_neg}, height=H, width=W, steps=3,
                                guidance=4.0, seed=0, progress=False)
    assert max_rel_err(got, want) <= 1e-4


def test_controlnet_matches_stable_diffusion_controlnet_pipeline_and_controls():
    u, v = sd15_like(std=0.05), sd_vae_like()
    cn = randomize(diffusers.ControlNetModel(
        in_channels=4, conditioning_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        attention_head_dim=2), seed=4, std=0.05).eval()
    pos, neg = embeds(1, 32, 0), embeds(1, 32, 1)
    hint = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(6))
    want = diffusers.StableDiffusionControlNetPipeline(
        vae=v, text_encoder=None, tokenizer=None, unet=u, controlnet=cn, scheduler=ddim(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)(
        prompt_embeds=pos, negative_prompt_embeds=neg, image=hint, controlnet_conditioning_scale=0.7, height=H,
        width=W, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
        output_type="pt").images
    ctrl = zoo.build("tiny-controlnet").eval()
    ctrl.load_state_dict(controlnet_from_diffusers(cn.state_dict()), strict=True)
    parts = ours("tiny-unet", u, v, controlnet=ctrl)
    run = dict(conditioning={"context": pos}, negative_conditioning={"context": neg}, height=H, width=W, steps=3,
               guidance=5.0, seed=0, progress=False)
    got = pipelines.sd.generate(parts, control_image=hint, control_strength=0.7, **run)
    assert max_rel_err(got, want) <= 1e-4
    plain = pipelines.sd.generate(parts, **run)
    guess = pipelines.sd.generate(parts, control_image=hint, control_strength=0.7, guess_mode=True, **run)
    subset = pipelines.sd.generate(parts, control_image=hint, control_strength=0.7, control_blocks=[0, 1], **run)
    none = pipelines.sd.generate(parts, control_image=hint, control_strength=0.7, control_blocks=[], **run)
    tol = 1e-6
    assert (guess - got).abs().max() > tol and (subset - got).abs().max() > tol and (subset - plain).abs().max() > tol
    assert (none - plain).abs().max() <= 1e-6  # no block selected: the UNet alone


def test_adapter_and_hint_encoder_features_change_the_image():
    u, v = sd15_like(std=0.05), sd_vae_like()
    parts = ours("tiny-unet", u, v)
    run = dict(conditioning={"context": embeds(1, 32, 0)}, height=H, width=W, steps=2, guidance=1.0, seed=0,
               progress=False)
    plain = pipelines.sd.generate(parts, **run)
    enc = randomize(zoo.build({"arch": "hint_encoder", "unet": "tiny-unet", "hint_channels": 1}), seed=8, std=0.05)
    parts.adapter = enc.eval()
    sketch = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(9))
    hinted = pipelines.sd.generate(parts, adapter_image=sketch, **run)
    zero = pipelines.sd.generate(parts, adapter_image=sketch, adapter_strength=0.0, **run)
    assert (hinted - plain).abs().max() > 1e-5 and (zero - plain).abs().max() <= 1e-6
