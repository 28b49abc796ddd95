"""Checkpoint I/O and key maps between official, diffusers and other layouts (imports nothing of zoo/layers)."""
from checkpoints_convert.flux import flux_from_diffusers, flux_to_diffusers
from checkpoints_convert.keymap import Entry, KeyMapError, to_diffusers, to_official

__all__ = ["flux_from_diffusers", "flux_to_diffusers", "Entry", "KeyMapError", "to_diffusers", "to_official"]
