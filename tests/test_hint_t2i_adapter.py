"""T2I-Adapter (official full Adapter): released layout, diffusers T2IAdapter parity, feeding the UNet."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert.unet import t2i_adapter_from_diffusers, t2i_adapter_to_diffusers, unet_from_diffusers
from tests.conftest import max_rel_err, randomize

diffusers = pytest.importorskip("diffusers")

TINY = {"arch": "t2i_adapter", "channels": [32, 64, 64], "nums_rb": 2, "cin": 64, "ksize": 1, "sk": True,
        "use_conv": False}


def test_released_sd15_adapter_layout_on_meta():
    sd = zoo.build("t2i-adapter-sd15", device="meta").state_dict()
    assert len(sd) == 38 and sum(v.numel() for v in sd.values()) == 77_000_640
    assert sd["conv_in.weight"].shape == (320, 64, 3, 3)
    assert sd["body.0.block1.weight"].shape == (320, 320, 3, 3)
    assert sd["body.0.block2.weight"].shape == (320, 320, 1, 1)
    assert sd["body.2.in_conv.weight"].shape == (640, 320, 1, 1)
    assert sd["body.4.in_conv.weight"].shape == (1280, 640, 1, 1)
    assert not any(k.startswith(("body.6.in_conv", "body.0.in_conv")) or "skep" in k for k in sd)


def test_t2i_adapter_matches_diffusers_and_its_features_drive_the_unet_identically(unet_peers):
    ref = randomize(diffusers.T2IAdapter(in_channels=1, channels=[32, 64, 64], num_res_blocks=2, downscale_factor=8,
                                         adapter_type="full_adapter"), seed=7, std=0.1).eval()
    ours = zoo.build(TINY).eval()
    ours.load_state_dict(t2i_adapter_from_diffusers(ref.state_dict()), strict=True)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, 128, 64, generator=g)
    with torch.no_grad():
        want, got = ref(img), ours(img)
    assert [f.shape for f in got] == [f.shape for f in want] == [(2, 32, 16, 8), (2, 64, 8, 4), (2, 64, 4, 2)]
    for a, b in zip(got, want):
        assert max_rel_err(a, b) <= 1e-5

    dunet = unet_peers["tiny-unet"]
    unet = zoo.build("tiny-unet").eval()
    unet.load_state_dict(unet_from_diffusers(dunet.state_dict()), strict=True)
    feats = ours.features_for(unet, got)
    assert sorted(feats) == [1, 3, 5]
    x, c, t = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([5.0, 900.0])
    with torch.no_grad():
        residuals = [f.clone() for f in want]  # diffusers pops from this list
        want = dunet(x, t, encoder_hidden_states=c, down_intrablock_additional_residuals=residuals).sample
        got = unet(x, t, context=c, features=feats)
    assert max_rel_err(got, want) <= 1e-5


def test_t2i_adapter_key_map_round_trips_bit_exactly():
    sd = randomize(zoo.build("t2i-adapter-sd15", channels=[64, 128, 128, 128]), seed=8).state_dict()
    d = t2i_adapter_to_diffusers(sd)
    assert "adapter.body.1.in_conv.weight" in d and "adapter.body.3.resnets.1.block2.weight" in d
    back = t2i_adapter_from_diffusers(d)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_t2i_adapter_bad_input_and_config():
    a = zoo.build(TINY)
    with pytest.raises(ValueError, match=r"input has shape \(1, 3, 64, 64\), expected \(B, 1, H, W\)"):
        a(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        a(torch.zeros(1, 1, 48, 64))
    with pytest.raises(ValueError, match="do not fit the UNet's level ends"):
        a.features_for(zoo.build("tiny-unet", device="meta"), a(torch.zeros(1, 1, 64, 64))[:2])
    with pytest.raises(ValueError, match="sk=False only works with equal channels"):
        zoo.build({**TINY, "sk": False})
