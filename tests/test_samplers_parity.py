"""samplers vs diffusers' schedulers: same random model, same grid, final samples within 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

import samplers

diffusers = pytest.importorskip("diffusers")

B, D = 2, 6


def random_model(t_scale: float):
    """A fixed, smooth, nonlinear model f(x, t) with random weights; t_scale is the schedule's time range."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(D, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(torch.float64)[:, None] / t_scale
        return torch.tanh(x @ w + b * torch.cos(3 * tt)) + 0.5 * tt * x

    return f


def make_noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_diffusers(scheduler, model, x, model_times, generator=None, **step_kwargs):
    """The diffusers pipeline loop; the model sees `model_times[i]` at step i."""
    for i, t in enumerate(scheduler.timesteps):
        out = model(x, torch.full((x.shape[0],), float(model_times[i]), dtype=torch.float64))
        if generator is not None:
            step_kwargs["generator"] = generator
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample.to(torch.float64)
    return x


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_euler_matches_flow_match_euler_discrete(dynamic):
    n, mu = 12, samplers.flux_mu(1024)
    if dynamic:  # Flux: shift from the image sequence length
        sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        sched.set_timesteps(n, mu=mu)
        schedule = samplers.FlowSchedule(mu=mu)
    else:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(n)
        schedule = samplers.FlowSchedule(shift=3.0)
    sigmas = sched.sigmas.tolist()
    model, noise = random_model(1.0), make_noise()
    ref = run_diffusers(sched, model, noise.clone(), sigmas)
    out = samplers.sample(model, noise, sampler="euler", schedule=schedule, timesteps=sigmas)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_flow_shift_with_mu_matches_diffusers_exponential_shift():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = samplers.flux_mu(4096)
    sched.set_timesteps(10, mu=mu)
    unshifted = torch.linspace(1.0, 1.0 / 1000, 10, dtype=torch.float64).tolist()
    schedule = samplers.FlowSchedule(mu=mu)
    mine = [samplers.shift_time(u, schedule.effective_shift) for u in unshifted]
    torch.testing.assert_close(torch.tensor(mine, dtype=torch.float64), sched.sigmas[:-1].double(), atol=1e-6, rtol=0)


def test_flow_heun_matches_flow_match_heun_discrete():
    n = 8
    sched = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    model, noise = random_model(1.0), make_noise()
    ref = run_diffusers(sched, model, noise.clone(), (sched.timesteps / 1000).tolist())
    grid = sched.sigmas[::2].tolist()  # the scheduler repeats every interior sigma for its corrector pass
    out = samplers.sample(model, noise, sampler="heun", schedule=samplers.FlowSchedule(shift=3.0), timesteps=grid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [10, 20])  # < 15 steps turns on diffusers' lower_order_final
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++1s", "dpm-solver-2m"])
def test_dpm_solver_matches_dpm_solver_multistep_vp(steps, prediction, sampler):
    data = not sampler.startswith("dpm-solver")
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        solver_order=1 if sampler == "dpm++1s" else 2,
        algorithm_type="dpmsolver++" if data else "dpmsolver",
        final_sigmas_type="zero" if data else "sigma_min",
    )
    sched.set_timesteps(steps)
    model, noise = random_model(1000.0), make_noise()
    ref = run_diffusers(sched, model, noise.clone(), sched.timesteps.tolist())
    schedule = samplers.VPSchedule("scaled_linear", prediction=prediction, set_alpha_to_one=data)
    out = samplers.sample(model, noise, sampler=sampler, schedule=schedule, timesteps=sched.timesteps)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_flow_prediction_matches_use_flow_sigmas(steps):
    sched = diffusers.DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    sched.set_timesteps(steps)
    schedule = samplers.FlowSchedule(shift=3.0, spacing="time_uniform_flow")
    grid = schedule.grid(steps)  # Sana's time_uniform_flow is diffusers' flow-sigma grid
    torch.testing.assert_close(torch.tensor(grid, dtype=torch.float64), sched.sigmas.double(), atol=1e-6, rtol=0)
    model, noise = random_model(1.0), make_noise()
    ref = run_diffusers(sched, model, noise.clone(), sched.sigmas.tolist())
    out = samplers.sample(model, noise, sampler="dpm++2m", steps=steps, schedule=schedule)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


