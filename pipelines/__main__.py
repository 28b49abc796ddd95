"""python -m pipelines SYSTEM --model PATH --prompt "..." [--image IN] --out OUT.png [options]

Systems: flux, sd, sdxl, sana, panorama, perception, scribble, bridge. `--model` is anything `pipelines.load` reads
(a diffusers repo folder, a folder of separate files, one all-in-one checkpoint). `--image`: the img2img source
(flux, sd, sdxl), the panorama to perceive (perception), the sketch (scribble) or the source image (bridge).
`--lora FILE:SCALE` (repeatable): a LoRA file in any format `lora.load` reads, activated at SCALE; for perception
each file is one adapter named by the file's stem (depth.safetensors -> task "depth", depth_rgb.safetensors -> the
condition adapter of "depth"), or a folder laid out as the published OmniX adapters (rgb_to_<task>/{rgb,<task>}/).
`--attention-maps` (scribble): one cross-attention heatmap per prompt token, OUT-tokNN.png. A tqdm bar shows the
steps; a summary line gives the seconds (loading apart), seconds per step and the peak memory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

SYSTEMS = ("flux", "sd", "sdxl", "sana", "panorama", "perception", "scribble", "bridge")
NEEDS_IMAGE = ("perception", "scribble", "bridge")
NEEDS_PROMPT = ("flux", "sd", "sdxl", "sana", "panorama", "scribble")


def parse_lora(spec: str) -> tuple[Path, float]:
    """FILE:SCALE (SCALE optional, default 1) -> (path, scale); the last colon splits, so C:\\ paths work."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("--model", required=True, help="diffusers repo folder, folder of separate files or one checkpoint")
    p.add_argument("--prompt", help="the prompt (needs the text encoders in --model)")
    p.add_argument("--negative-prompt", default=None, help="sd, sdxl, sana, scribble (CFG)")
    p.add_argument("--image", help="input image: img2img source, panorama, sketch or bridge source")
    p.add_argument("--strength", type=float, default=0.6, help="img2img strength (flux, sd, sdxl)")
    p.add_argument("--out", required=True, help="output .png (several images: OUT-0.png, OUT-1.png, ...)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default=None, help="storage dtype of the diffusion model and text encoders: "
                   "fp32, bf16, fp16, fp8 (the VAE keeps its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", action="store_true", help="keep each part on the CPU except while it runs")
    p.add_argument("--lora", action="append", default=[], metavar="FILE:SCALE")
    p.add_argument("--tasks", default=None, help="perception: comma-separated adapters to run (default: all)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--attention-maps", action="store_true",
                   help="scribble: also write the prompt tokens' cross-attention heatmaps (OUT-tokNN.png)")
    return p


