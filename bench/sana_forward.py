"""Our Sana vs diffusers' SanaTransformer2DModel on the same weights and inputs (fp32, CPU or CUDA).

    MALLOC_MMAP_THRESHOLD_=65536 python bench/sana_forward.py [--threads 1 --repeats 5 --depth 4 --size 1024]

Config: the Sana-600M width (hidden 1152, 36 linear heads x 32, 16 cross heads, Mix-FFN ratio 2.5), `--depth`
blocks, a `--size` px image (latent size / 32, so 1024 tokens at 1024 px) and 300 caption tokens, batch 1.
Prints the median and best wall time and the median process CPU time of each (calls interleaved, so load from
elsewhere hits both alike; on a shared machine CPU time is the steadier measure, with one thread it excludes
time spent waiting for a core), the ratios ours/diffusers, the peak memory growth of one forward, and the
forward's FLOPs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from bench.common import count_flops, peak_rss_during  # noqa: E402
from checkpoints_convert import sana_from_diffusers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=args.depth,
        num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152, caption_channels=2304,
        mlp_ratio=2.5, sample_size=32, patch_size=1).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = zoo.build("sana-600m", depth=args.depth).eval()
    ours.load_state_dict(sana_from_diffusers(ref.state_dict()), strict=True)
    device = torch.device(args.device)
    ref, ours = ref.to(device), ours.to(device)

    side = args.size // 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, side, side, generator=g).to(device)
    y = torch.randn(1, 300, 2304, generator=g).to(device)
    mask = torch.ones(1, 300, dtype=torch.long, device=device)
    mask[:, 120:] = 0  # a 120-token prompt padded to 300, as the pipelines pass it
    t = torch.tensor([700.0], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_ours():
        out = ours(x, t, y[:, None], mask=mask)
        sync()
        return out

    def run_ref():
        out = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]
        sync()
        return out

    with torch.inference_mode():
        err = ((run_ours() - run_ref()).abs().max() / run_ref().abs().max()).item()
        flops = count_flops(run_ours)
        times: dict[str, list[float]] = {"diffusers": [], "zoo": []}
        cpu: dict[str, list[float]] = {"diffusers": [], "zoo": []}
        for _ in range(args.repeats):
            for name, fn in (("diffusers", run_ref), ("zoo", run_ours)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        if device.type == "cuda":
            mem = {}
            for name, fn in (("diffusers", run_ref), ("zoo", run_ours)):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                mem[name] = torch.cuda.max_memory_allocated() - base
        else:
            mem = {"diffusers": peak_rss_during(run_ref)[1], "zoo": peak_rss_during(run_ours)[1]}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    cpu_med = {name: statistics.median(ts) for name, ts in cpu.items()}
    print(f"{device.type}, {args.threads} threads, fp32, hidden 1152 x {args.depth} blocks, {side * side} image "
          f"tokens + 300 caption tokens; max rel diff {err:.1e}; forward {flops / 1e9:.1f} GFLOP")
    print(f"{'':10s} {'median s':>9s} {'best s':>8s} {'CPU s':>8s} {'GFLOP/s':>8s} {'peak +MiB':>10s}")
    for name in ("diffusers", "zoo"):
        print(f"{name:10s} {med[name]:9.4f} {best[name]:8.4f} {cpu_med[name]:8.4f} {flops / best[name] / 1e9:8.1f} "
              f"{mem[name] / 2**20:10.1f}")
    print(f"ratio zoo/diffusers: time median {med['zoo'] / med['diffusers']:.3f}, "
          f"best {best['zoo'] / best['diffusers']:.3f}, CPU time {cpu_med['zoo'] / cpu_med['diffusers']:.3f}; "
          f"peak memory {mem['zoo'] / max(mem['diffusers'], 1):.3f}")


if __name__ == "__main__":
    main()
