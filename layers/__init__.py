"""Building blocks shared by every family (imports nothing from zoo/). One implementation per idea:
attention, RoPE, the timestep embedding, norms, adaLN modulation, the ResBlocks, the transformer blocks."""
from layers.attention import attention, key_padding_mask
from layers.cast import CastConv1d, CastConv2d, CastLinear, cast_layers
from layers.checkpoint import Checkpointed
from layers.conv import Conv2d
from layers.embeddings import MLPEmbedder, timestep_embedding
from layers.linear_attention import LiteLA, linear_attention
from layers.mix_ffn import GLUMBConv
from layers.mlp import gelu_mlp
from layers.modulation import Modulation, ModulationOut, modulate
from layers.norms import GroupNorm32, QKNorm, RMSNorm
from layers.resblock import ResBlock
from layers.rope import EmbedND, apply_rope, rope
from layers.spatial_transformer import BasicTransformerBlock, CrossAttention, SpatialTransformer
from layers.updown import Downsample, Upsample
from layers.vae_blocks import AttnBlock, ResnetBlock

__all__ = [
    "attention", "key_padding_mask", "Checkpointed", "CastConv1d", "CastConv2d", "CastLinear", "cast_layers", "Conv2d",
    "MLPEmbedder", "timestep_embedding", "LiteLA", "linear_attention", "GLUMBConv", "gelu_mlp", "Modulation",
    "ModulationOut", "modulate", "GroupNorm32", "QKNorm", "RMSNorm", "ResBlock", "EmbedND", "apply_rope", "rope",
    "BasicTransformerBlock", "CrossAttention", "SpatialTransformer", "Downsample", "Upsample", "AttnBlock",
    "ResnetBlock",
]
