"""Tokenizers for the text encoders, on the `tokenizers` and `sentencepiece` libraries (extra `pip install ".[text]"`).

    tok = zoo.tokenizers.clip("clip-vit-large-patch14/")  # vocab.json + merges.txt, tokenizer.json or bpe .txt.gz
    batch = tok(["a red fox", ""])  # {"input_ids": (2, 77), "attention_mask": (2, 77)}

Each call returns ids exactly as the official pipelines build them: CLIP 77 tokens with BOS/EOS, NFC-normalised,
whitespace-collapsed and lower-cased; T5 EOS appended and pad 0 (512 tokens for Flux-dev, 256 for schnell);
Gemma BOS prepended, pad 0, right padding (Sana). Nothing is global: each object holds its own vocabulary.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, punctuation runs
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f"zoo.tokenizers needs the `{module}` package: install the text extra with pip install \".[text]\""
        ) from e


class Tokenizer:
    """Text -> (input_ids, attention_mask): specials, truncation and padding done the same way for every encoder.

    `encode_text` maps one string to ids without special tokens; `bos`/`eos` wrap them (None: not added).
    """

    def __init__(
        self,
        encode_text: Callable[[str], list[int]],
        *,
        vocab_size: int,
        pad_id: int,
        max_length: int,
        bos: int | None = None,
        eos: int | None = None,
    ):
        self.encode_text = encode_text
        self.vocab_size = vocab_size
        self.pad_id, self.bos, self.eos = pad_id, bos, eos
        self.max_length = max_length

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """One prompt -> ids with the special tokens, truncated to `max_length` (None: not truncated)."""
        if not isinstance(text, str):
            raise TypeError(f"prompts must be strings, got {type(text).__name__}")
        ids = self.encode_text(text)
        specials = (self.bos is not None) + (self.eos is not None)
        if max_length is not None:
            if max_length < specials + 1:
                raise ValueError(f"max_length={max_length} leaves no room for text next to {specials} special token(s)")
            ids = ids[: max_length - specials]
        return ([self.bos] if self.bos is not None else []) + ids + ([self.eos] if self.eos is not None else [])

    def __call__(
        self, prompts: str | Sequence[str], max_length: int | None = None, padding: str = "max_length",
        truncation: bool = True,
    ) -> dict[str, Tensor]:
        """Prompts -> {"input_ids": (B, L) int64, "attention_mask": (B, L) int64}; padding "max_length" or "longest"."""
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given; pass a string or a non-empty list of strings (\"\" is a prompt)")
        max_length = self.max_length if max_length is None else max_length
        rows = [self.encode(p, max_length if truncation else None) for p in prompts]
        L = max_length if padding == "max_length" else max(len(r) for r in rows)
        L = max(L, max(len(r) for r in rows))
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the others to code points from 256 up.

    The order matters: CLIP's vocabulary lists the printable bytes first, then the remapped ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def openclip_vocab(bpe_path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenCLIP's `bpe_simple_vocab_16e6.txt(.gz)` -> (vocab, merges) as in the CLIP `vocab.json` / `merges.txt`.

    The file lists merges after a version line; CLIP keeps the first 49152 - 256 - 2 of them. The vocabulary is the
    256 byte symbols, the same with the end-of-word mark `</w>`, one entry per merge, then the two special tokens.
    """
    path = Path(bpe_path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]):
    tk = _require("tokenizers")
    bpe = tk.models.BPE(
        vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
        unk_token=CLIP_EOS,
    )
    tok = tk.Tokenizer(bpe)
    tok.normalizer = tk.normalizers.Sequence(
        [tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "), tk.normalizers.Lowercase()]
    )
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(CLIP_PATTERN), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.add_special_tokens([CLIP_BOS, CLIP_EOS])  # matched whole in the text, as transformers' added tokens are
    return tok


def _read_vocab_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    return vocab, [tuple(m.split()) for m in lines if m and not m.startswith("#version")]


def _cached_bpe(files: tuple[Path, ...], read: Callable[[], tuple[dict[str, int], list[tuple[str, str]]]]):
    """(vocab, BPE backend) of CLIP vocabulary files, parsed once per process (again if a file changes): building
    the 49k-merge BPE takes ~0.1 s, and pipelines make one tokenizer per text encoder on every load."""
    key = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if key not in _BPE:
        vocab, merges = read()
        _BPE[key] = vocab, _clip_backend(vocab, merges)
    return _BPE[key]


_BPE: dict[tuple, tuple[dict[str, int], object]] = {}


def _special_token(folder: Path, name: str) -> str | None:
    """A special token's text from a transformers tokenizer folder (special_tokens_map.json / tokenizer_config.json)."""
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / fname
        if f.is_file():
            value = json.loads(f.read_text()).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _from_json(path: Path) -> tuple[Callable[[str], list[int]], Callable[[str], int | None], int]:
    tk = _require("tokenizers")
    tok = tk.Tokenizer.from_file(str(path))
    return (lambda s: tok.encode(s, add_special_tokens=False).ids), tok.token_to_id, tok.get_vocab_size()


def _from_sentencepiece(path: Path) -> tuple[Callable[[str], list[int]], Callable[[str], int | None], int]:
    spm = _require("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(path))

    def piece_id(piece: str) -> int | None:
        i = sp.piece_to_id(piece)
        return None if i == sp.unk_id() and piece != sp.id_to_piece(i) else i

    return (lambda s: sp.encode(s)), piece_id, sp.get_piece_size()


def _find(path: str | Path, names: Sequence[str], what: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for name in names:
        if (p / name).is_file():
            return p / name
    raise FileNotFoundError(
        f"no {what} tokenizer file at {str(p)!r}; expected a file or a folder with one of {list(names)}"
    )


def clip(path: str | Path, *, pad_token: str | None = None, max_length: int = 77) -> Tokenizer:
    """CLIP's byte-level BPE from a transformers folder (tokenizer.json or vocab.json + merges.txt) or OpenCLIP's
    `bpe_simple_vocab_16e6.txt.gz`. `pad_token`: default the folder's own (`<|endoftext|>` for OpenAI CLIP-L, `!` for
    the SD2/SDXL OpenCLIP tokenizers); OpenCLIP's bpe file pads with id 0 (`!`), as `open_clip.tokenize` does."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if p.is_dir() and (p / "tokenizer.json").is_file():
        encode, token_id, size = _from_json(p / "tokenizer.json")
        default_pad = _special_token(p, "pad_token") or CLIP_EOS
    else:
        if p.is_dir() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            vocab, backend = _cached_bpe((p / "vocab.json", p / "merges.txt"), lambda: _read_vocab_merges(p))
            default_pad = _special_token(p, "pad_token") or CLIP_EOS
        elif p.suffix == ".json":
            encode, token_id, size = _from_json(p)
            vocab = None
            default_pad = _special_token(folder, "pad_token") or CLIP_EOS
        else:
            bpe = _find(p, ["bpe_simple_vocab_16e6.txt.gz"], "CLIP")
            vocab, backend = _cached_bpe((bpe,), lambda: openclip_vocab(bpe))
            default_pad = "!"
        if vocab is not None:
            encode, token_id, size = (lambda s: backend.encode(s, add_special_tokens=False).ids), vocab.get, len(vocab)
    pad = pad_token or default_pad
    ids = {name: token_id(name) for name in (CLIP_BOS, CLIP_EOS, pad)}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"CLIP vocabulary at {str(p)!r} has no token(s) {missing}")
    bos, eos = ids[CLIP_BOS], ids[CLIP_EOS]
    return Tokenizer(encode, vocab_size=size, pad_id=ids[pad], max_length=max_length, bos=bos, eos=eos)


def _protobuf_field(data: bytes, number: int) -> bytes | None:
    """The first length-delimited field `number` of a serialized protobuf message (enough to read a sentencepiece
    model's normalizer without the protobuf package)."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(data):
        key = varint()
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size = varint()
            if key >> 3 == number:
                return data[i : i + size]
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in a sentencepiece model")
    return None


def _t5_from_sentencepiece(path: Path):
    """`spiece.model` -> the unigram tokenizer transformers builds for T5 (same pieces and scores, the model's
    precompiled normalizer, whitespace split, "▁" prepended to every word), so score ties resolve as in
    `T5TokenizerFast`."""
    tk, spm = _require("tokenizers"), _require("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = tk.Tokenizer(tk.models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=False))
    normalizer_spec = _protobuf_field(path.read_bytes(), 3)  # ModelProto.normalizer_spec
    charsmap = _protobuf_field(normalizer_spec, 2) if normalizer_spec else None  # .precompiled_charsmap
    if charsmap:
        tok.normalizer = tk.normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.WhitespaceSplit(),
        tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.add_special_tokens([p for p, _ in pieces if sp.is_control(sp.piece_to_id(p))])
    return (lambda s: tok.encode(s, add_special_tokens=False).ids), tok.token_to_id, tok.get_vocab_size()


def t5(path: str | Path, *, max_length: int = 512) -> Tokenizer:
    """T5's unigram model from `tokenizer.json` or `spiece.model`: EOS `</s>` appended, pad `<pad>` = 0."""
    f = _find(path, ["tokenizer.json", "spiece.model"], "T5")
    encode, token_id, size = _from_json(f) if f.suffix == ".json" else _t5_from_sentencepiece(f)
    eos, pad = token_id("</s>"), token_id("<pad>")
    if eos is None or pad is None:
        raise ValueError(f"T5 vocabulary at {str(f)!r} lacks '</s>' or '<pad>'")
    return Tokenizer(encode, vocab_size=size, pad_id=pad, max_length=max_length, eos=eos)


def gemma(path: str | Path, *, max_length: int = 300) -> Tokenizer:
    """Gemma's BPE from `tokenizer.model` (sentencepiece) or `tokenizer.json`: BOS `<bos>` prepended, no EOS, pad
    `<pad>` = 0 on the right (Sana's settings)."""
    f = _find(path, ["tokenizer.json", "tokenizer.model"], "Gemma")
    encode, token_id, size = _from_json(f) if f.suffix == ".json" else _from_sentencepiece(f)
    bos, pad = token_id("<bos>"), token_id("<pad>")
    if bos is None or pad is None:
        raise ValueError(f"Gemma vocabulary at {str(f)!r} lacks '<bos>' or '<pad>'")
    return Tokenizer(encode, vocab_size=size, pad_id=pad, max_length=max_length, bos=bos)
