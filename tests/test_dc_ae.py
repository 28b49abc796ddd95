"""DC-AE against diffusers' AutoencoderDC, converted by diffusers' own single-file converter; key maps; errors."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert.dc_ae import dc_ae_from_diffusers, dc_ae_to_diffusers
from tests.conftest import max_rel_err, randomize

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers  # noqa: E402

EVIT, RES = "EfficientViTBlock", "ResBlock"
# diffusers' constructor arguments for our configs (the released dc-ae-f32c32-sana-1.0-diffusers config first)
PEERS = {
    "dc-ae-f32c32-sana-1.0": dict(
        latent_channels=32, attention_head_dim=32, encoder_block_types=(RES,) * 3 + (EVIT,) * 3,
        decoder_block_types=(RES,) * 3 + (EVIT,) * 3, encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3), encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), downsample_block_type="Conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407),
    "dc-ae-f32c32-mix-1.0": dict(
        latent_channels=32, encoder_block_types=(RES,) * 3 + (EVIT,) * 3, decoder_block_types=(RES,) * 3 + (EVIT,) * 3,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), encoder_layers_per_block=(0, 4, 8, 2, 2, 2),
        decoder_layers_per_block=(0, 5, 10, 2, 2, 2), encoder_qkv_multiscales=((),) * 6,
        decoder_qkv_multiscales=((),) * 6, decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3),
    "tiny-dc-ae": dict(
        latent_channels=8, encoder_block_types=(RES, RES, EVIT, EVIT), decoder_block_types=(RES, RES, EVIT, EVIT),
        encoder_block_out_channels=(16, 32, 64, 64), decoder_block_out_channels=(16, 32, 64, 64),
        encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
        downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407),
    "tiny-dc-ae-mix": dict(
        latent_channels=16, encoder_block_types=(RES, RES, EVIT, EVIT), decoder_block_types=(RES, RES, EVIT, EVIT),
        encoder_block_out_channels=(16, 32, 64, 64), decoder_block_out_channels=(16, 32, 64, 64),
        encoder_layers_per_block=(0, 1, 1, 1), decoder_layers_per_block=(0, 2, 1, 1),
        encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4,
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns=("relu", "relu", "silu", "silu")),
}


def tiny(name: str) -> torch.nn.Module:
    model = randomize(zoo.build(name), seed=1, std=0.1).eval()
    for n, b in model.named_buffers():
        if n.endswith("running_var"):
            b.abs_()  # a variance
    return model


@pytest.mark.parametrize("name", ["tiny-dc-ae", "tiny-dc-ae-mix"])
def test_encode_and_decode_match_diffusers_through_its_single_file_converter(name):
    ours = tiny(name)
    ref = diffusers.AutoencoderDC(**PEERS[name]).eval()
    ref.load_state_dict(convert_autoencoder_dc_checkpoint_to_diffusers(dict(ours.state_dict())), strict=True)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z, z_ref = ours.encode(x), ref.encode(x).latent
        z2 = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        y, y_ref = ours.decode(z2), ref.decode(z2).sample
    assert z.shape == (2, PEERS[name]["latent_channels"], 4, 6) and y.shape == (2, 3, 32, 48)
    assert max_rel_err(z, z_ref) <= 1e-5 and max_rel_err(y, y_ref) <= 1e-5
    assert y.std() > 1e-3  # a live decoder, not a constant


@pytest.mark.parametrize("name", ["tiny-dc-ae", "tiny-dc-ae-mix"])
def test_key_map_equals_diffusers_converter_and_round_trips_bit_exactly(name):
    sd = tiny(name).state_dict()
    ours, theirs = dc_ae_to_diffusers(dict(sd)), convert_autoencoder_dc_checkpoint_to_diffusers(dict(sd))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = dc_ae_from_diffusers(ours)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) and back[k].shape == sd[k].shape for k in sd)


@pytest.mark.parametrize("name", ["dc-ae-f32c32-sana-1.0", "dc-ae-f32c32-mix-1.0"])
def test_full_size_meta_build_equals_diffusers_released_config(name):
    ours = zoo.build(name, device="meta")
    with torch.device("meta"):
        ref = diffusers.AutoencoderDC(**PEERS[name])
    converted = dc_ae_to_diffusers(ours.state_dict())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert ours.scale_factor == ref.config.scaling_factor and ours.downscale == ref.spatial_compression_ratio


def test_bigger_releases_build_on_meta():
    for name, (f, c) in {"dc-ae-f64c128-mix-1.0": (64, 128), "dc-ae-f128c512-mix-1.0": (128, 512)}.items():
        m = zoo.build(name, device="meta")
        assert m.downscale == f and m.latent_channels == c
        assert m.encode(torch.empty(1, 3, f, 2 * f, device="meta")).shape == (1, c, 1, 2)


def test_model_space_scaling_round_trips():
    m = zoo.build("tiny-dc-ae")
    z = torch.randn(1, 8, 2, 2)
    assert torch.allclose(m.to_model_space(z), z * 0.41407)
    assert torch.allclose(m.from_model_space(m.to_model_space(z)), z)


def test_bad_inputs_and_configs_name_what_is_expected():
    m = zoo.build("tiny-dc-ae")
    with pytest.raises(ValueError, match=r"image has shape \(1, 3, 30, 32\); expected \(B, 3, H, W\) with H and W "
                                         "multiples of 8"):
        m.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"latent has shape \(1, 4, 2, 2\); expected \(B, 8, H, W\)"):
        m.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="must be a float tensor"):
        m.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"block_type: \['Bogus'\] not supported; expected one of"):
        zoo.build("tiny-dc-ae", encoder={"block_type": "Bogus", "width_list": [16, 32], "depth_list": [1, 1]})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['widths'\]"):
        zoo.build("tiny-dc-ae", decoder={"widths": [1]})


def test_checkpoints_convert_detects_and_converts_both_layouts():
    import checkpoints_convert as cc

    sd = tiny("tiny-dc-ae-mix").state_dict()
    assert cc.detect(sd).family == "dc_ae" and cc.detect(sd).layout == "official"
    d = dict(cc.convert(sd, to="diffusers"))
    assert cc.detect(d).layout == "diffusers"
    back = dict(cc.convert(d, to="official"))
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
