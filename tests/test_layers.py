"""Shared layers against direct re-computations of their formulas."""
from __future__ import annotations

import math

import pytest
import torch

from layers import EmbedND, QKNorm, RMSNorm, attention, rope, timestep_embedding
from layers.rope import apply_rope


def test_timestep_embedding_flux_form_is_cos_then_sin_with_time_factor_1000():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8, time_factor=1000.0, keep_dtype=True)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    for row, tv in zip(emb, t.tolist()):
        want = [math.cos(1000 * tv * f) for f in freqs] + [math.sin(1000 * tv * f) for f in freqs]
        assert torch.allclose(row, torch.tensor(want), atol=1e-4)


def test_timestep_embedding_sd_form_has_no_time_factor_and_stays_float32():
    t = torch.tensor([999, 1], dtype=torch.int64)
    emb = timestep_embedding(t, 6, time_factor=1.0, keep_dtype=False)
    assert emb.dtype == torch.float32
    assert torch.allclose(emb[1, :3], torch.cos(torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])))
    assert emb.shape == (2, 6)
    half = torch.tensor([0.5], dtype=torch.float16)
    assert timestep_embedding(half, 7, time_factor=1000.0, keep_dtype=True).shape == (1, 7)


def test_rope_rotates_pairs_like_complex_multiplication():
    torch.manual_seed(0)
    pos = torch.tensor([[0.0, 3.0, 7.0]])
    q, k = torch.randn(2, 1, 2, 3, 8).unbind(0)
    pe = rope(pos, 8, 10000)[:, None]  # (1, 1, 3, 4, 2, 2)
    q_rot, _ = apply_rope(q, k, pe)
    omega = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angle = pos[0, :, None].double() * omega  # (3, 4)
    qc = torch.view_as_complex(q.double().reshape(1, 2, 3, 4, 2).contiguous())
    want = torch.view_as_real(qc * torch.polar(torch.ones_like(angle), angle)).reshape(q.shape)
    assert torch.allclose(q_rot.double(), want, atol=1e-5)


def test_embednd_rejects_axes_that_do_not_sum_to_head_dim():
    with pytest.raises(ValueError, match="sums to 14, expected the head dim 16"):
        EmbedND(16, 10000, [4, 4, 6])
    with pytest.raises(ValueError, match="2 axes, expected 3"):
        EmbedND(16, 10000, [4, 6, 6])(torch.zeros(1, 5, 2))


def test_attention_matches_explicit_softmax_and_masks_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = (w @ v).permute(0, 2, 1, 3).reshape(2, 5, 32)
    assert torch.allclose(attention(q, k, v), want, atol=1e-5)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    masked = attention(q, k, v, mask=keep[:, None, None, :])
    assert torch.allclose(masked[0], attention(q[:1], k[:1, :, :3], v[:1, :, :3])[0], atol=1e-5)


def test_rmsnorm_and_qknorm_follow_the_formula_in_float32():
    torch.manual_seed(0)
    n = RMSNorm(6)
    with torch.no_grad():
        n.scale.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6) * 100
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * n.scale
    assert torch.allclose(n(x), want, rtol=1e-5)
    y = n(x.half())
    assert y.dtype == torch.float32  # fp16 activations times the fp32 scale promote, as upstream
    q, k = QKNorm(6)(x, x, x.half())
    assert q.dtype == k.dtype == torch.float16
