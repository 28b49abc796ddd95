"""Sana: block and model shapes at tiny configs, multi-scale and square-only modes, full-size meta builds, bad input."""
from __future__ import annotations

import pytest
import torch

import zoo
from layers.mix_ffn import GLUMBConv
from layers.pixart import (
    CaptionEmbedder,
    MultiHeadCrossAttention,
    T2IFinalLayer,
    TimestepEmbedder,
    scale_shift_chunks,
    sincos_pos_embed_2d,
)
from tests.conftest import max_rel_err, randomize
from zoo.sana import SanaConfig, SanaMSBlock

TINY = "tiny-sana"


def tiny(**overrides) -> torch.nn.Module:
    return randomize(zoo.build(TINY, **overrides), seed=0, std=0.1).eval()


def inputs(model, b=2, h=4, w=6, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = model.params
    x = torch.randn(b, p.in_channels, h, w, generator=g)
    y = torch.randn(b, 1, length, p.caption_channels, generator=g)
    return x, torch.tensor([10.0, 900.5])[:b], y


def test_blocks_keep_token_shapes_on_a_non_square_grid():
    x = torch.randn(2, 3 * 5, 32)
    assert GLUMBConv(32, 80)(x, (3, 5)).shape == (2, 15, 32)
    assert MultiHeadCrossAttention(32, 4)(x, torch.randn(2, 7, 32)).shape == (2, 15, 32)
    assert T2IFinalLayer(32, 2, 8)(x, torch.randn(2, 32)).shape == (2, 15, 2 * 2 * 8)
    assert TimestepEmbedder(32)(torch.tensor([1.0, 999.0])).shape == (2, 32)
    assert CaptionEmbedder(24, 32, token_num=9)(torch.randn(2, 7, 24)).shape == (2, 7, 32)
    block = randomize(SanaMSBlock(32, 4, 2.5, qk_norm=True, cross_norm=True, linear_head_dim=8))
    out = block(x, torch.randn(2, 7, 32), torch.randn(2, 6 * 32), torch.ones(2, 7, dtype=torch.bool), (3, 5))
    assert out.shape == (2, 15, 32)


def test_mix_ffn_mixes_neighbouring_tokens_only():
    # the 3x3 depthwise conv is the only spatial mixing: changing one token moves its 3x3 neighbourhood only
    ffn = randomize(GLUMBConv(8, 16), seed=1)
    x = torch.randn(1, 5 * 7, 8)
    x2 = x.clone()
    x2[0, 2 * 7 + 3] += 1.0  # token at row 2, column 3
    moved = (ffn(x2, (5, 7)) - ffn(x, (5, 7))).abs().sum(-1).reshape(5, 7) > 0
    want = torch.zeros(5, 7, dtype=torch.bool)
    want[1:4, 2:5] = True
    assert torch.equal(moved, want)


def test_glumbconv_rejects_tokens_that_do_not_fill_the_grid():
    with pytest.raises(ValueError, match=r"do not fill a 4x4 grid"):
        GLUMBConv(8, 16)(torch.randn(1, 15, 8), (4, 4))


@pytest.mark.parametrize("h,w", [(4, 6), (6, 3)])
def test_multi_scale_model_takes_any_aspect_ratio(h, w):
    model = tiny()
    x, t, y = inputs(model, h=h, w=w)
    with torch.no_grad():
        out = model(x, t, y)
        out_3d = model(x, t, y[:, 0])  # (B, L, C) captions are accepted too
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, out_3d)


def test_pred_sigma_doubles_output_channels_and_patches_unfold():
    model = tiny(pred_sigma=True, patch_size=2)
    x, t, y = inputs(model, h=4, w=8)
    with torch.no_grad():
        assert model(x, t, y).shape == (2, 16, 4, 8)


def test_bfloat16_model_follows_float32():
    model = tiny()
    x, t, y = inputs(model)
    with torch.no_grad():
        want = model(x, t, y)
        got = model.to(torch.bfloat16)(x, t, y)  # inputs are cast to the weights' dtype
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert max_rel_err(got.float(), want) <= 5e-2


def test_position_embedding_follows_the_grid():
    pe = sincos_pos_embed_2d(16, 2, 3, base_size=4)
    assert pe.shape == (6, 16)
    # first half encodes the column, second the row; column 1 of a 3-wide grid sits at 4/3 in base units
    assert torch.allclose(pe[1, 0], torch.sin(torch.tensor(4 / 3)))
    assert torch.allclose(pe[3, 8:], pe[4, 8:]) and not torch.allclose(pe[3, :8], pe[4, :8])
    model = tiny(use_pe=True)
    x, t, y = inputs(model, h=4, w=6)
    with torch.no_grad():
        assert model(x, t, y).shape == x.shape


