"""Gemma-2 (Sana's text encoder, `gemma-2-2b-it`: its last hidden state), in the transformers `Gemma2Model` layout.

Native names are the transformers keys (`embed_tokens.weight`, `layers.N.self_attn.q_proj.weight`,
`layers.N.pre_feedforward_layernorm.weight`, `norm.weight`). `Gemma2ForCausalLM` files (`model.` prefix plus
`lm_head.weight`, which the encoder does not use) load through `zoo.load` with the prefix stripped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from layers import RMSNorm, attention, rope
from zoo.registry import register
from zoo.text import HF_CONFIG_KEYS, check_ids

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's GeGLU
    "gelu": F.gelu,
}
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class Gemma2Config:
    """transformers' `Gemma2Config` fields (defaults: gemma-2-2b); `rope_theta` is the pre-v5 spelling of
    `rope_parameters["rope_theta"]`. Generation-only fields (`final_logit_softcapping`, caches) are ignored."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    rope_parameters: dict | None = None
    rope_theta: float | None = None
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None

    IGNORED_FIELDS: ClassVar[frozenset] = HF_CONFIG_KEYS | {
        "attention_dropout", "final_logit_softcapping", "hidden_act", "max_position_embeddings",
    }

    def __post_init__(self):
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"Gemma2Config.hidden_activation {self.hidden_activation!r}; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Gemma2Config.num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.layer_types is None:  # Gemma-2 alternates: sliding window first, then global
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"Gemma2Config.layer_types {self.layer_types}: expected {self.num_hidden_layers} "
                             f"entries from {LAYER_TYPES}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"Gemma2Config.rope_parameters rope_type {rope_type!r}: only 'default' RoPE is built")
        if self.use_bidirectional_attention:
            raise ValueError("Gemma2Config.use_bidirectional_attention=True: only the causal Gemma-2 is built")

    @property
    def theta(self) -> float:
        params = self.rope_parameters or {}
        return float(params.get("rope_theta", self.rope_theta if self.rope_theta is not None else 10000.0))


def gemma_norm(config: Gemma2Config) -> RMSNorm:
    """Gemma's RMSNorm: gain stored as w, applied as (1 + w) in float32."""
    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_name="weight", unit_offset=True)


class Gemma2Attention(nn.Module):
    """Grouped-query attention with RoPE, 1/sqrt(query_pre_attn_scalar) scaling and tanh-capped logits."""

    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.config = config
        C, D, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(C, config.num_attention_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, config.num_key_value_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, config.num_key_value_heads * D, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * D, C, bias=bias)

    def forward(self, x: Tensor, pe: Tensor, mask: Tensor) -> Tensor:
        cfg = self.config
        q = rearrange(self.q_proj(x), "B L (H D) -> B H L D", H=cfg.num_attention_heads)
        k, v = (rearrange(p(x), "B L (H D) -> B H L D", H=cfg.num_key_value_heads) for p in (self.k_proj, self.v_proj))
        # Gemma rotates channel i with i + D/2; the zoo's RoPE rotates neighbours. Interleaving the two halves of q
        # and k alike leaves every q.k product as it was and makes Gemma's pairs neighbours.
        q, k = (rearrange(t, "B H L (two half) -> B H L (half two)", two=2) for t in (q, k))
        out = attention(q, k, v, pe, mask, scale=cfg.query_pre_attn_scalar**-0.5, softcap=cfg.attn_logit_softcapping)
        return self.o_proj(out)  # (B, L, C)


class Gemma2MLP(nn.Module):
    """GeGLU: down(act(gate x) * up x)."""

    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_activation]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    """Sandwich norms: x + post_norm(attn(pre_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.self_attn = Gemma2Attention(config)
        self.mlp = Gemma2MLP(config)
        self.input_layernorm = gemma_norm(config)
        self.post_attention_layernorm = gemma_norm(config)
        self.pre_feedforward_layernorm = gemma_norm(config)
        self.post_feedforward_layernorm = gemma_norm(config)

    def forward(self, x: Tensor, pe: Tensor, mask: Tensor) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), pe, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


@register("gemma2", Gemma2Config)
class Gemma2(nn.Module):
    """Gemma-2 decoder stack without the LM head: scaled embedding, causal layers alternating a sliding window with
    global attention, final RMSNorm."""

    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Gemma2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = gemma_norm(config)

    def masks(self, attention_mask: Tensor | None, L: int, dtype: torch.dtype, device: torch.device) -> dict:
        """Additive (B or 1, 1, L, L) masks per layer type: causal, padded keys, and for sliding layers keys at most
        `sliding_window - 1` positions back."""
        q = torch.arange(L, device=device)[:, None]
        k = torch.arange(L, device=device)[None, :]
        keep = {"full_attention": k <= q}
        window = self.config.sliding_window
        keep["sliding_attention"] = keep["full_attention"] & (k > q - window) if window else keep["full_attention"]
        out = {}
        for kind, m in keep.items():
            m = m[None, None]  # (1, 1, L, L)
            if attention_mask is not None:
                m = m & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L)
            out[kind] = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, torch.finfo(dtype).min)
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                all_layers: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """(B, L) ids (+ (B, L) keep-mask) -> last hidden state (B, L, hidden_size); with `all_layers` also the
        embedding and every layer's output (transformers' `hidden_states`, the last one final-normed)."""
        cfg = self.config
        check_ids(input_ids, attention_mask, cfg.vocab_size, None, "Gemma2")
        w = self.embed_tokens.weight
        # sqrt(hidden) rounded to the weights' dtype first, as the reference does (bf16: sqrt(3072) -> 55.5)
        x = self.embed_tokens(input_ids) * torch.tensor(cfg.hidden_size**0.5, dtype=w.dtype, device=w.device)
        L = input_ids.shape[1]
        pe = rope(torch.arange(L, device=x.device)[None], cfg.head_dim, cfg.theta).unsqueeze(1)  # (1, 1, L, D/2, 2, 2)
        masks = self.masks(attention_mask, L, x.dtype, x.device)
        hidden = [x]
        for kind, layer in zip(cfg.layer_types, self.layers):
            x = layer(x, pe, masks[kind])
            hidden.append(x)
        x = self.norm(x)
        if not all_layers:
            return x
        return x, [*hidden[:-1], x]

    def example_inputs(self, batch: int = 1, txt_len: int = 300, device=None, **_) -> tuple[tuple, dict]:
        """Random token ids (batch, txt_len) for `zoo.trace` / `python -m zoo trace` (Sana: 300 tokens)."""
        return (torch.randint(0, self.config.vocab_size, (batch, txt_len), device=device),), {}
