"""Sana's ReLU linear attention vs softmax SDPA at the same width: time, peak memory and growth with tokens.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/linear_attention.py [--tokens 1024 4096 16384 65536 --width 256]

Both take the same (1, H, N, D) q, k, v (fp32) and return (1, N, H*D). Prints per N the median time (the calling
thread's CPU time with one torch thread, else wall time; a call over 10 s is timed once) and the
peak memory growth of one call for each, the ratio softmax/linear, and the fitted exponent a of time ~ N^a
(least squares on log-log; linear attention should give about 1, softmax about 2). On CUDA memory is
`max_memory_allocated`; on CPU it is the resident-set growth during the call, which needs glibc to map large
tensors on their own (MALLOC_MMAP_THRESHOLD_=65536): otherwise freed blocks are reused and growth reads as 0.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import peak_rss_during  # noqa: E402
from layers.attention import attention  # noqa: E402
from layers.linear_attention import linear_attention  # noqa: E402


def measure(fn, device: torch.device, repeats: int, clock) -> tuple[float, int]:
    """(median seconds by `clock`, peak bytes above the level before the call); a call over 10 s is timed once."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def call():
        out = fn()
        sync()
        return out

    if device.type == "cuda":
        call()  # kernels loaded, workspace allocated
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = clock()
        call()
        first, peak = clock() - t0, torch.cuda.max_memory_allocated() - base
    else:
        t0 = clock()
        _, peak = peak_rss_during(call)
        first = clock() - t0
    if first > 10.0:
        return first, peak
    times = []
    for _ in range(repeats):
        t0 = clock()
        call()
        times.append(clock() - t0)
    return statistics.median(times), peak


def slope(ns: list[int], ts: list[float]) -> float:
    """Least-squares slope of log t against log N."""
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--width", type=int, default=256, help="H * D, the same for both")
    ap.add_argument("--head-dim", type=int, default=32, help="Sana's linear_head_dim")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    heads = args.width // args.head_dim
    # one CPU thread: time by this thread's CPU time, which counts neither waiting for a core on a shared machine
    # nor the memory-sampling thread
    cpu_clock = device.type == "cpu" and args.threads == 1
    clock = time.thread_time if cpu_clock else time.perf_counter

    rows = []
    with torch.inference_mode():
        for n in args.tokens:
            g = torch.Generator(device=device).manual_seed(n)
            qkv = [torch.randn(1, heads, n, args.head_dim, generator=g, device=device) for _ in range(3)]
            t_lin, m_lin = measure(lambda qkv=qkv: linear_attention(*qkv), device, args.repeats, clock)
            t_soft, m_soft = measure(lambda qkv=qkv: attention(*qkv), device, args.repeats, clock)
            rows.append((n, t_lin, m_lin, t_soft, m_soft))
            print(f"N={n:6d}  linear {t_lin * 1e3:9.2f} ms {m_lin / 2**20:8.1f} MiB   softmax {t_soft * 1e3:10.2f} ms "
                  f"{m_soft / 2**20:8.1f} MiB   time softmax/linear {t_soft / t_lin:7.1f}x", flush=True)
            del qkv

    ns = [r[0] for r in rows]
    print(f"\n{device.type}, {args.threads} threads, fp32, width {args.width} = {heads} heads x {args.head_dim}, "
          f"{'CPU' if cpu_clock else 'wall'} time")
    if len(rows) >= 2:
        print(f"fitted time exponent over N={ns[0]}..{ns[-1]}: linear {slope(ns, [r[1] for r in rows]):.2f}, "
              f"softmax {slope(ns, [r[3] for r in rows]):.2f}")
    if len(rows) >= 3:
        tail = rows[-3:]
        print(f"over the largest three N: linear {slope([r[0] for r in tail], [r[1] for r in tail]):.2f}, "
              f"softmax {slope([r[0] for r in tail], [r[3] for r in tail]):.2f}")


if __name__ == "__main__":
    main()
