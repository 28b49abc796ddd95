"""zoo: hand-written diffusion models in the official layouts, composed by a registry from YAML configs.

    import zoo
    zoo.list_models()
    model = zoo.build("tiny-flux")                 # or a YAML path, a dict {"arch": ..., ...}, a config
    meta = zoo.build("flux-dev", device="meta")    # full size, no memory
    print(zoo.trace(meta, *zoo.example_inputs(meta, device="meta")))
"""
from zoo import flux  # noqa: F401  (registers the arch)
from zoo import controlnet, hint_encoder, t2i_adapter, unet  # noqa: F401
from zoo import sana  # noqa: F401
from zoo import autoencoder  # noqa: F401
from zoo.load import load
from zoo.registry import build, get_config, list_archs, list_models, register
from zoo.trace import example_inputs, trace

__all__ = ["build", "get_config", "list_archs", "list_models", "register", "trace", "example_inputs", "flux", "load"]
