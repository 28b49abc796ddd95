"""GGUF files (the quantised Flux/SD files ComfyUI users run), read with the `gguf` package (extra `[gguf]`).

Every tensor is dequantised on load with gguf's own `dequantize` (Q8_0, Q4_0, Q4_K, ... whatever it supports) into
float32, or, with `keep_quantized`, left as its GGML blocks (uint8, one row of blocks per row of the tensor) beside a
`meta` placeholder of its true shape, for layers that dequantise per matmul (`layers.gguf`, used by `zoo.load`).
F32/F16 tensors keep their dtype. GGUF stores shapes innermost-first (ggml order): reversed here.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from checkpoints_convert.errors import CheckpointError

PLAIN = {"F32": torch.float32, "F16": torch.float16}


def load_gguf(path: str | Path, keep_quantized: bool = False
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """(state dict, key -> GGML type name, key -> GGML blocks of the tensors kept quantised) of a GGUF file."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package: pip install 'zoo[gguf]' "
                              "(or pip install gguf)") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})") from None
    out, types, blocks = {}, {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape))
        try:
            if kind in PLAIN:
                data = torch.from_numpy(np.array(t.data, dtype=t.data.dtype)).to(PLAIN[kind])
            elif keep_quantized:  # the file's blocks as they are (a view of the mapped file), rows kept apart
                with warnings.catch_warnings():  # a read-only view of the mapped file: nothing writes to it
                    warnings.simplefilter("ignore", UserWarning)
                    view = torch.from_numpy(np.asarray(t.data))
                blocks[t.name] = view.reshape(shape[0] if len(shape) > 1 else 1, -1)
                data = torch.empty(shape, device="meta")
            else:
                data = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name!r} is {kind}, which gguf cannot dequantise") from None
        out[t.name] = data.reshape(shape)
        types[t.name] = kind
    return out, types, blocks
