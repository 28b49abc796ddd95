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


# where each block format keeps its fp16 scale(s): random bytes elsewhere are valid codes
HALVES = {"Q8_0": (0, 2), "Q4_0": (0, 2), "Q4_1": (0, 4), "Q5_0": (0, 2), "Q5_1": (0, 4), "Q4_K": (0, 4),
          "Q5_K": (0, 4), "Q6_K": (208, 210), "Q3_K": (108, 110)}


@pytest.mark.parametrize("qtype", sorted(HALVES))
def test_gguf_blocks_decode_in_torch_exactly_as_gguf_does(qtype):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as np_dequantize

    from layers.gguf import BLOCKS, DECODERS, dequantize

    per, nbytes = BLOCKS[qtype]
    raw = np.random.default_rng(2).integers(0, 256, size=(3, 2, nbytes), dtype=np.uint8)
    a, b = HALVES[qtype]
    halves = np.array([0.013, -0.0021][: (b - a) // 2], dtype=np.float16)
    raw[..., a:b] = np.frombuffer(halves.tobytes(), dtype=np.uint8)
    raw = raw.reshape(3, 2 * nbytes)
    want = torch.from_numpy(np_dequantize(raw, Q[qtype]))
    got = dequantize(torch.from_numpy(raw), qtype, (3, 2 * per))
    assert (qtype in DECODERS) == (qtype != "Q3_K")  # Q3_K: gguf's own decoder, through numpy
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_a_gguf_flux_keeps_its_quantised_linears_and_matches_the_dequantised_load(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from layers.gguf import GGUFLinear

    ref = randomize(zoo.build("tiny-flux"), seed=4).eval()
    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "flux")
    for k, v in ref.state_dict().items():
        kind = Q.Q8_0 if "img_attn" in k else Q.Q4_0
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            q = quantize(v.numpy(), kind)
            w.add_tensor(k, q, raw_shape=q.shape, raw_dtype=kind)
        else:
            w.add_tensor(k, v.numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    model = zoo.load(None, tmp_path / "f.gguf")
    plain = zoo.load(None, tmp_path / "f.gguf", dequantize_gguf=True)
    quantised = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert "double_blocks.0.img_attn.qkv" in quantised and quantised["double_blocks.0.img_attn.qkv"].qtype == "Q8_0"
    assert all(m.weight.dtype == torch.uint8 for m in quantised.values())
    assert not any(isinstance(m, GGUFLinear) for m in plain.modules())
    size = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert size(model) < 0.4 * size(plain)  # 4.5-8.5 bits a weight instead of 32
    args, kwargs = ref.example_inputs(height=32, width=32, txt_len=4)
    with torch.no_grad():
        assert max_rel_err(model(*args, **kwargs), plain(*args, **kwargs)) <= 1e-6
    bf16 = zoo.load(None, tmp_path / "f.gguf", compute_dtype="bf16")
    assert all(m.compute_dtype == torch.bfloat16 for m in bf16.modules() if isinstance(m, GGUFLinear))
