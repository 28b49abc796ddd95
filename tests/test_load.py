"""zoo.load: any layout -> official model on meta with assigned tensors; dtypes, fp8 storage, key reports."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
from checkpoints_convert.convert import cast, convert
from checkpoints_convert.io import save_file
from layers.cast import CASTS, CastLinear, cast_layers
from tests.conftest import max_rel_err, randomize
from zoo.load import LoadError


@pytest.fixture(scope="module")
def ref():
    return randomize(zoo.build("tiny-flux"), seed=0).eval()


def _run(model, ref):
    args, kwargs = ref.example_inputs(height=64, width=48, txt_len=5)
    with torch.no_grad():
        return model(*args, **kwargs), ref(*args, **kwargs)


def test_official_file_loads_zero_copy_from_the_memory_map(tmp_path, ref):
    save_file(ref.state_dict(), tmp_path / "flux.safetensors")
    model = zoo.load("tiny-flux", tmp_path / "flux.safetensors")
    got, want = _run(model, ref)
    assert max_rel_err(got, want) <= 1e-6  # not bit-equal only because BLAS picks kernels by alignment
    # every parameter is a view into the one mapping of the file: nothing was copied
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    assert not model.training


@pytest.mark.parametrize("wrap", ["diffusers", "prefixed"])
def test_config_detected_from_diffusers_or_prefixed_files(tmp_path, ref, wrap):
    sd = convert(ref.state_dict(), to="diffusers") if wrap == "diffusers" else \
        {f"model.diffusion_model.{k}": v for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "x.safetensors")
    model = zoo.load(None, tmp_path / "x.safetensors")
    assert model.params == ref.params  # tiny-flux: found among the shipped configs by its keys and shapes
    got, want = _run(model, ref)
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8"])
def test_low_precision_storage_computes_in_fp32(ref, dtype):
    model = zoo.load("tiny-flux", ref.state_dict(), dtype=dtype, compute_dtype=torch.float32)
    low = cast(ref.state_dict(), dtype)["img_in.weight"].dtype
    qkv = model.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, CastLinear) and qkv.weight.dtype == low and qkv.bias.dtype == torch.float32
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    assert list(model.state_dict()) == list(ref.state_dict())  # same names: the file layout is unchanged
    # the reference: an fp32 model holding exactly the rounded matmul weights (all of Flux's 2-D tensors)
    rounded = randomize(zoo.build("tiny-flux")).eval()
    rounded.load_state_dict({k: v.to(low).float() if v.ndim == 2 else v for k, v in ref.state_dict().items()})
    got, want = _run(model, rounded)
    assert got.dtype == torch.float32 and max_rel_err(got, want) <= 1e-5


def test_fp8_file_keeps_fp8_weights_and_upcasts_per_layer(tmp_path, ref):
    save_file(cast(ref.state_dict(), "fp8"), tmp_path / "fp8.safetensors")
    model = zoo.load("tiny-flux", tmp_path / "fp8.safetensors", compute_dtype="fp32")
    weights = [m.weight for m in model.modules() if isinstance(m, CastLinear)]
    assert weights and all(w.dtype == torch.float8_e4m3fn for w in weights)
    got, _ = _run(model, ref)
    assert torch.isfinite(got).all()
    # no compute dtype given: fp8 weights default to bfloat16 compute
    assert zoo.load("tiny-flux", tmp_path / "fp8.safetensors").img_in.compute_dtype == torch.bfloat16


def test_cast_layers_keep_names_and_match_plain_layers():
    net = randomize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5)))
    x = torch.randn(2, 3, 8, 8)
    want, keys = net(x), list(net.state_dict())
    assert cast_layers(net, torch.float32) == ["0", "2"]
    assert list(net.state_dict()) == keys and type(net[2]) is CastLinear
    assert torch.equal(net(x), want)
    with pytest.raises(ValueError, match="compute_dtype must be"):
        cast_layers(net, torch.float8_e4m3fn)


def test_mismatches_reported_together_and_strict_false_returns_the_report(ref):
    sd = dict(ref.state_dict())
    del sd["img_in.bias"]
    sd["extra.weight"] = torch.zeros(2)
    sd["txt_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(LoadError, match=r"(?s)1 missing, 1 unexpected, 1 mis-shaped.*missing img_in.bias: "
                                        r"expected \[64\].*unexpected extra.weight: \[2\].*"
                                        r"mis-shaped txt_in.weight: file \[3, 3\], expected \[64, 48\]"):
        zoo.load("tiny-flux", sd)
    model, report = zoo.load("tiny-flux", sd, strict=False)
    assert set(report.missing) == {"img_in.bias"} and set(report.mismatched) == {"txt_in.weight"}
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(model.txt_in.weight, torch.zeros(64, 48))  # mis-shaped: not taken, zero-filled
    assert torch.equal(model.time_in.in_layer.weight, ref.time_in.in_layer.weight)


def test_full_size_releases_resolve_and_load_on_meta():
    for name in ("flux-dev", "flux-schnell"):
        sd = convert(zoo.build(name, device="meta").state_dict(), to="diffusers")
        model = zoo.load(None, sd, device="meta")
        assert model.params == zoo.get_config(name)
        assert all(p.is_meta for p in model.parameters())


T2I = {"arch": "t2i_adapter", "channels": [32, 64], "nums_rb": 2, "cin": 64, "sk": True, "use_conv": False}


@pytest.mark.parametrize("spec", ["tiny-unet", "tiny-sdxl", "tiny-controlnet", T2I, "tiny-sana", "tiny-vae",
                                  "tiny-vae-flux"], ids=lambda x: x if isinstance(x, str) else "t2i")
def test_every_family_loads_from_its_diffusers_layout(spec):
    ref = randomize(zoo.build(spec), seed=5).eval()
    model = zoo.load(spec, convert(ref.state_dict(), to="diffusers"))
    torch.manual_seed(0)
    args, kw = zoo.example_inputs(ref, height=64, width=64)
    with torch.no_grad():
        got, want = model(*args, **kw), ref(*args, **kw)
    for g, w in zip(*((x,) if torch.is_tensor(x) else x for x in (got, want))):
        assert max_rel_err(g, w) <= 1e-5


def test_config_found_by_shapes_for_a_non_release_autoencoder():
    ref = randomize(zoo.build("tiny-vae-flux"), seed=6).eval()
    model = zoo.load(None, convert(ref.state_dict(), to="diffusers"))
    assert model.params == ref.params


def test_all_fp8_full_checkpoint_like_shared_files(tmp_path, ref):
    # shared fp8 Flux files: every tensor (biases and norm scales too) in e4m3fn, under `model.diffusion_model.`,
    # next to the VAE and text encoders
    sd = {f"model.diffusion_model.{k}": v.to(torch.float8_e4m3fn) for k, v in ref.state_dict().items()}
    sd.update({f"vae.{k}": v for k, v in randomize(zoo.build("tiny-vae-flux")).state_dict().items()})
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    save_file(sd, tmp_path / "flux-fp8-full.safetensors")
    model = zoo.load("tiny-flux", tmp_path / "flux-fp8-full.safetensors", compute_dtype="fp32")
    assert model.img_in.weight.dtype == torch.float8_e4m3fn and model.img_in.bias.dtype == torch.float32
    rounded = randomize(zoo.build("tiny-flux")).eval()
    rounded.load_state_dict({k: v.to(torch.float8_e4m3fn).float() for k, v in ref.state_dict().items()})
    got, want = _run(model, rounded)
    assert max_rel_err(got, want) <= 1e-5


def test_sharded_diffusers_folder_and_ldm_ckpt_load(tmp_path, ref):
    d = convert(ref.state_dict(), to="diffusers")
    keys = sorted(d)
    folder = tmp_path / "transformer"
    folder.mkdir()
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: d[k] for k in part}, folder / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    torch.save({"state_dict": {f"model.diffusion_model.{k}": v for k, v in ref.state_dict().items()},
                "global_step": 10}, tmp_path / "ldm.ckpt")
    for src in (folder, tmp_path / "ldm.ckpt"):
        got, want = _run(zoo.load(None, src), ref)
        assert max_rel_err(got, want) <= 1e-5


def test_named_config_picks_its_model_out_of_a_full_checkpoint():
    unet = randomize(zoo.build("tiny-unet"), seed=9).state_dict()
    vae = randomize(zoo.build("tiny-vae"), seed=10).eval()
    full = {**{f"model.diffusion_model.{k}": v for k, v in unet.items()},
            **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}}
    model = zoo.load("tiny-vae", full)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_err(model.decode(model.encode(x).mode()), vae.decode(vae.encode(x).mode())) <= 1e-5


def test_comfy_scaled_fp8_file_rescales_each_layer(tmp_path, ref):
    # ComfyUI "scaled fp8": weight = fp8 * scale_weight per layer, plus scale_input and a `scaled_fp8` marker
    sd, rounded_sd = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in ref.state_dict().items():
        if v.ndim == 2:
            scale = v.abs().max() / 448
            q = (v / scale).to(torch.float8_e4m3fn)
            sd[k], sd[k[:-len("weight")] + "scale_weight"] = q, scale.reshape(1)
            sd[k[:-len("weight")] + "scale_input"] = torch.ones(1)
            rounded_sd[k] = q.float() * scale
        else:
            sd[k] = rounded_sd[k] = v
    save_file(sd, tmp_path / "scaled.safetensors")
    model = zoo.load("tiny-flux", tmp_path / "scaled.safetensors", compute_dtype="fp32")
    assert list(model.state_dict()) == list(ref.state_dict())  # the scales are no parameters
    rounded = randomize(zoo.build("tiny-flux")).eval()
    rounded.load_state_dict(rounded_sd)
    got, want = _run(model, rounded)
    assert max_rel_err(got, want) <= 1e-5


def test_a_lora_file_is_pointed_to_the_lora_package():
    from checkpoints_convert.detect import DetectError

    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64)}
    with pytest.raises(DetectError, match=r"this is a LoRA \(kohya.*`lora` package"):
        zoo.load(None, lora)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_low_precision_convs_of_a_unet_compute_in_fp32(dtype):
    ref = randomize(zoo.build("tiny-unet"), seed=11).eval()
    model = zoo.load("tiny-unet", ref.state_dict(), dtype=dtype, compute_dtype="fp32")
    low = cast({"w": torch.zeros(1, 1)}, dtype)["w"].dtype
    cast_names = {n for n, m in model.named_modules() if isinstance(m, CASTS)}
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, CASTS) and m.weight.dtype == low for m in convs)
    rounded = randomize(zoo.build("tiny-unet")).eval()
    rounded.load_state_dict({k: v.to(low).float() if k.endswith(".weight") and k[:-7] in cast_names else v
                             for k, v in ref.state_dict().items()})
    torch.manual_seed(0)
    args, kwargs = zoo.example_inputs(ref, height=64, width=64)
    with torch.no_grad():
        assert max_rel_err(model(*args, **kwargs), rounded(*args, **kwargs)) <= 1e-5


def test_zoo_inspect_names_the_config_that_loads_the_file(tmp_path, ref, capsys):
    from zoo.__main__ import main

    save_file(convert(ref.state_dict(), to="diffusers"), tmp_path / "d.safetensors")
    assert main(["inspect", str(tmp_path / "d.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "model: flux (diffusers)" in out and "zoo config: tiny-flux" in out
