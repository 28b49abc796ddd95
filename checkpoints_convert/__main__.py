"""`python -m checkpoints_convert SRC DST --to official|diffusers|openclip [--dtype ..] [--family ..]`;
`python -m checkpoints_convert inspect FILE`. `--to openclip` writes a CLIP text tower in the OpenCLIP layout
(SD2.x's ViT-H, SDXL's bigG: fused in_proj)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from checkpoints_convert.convert import DTYPES, LAYOUTS, cast_tensor, convert
from checkpoints_convert.io import CheckpointError, load_file, save_file
from checkpoints_convert.summary import gb, summarize
from checkpoints_convert.summary import nbytes as _nbytes


class _Bar:
    """Bytes written: a tqdm bar on a terminal; in a redirected log one line at the end (no `\\r` frames)."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=0, unit="B", unit_scale=True, ascii=True, file=sys.stderr, leave=True,
                        bar_format="[{bar:30}] {percentage:3.0f}% {n_fmt}B / {total_fmt}B") if self.tty else None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
        elif done >= total:
            sys.stderr.write(f"[{'#' * 30}] 100% {gb(done)} / {gb(total)}\n")


def run_convert(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    dst = Path(args.dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output is written as safetensors; give a path ending in .safetensors")
    sd = load_file(args.src, ema=args.ema)
    out = convert(sd, to=args.to, family=args.family)
    meta = dict(out.metadata)

    def cast(t):  # one tensor at a time while writing; the source's file pages go once it is copied
        c = cast_tensor(t, args.dtype)
        if not t.is_meta and c.data_ptr() != t.data_ptr():
            sd.release(t)
        return c

    save_file(out, dst, meta, source=args.src, progress=None if args.quiet else _Bar(),
              transform=cast if args.dtype else None)
    return (f"{len(out)} tensors ({meta['zoo_family']} -> {args.to}{', ' + args.dtype if args.dtype else ''}): "
            f"{gb(_nbytes(sd))} in, {gb(dst.stat().st_size)} out, {time.perf_counter() - start:.1f} s -> {dst}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        p = argparse.ArgumentParser(prog="python -m checkpoints_convert inspect",
                                    description="Print a checkpoint's family, layout, dtypes and parameter count.")
        p.add_argument("file")
        args = p.parse_args(argv[1:])
        action = lambda: summarize(args.file)
    else:
        p = argparse.ArgumentParser(prog="python -m checkpoints_convert",
                                    description="Convert a checkpoint between the official and diffusers layouts "
                                                "(and a CLIP text tower to OpenCLIP's; lossless unless --dtype); "
                                                "`inspect FILE` describes one.")
        p.add_argument("src", help="safetensors file, sharded index, model folder or weights-only .ckpt/.pt/.bin")
        p.add_argument("dst", help="output .safetensors (written atomically; never the input)")
        p.add_argument("--to", required=True, choices=LAYOUTS)
        p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (fp8: matmul weights only)")
        p.add_argument("--family", help="pick this model from a multi-model file (flux, unet, autoencoder, ...)")
        p.add_argument("--ema", action="store_true", help="take the EMA weights of the file")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        args = p.parse_args(argv)
        action = lambda: run_convert(args)
    try:
        print(action())
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
