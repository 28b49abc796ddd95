"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and a corrector (UniC) that reuses the next evaluation.

After the predictor lands on node i + 1, the model is evaluated there anyway for the next step; UniC redoes the
step i -> i + 1 with that evaluation as one more interpolation point, which raises the order by one at no extra
model call. The evaluation itself (taken at the predicted state) is what enters the history, as in the paper and
diffusers' UniPCMultistepScheduler. `variant` picks B(h) = h (`bh1`) or e^h - 1 (`bh2`).

Ours on top (off by default, so the parity with diffusers holds): `final_order` > 1 takes the step to sigma = 0 at
higher order in rho = sigma/alpha (`final_rho_step`), where every lambda-polynomial step must drop to order 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .multistep import step_order
from .solvers import Callback, Denoiser, Grid, after_step

VARIANTS = ("bh1", "bh2")


def unipc(
    denoise: Denoiser,
    x: Tensor,
    g: Grid,
    *,
    order: int = 2,
    variant: str = "bh2",
    data: bool = True,
    corrector: bool = True,
    lower_order_final: float = math.inf,
    final_order: int = 1,
    callback: Callback = None,
) -> Tensor:
    """UniPC-p in data form (x0 predictions, `data=True`) or noise form; `corrector=False` leaves UniP alone.

    Step orders follow `multistep.step_order`; UniPC lowers its last steps on every grid (lower_order_final = inf).
    A prediction at pure noise (lambda = -inf, flow's t = 1) starts the history but is no interpolation point.
    `final_order` > 1 replaces the first-order step to sigma = 0 by `final_rho_step` (ours, not in diffusers).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if not data and g.alpha[0] == 0:
        raise ValueError("noise-form UniPC cannot start at alpha = 0 (its first step divides by alpha); use data=True")
    n, preds, eps_hist = g.steps, [], []  # the last model predictions (x0 or eps) and eps, newest first
    skip = 1 if g.lam[0] == -math.inf else 0  # nodes before the first finite lambda
    x_start, k = x, 0  # the state the last step started from, and that step's order
    for i in range(n):
        x0, eps = denoise(x, *g.node(i))
        m = x0 if data else eps
        if corrector and i > 0:
            x = unipc_step(x_start, preds[:k], g, i - 1, variant, data, m_end=m)
        preds, eps_hist = [m, *preds[: order - 1]], [eps, *eps_hist[: final_order - 1]]
        k = min(step_order(i, n, order, lower_order_final, final_zero=g.sigma[n] == 0), max(1, i + 1 - skip))
        x_start = x
        if i == n - 1 and g.sigma[n] == 0 and final_order > 1 and i - skip >= 1:  # two usable nodes at least
            x = final_rho_step(x, eps_hist[: i + 1 - skip], g, i)
        else:
            x = unipc_step(x, preds[:k], g, i, variant, data)
        x = after_step(callback, i + 1, n, x)
    return x


def unipc_step(
    x: Tensor, preds: list[Tensor], g: Grid, i: int, variant: str, data: bool, m_end: Tensor | None = None
) -> Tensor:
    """One UniP step from node i to i + 1 with the predictions preds (at nodes i, i-1, ...); UniC with `m_end`.

    x' = (first-order exponential step) - c B(h) sum_j rho_j D_j, D_j = (m_{i-j} - m_i) / r_j, r_j the node's
    distance from lambda_i in units of h (1 for the end point m_end), c = alpha' (data) or sigma' (noise form).
    """
    alpha, sigma, alpha_next, sigma_next = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
    h = g.lam[i + 1] - g.lam[i]
    hh = -h if data else h  # the exponent's sign: e^{-h} weights x0, e^{h} weights eps
    phi1 = math.expm1(hh)
    # From pure noise (h = inf) bh1's B(h) = h is unbounded; bh2's e^{-h} - 1 = -1 stays finite there.
    b_h = hh if variant == "bh1" and math.isfinite(hh) else phi1
    r = [(g.lam[i - j] - g.lam[i]) / h for j in range(1, len(preds))]
    diffs = [(m - preds[0]) * (1 / rj) for m, rj in zip(preds[1:], r)]
    if m_end is not None:
        r.append(1.0)
        diffs.append(m_end - preds[0])
    if data:
        x = torch.add((sigma_next / sigma) * x, preds[0], alpha=-alpha_next * phi1)
        c = alpha_next
    else:
        x = torch.add((alpha_next / alpha) * x, preds[0], alpha=-sigma_next * phi1)
        c = sigma_next
    if diffs:
        rho = [0.5] if len(diffs) == 1 else unipc_weights(r, hh, b_h)
        x = x - (c * b_h) * sum(w * d for w, d in zip(rho, diffs))
    return x


def unipc_weights(r: list[float], hh: float, b_h: float) -> list[float]:
    """rho solving sum_j rho_j r_j^p = p! (hh phi_{p+2}(hh)) / B(h) for p = 0 .. len(r) - 1 (the order conditions)."""
    rhs, factorial, hphi = [], 1.0, math.expm1(hh) / hh - 1  # hh phi_2(hh) = phi_1(hh) - 1
    for p in range(len(r)):
        rhs.append(hphi * factorial / b_h)
        factorial *= p + 2
        hphi = hphi / hh - 1 / factorial  # hh phi_{p+3}(hh) = phi_{p+2}(hh) - 1/(p+2)!
    vander = torch.tensor([[rj**p for rj in r] for p in range(len(r))], dtype=torch.float64)
    return torch.linalg.solve(vander, torch.tensor(rhs, dtype=torch.float64)).tolist()


def final_rho_step(x: Tensor, eps_hist: list[Tensor], g: Grid, i: int) -> Tensor:
    """The step from node i to sigma = 0 with eps a polynomial in rho = sigma/alpha through the last nodes.

    In (y, rho) = (x/alpha, sigma/alpha) the probability-flow ODE is dy/drho = eps, smooth down to rho = 0 (where
    lambda-polynomials fail), so y_0 = y_i - int_0^rho_i eps drho is exact for eps of degree < len(eps_hist);
    with one node it is the usual x0 prediction. An Adams-Bashforth step in rho (ours).
    """
    rho = [g.sigma[i - j] / g.alpha[i - j] for j in range(len(eps_hist))]
    # Weights w with sum_j w_j rho_j^p = int_0^rho_i rho^p drho for every degree p < len(rho).
    vander = torch.tensor([[r**p for r in rho] for p in range(len(rho))], dtype=torch.float64)
    moments = torch.tensor([rho[0] ** (p + 1) / (p + 1) for p in range(len(rho))], dtype=torch.float64)
    w = torch.linalg.solve(vander, moments).tolist()
    return x * (1 / g.alpha[i]) - sum(wj * e for wj, e in zip(w, eps_hist))
