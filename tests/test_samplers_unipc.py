"""UniPC vs diffusers' UniPCMultistepScheduler: same random model, same grid, final samples within 1e-5."""

from __future__ import annotations

import pytest
import torch

import samplers
from tests.test_samplers_parity import make_noise, random_model, run_diffusers

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize(("order", "variant"), [(2, "bh1"), (2, "bh2"), (3, "bh1"), (3, "bh2")])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_unipc_matches_unipc_multistep_vp(order, variant, prediction):
    # diffusers' bh1 step to sigma = 0 computes B(h) * 0 = -inf * 0 = nan, so bh1 ends at timestep 0 instead.
    final = "sigma_min" if variant == "bh1" else "zero"
    sched = diffusers.UniPCMultistepScheduler(
        **SD,
        solver_order=order,
        solver_type=variant,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        final_sigmas_type=final,
    )
    sched.set_timesteps(12)
    model, noise = random_model(1000.0), make_noise()
    ref = run_diffusers(sched, model, noise.clone(), sched.timesteps.tolist())
    name = "unipc" + ("-bh2" if variant == "bh2" else "") + ("-3" if order == 3 else "")
    schedule = samplers.VPSchedule("scaled_linear", prediction=prediction, set_alpha_to_one=final == "zero")
    out = samplers.sample(model, noise, sampler=name, schedule=schedule, timesteps=sched.timesteps)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_flow_prediction_matches_use_flow_sigmas(order):
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, solver_order=order
    )
    sched.set_timesteps(10)
    model, noise = random_model(1.0), make_noise()
    ref = run_diffusers(sched, model, noise.clone(), sched.sigmas.tolist())
    name = "unipc-bh2" + ("-3" if order == 3 else "")
    out = samplers.sample(model, noise, sampler=name, schedule=samplers.FlowSchedule(shift=3.0), timesteps=sched.sigmas)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
