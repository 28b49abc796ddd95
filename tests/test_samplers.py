"""samplers: schedules, grids, the sample() contract, guidance, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import samplers
from samplers.analytic import Gaussian

GAUSS = Gaussian(mu=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), s=0.7)
NOISE = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def linear_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + 0.1 * t[:, None]


# --- schedules ---------------------------------------------------------------------------------------------------


def test_flux_schedule_is_the_mu_shifted_linspace_from_one_to_zero():
    ts = samplers.flux_schedule(8, image_seq_len=1024)
    mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256)  # the line through (256, 0.5) and (4096, 1.15)
    assert len(ts) == 9 and ts[0] == 1.0 and ts[-1] == 0.0
    for i, t in enumerate(ts[1:-1], start=1):
        u = 1 - i / 8
        assert t == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / u - 1), abs=1e-6)
    assert samplers.flux_schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_flux_mu_is_the_line_through_the_two_anchor_points():
    assert samplers.flux_mu(256) == pytest.approx(0.5)
    assert samplers.flux_mu(4096) == pytest.approx(1.15)
    assert samplers.flux_mu(256, base_shift=0.3, max_shift=0.9) == pytest.approx(0.3)


def test_flow_schedule_grid_applies_the_static_shift():
    ts = samplers.FlowSchedule(shift=3.0).grid(4)
    assert ts == pytest.approx([3 * u / (1 + 2 * u) for u in (1.0, 0.75, 0.5, 0.25, 0.0)])
    mu = samplers.flux_mu(2048)
    assert samplers.FlowSchedule(mu=mu).grid(4) == pytest.approx(
        [0.0 if u == 0 else math.exp(mu) / (math.exp(mu) + 1 / u - 1) for u in (1.0, 0.75, 0.5, 0.25, 0.0)]
    )


def test_flow_schedule_alpha_sigma_lambda():
    s = samplers.FlowSchedule()
    assert s.alpha_sigma(0.25) == (0.75, 0.25)
    assert s.lambda_t(0.25) == pytest.approx(math.log(3))
    assert s.lambda_t(1.0) == -math.inf and s.lambda_t(0.0) == math.inf


@pytest.mark.parametrize("betas", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_schedule_alpha_sigma_at_integer_timesteps_come_from_alphas_cumprod(betas):
    s = samplers.VPSchedule(betas)
    ab = s.alphas_cumprod
    for t in (0, 1, 500, 999):
        a, sg = s.alpha_sigma(float(t))
        assert a == pytest.approx(ab[t].sqrt().item(), rel=1e-12) and a**2 + sg**2 == pytest.approx(1.0)
        assert s.lambda_t(t) == pytest.approx(0.5 * math.log(ab[t].item() / (1 - ab[t].item())), rel=1e-12)
    assert s.alpha_sigma(-1.0) == (1.0, 0.0)


def test_vp_schedule_fractional_times_interpolate_monotonically_and_invert():
    s = samplers.VPSchedule("scaled_linear")
    lams = [s.lambda_t(t) for t in torch.linspace(0, 999, 777).tolist()]
    assert all(b < a for a, b in zip(lams, lams[1:]))
    for t in (0.0, 3.25, 499.5, 998.75):
        ve = s.sigma_t(t) / s.alpha_t(t)
        assert s.time_from_ve_sigma(ve) == pytest.approx(t, abs=1e-9)


def test_zero_terminal_snr_reaches_pure_noise_and_keeps_the_first_alpha():
    plain = samplers.VPSchedule("scaled_linear")
    zsnr = samplers.VPSchedule("scaled_linear", prediction="v", rescale_zero_terminal_snr=True)
    assert zsnr.alpha_sigma(999.0) == (0.0, 1.0)
    assert zsnr.alpha_t(0) == pytest.approx(plain.alpha_t(0), rel=1e-12)
    assert all(b < a for a, b in zip(zsnr.alphas_cumprod, zsnr.alphas_cumprod[1:]))


def test_vp_default_grid_ends_noise_free_unless_set_alpha_to_one_is_false():
    assert samplers.VPSchedule(timestep_spacing="trailing").grid(4) == [999.0, 749.0, 499.0, 249.0, -1.0]
    assert samplers.VPSchedule(steps_offset=1, set_alpha_to_one=False).grid(4) == [751.0, 501.0, 251.0, 1.0, 0.0]
    ks = samplers.VPSchedule(karras=True).grid(5)
    assert ks[0] == pytest.approx(999.0) and ks[-2] == pytest.approx(0.0, abs=1e-9) and ks[-1] == -1.0


def test_unsupported_prediction_is_rejected_with_the_supported_list():
    with pytest.raises(ValueError, match="FlowSchedule does not support prediction='v'.*flow"):
        samplers.FlowSchedule(prediction="v")
    with pytest.raises(ValueError, match="VPSchedule does not support prediction='flow'.*eps, v, x0"):
        samplers.VPSchedule(prediction="flow")


def test_unknown_schedule_options_are_rejected():
    with pytest.raises(ValueError, match="beta_schedule 'cosine'"):
        samplers.VPSchedule("cosine")
    with pytest.raises(ValueError, match="timestep_spacing 'uniform'"):
        samplers.VPSchedule(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="spacing 'karras'"):
        samplers.FlowSchedule(spacing="karras")
    with pytest.raises(ValueError, match="karras=True needs a finite sigma_max"):
        samplers.VPSchedule(prediction="v", rescale_zero_terminal_snr=True, karras=True).grid(10)


# --- sample() ----------------------------------------------------------------------------------------------------


def test_model_receives_flow_time_and_vp_timesteps_as_batch_tensors():
    seen = []

    def spy(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    samplers.sample(spy, NOISE, sampler="euler", steps=4, schedule=samplers.FlowSchedule())
    assert [t.tolist() for t in seen] == [[1.0, 1.0], [0.75, 0.75], [0.5, 0.5], [0.25, 0.25]]
    assert all(t.dtype == NOISE.dtype and t.shape == (2,) for t in seen)
    seen.clear()
    samplers.sample(spy, NOISE, sampler="ddim", steps=4, schedule=samplers.VPSchedule(timestep_spacing="trailing"))
    assert [t[0].item() for t in seen] == [999.0, 749.0, 499.0, 249.0]


@pytest.mark.parametrize(("sampler", "nfe"), [("euler", 6), ("heun", 11), ("dpm++2m", 6), ("euler_a", 6)])
def test_model_evaluations_per_sampler(sampler, nfe):
    calls = []
    model = GAUSS.model_fn(samplers.FlowSchedule())
    samplers.sample(
        lambda x, t: calls.append(1) or model(x, t), NOISE, sampler=sampler, steps=6, schedule=samplers.FlowSchedule()
    )
    assert len(calls) == nfe  # Heun's corrector is skipped on the step to sigma = 0


def test_callback_reports_every_step_and_the_last_state_is_the_result():
    log = []
    out = samplers.sample(
        linear_model,
        NOISE,
        sampler="dpm++2m",
        steps=5,
        schedule=samplers.FlowSchedule(),
        callback=lambda *a: log.append(a),
    )
    assert [(i, n) for i, n, _ in log] == [(i, 5) for i in range(1, 6)]
    assert torch.equal(log[-1][2], out)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "dpm++2m", "unipc"])
def test_a_tensor_the_callback_returns_is_the_state_the_next_step_starts_from(sampler):
    opts = dict(sampler=sampler, steps=4, schedule=samplers.FlowSchedule())
    seen = []

    def halve(i, n, x):  # every step's result, halved, is where the next step starts
        seen.append(x)
        return 0.5 * x

    out = samplers.sample(linear_model, NOISE, callback=halve, **opts)
    assert len(seen) == 4 and torch.equal(out, 0.5 * seen[-1])
    if sampler == "euler":  # Flux's step x + (t' - t) v, each result halved
        ts, x = samplers.FlowSchedule().grid(4), NOISE
        for a, b in zip(ts[:-1], ts[1:]):
            x = 0.5 * (x + (b - a) * linear_model(x, torch.full((2,), a, dtype=x.dtype)))
        assert torch.allclose(out, x, rtol=0, atol=1e-12)
    # anything but a tensor leaves the state alone; a tensor of another shape is refused
    assert torch.equal(samplers.sample(linear_model, NOISE, callback=lambda *a: True, **opts),
                       samplers.sample(linear_model, NOISE, **opts))
    with pytest.raises(ValueError, match=r"callback after step 1 returned a tensor of shape \(2, 2\); the state it "
                                         r"replaces has shape \(2, 3\)"):
        samplers.sample(linear_model, NOISE, callback=lambda i, n, x: x[:, :2], **opts)


def test_explicit_grid_without_the_end_gets_the_final_step_appended():
    full = samplers.sample(
        linear_model, NOISE, sampler="euler", schedule=samplers.FlowSchedule(), timesteps=[1.0, 0.6, 0.3, 0.0]
    )
    short = samplers.sample(
        linear_model, NOISE, sampler="euler", schedule=samplers.FlowSchedule(), timesteps=[1.0, 0.6, 0.3]
    )
    assert torch.equal(full, short)
    as_tensor = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    tensor_grid = samplers.sample(
        linear_model, NOISE, sampler="euler", schedule=samplers.FlowSchedule(), timesteps=as_tensor
    )
    assert torch.equal(tensor_grid, short)


def test_euler_is_flux_denoise_loop():
    ts = samplers.flux_schedule(6, 1024)
    x = NOISE.clone()
    for t, t_next in zip(ts[:-1], ts[1:]):  # Flux's `img = img + (t_prev - t_curr) * pred`
        x = x + (t_next - t) * linear_model(x, torch.full((2,), t, dtype=x.dtype))
    out = samplers.sample(linear_model, NOISE, sampler="euler", schedule=samplers.FlowSchedule(), timesteps=ts)
    torch.testing.assert_close(out, x, atol=1e-12, rtol=0)


def test_deterministic_samplers_agree_at_first_order():
    # Euler, DDIM and DPM-Solver(++)-1 are the same first-order exponential/Euler step on a linear path.
    sch = samplers.VPSchedule("scaled_linear", timestep_spacing="trailing")
    model = GAUSS.model_fn(sch)
    outs = [samplers.sample(model, NOISE, sampler=s, steps=9, schedule=sch) for s in ("euler", "ddim", "dpm++1s")]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-12, rtol=0)


def test_stochastic_samplers_follow_the_generator():
    sch = samplers.FlowSchedule(shift=2.0)
    run = lambda seed, **kw: samplers.sample(
        linear_model,
        NOISE,
        sampler="euler_a",
        steps=6,
        schedule=sch,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    torch.testing.assert_close(
        run(0, eta=0.0), samplers.sample(linear_model, NOISE, sampler="ddim", steps=6, schedule=sch)
    )


def test_output_keeps_the_noise_dtype_with_a_lower_precision_model():
    model = lambda x, t: (0.5 * x).to(torch.bfloat16)
    out = samplers.sample(model, NOISE.float(), sampler="dpm++2m", steps=4, schedule=samplers.FlowSchedule())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_cosine_betas_work_with_every_sampler():
    sch = samplers.VPSchedule("squaredcos_cap_v2", timestep_spacing="trailing")
    model = GAUSS.model_fn(sch)
    exact = GAUSS.solve(sch, NOISE, 999.0, -1.0)
    for name in (n for n in samplers.SAMPLERS if n != "bridge"):  # bridge runs on a BridgeSchedule only
        out = samplers.sample(
            model, NOISE, sampler=name, steps=30, schedule=sch, generator=torch.Generator().manual_seed(0)
        )
        assert torch.isfinite(out).all(), name
        if name != "euler_a":  # deterministic ones follow the ODE
            assert (out - exact).norm() / exact.norm() < 0.05, name


# --- guidance ----------------------------------------------------------------------------------------------------


def test_guidance_batched_and_two_call_forms_agree():
    cond = lambda x, t: 0.3 * x + 1.0
    uncond = lambda x, t: -0.2 * x
    t = torch.zeros(2, dtype=torch.float64)

    def batched(x, t):  # first half unconditional, second half conditional, as one forward
        u, c = x.chunk(2)
        return torch.cat([uncond(u, t[:2]), cond(c, t[2:])])

    two = samplers.Guidance(scale=4.0, uncond_fn=uncond).wrap(cond)(NOISE, t)
    one = samplers.Guidance(scale=4.0).wrap(batched)(NOISE, t)
    torch.testing.assert_close(one, two)
    torch.testing.assert_close(two, uncond(NOISE, t) + 4.0 * (cond(NOISE, t) - uncond(NOISE, t)))
    torch.testing.assert_close(samplers.Guidance(scale=1.0, uncond_fn=uncond).wrap(cond)(NOISE, t), cond(NOISE, t))


def test_sample_applies_guidance():
    sch = samplers.FlowSchedule()
    uncond = lambda x, t: torch.zeros_like(x)
    guided = samplers.sample(
        linear_model, NOISE, sampler="euler", steps=3, schedule=sch, guidance=samplers.Guidance(2.0, uncond)
    )
    doubled = samplers.sample(lambda x, t: 2 * linear_model(x, t), NOISE, sampler="euler", steps=3, schedule=sch)
    torch.testing.assert_close(guided, doubled)


# --- bad input ---------------------------------------------------------------------------------------------------


def run(model=linear_model, noise=NOISE, **kw):
    return samplers.sample(model, noise, **({"sampler": "euler", "steps": 4, "schedule": samplers.FlowSchedule()} | kw))


@pytest.mark.parametrize("steps", [0, -3, None, 2.5])
def test_steps_below_one_are_rejected(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        run(steps=steps)


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown sampler 'dpm\+\+4m'; valid names: euler, heun, ddim, euler_a, dpm\+\+1s"
    ):
        run(sampler="dpm++4m")


@pytest.mark.parametrize("ts", [[1.0, 0.5, 0.5, 0.0], [1.0, 0.2, 0.6]])
def test_non_decreasing_timesteps_are_rejected(ts):
    with pytest.raises(ValueError, match="strictly decreasing; timesteps"):
        run(steps=None, timesteps=ts)


def test_timesteps_outside_the_schedule_range_are_rejected():
    with pytest.raises(ValueError, match=r"lie in \[0.0, 1.0\]"):
        run(steps=None, timesteps=[1.5, 0.5])
    with pytest.raises(ValueError, match=r"lie in \[-1.0, 999.0\]"):
        run(steps=None, schedule=samplers.VPSchedule(), timesteps=[1000, 500])
    with pytest.raises(ValueError, match="steps=3 disagrees"):
        run(steps=3, timesteps=[1.0, 0.5])


def test_noise_with_nan_is_rejected():
    bad = NOISE.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"noise contains NaN or inf \(1 of 6\)"):
        run(noise=bad)
    with pytest.raises(TypeError, match="floating-point"):
        run(noise=torch.ones(2, 3, dtype=torch.long))


def test_eps_model_cannot_start_at_zero_terminal_snr():
    sch = samplers.VPSchedule(rescale_zero_terminal_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="eps-prediction model cannot be sampled from alpha = 0"):
        run(schedule=sch)


def test_eta_on_a_deterministic_sampler_is_rejected():
    with pytest.raises(ValueError, match="eta applies only to ddim, euler_a"):
        run(sampler="dpm++2m", eta=0.5)


def test_model_output_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"model_fn returned shape \(2, 4\) for input shape \(2, 3\)"):
        run(model=lambda x, t: torch.zeros(2, 4, dtype=x.dtype))


def test_schedule_of_the_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="schedule must be a samplers.Schedule"):
        run(schedule="flow")


def test_lower_order_final_is_an_argument_of_the_multistep_samplers():
    sch = samplers.VPSchedule("scaled_linear", set_alpha_to_one=False)
    model = GAUSS.model_fn(sch)
    run_ = lambda **kw: samplers.sample(model, NOISE, sampler="dpm++3m", steps=12, schedule=sch, **kw)  # noqa: E731
    default, official, never = run_(), run_(lower_order_final=10), run_(lower_order_final=0)
    assert torch.equal(default, run_(lower_order_final=15))  # diffusers' rule: 12 < 15 lowers the last two steps
    assert torch.equal(official, never)  # the official DPM-Solver's: 12 >= 10 keeps order 3 to the end
    assert not torch.equal(default, never)
    with pytest.raises(ValueError, match="lower_order_final applies only to the multistep samplers dpm"):
        run(sampler="heun", lower_order_final=10)
