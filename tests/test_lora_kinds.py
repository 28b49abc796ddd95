"""One table of LoRA kinds: checkpoints_convert.detect and lora.detect agree on every kind of file."""
from __future__ import annotations

import pytest
import torch

import checkpoints_convert as cc
import lora
from checkpoints_convert.lora_kinds import KINDS


def pair(stem: str, down: str, up: str, rank: int = 4, width: int = 64) -> dict[str, torch.Tensor]:
    return {f"{stem}{down}": torch.randn(rank, width), f"{stem}{up}": torch.randn(3 * width, rank)}


QKV = "lora_unet_double_blocks_0_img_attn_qkv"
SAMPLES = {  # one file of each kind, as the tools that make them write it
    "loha": {f"{QKV}.hada_w{i}_a": torch.randn(192, 4) for i in (1, 2)}
    | {f"{QKV}.hada_w{i}_b": torch.randn(4, 64) for i in (1, 2)} | {f"{QKV}.alpha": torch.tensor(2.0)},
    "lokr": {f"{QKV}.lokr_w1": torch.randn(4, 4), f"{QKV}.lokr_w2_a": torch.randn(48, 4),
             f"{QKV}.lokr_w2_b": torch.randn(4, 16), f"{QKV}.alpha": torch.tensor(2.0)},
    "xlabs": pair("double_blocks.0.processor.qkv_lora1", ".down.weight", ".up.weight"),
    "kohya": pair("lora_unet_double_blocks_0_img_attn_qkv", ".lora_down.weight", ".lora_up.weight"),
    "diffusers": pair("transformer.transformer_blocks.0.attn.to_q", ".lora_A.weight", ".lora_B.weight"),
    "comfy": pair("diffusion_model.double_blocks.0.img_attn.qkv", ".lora_down.weight", ".lora_up.weight"),
    "ours": pair("double_blocks.0.img_attn.qkv", ".lora_down.weight", ".lora_up.weight"),
    "attn-processor": pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
                           ".down.weight", ".up.weight"),
}


def test_every_kind_has_a_sample():
    assert sorted(SAMPLES) == sorted(k.name for k in KINDS)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_detect_and_lora_agree_on_the_kind(kind):
    sd = SAMPLES[kind.name]
    det = cc.detect(sd)  # never raises for a LoRA of a known kind (an XLabs file did)
    assert (det.family, det.layout, det.fields["ranks"]) == ("lora", kind.name, [4])  # one name for each kind
    if kind.readable:
        assert lora.detect(sd) == kind.name
        assert (kind.name in lora.FORMATS) == kind.writable
    else:
        with pytest.raises(ValueError, match=f"this LoRA is of kind '{kind.name}', which lora cannot read"):
            lora.detect(sd)
        assert kind.note in str(det)
