"""Attention capture: probabilities per transformer block, rows summing to 1, outputs unchanged, opt-in only."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.conftest import randomize
from zoo.attention_capture import capture_attention


@pytest.fixture(scope="module")
def setup():
    m = randomize(zoo.build("tiny-unet"), seed=11, std=0.05).eval()
    (x, t), kw = m.example_inputs(batch=2, height=64, width=32, txt_len=7)
    return m, x, t, kw


def test_cross_attention_maps_have_the_right_shapes_rows_sum_to_one_and_outputs_are_unchanged(setup):
    m, x, t, kw = setup
    with torch.no_grad():
        off = m(x, t, **kw)
        with capture_attention(m) as maps:
            on = m(x, t, **kw)
    assert torch.equal(on, off)
    # tiny-unet: transformers in input blocks 1 (stride 1) and 3 (stride 2), the middle (4), output blocks 2-5
    assert len(maps) == 2 + 1 + 4 and all(k.endswith("attn2") for k in maps)
    for path, probs in maps.items():
        assert len(probs) == 1
        p = probs[0]
        block = m.get_submodule(path.rsplit(".transformer_blocks", 1)[0])
        st = {"input_blocks.1.1": 1, "input_blocks.3.1": 2, "middle_block.1": 4}.get(path.split(".transformer")[0])
        if st is not None:
            assert p.shape[2] == (8 // st) * (4 // st), path
        assert p.shape[0] == 2 and p.shape[1] == block.transformer_blocks[0].attn2.heads and p.shape[3] == 7
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
        assert (p >= 0).all()


def test_self_attention_capture_and_the_default_path_records_nothing(setup):
    m, x, t, kw = setup
    with torch.no_grad(), capture_attention(m, which="self") as maps:
        m(x, t, **kw)
        m(x, t, **kw)
    p = maps["input_blocks.1.1.transformer_blocks.0.attn1"]
    assert len(p) == 2 and p[0].shape == (2, 2, 32, 32)
    assert all(a.capture is None for a in m.modules() if hasattr(a, "capture"))
    with pytest.raises(ValueError, match="which='all'"):
        with capture_attention(m, which="all"):
            pass


def test_captured_maps_equal_an_explicit_softmax_of_the_projected_queries_and_keys(setup):
    m, x, t, kw = setup
    st = m.middle_block[1]
    attn = st.transformer_blocks[0].attn2
    seen = {}
    hook = st.transformer_blocks[0].norm2.register_forward_hook(lambda mod, args, out: seen.update(h=out))
    try:
        with torch.no_grad(), capture_attention(m) as maps:
            m(x, t, **kw)
    finally:
        hook.remove()
    q = attn.to_q(seen["h"]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, H, L, D)
    k = attn.to_k(kw["context"]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    want = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    torch.testing.assert_close(maps["middle_block.1.transformer_blocks.0.attn2"][0], want, atol=1e-5, rtol=1e-5)
