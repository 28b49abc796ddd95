"""AutoencoderKL against diffusers' AutoencoderKL on the same random weights, through our key map."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert import KeyMapError, autoencoder_from_diffusers, autoencoder_to_diffusers
from tests.conftest import max_rel_err, randomize

diffusers = pytest.importorskip("diffusers")

LAYOUTS = {"ldm": ("tiny-vae", 4, True), "bfl": ("tiny-vae-flux", 16, False)}  # config, latent channels, quant convs


def peer(layout: str) -> torch.nn.Module:
    _, latent, quant = LAYOUTS[layout]
    m = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=latent,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=quant, use_post_quant_conv=quant)
    return randomize(m, seed=1, std=0.1).eval()


@pytest.mark.parametrize("layout", ["ldm", "bfl"])
def test_encode_and_decode_match_diffusers_on_converted_weights(layout):
    ref = peer(layout)
    ours = zoo.build(LAYOUTS[layout][0]).eval()
    ours.load_state_dict(autoencoder_from_diffusers(ref.state_dict()), strict=True)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want_post = ref.encode(x).latent_dist
        got_post = ours.encode(x)
        want, got = ref.decode(want_post.mean).sample, ours.decode(want_post.mean)
        want_sample = want_post.sample(torch.Generator().manual_seed(5))
    assert got_post.mean.shape == (2, LAYOUTS[layout][1], 4, 6) and got.shape == want.shape == (2, 3, 32, 48)
    assert max_rel_err(got_post.mean, want_post.mean) <= 1e-5
    assert max_rel_err(got_post.logvar, want_post.logvar) <= 1e-5
    assert max_rel_err(got, want) <= 1e-5
    assert max_rel_err(got_post.sample(torch.Generator().manual_seed(5)), want_sample) <= 1e-5


@pytest.mark.parametrize("name", ["tiny-vae", "tiny-vae-flux"])
def test_key_map_round_trips_bit_exactly(name):
    sd = randomize(zoo.build(name), seed=3).state_dict()
    d = autoencoder_to_diffusers(sd)
    assert d["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)  # Linear in diffusers
    back = autoencoder_from_diffusers(d)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("name", ["vae-sd", "vae-flux", "tiny-vae"])
def test_to_diffusers_equals_diffusers_own_conversion(name):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model = zoo.build(name, device="meta")
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g, dtype=torch.float16) for k, v in model.state_dict().items()}
    levels = len(model.params.ch_mult)
    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    theirs = convert_ldm_vae_checkpoint(dict(sd), config)
    ours = autoencoder_to_diffusers(dict(sd))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k])


def test_converted_full_size_keys_are_exactly_diffusers_model_keys():
    sd = zoo.build("vae-flux", device="meta").state_dict()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in autoencoder_to_diffusers(sd).items()} == want


def test_key_map_reports_leftover_missing_and_misshaped_keys():
    sd = zoo.build("tiny-vae", device="meta").state_dict()
    with pytest.raises(KeyMapError, match=r"match no entry.*decoder\.mid\.attn_2\.q\.weight"):
        autoencoder_to_diffusers({**sd, "decoder.mid.attn_2.q.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["encoder.mid.attn_1.k.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(KeyMapError, match=r"encoder\.mid\.attn_1\.k\.weight: shape \(64, 64, 3, 3\)"):
        autoencoder_to_diffusers(bad)
    del sd["decoder.up.1.upsample.conv.weight"]
    with pytest.raises(KeyMapError, match=r"missing 1 key.*decoder\.up\.1\.upsample\.conv\.weight"):
        autoencoder_to_diffusers(sd)
