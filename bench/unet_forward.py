"""UNet forward: zoo vs diffusers on the same weights (SD 1.5 widths by default), CPU, one process.

    python bench/unet_forward.py --latent 32 --threads 2 --repeats 5 [--profile]

Prints median forward times and their ratio (zoo / diffusers), achieved GFLOP/s as a fraction of a GEMM measured
in the same run, the extra peak resident memory of each forward, and the max relative difference of the outputs.
The two models share one copy of the weights (zoo's tensors are views of diffusers', loaded with assign=True).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo
from checkpoints_convert.unet import unet_from_diffusers

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def extra_peak_mib(fn) -> float:
    """Peak resident memory above the current one while `fn` runs (resets the kernel's high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kib()
    fn()
    return (peak_rss_kib() - base) / 1024


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print zoo's top ops (torch.profiler)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel(**SD15).eval()
    ours = zoo.build("sd15", device="meta")
    ours.load_state_dict(unet_from_diffusers(ref.state_dict()), strict=True, assign=True)
    ours.eval()
    b, s = args.batch, args.latent
    x, t, ctx = torch.randn(b, 4, s, s), torch.full((b,), 500.0), torch.randn(b, 77, 768)
    run = {"zoo": lambda: ours(x, t, context=ctx), "diffusers": lambda: ref(x, t, encoder_hidden_states=ctx).sample}

    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            out_ours = run["zoo"]()
        flops = fc.get_total_flops()
        err = ((out_ours - run["diffusers"]()).abs().max() / out_ours.abs().max()).item()
        times: dict[str, list[float]] = {k: [] for k in run}
        cpu: dict[str, list[float]] = {k: [] for k in run}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            for k, fn in run.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        mem = {k: extra_peak_mib(fn) for k, fn in run.items()}
        peak = max(gemm_gflops(), gemm_gflops())  # the better of two, as machine load drifts
        if args.profile:
            with torch.profiler.profile() as prof:
                run["zoo"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"SD1.5 UNet forward, latent {s}x{s}, batch {b}, fp32, {args.threads} threads, {args.repeats} repeats")
    print(f"GEMM reference: {peak:.1f} GFLOP/s; forward: {flops / 1e9:.1f} GFLOP")
    for k in run:
        gf = flops / med[k] / 1e9
        print(f"{k:10s} median {med[k] * 1e3:8.1f} ms  (min {min(times[k]) * 1e3:8.1f})  {gf:6.1f} GFLOP/s "
              f"= {gf / peak:5.1%} of GEMM  CPU time {med_cpu[k] * 1e3:8.1f} ms  extra peak RSS {mem[k]:7.1f} MiB")
    print(f"ratio zoo / diffusers: wall {med['zoo'] / med['diffusers']:.3f}, CPU time "
          f"{med_cpu['zoo'] / med_cpu['diffusers']:.3f}, of minimum wall times "
          f"{min(times['zoo']) / min(times['diffusers']):.3f}   max rel diff of outputs: {err:.2e}")


if __name__ == "__main__":
    main()
