"""LoRA layers and injection: parity with peft, presets on full-size Flux, adapters, merge, dtype, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora
import zoo
from tests.conftest import max_rel_err, randomize


class Tiny(nn.Module):
    """A linear path and a conv path, so both wrappers are exercised."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.out = nn.Linear(12, 6)

    def forward(self, v, img):
        return self.out(torch.tanh(self.proj(v))), self.conv(img)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, generator=g), torch.randn(2, 3, 9, 7, generator=g)


def fill_adapter(model, adapter, seed):
    """Random non-zero A and B for `adapter` on every LoRA layer (a fresh adapter has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            for d in (layer.lora_down, layer.lora_up):
                w = d[adapter].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)


def test_lora_matches_peft_merged_and_unmerged():
    peft = pytest.importorskip("peft")
    base = randomize(Tiny(), seed=1)
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=6, target_modules=["proj", "conv"]),
                                       copy.deepcopy(base))
    ours = copy.deepcopy(base)
    assert lora.inject(ours, ["proj", "conv"], rank=4, alpha=6) == ["proj", "conv"]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("proj", "conv"):
            a, b = getattr(ref, name).lora_A["default"].weight, getattr(ref, name).lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(torch.randn(b.shape, generator=g))
            getattr(ours, name).lora_down["default"].weight.copy_(a)
            getattr(ours, name).lora_up["default"].weight.copy_(b)
    x = inputs()
    with torch.no_grad():
        want, plain = ref(*x), base(*x)
        got = ours(*x)
        for w, o, p in zip(want, got, plain):
            assert max_rel_err(o, w) <= 1e-6
            assert max_rel_err(p, w) > 1e-2  # the adapter changes the output
        lora.merge(ours)
        for name in ("proj", "conv"):
            getattr(ref, name).merge()
        for w, o in zip(ref(*x), ours(*x)):
            assert max_rel_err(o, w) <= 1e-6
        for name in ("proj", "conv"):
            assert max_rel_err(getattr(ours, name).weight, getattr(ref, name).base_layer.weight) <= 1e-6


def test_omnix_preset_patches_95_flux_dev_layers_and_380_adapter_instances():
    model = zoo.build("flux-dev", device="meta")
    names = lora.inject(model, "omnix", rank=16, adapter="distance")
    assert len(names) == 95
    assert sum(n.endswith("img_attn.qkv") for n in names) == 19
    assert sum(n.endswith((".linear1", ".linear2")) for n in names) == 76
    for a in ("normal", "albedo", "pbr"):
        assert len(lora.inject(model, "omnix", rank=16, adapter=a)) == 95
    layers = lora.lora_layers(model)
    assert len(layers) == 95 and sum(len(m.adapters) for m in layers.values()) == 380
    lora.set_adapter(model, "normal")
    assert all(m.active == {"normal": 1.0} for m in layers.values())
    # the base's state-dict names do not change
    sd = model.state_dict()
    assert "double_blocks.0.img_attn.qkv.weight" in sd and "single_blocks.37.linear2.bias" in sd
    assert sd["single_blocks.0.linear1.lora_down.pbr.weight"].shape == (16, 3072)
    assert sd["single_blocks.0.linear1.lora_up.pbr.weight"].shape == (21504, 16)


def test_flux_presets_count_layers():
    model = zoo.build("flux-dev", device="meta", depth=2, depth_single_blocks=3)
    assert len(lora.inject(model, "flux-attn", rank=2, adapter="a")) == 2 * 4 + 3 * 2
    # a double block has 10 linears (2 mod, 2 qkv, 2 proj, 4 mlp), a single block 3
    assert len(lora.inject(model, "flux-all", rank=2, adapter="b")) == 2 * 10 + 3 * 3


def test_adapters_switch_weight_merge_unmerge_and_remove_restore_the_model():
    base = randomize(Tiny(), seed=3)
    model = copy.deepcopy(base)
    lora.inject(model, ["proj", "conv"], rank=3, alpha=6, adapter="a")
    lora.inject(model, ["proj", "conv"], rank=2, adapter="b")
    fill_adapter(model, "a", 4)
    fill_adapter(model, "b", 5)
    x = inputs(1)
    run = lambda: (model.proj(x[0]), model.conv(x[1]))  # each layer alone, where the LoRA branch is linear
    with torch.no_grad():
        lora.set_adapter(model, "a")
        ya = run()
        lora.set_adapter(model, "b")
        yb = run()
        lora.set_adapter(model, ["a", "b"], weights=[0.5, -1.0])
        yab, yab_model = run(), model(*x)
        lora.set_adapter(model, None)
        y0 = run()
        assert all(torch.equal(o, w) for o, w in zip(model(*x), base(*x)))
        for i in range(2):
            assert max_rel_err(ya[i], y0[i]) > 1e-2 and max_rel_err(yb[i], y0[i]) > 1e-2
            # y(0.5 a - b) = y0 + 0.5 (ya - y0) - (yb - y0)
            expect = y0[i] + 0.5 * (ya[i] - y0[i]) - (yb[i] - y0[i])
            assert max_rel_err(yab[i], expect) <= 1e-5
        w0 = model.proj.weight.detach().clone()
        lora.set_adapter(model, ["a", "b"], weights=[0.5, -1.0])
        lora.merge(model)
        assert not torch.equal(model.proj.weight, w0)
        for i in range(2):
            assert max_rel_err(model(*x)[i], yab_model[i]) <= 1e-5
        with pytest.raises(ValueError, match="unmerge"):
            lora.set_adapter(model, "a")
        lora.unmerge(model)
        assert torch.equal(model.proj.weight, w0) and torch.equal(model.conv.weight, base.conv.weight)
    assert lora.remove(model, "a") == []
    assert model.proj.adapters == ["b"]
    assert sorted(lora.remove(model)) == ["conv", "proj"]
    assert type(model.proj) is nn.Linear and type(model.conv) is nn.Conv2d
    assert sorted(model.state_dict()) == sorted(base.state_dict())
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_trainable_selects_lora_parameters_by_partial_name():
    model = zoo.build("tiny-flux")
    lora.inject(model, "flux-attn", rank=2)
    names = lora.trainable(model, ["img_attn", "single_blocks.1.*"])
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == set(names)
    assert "double_blocks.0.img_attn.qkv.lora_up.default.weight" in grads
    assert "single_blocks.1.linear2.lora_down.default.weight" in grads
    assert not any("txt_attn" in n or "single_blocks.0" in n for n in grads)
    assert not any(n.endswith(("qkv.weight", "qkv.bias")) for n in grads)
    with pytest.raises(ValueError, match="match no LoRA layer"):
        lora.trainable(model, "no_such_module")


def test_bf16_base_with_adapters_matches_fp32_reference():
    ref = randomize(Tiny(), seed=6)
    lora.inject(ref, ["proj", "out", "conv"], rank=2, alpha=4)
    fill_adapter(ref, "default", 7)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    x = inputs(2)
    with torch.no_grad():
        want = ref(*x)
        got = model(x[0].bfloat16(), x[1].bfloat16())
        assert all(o.dtype == torch.bfloat16 for o in got)
        for o, w in zip(got, want):
            assert max_rel_err(o.float(), w) <= 3e-2
        # fp32 inputs into a bf16 base, and fp32 adapters on a bf16 base: no dtype error either way
        fresh = randomize(Tiny(), seed=6).to(torch.bfloat16)
        lora.inject(fresh, ["proj", "conv"], rank=2, dtype=torch.float32)
        fresh(x[0].bfloat16(), x[1].bfloat16())
        lora.merge(fresh)
        assert fresh.proj.weight.dtype == torch.bfloat16


def test_adapters_follow_the_base_dtype_and_device_at_injection():
    model = zoo.build("flux-dev", device="meta", dtype=torch.bfloat16, depth=1, depth_single_blocks=1)
    lora.inject(model, "omnix", rank=4)
    for layer in lora.lora_layers(model).values():
        assert layer.lora_down["default"].weight.dtype == torch.bfloat16
        assert layer.lora_up["default"].weight.is_meta


def test_bad_input_is_a_clear_error():
    model = Tiny()
    with pytest.raises(ValueError, match="no preset"):
        lora.inject(model, "omnixx", rank=4)
    with pytest.raises(ValueError, match="preset 'omnix' matched no"):
        lora.inject(model, "omnix", rank=4)
    with pytest.raises(ValueError, match=r"'prj\*' \(near: \['proj'\]"):
        lora.inject(model, "prj*", rank=4)
    for rank in (0, -2, 1.5):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            lora.inject(model, "proj", rank=rank)
    lora.inject(model, "proj", rank=2)
    with pytest.raises(ValueError, match="already exists"):
        lora.inject(model, "proj", rank=2)
    with pytest.raises(ValueError, match="unknown adapter"):
        lora.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="2 adapter"):
        lora.set_adapter(model, ["default", "default"], weights=[1.0])
    with pytest.raises(ValueError, match="groups=1"):
        lora.LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2))


def test_fp8_stored_base_with_cast_layers_gets_adapters_in_the_compute_dtype():
    from layers.cast import cast_layers

    ref = randomize(Tiny(), seed=8)
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for name in ("proj", "conv", "out"):
            w = getattr(model, name).weight
            w.data = w.data.to(torch.float8_e4m3fn)
            getattr(ref, name).weight.copy_(w.float())  # the reference sees the same rounded weights
    cast_layers(model, torch.float32)
    for net in (ref, model):
        lora.inject(net, ["proj", "conv"], rank=2, alpha=3)
    assert model.proj.lora_down["default"].weight.dtype == torch.float32
    fill_adapter(ref, "default", 9)
    fill_adapter(model, "default", 9)
    x = inputs(3)
    with torch.no_grad():
        for o, w in zip(model(*x), ref(*x)):
            assert o.dtype == torch.float32 and max_rel_err(o, w) <= 1e-6
        # a plain (not cast) layer storing fp8 upcasts to the input's dtype
        plain = lora.LoRALinear(nn.Linear(8, 12))
        plain.weight.data = plain.weight.data.to(torch.float8_e4m3fn)
        plain.add_adapter("a", 2)
        assert plain.lora_down["a"].weight.dtype == torch.bfloat16
        assert plain(x[0]).dtype == torch.float32
        with pytest.raises(ValueError, match="fp8"):
            plain.merge()


def test_a_training_step_reaches_only_the_selected_adapters():
    model = randomize(Tiny(), seed=10)
    lora.inject(model, ["proj", "conv", "out"], rank=2)
    params = lora.trainable(model, ["proj", "conv"])
    x = inputs(4)
    loss = sum(o.square().mean() for o in model(*x))
    loss.backward()
    named = dict(model.named_parameters())
    # B starts at zero, so only B gets a gradient on the first step (A's gradient is B^T times something)
    assert all(named[n].grad is not None for n in params if "lora_up" in n)
    assert all(p.grad is None for n, p in named.items() if n not in params)
    opt = torch.optim.SGD([named[n] for n in params], lr=0.1)
    before = model.proj.weight.detach().clone()
    opt.step()
    assert torch.equal(model.proj.weight, before) and model.proj.lora_up["default"].weight.abs().sum() > 0


def test_factors_are_set_and_read_through_the_layer():
    layer = lora.LoRALinear(nn.Linear(8, 12))
    layer.add_adapter("a", 2, dtype=torch.float64)
    down, up = torch.randn(2, 8), torch.randn(12, 2)
    layer.set_factors("a", down, up)
    got = layer.factors("a")
    assert got[0].dtype == torch.float64 and torch.equal(got[0], down.double()) and torch.equal(got[1], up.double())
    with pytest.raises(ValueError, match=r"up has shape \(2, 12\), expected \(12, 2\)"):
        layer.set_factors("a", down, up.T)
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        layer.factors("b")
    layer.merge(permanent=True)  # the adapter is baked in: nothing is merged any more, unmerge changes nothing
    w = layer.weight.detach().clone()
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, w)


def test_alpha_over_rank_multiplier_and_their_product():
    base = randomize(Tiny(), seed=11)
    model = copy.deepcopy(base)
    lora.inject(model, "proj", rank=2, alpha=6, multiplier=0.5)
    fill_adapter(model, "default", 12)
    layer = model.proj
    assert (layer.alpha_over_rank("default"), layer.multiplier["default"], layer.total_scale("default")) == (3, .5, 1.5)
    x = inputs(5)[0]
    with torch.no_grad():
        want = base.proj(x) + 1.5 * (x @ layer.delta("default").T)
        assert max_rel_err(layer(x), want) <= 1e-6
