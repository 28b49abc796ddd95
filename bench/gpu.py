"""One GPU benchmark for the few minutes a GPU is lent: ours vs diffusers in bf16 with SDPA, same weights.

    python bench/gpu.py [--json bench_gpu.json] [--compile blocks|model|none] [--repeats 10] [--no-load]
    python bench/gpu.py --tiny          # CPU smoke check of every step at toy sizes (numbers meaningless)

Without CUDA (and without --tiny) it prints a message and exits 0. Rows, all batch 1, bf16 weights and inputs:
- Flux-dev width forward: hidden 3072, 24 heads, 4 double + 8 single blocks, 4096 image + 512 text tokens;
- SDXL-base UNet forward at 128x128 latents (1024 px), 77 text tokens;
each eager and compiled (`--compile blocks`: every transformer block / ResBlock compiled on its own, "regional"
compilation, which compiles each distinct block once and keeps the whole run within minutes; `model`: the
whole forward, ours with fullgraph=True), ms per forward (median of interleaved calls), achieved TFLOP/s
(FLOPs of our forward by torch.utils.flop_counter, used for both sides so the ratio is the time ratio), MFU
against the device's dense bf16 peak (table below, or --peak-tflops), and the peak memory above the weights;
- a training step of each (forward + backward of a mean-square loss, eager; gradients dropped after);
- `zoo.load` of a generated full-size FLUX.1-dev file (19 double + 38 single blocks, ~24 GB bf16, written to
  /dev/shm) straight to the GPU: seconds, GB/s, peak GPU memory over the weights' size.
One table on stdout and the same rows as JSON (default $OUT/bench_gpu.json, else ./bench_gpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import pairs  # noqa: E402
from bench.common import count_flops, median_times, peak_rss_during  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring; the first match wins
PEAKS = [("H200", 989), ("GH200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("B200", 2250),
         ("A100", 312), ("L40S", 362), ("A10G", 125), ("L4", 121), ("4090", 165)]
# the blocks compiled one by one with --compile blocks (ours and diffusers' names)
REGIONS = {"DoubleStreamBlock", "SingleStreamBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
           "BasicTransformerBlock", "ResBlock", "ResnetBlock2D"}


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    return name, override or next((p for key, p in PEAKS if key in name), None)


class Meter:
    """Synchronised timing and peak memory (CUDA allocator; process RSS on CPU) on one device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def synced(self, fn):
        def run():
            out = fn()
            self.sync()
            return out
        return run

    def peak(self, fn) -> float:
        """Bytes allocated at the peak of fn() above what was allocated before it (GiB)."""
        if not self.cuda:
            return peak_rss_during(fn)[1] / 2**30
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**30


def compile_pair(pair: pairs.Pair, how: str, backend: str) -> tuple:
    """(ours, diffusers) callables compiled as `how` says; regional compilation changes the modules in place."""
    if how == "model":
        return (torch.compile(lambda: pair.run_ours(pair.ours), fullgraph=True, backend=backend),
                torch.compile(lambda: pair.run_ref(pair.ref), backend=backend))
    for model, full in ((pair.ours, True), (pair.ref, False)):
        for m in model.modules():
            if type(m).__name__ in REGIONS:
                m.compile(fullgraph=full, backend=backend)
    return (lambda: pair.run_ours(pair.ours)), (lambda: pair.run_ref(pair.ref))


def train_step(run, model):
    """Forward and backward of a mean-square loss; gradients dropped after (their memory counts in the peak)."""
    def step():
        loss = run(model).float().square().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss
    return step


