"""Released-LBM-shaped UNets: one cross-attention width per level (diffusers' `cross_attention_dim` list), called
without context so that every attn2 attends to the image itself; parity with diffusers, the shipped release config
against diffusers' model of the official constructor, reading the field off the keys, bad input."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert.fields import read_fields
from checkpoints_convert.unet import unet_from_diffusers
from tests.conftest import max_rel_err, randomize

diffusers = pytest.importorskip("diffusers")

# gojasper/LBM `_get_model_from_config`: the DiffusersUNet2DCondWrapper arguments of the released models (the
# arguments equal to diffusers' defaults are left out)
LBM_RELEASE = dict(
    in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=[320, 640, 1280],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True)


def lbm_like(widths=(64, 128), seed: int = 0) -> torch.nn.Module:
    """A tiny diffusers UNet of LBM's kind: attn2 widths = the level widths (at every level here), 64-wide heads."""
    n = len(widths)
    return randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=tuple(widths),
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=list(widths), transformer_layers_per_block=[1, 2][:n],
        attention_head_dim=[w // 64 for w in widths],
        use_linear_projection=True), seed=seed, std=0.05).eval()


@pytest.fixture(scope="module")
def peer():
    return lbm_like()


def test_the_shipped_lbm_config_has_the_keys_and_shapes_of_the_official_constructor():
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**LBM_RELEASE)
    want = {k: tuple(v.shape) for k, v in unet_from_diffusers(ref.state_dict()).items()}
    ours = zoo.build("lbm-unet", device="meta")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    cfg = ours.config
    assert cfg.cross_attention_dim == [320, 640, 1280] and cfg.context_dim is None and cfg.self_context
    to_k = [ours.output_blocks[n][1].transformer_blocks[0].attn2.to_k.in_features for n in (2, 3)]
    assert to_k == [1280, 640]  # the last output block of level 2, the first of level 1


def test_without_context_every_attn2_attends_to_the_image_as_diffusers_does(peer):
    ours = zoo.build({"arch": "unet", "in_channels": 4, "model_channels": 64, "channel_mult": [1, 2],
                      "num_res_blocks": 1, "attention_resolutions": [1, 2], "transformer_depth": [1, 2],
                      "num_head_channels": 64, "use_linear_in_transformer": True,
                      "cross_attention_dim": [64, 128]}).eval()
    ours.load_state_dict(unet_from_diffusers(peer.state_dict()), strict=True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        want = peer(x, t, encoder_hidden_states=None).sample
        got = ours(x, t)
    assert got.shape == want.shape == (2, 4, 8, 12)
    assert max_rel_err(got, want) <= 1e-5


def test_the_per_level_widths_are_read_off_the_keys(peer):
    sd = unet_from_diffusers(peer.state_dict())
    fields, assumed = read_fields("unet", {k: tuple(v.shape) for k, v in sd.items()})
    assert fields["cross_attention_dim"] == [64, 128] and fields["context_dim"] is None
    assert fields["transformer_depth"] == [1, 2] and assumed == {"num_head_channels": 64}  # the releases' heads
    m = zoo.build(fields).eval()
    m.load_state_dict(sd, strict=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_rel_err(m(x, 500.0), peer(x, 500.0, encoder_hidden_states=None).sample) <= 1e-5


def test_equal_widths_per_level_still_read_as_one_context_dim():
    ours = zoo.build("tiny-sdxl", device="meta")
    got, _ = read_fields("unet", {k: tuple(v.shape) for k, v in ours.state_dict().items()})
    assert got["context_dim"] == 48 and "cross_attention_dim" not in got


def test_context_rules_and_bad_configs_are_named():
    lbm = zoo.build("lbm-unet", device="meta")
    x = torch.zeros(1, 4, 16, 16, device="meta")
    with pytest.raises(ValueError, match=r"cross_attention_dim \[320, 640, 1280\] differs per level, so one context "
                                         r"tensor fits none: pass context=None"):
        lbm(x, 1.0, context=torch.zeros(1, 3, 640, device="meta"))
    sd15 = zoo.build("tiny-unet", device="meta")  # context_dim 32 at widths 32 and 64: a context is required
    with pytest.raises(ValueError, match=r"has cross-attention: pass context of shape \(B, T, 32\)"):
        sd15(torch.zeros(1, 4, 16, 16, device="meta"), 1.0)
    same = zoo.build("tiny-unet", device="meta", channel_mult=[1], context_dim=None, cross_attention_dim=[32])
    assert same.config.self_context and same.config.context_width == 32  # a context may be given, or not
    bad = [({"cross_attention_dim": [320, 640]}, r"cross_attention_dim \[320, 640\]: expected a list with one width "
                                                 r"per level of channel_mult \(3\)"),
           ({"cross_attention_dim": 640}, r"cross_attention_dim 640: expected a list .*use context_dim"),
           ({"cross_attention_dim": [320, 0, 1280]}, r"every entry must be a positive int"),
           ({"context_dim": 2048}, r"give context_dim \(2048, one shared width\) or cross_attention_dim"),
           ({"cross_attention_dim": None}, r"need a context_dim \(or cross_attention_dim, one per level\)")]
    for over, match in bad:
        with pytest.raises(ValueError, match=match):
            zoo.get_config("lbm-unet", **over)
