"""zoo.text: prompt -> conditioning equals diffusers' pipelines' encode_prompt (tiny encoders, real CLIP vocabulary)."""
from __future__ import annotations

import types

import pytest
import torch
from conftest import max_rel_err, randomize
from test_clip_text import as_file_keys
from test_tokenizers import BPE, clip_folder, train_spm

import zoo
from zoo import text, tokenizers

transformers = pytest.importorskip("transformers", reason="transformers builds the peer encoders")
diffusers = pytest.importorskip("diffusers", reason="diffusers' pipelines are the reference encode_prompt")

PROMPTS = ["a red fox in the snow, 4k", "", "A LONG prompt " + "with many words " * 30]


def clip_pair(seed: int, hidden: int, with_projection: bool = False, act: str = "quick_gelu"):
    """A tiny CLIP over the real 49408-token vocabulary: transformers peer + ours with the same weights."""
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, eos_token_id=49407, bos_token_id=49406,
        attn_implementation="eager",
    )
    peer = (transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel)(cfg)
    randomize(peer.eval(), seed=seed)
    ours = zoo.build({"arch": "clip_text", **cfg.to_dict(), "with_projection": with_projection}).eval()
    ours.load_state_dict(as_file_keys(peer.state_dict()), strict=True)
    return ours, peer


@pytest.fixture(scope="module")
def clip_tok_folder(tmp_path_factory):
    return clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return train_spm(
        tmp_path_factory.mktemp("t5"), "spiece.model", vocab_size=300, model_type="unigram", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1,
    )


def t5_reference_tokenizer(folder):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString((folder / "spiece.model").read_bytes())
    return transformers.T5TokenizerFast(
        vocab=[(p.piece, p.score) for p in proto.pieces],
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap, extra_ids=0,
    )


def test_flux_conditioning_matches_flux_pipeline(clip_tok_folder, t5_folder):
    pytest.importorskip("google.protobuf", reason="the reference T5 tokenizer reads the model through protobuf")
    clip, clip_peer = clip_pair(seed=3, hidden=32)
    t5_cfg = transformers.T5Config(
        vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        attn_implementation="eager",
    )
    t5_peer = randomize(transformers.T5EncoderModel(t5_cfg).eval(), seed=4)
    t5 = zoo.build({"arch": "t5_encoder", **t5_cfg.to_dict()}).eval()
    t5.load_state_dict(t5_peer.state_dict())
    pipe = diffusers.FluxPipeline(
        scheduler=None, vae=None, transformer=None, text_encoder=clip_peer, text_encoder_2=t5_peer,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(clip_tok_folder), model_max_length=77),
        tokenizer_2=t5_reference_tokenizer(t5_folder),
    )
    with torch.no_grad():
        txt, y, txt_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu", max_sequence_length=24)
        got = text.flux_conditioning(
            PROMPTS, clip, tokenizers.clip(clip_tok_folder), t5, tokenizers.t5(t5_folder), max_length=24
        )
    assert got["txt"].shape == (3, 24, 32) and got["y"].shape == (3, 32)
    assert max_rel_err(got["txt"], txt) <= 1e-5 and max_rel_err(got["y"], y) <= 1e-5
    assert torch.equal(got["txt_ids"], txt_ids.expand(3, -1, -1))


@pytest.mark.parametrize("skip", [0, 1])
def test_sd_conditioning_matches_sd_pipeline_with_clip_skip(clip_tok_folder, skip):
    clip, peer = clip_pair(seed=5, hidden=32)
    # diffusers 0.42 applies clip skip's final norm via `text_encoder.text_model.final_layer_norm`, a path
    # transformers 5 flattened away; give the peer that path back (plain attribute, no new module)
    peer.__dict__["text_model"] = types.SimpleNamespace(final_layer_norm=peer.final_layer_norm)
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=peer,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(clip_tok_folder), model_max_length=77),
        unet=None, scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with torch.no_grad():
        pos, _ = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False, clip_skip=skip or None)
        # negatives encoded as prompts: diffusers' own negative branch skips clip skip (the UIs apply it to both)
        neg, _ = pipe.encode_prompt(["blurry", ""], "cpu", 1, False, clip_skip=skip or None)
        tok = tokenizers.clip(clip_tok_folder)
        got = text.sd_conditioning(PROMPTS[:2], clip, tok, skip=skip)["context"]
        got_neg = text.sd_conditioning(["blurry", ""], clip, tok, skip=skip)["context"]
    assert got.shape == (2, 77, 32)
    assert max_rel_err(got, pos) <= 1e-5 and max_rel_err(got_neg, neg) <= 1e-5


def test_sdxl_conditioning_matches_sdxl_pipeline_and_unet_time_ids(clip_tok_folder):
    clip_l, peer_l = clip_pair(seed=6, hidden=32)
    clip_g, peer_g = clip_pair(seed=7, hidden=48, with_projection=True, act="gelu")
    tok_l = transformers.CLIPTokenizer.from_pretrained(str(clip_tok_folder), model_max_length=77)
    # SDXL's tokenizer_2 pads with "!"
    tok_g = transformers.CLIPTokenizer.from_pretrained(str(clip_tok_folder), pad_token="!", model_max_length=77)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=peer_l, text_encoder_2=peer_g, tokenizer=tok_l, tokenizer_2=tok_g, unet=None,
        scheduler=None,
    )
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        got = text.sdxl_conditioning(
            PROMPTS, clip_l, tokenizers.clip(clip_tok_folder), clip_g, tokenizers.clip(BPE),  # bpe file pads with "!"
            size=(768, 1024), crop=(16, 32), target=(1024, 1024),
        )
    assert got["context"].shape == (3, 77, 80) and got["y"].shape == (3, 48 + 6 * 256)
    assert max_rel_err(got["context"], context) <= 1e-5
    assert max_rel_err(got["y"][:, :48], pooled) <= 1e-5
    # the UNet's add_time_ids embedding: diffusers' Timesteps(256, flip_sin_to_cos=True, 0) over (H, W, top, left, H, W)
    ids = torch.tensor([[768, 1024, 16, 32, 1024, 1024]] * 3, dtype=torch.float32)
    proj = diffusers.models.embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    want = proj(ids.flatten()).reshape(3, -1)
    assert max_rel_err(got["y"][:, 48:], want) <= 1e-5
