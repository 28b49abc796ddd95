"""Prompt -> conditioning: the tensors each family's forward takes, as the official pipelines build them.

    tok = zoo.tokenizers.clip("clip-vit-large-patch14/")  # vocab.json + merges.txt, tokenizer.json or OpenCLIP's bpe
    cond = zoo.text.sd_conditioning(["a red fox", ""], clip, tok)  # context (B, 77, 768)

Encoders are the zoo's `clip_text`, `t5_encoder` and `gemma2` models; tokenizers come from `zoo.tokenizers`.
Negative / empty prompts go through the same functions.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from layers import timestep_embedding

# keys of a transformers `config.json` that describe the file or the training run, not the math
HF_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "id2label",
    "label2id", "problem_type", "return_dict", "output_attentions", "output_hidden_states", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "tie_word_embeddings", "use_cache", "initializer_range", "initializer_factor",
    "gradient_checkpointing", "cache_implementation", "use_return_dict", "tokenizer_class", "prefix",
    "task_specific_params", "decoder_start_token_id", "n_positions", "output_past", "torchscript", "pruned_heads",
    "finetuning_task",
})

# Sana's "complex human instruction" (diffusers `SanaPipeline`, official `configs/sana_config`): prefixed to each
# prompt, then only the first token and the last `max_length - 1` tokens are kept (Sana paper, section 3.1)
SANA_CHI = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image "
    "generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def check_ids(input_ids: Any, attention_mask: Any, vocab_size: int, max_length: int | None, model: str) -> None:
    """The shared input check of the text encoders: (B, L) integer ids in [0, vocab_size), a (B, L) mask."""
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"{model}: input_ids must be a (batch, length) tensor, got {got}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{model}: input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"{model}: input_ids has {input_ids.shape[1]} tokens; the model takes at most {max_length}")
    if input_ids.device.type != "meta" and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{model}: token ids must lie in [0, vocab_size={vocab_size}), got min {lo}, max {hi}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"{model}: attention_mask shape {got} does not match input_ids {tuple(input_ids.shape)}")
        if attention_mask.dtype.is_floating_point and attention_mask.device.type != "meta":
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError(f"{model}: attention_mask must hold 0/1 (or bool) keep flags")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def flux_conditioning(
    prompts: str | list[str], clip: nn.Module, clip_tok: Any, t5: nn.Module, t5_tok: Any, *, max_length: int = 512
) -> dict[str, Tensor]:
    """Flux: txt = T5 last hidden state (B, max_length, d_model), no mask (as BFL's `HFEmbedder` and diffusers'
    `FluxPipeline`); y = CLIP's pooled output (B, 768); txt_ids zeros (B, max_length, 3).
    512 tokens for dev, 256 for schnell."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    t = t5_tok(prompts, max_length=max_length)
    c = clip_tok(prompts)
    txt = t5(t["input_ids"].to(_device(t5)))  # (B, L, d_model)
    _, y = clip(c["input_ids"].to(_device(clip)))  # (B, 768)
    txt_ids = torch.zeros(txt.shape[0], txt.shape[1], 3, device=txt.device, dtype=txt.dtype)
    return {"txt": txt, "txt_ids": txt_ids, "y": y}


def sd_conditioning(prompts: str | list[str], clip: nn.Module, clip_tok: Any, *, skip: int = 0) -> dict[str, Tensor]:
    """SD1.x/2.x: context = CLIP hidden states (B, 77, D); with clip skip k the k-th layer from the end, final-normed
    (diffusers `StableDiffusionPipeline.encode_prompt`; SD2.x's OpenCLIP penultimate layer is skip=1)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = clip_tok(prompts)["input_ids"].to(_device(clip))
    hidden, _ = clip(ids, skip=skip)
    if skip:
        hidden = clip.text_model.final_layer_norm(hidden)
    return {"context": hidden}


def size_embedding(values: Tensor, dim: int = 256) -> Tensor:
    """(B, N) sizes/crops -> (B, N*dim): each number's sinusoidal embedding, concatenated (SGM
    `ConcatTimestepEmbedderND`)."""
    B, N = values.shape
    emb = timestep_embedding(values.flatten().float(), dim, time_factor=1.0, keep_dtype=False)  # (B*N, dim)
    return emb.reshape(B, N * dim)


def sdxl_conditioning(
    prompts: str | list[str],
    clip_l: nn.Module,
    tok_l: Any,
    clip_g: nn.Module,
    tok_g: Any,
    *,
    size: tuple[int, int] = (1024, 1024),
    crop: tuple[int, int] = (0, 0),
    target: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """SDXL (SGM's conditioner): context = [CLIP-L penultimate | OpenCLIP-bigG penultimate] (B, 77, 2048), both
    without the final norm; y = [bigG's projected pooled (1280) | embeddings of (H, W), crop (top, left),
    target (H, W)]."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    hidden_l, _ = clip_l(tok_l(prompts)["input_ids"].to(_device(clip_l)), skip=1)  # (B, 77, 768)
    hidden_g, pooled = clip_g(tok_g(prompts)["input_ids"].to(_device(clip_g)), skip=1)  # (B, 77, 1280), (B, 1280)
    target = size if target is None else target
    sizes = torch.tensor([[*size, *crop, *target]] * len(prompts), device=pooled.device)  # (B, 6)
    y = torch.cat([pooled, size_embedding(sizes).to(pooled)], dim=-1)  # (B, 1280 + 6*256)
    return {"context": torch.cat([hidden_l, hidden_g.to(hidden_l)], dim=-1), "y": y}


def sana_conditioning(
    prompts: str | list[str],
    gemma: nn.Module,
    gemma_tok: Any,
    *,
    max_length: int = 300,
    instruction: tuple[str, ...] | None = SANA_CHI,
) -> dict[str, Tensor]:
    """Sana: Gemma-2's last hidden state (B, 1, max_length, 2304) and its mask (B, max_length).

    Prompts are lower-cased and stripped; with an `instruction` (positive prompts; negative ones pass None, as the
    official pipeline does) the instruction is prefixed, the window grows by its token count, and the first token plus
    the last `max_length - 1` are kept.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = [p.lower().strip() for p in prompts]
    length = max_length
    if instruction:
        chi = "\n".join(instruction)
        prompts = [chi + p for p in prompts]
        length = len(gemma_tok.encode(chi)) + max_length - 2
    tokens = gemma_tok(prompts, max_length=length)
    ids, mask = tokens["input_ids"].to(_device(gemma)), tokens["attention_mask"].to(_device(gemma))
    y = gemma(ids, mask)  # (B, length, C)
    if instruction:
        keep = [0, *range(length - max_length + 1, length)]
        y, mask = y[:, keep], mask[:, keep]
    return {"y": y[:, None], "mask": mask}
