"""The LoRA formats API in one import: the canonical `Factor` (lora.factor), per-family name maps (lora.names),
file formats (lora.files) and a model's adapters to and from files (lora.adapters)."""
from __future__ import annotations

from lora.adapters import LoadReport, factors_of, load, save
from lora.factor import Factor, join, split
from lora.files import FORMATS, convert, detect, load_file, read, write
from lora.names import Family, family_of_checkpoint, family_of_keys, family_of_model, flux_family

__all__ = ["Factor", "join", "split", "FORMATS", "detect", "read", "write", "convert", "load_file", "Family",
           "family_of_checkpoint", "family_of_keys", "family_of_model", "flux_family", "LoadReport", "load", "save",
           "factors_of"]
