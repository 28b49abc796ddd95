"""lora.adapters_per_item: one forward where batch item i runs adapter names[i] alone equals running each item by
itself with that adapter active, and equals peft's mixed-adapter batch (`adapter_names=`) on the same weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora
from tests.conftest import randomize


class Tiny(nn.Module):
    """Two linears (one per adapter set) and a conv, so both wrappers and a layer without an adapter are covered."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.out = nn.Linear(12, 6)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, v, img):
        return self.out(torch.tanh(self.proj(v))), self.conv(img)


def filled(model: nn.Module, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            if adapter in layer.adapters:
                for d in (layer.lora_down, layer.lora_up):
                    d[adapter].weight.copy_(torch.randn(d[adapter].weight.shape, generator=g) * 0.3)


def model_with_adapters() -> nn.Module:
    m = randomize(Tiny(), seed=1)
    lora.inject(m, ["proj", "out", "conv"], rank=3, alpha=5, adapter="rgb")
    lora.inject(m, ["proj", "conv"], rank=2, adapter="depth")  # `out` has no depth adapter: base there
    filled(m, "rgb", 2)
    filled(m, "depth", 3)
    return m


def test_per_item_adapters_equal_each_item_run_alone_with_its_adapter():
    m = model_with_adapters()
    g = torch.Generator().manual_seed(0)
    v, img = torch.randn(5, 4, 8, generator=g), torch.randn(5, 3, 6, 6, generator=g)
    names = ["rgb", "depth", "depth", None, "rgb"]
    with torch.no_grad(), lora.adapters_per_item(m, names):
        got = m(v, img)
    with torch.no_grad():
        for i, name in enumerate(names):
            lora.set_adapter(m, name)
            want = m(v[i : i + 1], img[i : i + 1])
            for a, b in zip(got, want):
                assert torch.allclose(a[i : i + 1], b, atol=1e-6, rtol=0)
    assert all(layer.per_item is None for layer in lora.lora_layers(m).values())  # undone on exit
    with torch.no_grad(), lora.adapters_per_item(m, names):  # (B, L, D) flattened to (B * L, D): L rows per item
        assert torch.equal(m.proj(v.flatten(0, 1)), m.proj(v).flatten(0, 1))
    # the items did differ: the adapters change the output
    assert (got[0][1] - got[0][0]).abs().max() > 1e-2 and (got[0][3] - got[0][1]).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_per_item_adapters_match_peft_mixed_batches():
    peft = pytest.importorskip("peft")
    base = randomize(Tiny(), seed=4)
    ref = copy.deepcopy(base)
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=5, target_modules=["proj", "out"]), ref,
                                       adapter_name="rgb")
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]), ref,
                                       adapter_name="depth")
    ours = copy.deepcopy(base)
    lora.inject(ours, ["proj", "out"], rank=3, alpha=5, adapter="rgb")
    lora.inject(ours, ["proj"], rank=2, alpha=2, adapter="depth")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("proj", "out"):
            for adapter in ("rgb", "depth") if name == "proj" else ("rgb",):
                mod = getattr(ref, name)
                a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
                a.copy_(torch.randn(a.shape, generator=g))
                b.copy_(torch.randn(b.shape, generator=g))
                getattr(ours, name).set_factors(adapter, a, b)
    names = ["depth", "rgb", "__base__", "rgb"]
    hooks = [getattr(ref, n).register_forward_pre_hook(  # peft's mixed batch: adapter_names= per forward
        lambda mod, args, kw: (args, {**kw, "adapter_names": names}), with_kwargs=True) for n in ("proj", "out")]
    x = torch.randn(4, 8, generator=g)
    img = torch.zeros(4, 3, 4, 4)
    with torch.no_grad():
        want = ref(x, img)[0]
        with lora.adapters_per_item(ours, [None if n == "__base__" else n for n in names]):
            got = ours(x, img)[0]
    for h in hooks:
        h.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_per_item_bad_input_is_named():
    m = model_with_adapters()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['normal'\]; the model has \['depth', 'rgb'\]"):
        with lora.adapters_per_item(m, ["rgb", "normal"]):
            pass
    with torch.no_grad(), lora.adapters_per_item(m, ["rgb", "depth"]):
        with pytest.raises(ValueError, match=r"batch 3 is not a multiple of the 2 per-item adapters"):
            m(torch.randn(3, 8), torch.randn(3, 3, 4, 4))
    with lora.adapters_per_item(m, ["rgb", "depth"]):
        with pytest.raises(ValueError, match="cannot merge while adapters run per batch item"):
            lora.merge(m)
    lora.set_adapter(m, "rgb")
    lora.merge(m)
    with pytest.raises(ValueError, match="unmerge before running adapters per item"):
        with lora.adapters_per_item(m, ["rgb", "depth"]):
            pass
    assert all(layer.per_item is None for layer in lora.lora_layers(m).values())