def _check(a: argparse.Namespace) -> None:
    """Everything that can be wrong with the command line, before any weight is read."""
    out = Path(a.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {a.out!r}")
    if a.image is not None and out.resolve() == Path(a.image).resolve():
        raise ValueError(f"--out {a.out} would overwrite the input --image")
    if a.system in NEEDS_IMAGE and a.image is None:
        what = {"perception": "panorama", "scribble": "sketch", "bridge": "source image"}[a.system]
        raise ValueError(f"{a.system} needs --image (the {what})")
    if a.system in NEEDS_PROMPT and a.prompt is None:
        raise ValueError(f"{a.system} needs --prompt")
    if a.system == "perception" and not a.lora:
        raise ValueError("perception needs one --lora FILE per task (the file's stem names the task)")
    if a.system == "perception" and a.sampler is not None:
        raise ValueError("perception runs OmniX's Euler steps with the seam blend between them; drop --sampler")
    if a.system == "bridge" and len(a.lora) > 1:
        raise ValueError("bridge takes one --lora FILE:SCALE (its scale is lora_scale)")
    for spec in a.lora:
        f, _ = parse_lora(spec)
        if not (f.is_file() or (a.system == "perception" and f.is_dir())):
            raise ValueError(f"--lora {spec}: no such file {f}")
    if a.image is not None and not Path(a.image).is_file():
        raise ValueError(f"--image {a.image}: no such file")


def _dtypes(a: argparse.Namespace) -> dict[str, str] | None:
    if a.dtype is None:
        return None
    return {role: a.dtype for role in ("model", "unet", "clip", "clip_g", "t5", "gemma")}


def _peak_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB CUDA"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # Linux: KiB


def _options(a: argparse.Namespace, *names: str) -> dict:
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def run(a: argparse.Namespace) -> tuple[dict[str, torch.Tensor], int]:
    """Load the system, run it; returns {output suffix: images} and the number of steps taken."""
    import lora
    import pipelines
    from pipelines.common import load_image

    parts = pipelines.load(a.system, a.model, dtype=_dtypes(a), device=a.device, offload=a.offload)
    a.loaded_at = time.perf_counter()  # the summary's s/step counts from here (loading excluded)
    model = getattr(parts, "model", None) or parts.unet
    names = []
    for spec in a.lora:
        f, scale = parse_lora(spec)
        if f.is_dir():  # perception: the published OmniX folder, every task in it
            names += [(n, scale) for n in pipelines.perception.load_published(model, f, scale=scale)]
            continue
        name = "".join(c if c.isalnum() else "_" for c in f.stem)
        try:
            lora.load(model, f, adapter=name, multiplier=scale if a.system == "perception" else 1.0)
        except ValueError as e:  # most often a LoRA made for another model family
            raise ValueError(f"--lora {f} does not fit this {a.system} model ({type(model).__name__}): {e}") from e
        names.append((name, scale))
    if names and a.system not in ("perception", "bridge"):
        lora.set_adapter(model, [n for n, _ in names], weights=[s for _, s in names])
    image = load_image(a.image) if a.image is not None else None
    run = dict(seed=a.seed, **_options(a, "steps", "guidance", "sampler"))
    size = _options(a, "height", "width")
    s = a.system
    if s in ("flux", "sd", "sdxl", "sana", "panorama"):
        if image is not None:
            if s in ("sana", "panorama"):
                raise ValueError(f"{s} has no img2img; drop --image")
            size = {"height": image.shape[-2], "width": image.shape[-1], **size}
            run.update(image=image, strength=a.strength)
        if s != "flux" and s != "panorama" and a.negative_prompt is not None:
            run["negative_prompt"] = a.negative_prompt
        out = getattr(pipelines, "sd" if s == "sdxl" else s).generate(parts, a.prompt, **run, **size)
        return {"": out}, _steps(parts, s, a)
    if s == "perception":
        perception = pipelines.perception
        cond = {perception.condition_adapter(n, c) for n, _ in names for c in perception.conditions_of(n)}
        tasks = a.tasks.split(",") if a.tasks else [n for n, _ in names if n not in cond]
        run.pop("sampler", None)
        maps = pipelines.perception.generate(parts, image, tasks, prompt=a.prompt, **run)
        return {f"-{t}": m for t, m in maps.items()}, len(tasks) * (a.steps or 28)
    if s == "scribble":
        out = pipelines.scribble.generate(parts, image, a.prompt, a.negative_prompt, attention_maps=a.attention_maps,
                                          **run)
        if a.attention_maps:  # one heatmap per token of the prompt (BOS, words, EOS), at the image's size
            out, maps = out
            n = len(parts.tok.encode(a.prompt, parts.tok.max_length))
            heat = pipelines.scribble.token_heatmaps(maps[0], n, tuple(out.shape[-2:]))
            return {"": out, **{f"-tok{i:02d}": h for i, h in enumerate(heat)}}, a.steps or 50
        return {"": out}, a.steps or 50
    run.pop("guidance", None)
    run.pop("sampler", None)
    out = pipelines.bridge.generate(parts, image, lora_scale=names[0][1] if names else None, **run)
    return {"": out}, a.steps or 1


def _steps(parts, system: str, a: argparse.Namespace) -> int:
    if a.steps is not None:
        return a.steps
    if system == "flux":
        return 28 if getattr(parts.model, "guidance_in", None) is not None else 4
    return {"sd": 30, "sdxl": 30, "sana": 20, "panorama": 28}[system]


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from pipelines.common import save_png

    try:
        _check(a)
        t0 = time.perf_counter()
        outputs, steps = run(a)
        t1 = time.perf_counter()
        seconds, generating = t1 - t0, t1 - a.loaded_at
        out = Path(a.out)
        written = [p for suffix, images in outputs.items()
                   for p in save_png(images, out.with_name(f"{out.stem}{suffix}.png"))]
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in written)}: {seconds:.2f} s (loading {seconds - generating:.2f} s), "
          f"{generating / max(steps, 1):.3f} s/step "
          f"({steps} steps), peak memory {_peak_memory()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
