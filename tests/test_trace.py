"""`zoo.trace` on real and meta tensors, and the `python -m zoo` command line."""
from __future__ import annotations

import subprocess
import sys

import torch

import zoo


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


def run_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_list_and_trace():
    assert "flux-dev" in run_cli("list").split()
    out = run_cli("trace", "tiny-flux", "--height", "64", "--width", "128", "--depth", "2")
    assert "final_layer" in out and "1x32x16" in out
    assert out.strip().endswith("parameters (0.00 B)")


def test_cli_reports_bad_names_and_sizes_without_a_traceback():
    for args, message in ((["trace", "flux-deb"], "did you mean flux-dev"),
                          (["trace", "tiny-flux", "--height", "100"], "multiples of 16 pixels, got 100x1024")):
        done = subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
