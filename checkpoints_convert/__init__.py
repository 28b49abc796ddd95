"""Checkpoint I/O and key maps between official, diffusers and other layouts (imports nothing of zoo/layers)."""
from checkpoints_convert.autoencoder import autoencoder_from_diffusers, autoencoder_to_diffusers
from checkpoints_convert.convert import cast, convert
from checkpoints_convert.detect import DetectError, Detection, detect
from checkpoints_convert.flux import flux_from_diffusers, flux_to_diffusers
from checkpoints_convert.io import Checkpoint, CheckpointError, atomic_path, load_file, save_file
from checkpoints_convert.keymap import Entry, KeyMapError, to_diffusers, to_official
from checkpoints_convert.sana import sana_from_diffusers, sana_to_diffusers
from checkpoints_convert.unet import (
    controlnet_from_diffusers,
    controlnet_to_diffusers,
    t2i_adapter_from_diffusers,
    t2i_adapter_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)

__all__ = [
    "atomic_path",
    "autoencoder_from_diffusers", "autoencoder_to_diffusers",
    "flux_from_diffusers", "flux_to_diffusers", "Entry", "KeyMapError", "to_diffusers", "to_official",
    "sana_from_diffusers", "sana_to_diffusers",
    "unet_from_diffusers", "unet_to_diffusers", "controlnet_from_diffusers", "controlnet_to_diffusers",
    "t2i_adapter_from_diffusers", "t2i_adapter_to_diffusers",
    "load_file", "save_file", "Checkpoint", "CheckpointError", "detect", "Detection", "DetectError", "convert", "cast",
]
