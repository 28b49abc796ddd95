"""LoRA costs: forward overhead of the 95 "omnix" adapters on Flux (unmerged and merged), and extraction time.

    python bench/lora.py [--threads 1 --hidden 512 --img-tokens 256 --txt-tokens 64 --rank 16 --device cpu]

One thread by default: on a busy 2-core machine every multi-threaded matmul, however small, can wait ~15 ms for
its second thread, which would bill the adapters' 190 small matmuls for the scheduler rather than for their math.

Forward: a Flux with FLUX.1-dev's depth (19 double + 38 single blocks, so the preset patches its real 95 layers)
at width `--hidden`, fp32; base vs 95 rank-16 adapters unmerged vs merged, interleaved medians.
Extraction: one 3072 x 9216 difference (the shape of a Flux double block's MLP) at rank 32, full SVD vs
randomized SVD, with each one's relative error ||dW - B A|| / ||dW|| (the full SVD's is the optimum).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
import zoo  # noqa: E402
from bench.common import count_flops  # noqa: E402
from lora.extract import low_rank  # noqa: E402


def forward_overhead(args) -> None:
    dev = torch.device(args.device)
    heads = args.hidden // 64
    model = zoo.build("flux-dev", hidden_size=args.hidden, num_heads=heads, axes_dim=[16, 24, 24], device=dev).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    side = int(args.img_tokens**0.5)
    inputs, kw = model.example_inputs(height=16 * side, width=16 * side, txt_len=args.txt_tokens, device=dev)
    # a second model on the same tensors (assign=True shares them) carries the adapters; the first stays plain
    patched = zoo.build("flux-dev", hidden_size=args.hidden, num_heads=heads, axes_dim=[16, 24, 24], device="meta")
    patched.load_state_dict(model.state_dict(), assign=True)
    names = lora.inject(patched, "omnix", rank=args.rank, init="gaussian")
    with torch.no_grad():
        for layer in lora.lora_layers(patched).values():
            layer.lora_up["default"].weight.normal_(0, 0.01)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(m):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        out = m(*inputs, **kw)
        sync()
        return (time.perf_counter() - w0, time.process_time() - c0), out

    def run(kind):
        if kind == "merged":
            lora.merge(patched)
        t, out = timed(model if kind == "base" else patched)
        lora.unmerge(patched)
        return t, out

    kinds = ["base", "unmerged", "merged"]
    times, outs = {k: [] for k in kinds}, {}
    with torch.inference_mode():
        for m in (model, patched):
            m(*inputs, **kw)  # warm-up
        for i in range(args.repeats):  # interleaved in a rotating order, so load from elsewhere hits all alike
            for kind in kinds[i % 3:] + kinds[: i % 3]:
                t, outs[kind] = run(kind)
                times[kind].append(t)
    print(f"Flux depth 19+38, hidden {args.hidden}, {args.img_tokens}+{args.txt_tokens} tokens, {args.device}, "
          f"fp32, {args.threads} threads; omnix patched {len(names)} layers at rank {args.rank}; medians of "
          f"{args.repeats}: wall time and process CPU time (the latter less sensitive to other processes)")
    base_w, base_c = (statistics.median(t[j] for t in times["base"]) for j in (0, 1))
    for k, ts in times.items():
        w, c = (statistics.median(t[j] for t in ts) for j in (0, 1))
        print(f"  {k:<9} wall {w * 1e3:9.1f} ms ({100 * (w / base_w - 1):+6.1f}%)   "
              f"cpu {c * 1e3:9.1f} ms ({100 * (c / base_c - 1):+6.1f}%)")
    base_out, lora_out, merged_out = outs["base"], outs["unmerged"], outs["merged"]
    with torch.inference_mode():
        f_base, f_lora = count_flops(lambda: model(*inputs, **kw)), count_flops(lambda: patched(*inputs, **kw))
    print(f"  FLOPs: base {f_base / 1e9:.1f} G, the 95 adapters add {100 * (f_lora / f_base - 1):.2f}% "
          "(the rest of the unmerged overhead is per-call cost of 190 small matmuls)")
    err = ((merged_out - lora_out).abs().max() / lora_out.abs().max()).item()
    moved = ((lora_out - base_out).abs().max() / base_out.abs().max()).item()
    print(f"  merged vs unmerged output: max rel diff {err:.2e} (the adapters move the output by {moved:.2e})")


def full_size_flops(args) -> None:
    """FLOPs of FLUX.1-dev at 1024x1024 with 512 text tokens, counted on `meta` (no memory, no compute)."""
    model = zoo.build("flux-dev", device="meta").eval()
    inputs, kw = model.example_inputs(device="meta")
    with torch.inference_mode():
        f_base = count_flops(lambda: model(*inputs, **kw))
        lora.inject(model, "omnix", rank=args.rank, init="none")
        f_lora = count_flops(lambda: model(*inputs, **kw))
    print(f"FLUX.1-dev 1024x1024 + 512 tokens (counted on meta): base {f_base / 1e12:.1f} TFLOP, 95 rank-{args.rank} "
          f"adapters add {100 * (f_lora / f_base - 1):.3f}%")


def extraction(args) -> None:
    g = torch.Generator().manual_seed(0)
    m, n, k = 3072, 9216, 128
    decay = torch.logspace(0, -2, k)  # a fine-tune's difference: a decaying spectrum plus noise
    delta = (torch.randn(m, k, generator=g) * decay) @ torch.randn(k, n, generator=g) / k**0.5
    delta += 1e-4 * torch.randn(m, n, generator=g)
    delta = delta.to(args.device)
    results = {}
    for method in ("svd", "randomized"):
        t0 = time.perf_counter()
        up, down = low_rank(delta, args.extract_rank, method=method)
        if delta.is_cuda:
            torch.cuda.synchronize()
        results[method] = (time.perf_counter() - t0, ((delta - up @ down).norm() / delta.norm()).item())
    best = results["svd"][1]  # the truncated full SVD is the optimum (Eckart-Young)
    print(f"extraction of one {m}x{n} difference at rank {args.extract_rank} ({args.device}, fp32)")
    for method, (t, e) in results.items():
        print(f"  {method:<11} {t:8.2f} s   rel err {e:.4e}  ({100 * (e / best - 1):+.3f}% vs the optimum)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--img-tokens", type=int, default=256)
    ap.add_argument("--txt-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--extract-rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_forward:
        full_size_flops(args)
        forward_overhead(args)
    if not args.skip_extract:
        extraction(args)


if __name__ == "__main__":
    main()
