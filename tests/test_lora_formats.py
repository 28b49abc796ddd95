"""LoRA files: a diffusers/PEFT Flux LoRA in our Flux equals diffusers; lossless round trips; detection; bad input."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import lora
import zoo
from checkpoints_convert import flux_from_diffusers
from lora.formats import Factor, convert, detect, factors_of, read, write
from tests.conftest import max_rel_err, randomize
from zoo.flux import img_ids, txt_ids

TINY = dict(in_channels=16, vec_in_dim=24, context_in_dim=40, hidden_size=64, mlp_ratio=4.0, num_heads=4,
            depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True, guidance_embed=True)
ALL = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
       "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "norm1.linear", "norm.linear", "norm_out.linear",
       "x_embedder"]


def peer():
    diffusers = pytest.importorskip("diffusers")
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    return randomize(m, seed=1, std=0.1).eval()


def flux_inputs():
    g = torch.Generator().manual_seed(0)
    b, lh, lw, lt = 2, 4, 6, 5
    tid = txt_ids(b, lt)
    tid[..., 1] = torch.arange(lt, dtype=torch.float32)
    return dict(img=torch.randn(b, (lh // 2) * (lw // 2), 16, generator=g), txt=torch.randn(b, lt, 40, generator=g),
                y=torch.randn(b, 24, generator=g), t=torch.tensor([0.3, 0.9]), g=torch.tensor([3.5, 1.0]),
                iid=img_ids(b, lh, lw), tid=tid)


def run_peer(m, x):
    return m(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
             img_ids=x["iid"][0], txt_ids=x["tid"][0], guidance=x["g"], return_dict=False)[0]


def run_ours(m, x):
    return m(x["img"], x["iid"], x["txt"], x["tid"], x["t"], x["y"], guidance=x["g"])


def add_random_adapter(ref, config, seed: int, std: float) -> None:
    """A peft adapter on a diffusers model, with random non-zero A and B (peft starts B at zero)."""
    ref.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("targets, patterns", [
    (ALL, dict(rank_pattern={"proj_mlp": 2, "to_v": 3}, alpha_pattern={"to_k": 2.0, "norm_out.linear": 16.0})),
    (["to_q", "to_v", "proj_mlp", "add_k_proj"], {}),  # fused modules with missing parts
])
def test_diffusers_flux_lora_in_our_flux_matches_diffusers(tmp_path, targets, patterns):
    peft = pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    ref = peer()
    ours = zoo.build({"arch": "flux", **TINY}).eval()
    ours.load_state_dict(flux_from_diffusers(ref.state_dict()), strict=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **patterns)
    add_random_adapter(ref, config, seed=5, std=0.2)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    x = flux_inputs()
    with torch.no_grad():
        want = run_peer(ref, x)
        plain = run_ours(ours, x)
        report = lora.load(ours, path, adapter="peft", strict=True)
        got = run_ours(ours, x)
    assert report.format == "diffusers" and not report.unmatched
    assert max_rel_err(plain, want) > 1e-3  # the LoRA matters
    assert max_rel_err(got, want) <= 1e-5
    # and back: our diffusers-format file, read by diffusers, gives the same output
    ref.delete_adapters("default")
    out = lora.save(ours, tmp_path / "ours.safetensors", adapter="peft", format="diffusers")
    sd, meta = FluxPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    ref.load_lora_adapter(sd, prefix="transformer", adapter_name="back", metadata=meta)
    with torch.no_grad():
        assert max_rel_err(run_peer(ref, x), got) <= 1e-5


def random_factors(model, seed=0, rank=3):
    """Non-zero factors on every target of `model`, alphas all different from the rank."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        if n.startswith(("double_blocks", "single_blocks", "final_layer")):
            out[n] = Factor(torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank,
                                                                                       generator=g), 1.0 + i)
    return out


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        fa, fb = a[k], b[k]
        assert torch.equal(fa.down, fb.down) and torch.equal(fa.up, fb.up), k
        assert (fa.alpha or fa.down.shape[0]) == (fb.alpha or fb.down.shape[0]), k


