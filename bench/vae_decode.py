"""Full vs tiled decode of our AutoencoderKL and diffusers' on the same weights (fp32, CPU, full SD / Flux widths).

    python bench/vae_decode.py [--height 1024 --width 2048 --tile 64 --overlap 16 --families sd flux --repeats 1]

For each family: median time and peak RSS growth of a whole and a tiled decode of an image-sized latent
(height/8 x width/8), ours and diffusers' (`enable_tiling` with the same tile and overlap), the ratios ours /
diffusers, and the tiled-vs-whole max difference relative to the output's scale for both.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from bench.common import exact_rss, median_times, peak_rss_during  # noqa: E402
from checkpoints_convert import autoencoder_to_diffusers  # noqa: E402

FAMILIES = {"sd": ("vae-sd", 4, True), "flux": ("vae-flux", 16, False)}  # config, latent channels, quant convs


def peer(latent: int, quant: bool):
    import diffusers

    return diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=quant, use_post_quant_conv=quant).eval()


def bench_family(family: str, args) -> None:
    name, latent, quant = FAMILIES[family]
    torch.manual_seed(0)
    ours = zoo.build(name).eval()
    with torch.no_grad():
        for p in ours.parameters():  # trained-like magnitudes: unit-ish activations through 30 GroupNorm'd layers
            p.normal_(0, 0.02)
    ref = peer(latent, quant)
    ref.load_state_dict(autoencoder_to_diffusers(ours.state_dict()), strict=True)
    z = torch.randn(1, latent, args.height // 8, args.width // 8)

    def ref_decode(tiled: bool):
        (ref.enable_tiling if tiled else ref.disable_tiling)()
        ref.tile_latent_min_size, ref.tile_sample_min_size = args.tile, args.tile * 8
        ref.tile_overlap_factor = args.overlap / args.tile
        return ref.decode(z).sample

    runs = {
        "zoo whole": lambda: ours.decode(z),
        "diffusers whole": lambda: ref_decode(False),
        "zoo tiled": lambda: ours.decode(z, tile=args.tile, overlap=args.overlap),
        "diffusers tiled": lambda: ref_decode(True),
    }
    with torch.inference_mode():
        outs, mems = {}, {}
        for label, fn in runs.items():  # also the warm-up of median_times' first round
            outs[label], mems[label] = peak_rss_during(fn)
        times = median_times(runs, repeats=args.repeats, warmup=0)
    scale = outs["diffusers whole"].abs().max()
    err = lambda a, b: ((outs[a] - outs[b]).abs().max() / scale).item()
    print(f"\n{name}: latent {tuple(z.shape)} -> image {args.height}x{args.width}, tile {args.tile} "
          f"(= {args.tile * 8} px), overlap {args.overlap}; zoo vs diffusers whole: max rel diff "
          f"{err('zoo whole', 'diffusers whole'):.1e}")
    print(f"{'':16s} {'median s':>9s} {'peak RSS +MB':>13s} {'tiled vs whole':>15s}")
    for label in runs:
        who = label.split()[0]
        vs = f"{err(label, who + ' whole'):15.3f}" if label.endswith("tiled") else f"{'':15s}"
        print(f"{label:16s} {times[label]:9.2f} {mems[label] / 2**20:13.0f} {vs}")
    for mode in ("whole", "tiled"):
        t = times[f"zoo {mode}"] / times[f"diffusers {mode}"]
        m = mems[f"zoo {mode}"] / max(mems[f"diffusers {mode}"], 1)
        print(f"ratio zoo/diffusers, {mode}: time {t:.3f}, peak memory {m:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=64, help="tile size in latent pixels (64 = 512 image pixels)")
    ap.add_argument("--overlap", type=int, default=16, help="overlap in latent pixels")
    ap.add_argument("--families", nargs="+", default=["sd", "flux"], choices=sorted(FAMILIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.height % 8 or args.width % 8:
        raise SystemExit(f"--height/--width must be multiples of 8, got {args.height}x{args.width}")
    exact_rss()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, fp32, batch 1")
    for family in args.families:
        bench_family(family, args)


if __name__ == "__main__":
    main()
