"""Samplers: accuracy at 20 evaluations vs the official solvers, convergence order, evaluations to a target error,
and per-step overhead vs diffusers.

    python bench/samplers.py [--max-steps 2000 --repeats 7] [--only-20]

Accuracy uses exact models and exact ODE solutions (samplers.analytic): Gaussian data N(mu, 4 I) on the default
grids and on a VP grid uniform in lambda, and a 1-D two-Gaussian mixture for the third-order solvers. Overhead
runs a model that returns a constant tensor, so all time left is the sampler's: `samplers.sample` against
diffusers' set_timesteps + step loop, medians of interleaved runs (bench.common).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

# Run as a script, this file's folder comes first on sys.path and its name would shadow the samplers package.
sys.path[0] = str(Path(__file__).resolve().parents[1])
import samplers  # noqa: E402
from bench.common import median_times  # noqa: E402
from samplers.analytic import reference_problems  # noqa: E402

# euler_a follows the SDE, not the ODE; bridge is LBM's (a BridgeSchedule only)
DETERMINISTIC = [n for n in samplers.SAMPLERS if n not in ("euler_a", "bridge")]
GAUSS, MIXTURE, NOISE = reference_problems()
FLOW = samplers.FlowSchedule(shift=3.0)
VP_CLEAN = samplers.VPSchedule("scaled_linear", timestep_spacing="trailing")
VP_T0 = samplers.VPSchedule("scaled_linear", set_alpha_to_one=False)


def vp_lambda_grid(n: int, graded: bool = False) -> list[float]:
    """n steps uniform in lambda from timestep 999 to 0 (both noisy); `graded` adds an O(h^2) first step."""
    lo, hi = VP_T0.lambda_t(999), VP_T0.lambda_t(0)
    lams = [lo + (hi - lo) * i / n for i in range(n + 1)]
    if graded:
        lams.insert(1, lo + (hi - lo) / n**2)
    return [999.0] + [VP_T0.time_from_ve_sigma(math.exp(-lam)) for lam in lams[1:-1]] + [0.0]


# (title, problem, schedule, grid(steps) -> timesteps)
SETTINGS = [
    ("Gaussian, flow shift=3, default grid 1 -> 0", GAUSS, FLOW, FLOW.grid),
    ("Gaussian, VP SD trailing, default grid 999 -> clean", GAUSS, VP_CLEAN, VP_CLEAN.grid),
    ("Gaussian, VP SD, uniform in lambda 999 -> 0", GAUSS, VP_T0, vp_lambda_grid),
    ("mixture, VP SD, uniform in lambda 999 -> 0, graded start", MIXTURE, VP_T0, lambda n: vp_lambda_grid(n, True)),
]


class ScoreSDELinearVP(samplers.Schedule):
    """ScoreSDE's continuous linear VP (beta from 0.1 to 20), t in [1e-3, 1]: DPM-Solver's `linear` schedule."""

    predictions, prediction = ("eps",), "eps"
    t_min, t_max, end_time = 1e-3, 1.0, 1e-3
    beta_0, beta_1 = 0.1, 20.0

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        log_alpha = -0.25 * t * t * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        return math.exp(log_alpha), math.sqrt(-math.expm1(2 * log_alpha))

    def grid(self, steps: int) -> list[float]:  # DPM-Solver's time_uniform
        return [self.t_max + (self.t_min - self.t_max) * i / steps for i in range(steps)] + [self.t_min]

    def time_from_lambda(self, lam: float) -> float:
        q = 0.5 * math.log1p(math.exp(-2 * lam))  # -log alpha: solve (b1 - b0) t^2 / 4 + b0 t / 2 = q for t >= 0
        return 2 * q / (0.5 * self.beta_0 + math.sqrt(0.25 * self.beta_0**2 + (self.beta_1 - self.beta_0) * q))


def vp_time_grid(n: int) -> list[float]:
    """DPM-Solver's `time_uniform` for a discrete model: t uniform in [1/1000, 1], timestep 1000 t - 1."""
    return [round(1000 * (1 - (1 - 1e-3) * i / n) - 1, 9) for i in range(n + 1)]


