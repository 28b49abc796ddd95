"""Training objectives: noise a clean batch along a `samplers` schedule, ask the model, regress its target.

One definition of the path: x_t = alpha_t x0 + sigma_t eps with (alpha_t, sigma_t) from the same schedule object
the sampler uses (FlowSchedule, VPSchedule, BridgeSchedule), and the model's target is what that schedule's
`prediction` names. An objective is called as

    loss = objective(model_fn, x0, cond, generator, source=None)

with `model_fn(x_t, t, cond) -> prediction`, t a (B,) tensor in the schedule's time (flow time in [0, 1], 1 = noise;
or the VP training timestep 0 .. T - 1), exactly what `samplers.sample` passes at inference. Random draws come
from `generator`, in this order: times, noise, the condition-dropout mask. Under data parallelism every process
draws for the whole global batch and keeps its slice (`shard=(rank, world)`), so N processes see the very
draws one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from samplers import BridgeSchedule, FlowSchedule, Schedule, VPSchedule

from .timesteps import Discrete, LogitNormal, TimestepSampler, Uniform

TrainModelFn = Callable[[Tensor, Tensor, Any], Tensor]


def drop_cond(
    cond: Any, p: float, generator: torch.Generator | None = None, null: Any = None, shard: tuple[int, int] = (0, 1),
    keys: Sequence[str] | None = None,
) -> Any:
    """Replace each sample's condition by `null` with probability p, for classifier-free guidance training.

    `cond` is a tensor with the batch on dim 0, a dict of such tensors, or None. `null` is the unconditional
    value (a tensor broadcastable to one sample's condition, or a dict of them per key); zeros where not given.
    `shard=(rank, world)`: `cond` is this process's slice of a global batch; the mask is the global one's slice.
    `keys`: for a dict, only these entries are dropped (the text, say, while a sketch hint stays); default all.
    """
    if cond is None or p == 0:
        return cond
    if isinstance(cond, dict):
        tensors = [v for v in cond.values() if isinstance(v, Tensor)]
        if not tensors:
            raise TypeError("cond_drop needs tensors in the condition dict; it holds none")
        keep = _draw(torch.rand, (tensors[0].shape[0],), shard, generator, tensors[0].device) >= p  # (B,)
        nulls = null if isinstance(null, dict) else {}
        drop = set(cond) if keys is None else set(keys)
        return {k: _where(keep, v, nulls.get(k)) if isinstance(v, Tensor) and k in drop else v
                for k, v in cond.items()}
    if not isinstance(cond, Tensor):
        raise TypeError(f"cond_drop works on a tensor or a dict of tensors, got {type(cond).__name__}")
    keep = _draw(torch.rand, (cond.shape[0],), shard, generator, cond.device) >= p
    return _where(keep, cond, null)


def _draw(fn, shape: tuple[int, ...], shard: tuple[int, int], generator, device, **kw) -> Tensor:
    """fn(global shape) drawn from `generator`, this shard's slice of dim 0."""
    rank, world = shard
    out = fn((shape[0] * world, *shape[1:]), generator=generator, device=device, **kw)
    return out[rank * shape[0] : (rank + 1) * shape[0]] if world > 1 else out


def _where(keep: Tensor, value: Tensor, null: Tensor | None) -> Tensor:
    null = torch.zeros((), dtype=value.dtype, device=value.device) if null is None else null.to(value)
    return torch.where(keep.view(-1, *[1] * (value.ndim - 1)), value, null)


def per_sample_alpha_sigma(schedule: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's (alpha_t, sigma_t) from `schedule.alpha_sigma`, shaped (B, 1, ...) to broadcast on `like`."""
    pairs = [schedule.alpha_sigma(v) for v in t.tolist()]  # float64, the sampler's own definition
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.to(like).view(shape), s.to(like).view(shape)


@dataclass
class Objective:
    """Denoising regression along `schedule`: the target is what `schedule.prediction` names.

    flow: eps - x0 (rectified flow velocity); eps: the noise; x0: the clean data; v: alpha eps - sigma x0. With a
    `BridgeSchedule` the path starts from `source` instead of noise (LBM): x_t = (1 - t) x0 + t source + b_t eps
    and the target is source - x0. `min_snr_gamma` weights each sample by min(SNR, gamma) in x0-error units
    (Hang et al. 2023: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v). `cond_drop` replaces the condition by
    `null_cond` with that probability per sample (classifier-free guidance training); `cond_drop_keys` limits it to
    those entries of a dict condition.
    """

    schedule: Schedule
    timesteps: TimestepSampler
    min_snr_gamma: float | None = None
    cond_drop: float = 0.0
    null_cond: Any = field(default=None, repr=False)
    cond_drop_keys: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a samplers.Schedule, got {type(self.schedule).__name__}")
        if not isinstance(self.timesteps, TimestepSampler):
            raise TypeError(f"timesteps must be a train.timesteps sampler, got {type(self.timesteps).__name__}")
        if isinstance(self.schedule, VPSchedule):
            if not self.timesteps.discrete or self.timesteps.num_train_timesteps > self.schedule.num_train_timesteps:
                raise ValueError(
                    f"a VPSchedule ({self.schedule.num_train_timesteps} training timesteps) needs Discrete timesteps "
                    f"within it, got {self.timesteps}"
                )
        elif self.timesteps.discrete:
            raise ValueError(f"{type(self.schedule).__name__} trains on flow times in [0, 1]; Discrete is for VP")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if self.min_snr_gamma is not None:
            if not self.min_snr_gamma > 0:
                raise ValueError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
            if isinstance(self.schedule, BridgeSchedule):
                raise ValueError("min_snr_gamma has no meaning for bridge matching (no signal-to-noise ratio)")

    @property
    def bridge(self) -> bool:
        return isinstance(self.schedule, BridgeSchedule)

    def __call__(
        self,
        model_fn: TrainModelFn,
        x0: Tensor,
        cond: Any = None,
        generator: torch.Generator | None = None,
        source: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Tensor:
        """The mean loss over the batch: a scalar in fp32 (fp64 for fp64 inputs)."""
        if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2:
            raise TypeError(f"x0 must be a floating-point (B, ...) tensor, got {getattr(x0, 'shape', type(x0))}")
        if self.bridge != (source is not None):
            name = type(self.schedule).__name__
            raise ValueError("bridge matching needs `source` (the source latent)" if self.bridge else
                             f"`source` is only for a BridgeSchedule, this objective uses {name}")
        if source is not None and source.shape != x0.shape:
            raise ValueError(f"source shape {tuple(source.shape)} != x0 shape {tuple(x0.shape)}")
        rank, world = shard
        B = x0.shape[0]
        t = self.timesteps.sample(B * world, generator, x0.device)[rank * B : (rank + 1) * B]  # (B,)
        noise = _draw(torch.randn, tuple(x0.shape), shard, generator, x0.device, dtype=x0.dtype)
        cond = drop_cond(cond, self.cond_drop, generator, self.null_cond, shard, self.cond_drop_keys)
        x_t, target, weight = self.path(x0, noise, t, source)
        pred = model_fn(x_t, t, cond)
        if pred.shape != target.shape:
            raise ValueError(f"model_fn returned shape {tuple(pred.shape)}, the target has {tuple(target.shape)}")
        dtype = torch.promote_types(pred.dtype, torch.float32)  # at least fp32 under autocast / half storage
        per_sample = (pred.to(dtype) - target.to(dtype)).square().flatten(1).mean(1)  # (B,)
        return per_sample.mean() if weight is None else (per_sample * weight.to(dtype)).mean()

    def path(self, x0: Tensor, noise: Tensor, t: Tensor, source: Tensor | None = None):
        """(x_t, target, per-sample weight or None) for clean x0, noise and times t."""
        alpha, sigma = per_sample_alpha_sigma(self.schedule, t, x0)  # (B, 1, ...)
        if self.bridge:
            b = torch.tensor([self.schedule.bridge_std(v) for v in t.tolist()], dtype=torch.float64)
            x_t = alpha * x0 + sigma * source + b.to(x0).view_as(alpha) * noise
            return x_t, source - x0, None
        x_t = alpha * x0 + sigma * noise
        p = self.schedule.prediction
        target = {"flow": lambda: noise - x0, "eps": lambda: noise, "x0": lambda: x0,
                  "v": lambda: alpha * noise - sigma * x0}[p]()
        if self.min_snr_gamma is None:
            return x_t, target, None
        a, s = alpha.flatten().double(), sigma.flatten().double()
        snr = a.square() / s.square()  # inf at the clean end, 0 where alpha = 0
        gamma = self.min_snr_gamma
        # x0 error per unit of prediction error, squared: eps 1/SNR, v and flow sigma^2, x0 1
        weight = {"eps": (gamma / snr).clamp(max=1.0), "x0": snr.clamp(max=gamma),
                  "v": snr.clamp(max=gamma) * s.square(), "flow": snr.clamp(max=gamma) * s.square()}[p]
        return x_t, target, weight


def flow_matching(
    schedule: FlowSchedule | None = None, timesteps: TimestepSampler | None = None, **kwargs
) -> Objective:
    """Rectified flow matching (Flux/SD3/Sana: t = 1 is noise, the model predicts eps - x0); logit-normal t by
    default."""
    schedule = FlowSchedule() if schedule is None else schedule
    if type(schedule) is not FlowSchedule:
        raise TypeError(f"flow_matching needs a samplers.FlowSchedule, got {type(schedule).__name__}")
    return Objective(schedule, LogitNormal() if timesteps is None else timesteps, **kwargs)


def noise_prediction(
    schedule: VPSchedule | None = None, timesteps: TimestepSampler | None = None, **kwargs
) -> Objective:
    """DDPM/LDM denoising on a VP schedule; the target (eps, v or x0) is `schedule.prediction`."""
    schedule = VPSchedule() if schedule is None else schedule
    if not isinstance(schedule, VPSchedule):
        raise TypeError(f"noise_prediction needs a samplers.VPSchedule, got {type(schedule).__name__}")
    return Objective(schedule, Discrete(schedule.num_train_timesteps) if timesteps is None else timesteps, **kwargs)


def bridge_matching(
    schedule: BridgeSchedule | None = None, timesteps: TimestepSampler | None = None, **kwargs
) -> Objective:
    """LBM latent bridge matching: x_t = (1 - t) x_target + t x_source + sigma_b sqrt(t (1 - t)) eps, target
    x_source - x_target; call with `source=`. Uniform t by default."""
    schedule = BridgeSchedule() if schedule is None else schedule
    if not isinstance(schedule, BridgeSchedule):
        raise TypeError(f"bridge_matching needs a samplers.BridgeSchedule, got {type(schedule).__name__}")
    return Objective(schedule, Uniform() if timesteps is None else timesteps, **kwargs)
