"""UNet bad input: each mistake raises a ValueError naming the tensor and both shapes, before any compute."""
from __future__ import annotations

import pytest
import torch

import zoo


@pytest.fixture(scope="module")
def sd15():
    return zoo.build("sd15", device="meta")


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("tiny-unet").eval()


def inputs(model, **kw):
    (x, t), kwargs = model.example_inputs(**kw)
    return x, t, kwargs


def test_x_with_wrong_channels(sd15):
    _, t, kw = inputs(sd15, device="meta")
    with pytest.raises(ValueError, match=r"x has shape \(1, 3, 64, 64\).*in_channels=4"):
        sd15(torch.zeros(1, 3, 64, 64, device="meta"), t, **kw)


def test_context_of_the_wrong_width(sd15):
    x, t, _ = inputs(sd15, device="meta")
    with pytest.raises(ValueError, match="context has 512 features, this UNet's cross-attention expects 768"):
        sd15(x, t, context=torch.zeros(1, 77, 512, device="meta"))
    with pytest.raises(ValueError, match=r"pass context of shape \(B, T, 768\)"):
        sd15(x, t)


def test_spatial_size_not_divisible_by_total_stride(sd15):
    _, t, kw = inputs(sd15, device="meta")
    with pytest.raises(ValueError, match=r"spatial size 60x64, not divisible by .* total stride 8"):
        sd15(torch.zeros(1, 4, 60, 64, device="meta"), t, **kw)
    with pytest.raises(ValueError, match="multiples of 64 pixels"):
        sd15.example_inputs(height=500, device="meta")


def test_control_list_of_wrong_length_or_shape(sd15):
    x, t, kw = inputs(sd15, device="meta")
    ctrl = [torch.zeros(1, p.channels, 64 // p.stride, 64 // p.stride, device="meta")
            for p in sd15.injection_points()]
    with pytest.raises(ValueError, match="control has 12 entries, expected 13"):
        sd15(x, t, **kw, control=ctrl[:-1])
    bad = list(ctrl)
    bad[4] = torch.zeros(1, 320, 32, 32, device="meta")
    with pytest.raises(ValueError, match=r"control\[4\] \(for input_blocks.4\) has shape \(1, 320, 32, 32\), "
                                         r"expected \(1, 640, 32, 32\)"):
        sd15(x, t, **kw, control=bad)


def test_features_at_a_non_block_index_or_with_wrong_channels(sd15):
    x, t, kw = inputs(sd15, device="meta")
    with pytest.raises(ValueError, match=r"features index 12 is not an input block.*input_blocks.11"):
        sd15(x, t, **kw, features={12: torch.zeros(1, 1280, 8, 8, device="meta")})
    with pytest.raises(ValueError, match=r"features\[5\] \(for input_blocks.5\) has shape \(1, 320, 32, 32\), "
                                         r"expected \(1, 640, 32, 32\)"):
        sd15(x, t, **kw, features={5: torch.zeros(1, 320, 32, 32, device="meta")})


def test_sdxl_without_y():
    m = zoo.build("sdxl-base", device="meta")
    x, t, kw = inputs(m, height=512, width=512, device="meta")
    with pytest.raises(ValueError, match=r"conditioned on y .*sequential.*\(1, 2816\)"):
        m(x, t, context=kw["context"])
    with pytest.raises(ValueError, match=r"y has shape \(1, 2048\), expected \(1, 2816\)"):
        m(x, t, context=kw["context"], y=torch.zeros(1, 2048, device="meta"))


def test_y_given_to_an_unconditioned_unet_and_bad_timesteps(tiny):
    x, t, kw = inputs(tiny, height=32, width=32)
    with pytest.raises(ValueError, match="no label/vector conditioning"):
        tiny(x, t, **kw, y=torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"timesteps has shape \(3,\), expected \(1,\)"):
        tiny(x, torch.zeros(3), **kw)


@pytest.mark.parametrize("override, match", [
    ({"model_channels": 40}, "not a multiple of 32"),
    ({"num_res_blocks": [1, 2]}, r"num_res_blocks \[1, 2\] has 2 entries, expected .* \(3\)"),
    ({"num_heads": -1}, "set num_heads or num_head_channels"),
    ({"context_dim": None}, "need a context_dim"),
    ({"num_classes": "sequential"}, "needs adm_in_channels"),
    ({"context_dim": [32, 64]}, "must all be equal"),
])
def test_invalid_configs_are_rejected_with_the_field_named(override, match):
    with pytest.raises(ValueError, match=match):
        zoo.get_config("tiny-unet", **override)