ACCURACY_SAMPLERS = ["dpm++2m", "dpm++3m", "dpm-solver-3m", "unipc", "unipc-bh2", "unipc-bh2-3", "unipc-3f"]


def accuracy_settings() -> list[tuple[str, samplers.Schedule, list[float], float | None]]:
    """(title, schedule, 20-step grid, the official solver's relative error from issue 17 or None)."""
    rows = []
    for shift, official in ((1.0, 0.016), (3.0, 0.044)):
        sana = samplers.FlowSchedule(shift=shift, spacing="time_uniform_flow")
        flow = samplers.FlowSchedule(shift=shift)
        rows += [
            (f"flow shift {shift:g}, Sana time_uniform_flow", sana, sana.grid(20), official),
            (f"flow shift {shift:g}, uniform", flow, flow.grid(20), None),
            (f"flow shift {shift:g}, logsnr_grid", flow, samplers.logsnr_grid(flow, 20), None),
        ]
    for betas in ("linear", "scaled_linear"):
        vp = samplers.VPSchedule(betas, set_alpha_to_one=False)
        rows += [
            (f"VP discrete {betas}, time-uniform", vp, vp_time_grid(20), 0.035),
            (f"VP discrete {betas}, logSNR", vp, samplers.logsnr_grid(vp, 20), 4.0e-3),
        ]
    sde = ScoreSDELinearVP()
    rows += [
        ("VP continuous linear, time-uniform", sde, sde.grid(20), 0.031),
        ("VP continuous linear, logSNR", sde, samplers.logsnr_grid(sde, 20), 4.0e-3),
    ]
    return rows


def accuracy_table() -> None:
    """Relative error at 20 model evaluations, next to the official solvers' numbers (issue 17)."""
    for name, problem in (("Gaussian N(mu, 4 I)", GAUSS), ("1-D two-Gaussian mixture", MIXTURE)):
        print(f"\n### Relative error at 20 model evaluations, {name}; target <= 0.005\n")
        print("| grid | official (issue 17) | " + " | ".join(ACCURACY_SAMPLERS) + " |")
        print("|---" * (len(ACCURACY_SAMPLERS) + 2) + "|")
        for title, schedule, ts, official in accuracy_settings():
            cells = []
            for sampler in ACCURACY_SAMPLERS:
                err, nfe = run(problem, schedule, lambda n, ts=ts: ts, sampler, 20)
                cells.append(f"{err:.1e}" + ("" if nfe == 20 else f" ({nfe} evals)"))
            ref = f"{official:.1e}" if official is not None and problem is GAUSS else "-"
            print(f"| {title} | {ref} | " + " | ".join(cells) + " |")
    print("\nOfficial: Sana's flow DPM-Solver (order 2) and the official DPM-Solver++ 3M as measured in issue 17; its")
    print("one logSNR number is shown on every logSNR row. Problems and noise: samplers.analytic.reference_problems().")


def run(problem, schedule: samplers.Schedule, grid, sampler: str, steps: int) -> tuple[float, int]:
    """(relative error against the exact ODE solution, model evaluations)."""
    calls = [0]
    model = problem.model_fn(schedule)

    def counted(x, t):
        calls[0] += 1
        return model(x, t)

    ts = grid(steps)
    x = samplers.sample(counted, NOISE, sampler=sampler, schedule=schedule, timesteps=ts)
    exact = problem.solve(schedule, NOISE, ts[0], min(ts[-1], schedule.end_time))
    return ((x - exact).norm() / exact.norm()).item(), calls[0]


