"""python -m lora: the cases a newcomer hits — an empty extraction says why, kohya UNet names ask for the base."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora.__main__ import main


def run(capsys, *args):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    res = capsys.readouterr()
    return code, res.out, res.err


def test_extract_with_base_equal_to_tuned_warns_that_the_lora_is_empty(tmp_path, capsys):
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base.safetensors")
    code, out, err = run(capsys, "extract", "--base", tmp_path / "base.safetensors", "--tuned",
                         tmp_path / "base.safetensors", "--out", tmp_path / "lora.safetensors")
    assert code == 0 and "0 module(s) extracted, 2 unchanged" in out
    assert "warning: the LoRA is empty: base and tuned differ by at most min_diff=1e-06 in every one of 2" in err
    assert "same checkpoint" in err and "read 2/2 weights" in err  # one line in a redirected log
    from lora.extract import extract

    with pytest.warns(UserWarning, match="the LoRA is empty"):
        extract(net.state_dict(), net.state_dict())


def test_inspect_of_a_kohya_unet_lora_without_base_says_the_names_need_it(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
          torch.randn(2, 32, generator=g),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
          torch.randn(32, 2, generator=g)}
    save_file(sd, tmp_path / "k.safetensors")
    code, out, _ = run(capsys, "inspect", tmp_path / "k.safetensors")
    assert code == 0 and "kohya LoRA, 0 module(s)" in out
    assert "kohya names of UNet modules" in out and "module names need the base model: pass --base" in out
