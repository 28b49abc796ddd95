"""Action-conditioned world model on Sana: predicts the next frame from the last k frames and the last k actions.

GameNGen-style (Valevski et al. 2024) on a Sana backbone:
- history: the last k frames' latents are concatenated with the noisy next-frame latent x_t along channels; the
  history encoder (a patch conv, zero-initialised) adds its tokens onto Sana's patch tokens of x_t, so at
  initialisation the model *is* the base Sana on x_t and released Sana weights load into `sana` unchanged.
  (Adding onto the patch tokens rather than onto x_t's `in_channels` keeps the history out of an
  `in_channels`-wide bottleneck: 3 channels in pixel space.)
- history noise augmentation: Gaussian noise of a random std in [0, history_noise] on the history latents during
  training, its level embedded as one more caption token, so rollouts recover from their own drift.
- actions: (B, k) ids or (B, k, A) one-hot, embedded to Sana's `caption_channels` as the caption y (+ its mask);
  a learned (or zero) null action stands in for them under classifier-free guidance.
- target: the flow generates the next latent, or (`target: delta`) its difference from the last history latent,
  so that "nothing moves" is the zero sample (what copy-last-frame predicts), times `target_scale` (a frame
  difference is small: scaled to about unit std, as latents are by an autoencoder's scale); `prediction: x0` has
  the model output that sample instead of the velocity (same flow path; in pixel space with patches wider than
  Sana's width the velocity would have to carry the input noise through a too-narrow token).
- autoencoder: none (pixels, patchified by Sana), a DC-AE or an AutoencoderKL config, frozen; Sana's
  `in_channels` must be its latent channels (or the frame channels without one).
Time: `forward` takes Sana's timestep in [0, 1000] (1000 = noise); flow time t in [0, 1] is timestep / 1000.
`forward` returns what `prediction` names (velocity eps - x0 by default) for the flow path x_t = (1 - t) x0 + t eps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from layers import TimestepEmbedder
from zoo.registry import build, get_config, register
from zoo.sana import PatchEmbed, Sana, SanaConfig

NULL_ACTIONS = ("learned", "zero")
AUTOENCODER_ARCHS = ("dc_ae", "autoencoder_kl")
TARGETS = ("frame", "delta")
PREDICTIONS = ("flow", "x0")


@dataclass
class WorldModelConfig:
    """The world model: a Sana config plus the history length, action count, null action and autoencoder."""

    sana: Any = "tiny-sana"  # a Sana config name, YAML path or mapping of its fields
    history: int = 4  # k: frames and actions of context
    num_actions: int = 9  # A: Ms. Pac-Man's minimal action set
    frame_channels: int = 3
    autoencoder: Any = None  # None / "none": pixels; else a dc_ae or autoencoder_kl config name, path or mapping
    null_action: str = "learned"  # or "zero"
    history_noise: float = 0.0  # max std of the training-time history noise; 0 = off (no level token)
    target: str = "frame"  # what the flow generates: the next latent, or "delta" = next minus the last history one
    prediction: str = "flow"  # what the model outputs on the flow path: velocity (Sana's), or "x0" the clean sample
    target_scale: float = 1.0  # the target times this: about 1 / its std, so the flow's unit noise fits the signal

    def __post_init__(self):
        if isinstance(self.autoencoder, str) and self.autoencoder.lower() == "none":
            self.autoencoder = None
        for name in ("history", "num_actions", "frame_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"WorldModelConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.null_action not in NULL_ACTIONS:
            raise ValueError(f"WorldModelConfig.null_action={self.null_action!r}; expected one of {NULL_ACTIONS}")
        if self.target not in TARGETS:
            raise ValueError(f"WorldModelConfig.target={self.target!r}; expected one of {TARGETS}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"WorldModelConfig.prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if not self.target_scale > 0:
            raise ValueError(f"WorldModelConfig.target_scale must be > 0, got {self.target_scale!r}")
        if not self.history_noise >= 0:
            raise ValueError(f"WorldModelConfig.history_noise must be >= 0, got {self.history_noise!r}")

    def sana_config(self) -> SanaConfig:
        spec = self.sana if isinstance(self.sana, (str, SanaConfig)) else {"arch": "sana", **dict(self.sana)}
        config = get_config(spec)
        if not isinstance(config, SanaConfig):
            raise ValueError(f"WorldModelConfig.sana must be a Sana config, got {type(config).__name__}")
        return config


class ActionEmbedder(nn.Module):
    """(B, k) ids or (B, k, A) one-hot -> (B, k, C_cap) caption tokens: a linear map of the one-hot plus a learned
    per-slot position (which action is the latest)."""

    def __init__(self, num_actions: int, history: int, caption_channels: int, null_action: str):
        super().__init__()
        self.num_actions, self.history = num_actions, history
        self.proj = nn.Linear(num_actions, caption_channels, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(history, caption_channels) / caption_channels**0.5)
        # the unconditional caption under guidance; "zero" keeps it fixed at zeros
        null = torch.randn(history, caption_channels) / caption_channels**0.5
        if null_action == "learned":
            self.null_embedding = nn.Parameter(null)
        else:
            self.register_buffer("null_embedding", torch.zeros(history, caption_channels), persistent=False)

    def one_hot(self, actions: Tensor) -> Tensor:
        """Validate `actions` -> (B, k, A) float one-hot (or the given soft one-hot)."""
        k, a = self.history, self.num_actions
        want = f"(B, {k}) integer action ids in [0, {a}) or (B, {k}, {a}) one-hot"
        if not isinstance(actions, Tensor):
            raise TypeError(f"actions must be a tensor {want}, got {type(actions).__name__}")
        if actions.ndim == 2 and actions.shape[1] == k and not actions.is_floating_point():
            if actions.numel() and actions.device.type != "meta" and (actions.min() < 0 or actions.max() >= a):
                raise ValueError(f"action ids span [{actions.min().item()}, {actions.max().item()}]; expected {want}")
            return nn.functional.one_hot(actions.long(), a).float()
        if actions.ndim == 3 and actions.shape[1:] == (k, a):
            return actions.float()
        raise ValueError(f"actions has shape {tuple(actions.shape)} ({actions.dtype}); expected {want}")

    def forward(self, actions: Tensor | None, batch: int, keep: Tensor | None = None) -> Tensor:
        """actions as `one_hot` takes them, or None for the null action; keep (B,) bool: False rows get the null
        action (guidance dropout) -> (B, k, C_cap)."""
        null = self.null_embedding.expand(batch, -1, -1)
        if actions is None:
            return null
        onehot = self.one_hot(actions)
        if onehot.shape[0] != batch:
            raise ValueError(f"actions has batch {onehot.shape[0]}, the frames have {batch}")
        y = self.proj(onehot.to(self.proj.weight.dtype)) + self.pos_embed  # (B, k, C_cap)
        if keep is not None:
            y = torch.where(keep.view(-1, 1, 1).to(y.device), y, null.to(y.dtype))
        return y


@register("world_model", WorldModelConfig)
class WorldModel(nn.Module):
    """Next-frame flow model: forward(x, timestep, history, actions) -> velocity (or x0) of the next frame's latent."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.params = config
        sana_config = config.sana_config()
        self.autoencoder = self._build_autoencoder(config.autoencoder)
        latent = self.autoencoder.latent_channels if self.autoencoder is not None else config.frame_channels
        if sana_config.in_channels != latent or sana_config.pred_sigma:
            raise ValueError(f"the Sana config has in_channels={sana_config.in_channels}, "
                             f"pred_sigma={sana_config.pred_sigma}; the world model needs in_channels={latent} "
                             f"({'the autoencoder latent' if self.autoencoder is not None else 'frame'} channels) "
                             "and pred_sigma=false")
        self.sana = Sana(sana_config)
        k, d, c_cap = config.history, sana_config.hidden_size, sana_config.caption_channels
        # history encoder: [x_t, k history latents] -> patch tokens added to Sana's; zero-init (the base Sana)
        self.history_embedder = PatchEmbed(sana_config.patch_size, (k + 1) * latent, d,
                                           sana_config.patch_embed_kernel)
        nn.init.zeros_(self.history_embedder.proj.weight)
        nn.init.zeros_(self.history_embedder.proj.bias)
        self.action_embedder = ActionEmbedder(config.num_actions, k, c_cap, config.null_action)
        # the history noise level as one more caption token (only when the augmentation is on)
        self.level_embedder = TimestepEmbedder(c_cap) if config.history_noise > 0 else None
        self.latent_channels = latent

    @staticmethod
    def _build_autoencoder(spec: Any) -> nn.Module | None:
        if spec is None:
            return None
        ae = build(spec if isinstance(spec, str) else dict(spec))
        if ae.arch not in AUTOENCODER_ARCHS:
            raise ValueError(f"WorldModelConfig.autoencoder must be a {' or '.join(AUTOENCODER_ARCHS)} config, "
                             f"got arch {ae.arch!r}")
        return ae.requires_grad_(False).eval()

    # ---- frames <-> the model's latents ----
    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """Frames (..., C, H, W) in [-1, 1] -> the model's latents (..., C_lat, h, w) (identity in pixel space)."""
        self._check_frames(frames, "frames", self.params.frame_channels)
        if self.autoencoder is None:
            return frames.float()
        lead = frames.shape[:-3]
        z = self.autoencoder.encode(frames.reshape(-1, *frames.shape[-3:]))
        z = z if isinstance(z, Tensor) else z.mode()  # AutoencoderKL: the posterior's mode
        z = self.autoencoder.to_model_space(z)
        return z.reshape(*lead, *z.shape[1:])

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """The model's latents (..., C_lat, h, w) -> frames (..., C, H, W) in about [-1, 1]."""
        self._check_frames(latents, "latents", self.latent_channels)
        if self.autoencoder is None:
            return latents
        lead = latents.shape[:-3]
        x = self.autoencoder.decode(self.autoencoder.from_model_space(latents.reshape(-1, *latents.shape[-3:])))
        return x.reshape(*lead, *x.shape[1:])

    def to_target(self, next_latent: Tensor, history: Tensor) -> Tensor:
        """The flow's clean sample for the next latent (B, C, h, w) given the history (B, k, C, h, w)."""
        x0 = next_latent - history[:, -1] if self.params.target == "delta" else next_latent
        return x0 * self.params.target_scale

    def from_target(self, x0: Tensor, history: Tensor) -> Tensor:
        """Inverse of `to_target`: the generated sample -> the next latent."""
        x0 = x0 / self.params.target_scale
        return x0 + history[:, -1] if self.params.target == "delta" else x0

    def noise_history(self, history: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Training augmentation: history + std * noise, std ~ U[0, history_noise] per sample -> (history, std)."""
        b = history.shape[0]
        level = torch.rand(b, generator=generator, device=history.device) * self.params.history_noise  # (B,)
        noise = torch.randn(history.shape, generator=generator, device=history.device, dtype=history.dtype)
        return history + level.view(-1, *[1] * (history.ndim - 1)).to(history.dtype) * noise, level

    # ---- the model ----
    def forward(self, x: Tensor, timestep: Tensor, history: Tensor, actions: Tensor | None,
                history_level: Tensor | None = None, keep_actions: Tensor | None = None) -> Tensor:
        """x (B, C_lat, h, w) noisy next-frame latent, timestep (B,) or scalar in [0, 1000], history
        (B, k, C_lat, h, w) latents of the last k frames (oldest first), actions (B, k) ids / (B, k, A) one-hot /
        None (the null action), history_level (B,) std of the noise on the history (default 0), keep_actions (B,)
        bool (False: that sample gets the null action) -> the `prediction` (B, C_lat, h, w)."""
        b, k = x.shape[0], self.params.history
        want = f"(B, {k}, {self.latent_channels}, h, w)"
        if x.ndim != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {self.latent_channels}, h, w)")
        if not isinstance(history, Tensor) or history.ndim != 5 or history.shape[:3] != (b, k, self.latent_channels) \
                or history.shape[-2:] != x.shape[-2:]:
            got = tuple(history.shape) if isinstance(history, Tensor) else type(history).__name__
            raise ValueError(f"history has shape {got}, expected {want} with h, w = x's {tuple(x.shape[-2:])}")
        y = self.action_embedder(actions, b, keep_actions)  # (B, k, C_cap)
        if self.level_embedder is not None:
            level = torch.zeros(b, device=x.device) if history_level is None else history_level.to(x.device)
            if level.shape != (b,):
                raise ValueError(f"history_level has shape {tuple(level.shape)}, expected ({b},)")
            y = torch.cat([y, self.level_embedder(level * 1000)[:, None].to(y.dtype)], dim=1)  # (B, k+1, C_cap)
        elif history_level is not None:
            raise ValueError("history_level given, but this world model has history_noise=0 (no level embedding)")
        mask = torch.ones(b, y.shape[1], dtype=torch.bool, device=x.device)
        dtype = self.history_embedder.proj.weight.dtype
        features = self.history_embedder(torch.cat([x, history.flatten(1, 2)], dim=1).to(dtype))  # (B, N, D)
        return self.sana(x, timestep, y, mask, features=features)

    def example_inputs(self, batch: int = 1, height: int = 64, width: int = 64, device=None,
                       dtype=torch.float32) -> tuple[tuple, dict]:
        """Random latents, history and action ids for `height` x `width` frames."""
        f = getattr(self.autoencoder, "downscale", 1)
        h, w, c, k = height // f, width // f, self.latent_channels, self.params.history
        x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
        history = torch.randn(batch, k, c, h, w, device=device, dtype=dtype)
        actions = torch.randint(0, self.params.num_actions, (batch, k), device=device)
        return (x, torch.full((batch,), 500.0, device=device), history, actions), {}

    @staticmethod
    def _check_frames(x: Tensor, name: str, channels: int) -> None:
        if not isinstance(x, Tensor) or x.ndim < 4 or x.shape[-3] != channels or not x.is_floating_point():
            got = f"{tuple(x.shape)} ({x.dtype})" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} has shape {got}, expected float (..., {channels}, H, W)")


__all__ = ["WorldModelConfig", "WorldModel", "ActionEmbedder"]