def bench_model(pair: pairs.Pair, args, meter: Meter, peak_tflops: float | None) -> list[dict]:
    rows: list[dict] = []

    def add(mode: str, impl: str, sec: float, flops: float, mem: float, **extra) -> None:
        tflops = flops / sec / 1e12
        rows.append(dict(model=pair.name, mode=mode, impl=impl, ms=sec * 1e3, tflops=tflops,
                         mfu=tflops / peak_tflops if peak_tflops else None, peak_mem_gib=mem, **extra))

    with torch.no_grad():
        flops = count_flops(lambda: pair.run_ours(pair.ours))
        flops_ref = count_flops(lambda: pair.run_ref(pair.ref))
        eager_out = {"zoo": pair.run_ours(pair.ours), "diffusers": pair.run_ref(pair.ref)}
        err = pairs.rel_err(eager_out["zoo"], eager_out["diffusers"])
        runs = {"zoo": meter.synced(lambda: pair.run_ours(pair.ours)),
                "diffusers": meter.synced(lambda: pair.run_ref(pair.ref))}
        times = median_times(runs, args.repeats, warmup=2)
        for impl, fn in runs.items():
            add("eager", impl, times[impl], flops, meter.peak(fn), rel_diff=err, flops_zoo=flops,
                flops_diffusers=flops_ref)
        print(f"  {pair.name}: eager done", flush=True)

    # training before compiling (regional compilation changes the modules in place)
    with torch.enable_grad():
        steps = {"zoo": meter.synced(train_step(pair.run_ours, pair.ours)),
                 "diffusers": meter.synced(train_step(pair.run_ref, pair.ref))}
        train_flops = count_flops(steps["zoo"])
        times = median_times(steps, max(3, args.repeats // 2), warmup=1)
        for impl, fn in steps.items():
            add("train fwd+bwd", impl, times[impl], train_flops, meter.peak(fn))
        print(f"  {pair.name}: training step done", flush=True)

    if args.compile != "none":
        with torch.no_grad():
            ours_c, ref_c = compile_pair(pair, args.compile, args.backend)
            compiled, seconds, diffs = {}, {}, {}
            for impl, fn in (("zoo", ours_c), ("diffusers", ref_c)):
                t0 = time.perf_counter()
                out = fn()
                meter.sync()
                seconds[impl] = time.perf_counter() - t0
                diffs[impl] = pairs.rel_err(out, eager_out[impl])
                compiled[impl] = meter.synced(fn)
            times = median_times(compiled, args.repeats, warmup=2)
            for impl, fn in compiled.items():
                add(f"compiled ({args.compile})", impl, times[impl], flops, meter.peak(fn),
                    compile_s=seconds[impl], rel_diff_vs_eager=diffs[impl])
        print(f"  {pair.name}: compiled done", flush=True)
    return rows


def bench_load(args, device: torch.device, dtype: torch.dtype, meter: Meter) -> dict:
    """Generate an official-layout Flux file of random bf16 weights, then time zoo.load of it onto `device`."""
    import zoo
    from checkpoints_convert import save_file

    over = dict(hidden_size=128, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 24, 24]) if args.tiny \
        else {}
    shapes = zoo.build("flux-dev", device="meta", **over).state_dict()
    folder = Path(args.load_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
    path = folder / f"zoo-bench-flux-{os.getpid()}.safetensors"
    t0 = time.perf_counter()
    g = torch.Generator(device).manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g, device=device, dtype=dtype) * 0.02).cpu() for k, v in shapes.items()}
    save_file(sd, path)
    del sd
    gen_s = time.perf_counter() - t0
    size = path.stat().st_size
    try:
        model = None

        def load():
            nonlocal model
            model = zoo.load(zoo.get_config("flux-dev", **over), path, dtype=dtype, device=device)

        t0 = time.perf_counter()
        peak = meter.peak(load)
        load_s = time.perf_counter() - t0
        on_device = all(p.device.type == device.type for p in model.parameters())
        n = sum(p.numel() for p in model.parameters())
        del model
    finally:
        path.unlink(missing_ok=True)
    return dict(model=f"zoo.load flux-dev {n / 1e9:.2f} B params", mode="load", impl="zoo", file_gb=size / 1e9,
                generate_s=gen_s, load_s=load_s, gb_per_s=size / 1e9 / load_s, peak_mem_gib=peak,
                over_weights_gib=peak - size / 2**30 if peak else None, all_on_device=on_device)


def table(rows: list[dict]) -> str:
    lines = [f"{'model':44s} {'mode':18s} {'impl':10s} {'ms':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} "
             f"{'ratio':>6s}  notes"]
    by = {(r["model"], r["mode"], r["impl"]): r for r in rows if "ms" in r}
    for r in rows:
        if "ms" not in r:
            lines.append(f"{r['model']:44s} {'load':18s} {'zoo':10s} {r['load_s'] * 1e3:9.0f} "
                         f"{r['gb_per_s']:6.2f} GB/s, file {r['file_gb']:.1f} GB, peak {r['peak_mem_gib']:.1f} GiB")
            continue
        peer = by.get((r["model"], r["mode"], "diffusers"))
        ratio = f"{r['ms'] / peer['ms']:6.3f}" if r["impl"] == "zoo" and peer else ""
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "     -"
        notes = (f"compile {r['compile_s']:.0f} s, vs eager {r['rel_diff_vs_eager']:.1e}" if "compile_s" in r else
                 f"zoo vs diffusers rel diff {r['rel_diff']:.1e}" if "rel_diff" in r and r["impl"] == "zoo" else "")
        lines.append(f"{r['model'][:44]:44s} {r['mode']:18s} {r['impl']:10s} {r['ms']:9.2f} {r['tflops']:8.2f} "
                     f"{mfu} {r['peak_mem_gib']:9.2f} {ratio:>6s}  {notes}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: a smoke check of every step")
    ap.add_argument("--compile", choices=["blocks", "model", "none"], default="blocks")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in PEAKS")
    ap.add_argument("--models", nargs="*", default=["flux", "unet"], choices=["flux", "unet"])
    ap.add_argument("--no-load", action="store_true", help="skip the zoo.load row")
    ap.add_argument("--load-dir", default=None, help="where the generated Flux file goes (default /dev/shm)")
    ap.add_argument("--json", default=str(Path(os.environ.get("OUT", ".")) / "bench_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("bench/gpu.py: no CUDA device here, nothing measured (run with --tiny for a CPU smoke check)")
        return
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(2)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    name, peak = device_peak(device, args.peak_tflops)
    meter = Meter(device)
    print(f"torch {torch.__version__} on {name} (bf16 peak {peak or '?'} TFLOP/s), compile {args.compile}, "
          f"{'TINY smoke check' if args.tiny else 'full widths'}", flush=True)
    t_start = time.perf_counter()
    builders = {
        "flux": lambda: pairs.flux(**(dict(hidden=128, heads=2, double=1, single=1, img_tokens=64, txt_tokens=16)
                                      if args.tiny else dict(hidden=3072, heads=24, double=4, single=8,
                                                             img_tokens=4096, txt_tokens=512,
                                                             axes_dim=(16, 56, 56))), device=device, dtype=dtype),
        "unet": lambda: pairs.unet("tiny-sdxl" if args.tiny else "sdxl", latent=16 if args.tiny else 128,
                                   device=device, dtype=dtype),
    }
    rows: list[dict] = []
    for key in args.models:
        pair = builders[key]()
        rows += bench_model(pair, args, meter, peak)
        del pair
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_load:
        rows.append(bench_load(args, device, dtype, meter))
    print(table(rows))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    Path(args.json).write_text(json.dumps(dict(device=name, peak_bf16_tflops=peak, torch=torch.__version__,
                                               compile=args.compile, tiny=args.tiny, rows=rows), indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
