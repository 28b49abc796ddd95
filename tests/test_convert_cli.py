"""python -m checkpoints_convert: convert and inspect, progress and summary, errors that leave no output."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

import zoo
from checkpoints_convert.__main__ import main
from checkpoints_convert.io import load_file, save_file
from tests.conftest import randomize


@pytest.fixture
def flux_file(tmp_path):
    sd = randomize(zoo.build("tiny-flux"), seed=2).state_dict()
    save_file(sd, tmp_path / "flux.safetensors")
    return tmp_path / "flux.safetensors", sd


def test_round_trip_through_the_cli_is_bit_exact(flux_file, capsys):
    src, sd = flux_file
    d, back = src.with_name("d.safetensors"), src.with_name("back.safetensors")
    assert main([str(src), str(d), "--to", "diffusers"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{len(load_file(d))} tensors (flux -> diffusers)") and "MB in" in out and " s -> " in out
    assert "100%" in err and "[####" in err  # the progress bar
    assert "x_embedder.weight" in load_file(d)
    assert main([str(d), str(back), "--to", "official", "-q"]) == 0
    got = load_file(back)
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert got.metadata["zoo_family"] == "flux" and got.metadata["zoo_layout"] == "official"


def test_dtype_option_casts_and_is_recorded(flux_file, capsys):
    src, _ = flux_file
    dst = src.with_name("fp8.safetensors")
    assert main([str(src), str(dst), "--to", "official", "--dtype", "fp8", "-q"]) == 0
    got = load_file(dst)
    assert got["img_in.weight"].dtype == torch.float8_e4m3fn and got["img_in.bias"].dtype == torch.bfloat16
    assert got.metadata["dtype"] == "BF16,F8_E4M3"
    assert ", fp8)" in capsys.readouterr().out


def test_inspect_prints_family_layout_dtypes_and_parameter_count(flux_file, capsys):
    src, sd = flux_file
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    n = sum(t.numel() for t in sd.values())
    assert "model: flux (official)" in out and f"dtypes: F32 x {len(sd)}" in out and f"parameters: {n:,}" in out
    assert "zoo.load(None, FILE)" in out


def test_bad_inputs_fail_with_a_message_and_leave_no_file(flux_file, capsys):
    src, _ = flux_file
    folder = src.parent
    before = sorted(p.name for p in folder.iterdir())
    rng = random.Random(1)
    data = src.read_bytes()
    cases = {"trunc.safetensors": data[: len(data) // 2],
             "junk.safetensors": bytes(rng.getrandbits(8) for _ in range(99)),
             "hdr.safetensors": data[:8] + b"[" + data[9:]}
    for name, raw in cases.items():
        (folder / name).write_bytes(raw)
        assert main([str(folder / name), str(folder / "out.safetensors"), "--to", "diffusers"]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert main([str(src), str(src), "--to", "diffusers"]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert main([str(src), str(folder / "out.bin"), "--to", "diffusers"]) == 2
    assert main([str(src), str(folder / "out.safetensors"), "--to", "diffusers", "--family", "unet"]) == 2
    assert "asked for family 'unet'" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == sorted(before + list(cases))  # no output, no temp file


def test_module_entry_point_runs(flux_file):
    src, _ = flux_file
    r = subprocess.run([sys.executable, "-m", "checkpoints_convert", "inspect", str(src)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "flux (official)" in r.stdout


def test_inspect_names_lora_files_and_unknown_ones(tmp_path, capsys):
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 64),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(192, 4),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    save_file(lora, tmp_path / "lora.safetensors")
    assert main(["inspect", str(tmp_path / "lora.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "model: lora (kohya" in out and "base family flux, rank(s) [4]" in out
    save_file({"foo.weight": torch.ones(2)}, tmp_path / "other.safetensors")
    assert main(["inspect", str(tmp_path / "other.safetensors")]) == 0
    assert "model: not recognised (no known model family" in capsys.readouterr().out


def test_progress_in_a_redirected_log_is_one_line_with_no_carriage_returns(flux_file, capsys):
    src, _ = flux_file
    assert main([str(src), str(src.with_name("d.safetensors")), "--to", "diffusers"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("100%") == 1


def test_unknown_family_lists_the_known_ones(flux_file, capsys):
    src, _ = flux_file
    assert main([str(src), str(src.with_name("x.safetensors")), "--to", "diffusers", "--family", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown family 'nosuch'; known families:" in err and "flux" in err and "unet" in err