@pytest.mark.parametrize("fmt", ["ours", "comfy", "kohya", "diffusers"])
def test_round_trips_are_lossless(fmt):
    model = zoo.build({"arch": "flux", **TINY}, device="meta")
    factors = random_factors(model)
    sd, meta = write(factors, fmt)
    assert detect(sd) == fmt
    back, unmatched, _ = read(sd, meta)
    assert not unmatched
    assert_same(back, factors)
    # and every format into every other, then back to ours
    for other in ("kohya", "diffusers", "comfy"):
        sd2, meta2, _ = convert(sd, other, meta)
        assert_same(read(sd2, meta2)[0], factors)


def test_diffusers_parts_round_trip_through_our_fused_modules_bit_exactly():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)
    h = 64
    sd = {  # independent A per part, parts missing, different ranks: joined block-wise, split back exactly
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": r(2, h),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": r(h, 2),
        "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": r(3, h),
        "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": r(h, 3),
        "transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight": r(2, h),
        "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight": r(4 * h, 2),
        "transformer.single_transformer_blocks.1.attn.to_k.lora_A.weight": r(2, h),
        "transformer.single_transformer_blocks.1.attn.to_k.lora_B.weight": r(h, 2),
        "transformer.norm_out.linear.lora_A.weight": r(2, h),
        "transformer.norm_out.linear.lora_B.weight": r(2 * h, 2),
    }
    factors, unmatched, fmt = read(sd)
    assert fmt == "diffusers" and not unmatched
    assert sorted(factors) == ["double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1",
                               "single_blocks.1.linear1"]
    qkv = factors["double_blocks.0.img_attn.qkv"]
    assert qkv.down.shape == (5, h) and qkv.up.shape == (3 * h, 5)
    # the fused product is the parts' products stacked (k's rows zero)
    want = torch.cat([sd[f"transformer.transformer_blocks.0.attn.to_{p}.lora_B.weight"]
                      @ sd[f"transformer.transformer_blocks.0.attn.to_{p}.lora_A.weight"] if p != "k"
                      else torch.zeros(h, h) for p in "qkv"])
    assert torch.allclose(qkv.up @ qkv.down, want, atol=1e-5)
    back, _ = write(factors, "diffusers")
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_xlabs_lora_reads_onto_official_modules_and_round_trips():
    g = torch.Generator().manual_seed(2)
    h, r = 64, 4
    sd = {}
    for key, (i, o) in {"double_blocks.0.processor.qkv_lora1": (h, 3 * h),
                        "double_blocks.1.processor.proj_lora2": (h, h),
                        "single_blocks.1.processor.qkv_lora": (h, 3 * h),
                        "single_blocks.0.processor.proj_lora": (5 * h, h)}.items():
        sd[f"{key}.down.weight"] = torch.randn(r, i, generator=g)
        sd[f"{key}.up.weight"] = torch.randn(o, r, generator=g)
    assert detect(sd) == "xlabs"
    model = zoo.build({"arch": "flux", **TINY})
    report = lora.load(model, sd, strict=True)
    assert sorted(report.modules) == ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.proj",
                                      "single_blocks.0.linear2", "single_blocks.1.linear1"]
    lin1 = model.single_blocks[1].linear1.lora_up["default"].weight
    assert lin1.shape == (7 * h, r) and not lin1[3 * h:].any()
    back, _ = write(factors_of(model), "xlabs")
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_comfy_and_kohya_names_load_into_the_model():
    model = randomize(zoo.build({"arch": "flux", **TINY}))
    factors = random_factors(model, seed=4)
    x = flux_inputs()
    outs = []
    for fmt in ("ours", "comfy", "kohya", "diffusers"):
        sd, meta = write(factors, fmt)
        report = lora.load(model, sd, metadata=meta, adapter=fmt, strict=True)
        assert len(report.modules) == len(factors)
        with torch.no_grad():
            outs.append(run_ours(model, x))
    for o in outs[1:]:
        assert max_rel_err(o, outs[0]) <= 1e-5


