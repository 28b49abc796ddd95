"""What every pipeline shares: seeded noise, the progress bar, conditioning batches, image conversion and PNG output."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

import samplers
from checkpoints_convert import atomic_path

Callback = samplers.Callback  # callback(step, total, x); a tensor it returns replaces the state


def generator_for(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """The generator a call draws from: the one given, a fresh CPU one seeded with `seed`, or None (global RNG)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed= or generator=, not both")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return torch.Generator().manual_seed(seed)
    return generator


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    """Standard normal noise in float32 drawn on the generator's device, then moved (as diffusers' `randn_tensor`),
    so a CPU seed gives the same image on every device."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def check_latents(latents: Tensor, want: tuple[int, ...], what: str = "latents") -> Tensor:
    """User-supplied latents must have exactly the shape this call makes (batch included)."""
    if not isinstance(latents, Tensor) or tuple(latents.shape) != tuple(want):
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"{what} has shape {got}, expected {tuple(want)} (batch = prompts x batch, then the "
                         "latent grid of height x width)")
    return latents.float()


def check_size(height: int, width: int, multiple: int, family: str) -> None:
    """Image sizes must be positive multiples of what the VAE stride (times the patch size) can take."""
    for name, n in (("height", height), ("width", width)):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or n % multiple:
            hint = (f"; use {max(n // multiple, 1) * multiple} or {(n // multiple + 1) * multiple}"
                    if isinstance(n, int) else "")
            raise ValueError(f"{family}: {name}={n!r} is not a positive multiple of {multiple} "
                             f"(VAE stride x patch){hint}")


def repeat_batch(cond: Mapping[str, Tensor], batch: int) -> dict[str, Tensor]:
    """Each prompt's conditioning repeated `batch` times along dim 0 (prompt-major, as num_images_per_prompt)."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer (images per prompt), got {batch!r}")
    return {k: v.repeat_interleave(batch, dim=0) for k, v in cond.items()}


def check_conditioning(cond: Mapping[str, Tensor], keys: tuple[str, ...], what: str = "conditioning") -> int:
    """A conditioning dict (as zoo.text returns) must hold `keys` with one shared batch size; returns it."""
    if not isinstance(cond, Mapping):
        raise TypeError(f"{what} must be a dict with keys {keys} (as zoo.text returns), got {type(cond).__name__}")
    missing = [k for k in keys if k not in cond]
    if missing:
        raise ValueError(f"{what} lacks {missing}; expected keys {keys} (as zoo.text returns)")
    sizes = {k: cond[k].shape[0] for k in keys}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{what} entries disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def progress(total: int, enabled: bool, callback: Callback, desc: str) -> tuple[Callback, Callable[[], None]]:
    """A sampler callback advancing a tqdm bar, then calling the user's callback; and a function closing the bar."""
    if not enabled:
        return callback, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=None)  # None: off in a redirected log

    def step(i: int, n: int, x: Tensor) -> Tensor | None:
        bar.update(1)
        return callback(i, n, x) if callback is not None else None

    return step, bar.close


def run_sampler(model_fn, noise: Tensor, *, desc: str, progress_bar: bool, callback: Callback, **options) -> Tensor:
    """`samplers.sample` under a progress bar: every pipeline's denoising loop is this one call."""
    steps = (len(options["timesteps"]) - (options["timesteps"][-1] <= options["schedule"].end_time)
             if options.get("timesteps") is not None else options["steps"])
    cb, close = progress(int(steps), progress_bar, callback, desc)
    try:
        with torch.no_grad():
            return samplers.sample(model_fn, noise, callback=cb, **options)
    finally:
        close()


def cfg(scale: float) -> samplers.Guidance | None:
    """Classifier-free guidance at `scale` (the model function then returns [uncond, cond]); None when scale <= 1."""
    return samplers.Guidance(float(scale)) if scale > 1.0 else None


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def image_to_model(image: Tensor, height: int, width: int, batch: int, device, dtype=torch.float32) -> Tensor:
    """An RGB image (B, 3, H, W) in [0, 1] (a PIL image is converted) -> [-1, 1], checked against height x width."""
    if not isinstance(image, Tensor):
        image = from_pil(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor (B, 3, H, W) in [0, 1] or a PIL image, got "
                         f"{image.dtype} {tuple(image.shape)}")
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(f"image is {image.shape[-2]}x{image.shape[-1]}, but height x width = {height}x{width}")
    if image.shape[0] not in (1, batch):
        raise ValueError(f"image has batch {image.shape[0]}, expected 1 or {batch} (prompts x batch)")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"image values lie in [{image.min().item():.3g}, {image.max().item():.3g}], expected [0, 1]")
    return (image.to(device, dtype) * 2 - 1).expand(batch, -1, -1, -1)


def to_unit(decoded: Tensor) -> Tensor:
    """Decoder output in about [-1, 1] -> float32 image in [0, 1]."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_pil / save_png need Pillow: pip install 'zoo[image]' (or pip install pillow)") from e
    return Image


def to_pil(images: Tensor) -> list:
    """(B, 3, H, W) or (3, H, W) floats in [0, 1] -> a list of RGB PIL images (needs Pillow, extra `[image]`)."""
    Image = _pil()
    if not isinstance(images, Tensor) or images.ndim not in (3, 4) or images.shape[-3] not in (1, 3):
        raise ValueError(f"to_pil expects (B, 3, H, W) or (3, H, W) in [0, 1], got {getattr(images, 'shape', images)}")
    images = images[None] if images.ndim == 3 else images
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def from_pil(image) -> Tensor:
    """A PIL image -> (1, 3, H, W) float32 in [0, 1]."""
    import numpy as np

    if not hasattr(image, "convert"):
        raise TypeError(f"expected a tensor or a PIL image, got {type(image).__name__}")
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def save_png(images: Tensor, path: str | Path) -> list[Path]:
    """Write (B, 3, H, W) images in [0, 1] as PNG: `path` itself for one image, `stem-i.png` for several."""
    pics = to_pil(images)
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_png writes .png files, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [path] if len(pics) == 1 else [path.with_name(f"{path.stem}-{i}.png") for i in range(len(pics))]
    for pic, p in zip(pics, paths):
        with atomic_path(p) as tmp:
            pic.save(tmp, format="PNG")
    return paths


def load_image(path: str | Path) -> Tensor:
    """A PNG/JPEG file -> (1, 3, H, W) float32 in [0, 1]."""
    return from_pil(_pil().open(path))
