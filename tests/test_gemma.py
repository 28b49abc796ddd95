"""Gemma-2: parity with transformers' Gemma2Model (tiny configs), causal-LM files through zoo.load, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, randomize
from safetensors.torch import save_file

import zoo
from zoo.gemma import Gemma2

transformers = pytest.importorskip("transformers", reason="transformers is the parity peer")

# a small softcap so the tanh bends the logits; a 4-token window on alternate layers, shorter than the prompts
TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, attn_logit_softcapping=2.0,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},
)


def pair(**overrides) -> tuple[Gemma2, torch.nn.Module]:
    hf_cfg = transformers.Gemma2Config(**{**TINY, **overrides}, attn_implementation="eager")
    ours = randomize(zoo.build({"arch": "gemma2", **hf_cfg.to_dict()}).eval(), seed=3)
    peer = transformers.Gemma2Model(hf_cfg).eval()
    peer.load_state_dict(ours.state_dict(), strict=True)  # ours holds no buffers: the peer keeps its RoPE and scale
    return ours, peer


def ids_and_mask(L: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, L), generator=g)
    ids[:, 0] = 2  # BOS
    ids[0, 7:] = 0  # right padding (Sana pads on the right)
    return ids, (ids != 0).long()


def test_gemma_matches_transformers_every_layer_with_window_and_padding():
    ours, peer = pair()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        got, layers = ours(ids, mask, all_layers=True)
        want = peer(ids, attention_mask=mask, output_hidden_states=True)
        assert len(layers) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
        for a, b in zip(layers, want.hidden_states):
            assert max_rel_err(a, b) <= 1e-5
        assert max_rel_err(got, want.last_hidden_state) <= 1e-5
        assert max_rel_err(ours(ids), peer(ids).last_hidden_state) <= 1e-5


def test_gemma_without_softcap_takes_sdpa_and_still_matches():
    ours, peer = pair(attn_logit_softcapping=None)
    ids, mask = ids_and_mask(6)
    with torch.no_grad():
        assert max_rel_err(ours(ids, mask), peer(ids, attention_mask=mask).last_hidden_state) <= 1e-5


def test_gemma_bf16_embedding_scale_is_rounded_like_transformers():
    ours, peer = pair(hidden_size=48, head_dim=12, query_pre_attn_scalar=12)  # sqrt(48) = 6.93 -> 6.9375 in bf16
    ours, peer = ours.to(torch.bfloat16), peer.to(torch.bfloat16)
    ids, mask = ids_and_mask(6)
    with torch.no_grad():
        got, layers = ours(ids, mask, all_layers=True)
        want = peer(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(layers[0], want.hidden_states[0])  # the scaled embedding, bit for bit
    assert max_rel_err(got.float(), want.last_hidden_state.float()) <= 2e-2  # bf16 keeps ~3 digits


def test_gemma2_2b_meta_names_and_shapes_equal_transformers():
    ours = zoo.build("gemma2-2b", device="meta")
    with torch.device("meta"):
        peer = transformers.Gemma2Model(transformers.Gemma2Config(**{
            k: v for k, v in vars(zoo.get_config("gemma2-2b")).items() if k not in ("rope_theta", "layer_types")}))
    want = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert sum(p.numel() for p in ours.parameters()) == 2_614_341_888


def test_causal_lm_files_load_through_zoo_load_named_detected_and_from_a_transformers_folder(tmp_path):
    ours, _ = pair()
    sd = {f"model.{k}": v for k, v in ours.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # Gemma2ForCausalLM's (tied) head
    save_file(sd, str(tmp_path / "bare.safetensors"))
    ids, mask = ids_and_mask()
    with torch.no_grad():
        want = ours(ids, mask)
        assert torch.equal(zoo.load({"arch": "gemma2", **TINY}, tmp_path / "bare.safetensors")(ids, mask), want)
        with pytest.warns(UserWarning, match="sliding_window=4096"):  # no config.json: released values assumed
            bare = zoo.load(None, tmp_path / "bare.safetensors")
        assert (bare.config.hidden_size, bare.config.num_hidden_layers) == (32, 4)

        cfg = transformers.Gemma2Config(**TINY, attn_implementation="eager")
        peer = transformers.Gemma2ForCausalLM(cfg).eval()
        peer.model.load_state_dict(ours.state_dict())
        peer.save_pretrained(tmp_path / "text_encoder")  # config.json beside: heads, window, softcap are told
        loaded = zoo.load(None, tmp_path / "text_encoder")
        assert max_rel_err(loaded(ids, mask), peer.model(ids, attention_mask=mask).last_hidden_state) <= 1e-5


def test_gemma_detect_names_the_released_size_from_meta_shapes():
    import checkpoints_convert as cc
    sd = {f"model.{k}": v for k, v in zoo.build("gemma2-2b", device="meta").state_dict().items()}
    det = cc.detect(sd)
    assert (det.family, det.layout, det.config, det.prefix) == ("gemma2", "official", "gemma2-2b", "model.")


def test_gemma_bad_input_is_named():
    ours, _ = pair()
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match="vocab_size=96"):
        ours(ids + 96)
    with pytest.raises(TypeError, match="integer"):
        ours(ids.float())
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(ids, mask[:, :5])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        zoo.build({"arch": "gemma2", **TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="layer_types"):
        zoo.build({"arch": "gemma2", **TINY, "layer_types": ["full_attention"]})
