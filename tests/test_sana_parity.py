"""Sana against diffusers' SanaTransformer2DModel on the same random weights, through our key map."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert import KeyMapError, sana_from_diffusers, sana_to_diffusers
from tests.conftest import max_rel_err, randomize

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers  # noqa: E402

TINY = dict(arch="sana", input_size=8, in_channels=8, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.5,
            pred_sigma=False, caption_channels=24, model_max_length=7, linear_head_dim=8, y_norm=True)


def peer(patch_size: int, qk_norm: bool, use_pe: bool) -> torch.nn.Module:
    m = diffusers.SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        mlp_ratio=2.5, sample_size=8, patch_size=patch_size, qk_norm="rms_norm_across_heads" if qk_norm else None,
        interpolation_scale=1.0 if use_pe else None)
    return randomize(m, seed=1, std=0.1).eval()


def ours(patch_size: int, qk_norm: bool, use_pe: bool) -> torch.nn.Module:
    return zoo.build({**TINY, "patch_size": patch_size, "qk_norm": qk_norm, "cross_norm": qk_norm,
                      "use_pe": use_pe, "integer_timesteps": False}).eval()  # diffusers' continuous timesteps


@pytest.mark.parametrize("patch_size,qk_norm,use_pe", [(1, False, False), (2, True, False), (1, False, True)])
def test_sana_matches_diffusers_on_converted_weights(patch_size, qk_norm, use_pe):
    ref = peer(patch_size, qk_norm, use_pe)
    model = ours(patch_size, qk_norm, use_pe)
    model.load_state_dict(sana_from_diffusers(ref.state_dict(), sample_size=8, model_max_length=7), strict=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 12, generator=g)  # a non-square latent: the multi-scale path
    y = torch.randn(2, 7, 24, generator=g) * 3
    t = torch.tensor([3.7, 817.2])  # continuous timesteps
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        outs = {}
        for name, m in (("none", None), ("mask", mask)):
            want = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=m, return_dict=False)[0]
            got = model(x, t, y[:, None], mask=m)  # official (B, 1, L, C) captions
            assert got.shape == want.shape == (2, 8, 8, 12)
            assert max_rel_err(got, want) <= 1e-5, name
            assert max_rel_err(got[1], want[1]) <= 1e-5, name  # sample 1 is the one with padded caption tokens
            outs[name] = got
    assert max_rel_err(outs["mask"][1], outs["none"][1]) > 1e-3  # the mask did change the masked sample


def test_official_default_truncates_timesteps_to_integers_as_sana_ms_does():
    ref = peer(1, False, True)
    sd = sana_from_diffusers(ref.state_dict(), sample_size=8, model_max_length=7)
    official = zoo.build({**TINY, "patch_size": 1}).eval()  # integer_timesteps defaults to the official True
    official.load_state_dict(sd, strict=True)
    continuous = ours(1, False, True)
    continuous.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(1, 8, 8, 12, generator=g), torch.randn(1, 7, 24, generator=g) * 3  # not the stored-pe size
    with torch.no_grad():
        at_937 = ref(x, encoder_hidden_states=y, timestep=torch.tensor([937.0]), return_dict=False)[0]
        got = official(x, torch.tensor([937.6]), y[:, None])
        assert torch.equal(got, official(x, torch.tensor([937.0]), y[:, None]))
        assert max_rel_err(got, at_937) <= 1e-5  # SanaMS at 937.6 = diffusers at 937
        assert max_rel_err(continuous(x, torch.tensor([937.6]), y[:, None]), got) > 1e-3


def test_sana_key_map_round_trips_bit_exactly():
    sd = randomize(ours(2, True, False), seed=3).state_dict()
    extras = {k: sd[k] for k in ("pos_embed", "y_embedder.y_embedding")}
    back = sana_from_diffusers(sana_to_diffusers(sd), sample_size=8, model_max_length=7, extras=extras)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_sana_to_diffusers_equals_diffusers_own_conversion():
    sd = randomize(ours(1, False, False), seed=4).state_dict()
    theirs = convert_sana_transformer_to_diffusers(dict(sd))
    mine = sana_to_diffusers(dict(sd))
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k


@pytest.mark.parametrize("name,heads,cross_heads", [("sana-1600m", 70, 20), ("sana-600m", 36, 16)])
def test_full_size_official_layout_converts_to_diffusers_exactly(name, heads, cross_heads):
    hidden = heads * 32
    model = zoo.build(name, device="meta")
    sd = model.state_dict()
    leftover = dict(sd)
    converted = convert_sana_transformer_to_diffusers(leftover)  # pops what it consumes
    assert leftover == {}, f"keys diffusers did not consume: {sorted(leftover)[:10]}"
    with torch.device("meta"):
        ref = diffusers.SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_attention_heads=heads, attention_head_dim=32,
            num_layers=model.params.depth, num_cross_attention_heads=cross_heads,
            cross_attention_head_dim=hidden // cross_heads, cross_attention_dim=hidden, caption_channels=2304,
            mlp_ratio=2.5, sample_size=32, patch_size=1)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert {k: tuple(v.shape) for k, v in sana_to_diffusers(sd).items()} == want


def test_sana_key_map_reports_leftover_and_missing_keys():
    sd = ours(1, False, False).state_dict()
    with pytest.raises(KeyMapError, match=r"match no entry.*blocks\.0\.extra\.weight"):
        sana_to_diffusers({**sd, "blocks.0.extra.weight": torch.zeros(1)})
    del sd["blocks.1.cross_attn.proj.weight"]
    with pytest.raises(KeyMapError, match=r"missing 1 key.*blocks\.1\.cross_attn\.proj\.weight"):
        sana_to_diffusers(sd)
    del sd["blocks.0.scale_shift_table"]
    with pytest.raises(KeyMapError, match=r"missing 1 key.*blocks\.0\.scale_shift_table"):
        sana_to_diffusers(sd)
