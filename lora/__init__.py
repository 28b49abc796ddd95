"""LoRA for any `nn.Module`: wrapper layers with named adapters, injection by glob or preset, merge, extraction,
and the LoRA file formats people exchange (kohya, diffusers/PEFT, XLabs, ComfyUI). Imports no model."""
from lora.adapters import LoadReport, factors_of, load, save
from lora.extract import ExtractReport, extract
from lora.factor import Factor
from lora.files import FORMATS, convert, detect
from lora.inject import (
    adapters_per_item,
    inject,
    list_targets,
    lora_layers,
    merge,
    remove,
    set_adapter,
    trainable,
    unmerge,
)
from lora.layer import LoRAConv2d, LoRALayer, LoRALinear
from lora.presets import PRESETS

__all__ = ["inject", "adapters_per_item", "set_adapter", "remove", "merge", "unmerge", "trainable", "list_targets",
           "lora_layers", "LoRALayer", "LoRALinear", "LoRAConv2d", "PRESETS", "extract", "ExtractReport", "load",
           "save", "convert", "detect", "factors_of", "Factor", "LoadReport", "FORMATS"]
