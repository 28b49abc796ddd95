"""pipelines.scribble: DDIM on the cosine schedule with CFG equals diffusers' StableDiffusionPipeline with a
squaredcos_cap_v2 DDIMScheduler when the hint adds nothing; the sketch changes the image; cross-attention maps are
distributions over the prompt's tokens and are written as heatmap PNGs."""
from __future__ import annotations

import pytest
import torch

import pipelines
import zoo
from checkpoints_convert import autoencoder_from_diffusers, unet_from_diffusers
from tests.conftest import max_rel_err, randomize, sd15_like, sd_vae_like
from zoo.hint_encoder import HintEncoder

diffusers = pytest.importorskip("diffusers")

H, W = 64, 32
POS = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
NEG = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def peers():
    unet, vae = sd15_like(std=0.05), sd_vae_like()
    return unet, vae


def parts(peers, zero_hint: bool) -> pipelines.scribble.ScribbleParts:
    u = zoo.build("tiny-unet").eval()
    u.load_state_dict(unet_from_diffusers(peers[0].state_dict()), strict=True)
    a = zoo.build("tiny-vae").eval()
    a.load_state_dict(autoencoder_from_diffusers(peers[1].state_dict()), strict=True)
    enc = HintEncoder.for_unet(u, hint_channels=1, zero_init=zero_hint).eval()
    if not zero_hint:
        randomize(enc, seed=5, std=0.2)
    return pipelines.scribble.ScribbleParts(unet=u, vae=a, adapter=enc)


def sketch(seed: int) -> torch.Tensor:
    return (torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(seed)) > 0.8).float()


def run(p, s, **kw):
    return pipelines.scribble.generate(p, s, conditioning={"context": POS}, negative_conditioning={"context": NEG},
                                       steps=3, guidance=4.0, seed=0, progress=False, **kw)


def test_cosine_ddim_with_cfg_matches_diffusers_when_the_hint_adds_nothing(peers):
    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=peers[1], text_encoder=None, tokenizer=None, unet=peers[0],
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    want = pipe(prompt_embeds=POS, negative_prompt_embeds=NEG, height=H, width=W, num_inference_steps=3,
                guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    got = run(parts(peers, zero_hint=True), sketch(1))
    assert got.shape == want.shape == (1, 3, H, W)
    assert max_rel_err(got, want) <= 1e-4


def final_latent(p, s) -> torch.Tensor:  # the tiny random VAE would blur the comparison; no CFG (cheaper)
    out = []
    pipelines.scribble.generate(p, s, conditioning={"context": POS}, steps=2, guidance=1.0, seed=0, progress=False,
                                callback=lambda i, n, x: out.append(x))
    return out[-1]


def test_the_sketch_changes_the_image_and_rgb_sketches_are_reduced_to_luma(peers):
    p = parts(peers, zero_hint=False)
    # well above fp32 noise (~1e-6): a random tiny UNet reacts weakly to its injected features
    assert max_rel_err(final_latent(p, sketch(2)), final_latent(p, sketch(1))) > 1e-4
    rgb = pipelines.scribble.sketch_to_hint(sketch(1).expand(-1, 3, -1, -1), 1)
    torch.testing.assert_close(rgb, sketch(1), rtol=0, atol=1e-6)


def test_attention_maps_sum_to_one_over_tokens_leave_the_image_unchanged_and_save_as_pngs(peers, tmp_path):
    p = parts(peers, zero_hint=False)
    plain = run(p, sketch(1))
    images, maps = run(p, sketch(1), attention_maps=True)
    assert torch.equal(images, plain)
    assert maps.shape == (1, 5, H // 8, W // 8)  # (B, tokens, latent grid)
    torch.testing.assert_close(maps.sum(1), torch.ones(1, H // 8, W // 8), rtol=0, atol=1e-5)
    assert (maps >= 0).all() and maps.std(1).max() > 0  # not uniform over tokens
    paths = pipelines.scribble.save_attention_maps(maps[0], tmp_path / "fox.png", labels=["<s>", "a", "fox"],
                                                   size=(H, W))
    assert [q.name for q in paths] == ["fox-tok00-s.png", "fox-tok01-a.png", "fox-tok02-fox.png"]
    assert pipelines.load_image(paths[2]).shape == (1, 3, H, W)


def test_bad_input_is_named(peers):
    p = parts(peers, zero_hint=True)
    with pytest.raises(ValueError, match=r"sketch values lie in \[0, 2\], expected \[0, 1\]"):
        run(p, sketch(1) * 2)
    with pytest.raises(ValueError, match=r"SD: width=40 is not a positive multiple of 32"):
        run(p, torch.zeros(1, 1, 64, 40))
    p.adapter = None
    with pytest.raises(ValueError, match=r"no hint encoder"):
        run(p, sketch(1))
