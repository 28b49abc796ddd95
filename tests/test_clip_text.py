"""CLIP text encoder: parity with transformers' CLIPTextModel / CLIPTextModelWithProjection at tiny configs."""
from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, randomize

import zoo
from zoo.clip_text import CLIPText

transformers = pytest.importorskip("transformers", reason="transformers is the parity peer")

TINY = dict(
    vocab_size=99, hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=12, bos_token_id=97, eos_token_id=98, pad_token_id=0,
)


def pair(with_projection: bool = False, **overrides) -> tuple[CLIPText, torch.nn.Module]:
    """Our model and the transformers peer with the same random non-zero weights (converted by name, strict)."""
    fields = {**TINY, **overrides}
    hf_cfg = transformers.CLIPTextConfig(**fields, attn_implementation="eager")
    peer = (transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel)(hf_cfg)
    randomize(peer.eval(), seed=1)
    ours = zoo.build({"arch": "clip_text", **hf_cfg.to_dict(), "with_projection": with_projection}).eval()
    ours.load_state_dict(as_file_keys(peer.state_dict()), strict=True)
    return ours, peer


def as_file_keys(sd: dict) -> dict:
    """transformers 5's CLIPTextModel drops the `text_model.` prefix its files (and our native names) carry."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in sd.items()}


def ids_batch(eos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, BOS ... EOS then padding; a mask marking the padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 90, (2, 12), generator=g)
    ids[:, 0] = 97
    ids[0, 7], ids[0, 8:] = eos, pad
    ids[1, 11] = eos
    mask = (torch.arange(12)[None] <= torch.tensor([[7], [11]])).long()
    return ids, mask


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("with_projection", [False, True])
def test_clip_matches_transformers_every_layer_pooled_and_mask(act, with_projection):
    ours, peer = pair(with_projection, hidden_act=act)
    ids, mask = ids_batch(eos=98, pad=98)  # pad = eos: pooling must take the first EOS
    with torch.no_grad():
        ref = peer(ids, attention_mask=mask, output_hidden_states=True)
        for skip in range(TINY["num_hidden_layers"]):
            hidden, pooled = ours(ids, mask, skip=skip)
            want = ref.last_hidden_state if skip == 0 else ref.hidden_states[-(skip + 1)]
            assert max_rel_err(hidden, want) <= 1e-5, skip
        want_pooled = ref.text_embeds if with_projection else ref.pooler_output
        assert max_rel_err(pooled, want_pooled) <= 1e-5
        # without a mask (how SD/Flux pipelines call CLIP)
        hidden, pooled = ours(ids)
        ref = peer(ids)
        assert max_rel_err(hidden, ref.last_hidden_state) <= 1e-5
        assert max_rel_err(pooled, ref.text_embeds if with_projection else ref.pooler_output) <= 1e-5


def test_clip_legacy_eos_pools_at_argmax():
    ours, peer = pair(eos_token_id=2)  # old OpenAI configs: pooled at the largest id
    ids, _ = ids_batch(eos=98, pad=0)
    with torch.no_grad():
        _, pooled = ours(ids)
        assert max_rel_err(pooled, peer(ids).pooler_output) <= 1e-5
        hidden, _ = ours(ids)
    assert torch.equal(pooled, hidden[torch.arange(2), ids.argmax(-1)])


def test_clip_bad_input_is_named():
    ours, _ = pair()
    ids, mask = ids_batch(eos=98, pad=98)
    with pytest.raises(ValueError, match="vocab_size=99"):
        ours(ids + 50)
    with pytest.raises(TypeError, match="integer token ids"):
        ours(ids.float())
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(ids, mask[:, :5])
    with pytest.raises(ValueError, match="at most 12"):
        ours(torch.cat([ids, ids], dim=1))
    with pytest.raises(ValueError, match="skip=3"):
        ours(ids, skip=3)


FULL = [("clip-l", 123_060_480), ("clip-h", 354_032_640), ("clip-g", 694_659_840)]  # transformers on meta


@pytest.mark.parametrize(("name", "params"), FULL)
def test_clip_full_size_meta_names_and_shapes_equal_transformers(name, params):
    ours = zoo.build(name, device="meta")
    cfg = zoo.get_config(name)
    fields = {k: v for k, v in vars(cfg).items() if k != "with_projection"}
    peer_cls = transformers.CLIPTextModelWithProjection if cfg.with_projection else transformers.CLIPTextModel
    with torch.device("meta"):
        peer = peer_cls(transformers.CLIPTextConfig(**fields))
    want = {k: tuple(v.shape) for k, v in as_file_keys(peer.state_dict()).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert sum(p.numel() for p in ours.parameters()) == params
