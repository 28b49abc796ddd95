"""Quantised files: bitsandbytes nf4/int8 named plainly by detect, inspect, convert and zoo.load; GGUF read and
dequantised (Q8_0, Q4_0, Q4_K) exactly as gguf's own dequantisation, and loaded into a zoo model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zoo
from checkpoints_convert import CheckpointError, convert, detect, load_file, save_file
from checkpoints_convert.summary import summarize
from tests.conftest import max_rel_err, randomize
from zoo.load import LoadError


def _bnb(sd: dict, kind: str) -> dict:
    """A state dict laid out as diffusers/transformers save bitsandbytes models (the key pattern is what matters)."""
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight") and ("blocks." in k):
            if kind == "int8":
                out[k] = torch.zeros(v.shape, dtype=torch.int8)
                out[k[: -len("weight")] + "SCB"] = torch.ones(v.shape[0])
                continue
            state = json.dumps({"quant_type": kind, "blocksize": 64, "dtype": "float32", "shape": list(v.shape)})
            out[k] = torch.zeros(v.numel() // 2, 1, dtype=torch.uint8)
            out[k + ".absmax"] = torch.ones(v.numel() // 64, dtype=torch.uint8)
            out[k + ".quant_map"] = torch.linspace(-1, 1, 16)
            out[k + ".nested_absmax"] = torch.ones(1)
            out[k + ".nested_quant_map"] = torch.linspace(-1, 1, 256)
            out[k + f".quant_state.bitsandbytes__{kind}"] = torch.tensor(list(state.encode()), dtype=torch.uint8)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bitsandbytes_files_are_named_in_detect_inspect_convert_and_load(tmp_path, kind):
    ref = zoo.build("tiny-flux").state_dict()
    sd = _bnb(ref, kind)
    det = detect(sd)
    assert (det.family, det.layout) == ("flux", "official") and det.quant.startswith(f"bitsandbytes {kind}")
    if kind == "nf4":
        assert det.fields["hidden_size"] == 64  # read off the true shapes the quant states give
    save_file(sd, tmp_path / "q.safetensors")
    text = summarize(str(tmp_path / "q.safetensors"))
    assert f"quantisation: bitsandbytes {kind}" in text
    assert f"parameters: {sum(v.numel() for v in ref.values()):,}" in text or kind == "int8"
    with pytest.raises(CheckpointError, match=f"bitsandbytes {kind}-quantised"):
        convert(sd, to="diffusers")
    for spec in (None, "tiny-flux"):
        with pytest.raises(LoadError, match=f"this file is bitsandbytes {kind}-quantised .* does not dequantise"):
            zoo.load(spec, tmp_path / "q.safetensors")


gguf = pytest.importorskip("gguf")


def _q4k_bytes(rows: int, cols: int) -> np.ndarray:
    """Random Q4_K blocks (gguf has no Q4_K quantiser) with finite fp16 super-block scales."""
    raw = np.random.default_rng(0).integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    raw[..., 0:4] = np.frombuffer(np.array([0.01, 0.002], dtype=np.float16).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, cols // 256 * 144)


def test_gguf_tensors_dequantise_exactly_as_gguf_does(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    a = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    raw = {"q8": (quantize(a, Q.Q8_0), Q.Q8_0), "q4": (quantize(a, Q.Q4_0), Q.Q4_0),
           "q4k": (_q4k_bytes(4, 512), Q.Q4_K)}
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "flux")
    for name, (q, qt) in raw.items():
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
    w.add_tensor("conv", np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    sd = load_file(tmp_path / "t.gguf")
    for name, (q, qt) in raw.items():
        assert torch.equal(sd[name], torch.from_numpy(dequantize(q, qt))), name
    assert torch.equal(sd["conv"], torch.arange(24.0).reshape(2, 3, 2, 2))
    assert sd.quant_types == {"q8": "Q8_0", "q4": "Q4_0", "q4k": "Q4_K", "conv": "F32"}
    assert "quantisation: GGUF" in summarize(str(tmp_path / "t.gguf"))


def test_a_gguf_flux_loads_into_the_zoo_model(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    ref = randomize(zoo.build("tiny-flux"), seed=3).eval()
    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "flux")
    rounded = {}
    for k, v in ref.state_dict().items():
        a = v.numpy()
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            q = quantize(a, Q.Q8_0)
            w.add_tensor(k, q, raw_shape=q.shape, raw_dtype=Q.Q8_0)
            rounded[k] = torch.from_numpy(dequantize(q, Q.Q8_0))
        else:
            w.add_tensor(k, a)
            rounded[k] = v
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    model = zoo.load(None, tmp_path / "f.gguf")
    want = randomize(zoo.build("tiny-flux")).eval()
    want.load_state_dict(rounded)
    args, kwargs = ref.example_inputs(height=32, width=32, txt_len=4)
    with torch.no_grad():
        assert max_rel_err(model(*args, **kwargs), want(*args, **kwargs)) <= 1e-6
