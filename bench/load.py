"""Checkpoint loading: `zoo.load` vs diffusers' `from_single_file` on the same file, each in a fresh process.

    python bench/load.py [--dir /tmp/zoo-bench-load] [--cases flux,flux-fp32,flux-fp8,sd15] [--repeats 3] [--keep]

Generates once (into a temp folder, never the repo) a full-width Flux with 1 double + 2 single blocks in bf16
(~1.4 GB) and a full SD1.5 UNet in fp16 (~1.7 GB). Each load runs in its own process (`--repeats` of them per
implementation, interleaved; medians reported); peak RSS is the kernel's
high-water mark (VmHWM) reset after the imports, so it is the load's own peak (file pages it touched count).
"Touched" then reads one byte of every weight page, so lazy (memory-mapped) loading cannot hide memory.
Target: peak RSS <= 1.2 x file size + 300 MB, and below diffusers (where the loaded model is larger than the
file, e.g. bf16 -> fp32, the model's size takes the file's place in the target).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLUX = dict(spec="flux-dev", overrides=dict(depth=1, depth_single_blocks=2), dtype="bfloat16", diffusers_cls=
            "FluxTransformer2DModel", diffusers_cfg=dict(num_layers=1, num_single_layers=2, guidance_embeds=True))
# SD1.5 UNet weights under the prefix of the released full checkpoints (diffusers' single-file loader needs it)
SD15 = dict(spec="sd15", overrides={}, dtype="float16", diffusers_cls="UNet2DConditionModel",
            diffusers_cfg=dict(cross_attention_dim=768), prefix="model.diffusion_model.")
# case -> (checkpoint, zoo.load keyword arguments, diffusers torch_dtype or None for no peer)
CASES = {
    "flux": (FLUX, {}, "bfloat16"),
    "flux-fp32": (FLUX, {"dtype": "fp32"}, "float32"),
    "flux-fp8": (FLUX, {"dtype": "fp8", "compute_dtype": "fp32"}, None),
    "sd15": (SD15, {}, "float16"),
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _touch(model) -> None:
    """Read one byte per 4 KiB page of every parameter and buffer: makes lazily mapped weights resident."""
    import torch

    for t in [*model.parameters(), *model.buffers()]:
        flat = t.detach().reshape(-1).view(torch.uint8)
        torch.sum(flat[::4096])


def worker(kind: str, case: str, path: str, cfg_dir: str) -> dict:
    """One load in this (fresh) process: times and peak RSS above the post-import baseline."""
    import torch

    ckpt, kwargs, peer_dtype = CASES[case]
    if kind == "zoo":
        import zoo

        load = lambda: zoo.load(None, path, **kwargs)
    else:
        import diffusers

        cls = getattr(diffusers, ckpt["diffusers_cls"])
        load = lambda: cls.from_single_file(path, config=cfg_dir, torch_dtype=getattr(torch, peer_dtype))
    base = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    peak_load, after_load = _status("VmHWM") - base, _status("VmRSS") - base
    _touch(model)
    peak_touched = _status("VmHWM") - base
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return dict(load_s=load_s, peak_load=peak_load, after_load=after_load, peak_touched=peak_touched,
                model_bytes=nbytes, base=base)


def generate(ckpt: dict, path: Path, cfg_dir: Path) -> None:
    """A random checkpoint of `ckpt`'s shapes (official layout) and the diffusers config beside it."""
    import diffusers
    import torch

    import zoo
    from checkpoints_convert.io import save_file

    meta = zoo.build(ckpt["spec"], device="meta", **ckpt["overrides"]).state_dict()
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, ckpt["dtype"])
    prefix = ckpt.get("prefix", "")
    sd = {prefix + k: torch.empty(v.shape, dtype=dtype).uniform_(-0.05, 0.05, generator=g) for k, v in meta.items()}
    save_file(sd, path)
    with torch.device("meta"):
        getattr(diffusers, ckpt["diffusers_cls"])(**ckpt["diffusers_cfg"]).save_config(cfg_dir)


def _run(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "zoo-bench-load"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints for the next run")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--generate", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.generate:
        name, path, cfg_dir = args.generate
        generate({"flux": FLUX, "sd15": SD15}[name], Path(path), Path(cfg_dir))
        print("{}")
        return

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        ckpt, _, peer_dtype = CASES[case]
        name = "flux" if ckpt is FLUX else "sd15"
        path, cfg_dir = folder / f"{name}.safetensors", folder / f"{name}-config"
        if not path.exists():
            t0 = time.perf_counter()
            _run(["--generate", name, str(path), str(cfg_dir)])
            print(f"generated {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
        size = path.stat().st_size
        kinds = ["zoo"] + (["diffusers"] if peer_dtype else [])
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:  # interleaved, so that load from elsewhere hits both alike
                runs[kind].append(_run(["--worker", kind, case, str(path), str(cfg_dir)]))
        for kind in kinds:
            r = {key: statistics.median(x[key] for x in runs[kind]) for key in runs[kind][0]}
            rows.append((case, kind, size, r))
            print(_row(case, kind, size, r), flush=True)
    print("\ncase       impl       file GB  load s  peak@load GB  peak touched GB  touched/file  target")
    for case, kind, size, r in rows:
        print(_row(case, kind, size, r))
    compute_dtype_matmul()
    if not args.keep:
        for p in folder.glob("*"):
            if p.is_file():
                p.unlink()
            else:
                for q in p.glob("*"):
                    q.unlink()
                p.rmdir()
        folder.rmdir()


def compute_dtype_matmul(tokens: int = 64) -> None:
    """One Flux MLP projection (3072 -> 12288) on `tokens` rows: bf16 storage computed in bf16 vs upcast to fp32."""
    import torch
    from torch import nn

    from layers.cast import cast_layers

    torch.manual_seed(0)
    x = torch.randn(tokens, 3072)
    plain = nn.Sequential(nn.Linear(3072, 12288)).to(torch.bfloat16)
    rows = [("bf16 weights, bf16 compute", plain, x.bfloat16(), 1)]
    for name, dtype in (("bf16 weights, fp32 compute", torch.bfloat16), ("fp8 weights, fp32 compute",
                                                                        torch.float8_e4m3fn)):
        m = nn.Sequential(nn.Linear(3072, 12288))
        m[0].weight.data = m[0].weight.data.to(dtype)
        cast_layers(m, torch.float32)
        rows.append((name, m, x, 5))
    flops = 2 * tokens * 3072 * 12288
    print(f"\ncompute_dtype: one 3072 -> 12288 Linear on {tokens} tokens ({flops / 1e9:.1f} GFLOP)")
    with torch.no_grad():
        for name, m, inp, reps in rows:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                m(inp)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            print(f"  {name:28s} {t * 1e3:9.1f} ms  {flops / t / 1e9:7.1f} GFLOP/s")


def _row(case: str, kind: str, size: int, r: dict) -> str:
    ok = r["peak_touched"] <= 1.2 * max(size, r["model_bytes"]) + 300e6
    return (f"{case:10s} {kind:9s} {size / 1e9:7.2f} {r['load_s']:7.2f} {r['peak_load'] / 1e9:13.2f} "
            f"{r['peak_touched'] / 1e9:16.2f} {r['peak_touched'] / size:13.2f}  {'ok' if ok else 'over'}")


if __name__ == "__main__":
    main()
