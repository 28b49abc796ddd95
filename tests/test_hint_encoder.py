"""HintEncoder sized from injection points, and the property-style suite: random valid UNet configs with a
HintEncoder, a ControlNet and a T2I-Adapter all build and run together with no channel mismatch."""
from __future__ import annotations

import random

import pytest
import torch

import zoo
from tests.conftest import randomize
from zoo.controlnet import ControlNet
from zoo.hint_encoder import HintEncoder


def test_hint_encoder_for_sd15_targets_the_level_ends_by_value():
    h = zoo.build({"arch": "hint_encoder", "unet": "sd15"}, device="meta")
    assert [(p.name, p.channels, p.stride) for p in h.points] == [
        ("input_blocks.2", 320, 1), ("input_blocks.5", 640, 2), ("input_blocks.8", 1280, 4),
        ("input_blocks.11", 1280, 8)]
    out = h(torch.zeros(2, 1, 512, 384, device="meta"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        2: (2, 320, 64, 48), 5: (2, 640, 32, 24), 8: (2, 1280, 16, 12), 11: (2, 1280, 8, 6)}


def test_hint_encoder_for_sdxl_chosen_points():
    h = zoo.build({"arch": "hint_encoder", "unet": "sdxl-base", "points": [0, 4, 8], "hint_channels": 3},
                  device="meta")
    out = h(torch.zeros(1, 3, 1024, 1024, device="meta"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {0: (1, 320, 128, 128), 4: (1, 640, 64, 64),
                                                          8: (1, 1280, 32, 32)}


def test_fresh_hint_encoder_is_a_no_op_and_a_trained_one_changes_the_unet():
    unet = randomize(zoo.build("tiny-unet"), seed=9, std=0.05).eval()
    enc = HintEncoder.for_unet(unet, points=[0, 2, 5]).eval()
    (x, t), kw = unet.example_inputs(batch=2, height=64, width=64)
    hint = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        base = unet(x, t, **kw)
        assert torch.equal(unet(x, t, **kw, features=enc(hint)), base)
        randomize(enc, seed=10, std=0.05)
        assert not torch.allclose(unet(x, t, **kw, features=enc(hint)), base)


def test_hint_encoder_bad_points_and_hint():
    with pytest.raises(ValueError, match=r"points \[3, 12\]: expected distinct input-block indices in 0..11"):
        zoo.build({"arch": "hint_encoder", "unet": "sd15", "points": [3, 12]}, device="meta")
    with pytest.raises(ValueError, match="must describe a UNet"):
        zoo.build({"arch": "hint_encoder", "unet": "tiny-controlnet"}, device="meta")
    h = zoo.build({"arch": "hint_encoder", "unet": "tiny-unet"})
    with pytest.raises(ValueError, match=r"hint has shape \(1, 3, 64, 64\), expected \(B, 1, H, W\) .* 32 pixels"):
        h(torch.zeros(1, 3, 64, 64))


def random_unet_config(rng: random.Random) -> dict:
    levels = rng.randint(1, 4)
    mult = [rng.choice([1, 2, 3]) for _ in range(levels)]
    mc = 32
    widths = [mc * m for m in mult]
    heads = rng.choice([{"num_heads": 1}, {"num_heads": 2}, {"num_head_channels": 16}, {"num_head_channels": 32}])
    if any(w % (heads.get("num_heads") or heads["num_head_channels"]) for w in widths):
        heads = {"num_heads": 1}
    cfg = {
        "arch": "unet", "in_channels": rng.choice([1, 4, 9]), "out_channels": rng.choice([None, 4, 8]),
        "model_channels": mc, "channel_mult": mult,
        "num_res_blocks": rng.choice([rng.randint(1, 2), [rng.randint(1, 2) for _ in range(levels)]]),
        "attention_resolutions": rng.sample([1, 2, 4, 8][:levels], rng.randint(0, levels)),
        "transformer_depth": rng.choice([1, [rng.randint(1, 2) for _ in range(levels)]]),
        "context_dim": rng.choice([8, 24, 40]), "use_linear_in_transformer": rng.random() < 0.5,
        "use_scale_shift_norm": rng.random() < 0.5, "resblock_updown": rng.random() < 0.5, **heads,
    }
    if rng.random() < 0.4:
        cfg.update(num_classes="sequential", adm_in_channels=rng.choice([8, 20]))
    return cfg


@pytest.mark.parametrize("seed", range(6))
def test_random_valid_unet_configs_run_with_hint_encoder_controlnet_and_t2i_adapter(seed):
    rng = random.Random(seed)
    cfg = random_unet_config(rng)
    unet = randomize(zoo.build(cfg), seed=seed, std=0.05).eval()
    enc = randomize(HintEncoder.for_unet(unet, hint_channels=rng.choice([1, 3])), seed=seed + 100, std=0.05).eval()
    cn = randomize(ControlNet.from_unet(unet, hint_channels=3), seed=seed + 200, std=0.05).eval()
    c = unet.config
    adapter = zoo.build({"arch": "t2i_adapter", "channels": [c.model_channels * m for m in c.channel_mult],
                         "nums_rb": 1, "cin": 64, "ksize": 1, "sk": True, "use_conv": rng.random() < 0.5}).eval()
    (x, t), kw = unet.example_inputs(batch=2, height=8 * c.total_stride, width=16 * c.total_stride)
    ph, pw = 8 * x.shape[2], 8 * x.shape[3]
    with torch.no_grad():
        feats = enc(torch.rand(2, enc.config.hint_channels, ph, pw))
        control = cn(x, torch.rand(2, 3, ph, pw), t, **kw)
        feats_a = adapter.features_for(unet, adapter(torch.rand(2, 1, ph, pw)))
        for extra in ({"features": feats, "control": control}, {"features": feats_a}):
            out = unet(x, t, **kw, **extra)
            assert out.shape == (2, c.out_channels, *x.shape[2:]) and torch.isfinite(out).all(), (cfg, list(extra))
    assert [o.shape[1] for o in control] == [p.channels for p in unet.injection_points()]