DDIM_CASES = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("betas", list(DDIM_CASES))
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_ddim_scheduler(betas, spacing):
    # SD's DDIM config: leading + steps_offset=1 ending at timestep 0; trailing ends noise-free.
    offset, to_one = (1, False) if spacing == "leading" else (0, True)
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=to_one, clip_sample=False)
    sched = diffusers.DDIMScheduler(**DDIM_CASES[betas], **cfg)
    sched.set_timesteps(20)
    model, noise = random_model(1000.0), make_noise()
    ref = run_diffusers(sched, model, noise.clone(), sched.timesteps.tolist())
    schedule = samplers.VPSchedule(
        betas if betas != "cosine" else "squaredcos_cap_v2",
        timestep_spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=to_one,
    )
    assert schedule.grid(20)[:-1] == sched.timesteps.tolist()
    out = samplers.sample(model, noise, sampler="ddim", steps=20, schedule=schedule)
    # Trailing cosine starts at alpha = 5e-5, where x0 = (x - sigma eps) / alpha scales samples to ~1e4 and with them
    # the float32 rounding of diffusers' alpha_bar table (4e-5 relative at t = 999); compare relative to that size.
    torch.testing.assert_close(out, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0)


def test_ddim_eta_and_zero_snr_v_match_ddim_scheduler():
    cfg = dict(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    )
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **cfg)
    sched.set_timesteps(25)
    model, noise = random_model(1000.0), make_noise()
    gen = torch.Generator().manual_seed(7)
    ref = run_diffusers(sched, model, noise.clone(), sched.timesteps.tolist(), generator=gen, eta=0.7)
    schedule = samplers.VPSchedule(
        "scaled_linear", prediction="v", rescale_zero_terminal_snr=True, timestep_spacing="trailing"
    )
    assert schedule.alpha_t(999) == 0.0  # the first step starts from pure noise
    out = samplers.sample(
        model, noise, sampler="ddim", eta=0.7, steps=25, schedule=schedule, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_euler_a_matches_euler_ancestral_discrete():
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading")
    sched = diffusers.EulerAncestralDiscreteScheduler(**kw)
    sched.set_timesteps(15)
    model, noise = random_model(1000.0), make_noise()
    x = noise * sched.init_noise_sigma  # diffusers keeps x / alpha; the model sees it rescaled to x
    gen = torch.Generator().manual_seed(3)
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), torch.full((B,), float(t), dtype=torch.float64))
        x = sched.step(out, t, x, generator=gen).prev_sample.to(torch.float64)
    out = samplers.sample(
        model,
        noise,
        sampler="euler_a",
        schedule=samplers.VPSchedule("scaled_linear"),
        timesteps=sched.timesteps,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 999])
def test_vp_timestep_spacing_matches_ddim_scheduler(spacing, steps):
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(steps)
    schedule = samplers.VPSchedule(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    assert schedule.grid(steps) == sched.timesteps.tolist() + [-1.0]


def test_karras_grid_matches_dpm_solver_karras_sigmas():
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **kw)
    sched.set_timesteps(12)
    schedule = samplers.VPSchedule("scaled_linear", karras=True)
    ve = [schedule.sigma_t(t) / schedule.alpha_t(t) for t in schedule.grid(12)[:-1]]
    # diffusers' float32 alpha_bar puts sigma_min = sqrt((1 - ab_0) / ab_0) 1e-5 off; ours is float64.
    torch.testing.assert_close(torch.tensor(ve, dtype=torch.float64), sched.sigmas[:-1].double(), rtol=3e-5, atol=0)


def test_vp_alphas_cumprod_match_diffusers_tables():
    for name, kw in DDIM_CASES.items():
        for zero_snr in (False, True):
            ref = diffusers.DDIMScheduler(**kw, rescale_betas_zero_snr=zero_snr).alphas_cumprod.double()
            schedule = samplers.VPSchedule(kw["beta_schedule"], rescale_zero_terminal_snr=zero_snr)
            torch.testing.assert_close(schedule.alphas_cumprod, ref, atol=2e-7, rtol=1e-5, msg=name)


def test_guidance_rescale_matches_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.full((2,), 500.0, dtype=torch.float64)
    cond_w, uncond_w = torch.randn(4, generator=g).double(), torch.randn(4, generator=g).double()
    cond = lambda x, t: x * cond_w[:, None, None] + 0.1
    uncond = lambda x, t: x * uncond_w[:, None, None]
    guided = samplers.Guidance(scale=7.5, uncond_fn=uncond, rescale=0.7).wrap(cond)(x, t)
    c, u = cond(x, t), uncond(x, t)
    ref = rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7)
    torch.testing.assert_close(guided, ref, atol=1e-12, rtol=0)
    assert math.isfinite(guided.abs().max().item())
