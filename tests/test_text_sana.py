"""zoo.text.sana_conditioning: equal to diffusers' SanaPipeline.encode_prompt (tiny Gemma-2, trained tokenizer)."""
from __future__ import annotations

import inspect

import pytest
import torch
from conftest import max_rel_err, randomize
from test_tokenizers import train_spm

import zoo
from zoo import tokenizers
from zoo.text import SANA_CHI, sana_conditioning

transformers = pytest.importorskip("transformers", reason="transformers builds the peer Gemma-2")
diffusers = pytest.importorskip("diffusers", reason="diffusers' SanaPipeline is the reference")
pytest.importorskip("sentencepiece", reason="the [text] extra (sentencepiece) trains the test tokenizer")
pytest.importorskip("google.protobuf", reason="transformers reads a sentencepiece model through protobuf")

GEMMA = dict(
    vocab_size=700, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=16, attn_logit_softcapping=2.0,
)


def gemma_tokenizer_folder(tmp_path):
    """A Gemma-like BPE (BOS <bos> = 2, <pad> = 0, byte fallback) trained at test time, as test_tokenizers does."""
    return train_spm(
        tmp_path, "tokenizer.model", vocab_size=700, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        byte_fallback=True, add_dummy_prefix=False, bos_piece="<bos>", eos_piece="<eos>", split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    )


def gemma_pair(fields: dict, seed: int = 5) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our Gemma-2 with random weights and transformers' Gemma2Model holding the same ones."""
    hf_cfg = transformers.Gemma2Config(**fields, attn_implementation="eager")
    ours = randomize(zoo.build({"arch": "gemma2", **hf_cfg.to_dict()}).eval(), seed=seed)
    peer = transformers.Gemma2Model(hf_cfg).eval()
    peer.load_state_dict(ours.state_dict())
    return ours, peer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = gemma_tokenizer_folder(tmp_path_factory.mktemp("gemma_tok"))
    ours, peer = gemma_pair(GEMMA)
    ref_tok = transformers.GemmaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    pipe = diffusers.SanaPipeline(tokenizer=ref_tok, text_encoder=peer, vae=None, transformer=None, scheduler=None)
    return ours, tokenizers.gemma(folder), pipe


def test_sana_instruction_is_diffusers_default():
    default = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert list(SANA_CHI) == default


@pytest.mark.parametrize("max_length", [12, 40])
def test_sana_conditioning_matches_encode_prompt_with_instruction_and_negative(parts, max_length):
    ours, tok, pipe = parts
    prompts = ["A Red FOX in the snow ", "a castle at sunset, oil painting, highly detailed " * 3]
    with torch.no_grad():
        pos, pos_mask, neg, neg_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", device=torch.device("cpu"),
            max_sequence_length=max_length, complex_human_instruction=list(SANA_CHI))
        got = sana_conditioning(prompts, ours, tok, max_length=max_length)
        got_neg = sana_conditioning(["", ""], ours, tok, max_length=max_length, instruction=None)
    assert got["y"].shape == (2, 1, max_length, GEMMA["hidden_size"])
    assert torch.equal(got["mask"], pos_mask) and torch.equal(got_neg["mask"], neg_mask)
    assert max_rel_err(got["y"][:, 0], pos) <= 1e-5
    assert max_rel_err(got_neg["y"][:, 0], neg) <= 1e-5
    assert (got["y"][:, 0, 0] - got["y"][:, 0, 1]).abs().max() > 0  # the kept first token is the BOS, not the tail


def test_sana_conditioning_without_instruction_is_the_plain_window(parts):
    ours, tok, pipe = parts
    with torch.no_grad():
        pos, pos_mask, _, _ = pipe.encode_prompt("A cat", do_classifier_free_guidance=False,
                                                 device=torch.device("cpu"), max_sequence_length=10,
                                                 complex_human_instruction=None)
        got = sana_conditioning("A cat", ours, tok, max_length=10, instruction=None)
    assert torch.equal(got["mask"], pos_mask) and max_rel_err(got["y"][:, 0], pos) <= 1e-5
