"""DiT360 circular padding: the pipeline-style pad/crop helpers and the per-forward wrap of `circular_pad`."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

import zoo
from tests.conftest import randomize
from zoo.panorama import crop_panorama, pad_panorama

H, W = 3, 6  # token grid (latent 6 x 12)


def roll_cols(x: torch.Tensor, k: int, width: int = W) -> torch.Tensor:
    """Roll (B, h*w, C) tokens by k grid columns."""
    return rearrange(torch.roll(rearrange(x, "b (h w) c -> b h w c", w=width), k, dims=2), "b h w c -> b (h w) c")


def grid(x: torch.Tensor, width: int) -> torch.Tensor:
    return rearrange(x, "b (h w) c -> b h w c", w=width)


@pytest.fixture(scope="module")
def models():
    plain = randomize(zoo.build("tiny-flux"), seed=4).eval()
    wrapped = zoo.build("tiny-flux", circular_pad=1).eval()
    wrapped.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    args, kwargs = plain.example_inputs(batch=1, height=8 * 2 * H, width=8 * 2 * W, txt_len=4)
    return plain, wrapped, args, kwargs


def test_pad_copies_opposite_edge_tokens_and_their_ids_and_crop_undoes_it():
    x = torch.randn(2, H * W, 5)
    ids = zoo.flux.img_ids(2, 2 * H, 2 * W)
    px, pids = pad_panorama(x, ids, W, pad=2)
    gx, gids = grid(px, W + 4), grid(pids, W + 4)
    assert torch.equal(gx[:, :, :2], grid(x, W)[:, :, -2:]) and torch.equal(gx[:, :, -2:], grid(x, W)[:, :, :2])
    assert gids[0, 0, :, 2].tolist() == [4, 5, 0, 1, 2, 3, 4, 5, 0, 1]
    assert torch.equal(crop_panorama(px, W, pad=2), x)
    with pytest.raises(ValueError, match=r"pad must be in \[1, 6\]"):
        pad_panorama(x, ids, W, pad=7)


def test_per_forward_wrap_equals_padding_once_around_the_plain_model(models):
    plain, wrapped, (img, iid, txt, tid, t, y), kw = models
    pimg, pids = pad_panorama(img, iid, W)
    want = crop_panorama(plain(pimg, pids, txt, tid, t, y, **kw), W)
    assert torch.allclose(wrapped(img, iid, txt, tid, t, y, **kw), want, atol=1e-6)


def test_padded_edge_copies_stay_identical_through_a_forward(models):
    plain, _, (img, iid, txt, tid, t, y), kw = models
    pimg, pids = pad_panorama(img, iid, W)
    out = grid(plain(pimg, pids, txt, tid, t, y, **kw), W + 2)
    assert torch.allclose(out[:, :, 0], out[:, :, W], atol=1e-6)  # left pad = copy of the last column
    assert torch.allclose(out[:, :, -1], out[:, :, 1], atol=1e-6)  # right pad = copy of the first column


@pytest.mark.parametrize("k", [1, 2, 5])
def test_rolling_the_panorama_rolls_the_output(models, k):
    plain, wrapped, (img, iid, txt, tid, t, y), kw = models
    out = wrapped(img, iid, txt, tid, t, y, **kw)
    rolled = wrapped(roll_cols(img, k), roll_cols(iid, k), txt, tid, t, y, **kw)
    assert torch.allclose(rolled, roll_cols(out, k), atol=1e-5)
    # padding by storage order instead (the pipeline helper applied to the rolled grid) is not roll-equivariant
    p_img, p_ids = pad_panorama(roll_cols(img, k), roll_cols(iid, k), W)
    by_storage = crop_panorama(plain(p_img, p_ids, txt, tid, t, y, **kw), W)
    assert not torch.allclose(by_storage, roll_cols(out, k), atol=1e-4)


def test_circular_pad_needs_a_grid_at_least_that_wide(models):
    _, _, (img, iid, txt, tid, t, y), kw = models
    too_wide = zoo.build("tiny-flux", circular_pad=7)
    with pytest.raises(ValueError, match="circular_pad=7 needs a row-major token grid at least 7 wide"):
        too_wide(img, iid, txt, tid, t, y, **kw)


def test_circular_pad_builds_dit360_a_flux_with_the_same_keys_whose_forward_is_flux_s(models):
    plain, wrapped, _, _ = models
    assert type(plain) is zoo.flux.Flux and isinstance(wrapped, zoo.panorama.DiT360)
    assert isinstance(wrapped, zoo.flux.Flux) and wrapped.state_dict().keys() == plain.state_dict().keys()
    assert zoo.panorama.DiT360.forward is not zoo.flux.Flux.forward


def test_full_size_dit360_traces_on_meta_given_the_grid_width():
    model = zoo.build("dit360", device="meta")
    args, kwargs = zoo.example_inputs(model, height=512, width=1024, txt_len=8, device="meta")
    assert kwargs["width"] == 64
    t = zoo.trace(model, *args, max_depth=1, **kwargs)
    assert t.output.shape == (1, 32 * 64, 64) and t["img_in"].inputs == [(1, 32 * 66, 64)]  # one column each side
    kwargs.pop("width")
    with pytest.raises(ValueError, match="cannot be read off meta position ids.*pass width="):
        model(*args, **kwargs)
