"""pipelines: prompt / image -> image for each system the zoo's parts compose (Flux, SD/SDXL, Sana, DiT360 panoramas,
OmniX perception, ScribbleDiffusion, LBM bridges). Each is a short top-down function: encode, noise, model function,
`samplers.sample`, decode. Images come back as float tensors (B, 3, H, W) in [0, 1]; `to_pil` / `save_png` convert.
"""
from __future__ import annotations

from pipelines import bridge, flux, panorama, perception, sana, scribble, sd
from pipelines.common import from_pil, load_image, save_png, to_pil
from pipelines.load import MissingComponent, load  # the function shadows the module name: pipelines.load(...)

__all__ = ["bridge", "flux", "panorama", "perception", "sana", "scribble", "sd", "to_pil", "save_png", "from_pil",
           "load_image", "load", "MissingComponent"]
