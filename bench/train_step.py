"""One training step (forward, backward, AdamW): our UNet and Flux vs diffusers' on the same weights (fp32, CPU).

    python bench/train_step.py [--models unet flux] [--threads 2 --repeats 3]

Models: the SD1.5 UNet at full width on a 32x32 latent (77 text tokens), and Flux at the mid config of
bench/flux_forward.py (1024 wide, 2 double + 4 single blocks, 1024 image + 128 text tokens); batch 1.
A step is: model output -> mean-square loss -> backward -> torch.optim.AdamW (fused) step -> grads set to None.
The two models share one copy of the weights (ours are views of diffusers' tensors); each side is measured with
its own optimizer, one after the other (two SD1.5 AdamW states do not fit beside each other in this machine's
memory), so the calls are not interleaved: on a shared machine the medians carry the load of their minutes.
The SD1.5 UNet step needs about 14 GB (weights, gradients, AdamW state, activations).
For each: median step seconds with checkpointing off and on (ours: `gradient_checkpointing(True)`, per block; diffusers:
`enable_gradient_checkpointing()`), and the peak RSS growth during one step (activations + gradients; the
weights and the optimizer state exist before it, after a warm-up step), and the ratios ours/diffusers.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import pairs  # noqa: E402
from bench.common import exact_rss, median_time, peak_rss_during  # noqa: E402

BUILDERS = {"unet": lambda: pairs.unet("sd15", 32), "flux": lambda: pairs.flux()}


def measure(model: torch.nn.Module, run, checkpointing, repeats: int) -> dict:
    """Median step seconds and one step's peak RSS growth, checkpointing off then on."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # no foreach temporaries

    def step():
        loss = run(model).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {}
    for on in (False, True):
        checkpointing(on)
        step()  # warm-up; also allocates the optimizer state, which is not part of the step's peak
        out[f"ckpt {'on' if on else 'off'} s"] = median_time(step, repeats=repeats, warmup=0)
        out[f"ckpt {'on' if on else 'off'} peak MB"] = peak_rss_during(step)[1] / 2**20
    return out


def diffusers_checkpointing(model):
    return lambda on: model.enable_gradient_checkpointing() if on else model.disable_gradient_checkpointing()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    exact_rss()
    torch.set_num_threads(args.threads)
    print(f"fp32, {args.threads} threads, median of {args.repeats} steps per setting, sides measured in turn")
    for name in args.models:
        pair = BUILDERS[name]()
        with torch.no_grad():
            err = pairs.rel_err(pair.run_ours(pair.ours), pair.run_ref(pair.ref))
        label, ours, ref = pair.name, pair.ours, pair.ref
        res = {"diffusers": measure(ref, pair.run_ref, diffusers_checkpointing(ref), args.repeats)}
        gc.collect()  # diffusers' optimizer state goes before ours is made
        res["zoo"] = measure(ours, pair.run_ours, ours.gradient_checkpointing, args.repeats)
        print(f"\n{label} (forward rel diff {err:.1e})")
        print(f"{'':10s} {'step s':>9s} {'ckpt step s':>12s} {'peak MB':>9s} {'ckpt peak MB':>13s}")
        for impl, r in res.items():
            print(f"{impl:10s} {r['ckpt off s']:9.3f} {r['ckpt on s']:12.3f} {r['ckpt off peak MB']:9.0f} "
                  f"{r['ckpt on peak MB']:13.0f}")
        z, d = res["zoo"], res["diffusers"]
        print(f"ratio zoo/diffusers: time {z['ckpt off s'] / d['ckpt off s']:.3f} (checkpointed "
              f"{z['ckpt on s'] / d['ckpt on s']:.3f}), peak memory {z['ckpt off peak MB'] / d['ckpt off peak MB']:.3f}"
              f" (checkpointed {z['ckpt on peak MB'] / d['ckpt on peak MB']:.3f})", flush=True)
        del pair, ours
        gc.collect()


if __name__ == "__main__":
    main()
