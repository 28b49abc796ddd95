"""Safe checkpoint I/O: memory-mapped safetensors with a validated header, sharded folders, weights-only pickles.

`load_file` never runs code from a file: safetensors are parsed here (header checked before any tensor is
mapped) and `.ckpt/.pt/.bin` go only through `torch.load(weights_only=True)`. `save_file` writes safetensors
to a temporary file beside the target and renames it, so a crash never leaves a half-written output.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import pickle
import re
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from checkpoints_convert.detect import describe
from checkpoints_convert.errors import CheckpointError

# safetensors dtype names <-> torch dtypes (the spec's names; F8_* are the fp8 formats shared Flux files use)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # as the safetensors reference implementation: a larger header is not a checkpoint
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
# containers people wrap a state dict in (Lightning's `state_dict`, DiT/PixArt's `model`/`ema`, ...)
CONTAINERS = ("state_dict", "model", "module", "net")
EMA_CONTAINERS = ("state_dict_ema", "ema", "model_ema", "ema_model")


class Checkpoint(dict):
    """A state dict that remembers the files it was read from (`paths`) and their safetensors `metadata`."""

    paths: tuple[Path, ...] = ()
    metadata: dict[str, str]
    config: dict  # the diffusers/transformers `config.json` beside the weights ({} if none)
    quant_types: dict[str, str]  # GGUF files: key -> GGML type (Q8_0, Q4_K, F32, ...) before dequantisation
    quantized: dict[str, Tensor]  # GGUF with keep_quantized: key -> its GGML blocks (the value: a meta placeholder)
    shard: tuple[int, int, Path | None] | None  # a lone shard (k of n, the index beside it) read as one file
    maps: list[tuple[int, int]]  # (address, bytes) of the private file mappings the tensors view

    def __init__(self, *args, paths=(), metadata=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths = tuple(Path(p).resolve() for p in paths)
        self.metadata = dict(metadata or {})
        self.maps = []
        self.config, self.shard, self.quant_types, self.quantized = {}, None, {}, {}

    def release(self, t: Tensor | None = None) -> None:
        """Drop the resident file pages under `t` (or under every mapping) from this process's memory.

        The mapping stays valid: a later read fetches the pages from the file again. Only for files nobody
        wrote to in place (a write to a private mapping lives in those pages and would be lost).
        """
        spans = self.maps if t is None else [(t.data_ptr(), t.numel() * t.element_size())]
        for addr, n in spans:
            if any(a <= addr and addr + n <= a + m for a, m in self.maps):
                _dontneed(addr, n)


def _dontneed(addr: int, n: int) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside [addr, addr + n); a no-op where libc has no madvise."""
    start, stop = -(-addr // PAGE) * PAGE, (addr + n) // PAGE * PAGE
    if stop > start and _LIBC is not None and hasattr(_LIBC, "madvise"):
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), 4)  # 4: MADV_DONTNEED (Linux)


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and validate a safetensors header -> (entries, metadata, data start); `CheckpointError` if bad."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes): truncated or "
                                  "not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_len, spans = size - 8 - n, []
    for key, e in header.items():
        if not isinstance(e, dict) or e.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has no known dtype (entry {str(e)[:80]})")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {key!r} has a bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise CheckpointError(f"{path}: tensor {key!r} has bad data_offsets {offs!r}")
        nbytes = DTYPES[e["dtype"]].itemsize
        for d in shape:
            nbytes *= d
        if not 0 <= offs[0] <= offs[1] <= data_len or offs[1] - offs[0] != nbytes:
            raise CheckpointError(f"{path}: tensor {key!r} {e['dtype']}{shape} needs {nbytes} bytes but its offsets "
                                  f"{offs} do not fit the {data_len} data bytes: truncated or corrupt")
        spans.append((offs[0], offs[1], key))
    # the format lays tensors end to end: a gap or an overlap means a corrupt header
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{path}: tensor {key!r} starts at byte {begin}, expected {end} (overlap or gap)")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{path}: tensors end at byte {end} but the file holds {data_len} data bytes")
    return header, metadata, 8 + n


