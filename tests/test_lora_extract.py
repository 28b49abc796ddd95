"""LoRA extraction: known-rank differences reconstruct exactly, lower ranks report the tail singular values; CLI."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora
from lora.__main__ import main
from lora.extract import extract
from lora.formats import load_file
from tests.conftest import max_rel_err, randomize
from tests.test_lora_cli import run as cli

SINGULAR = [5.0, 4.0, 3.0, 2.0, 1.0]  # the difference's singular values: rank 5, errors known in closed form


def known_delta(out: int, cols: int, seed: int) -> torch.Tensor:
    """U diag(SINGULAR) V^T with orthonormal U, V: a difference of known rank and spectrum."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, len(SINGULAR), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, len(SINGULAR), generator=g, dtype=torch.float64))[0]
    return (u * torch.tensor(SINGULAR, dtype=torch.float64)) @ v.T


def tail_err(r: int) -> float:
    s = torch.tensor(SINGULAR)
    return math.sqrt((s[r:] ** 2).sum() / (s**2).sum())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 20)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 7, 1)
        self.norm = nn.LayerNorm(20)

    def forward(self, v, img):
        return self.norm(self.fc(v)), self.pw(self.conv(img))


def fine_tune(base: nn.Module) -> nn.Module:
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.fc.weight += known_delta(20, 24, 1).float()
        tuned.conv.weight += known_delta(8, 6 * 9, 2).float().reshape(8, 6, 3, 3)
        tuned.pw.weight += known_delta(7, 8, 3).float()[:, :, None, None]
        tuned.norm.weight += 0.5  # 1-D: never a LoRA target
    return tuned


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_rank_at_least_the_true_rank_reconstructs_and_the_lora_reproduces_the_fine_tune(method):
    base = randomize(Net(), seed=0)
    tuned = fine_tune(base)
    sd, report = extract(base.state_dict(), tuned.state_dict(), rank=6, conv_rank=5, method=method)
    assert [m.name for m in report.modules] == ["fc", "conv", "pw"]
    assert [m.rank for m in report.modules] == [6, 5, 6]
    assert all(m.rel_err <= 1e-5 for m in report.modules) and report.rel_err <= 1e-5
    model = copy.deepcopy(base)
    lora.load(model, sd, strict=True)
    model.norm.load_state_dict(tuned.norm.state_dict())  # 1-D weights are no LoRA's business
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 24, generator=g), torch.randn(2, 6, 5, 4, generator=g)
    with torch.no_grad():
        for got, want in zip(model(*x), tuned(*x)):
            assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("r", [1, 2, 4])
def test_lower_ranks_report_the_tail_singular_values(r):
    base = randomize(Net(), seed=0)
    _, report = extract(base.state_dict(), fine_tune(base).state_dict(), rank=r, conv_rank=r)
    for m in report.modules:
        assert abs(m.rel_err - tail_err(r)) <= 1e-5, m
    assert abs(report.rel_err - tail_err(r)) <= 1e-5  # every module has the same spectrum


def test_full_rank_unchanged_layers_clamp_and_wrapped_checkpoints():
    base = randomize(Net(), seed=0)
    tuned = fine_tune(base)
    with torch.no_grad():
        tuned.pw.weight.copy_(base.pw.weight)
    wrap = lambda sd: {f"model.diffusion_model.{k}": v for k, v in sd.items()} | {"cond_stage_model.w": torch.ones(3)}
    sd, report = extract(wrap(base.state_dict()), wrap(tuned.state_dict()), rank=None, conv_rank=None)
    assert report.unchanged == ["pw"] and [m.rank for m in report.modules] == [20, 8]
    assert sorted(sd) == sorted(f"{n}.{p}" for n in ("fc", "conv") for p in ("lora_down.weight", "lora_up.weight",
                                                                              "alpha"))
    patched = copy.deepcopy(base)
    lora.inject(patched, ["fc", "conv"], rank=2)  # a state dict with LoRA factors in it: the factors are skipped
    _, report = extract(patched.state_dict(), tuned.state_dict(), rank=5)
    assert [m.name for m in report.modules] == ["fc", "conv"]
    _, clamped = extract(base.state_dict(), tuned.state_dict(), rank=5, clamp_quantile=0.5)
    assert all(m.rel_err > 1e-3 for m in clamped.modules)  # clamping half the entries must cost accuracy
    for bad in (0, -1):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            extract(base.state_dict(), tuned.state_dict(), rank=bad)
    with pytest.raises(ValueError, match=r"fc\.weight: base has shape \(20, 24\), tuned \(20, 25\)"):
        extract(base.state_dict(), {**tuned.state_dict(), "fc.weight": torch.zeros(20, 25)})


def test_cli_extract_inspect_convert(tmp_path, capsys):
    base = randomize(Net(), seed=0)
    tuned = fine_tune(base)
    b, t, out = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors"
    save_file(base.state_dict(), b)
    save_file(tuned.state_dict(), t)

    run = lambda *args: cli(capsys, *args)  # (exit code, stdout, stderr)

    code, out_, err = run("extract", "--base", b, "--tuned", t, "--out", out, "--rank", 8, "--conv-rank", 5,
                          "--format", "ours")
    assert code == 0, err
    assert "3 module(s) extracted" in out_ and "4/4" in err  # norm.weight is read, then skipped
    code, out_, err = run("inspect", out)
    assert code == 0 and "ours LoRA, 3 module(s)" in out_ and "ranks: {5: 1, 7: 1, 8: 1}" in out_
    code, out_, err = run("convert", out, tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0, err
    assert sorted(load_file(tmp_path / "k.safetensors")[0]) == sorted(
        f"lora_unet_{n}.{p}" for n in ("fc", "conv", "pw") for p in ("lora_down.weight", "lora_up.weight", "alpha"))
    code, *_ = run("convert", out, out, "--to", "kohya")
    assert "refusing to overwrite" in str(code)
    code, *_ = run("inspect", b)
    assert "not a LoRA in any known format" in str(code)


def test_cli_maps_a_diffusers_unet_lora_with_the_base_checkpoint(tmp_path, capsys):
    import zoo
    from checkpoints_convert.io import save_file as save_checkpoint
    from lora.formats import Factor, family_of_model, write

    unet = zoo.build("tiny-unet")
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(0)
    factors = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": Factor(torch.randn(2, 32, generator=g),
                                                                         torch.randn(32, 2, generator=g), 1.0),
               "input_blocks.1.0.in_layers.2": Factor(torch.randn(2, 32, 3, 3, generator=g),
                                                      torch.randn(32, 2, 1, 1, generator=g), 2.0)}
    sd, meta = write(factors, "diffusers", family_of_model(unet))
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in sd
    save_checkpoint(sd, tmp_path / "d.safetensors", meta)
    with pytest.raises(SystemExit, match="needs the base checkpoint"):
        main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"])
    main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya",
          "--base", str(tmp_path / "base.safetensors")])
    back = load_file(tmp_path / "k.safetensors")[0]
    assert torch.equal(back["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"],
                       factors["input_blocks.1.0.in_layers.2"].down)
    assert back["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha"].item() == 1.0
    capsys.readouterr()
