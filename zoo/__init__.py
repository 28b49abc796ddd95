"""zoo: hand-written diffusion models in the official layouts, composed by a registry from YAML configs.

    import zoo
    zoo.list_models()
    model = zoo.build("tiny-flux")                 # or a YAML path, a dict {"arch": ..., ...}, a config
    meta = zoo.build("flux-dev", device="meta")    # full size, no memory
    args, kwargs = zoo.example_inputs(meta, device="meta")
    print(zoo.trace(meta, *args, **kwargs))
    model = zoo.load("flux-dev", "flux1-dev.safetensors")  # any supported layout, memory-mapped
"""
# importing each family module registers its architecture(s) with the registry
from zoo import (  # noqa: F401
    autoencoder,
    clip_text,
    controlnet,
    dc_ae,
    flux,
    gemma,
    hint_encoder,
    panorama,  # DiT360, a variant of flux
    sana,
    t2i_adapter,
    t5,
    unet,
    world_model,  # Sana + history and actions
)
from zoo.load import load
from zoo.registry import build, get_config, list_archs, list_models, register
from zoo.trace import example_inputs, trace

__all__ = ["build", "get_config", "list_archs", "list_models", "register", "trace", "example_inputs", "load"]