def _load_safetensors(path: Path) -> Checkpoint:
    """Every tensor a view into one private (copy-on-write) memory map of the file: nothing is read until used."""
    header, metadata, start = read_header(path)
    size = path.stat().st_size
    out = Checkpoint(paths=[path], metadata=metadata)
    if not header:
        return out
    flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), False, size))
    out.maps.append((flat.data_ptr(), size))
    for key, e in header.items():
        dtype, (begin, stop) = DTYPES[e["dtype"]], e["data_offsets"]
        raw = flat[start + begin : start + stop]
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # misaligned in the file: a view of another dtype needs an aligned copy
        out[key] = raw.view(dtype).reshape(e["shape"])
    return out


def _load_pickle(path: Path) -> dict:
    """`torch.load(weights_only=True)` only: a pickle that needs arbitrary code is refused, never executed."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: our message says it all
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as e:
        plain = str(e).startswith("Weights only load failed") and _starts_like_a_pickle(path)
        if "GLOBAL" not in str(e) and not plain:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from None
        raise CheckpointError(
            f"{path}: this pickle would run code; refused: unpickling it could run arbitrary code "
            f"({_unsafe_reason(e)}); only plain tensors and containers are read from pickles. If you trust its "
            "source, convert it once in a sandbox with torch.load(weights_only=False) and save the state dict as "
            ".safetensors"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return obj


def _starts_like_a_pickle(path: Path) -> bool:
    """A pickle of protocol 2 or later opens with the PROTO instruction (0x80, protocol number)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _unsafe_reason(e: Exception) -> str:
    """The line of torch's refusal that names the offending global or instruction."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "GLOBAL" in ln), "")
    if line:
        return "it imports " + line[line.index("GLOBAL"):].split(" was ")[0]
    op = next((ln for ln in lines if ln.startswith("Unsupported")), "")
    return f"it uses pickle instructions beyond plain data: {op}" if op else "it needs more than plain data"


def _unwrap(obj, path: Path, ema: bool) -> dict[str, Tensor]:
    """Find the state dict inside a container; with `ema`, the EMA copy instead of the trained weights."""
    took_ema = False
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[n] for n in EMA_CONTAINERS if ema and isinstance(obj.get(n), Mapping)), None)
        took_ema |= inner is not None
        if inner is None:
            inner = next((obj[n] for n in CONTAINERS if isinstance(obj.get(n), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{path}: no state dict found; top-level entries: {sorted(map(str, obj))[:20]}")
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if ema and not took_ema:
        sd = _take_ema(sd, path)
    return sd


def _take_ema(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """LDM keeps EMA weights as `model_ema.<name without dots>`; others as an `ema.` / `ema_model.` prefix."""
    ldm = {k[len("model_ema."):]: k for k in sd if k.startswith("model_ema.") and k not in
           ("model_ema.decay", "model_ema.num_updates")}
    if ldm:
        out = {}
        for k, v in sd.items():
            if k.startswith("model_ema."):
                continue
            src = ldm.get(k[len("model."):].replace(".", "")) if k.startswith("model.") else None
            out[k] = sd[src] if src else v
        return out
    for prefix in ("ema.", "ema_model."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    raise CheckpointError(f"{path}: EMA weights requested but none found (no model_ema., ema. or ema_model. keys)")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [index.parent / f for f in dict.fromkeys(weight_map.values())]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index ({type(e).__name__}: {e})") from None


def _files_of_folder(folder: Path) -> list[Path]:
    """A diffusers/transformers model folder -> its weight file(s), safetensors first."""
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return _shards(found[0]) if pattern.endswith(".json") else found
    models = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
    hint = f"; a pipeline folder? pass one of its model subfolders: {models}" if models else ""
    raise CheckpointError(f"{folder}: no *.safetensors, *.bin or sharded index in this folder{hint}")


def load_file(path: str | Path, *, ema: bool = False, keep_quantized: bool = False) -> Checkpoint:
    """Read a checkpoint (safetensors, sharded index or folder, weights-only pickle, GGUF) -> state dict, keys as
    stored. GGUF tensors are dequantised to float32, or with `keep_quantized` left as blocks in `.quantized`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    files = _files_of_folder(path) if path.is_dir() else _shards(path) if path.name.endswith(".json") else [path]
    out = Checkpoint(paths=files)
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed by the index does not exist")
        if f.suffix == ".safetensors":
            part = _load_safetensors(f)
            out.metadata.update(part.metadata)
            out.maps += part.maps
            part = _take_ema(part, f) if ema else part
        elif f.suffix == ".gguf":
            from checkpoints_convert.gguf import load_gguf

            part, types, blocks = load_gguf(f, keep_quantized)
            out.quant_types.update(types)
            out.quantized.update(blocks)
        elif f.suffix in PICKLE_SUFFIXES:
            part = _unwrap(_load_pickle(f), f, ema)
        else:
            raise CheckpointError(f"{f}: unknown checkpoint extension {f.suffix!r}; expected .safetensors, "
                                  f"{', '.join(PICKLE_SUFFIXES)}, .gguf, a sharded *.index.json or a model folder")
        clash = out.keys() & part.keys()
        if clash:
            raise CheckpointError(f"{f}: key(s) {sorted(clash)[:5]} appear in more than one shard")
        out.update(part)
    out.config = _config_beside(files[0]) if files else {}
    out.shard = _lone_shard(path) if len(files) == 1 and not path.is_dir() else None
    return out


