"""Bad input to the pipelines: clear errors naming what is wrong, raised before any work is done."""
from __future__ import annotations

import pytest
import torch

import pipelines
import zoo


@pytest.fixture(scope="module")
def flux_parts():
    model = zoo.build("tiny-flux", in_channels=64, out_channels=64).eval()
    return pipelines.flux.FluxParts(model=model, ae=zoo.build("tiny-vae-flux").eval())


@pytest.fixture(scope="module")
def sd_parts():
    return pipelines.sd.SDParts(unet=zoo.build("tiny-unet").eval(), vae=zoo.build("tiny-vae").eval())


COND = {"txt": torch.randn(2, 4, 48), "y": torch.randn(2, 32)}


def test_latents_batch_that_does_not_match_the_prompts_is_named(flux_parts):
    with pytest.raises(ValueError, match=r"latents has shape \(3, 16, 4, 4\), expected \(2, 16, 4, 4\)"):
        pipelines.flux.generate(flux_parts, conditioning=COND, height=32, width=32, steps=1,
                                latents=torch.randn(3, 16, 4, 4), progress=False)
    with pytest.raises(ValueError, match=r"disagree on the batch size: \{'txt': 2, 'y': 1\}"):
        pipelines.flux.generate(flux_parts, conditioning={"txt": COND["txt"], "y": COND["y"][:1]}, height=32,
                                width=32, steps=1, progress=False)


def test_sizes_the_vae_stride_cannot_take_are_refused(flux_parts, sd_parts):
    with pytest.raises(ValueError, match=r"Flux: width=40 is not a positive multiple of 16.*use 32 or 48"):
        pipelines.flux.generate(flux_parts, conditioning=COND, height=32, width=40, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"SD: height=36 is not a positive multiple of 32"):
        pipelines.sd.generate(sd_parts, conditioning={"context": torch.randn(1, 3, 32)}, height=36, width=32,
                              guidance=1.0, progress=False)


def test_prompt_strings_without_text_encoders_and_missing_conditioning_keys(flux_parts, sd_parts):
    with pytest.raises(ValueError, match=r"lack \['clip', 'clip_tok', 't5', 't5_tok'\].*conditioning="):
        pipelines.flux.generate(flux_parts, "a fox", height=32, width=32, progress=False)
    with pytest.raises(ValueError, match=r"conditioning lacks \['y'\]"):
        pipelines.flux.generate(flux_parts, conditioning={"txt": COND["txt"]}, height=32, width=32, progress=False)
    with pytest.raises(ValueError, match=r"the SD parts lack \['clip', 'tok'\]"):  # the default negative prompt ""
        pipelines.sd.generate(sd_parts, conditioning={"context": torch.randn(1, 3, 32)}, height=32, width=32,
                              progress=False)


def test_controlnet_that_does_not_fit_the_unet_and_wrong_hint_channels(sd_parts):
    cond = {"context": torch.randn(1, 3, 32)}
    wide = zoo.build("tiny-controlnet", model_channels=64).eval()
    parts = pipelines.sd.SDParts(unet=sd_parts.unet, vae=sd_parts.vae, controlnet=wide)
    with pytest.raises(ValueError, match=r"ControlNet does not fit the UNet: its residuals .*\(64, 1\)"):
        pipelines.sd.generate(parts, conditioning=cond, control_image=torch.rand(1, 3, 32, 32), height=32, width=32,
                              guidance=1.0, progress=False)
    parts.controlnet = zoo.build("tiny-controlnet").eval()
    with pytest.raises(ValueError, match=r"control_image has shape \(1, 1, 32, 32\), expected \(B, 3, 32, 32\)"):
        pipelines.sd.generate(parts, conditioning=cond, control_image=torch.rand(1, 1, 32, 32), height=32, width=32,
                              guidance=1.0, progress=False)


def test_img2img_image_and_strength_checks(flux_parts):
    with pytest.raises(ValueError, match=r"image is 32x48, but height x width = 32x32"):
        pipelines.flux.generate(flux_parts, conditioning=COND, image=torch.rand(1, 3, 32, 48), height=32, width=32,
                                progress=False)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 0.0"):
        pipelines.flux.generate(flux_parts, conditioning=COND, image=torch.rand(1, 3, 32, 32), strength=0.0,
                                height=32, width=32, progress=False)


def test_save_png_names_the_suffix_and_writes_nothing_else(tmp_path):
    with pytest.raises(ValueError, match=r"save_png writes .png files, got 'out.jpg'"):
        pipelines.save_png(torch.rand(1, 3, 8, 8), tmp_path / "out.jpg")
    assert list(tmp_path.iterdir()) == []
    paths = pipelines.save_png(torch.rand(2, 3, 8, 8), tmp_path / "out.png")
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"]
    back = pipelines.load_image(paths[0])
    assert back.shape == (1, 3, 8, 8)


def test_adapter_image_of_another_size_is_named(sd_parts):
    from zoo.hint_encoder import HintEncoder

    parts = pipelines.sd.SDParts(unet=sd_parts.unet, vae=sd_parts.vae, adapter=HintEncoder.for_unet(sd_parts.unet))
    with pytest.raises(ValueError, match=r"adapter_image has shape \(1, 1, 64, 64\), expected \(B, C, 32, 32\)"):
        pipelines.sd.generate(parts, conditioning={"context": torch.randn(1, 3, 32)},
                              adapter_image=torch.rand(1, 1, 64, 64), height=32, width=32, guidance=1.0, progress=False)