def test_unmatched_keys_are_reported_and_strict_makes_them_an_error():
    model = zoo.build({"arch": "flux", **TINY})
    sd, _ = write({"double_blocks.0.img_attn.qkv": Factor(torch.randn(2, 64), torch.randn(192, 2), 2.0)}, "kohya")
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, 8)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, 2)
    sd["lora_unet_no_such_block.lora_down.weight"] = torch.randn(2, 8)
    sd["lora_unet_no_such_block.lora_up.weight"] = torch.randn(8, 2)
    with pytest.warns(UserWarning, match="2 key"):
        report = lora.load(model, sd)
    assert report.modules == ["double_blocks.0.img_attn.qkv"]
    assert sorted(report.unmatched) == ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_no_such_block"]
    with pytest.raises(ValueError, match="lora_unet_no_such_block"):
        lora.load(model, sd, adapter="again", strict=True)


def test_bad_files_are_clear_errors(tmp_path):
    model = zoo.build({"arch": "flux", **TINY})
    sd, _ = write({"double_blocks.0.img_attn.qkv": Factor(torch.randn(2, 48), torch.randn(192, 2))}, "ours")
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.lora_down\.weight has shape \(2, 48\).*"
                                         r"weight \(192, 64\)\) needs \(2, 64\)"):
        lora.load(model, sd)
    with pytest.raises(ValueError, match="not a LoRA in any known format"):
        lora.load(model, {"img_in.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="unknown LoRA format"):
        write({}, "lycoris")
    with pytest.raises(ValueError, match="no such file"):
        lora.load(model, tmp_path / "missing.safetensors")


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]


def test_diffusers_unet_lora_in_our_unet_matches_diffusers(tmp_path, unet_peers):
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from tests.test_unet_parity import loaded

    ref = copy.deepcopy(unet_peers["tiny-unet"])  # the session's peer gains adapters here
    ours = loaded("tiny-unet", ref)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, rank_pattern={"conv1": 2},
                             alpha_pattern={"to_v": 1.0})
    add_random_adapter(ref, config, seed=5, std=0.1)
    g = torch.Generator().manual_seed(5)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref),
                                              unet_lora_adapter_metadata=config.to_dict())
    x, c, t = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=c).sample
        plain = ours(x, t, context=c)
        report = lora.load(ours, tmp_path / "pytorch_lora_weights.safetensors", strict=True)
        got = ours(x, t, context=c)
    assert report.format == "diffusers" and len(report.modules) == len(lora.lora_layers(ours))
    assert any(isinstance(m, lora.LoRAConv2d) and m.base.kernel_size == (3, 3) for m in lora.lora_layers(ours).values())
    assert max_rel_err(plain, want) > 1e-3
    assert max_rel_err(got, want) <= 1e-5
    # our file in diffusers format, read back by diffusers
    ref.delete_adapters("default")
    out = lora.save(ours, tmp_path / "ours.safetensors", format="diffusers")
    sd, _, meta = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    ref.load_lora_adapter(sd, prefix="unet", adapter_name="back", metadata=meta)
    with torch.no_grad():
        assert max_rel_err(ref(x, t, encoder_hidden_states=c).sample, got) <= 1e-5


def test_sd_presets_on_full_size_unets():
    sd15 = zoo.build("sd15", device="meta")
    assert len(lora.inject(sd15, "sd-attn", rank=4)) == 16 * 8  # 16 transformer blocks x (q, k, v, out) x 2
    # everything but the time embedding and conv_in / conv_out
    assert len(lora.inject(sd15, "sd-all", rank=4, conv_rank=2, adapter="all")) == len(lora.list_targets(sd15)) - 4
    assert sd15.input_blocks[1][0].in_layers[2].rank["all"] == 2 and sd15.input_blocks[1][1].proj_in.rank["all"] == 4
    assert len(lora.inject(zoo.build("sdxl-base", device="meta"), "sd-attn", rank=4)) == 70 * 8


def test_kohya_sd15_lora_written_by_diffusers_loads_into_our_unet(unet_peers):
    peft = pytest.importorskip("peft")
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    from tests.test_unet_parity import loaded

    ref = copy.deepcopy(unet_peers["tiny-unet"])  # the session's peer gains adapters here
    ours = loaded("tiny-unet", ref)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS)  # kohya's writer: alpha = rank
    add_random_adapter(ref, config, seed=6, std=0.1)
    g = torch.Generator().manual_seed(6)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(ref).items()})
    assert detect(kohya) == "kohya" and any(k.startswith("lora_unet_down_blocks_") for k in kohya)
    report = lora.load(ours, kohya, strict=True)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in report.modules
    x, c, t = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert max_rel_err(ours(x, t, context=c), ref(x, t, encoder_hidden_states=c).sample) <= 1e-5


