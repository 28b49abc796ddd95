"""The LBM bridge: schedule, sampler (official `LBMModel.sample` loop) and its closed forms."""
from __future__ import annotations

import math

import pytest
import torch

import samplers


def velocity_model(target: torch.Tensor):
    """The exact bridge velocity toward a fixed target from any x_t: (x_t - target) / t."""
    return lambda x, t: (x - target) / t.view(-1, 1, 1, 1)


def test_bridge_std_vanishes_at_both_ends_and_peaks_at_half():
    s = samplers.BridgeSchedule(sigma_b=0.5)
    assert s.bridge_std(0.0) == 0.0 and s.bridge_std(1.0) == 0.0
    assert s.bridge_std(0.5) == pytest.approx(0.25)
    assert s.alpha_sigma(0.3) == (0.7, 0.3) and s.prediction == "flow"


def test_one_bridge_step_is_the_closed_form_source_minus_velocity():
    g = torch.Generator().manual_seed(0)
    source, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = samplers.sample(lambda x, t: v, source, sampler="bridge", steps=1,
                          schedule=samplers.BridgeSchedule(sigma_b=0.3))
    assert torch.equal(out, source - v)


def test_bridge_sampler_follows_lbm_loop_with_noise_between_steps():
    g = torch.Generator().manual_seed(1)
    source, target = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    model, sched, steps = velocity_model(target), samplers.BridgeSchedule(sigma_b=0.2), 4
    out = samplers.sample(model, source, sampler="bridge", steps=steps, schedule=sched,
                          generator=torch.Generator().manual_seed(7))
    # the official loop: sigmas = linspace(1, 1/n, n) + [0]; Euler step; noise sigma_b sqrt(s'(1-s')) but last
    sig, x, noise = [1 - i / steps for i in range(steps)] + [0.0], source.clone(), torch.Generator().manual_seed(7)
    for i in range(steps):
        x = x + (sig[i + 1] - sig[i]) * model(x, torch.full((1,), sig[i]))
        if i < steps - 1:
            x = x + 0.2 * math.sqrt(sig[i + 1] * (1 - sig[i + 1])) * torch.randn(x.shape, generator=noise)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    # the exact velocity lands on the target whatever noise was injected on the way
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)


def test_bridge_without_noise_is_euler():
    g = torch.Generator().manual_seed(2)
    source, target = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    model = lambda x, t: 0.5 * (x - target) + t.view(-1, 1, 1, 1)  # noqa: E731  (not the exact velocity)
    a = samplers.sample(model, source, sampler="bridge", steps=3, schedule=samplers.BridgeSchedule())
    b = samplers.sample(model, source, sampler="euler", steps=3, schedule=samplers.FlowSchedule())
    assert torch.equal(a, b)


def test_bridge_needs_a_bridge_schedule_and_a_valid_sigma_b():
    with pytest.raises(ValueError, match="BridgeSchedule"):
        samplers.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), sampler="bridge", steps=2,
                        schedule=samplers.FlowSchedule())
    with pytest.raises(ValueError, match="sigma_b"):
        samplers.BridgeSchedule(sigma_b=-1.0)
