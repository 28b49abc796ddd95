"""Building blocks shared by every family (imports nothing from zoo/)."""
from layers.attention import attention, key_padding_mask
from layers.embeddings import MLPEmbedder, timestep_embedding
from layers.mlp import gelu_mlp
from layers.modulation import Modulation, ModulationOut, modulate
from layers.norms import QKNorm, RMSNorm
from layers.rope import EmbedND, apply_rope, rope

__all__ = [
    "attention", "key_padding_mask", "MLPEmbedder", "timestep_embedding", "gelu_mlp", "Modulation",
    "ModulationOut", "modulate", "QKNorm", "RMSNorm", "EmbedND", "apply_rope", "rope",
]
