"""LoRA variants people publish: DoRA, LyCORIS LoHa and LoKr load, apply and merge as peft's implementations do."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora
from lora.files import write
from tests.conftest import max_rel_err, randomize


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 48)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)

    def forward(self, v, img):
        return self.fc(v), self.conv(img)


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 64, generator=g), torch.randn(2, 16, 5, 6, generator=g)


def peer(config, seed: int):
    """The peft model of `config` on a random Net, every adapter tensor random and non-zero."""
    peft = pytest.importorskip("peft")
    base = randomize(Net(), seed=seed)
    ref = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "base_layer" not in n:
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.2 if "magnitude" in n else
                        torch.randn(p.shape, generator=g) * 0.3)
    return base, ref.eval()


def check(base, ref, sd, metadata=None, merge=None):
    ours = copy.deepcopy(base)
    report = lora.load(ours, sd, metadata=metadata, strict=True)
    assert sorted(report.modules) == ["conv", "fc"]
    x = inputs()
    with torch.no_grad():
        want, plain, got = ref(*x), base(*x), ours(*x)
        for w, p, o in zip(want, plain, got):
            assert max_rel_err(p, w) > 1e-2  # the adapter matters
            assert max_rel_err(o, w) <= 1e-5
        lora.merge(ours)
        merge(ref)
        for w, o in zip(ref(*x), ours(*x)):
            assert max_rel_err(o, w) <= 1e-5
        assert max_rel_err(ours.fc.weight, ref.fc.base_layer.weight) <= 1e-5
        lora.unmerge(ours)
        assert torch.equal(ours.fc.weight, base.fc.weight)
    return ours


def merge_all(ref):
    for name in ("fc", "conv"):
        getattr(ref, name).merge()


def test_dora_matches_peft_and_round_trips_through_kohya_dora_scale():
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    base, ref = peer(peft.LoraConfig(r=4, lora_alpha=6, target_modules=["fc", "conv"], use_dora=True), seed=1)
    sd = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(ref).items()}
    assert any(k.endswith("lora_magnitude_vector") for k in sd)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 6, "use_dora": True})}
    ours = check(base, ref, sd, meta, merge_all)
    x = inputs()
    for fmt in ("kohya", "diffusers"):  # our files carry the magnitude (dora_scale / lora_magnitude_vector)
        out, out_meta = write(lora.factors_of(ours), fmt)
        assert any(k.endswith(("dora_scale", "lora_magnitude_vector")) for k in out)
        again = copy.deepcopy(base)
        lora.load(again, out, metadata=out_meta, strict=True)
        with torch.no_grad():
            for o, w in zip(again(*x), ours(*x)):
                assert max_rel_err(o, w) <= 1e-6
    with pytest.raises(ValueError, match="DoRA magnitude has shape \\(64,\\).*one entry per output row \\(48\\)"):
        lora.load(copy.deepcopy(base), {**sd, "base_model.model.fc.lora_magnitude_vector": torch.ones(64)},
                  metadata=meta)


def lycoris_file(ref, alpha: float) -> dict[str, torch.Tensor]:
    """peft's LoHa/LoKr tensors under LyCORIS' kohya names, with the alpha key LyCORIS writes."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for k, v in get_peft_model_state_dict(ref).items():
        module, role = k.rsplit(".", 1)
        out[f"lora_unet_{module}.{role}"] = v
        out[f"lora_unet_{module}.alpha"] = torch.tensor(alpha)
    return out


def test_loha_matches_peft():
    peft = pytest.importorskip("peft")
    base, ref = peer(peft.LoHaConfig(r=4, alpha=6, target_modules=["fc", "conv"]), seed=3)
    sd = lycoris_file(ref, 6.0)
    assert lora.detect(sd) == "loha"
    check(base, ref, sd, merge=merge_all)
    # peft's own names, alpha from its config as diffusers' lora_adapter_metadata carries it
    from peft.utils import get_peft_model_state_dict

    ref.fc.unmerge()
    ref.conv.unmerge()
    named = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(ref).items()}
    check(base, ref, named, {"lora_adapter_metadata": json.dumps({"r": 4, "alpha": 6})}, merge_all)


def test_lokr_matches_peft_and_is_not_written():
    peft = pytest.importorskip("peft")
    base, ref = peer(peft.LoKrConfig(r=2, alpha=3, target_modules=["fc", "conv"]), seed=5)
    sd = lycoris_file(ref, 3.0)
    assert lora.detect(sd) == "lokr" and any(k.endswith("lokr_w2_b") for k in sd)  # alpha / r applies
    ours = check(base, ref, sd, merge=merge_all)
    with pytest.raises(ValueError, match="adapter 'default' is a lokr adapter, which has no"):
        lora.factors_of(ours)


def test_lycoris_tucker_cores_are_refused_not_half_applied():
    sd = {"lora_unet_conv.hada_w1_a": torch.randn(4, 4), "lora_unet_conv.hada_w1_b": torch.randn(4, 16),
          "lora_unet_conv.hada_w2_a": torch.randn(4, 4), "lora_unet_conv.hada_w2_b": torch.randn(4, 16),
          "lora_unet_conv.hada_t1": torch.randn(4, 4, 3, 3), "lora_unet_conv.hada_t2": torch.randn(4, 4, 3, 3)}
    with pytest.raises(ValueError, match=r"Tucker-decomposed convolutions \(\['hada_t1', 'hada_t2'\]\)"):
        lora.load(Net(), sd)


def test_dora_and_loha_adapters_train_with_their_own_parameters():
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    base, ref = peer(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["fc"], use_dora=True), seed=7)
    model = copy.deepcopy(base)
    lora.load(model, {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(ref).items()}, adapter="dora")
    _, ref = peer(peft.LoHaConfig(r=2, alpha=2, target_modules=["conv"]), seed=8)
    lora.load(model, lycoris_file(ref, 2.0), adapter="loha")
    names = lora.trainable(model)
    assert sorted(names) == [f"conv.lycoris.loha.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"] + [
        "fc.lora_down.dora.weight", "fc.lora_magnitude.dora", "fc.lora_up.dora.weight"]
    loss = sum(o.square().mean() for o in model(*inputs()))
    loss.backward()
    params = dict(model.named_parameters())
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names)
    assert params["fc.weight"].grad is None
