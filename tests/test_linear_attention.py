"""Sana's ReLU linear attention against a direct float64 computation, and its half-precision behaviour."""
from __future__ import annotations

import pytest
import torch

from layers.linear_attention import EPS, LiteLA, linear_attention
from tests.conftest import max_rel_err, randomize


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The formula written out token by token in float64: an explicit (N, N) kernel matrix, no padding trick."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.relu(q) @ torch.relu(k).transpose(-1, -2)  # (B, H, N, N) non-negative kernel
    out = (scores @ v) / (scores.sum(-1, keepdim=True) + eps)  # (B, H, N, D)
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d)


def heads(b=2, h=3, n=50, d=8, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) * scale for _ in range(3)]


def test_linear_attention_matches_float64_formula():
    q, k, v = heads()
    got = linear_attention(q, k, v)
    assert got.shape == (2, 50, 24) and got.dtype == torch.float32
    assert max_rel_err(got.double(), reference(q, k, v)) <= 1e-5


def test_linear_attention_rows_are_convex_combinations_of_values():
    q, k, v = heads(seed=1)
    out = linear_attention(q, k, torch.ones_like(v))  # weights are non-negative and normalised: ones stay ones
    rows_with_mass = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)).sum(-1).permute(0, 2, 1) > 1e-3  # (B, N, H)
    ones = out.reshape(2, 50, 3, 8)[rows_with_mass]
    assert torch.allclose(ones, torch.ones_like(ones), atol=1e-5)


def test_query_with_no_relu_features_outputs_zero():
    # a query whose ReLU features are zero attends to nothing: numerator and normaliser are both 0 -> output 0
    q, k, v = heads(b=1, h=1, n=4, d=2, seed=2)
    q[0, 0, 0] = -1.0
    assert torch.equal(linear_attention(q, k, v)[0, 0], torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_float32_and_do_not_overflow(dtype):
    # |q.k| ~ 100 * 100 * 32 = 3e5 per pair and sums over 2048 tokens: far beyond fp16's 65504
    q, k, v = heads(b=1, h=2, n=2048, d=32, scale=100.0, seed=3)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    got = linear_attention(q, k, v)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = linear_attention(q.float(), k.float(), v.float())
    assert max_rel_err(got.float(), want) <= 1e-2


def test_litela_module_keys_shapes_and_qk_norm():
    plain = LiteLA(64, heads=4)
    assert sorted(plain.state_dict()) == ["proj.bias", "proj.weight", "qkv.weight"]  # qkv without bias
    normed = randomize(LiteLA(64, heads=4, qk_norm=True), seed=1)
    assert {"q_norm.weight", "k_norm.weight"} <= set(normed.state_dict())
    x = torch.randn(2, 30, 64)
    assert normed(x).shape == (2, 30, 64)
    # the module is the function applied to its projections
    q, k, v = normed.qkv(x).chunk(3, dim=-1)
    q, k = normed.q_norm(q), normed.k_norm(k)
    split = lambda t: t.reshape(2, 30, 4, 16).transpose(1, 2)
    want = normed.proj(reference(split(q), split(k), split(v)).float())
    assert max_rel_err(normed(x), want) <= 1e-5


def test_litela_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by heads"):
        LiteLA(60, heads=8)
