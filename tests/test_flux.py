"""Flux at tiny size: shapes block by block, full-size layout against the official manifests, bad input."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.conftest import manifest
from zoo.flux import DoubleStreamBlock, LastLayer, SingleStreamBlock, img_ids, pack, txt_ids, unpack


@pytest.fixture(scope="module")
def tiny(tiny_flux):
    return tiny_flux


def inputs(model, b=2, lh=8, lw=12, lt=5):
    torch.manual_seed(0)
    return model.example_inputs(batch=b, height=8 * lh, width=8 * lw, txt_len=lt)


def test_blocks_keep_stream_shapes():
    torch.manual_seed(0)
    img, txt, vec = torch.randn(2, 24, 64), torch.randn(2, 5, 64), torch.randn(2, 64)
    pe = zoo.build("tiny-flux").pe_embedder(torch.cat([txt_ids(2, 5), img_ids(2, 8, 12)], dim=1))
    assert pe.shape == (2, 1, 29, 8, 2, 2)  # head dim 16 -> 8 rotation pairs
    i2, t2 = DoubleStreamBlock(64, 4, 4.0, qkv_bias=True)(img, txt, vec, pe)
    assert i2.shape == img.shape and t2.shape == txt.shape
    x = SingleStreamBlock(64, 4, 4.0)(torch.cat([txt, img], 1), vec, pe)
    assert x.shape == (2, 29, 64)
    assert LastLayer(64, 1, 16)(img, vec).shape == (2, 24, 16)


def test_tiny_flux_forward_shape_and_trace(tiny):
    args, kwargs = inputs(tiny)
    out = tiny(*args, **kwargs)
    assert out.shape == (2, 24, 16) and torch.isfinite(out).all()
    t = zoo.trace(tiny, *args, **kwargs)
    assert t["double_blocks.0"].inputs[:2] == [(2, 24, 64), (2, 5, 64)]
    assert t["single_blocks.1"].outputs == [(2, 29, 64)]
    assert t["final_layer"].outputs == [(2, 24, 16)]
    assert t[""].params == sum(p.numel() for p in tiny.parameters())


def test_text_position_ids_change_the_output(tiny):
    (img, iid, txt, tid, t, y), kw = inputs(tiny)
    moved = tid.clone()
    moved[..., 1] = 3.0
    assert not torch.allclose(tiny(img, iid, txt, tid, t, y, **kw), tiny(img, iid, txt, moved, t, y, **kw))


def test_pack_unpack_round_trip_and_channel_order():
    x = torch.randn(2, 16, 6, 10)
    tokens = pack(x)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack(tokens, 6, 10), x)
    # channel-major 2x2 patches: token 0 holds (c, dy, dx) at index c*4 + dy*2 + dx
    assert torch.equal(tokens[0, 0, 5 * 4 + 1 * 2 + 0], x[0, 5, 1, 0])
    ids = img_ids(1, 6, 10)
    assert ids.shape == (1, 15, 3) and ids[0, 6].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("name, manifest_name", [("flux-dev", "flux1-dev"), ("flux-schnell", "flux1-schnell"),
                                                 ("dit360", "flux1-dev")])
def test_full_size_meta_build_equals_official_manifest(name, manifest_name):
    want = manifest(manifest_name)
    sd = zoo.build(name, device="meta").state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == {k: s for k, (s, _) in want.items()}
    if manifest_name == "flux1-dev":
        assert len(sd) == 780
        assert round(sum(v.numel() for v in sd.values()) / 1e9, 2) == 11.90


def test_bad_inputs_get_clear_errors(tiny):
    (img, iid, txt, tid, t, y), kw = inputs(tiny)
    cases = [
        (lambda: tiny(img[0], iid, txt, tid, t, y, **kw), r"img and txt must be \(B, L, C\).*img \(24, 16\)"),
        (lambda: tiny(torch.randn(2, 24, 12), iid, txt, tid, t, y, **kw), r"img has 12 channels.*in_channels=16"),
        (lambda: tiny(img, iid, txt[..., :8], tid, t, y, **kw), r"txt has 8 features.*context_in_dim=48"),
        (lambda: tiny(img, iid[:, :20], txt, tid, t, y, **kw), r"img_ids has shape \(2, 20, 3\), expected"),
        (lambda: tiny(img, iid, txt, tid[..., :2], t, y, **kw), r"txt_ids .* expected \(2, 5, 3\)"),
        (lambda: tiny(img, iid, txt, tid, t, y[:, :7], **kw), r"y has shape \(2, 7\), expected \(2, 32\)"),
        (lambda: tiny(img, iid, txt, tid, t[:1].repeat(3), y, **kw), r"timesteps has shape \(3,\)"),
        (lambda: tiny(img, iid, txt, tid, t, y), r"guidance embedding.*pass guidance="),
        (lambda: tiny(img, iid, txt[:1], tid[:1], t, y, **kw), r"txt has batch 1, img has batch 2"),
        (lambda: pack(torch.randn(1, 4, 5, 6)), r"even H and W, got \(1, 4, 5, 6\)"),
        (lambda: unpack(img, 8, 8), r"tokens \(2, 24, 16\) do not fit an even latent of 8x8"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_scalar_timestep_and_guidance_and_2d_ids_broadcast(tiny):
    (img, iid, txt, tid, t, y), _ = inputs(tiny)
    full = tiny(img, iid, txt, tid, torch.full((2,), 0.5), y, guidance=torch.full((2,), 3.5))
    short = tiny(img, iid[0], txt, tid[0], torch.tensor(0.5), y, guidance=3.5)
    assert torch.allclose(full, short)


def test_inference_path_of_the_single_block_is_bit_identical_to_the_training_path(tiny):
    # under no_grad the single block reuses linear1's output buffer (GELU in place, attention written over v)
    args, kwargs = inputs(tiny)
    with torch.no_grad():
        lean = tiny(*args, **kwargs)
    assert torch.equal(lean, tiny(*args, **kwargs).detach())
