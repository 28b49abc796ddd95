"""pipelines.panorama (DiT360): the reference DiT360Pipeline loop (pad tokens and ids once, shift from the padded
count, crop at the end) on diffusers' Flux, and the seam score: at noise level with the wrap, far above without."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pipelines
import zoo
from tests.conftest import max_rel_err, randomize
from tests.test_pipelines_flux import tiny_system

diffusers = pytest.importorskip("diffusers")

H, W = 32, 64
COND = {"txt": torch.randn(1, 4, 24, generator=torch.Generator().manual_seed(0)),
        "y": torch.randn(1, 16, generator=torch.Generator().manual_seed(1))}


def test_padded_loop_matches_the_reference_dit360_pipeline_on_diffusers_flux():
    kw, flux_parts = tiny_system(dev=True)  # the same tiny diffusers Flux + VAE as the FluxPipeline parity tests
    tr, vae = kw["transformer"], kw["vae"]
    steps, n_h, n_w = 3, H // 16, W // 16
    got = pipelines.panorama.generate(flux_parts, conditioning=COND, height=H, width=W, steps=steps, guidance=3.5,
                                      seed=0, circular_decode=False, progress=False)
    # the reference DiT360Pipeline.__call__, written out on diffusers' components
    fp, sched = diffusers.FluxPipeline, kw["scheduler"]
    with torch.no_grad():
        noise = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
        lat = fp._pack_latents(noise, 1, 16, H // 8, W // 8).reshape(1, n_h, n_w, 64)
        lat = torch.cat([lat[:, :, -1:], lat, lat[:, :, :1]], dim=2).reshape(1, -1, 64)
        ids = fp._prepare_latent_image_ids(1, n_h, n_w, "cpu", torch.float32).reshape(n_h, n_w, 3)
        ids = torch.cat([ids[:, -1:], ids, ids[:, :1]], dim=1).reshape(-1, 3)
        mu = (1.15 - 0.5) / (4096 - 256) * lat.shape[1] + 0.5 - (1.15 - 0.5) / (4096 - 256) * 256
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        for t in sched.timesteps:
            v = tr(hidden_states=lat, timestep=t.expand(1) / 1000, guidance=torch.full((1,), 3.5),
                   pooled_projections=COND["y"], encoder_hidden_states=COND["txt"], txt_ids=torch.zeros(4, 3),
                   img_ids=ids, return_dict=False)[0]
            lat = sched.step(v, t, lat, return_dict=False)[0]
        lat = lat.reshape(1, n_h, n_w + 2, 64)[:, :, 1:-1].reshape(1, -1, 64)
        z = fp._unpack_latents(lat, H, W, 8) / vae.config.scaling_factor + vae.config.shift_factor
        want = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    assert max_rel_err(got, want) <= 1e-4


@pytest.fixture(scope="module")
def parts():
    model = randomize(zoo.build("tiny-flux", in_channels=64, out_channels=64), seed=1, std=0.05).eval()
    return pipelines.flux.FluxParts(model=model, ae=randomize(zoo.build("tiny-vae-flux"), seed=2, std=0.05).eval())


def test_seam_is_at_noise_level_with_the_wrap_and_clearly_worse_without(parts):
    cond = {"txt": torch.randn(1, 4, 48), "y": torch.randn(1, 32)}
    run = dict(conditioning=cond, height=32, width=64, steps=2, seed=0, progress=False)
    image = pipelines.panorama.generate(parts, **run)
    wrapped = pipelines.panorama.seam_score(image)
    plain = pipelines.panorama.seam_score(pipelines.panorama.generate(parts, wrap=False, **run))
    assert wrapped < 2.5  # like any neighbouring column pair
    assert plain > 5 * wrapped
    # tiled circular decode (the default from 2048x4096): tiles blend, the seam stays at noise level
    tiled = pipelines.panorama.generate(parts, tile=4, **run)
    assert pipelines.panorama.seam_score(tiled) < 2.5 and (tiled - image).abs().max() < 0.05
    # a built-in wrap (circular_pad, the dit360 config) gives a seam at noise level too, from the plain grid
    dit = zoo.build("tiny-flux", in_channels=64, out_channels=64, circular_pad=1).eval()
    dit.load_state_dict(parts.model.state_dict())
    built_in = pipelines.flux.FluxParts(model=dit, ae=parts.ae)
    assert pipelines.panorama.seam_score(pipelines.panorama.generate(built_in, **run)) < 2.5


def test_seam_score_and_bad_sizes():
    ramp = torch.linspace(0, 1, 16).expand(1, 3, 4, 16)
    assert pipelines.panorama.seam_score(ramp) == pytest.approx(15.0, rel=1e-4)  # the jump 1 -> 0 is 15 steps
    assert pipelines.panorama.seam_score(torch.cos(torch.arange(16) * 2 * torch.pi / 16).expand(1, 1, 2, 16)) < 1.01
    with pytest.raises(ValueError, match=r"panorama is 2:1, got height x width = 64x64"):
        pipelines.panorama.check_panorama_size(64, 64)
    with pytest.raises(ValueError, match=r"panorama: width=136 is not a positive multiple of 16"):
        pipelines.panorama.check_panorama_size(64, 136)