def test_our_kohya_flux_lora_reads_in_diffusers_as_our_diffusers_file():
    # diffusers' kohya-Flux reader hard-codes FLUX.1's width: compare at full width, factors only (no model run)
    from diffusers import FluxPipeline

    model = zoo.build("flux-dev", device="meta", depth=1, depth_single_blocks=1)
    factors = {n: f for n, f in random_factors(model, seed=7, rank=2).items() if not n.startswith("final_layer")}
    theirs = FluxPipeline.lora_state_dict(write(factors, "kohya")[0])  # alpha folded into the factors
    ours, meta = write(factors, "diffusers")
    assert sorted(theirs) == sorted(ours)
    alphas = json.loads(meta["lora_adapter_metadata"])
    for k in [k for k in ours if k.endswith(".lora_A.weight")]:
        b = k.replace("lora_A", "lora_B")
        name = k[len("transformer."): -len(".lora_A.weight")]
        pattern = alphas["transformer.alpha_pattern"]
        alpha = next((v for p, v in pattern.items() if re.match(rf"(.*\\.)?({p})$", name)),
                     alphas["transformer.lora_alpha"])
        probe = torch.randn(ours[k].shape[1], 3, dtype=torch.float64)  # B A on random vectors: no 9216 x 3072 matrix
        want = theirs[b].double() @ (theirs[k].double() @ probe)
        got = ours[b].double() @ (ours[k].double() @ probe) * (alpha / ours[k].shape[0])
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), name


def test_unet_round_trips_through_every_format_with_the_checkpoint_keys():
    from lora.formats import family_of_checkpoint

    model = zoo.build("tiny-sdxl", device="meta")
    family = family_of_checkpoint({k: tuple(v.shape) for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(3)
    factors = {}
    for i, name in enumerate(lora.list_targets(model)):
        w = model.get_submodule(name).weight
        factors[name] = Factor(torch.randn(2, *w.shape[1:], generator=g),
                               torch.randn(w.shape[0], 2, *[1] * (w.ndim - 2), generator=g), 0.5 + i)
    for fmt in ("ours", "comfy", "kohya", "diffusers"):
        sd, meta = write(factors, fmt, family)
        if fmt == "diffusers":
            assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
        back, unmatched, _ = read(sd, meta, family=family)
        assert not unmatched
        assert_same(back, factors)
        sd2, meta2, _ = convert(sd, "diffusers" if fmt == "kohya" else "kohya", meta, family=family)
        assert_same(read(sd2, meta2, family=family)[0], factors)


def test_fp32_lora_file_on_a_bf16_flux_matches_fp32_within_bf16_tolerance():
    ref = randomize(zoo.build({"arch": "flux", **TINY}), seed=2, std=0.1).eval()
    model = zoo.build({"arch": "flux", **TINY}, dtype=torch.bfloat16).eval()
    model.load_state_dict(ref.state_dict())
    factors = {n: Factor(f.down * 0.1, f.up * 0.1, f.alpha) for n, f in random_factors(ref, seed=3).items()
               if n.endswith(("qkv", "linear1", "linear2"))}
    sd, meta = write(factors, "diffusers")
    x = flux_inputs()
    x["g"] = torch.tensor([4.0, 1.0])  # 1000 * 3.5 is no bf16 number: the guidance embedding alone would cost 10%
    xb = {k: v.bfloat16() if k in ("img", "txt", "y", "t", "g") else v for k, v in x.items()}
    with torch.no_grad():  # the tolerance: what bf16 costs this network without adapters
        tol = 2 * max_rel_err(run_ours(model, xb).float(), run_ours(ref, x))
    for m in (ref, model):
        lora.load(m, sd, metadata=meta, strict=True)
    assert model.single_blocks[0].linear1.lora_up["default"].weight.dtype == torch.bfloat16
    with torch.no_grad():
        want = run_ours(ref, x)
        got = run_ours(model, xb)
        assert got.dtype == torch.bfloat16 and max_rel_err(got.float(), want) <= tol
        lora.merge(model)
        assert max_rel_err(run_ours(model, xb).float(), want) <= tol
    assert tol < 0.05
