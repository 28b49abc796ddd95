"""The T5 v1.1 encoder (Flux's and DiT360's text encoder, T5-XXL), in the transformers `T5EncoderModel` layout.

Native names are the transformers keys (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`, `encoder.final_layer_norm.weight`), the keys
of `t5xxl_fp16.safetensors`. Files that store the tied embedding once (`shared` or `encoder.embed_tokens`) load too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from layers import RMSNorm, attention
from zoo.registry import register
from zoo.text import HF_CONFIG_KEYS, check_ids

# T5's `feed_forward_proj` activations; "gated-gelu" (v1.1) means the tanh GELU, as in transformers' T5Config
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


@dataclass
class T5Config:
    """transformers' `T5Config` fields that shape the encoder (decoder-only fields are accepted and ignored)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    pad_token_id: int = 0
    eos_token_id: int = 1

    IGNORED_FIELDS: ClassVar[frozenset] = HF_CONFIG_KEYS | {
        "dropout_rate", "classifier_dropout", "num_decoder_layers", "dense_act_fn", "is_gated_act",
        "scale_decoder_outputs",
    }

    def __post_init__(self):
        gated, _, act = self.feed_forward_proj.rpartition("-")
        if gated not in ("", "gated") or act not in ACTIVATIONS:
            raise ValueError(
                f"T5Config.feed_forward_proj {self.feed_forward_proj!r}; expected '<act>' or 'gated-<act>' with act in "
                f"{sorted(ACTIVATIONS)}"
            )

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        act = self.feed_forward_proj.rpartition("-")[2]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets (Mesh TensorFlow): half the buckets per direction, exact for small distances,
    logarithmic up to `max_distance`, then one shared bucket."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp_max(num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Self-attention with no 1/sqrt(d) scaling; the first layer owns the relative position bias table."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.config = config
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def compute_bias(self, length: int) -> Tensor:
        """(1, H, L, L) additive bias from the bucketed key - query offsets."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )  # (L, L)
        return rearrange(self.relative_attention_bias(buckets), "Lq Lk H -> 1 H Lq Lk")

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        heads = "B L (H D) -> B H L D"
        q, k, v = (rearrange(p(x), heads, H=self.config.num_heads) for p in (self.q, self.k, self.v))
        return self.o(attention(q, k, v, mask=bias, scale=1.0))  # (B, L, d_model)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, param_name="weight")

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """act(wi_0 x) * wi_1 x -> wo (v1.1 gated GELU)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[config.act]
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))  # wo may be kept in float32 (transformers keeps T5's wo in fp32)


class T5DenseActDense(nn.Module):
    """act(wi x) -> wo (original T5)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[config.act]
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.act(self.wi(x)).to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, param_name="weight")

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: Tensor) -> Tensor:
    """fp16 activations of T5 overflow: clamp to the finite range, 1000 below it once an inf appeared (transformers)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens  # tied to `shared`: both keys appear in state_dict(), as in transformers
        self.block = nn.ModuleList([T5Block(config, i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, param_name="weight")


@register("t5_encoder", T5Config)
class T5Encoder(nn.Module):
    """T5 encoder: RMS-normed pre-norm blocks, one relative position bias shared by all layers, final norm."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)
        self.register_load_state_dict_pre_hook(_fill_tied_embedding)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) ids (+ (B, L) keep-mask) -> last hidden state (B, L, d_model)."""
        check_ids(input_ids, attention_mask, self.config.vocab_size, None, "T5Encoder")
        x = self.shared(input_ids)  # (B, L, d_model)
        bias = self.encoder.block[0].layer[0].SelfAttention.compute_bias(input_ids.shape[1]).to(x.dtype)  # (1, H, L, L)
        if attention_mask is not None:  # padded keys get the most negative number, added to the bias
            bias = bias + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    def example_inputs(self, batch: int = 1, txt_len: int = 512, device=None, **_) -> tuple[tuple, dict]:
        """Random token ids (batch, txt_len) for `zoo.trace` / `python -m zoo trace` (Flux-dev: 512 tokens)."""
        return (torch.randint(0, self.config.vocab_size, (batch, txt_len), device=device),), {}


def _fill_tied_embedding(module: T5Encoder, state_dict: dict, prefix: str, *args) -> None:
    """A file with only one of the two tied embedding keys (`shared.weight` / `encoder.embed_tokens.weight`) loads."""
    a, b = prefix + "shared.weight", prefix + "encoder.embed_tokens.weight"
    if a in state_dict and b not in state_dict:
        state_dict[b] = state_dict[a]
    elif b in state_dict and a not in state_dict:
        state_dict[a] = state_dict[b]
