"""Flux against diffusers' FluxTransformer2DModel on the same random weights, through our key map."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert import KeyMapError, flux_from_diffusers, flux_to_diffusers
from tests.conftest import FLUX_TINY as TINY
from tests.conftest import max_rel_err, randomize
from zoo.flux import img_ids, txt_ids

pytest.importorskip("diffusers")
# diffusers' own converter vs ours at full width: tests/test_convert.py (one test for it, not two)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_matches_diffusers_on_converted_weights(guidance, flux_peer):
    ref = flux_peer(guidance)
    ours = zoo.build({"arch": "flux", **TINY, "guidance_embed": guidance}).eval()
    ours.load_state_dict(flux_from_diffusers(ref.state_dict()), strict=True)

    g = torch.Generator().manual_seed(0)
    b, lh, lw, lt = 2, 8, 6, 7
    img = torch.randn(b, (lh // 2) * (lw // 2), 16, generator=g)
    txt = torch.randn(b, lt, 40, generator=g)
    y = torch.randn(b, 24, generator=g)
    t = torch.tensor([0.3, 0.9])
    gd = torch.tensor([3.5, 1.0]) if guidance else None
    iid, tid = img_ids(b, lh, lw), txt_ids(b, lt)
    # give text tokens non-zero positions too, so a swapped id axis cannot hide
    tid[..., 1] = torch.arange(lt, dtype=torch.float32)
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                   img_ids=iid[0], txt_ids=tid[0], guidance=gd, return_dict=False)[0]
        got = ours(img, iid, txt, tid, t, y, guidance=gd)
    assert got.shape == want.shape == (b, 12, 16)
    assert max_rel_err(got, want) <= 1e-5


def test_flux_key_map_round_trips_bit_exactly():
    sd = randomize(zoo.build({"arch": "flux", **TINY, "guidance_embed": True}), seed=3).state_dict()
    back = flux_from_diffusers(flux_to_diffusers(sd))
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_flux_key_map_reports_leftover_and_missing_keys():
    sd = zoo.build({"arch": "flux", **TINY, "guidance_embed": False}, device="meta").state_dict()
    with pytest.raises(KeyMapError, match=r"match no entry.*double_blocks\.0\.extra\.weight"):
        flux_to_diffusers({**sd, "double_blocks.0.extra.weight": torch.zeros(1)})
    del sd["double_blocks.1.img_attn.proj.weight"]
    with pytest.raises(KeyMapError, match=r"missing 1 key.*double_blocks\.1\.img_attn\.proj\.weight"):
        flux_to_diffusers(sd)
