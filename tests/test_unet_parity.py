"""UNet against diffusers' UNet2DConditionModel on the same random weights, through our key map."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert import KeyMapError
from checkpoints_convert.unet import unet_from_diffusers, unet_to_diffusers
from layers.embeddings import timestep_embedding
from tests.conftest import max_rel_err, randomize, sd15_like, sdxl_like  # noqa: F401 (imported from here too)

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd15_ref(unet_peers):
    return unet_peers["tiny-unet"]


@pytest.fixture(scope="module")
def sdxl_ref(unet_peers):
    return unet_peers["tiny-sdxl"]


def loaded(name, ref):
    ours = zoo.build(name).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict()), strict=True)
    return ours


def test_sd15_like_unet_matches_diffusers(sd15_ref):
    ref = sd15_ref
    ours = loaded("tiny-unet", ref)
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=c).sample
        got = ours(x, t, context=c)
    assert got.shape == want.shape == (2, 4, 16, 8)
    assert max_rel_err(got, want) <= 1e-5


def test_sd15_like_control_and_features_match_diffusers_residual_inputs(sd15_ref):
    ref = sd15_ref
    ours = loaded("tiny-unet", ref)
    g = torch.Generator().manual_seed(1)
    x, c, t = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([3.0, 400.0])
    pts = ours.injection_points()
    ctrl = [torch.randn(2, p.channels, 16 // p.stride, 8 // p.stride, generator=g) for p in pts]
    # T2I-Adapter style: one map after the last res block of each level (input blocks 1, 3 and 5 here)
    feats = {i: torch.randn(2, pts[i].channels, 16 // pts[i].stride, 8 // pts[i].stride, generator=g)
             for i in (1, 3, 5)}
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=c, down_block_additional_residuals=tuple(ctrl[:-1]),
                   mid_block_additional_residual=ctrl[-1]).sample
        got = ours(x, t, context=c, control=ctrl)
        assert max_rel_err(got, want) <= 1e-5
        want = ref(x, t, encoder_hidden_states=c,
                   down_intrablock_additional_residuals=[v.clone() for v in feats.values()]).sample
        got = ours(x, t, context=c, features=feats)
        assert max_rel_err(got, want) <= 1e-5


def test_sdxl_like_unet_with_text_time_and_y_matches_diffusers(sdxl_ref):
    ref = sdxl_ref
    ours = loaded("tiny-sdxl", ref)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 48, generator=g)
    te = torch.randn(2, 16, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 2, 4, 32, 48]])  # original size, crop, target size
    # the official y: pooled text, then each size/crop number's 4-d sinusoidal embedding
    y = torch.cat([te, timestep_embedding(ids.flatten(), 4, time_factor=1.0, keep_dtype=False).reshape(2, -1)], 1)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=c, added_cond_kwargs={"text_embeds": te, "time_ids": ids}).sample
        got = ours(x, t, context=c, y=y)
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-sdxl", "sd15"])
def test_unet_key_map_round_trips_bit_exactly(name):
    over = {"model_channels": 32, "context_dim": 32} if name == "sd15" else {}
    sd = randomize(zoo.build(name, **over), seed=3).state_dict()
    back = unet_from_diffusers(unet_to_diffusers(sd))
    assert sorted(back) == sorted(sd)
    assert all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name, over, dconfig", [
    ("sd15", {"model_channels": 32, "context_dim": 32}, {"layers_per_block": 2}),
    ("sdxl-base", {"model_channels": 32, "context_dim": 32, "num_head_channels": 16, "adm_in_channels": 24},
     {"layers_per_block": 2, "addition_embed_type": "text_time"}),
])
def test_unet_to_diffusers_equals_diffusers_convert_ldm_unet_checkpoint(name, over, dconfig):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = zoo.build(name, device="meta", **over)  # the full layout (depths, blocks) at a small width
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g, dtype=torch.float16) for k, v in model.state_dict().items()}
    ours = unet_to_diffusers(dict(sd))
    theirs = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in sd.items()}, dconfig)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_unet_key_map_reports_leftover_and_missing_keys():
    sd = zoo.build("tiny-unet", device="meta").state_dict()
    with pytest.raises(KeyMapError, match=r"match no entry.*input_blocks\.1\.0\.extra\.weight"):
        unet_to_diffusers({**sd, "input_blocks.1.0.extra.weight": torch.zeros(1)})
    del sd["input_blocks.1.1.proj_out.weight"]
    with pytest.raises(KeyMapError, match=r"missing 1 key.*input_blocks\.1\.1\.proj_out\.weight"):
        unet_to_diffusers(sd)
