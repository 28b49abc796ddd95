"""zoo.tokenizers: ids and masks equal transformers' tokenizers (real CLIP vocabulary; trained T5/Gemma models)."""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from zoo import tokenizers

transformers = pytest.importorskip("transformers", reason="transformers' tokenizers are the reference")
spm = pytest.importorskip("sentencepiece", reason="the [text] extra (sentencepiece) trains the test models")

BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"  # OpenCLIP's copy of the CLIP vocabulary

BASE = [
    "a photo of a cat", "A red fox in the snow, 4k, highly detailed", "", " ", "   leading and trailing   ",
    "UPPER CASE PROMPT", "MiXeD CaSe WoRdS", "repeated    spaces   between\twords\nand lines", "tab\there",
    "it's a dog's life, isn't it? we'll see, they'd've", "numbers 1234567890 and 3.14159 and 1e-5",
    "punctuation!!! ??? ... ;;; --- ((())) [brackets] {braces} <angles>", "email@example.com http://x.y/z?q=1&r=2",
    "café naïve façade résumé Ångström", "日本語のテキスト と 中文 与 한국어", "emoji 🦊🔥✨ and 👩‍👩‍👧 family",
    "Ελληνικά και русский текст", "العربية עברית", "a" * 300, "word " * 100,
    "<|startoftext|> inside text <|endoftext|>",
    "masterpiece, best quality, (cinematic:1.2), [[ugly]], <lora:foo:0.7>", "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ",
    "under_score and hyphen-ated and slash/ed", "'quoted' \"double\" `back`", "100% $5 #tag @user ^caret ~tilde",
]
WORDS = [
    "Fox", "castle", "neon", "sunset", "ROBOT", "über", "déjà-vu", "4K", "HDR", "oil painting", "zebra's", "!?", "🙂",
]


def corpus() -> list[str]:
    """>= 200 prompts: hand-picked edge cases plus word combinations with mixed separators."""
    seps = [" ", "  ", ", ", "\t", " - ", "\n"]
    combos = [sep.join(ws) for ws, sep in zip(itertools.combinations(WORDS, 3), itertools.cycle(seps))]
    prompts = BASE + combos[:200]
    assert len(prompts) >= 200
    return prompts


def clip_folder(tmp: Path) -> Path:
    """vocab.json + merges.txt written from OpenCLIP's bpe file, for transformers' CLIPTokenizer to read."""
    vocab, merges = tokenizers.openclip_vocab(BPE)
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return tmp


def test_clip_vocab_from_openclip_file_has_known_ids():
    vocab, merges = tokenizers.openclip_vocab(BPE)
    assert len(vocab) == 49408 and len(merges) == 48894
    tok = tokenizers.clip(BPE)
    ids = tok("a photo of a cat", padding="longest")["input_ids"][0].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # the CLIP ids every CLIP tutorial prints


@pytest.mark.parametrize("source", ["vocab+merges", "openclip-bpe"])
def test_clip_ids_match_transformers_on_real_vocab(tmp_path, source):
    folder = clip_folder(tmp_path)
    ref_tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    prompts = corpus()
    ours = tokenizers.clip(folder if source == "vocab+merges" else BPE, pad_token="<|endoftext|>")
    got = ours(prompts)
    ref = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    bad = [p for i, p in enumerate(prompts) if not torch.equal(got["input_ids"][i], ref["input_ids"][i])]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]}"
    assert torch.equal(got["attention_mask"], ref["attention_mask"])


def test_clip_pad_token_choices(tmp_path):
    folder = clip_folder(tmp_path)
    assert tokenizers.clip(folder)("a")["input_ids"][0, -1] == 49407  # OpenAI CLIP-L pads with <|endoftext|>
    assert tokenizers.clip(BPE)("a")["input_ids"][0, -1] == 0  # open_clip.tokenize pads with 0 ("!")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))  # the SDXL tokenizer_2 folder
    assert tokenizers.clip(folder)("a")["input_ids"][0, -1] == 0


def train_spm(tmp: Path, name: str, **options) -> Path:
    # trained without the degenerate "aaaa..." prompt: on it, pieces of equal score make sentencepiece's and tokenizers'
    # Viterbi pick different (equally valid) segmentations
    sentences = [p for p in corpus() if "a" * 20 not in p]
    sentences += [f"sentence {i}: the quick brown fox jumps over the lazy dog" for i in range(200)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, hard_vocab_limit=False, minloglevel=2, **options
    )
    (tmp / name).write_bytes(buf.getvalue())
    return tmp


def test_t5_ids_match_transformers_on_trained_model(tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers reads a sentencepiece model through protobuf")
    folder = train_spm(
        tmp_path, "spiece.model", vocab_size=300, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )
    # the reference as transformers builds it from a released tokenizer.json: pieces, scores and the precompiled
    # normalizer of the model (read here with protobuf, independently of zoo's own reader)
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString((folder / "spiece.model").read_bytes())
    charsmap = proto.normalizer_spec.precompiled_charsmap
    assert charsmap, "the trained model should carry a precompiled normalizer (nmt_nfkc)"
    ref_tok = transformers.T5TokenizerFast(
        vocab=[(p.piece, p.score) for p in proto.pieces], _spm_precompiled_charsmap=charsmap, extra_ids=0
    )
    prompts = corpus()
    got = tokenizers.t5(folder, max_length=64)(prompts)
    ref = ref_tok(prompts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    bad = [p for i, p in enumerate(prompts) if not torch.equal(got["input_ids"][i], ref["input_ids"][i])]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]}"
    assert torch.equal(got["attention_mask"], ref["attention_mask"])


def test_gemma_ids_match_transformers_on_trained_model(tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers reads a sentencepiece model through protobuf")
    folder = train_spm(
        tmp_path, "tokenizer.model", vocab_size=700, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        byte_fallback=True, add_dummy_prefix=False, bos_piece="<bos>", eos_piece="<eos>", split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=["<mask>"],
    )
    ref_tok = transformers.GemmaTokenizer.from_pretrained(str(folder), add_bos_token=True)  # as gemma-2 ships it
    ref_tok.padding_side = "right"  # as Sana's pipeline sets it
    prompts = corpus()
    got = tokenizers.gemma(folder, max_length=48)(prompts)
    ref = ref_tok(prompts, padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    bad = [p for i, p in enumerate(prompts) if not torch.equal(got["input_ids"][i], ref["input_ids"][i])]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]}"
    assert torch.equal(got["attention_mask"], ref["attention_mask"])
    assert tokenizers.gemma(folder).encode("hi")[0] == 2  # BOS first


def test_tokenizer_bad_input():
    tok = tokenizers.clip(BPE)
    with pytest.raises(TypeError, match="strings"):
        tok([1, 2])
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="left")
    with pytest.raises(ValueError, match="no prompts"):
        tok([])
    with pytest.raises(FileNotFoundError, match="CLIP"):
        tokenizers.clip("/nonexistent/folder")
