"""Benchmark helpers: median wall time, peak resident memory during a call, and this CPU's fp32 GEMM peak."""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def exact_rss() -> None:
    """Re-exec this script with glibc's mmap threshold fixed at 64 KiB, so every large tensor is its own mapping:
    RSS then rises and falls with the live tensors and `peak_rss_during` measures a call's own peak."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_during(fn: Callable[[], object], interval: float = 0.0005) -> tuple[object, int]:
    """Run fn() while sampling RSS; returns (result, peak RSS above the level before the call, in bytes)."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return out, max(peak[0], rss_bytes()) - base


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, calls interleaved so that load from elsewhere hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved fp32 GFLOP/s of an n x n x n matmul: the reference peak for 'fraction of GEMM peak'."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: a @ b, repeats=repeats) / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call as counted by torch.utils.flop_counter (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
