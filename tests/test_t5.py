"""T5 v1.1 encoder: parity with transformers' T5EncoderModel (tiny configs), fp16 clamp, tied-embedding loads."""
from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, randomize

import zoo
from zoo.t5 import T5Encoder

transformers = pytest.importorskip("transformers", reason="transformers is the parity peer")

# few buckets and a short max distance, so 20 tokens reach the logarithmic and the saturated buckets
TINY = dict(
    vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=10, feed_forward_proj="gated-gelu",
)


def pair(**overrides) -> tuple[T5Encoder, torch.nn.Module]:
    hf_cfg = transformers.T5Config(**{**TINY, **overrides}, attn_implementation="eager")
    peer = randomize(transformers.T5EncoderModel(hf_cfg).eval(), seed=2)
    ours = zoo.build({"arch": "t5_encoder", **hf_cfg.to_dict()}).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def ids_and_mask(L: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (2, L), generator=g)
    ids[0, 11], ids[0, 12:] = 1, 0  # EOS then padding
    ids[1, -1] = 1
    return ids, (ids != 0).long()


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_t5_matches_transformers_with_and_without_mask(ffn):
    ours, peer = pair(feed_forward_proj=ffn)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        assert max_rel_err(ours(ids, mask), peer(ids, attention_mask=mask).last_hidden_state) <= 1e-5
        assert max_rel_err(ours(ids), peer(ids).last_hidden_state) <= 1e-5  # Flux passes no mask


def test_t5_state_dict_is_the_transformers_one_and_a_file_with_one_embedding_loads():
    ours, peer = pair()
    assert list(ours.state_dict()) == list(peer.state_dict())
    assert ours.shared.weight is ours.encoder.embed_tokens.weight
    sd = {k: v.clone() for k, v in peer.state_dict().items() if k != "encoder.embed_tokens.weight"}
    fresh = zoo.build({"arch": "t5_encoder", **TINY})
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.encoder.embed_tokens.weight, sd["shared.weight"])


def test_t5_fp16_clamps_large_activations_like_transformers():
    ours, peer = pair()
    with torch.no_grad():  # huge FFN outputs: fp16 overflows to inf without the clamp
        for m in (ours, peer):
            for name, p in m.named_parameters():
                if name.endswith(("wo.weight", "wi_1.weight")):
                    p.mul_(1000.0)
    ours, peer = ours.half(), peer.half()
    ids, mask = ids_and_mask(12)
    with torch.no_grad():
        x = ours.shared(ids)
        bias = ours.encoder.block[0].layer[0].SelfAttention.compute_bias(12).half()
        raw = ours.encoder.block[0].layer[1](ours.encoder.block[0].layer[0](x, bias))
        assert torch.isinf(raw).any(), "the test must overflow fp16 before the clamp"
        got, want = ours(ids, mask), peer(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(got).all()
    assert max_rel_err(got.float(), want.float()) <= 1e-2  # fp16 keeps ~3 digits; kernels sum in other orders


def test_t5_bad_input_is_named():
    ours, _ = pair()
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match="vocab_size=64"):
        ours(ids + 64)
    with pytest.raises(TypeError, match="integer"):
        ours(ids.half())
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(ids, mask[:1])
    with pytest.raises(ValueError, match="feed_forward_proj"):
        zoo.build({"arch": "t5_encoder", **TINY, "feed_forward_proj": "gated-swish"})


def test_t5_xxl_meta_names_and_shapes_equal_transformers():
    ours = zoo.build("t5-xxl", device="meta")
    with torch.device("meta"):
        peer = transformers.T5EncoderModel(transformers.T5Config(**vars(zoo.get_config("t5-xxl"))))
    want = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert len(want) == 220 and sum(p.numel() for p in ours.parameters()) == 4_762_310_656
