"""Training objectives: gradients against hand-derived references, the flow loss at the analytic optimum, timestep
samplers, condition dropout and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import samplers
import train
from samplers.analytic import Gaussian

B, C, H, W = 6, 2, 3, 3
D = C * H * W


def _linear_model(seed: int = 0):
    """pred = W x_t + c t on the flattened sample: a model whose loss gradient is written out by hand below."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    c = (torch.randn(D, generator=g, dtype=torch.float64) * 0.3).requires_grad_()

    def model_fn(x, t, cond):
        return (x.flatten(1) @ weight.T + t[:, None] * c).view_as(x)

    return model_fn, weight, c


def _hand_gradient(weight, c, x_t, t_model, target, w):
    """dL/dW and dL/dc of L = mean_b w_b mean_d (W x_t + c t - target)^2, written out."""
    x, y = x_t.flatten(1), target.flatten(1)
    r = x @ weight.detach().T + t_model[:, None] * c.detach() - y  # (B, D) residuals
    scale = (2.0 / (B * D)) * w[:, None]  # (B, 1)
    return (scale * r).T @ x, ((scale * r) * t_model[:, None]).sum(0)


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("kind", ["flow", "flow-minsnr", "eps", "eps-minsnr", "v-minsnr", "x0", "bridge"])
def test_objective_gradient_matches_hand_computed_reference(kind):
    x0 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    source = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gamma = 5.0 if "minsnr" in kind else None
    if kind.startswith("flow"):
        obj = train.flow_matching(timesteps=train.LogitNormal(0.3, 0.8), min_snr_gamma=gamma)
    elif kind == "bridge":
        obj = train.bridge_matching(samplers.BridgeSchedule(sigma_b=0.3))
    else:
        obj = train.noise_prediction(samplers.VPSchedule(prediction=kind.split("-")[0]), min_snr_gamma=gamma)
    model_fn, weight, c = _linear_model()
    loss = obj(model_fn, x0, None, torch.Generator().manual_seed(7), source=source if kind == "bridge" else None)
    loss.backward()

    # redraw the objective's randomness in its documented order (times, then noise) and build the path by hand
    g = torch.Generator().manual_seed(7)
    t = obj.timesteps.sample(B, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    w = torch.ones(B, dtype=torch.float64)
    if kind.startswith("flow") or kind == "bridge":
        s = t.double().view(-1, 1, 1, 1)
        if kind == "bridge":  # LBM: (1 - t) x_target + t x_source + sigma_b sqrt(t (1 - t)) eps, target source - x0
            x_t, target = (1 - s) * x0 + s * source + 0.3 * (s * (1 - s)).sqrt() * eps, source - x0
        else:
            x_t, target = (1 - s) * x0 + s * eps, eps - x0
            if gamma:  # min(SNR, gamma) in x0 units: x0 error = t * velocity error
                snr = ((1 - s) / s).flatten() ** 2
                w = snr.clamp(max=gamma) * s.flatten() ** 2
    else:  # LDM's scaled_linear betas in float64, checked against diffusers' (fp32) DDPMScheduler
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        torch.testing.assert_close(alphas_cumprod.float(), _ddpm().alphas_cumprod, rtol=1e-6, atol=0)
        ab = alphas_cumprod[t.long()]
        a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0 + s * eps
        target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[kind.split("-")[0]]
        snr = ab / (1 - ab)
        if gamma:
            w = snr.clamp(max=gamma) / (snr if kind.startswith("eps") else snr + 1)
    gw, gc = _hand_gradient(weight, c, x_t, t.double(), target, w)
    torch.testing.assert_close(weight.grad, gw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c.grad, gc, rtol=1e-9, atol=1e-12)


def test_flow_loss_at_the_analytic_optimum_equals_its_minimum():
    """For data N(mu, s^2 I) the best velocity has residual variance s^2 / ((1 - t)^2 s^2 + t^2) per coordinate."""
    dim, n, s = 512, 256, 0.7
    mu = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = Gaussian(mu, s)
    schedule = samplers.FlowSchedule()
    obj = train.flow_matching(schedule, timesteps=train.Uniform(0.02, 0.98))
    x0 = mu + s * torch.randn(n, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    best = data.model_fn(schedule)  # uses one time per call: evaluate sample by sample
    model_fn = lambda x, t, cond: torch.cat([best(x[i : i + 1], t[i : i + 1]) for i in range(len(x))])
    loss = obj(model_fn, x0, None, torch.Generator().manual_seed(2)).item()
    t = torch.linspace(0.02, 0.98, 20001, dtype=torch.float64)
    minimum = (s**2 / ((1 - t) ** 2 * s**2 + t**2)).mean().item()  # E_t over the uniform t, by quadrature
    assert abs(loss - minimum) / minimum < 0.05, (loss, minimum)
    # conditional on the drawn times the estimate is much tighter; any other model is worse by its bias squared
    t_drawn = obj.timesteps.sample(n, torch.Generator().manual_seed(2)).double()
    given_t = (s**2 / ((1 - t_drawn) ** 2 * s**2 + t_drawn**2)).mean().item()
    assert abs(loss - given_t) / given_t < 0.01, (loss, given_t)
    worse = obj(lambda x, t, c: model_fn(x, t, c) + 0.2, x0, None, torch.Generator().manual_seed(2)).item()
    assert worse == pytest.approx(loss + 0.04, rel=1e-6, abs=2e-3)


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    u = train.Uniform().sample(20000, g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    ln = train.LogitNormal(0.5, 1.5).sample(20000, g)
    z = torch.logit(ln.double())
    assert abs(z.mean() - 0.5) < 0.05 and abs(z.std() - 1.5) < 0.05
    d = train.Discrete(1000).sample(20000, g)
    assert d.min() == 0 and d.max() == 999 and torch.equal(d, d.round())
    # the Flux shift is the sampling grid's map: shifting the uniform grid gives flux_schedule's times
    grid = torch.linspace(1, 0, 11)
    sh = train.Shifted.flux(train.Uniform(), image_seq_len=1024)
    shifted = samplers.shift_time(grid.double(), sh.shift)
    expected = torch.tensor(samplers.flux_schedule(10, 1024), dtype=torch.float64)
    torch.testing.assert_close(shifted, expected, atol=1e-6, rtol=0)
    x = sh.sample(5, torch.Generator().manual_seed(3))
    base = train.Uniform().sample(5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, sh.shift * base / (1 + (sh.shift - 1) * base))
    assert sh.shift == pytest.approx(math.exp(samplers.flux_mu(1024)))


def test_cond_drop_replaces_whole_samples_with_the_null_condition():
    cond = torch.randn(4000, 3, 5) + 3
    null = torch.full((3, 5), -7.0)
    out = train.drop_cond(cond, 0.25, torch.Generator().manual_seed(0), null)
    dropped = (out == -7.0).all(dim=(1, 2))
    kept = (out == cond).all(dim=(1, 2))
    assert bool((dropped ^ kept).all())
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    d = train.drop_cond({"context": cond, "y": torch.ones(4000, 2), "name": "x"}, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal((d["context"] == 0).all(dim=(1, 2)), (d["y"] == 0).all(dim=1)) and d["name"] == "x"
    only = train.drop_cond({"context": cond, "hint": cond}, 0.5, torch.Generator().manual_seed(0), keys=["context"])
    assert (only["context"] == 0).all(dim=(1, 2)).any() and torch.equal(only["hint"], cond)  # the hint stays
    # the objective draws the mask after times and noise, from the same generator
    seen = {}
    obj = train.flow_matching(cond_drop=0.5, null_cond=torch.full((2,), -7.0))
    obj(lambda x, t, c: seen.setdefault("c", c) * 0 + x, torch.randn(8, 2), cond[:8, :2, 0], None)
    assert seen["c"].shape == (8, 2) and 0 < (seen["c"] == -7).all(1).sum() < 8


def test_bad_input_is_a_clear_error():
    x0 = torch.randn(2, 4)
    with pytest.raises(ValueError, match="needs `source`"):
        train.bridge_matching()(lambda x, t, c: x, x0)
    with pytest.raises(ValueError, match="only for a BridgeSchedule"):
        train.flow_matching()(lambda x, t, c: x, x0, source=x0)
    with pytest.raises(ValueError, match="model_fn returned shape"):
        train.flow_matching()(lambda x, t, c: x[:, :2], x0)
    with pytest.raises(ValueError, match="needs Discrete"):
        train.noise_prediction(timesteps=train.Uniform())
    with pytest.raises(ValueError, match="Discrete is for VP"):
        train.flow_matching(timesteps=train.Discrete())
    with pytest.raises(TypeError, match="FlowSchedule"):
        train.flow_matching(samplers.VPSchedule())
    with pytest.raises(ValueError, match="cond_drop"):
        train.flow_matching(cond_drop=1.5)
    with pytest.raises(TypeError, match="x0 must be"):
        train.flow_matching()(lambda x, t, c: x, torch.ones(3, dtype=torch.long))
