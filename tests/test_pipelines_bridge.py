"""pipelines.bridge (LBM): one step is the closed form; several steps follow the official LBMModel.sample loop run
on diffusers' UNet, VAE and FlowMatchEulerDiscreteScheduler; lora_scale weighs the UNet's adapters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lora
import pipelines
import zoo
from checkpoints_convert import autoencoder_from_diffusers, save_file, unet_from_diffusers
from tests.conftest import max_rel_err, randomize

diffusers = pytest.importorskip("diffusers")

H, W = 32, 32


def diffusers_unet(in_channels: int):
    return randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2), seed=1, std=0.05).eval()


def diffusers_vae():
    return randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4), seed=3,
        std=0.05).eval()


def ours(unet, vae, sigma_b, context):
    u = zoo.build("tiny-unet", in_channels=unet.config.in_channels).eval()
    u.load_state_dict(unet_from_diffusers(unet.state_dict()), strict=True)
    a = zoo.build("tiny-vae").eval()
    a.load_state_dict(autoencoder_from_diffusers(vae.state_dict()), strict=True)
    return pipelines.bridge.BridgeParts(unet=u, vae=a, sigma_b=sigma_b, context=context)


def rand(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


CONTEXT = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def peers():
    return diffusers_unet(4), diffusers_vae()


def test_one_step_is_the_closed_form_decode_of_source_minus_velocity(peers):
    parts = ours(*peers, sigma_b=0.5, context=CONTEXT)
    image = rand(2, 3, H, W, seed=0)
    got = pipelines.bridge.generate(parts, image, steps=1, seed=3, progress=False)
    # closed form: z_target = z_source - v(z_source, t = 1); bridge noise never enters a single step
    u, a = parts.unet, parts.vae
    with torch.no_grad():
        z = a.to_model_space(a.encode(image * 2 - 1).sample(torch.Generator().manual_seed(3)))
        v = u(z, torch.full((2,), 1000.0), context=CONTEXT.expand(2, -1, -1))
        want = (a.decode(a.from_model_space(z - v)) / 2 + 0.5).clamp(0, 1)
    assert got.shape == (2, 3, H, W)
    assert max_rel_err(got, want) <= 1e-5


def official_lbm(unet, vae, source, steps, sigma_b, seed, context=None, mask=None, cond_image=None, sf=None):
    """The official evaluate + LBMModel.sample, written out on diffusers' components; `context` is the
    conditioning's crossattn (None in the releases: the UNet's attn2 then attends to the image itself); `sf`: the
    backbone VAE config's scaling_factor (the releases: SDXL's)."""
    g, sf = torch.Generator().manual_seed(seed), sf or vae.config.scaling_factor
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    with torch.no_grad():
        z = vae.encode(source * 2 - 1).latent_dist.sample(g) * sf
        concat = None
        if mask is not None:  # LatentsConcatEmbedder: masks, then images
            concat = torch.cat([F.interpolate(mask, size=z.shape[-2:], mode="bilinear", antialias=True),
                                vae.encode(cond_image * 2 - 1).latent_dist.sample(g) * sf], dim=1)
        sched.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps))
        for i, t in enumerate(sched.timesteps):
            x = z if concat is None else torch.cat([z, concat], 1)
            pred = unet(x, t.repeat(1), encoder_hidden_states=context).sample
            z = sched.step(pred, t, z, return_dict=False)[0]
            if i < steps - 1:
                s = sched.sigmas[i + 1]
                z = z + sigma_b * (s * (1 - s)) ** 0.5 * torch.randn(z.shape, generator=g)
        return (vae.decode(z / sf).sample.clamp(-1, 1) + 1) / 2


def test_steps_follow_the_official_lbm_loop_on_diffusers_parts_with_masks_and_condition_images(peers):
    unet, vae, steps, sigma_b = diffusers_unet(4 + 1 + 4), peers[1], 3, 0.4
    source, cond_image, mask = rand(1, 3, H, W, seed=1), rand(1, 3, H, W, seed=2), rand(1, 1, H, W, seed=5)
    got = pipelines.bridge.generate(ours(unet, vae, sigma_b, CONTEXT), source, steps=steps, masks=[mask],
                                    condition_images=[cond_image], seed=7, progress=False)
    want = official_lbm(unet, vae, source, steps, sigma_b, 7, CONTEXT, mask, cond_image)
    assert max_rel_err(got, want) <= 1e-4


def test_a_released_lbm_shaped_file_loads_and_runs_the_official_loop_without_context(peers, tmp_path):
    # the releases' denoiser: no attention at level 0, attn2 widths = the level widths, 64-wide heads, no context
    unet = randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=[32, 64, 128],
        transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 1, 2], use_linear_projection=True), seed=4,
        std=0.05).eval()
    vae = peers[1]
    # LBMModel.state_dict() as the release's model.safetensors holds it, with its YAML beside
    save_file({**{f"denoiser.{k}": v for k, v in unet.state_dict().items()},
               **{f"vae.vae_model.{k}": v for k, v in vae.state_dict().items()}}, tmp_path / "model.safetensors")
    (tmp_path / "config.yaml").write_text("backbone_signature: stabilityai/stable-diffusion-xl-base-1.0\n"
                                          "bridge_noise_sigma: 0.3\n")
    with pytest.warns(UserWarning, match="num_head_channels=64 assumed"):  # the releases' head width
        parts = pipelines.load("bridge", tmp_path)
    assert parts.unet.config.cross_attention_dim == [32, 64, 128] and parts.unet.config.num_head_channels == 64
    assert parts.context is None and parts.sigma_b == 0.3 and parts.vae.scale_factor == 0.13025  # SDXL's VAE
    source = rand(1, 3, H, W, seed=6)
    got = pipelines.bridge.generate(parts, source, steps=2, seed=11, progress=False)
    want = official_lbm(unet, vae, source, 2, 0.3, 11, sf=0.13025)
    assert max_rel_err(got, want) <= 1e-4


def test_lora_scale_weighs_the_unet_adapters_and_needs_one(peers):
    parts = ours(*peers, sigma_b=0.0, context=CONTEXT)
    image = rand(1, 3, H, W, seed=4)

    def run(**kw):  # the final latent (the decoder would blur the comparison)
        out = []
        pipelines.bridge.generate(parts, image, steps=1, seed=0, progress=False,
                                  callback=lambda i, n, x: out.append(x), **kw)
        return out[-1]

    with pytest.raises(ValueError, match=r"lora_scale=0.5 given, but the bridge UNet has no LoRA adapter"):
        run(lora_scale=0.5)
    base = run()
    lora.inject(parts.unet, lora.PRESETS["sd-attn"], rank=2, adapter="lbm", init="gaussian")
    for layer in lora.lora_layers(parts.unet).values():
        torch.nn.init.normal_(layer.lora_up["lbm"].weight, std=1.0)
    half = run(lora_scale=0.5)
    assert max_rel_err(half, base) > 1e-3
    # the adapter at scale 0.5 equals the base model with half the delta merged
    lora.set_adapter(parts.unet, "lbm", weights=0.5)
    lora.merge(parts.unet)  # the forward now skips the merged adapter
    merged = run()
    assert max_rel_err(merged, half) <= 1e-5


def test_bad_input_is_named(peers):
    parts = ours(*peers, sigma_b=0.0, context=CONTEXT)
    with pytest.raises(ValueError, match=r"source image is 48x32, not a multiple of 32"):
        pipelines.bridge.generate(parts, rand(1, 3, 48, 32, seed=0), progress=False)
    with pytest.raises(ValueError, match=r"takes 4 input channels, but the latent \(4\) plus masks and condition "
                                         r"images \(1\) give 5"):
        pipelines.bridge.generate(parts, rand(1, 3, H, W, seed=0), masks=[rand(1, 1, H, W, seed=1)], progress=False)
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got 0"):
        pipelines.bridge.generate(parts, rand(1, 3, H, W, seed=0), steps=0, progress=False)