def _config_beside(weights: Path) -> dict:
    """The `config.json` in the folder of a weight file (a diffusers model folder), else {}."""
    path = weights.parent / "config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _lone_shard(path: Path) -> tuple[int, int, Path | None] | None:
    """(k, n, index file or None) for a file named like `...-0000k-of-0000n.safetensors`."""
    m = re.search(r"-(\d+)-of-(\d+)\.", path.name)
    if not m or int(m.group(2)) < 2:
        return None
    index = next(iter(sorted(path.parent.glob("*.index.json"))), None)
    return int(m.group(1)), int(m.group(2)), index


def _bytes_of(t: Tensor):
    """A tensor's bytes in C order as a buffer (one contiguous copy only when it is a strided or shared view)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed over `path` when the block ends without error, removed
    when it fails, so `path` is never half-written. Files written by every package go through it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_file(state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None, *,
              source: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
              transform: Callable[[Tensor], Tensor] | None = None) -> Path:
    """Write safetensors atomically (temp file + rename); refuses to overwrite a file the tensors were read from.

    `progress(bytes_done, bytes_total)` is called after each tensor is written. `transform` (e.g. a dtype cast)
    is applied to each tensor just before it is written, and to a `meta` twin to plan the header, so only one
    transformed tensor exists at a time.
    """
    path = Path(path)
    inputs = list(getattr(state_dict, "paths", ())) + ([Path(source)] if source is not None else [])
    if path.exists() and any(p.exists() and os.path.samefile(p, path) for p in inputs):
        raise CheckpointError(f"{path}: refusing to overwrite the input file; write to a new path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a file name ending in .safetensors")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path.parent}: the destination folder does not exist; create it first")
    header: dict = {}
    offset = 0
    for key, t in state_dict.items():
        if transform is not None and isinstance(t, Tensor):
            t = transform(torch.empty_like(t, device="meta"))  # dtype and shape only
        if not isinstance(t, Tensor) or t.dtype not in NAMES:
            raise CheckpointError(f"{key}: cannot store {type(t).__name__} {getattr(t, 'dtype', '')} in safetensors")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    dtypes = ",".join(sorted({e["dtype"] for e in header.values()}))
    meta = {"format": "pt", "dtype": dtypes, **describe(state_dict),
            **{str(k): str(v) for k, v in (metadata or {}).items()}}
    raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data (and every 8-byte-aligned tensor) starts aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        done = 0
        for t in state_dict.values():
            t = transform(t) if transform is not None else t
            f.write(_bytes_of(t))  # one tensor at a time: memory stays at the largest tensor
            done += t.numel() * t.element_size()
            if progress is not None:
                progress(done, offset)
        f.flush()
        os.fsync(f.fileno())
    return path