def order_table() -> None:
    steps = (5, 10, 20, 40, 80)
    for title, problem, schedule, grid in SETTINGS:
        print(f"\n### Relative error, {title}; order = slope fitted on 20..80 steps\n")
        print("| sampler | " + " | ".join(f"{n} steps" for n in steps) + " | order |")
        print("|---" * (len(steps) + 2) + "|")
        for sampler in DETERMINISTIC:
            errs = [run(problem, schedule, grid, sampler, n)[0] for n in steps]
            slope = -np.polyfit(np.log(steps[2:]), np.log(errs[2:]), 1)[0]
            print(f"| {sampler} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {slope:.2f} |")


def nfe_table(max_steps: int) -> None:
    for title, problem, schedule, grid in SETTINGS[:2]:
        print(f"\n### Model evaluations to reach a relative error, {title}\n")
        print("| sampler | error <= 1e-2 | error <= 1e-3 |")
        print("|---|---|---|")
        for sampler in DETERMINISTIC:
            found = {}
            # every step count up to 200, then 5% apart: first-order solvers need ~1000 steps for 1e-3
            candidates = list(range(1, 201))
            while candidates[-1] < max_steps:
                candidates.append(math.ceil(candidates[-1] * 1.05))
            for n in candidates:
                err, nfe = run(problem, schedule, grid, sampler, n)
                for tol in (1e-2, 1e-3):
                    if err <= tol and tol not in found:
                        found[tol] = nfe
                if 1e-3 in found:
                    break
            cells = [str(found.get(tol, f"> {max_steps} steps")) for tol in (1e-2, 1e-3)]
            print(f"| {sampler} | {cells[0]} | {cells[1]} |")


def overhead_table(shape: tuple[int, ...], steps: int, repeats: int) -> None:
    """Seconds per step spent outside the model, ours vs diffusers' set_timesteps + step loop."""
    import diffusers

    x0 = torch.randn(shape)
    out = torch.randn(shape)
    model = lambda x, t: out  # a constant: the model costs nothing, what remains is the sampler

    def loop(sched, **set_kw):
        sched.set_timesteps(steps, **set_kw)
        x = x0
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        return x

    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = lambda name, schedule: lambda: samplers.sample(model, x0, sampler=name, steps=steps, schedule=schedule)
    pairs = [
        ("euler (flow)", ours("euler", samplers.FlowSchedule(shift=3.0)),
         lambda: loop(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))),
        ("ddim (SD)", ours("ddim", samplers.VPSchedule()),
         lambda: loop(diffusers.DDIMScheduler(**sd, clip_sample=False))),
        ("dpm++2m (SD)", ours("dpm++2m", samplers.VPSchedule()),
         lambda: loop(diffusers.DPMSolverMultistepScheduler(**sd))),
    ]  # fmt: skip
    print(f"\n### Per-step overhead of the sampler itself, latents {tuple(shape)} float32, {steps} steps\n")
    print("| sampler | samplers.sample | diffusers loop | ratio (ours / diffusers) |")
    print("|---|---|---|---|")
    for name, mine, theirs in pairs:
        t = median_times({"ours": mine, "diffusers": theirs}, repeats=repeats)
        t_ours, t_theirs = t["ours"] / steps, t["diffusers"] / steps
        print(f"| {name} | {t_ours * 1e6:.0f} us | {t_theirs * 1e6:.0f} us | {t_ours / t_theirs:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=2000, help="search limit for the evaluations table")
    p.add_argument("--repeats", type=int, default=7, help="timing repeats (the median is reported)")
    p.add_argument("--only-20", action="store_true", help="print the 20-evaluation accuracy table only")
    args = p.parse_args()
    torch.set_num_threads(1)  # the sampler's own work is small elementwise ops; threads only add noise
    accuracy_table()
    if args.only_20:
        return
    order_table()
    nfe_table(args.max_steps)
    try:
        overhead_table((1, 4, 64, 64), steps=50, repeats=args.repeats)
        overhead_table((1, 4), steps=50, repeats=args.repeats)
    except ImportError:
        print("\n(diffusers not installed: overhead comparison skipped)")


if __name__ == "__main__":
    main()
