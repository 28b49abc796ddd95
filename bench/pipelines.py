"""End-to-end pipelines at 4 steps: ours (pipelines.flux / pipelines.sd) vs diffusers' on the same weights.

    python bench/pipelines.py [--systems flux sd] [--threads 2 --repeats 3]

- Flux: the mid transformer of bench/flux_forward.py (1024 wide, 2 double + 4 single blocks) at 512x512 px
  (1024 image tokens), 128 text tokens, guidance 3.5 (dev), a Flux-layout VAE 64 wide; vs `FluxPipeline`.
- SD: the SD1.5 UNet at full width on 256x256 px (32x32 latents), CFG 7.5, DDIM, the SD VAE at full width; vs
  `StableDiffusionPipeline`.
Prompts enter as embeddings (no text encoders), the same for both; output tensors in [0, 1].
Prints median seconds of each run (runs interleaved), the ratio ours/diffusers, the max difference of the images,
and where the time goes: denoiser calls, VAE decode, and the rest ("outside the model calls": schedule, sampler
arithmetic, packing, guidance, pre/post-processing), measured with forward hooks on the denoiser and a timer
around the VAE's decode.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipelines  # noqa: E402
from bench import pairs  # noqa: E402

STEPS = 4


class Clock:
    """Seconds spent inside a module's forward calls and inside one method of another object."""

    def __init__(self, denoiser: torch.nn.Module, vae, method: str = "decode"):
        self.model_s = self.vae_s = 0.0
        self._t0 = 0.0
        denoiser.register_forward_pre_hook(lambda *_: self._start())
        denoiser.register_forward_hook(lambda *_: self._stop("model_s"))
        inner = getattr(vae, method)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.vae_s += time.perf_counter() - t0
            return out
        setattr(vae, method, timed)  # an instance attribute of this benchmark's own VAE object

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, field: str) -> None:
        setattr(self, field, getattr(self, field) + time.perf_counter() - self._t0)

    def reset(self) -> None:
        self.model_s = self.vae_s = 0.0


def flux_system():
    import diffusers

    pair = pairs.flux()
    vae = pairs.vae_decode(64, family="flux", ch=64)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                      max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=vae.ref, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=pair.ref)
    pipe.set_progress_bar_config(disable=True)
    parts = pipelines.flux.FluxParts(model=pair.ours, ae=vae.ours)
    g = torch.Generator().manual_seed(2)
    txt, y = torch.randn(1, 128, 4096, generator=g), torch.randn(1, 768, generator=g)
    size = dict(height=512, width=512)
    ours = lambda: pipelines.flux.generate(parts, conditioning={"txt": txt, "y": y}, **size, steps=STEPS,  # noqa: E731
                                           guidance=3.5, seed=0, progress=False)
    ref = lambda: pipe(prompt_embeds=txt, pooled_prompt_embeds=y, **size, num_inference_steps=STEPS,  # noqa: E731
                       guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    return "flux mid, 512 px", (ours, pair.ours, vae.ours), (ref, pair.ref, vae.ref)


def sd_system():
    import diffusers

    pair = pairs.unet("sd15", 32)
    vae = pairs.vae_decode(32, family="sd")
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae.ref, text_encoder=None, tokenizer=None, unet=pair.ref,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    parts = pipelines.sd.SDParts(unet=pair.ours, vae=vae.ours)
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    size = dict(height=256, width=256)
    ours = lambda: pipelines.sd.generate(parts, conditioning={"context": pos}, negative_conditioning={  # noqa: E731
        "context": neg}, **size, steps=STEPS, guidance=7.5, seed=0, progress=False)
    ref = lambda: pipe(prompt_embeds=pos, negative_prompt_embeds=neg, **size, num_inference_steps=STEPS,  # noqa: E731
                       guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    return "sd1.5 widths, 256 px", (ours, pair.ours, vae.ours), (ref, pair.ref, vae.ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=["flux", "sd"], choices=["flux", "sd"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fp32, {args.threads} threads, {STEPS} steps, median of {args.repeats} interleaved runs after one warm-up")
    for key in args.systems:
        label, *sides = {"flux": flux_system, "sd": sd_system}[key]()
        clocks = {impl: Clock(model, vae) for impl, (_, model, vae) in zip(("zoo", "diffusers"), sides)}
        runs = dict(zip(("zoo", "diffusers"), (fn for fn, *_ in sides)))
        stats: dict[str, list[tuple[float, float, float]]] = {impl: [] for impl in runs}
        with torch.inference_mode():
            images = {impl: fn() for impl, fn in runs.items()}  # warm-up
            for _ in range(args.repeats):
                for impl, fn in runs.items():
                    clocks[impl].reset()
                    t0 = time.perf_counter()
                    fn()
                    stats[impl].append((time.perf_counter() - t0, clocks[impl].model_s, clocks[impl].vae_s))
        diff = pairs.rel_err(images["zoo"], images["diffusers"])
        print(f"\n{label}: images max rel diff {diff:.1e}")
        print(f"{'':10s} {'total s':>8s} {'denoiser s':>11s} {'vae s':>7s} {'outside s':>10s} {'outside %':>10s}")
        med = {}
        for impl, rows in stats.items():
            total, model_s, vae_s = (statistics.median(r[i] for r in rows) for i in range(3))
            outside = statistics.median(r[0] - r[1] - r[2] for r in rows)
            med[impl] = total
            print(f"{impl:10s} {total:8.2f} {model_s:11.2f} {vae_s:7.2f} {outside:10.3f} {outside / total:10.2%}")
        print(f"ratio zoo/diffusers end to end: {med['zoo'] / med['diffusers']:.3f}", flush=True)


if __name__ == "__main__":
    main()
