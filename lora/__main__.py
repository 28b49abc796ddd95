"""`python -m lora extract|inspect|convert`: LoRA extraction from a fine-tune, a file's summary, format conversion."""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints_convert.io import load_file as read_checkpoint
from checkpoints_convert.io import read_header, save_file
from lora.extract import extract
from lora.factor import Factor
from lora.files import FORMATS, convert, load_file, read
from lora.lycoris import Lycoris
from lora.names import family_of_checkpoint

_UNET_KOHYA = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks|input_blocks|middle_block|output_blocks)_")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _checkpoint(path: str):
    try:
        return read_checkpoint(path)  # memory-mapped: each tensor is read from the file when used
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _check_out(out: str, *inputs: str) -> Path:
    """Never overwrite an input: the output must be another file."""
    o = Path(out)
    for i in inputs:
        if (o.exists() and os.path.samefile(o, i)) or o.resolve() == Path(i).resolve():
            raise SystemExit(f"error: output {o} is the input {i}; refusing to overwrite it")
    if not o.parent.is_dir():
        raise SystemExit(f"error: folder {o.parent} does not exist")
    return o


class _Bar:
    """Weights read: a tqdm bar on a terminal; in a redirected log one line at the end (no `\\r` frames)."""

    def __init__(self):
        self.bar = None

    def __call__(self, i: int, n: int, name: str) -> None:
        if not sys.stderr.isatty():
            if i == n:
                sys.stderr.write(f"read {n}/{n} weights\n")
            return
        if self.bar is None:
            self.bar = tqdm(total=n, unit="weight", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(name[-60:], refresh=False)
        self.bar.update(i - self.bar.n)
        if i == n:
            self.bar.close()


def cmd_extract(a) -> None:
    out = _check_out(a.out, a.base, a.tuned)
    rank = None if a.rank == "full" else int(a.rank)
    conv = None if a.conv_rank in (None, "full") else int(a.conv_rank)
    if a.conv_rank is None:
        conv = rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd, report = extract(_checkpoint(a.base), _checkpoint(a.tuned), rank=rank, conv_rank=conv,
                             clamp_quantile=a.clamp_quantile, min_diff=a.min_diff, method=a.method, device=a.device,
                             dtype=DTYPES.get(a.dtype), format=a.format, progress=None if a.quiet else _Bar())
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    save_file(sd, out, {"format": "pt", "lora_format": a.format})
    text = str(report).splitlines()
    print("\n".join(text if a.verbose else text[:1] + sorted(text[1:-1], key=lambda r: -float(r.split()[-1]))[:10]
                    + text[-1:]))
    print(f"wrote {out} ({len(sd)} tensors, {a.format})")


def _family(base: str | None):
    """The name map of a base checkpoint, from its safetensors header alone (keys and shapes)."""
    return family_of_checkpoint({k: tuple(v["shape"]) for k, v in read_header(base)[0].items()}) if base else None


def _row(f: Factor | Lycoris) -> tuple[str, int, float, str]:
    """What inspect prints of one module: kind (lora, dora, loha, lokr), rank, alpha and the delta's shape."""
    if isinstance(f, Lycoris):
        rank = f.rank or 0
        return f.kind, rank, f.alpha_over_rank * (rank or 1), "(LyCORIS)"
    shape = "x".join(str(d) for d in (f.up.shape[0], *f.down.shape[1:]))
    rank = f.down.shape[0]
    return "lora" if f.magnitude is None else "dora", rank, f.alpha if f.alpha is not None else rank, shape


def cmd_inspect(a) -> None:
    sd, meta = load_file(a.file)
    factors, unmatched, fmt = read(sd, meta, family=_family(a.base))
    print(f"{a.file}: {fmt} LoRA, {len(factors)} module(s), {sum(t.numel() for t in sd.values()):,} parameters")
    rows = {n: _row(f) for n, f in factors.items()}  # (kind, rank, alpha, delta shape)
    ranks = Counter(r[1] for r in rows.values())
    alphas = Counter(r[2] for r in rows.values())
    print(f"ranks: {dict(sorted(ranks.items()))}; alphas: {dict(sorted(alphas.items()))}")
    for n, (kind, rank, alpha, shape) in rows.items():
        print(f"  {n:<60} {kind + ' ' if kind != 'lora' else ''}rank {rank:>4}  alpha {alpha:<8g} delta {shape}")
    if unmatched:
        print(f"{len(unmatched)} key(s) placed on no known module: {unmatched[:20]}")
    if unmatched and not a.base and fmt == "kohya" and any(_UNET_KOHYA.match(k) for k in unmatched):
        print("these are kohya names of UNet modules (dots written as underscores): which module each one is "
              "depends on the UNet's block structure, so module names need the base model: pass --base CHECKPOINT "
              "(the base UNet's .safetensors; only its header is read)")
    elif unmatched and not a.base:
        print("--base CHECKPOINT maps a UNet's names")


def cmd_convert(a) -> None:
    out = _check_out(a.out, a.src)
    sd, meta = load_file(a.src)
    new, new_meta, unmatched = convert(sd, a.to, meta, family=_family(a.base), drop_unmatched=a.drop_unmatched)
    save_file(new, out, new_meta)
    print(f"wrote {out}: {len(new)} tensors in {a.to} format" +
          (f"; dropped {len(unmatched)} unplaced key(s): {unmatched[:10]}" if unmatched else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lora", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="LoRA from base and fine-tuned checkpoints by SVD of the differences")
    e.add_argument("--base", required=True)
    e.add_argument("--tuned", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--rank", default="32", help="rank of linear layers, or 'full'")
    e.add_argument("--conv-rank", default=None, help="rank of k x k convs (default: --rank), or 'full'")
    e.add_argument("--clamp-quantile", type=float, default=None)
    e.add_argument("--min-diff", type=float, default=1e-6, help="skip layers whose max |dW| is at most this")
    e.add_argument("--method", choices=["svd", "randomized"], default="svd")
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", choices=list(DTYPES), default=None, help="dtype of the factors (default: the base's)")
    e.add_argument("--format", choices=list(FORMATS), default="kohya")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--verbose", action="store_true", help="print every module's error, not the worst 10")
    i = sub.add_parser("inspect", help="format, targets, ranks and alphas of a LoRA file")
    i.add_argument("file")
    i.add_argument("--base", default=None, help="a .safetensors checkpoint of the base model, to map its names")
    c = sub.add_parser("convert", help="rewrite a LoRA in another format")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--to", required=True, choices=list(FORMATS))
    c.add_argument("--base", default=None, help="a .safetensors checkpoint of the base model, to map its names "
                   "(needed for UNet LoRAs with diffusers names)")
    c.add_argument("--drop-unmatched", action="store_true", help="drop (and list) keys no known module takes")
    a = p.parse_args(argv)
    try:
        {"extract": cmd_extract, "inspect": cmd_inspect, "convert": cmd_convert}[a.cmd](a)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
