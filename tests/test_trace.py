"""`zoo.trace` on real and meta tensors, and the `python -m zoo` command line."""
from __future__ import annotations

import pytest
import torch
import yaml

import zoo
from zoo.__main__ import main


def test_full_size_flux_traces_on_meta_with_no_weights():
    model = zoo.build("flux-dev", device="meta")
    args, kwargs = zoo.example_inputs(model, height=512, width=768, txt_len=256, device="meta")
    t = zoo.trace(model, *args, **kwargs)
    assert t.output.device.type == "meta" and t.output.shape == (1, 32 * 48, 64)
    assert t["img_in"].outputs == [(1, 1536, 3072)]
    assert t["single_blocks.37.linear1"].outputs == [(1, 256 + 1536, 3 * 3072 + 4 * 3072)]
    assert t["double_blocks.18.img_attn.qkv"].params == 3072 * 9216 + 9216
    rows = [r.path for r in t.rows]
    assert rows.index("double_blocks.0") < rows.index("double_blocks.0.img_mod") < rows.index("single_blocks.0")


def test_trace_table_and_depth_limit():
    model = zoo.build("tiny-flux")
    args, kwargs = zoo.example_inputs(model, height=64, width=64, txt_len=3)
    t = zoo.trace(model, *args, max_depth=2, **kwargs)  # names of at most 2 parts
    assert {r.path.count(".") for r in t.rows} == {0, 1}
    text = str(t)
    assert text.splitlines()[0].split()[:5] == ["path", "type", "inputs", "outputs", "params"]
    assert "double_blocks.1" in text and "1x16x64" in text
    assert torch.is_grad_enabled()  # the no_grad of tracing does not leak out
    assert not model._forward_hooks and not model.img_in._forward_pre_hooks  # hooks removed


def run_cli(capsys, *args: str) -> str:
    """`python -m zoo ARGS` in this process (a subprocess would only add torch's import time)."""
    assert main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def cli_error(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of a failing `python -m zoo ARGS` (argparse's own errors exit via SystemExit)."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_cli_list_and_trace(capsys):
    assert "flux-dev" in run_cli(capsys, "list").split()
    out = run_cli(capsys, "trace", "tiny-flux", "--height", "64", "--width", "128", "--depth", "2")
    assert "final_layer" in out and "1x32x16" in out
    assert out.strip().endswith("parameters (0.00 B)")


def test_cli_reports_bad_names_and_sizes_without_a_traceback(capsys):
    for args, message in ((["trace", "flux-deb"], "did you mean flux-dev"),
                          (["trace", "tiny-flux", "--height", "100"], "multiples of 16 pixels, got 100x1024")):
        code, err = cli_error(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--height", "-16"), ("--width", "0"), ("--batch", "0"), ("--depth", "-1"),
                                         ("--batch", "two")])
def test_cli_refuses_zero_negative_or_non_integer_sizes(capsys, flag, value):
    code, err = cli_error(capsys, "trace", "tiny-flux", flag, value)
    assert code == 2 and f"argument {flag}:" in err and value in err and "Traceback" not in err


def test_cli_header_says_what_was_traced_and_labels_the_model_inputs(capsys):
    out = run_cli(capsys, "trace", "tiny-flux", "--height", "64", "--width", "128", "--batch", "2", "--txt-len", "5",
                  "--depth", "1")
    first, _, _, model_row = out.splitlines()[:4]
    assert first == "tiny-flux (Flux): 64x128 px, text length 5, batch 2, device meta, dtype float32"
    assert model_row.split()[:2] == ["(model)", "Flux"]
    assert "img=2x32x16, img_ids=2x32x3, txt=2x5x48, txt_ids=2x5x3, timesteps=2, y=2x32" in model_row
    assert "no text" in run_cli(capsys, "trace", "tiny-vae", "--height", "32", "--width", "32", "--depth", "1")


def test_cli_traces_a_circular_pad_flux_on_meta(capsys, tmp_path):
    # dit360's own full-size trace is tests/test_panorama.py; here the same wrap on a tiny config given as a YAML
    spec = tmp_path / "tiny-dit360.yaml"
    fields = yaml.safe_load((zoo.registry.CONFIG_DIR / "tiny-flux.yaml").read_text())
    spec.write_text(yaml.safe_dump({**fields, "circular_pad": 1}))
    out = run_cli(capsys, "trace", str(spec), "--height", "64", "--width", "128", "--txt-len", "8", "--depth", "1")
    assert "(DiT360): 64x128 px" in out.splitlines()[0] and "img=1x32x16" in out and "1x40x16" in out
