"""What a checkpoint file holds, as `python -m checkpoints_convert inspect FILE` prints it."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from torch import Tensor

from checkpoints_convert.detect import DetectError, detect
from checkpoints_convert.io import NAMES, load_file
from checkpoints_convert.quant import bnb_kind, unpacked_view


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def nbytes(sd: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def summarize(path: str) -> str:
    """File, model (family, layout, config), dtypes, parameter count and metadata, one line each."""
    sd = load_file(path)
    dtypes = Counter(NAMES.get(t.dtype, str(t.dtype)) for t in sd.values())
    bnb = bnb_kind(sd)
    view = unpacked_view(sd, bnb[1]) if bnb else sd
    packed = 2 if bnb and bnb[0].endswith(("nf4", "fp4")) else 1  # two 4-bit values per byte
    params = sum(t.numel() * (packed if bnb and k in bnb[1] and not t.is_meta else 1) for k, t in view.items()
                 if t.is_floating_point() or (bnb and k in bnb[1]))
    lines = [f"file: {path} ({len(sd)} tensors, {gb(nbytes(sd))})"]
    try:
        det = detect(sd)
        lines.append(f"model: {det}")
        if det.family != "lora":
            lines.append("load: zoo.load(None, FILE) finds its config by keys and shapes (`python -m zoo inspect "
                         "FILE` names it)")
    except DetectError as e:
        lines.append(f"model: not recognised ({str(e).splitlines()[0]})")
    if bnb:
        lines.append(f"quantisation: {bnb[0]}, {len(bnb[1])} packed layers (zoo.load does not dequantise them)")
    if getattr(sd, "quant_types", None):
        kinds = Counter(sd.quant_types.values())
        lines.append("quantisation: GGUF " + ", ".join(f"{n} x {c}" for n, c in kinds.most_common())
                     + " (dequantised on load)")
    lines.append("dtypes: " + ", ".join(f"{n} x {c}" for n, c in dtypes.most_common()))
    lines.append(f"parameters: {params:,} ({params / 1e9:.2f} B)" if params >= 1e8 else f"parameters: {params:,}")
    if getattr(sd, "metadata", None):
        lines.append("metadata: " + ", ".join(f"{k}={v[:60]}" for k, v in sorted(sd.metadata.items())))
    return "\n".join(lines)
