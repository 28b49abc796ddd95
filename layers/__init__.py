"""Building blocks shared by every family (imports nothing from zoo/). One implementation per idea:
attention, RoPE, the timestep embedding, norms, adaLN modulation, the ResBlocks, the transformer blocks.
Users import from the package (`from layers import attention`); the modules import each other directly."""
from layers.attention import attention, key_padding_mask
from layers.cast import CAST_OF, CASTS, CastConv1d, CastConv2d, CastLinear, cast_layers
from layers.checkpoint import Checkpointed
from layers.conv import Conv2d
from layers.embeddings import MLPEmbedder, timestep_embedding
from layers.linear_attention import LiteLA, linear_attention
from layers.mix_ffn import ConvLayer, GLUMBConv
from layers.mlp import gelu_mlp
from layers.modulation import Modulation, ModulationOut, modulate
from layers.norms import GroupNorm32, QKNorm, RMSNorm
from layers.pixart import (
    CaptionEmbedder,
    MultiHeadCrossAttention,
    T2IFinalLayer,
    TimestepEmbedder,
    scale_shift_chunks,
    sincos_pos_embed_2d,
    t_block,
)
from layers.resblock import ResBlock
from layers.rope import EmbedND, apply_rope, check_axes, rope
from layers.spatial_transformer import BasicTransformerBlock, CrossAttention, SpatialTransformer
from layers.updown import Downsample, Upsample
from layers.vae_blocks import AttnBlock, ResnetBlock, normalize
from layers.vae_blocks import Downsample as VAEDownsample  # the LDM autoencoder's asymmetric-pad downsampling

__all__ = [
    "attention", "key_padding_mask", "Checkpointed", "CAST_OF", "CASTS", "CastConv1d", "CastConv2d", "CastLinear",
    "cast_layers", "Conv2d", "MLPEmbedder", "timestep_embedding", "LiteLA", "linear_attention", "ConvLayer",
    "GLUMBConv", "gelu_mlp", "Modulation", "ModulationOut", "modulate", "GroupNorm32", "QKNorm", "RMSNorm",
    "CaptionEmbedder", "MultiHeadCrossAttention", "T2IFinalLayer", "TimestepEmbedder", "scale_shift_chunks",
    "sincos_pos_embed_2d", "t_block", "ResBlock", "EmbedND", "apply_rope", "check_axes", "rope",
    "BasicTransformerBlock", "CrossAttention", "SpatialTransformer", "Downsample", "Upsample", "AttnBlock",
    "ResnetBlock", "normalize", "VAEDownsample",
]
