"""torch.compile: our models vs diffusers' on the same weights, both compiled (fp32, CPU or CUDA).

    python bench/compile.py [--models flux unet sana vae] [--threads 2 --repeats 5 --backend inductor]

Mid configs (bench/pairs.py): Flux 1024 wide, 2 double + 4 single blocks, 1024 image + 128 text tokens; the SD1.5
UNet at 32x32 latents; Sana-600M width, 4 blocks, 512 px; the SD VAE decoder on a 32x32 latent.
Ours compiles with `fullgraph=True` (a graph break is an error); diffusers' with its default (breaks allowed).
Prints, per model: compile seconds (first call), compiled-vs-eager max relative difference, median forward time
eager and compiled of each (the four calls interleaved, so load from elsewhere hits all alike; on a shared
machine, read the ratios, not the seconds), and the ratio compiled ours / compiled diffusers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import pairs  # noqa: E402
from bench.common import median_times  # noqa: E402

BUILDERS = {"flux": pairs.flux, "unet": lambda **kw: pairs.unet("sd15", 32, **kw), "sana": pairs.sana,
            "vae": pairs.vae_decode}


def bench(pair: pairs.Pair, backend: str, repeats: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            out = fn()
            sync()
            return out
        return run

    runs = {"zoo eager": timed(lambda: pair.run_ours(pair.ours)),
            "diffusers eager": timed(lambda: pair.run_ref(pair.ref))}
    compiled = {"zoo compiled": torch.compile(lambda: pair.run_ours(pair.ours), fullgraph=True, backend=backend),
                "diffusers compiled": torch.compile(lambda: pair.run_ref(pair.ref), backend=backend)}
    row: dict = {"name": pair.name}
    with torch.no_grad():
        eager = {k: fn() for k, fn in runs.items()}
        row["eager rel diff"] = pairs.rel_err(eager["zoo eager"], eager["diffusers eager"])
        for label, fn in compiled.items():
            t0 = time.perf_counter()
            out = fn()
            sync()
            row[f"{label} compile s"] = time.perf_counter() - t0
            row[f"{label} vs eager"] = pairs.rel_err(out, eager[label.replace("compiled", "eager")])
            runs[label] = timed(fn)
        row.update(median_times(runs, repeats))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, backend {args.backend}, fp32, "
          f"median of {args.repeats} interleaved calls")
    for name in args.models:
        pair = BUILDERS[name](device=args.device)
        r = bench(pair, args.backend, args.repeats, args.device)
        del pair
        print(f"\n{r['name']}: eager zoo vs diffusers rel diff {r['eager rel diff']:.1e}")
        for side in ("zoo", "diffusers"):
            print(f"  {side:9s} compile {r[f'{side} compiled compile s']:6.1f} s, compiled vs eager rel diff "
                  f"{r[f'{side} compiled vs eager']:.1e}, eager {r[f'{side} eager'] * 1e3:8.1f} ms, compiled "
                  f"{r[f'{side} compiled'] * 1e3:8.1f} ms (speed-up {r[f'{side} eager'] / r[f'{side} compiled']:.2f})")
        print(f"  ratio zoo/diffusers: compiled {r['zoo compiled'] / r['diffusers compiled']:.3f}, eager "
              f"{r['zoo eager'] / r['diffusers eager']:.3f}", flush=True)


if __name__ == "__main__":
    main()