def test_square_only_original_rejects_other_shapes():
    model = tiny(multi_scale=False, use_pe=True)
    x, t, y = inputs(model, h=8, w=8)
    with torch.no_grad():
        assert model(x, t, y).shape == x.shape
    with pytest.raises(ValueError, match=r"square-only Sana .* expects 8x8"):
        model(*inputs(model, h=4, w=6))
    with pytest.raises(ValueError, match=r"expects 8x8"):
        model(*inputs(model, h=4, w=4))


def test_caption_mask_hides_padded_tokens():
    model = tiny()
    x, t, y = inputs(model, length=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    y_changed = y.clone()
    y_changed[0, 0, 3:] = torch.randn(3, y.shape[-1])  # only padded tokens of sample 0 change
    with torch.no_grad():
        a, b = model(x, t, y, mask=mask), model(x, t, y_changed, mask=mask)
        c = model(x, t, y_changed, mask=mask[:, None, None, :])  # official (B, 1, 1, L) form
        unmasked = model(x, t, y_changed)
    assert torch.allclose(a, b, atol=1e-6) and torch.equal(b, c)
    assert not torch.allclose(unmasked[0], b[0], atol=1e-4)


@pytest.mark.parametrize("name,hidden,depth", [("sana-1600m", 2240, 20), ("sana-600m", 1152, 28)])
def test_full_size_configs_build_on_meta_in_the_official_layout(name, hidden, depth):
    model = zoo.build(name, device="meta")
    sd = model.state_dict()
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert sd["blocks.0.mlp.inverted_conv.conv.weight"].shape == (2 * int(2.5 * hidden), hidden, 1, 1)
    assert sd["blocks.0.mlp.depth_conv.conv.weight"].shape == (2 * int(2.5 * hidden), 1, 3, 3)
    assert sd["x_embedder.proj.weight"].shape == (hidden, 32, 1, 1)
    assert sd["y_embedder.y_proj.fc1.weight"].shape == (hidden, 2304)
    assert sd["y_embedder.y_embedding"].shape == (300, 2304) and sd["pos_embed"].shape == (1, 32 * 32, hidden)
    assert sd["attention_y_norm.weight"].shape == (hidden,)
    assert f"blocks.{depth - 1}.scale_shift_table" in sd and f"blocks.{depth}.scale_shift_table" not in sd
    assert model.blocks[0].attn.heads == hidden // 32  # linear_head_dim 32
    (args, kwargs) = model.example_inputs(height=1024, width=768, device="meta")
    out = zoo.trace(model, *args, max_depth=1, **kwargs).output
    assert out.shape == (1, 32, 32, 24)


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 4, 6\), expected \(B, 8, H, W\)"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match=r"y \(caption\) has shape \(2, 1, 5, 40\), expected \(2, 1, L, 48\)"):
        model(x, t, y[..., :40])
    with pytest.raises(ValueError, match=r"y \(caption\) has shape \(1, 1, 5, 48\)"):
        model(x, t, y[:1])
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\), expected \(2, 5\)"):
        model(x, t, y, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask rows \[1\] keep no caption token"):
        model(x, t, y, mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"timestep has shape \(3,\), expected \(2,\)"):
        model(x, torch.ones(3), y)
    with pytest.raises(ValueError, match=r"multiples of patch_size=2"):
        tiny(patch_size=2)(*inputs(model, h=5, w=6))


def test_scale_shift_table_that_does_not_fit_the_config_is_named():
    model = tiny()
    model.blocks[1].scale_shift_table = torch.nn.Parameter(torch.randn(6, 32))
    with pytest.raises(ValueError, match=r"blocks\.1\.scale_shift_table has shape \(6, 32\), expected \(6, 64\)"):
        model(*inputs(model))
    with pytest.raises(ValueError, match=r"scale_shift_table has shape \(6, 32\) but the timestep conditioning"):
        scale_shift_chunks(torch.randn(6, 32), torch.randn(2, 6 * 64))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by linear_head_dim 32"):
        SanaConfig(hidden_size=100, num_heads=4)
    with pytest.raises(ValueError, match=r"attn_type='flash' is not supported"):
        SanaConfig(attn_type="flash")
    with pytest.raises(ValueError, match="unknown field"):
        zoo.build(TINY, hidden=64)
    # official arguments that do not change the math are accepted and ignored
    assert zoo.get_config({**vars(zoo.get_config(TINY)), "arch": "sana", "drop_path": 0.1,
                           "class_dropout_prob": 0.1, "fp32_attention": True}).hidden_size == 64
