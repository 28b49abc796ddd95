"""CLIP's text transformer (OpenAI CLIP-L/14; OpenCLIP ViT-H/14 and ViT-bigG/14), in the transformers layout.

Native names are the transformers `CLIPTextModel` / `CLIPTextModelWithProjection` keys
(`text_model.encoder.layers.N.self_attn.q_proj.weight`, `text_projection.weight`), the keys of the `clip_l` /
`clip_g` files people share; the OpenCLIP and SD-checkpoint layouts go through `checkpoints_convert.clip`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from layers import attention
from zoo.registry import register
from zoo.text import HF_CONFIG_KEYS, check_ids

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": F.gelu,  # OpenCLIP
}


@dataclass
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` fields, plus `with_projection` (`CLIPTextModelWithProjection`)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # 2 (the legacy config value) pools at argmax(ids), as OpenAI CLIP does; else at the first `eos_token_id`
    eos_token_id: int = 49407
    with_projection: bool = False

    IGNORED_FIELDS: ClassVar[frozenset] = HF_CONFIG_KEYS | {"attention_dropout", "dropout"}

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        heads = "B L (H D) -> B H L D"
        q, k, v = (rearrange(p(x), heads, H=self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, mask=mask))  # (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]  # (B, L, D)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


@register("clip_text", CLIPTextConfig)
class CLIPText(nn.Module):
    """CLIP text encoder: causal transformer, final LayerNorm, pooled at the EOS token, optional text projection."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, skip: int = 0
    ) -> tuple[Tensor, Tensor]:
        """(B, L) ids -> (hidden (B, L, D), pooled (B, D or projection_dim)).

        `skip` = 0: the final-normed last layer; `skip` = k > 0: the raw output of the k-th layer from the end
        (transformers' `hidden_states[-(k + 1)]`, "clip skip"; penultimate = 1). Pooled always sees every layer.
        """
        cfg = self.config
        check_ids(input_ids, attention_mask, cfg.vocab_size, cfg.max_position_embeddings, "CLIPText")
        if not 0 <= skip < cfg.num_hidden_layers:
            raise ValueError(f"skip={skip} must lie in [0, num_hidden_layers={cfg.num_hidden_layers})")
        tm = self.text_model
        L = input_ids.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()  # (L, L) causal keep-mask
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L)
        x = tm.embeddings(input_ids)  # (B, L, D)
        hidden = None
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x, mask)
            if i == len(tm.encoder.layers) - 1 - skip:
                hidden = x
        x = tm.final_layer_norm(x)
        if skip == 0:
            hidden = x
        if cfg.eos_token_id == 2:  # legacy configs: the EOS token has the largest id
            eos = input_ids.int().argmax(dim=-1)
        else:
            eos = (input_ids == cfg.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]  # (B, D)
        if cfg.with_projection:
            pooled = self.text_projection(pooled)
        return hidden, pooled

    def example_inputs(self, batch: int = 1, txt_len: int | None = None, device=None, **_) -> tuple[tuple, dict]:
        """Random token ids (batch, txt_len = max_position_embeddings) for `zoo.trace` / `python -m zoo trace`."""
        L = txt_len or self.config.max_position_embeddings
        return (torch.randint(0, self.config.vocab_size, (batch, L), device=device),), {}
