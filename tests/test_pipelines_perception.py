"""pipelines.perception (OmniX-style): one encoded panorama, one LoRA adapter per task loaded from PEFT/diffusers
files over the `omnix` preset; tasks differ, switching adapters equals a fresh model with that adapter merged, and a
bf16 base with adapters runs without dtype errors."""
from __future__ import annotations

import copy

import pytest
import torch

import lora
import pipelines
import zoo
from tests.conftest import max_rel_err, randomize

H, W = 32, 64  # 2:1, as an equirectangular panorama
COND = {"txt": torch.randn(1, 4, 48, generator=torch.Generator().manual_seed(0)),
        "y": torch.randn(1, 32, generator=torch.Generator().manual_seed(1))}
TASKS = ("distance", "normal", "albedo")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A tiny random Flux + Flux VAE, and one diffusers-format LoRA file per task written from random adapters."""
    base = randomize(zoo.build("tiny-flux", in_channels=64, out_channels=64), seed=1, std=0.05).eval()
    ae = randomize(zoo.build("tiny-vae-flux"), seed=2, std=0.05).eval()
    folder, files = tmp_path_factory.mktemp("omnix"), {}
    for i, task in enumerate(TASKS):
        m = copy.deepcopy(base)
        names = lora.inject(m, lora.PRESETS["omnix"], rank=2, adapter=task, init="gaussian")
        assert len(names) == 2 + 2 + 2  # tiny-flux: 2 double blocks' img qkv, 2 single blocks' linear1 + linear2
        g = torch.Generator().manual_seed(10 + i)
        for layer in lora.lora_layers(m).values():
            with torch.no_grad():
                layer.lora_up[task].weight.copy_(torch.randn(layer.lora_up[task].weight.shape, generator=g) * 0.3)
        files[task] = lora.save(m, folder / f"{task}.safetensors", adapter=task, format="diffusers")
    return base, ae, files


def panorama() -> torch.Tensor:
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))


def run(model, ae, tasks, seen=None):
    parts = pipelines.flux.FluxParts(model=model, ae=ae)
    cb = None if seen is None else (lambda i, n, x: seen.append(x) if i == n else None)
    return pipelines.perception.generate(parts, panorama(), tasks, conditioning=COND, steps=2, seed=0,
                                         progress=False, callback=cb)


def test_three_tasks_give_three_maps_and_switching_equals_a_fresh_model_with_that_adapter_merged(system):
    base, ae, files = system
    model = copy.deepcopy(base)
    reports = pipelines.perception.load_adapters(model, files)
    assert all(len(r.modules) == 6 and not r.unmatched for r in reports.values())
    seen: list[torch.Tensor] = []
    maps = run(model, ae, TASKS, seen)
    assert list(maps) == list(TASKS) and all(m.shape == (1, 3, H, W) for m in maps.values())
    for i in range(3):  # final latents (the tiny random VAE would blur the comparison)
        for j in range(i + 1, 3):
            assert max_rel_err(seen[i], seen[j]) > 1e-3, (TASKS[i], TASKS[j])
    # the injected layers were never replaced: switching only changed which adapter is active
    assert set(lora.lora_layers(model)) == set(reports["normal"].modules)
    fresh = copy.deepcopy(base)
    lora.load(fresh, files["normal"], adapter="normal")
    lora.merge(fresh)
    merged_seen: list[torch.Tensor] = []
    merged = run(fresh, ae, ["normal"], merged_seen)["normal"]
    assert max_rel_err(merged_seen[0], seen[1]) <= 1e-5
    assert max_rel_err(merged, maps["normal"]) <= 1e-5


def test_a_bf16_base_with_adapters_runs_without_dtype_errors(system):
    base, ae, files = system
    model = copy.deepcopy(base).to(torch.bfloat16)
    pipelines.perception.load_adapters(model, {t: files[t] for t in TASKS[:2]})
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.lora_down["distance"].weight.dtype == torch.bfloat16
    maps = run(model, ae, TASKS[:2])
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in maps.values())


def test_bad_input_is_named(system):
    base, ae, files = system
    model = copy.deepcopy(base)
    pipelines.perception.load_adapters(model, {"distance": files["distance"]})
    with pytest.raises(ValueError, match=r"task\(s\) \['normal'\] have no LoRA adapter .*\['distance'\]"):
        run(model, ae, ["distance", "normal"])
    with pytest.raises(ValueError, match=r"already has adapter\(s\) \['distance'\]"):
        pipelines.perception.load_adapters(model, {"distance": files["distance"]})
    parts = pipelines.flux.FluxParts(model=model, ae=ae)
    with pytest.raises(ValueError, match=r"perception: width=40 is not a positive multiple of 16"):
        pipelines.perception.generate(parts, torch.rand(1, 3, 32, 40), ["distance"], conditioning=COND,
                                      progress=False)
