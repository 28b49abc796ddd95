"""train.memory: the planner's step peak against the peak the CPU allocator reports for a real step."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lora
import zoo
from train import memory

UNET = {"channel_mult": [1, 2]}  # tiny-unet, two levels: activations are a large share of the step
BATCH, SIZE = 4, 64


@functools.cache
def planned(**kwargs) -> memory.MemoryPlan:
    return memory.plan("tiny-unet", batch=BATCH, size=SIZE, **UNET, **kwargs)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measured_peak(checkpointing: bool) -> tuple[int, int]:
    """(peak bytes of one steady-state fused-AdamW step on CPU, weights + batch + optimizer state at its start),
    from the allocation events of torch's profiler."""
    torch.manual_seed(0)
    model = zoo.build("tiny-unet", **UNET).gradient_checkpointing(checkpointing)
    args, kwargs = model.example_inputs(batch=BATCH, height=SIZE, width=SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(*args, **kwargs).float().square().mean().backward()
        optimizer.step()

    step()  # creates the optimizer state
    optimizer.zero_grad(set_to_none=True)
    states = [t for s in optimizer.state.values() for t in s.values()]
    base = _nbytes(model.parameters()) + _nbytes([*args, *kwargs.values()]) + _nbytes(states)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return base + peak, base


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_peak_matches_the_measured_cpu_peak_of_a_small_unet(checkpointing):
    got = planned(checkpointing=checkpointing)
    peak, base = measured_peak(checkpointing)
    assert abs(got.peak - peak) <= 0.15 * peak, (got, peak)
    assert abs(got.peak - peak) <= 0.15 * (peak - base), (got, peak, base)  # also on the step's own share
    n = sum(p.numel() for p in zoo.build("tiny-unet", device="meta", **UNET).parameters())
    assert got.parameters == got.trainable == n and got.weights == got.gradients == 4 * n
    assert got.optimizer == 8 * n + 4 * len(list(zoo.build("tiny-unet", device="meta", **UNET).parameters()))


def test_checkpointing_and_half_precision_shrink_saved_activations():
    plain, ckpt, half = planned(checkpointing=False), planned(checkpointing=True), planned(dtype="bf16")
    assert 0 < ckpt.activations < plain.activations / 4 and ckpt.peak < plain.peak
    # autocast saves bf16 activations, plus the bf16 copies of the weights it multiplies with and the fp32
    # inputs of the ops it keeps in fp32
    assert plain.activations / 2 < half.activations < plain.activations
    assert half.weights == plain.weights  # everything trains: fp32 master weights either way


def test_partial_trainable_set_counts_only_its_gradients_and_optimizer_state():
    part = memory.plan("tiny-unet", batch=1, size=64, dtype="fp16", trainable=["attn1"], **UNET)
    assert 0 < part.trainable < part.parameters
    assert part.gradients == 4 * part.trainable and part.optimizer > 8 * part.trainable
    assert part.weights < 4 * part.parameters  # the frozen rest is stored in fp16


def test_cli_prints_the_plan_and_answers_whether_it_fits(capsys):
    argv = ["tiny-unet", "--batch", "1", "--size", "64", "--set", "channel_mult=[1, 2]", "--checkpointing"]
    assert memory.main([*argv, "--budget", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "saved activations" in out and "peak of a step" in out and "fits in 1.00 GiB" in out
    assert memory.main([*argv, "--budget", "1MB"]) == 1
    with pytest.raises(ValueError, match="dtype must be one of"):
        memory.plan("tiny-unet", dtype="fp8")


def test_lora_plan_trains_only_the_adapters_over_a_frozen_half_base():
    got = memory.plan("tiny-unet", batch=1, size=64, dtype="bf16", lora_targets="sd-attn", lora_rank=4, **UNET)
    model = zoo.build("tiny-unet", device="meta", **UNET)
    lora.inject(model, "sd-attn", rank=4)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert got.trainable == adapters > 0 and got.parameters == sum(p.numel() for p in model.parameters())
    assert got.gradients == 4 * adapters and got.weights == 2 * (got.parameters - adapters) + 4 * adapters
