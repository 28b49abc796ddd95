"""The systems a recipe trains: parts, encoding of a batch, the model function, the objective and what is saved.

Each system reads like its algorithm box: frozen encoders turn images and captions into latents and text states
(in `prepare`, deterministic: the posterior mean, so a resumed run sees the same inputs), `fit` trains, and the
trained weights are written next to the checkpoints in the files the pipelines load.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lora
import samplers
import zoo
from checkpoints_convert import save_file
from zoo import tokenizers
from zoo.hint_encoder import HintEncoder
from zoo.text import flux_conditioning, sd_conditioning

from .data.images import ImageFolder
from .forwards import flux_forward
from .loop import fit
from .objectives import bridge_matching, flow_matching, noise_prediction
from .previews import bridge_preview, flux_preview, scribble_preview
from .timesteps import LogitNormal, Shifted

BRIDGE_TIMESTEPS = 1000  # LBM's UNet sees t * 1000 (pipelines.bridge)
SYSTEM_FIT_KEYS = ("gradient_checkpointing",)


def part(spec: str | dict[str, Any], what: str, device: torch.device) -> nn.Module:
    """A zoo model from `{config, weights, set, dtype}` (or just a config name): loaded from `weights`, or freshly
    initialised (said on stderr) when there are none; frozen and in eval mode."""
    spec = {"config": spec} if isinstance(spec, str) else dict(spec)
    unknown = set(spec) - {"config", "weights", "set", "dtype"}
    if "config" not in spec or unknown:
        raise ValueError(f"models.{what}: expected config (and optionally weights, set, dtype), got keys "
                         f"{sorted(spec)}")
    config = zoo.get_config(spec["config"], **(spec.get("set") or {}))
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(spec.get("dtype"), "float32"))
    if spec.get("weights"):
        model = zoo.load(config, spec["weights"], dtype=dtype, device=device)
    else:
        print(f"models.{what}: no weights, random initialisation of {spec['config']}", file=sys.stderr)
        model = zoo.build(config, device=device).to(dtype)
    return model.requires_grad_(False).eval()


def text_encoders(recipe: dict[str, Any], device: torch.device, kinds: tuple[str, ...]) -> dict[str, Any]:
    """{kind: model, kind_tok: tokenizer} for the text encoders a system needs (`models.clip`, `models.t5` with a
    `tokenizer` path each)."""
    out: dict[str, Any] = {}
    for kind in kinds:
        spec = dict(recipe["models"].get(kind) or {})
        if not spec.get("tokenizer"):
            raise ValueError(f"models.{kind}.tokenizer: the path of the {kind} tokenizer is needed for the captions")
        tok = spec.pop("tokenizer")
        out[kind] = part(spec, kind, device)
        out[f"{kind}_tok"] = tokenizers.clip(tok) if kind == "clip" else tokenizers.t5(tok)
    return out


@torch.no_grad()
def latents(vae: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> the posterior mean in the denoiser's latent space (scaled and shifted)."""
    p = next(vae.parameters())
    return vae.to_model_space(vae.encode(images.to(p.device, p.dtype)).mode().float())


def fit_arguments(recipe: dict[str, Any]) -> dict[str, Any]:
    """`fit`'s keyword arguments from the recipe's `fit:` section (minus the system switches); unknown keys are an
    error naming fit's arguments."""
    args = {k: v for k, v in (recipe.get("fit") or {}).items() if k not in SYSTEM_FIT_KEYS}
    known = set(inspect.signature(fit).parameters) - {"model", "objective", "data", "forward", "prepare", "preview"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"fit: unknown argument(s) {unknown}; fit takes {sorted(known)}")
    args.setdefault("seed", recipe.get("seed", 0))
    return args


def device_of(recipe: dict[str, Any]) -> torch.device:
    return torch.device(recipe.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def with_preview(recipe: dict[str, Any], args: dict[str, Any], make: Callable[..., Any], **parts: Any) -> None:
    """Add fit's preview callback: every `preview.every` steps a sample through the system's pipeline, saved as
    `previews/step-NNNNNNN.png` in the output folder."""
    spec = recipe.get("preview") or {}
    if spec.get("every") and args.get("output_dir"):
        args["preview"] = make(Path(args["output_dir"]) / "previews", spec, **parts)
        args["preview_every"] = int(spec["every"])


def scribble(recipe: dict[str, Any]):
    """ScribbleDiffusion: a UNet and a hint encoder from scratch on (sketch, image, caption) pairs; the text is
    dropped (replaced by the empty caption's states) with probability `objective.cond_drop`, the sketch never.
    Writes the UNet and the hint encoder (their EMA when `fit.ema_decay` is set) for `pipelines.scribble`."""
    args = fit_arguments(recipe)
    device, models = device_of(recipe), recipe["models"]
    unet = part(models["unet"], "unet", device)  # from scratch unless weights are given; fit unfreezes it
    hint = HintEncoder.for_unet(unet, **(models.get("hint_encoder") or {}))
    vae = part(models["vae"], "vae", device)
    text = text_encoders(recipe, device, ("clip",))
    net = ScribbleNet(unet, hint).to(device)
    if (recipe.get("fit") or {}).get("gradient_checkpointing"):
        unet.gradient_checkpointing(True)
    d = recipe["data"]
    data = ImageFolder(d["root"], d["size"], source_mode="L", pairs=True)
    encode = lambda captions: sd_conditioning(list(captions), text["clip"], text["clip_tok"])["context"].float()
    o = recipe.get("objective") or {}
    schedule = samplers.VPSchedule(o.get("schedule", "squaredcos_cap_v2"), prediction=o.get("prediction", "eps"))
    objective = noise_prediction(schedule, cond_drop=o.get("cond_drop", 0.0), null_cond={"context": encode([""])},
                                 cond_drop_keys=["context"], min_snr_gamma=o.get("min_snr_gamma"))

    def prepare(batch):
        cond = {"context": encode(batch["caption"]), "hint": batch["source"]}
        return {"x0": latents(vae, batch["target"]), "cond": cond}

    with_preview(recipe, args, scribble_preview, unet=unet, hint=hint, vae=vae, data=data, **text)
    result = fit(net, objective, data, prepare=prepare, **args)
    if args.get("output_dir"):
        out = Path(args["output_dir"])
        if result.ema is not None:  # the averaged weights are the ones to sample with
            result.ema.copy_to(net)
        save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, out / "unet.safetensors")
        save_file({k: v.detach().contiguous() for k, v in hint.state_dict().items()}, out / "hint_encoder.safetensors")
    return result


class ScribbleNet(nn.Module):
    """UNet + hint encoder as one trained model: the sketch's features are added after the chosen input blocks."""

    def __init__(self, unet: nn.Module, hint_encoder: nn.Module):
        super().__init__()
        self.unet, self.hint_encoder = unet, hint_encoder

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, hint: Tensor) -> Tensor:
        return self.unet(x, timesteps, context=context, features=self.hint_encoder(hint.to(x.dtype)))


def lbm_lora(recipe: dict[str, Any]):
    """LBM: LoRA (rank, conv_rank) on a UNet trained with the bridge objective from source to target latents; only
    the adapters of modules matching `fit.trainable` (partial names) train."""
    args = fit_arguments(recipe)
    device, models = device_of(recipe), recipe["models"]
    unet, vae = part(models["unet"], "unet", device), part(models["vae"], "vae", device)
    spec = recipe.get("lora") or {}
    lora.inject(unet, spec.get("targets", "sd-all"), rank=int(spec.get("rank", 64)), alpha=spec.get("alpha"),
                conv_rank=spec.get("conv_rank"), conv_alpha=spec.get("conv_alpha"))
    if (recipe.get("fit") or {}).get("gradient_checkpointing"):
        unet.gradient_checkpointing(True)
    d = recipe["data"]
    data = ImageFolder(d["root"], d["size"], pairs=True)
    sigma_b = float((recipe.get("objective") or {}).get("sigma_b", 0.0))
    objective = bridge_matching(samplers.BridgeSchedule(sigma_b=sigma_b))
    dim = unet.config.context_dim
    context = None if dim is None else torch.zeros(1, 1, dim, device=device)  # no text: a fixed null context

    def forward(model, x_t, t, cond):
        ctx = None if context is None else context.expand(x_t.shape[0], -1, -1)
        return model(x_t, t * BRIDGE_TIMESTEPS, context=ctx)

    def prepare(batch):
        return {"x0": latents(vae, batch["target"]), "source": latents(vae, batch["source"])}

    with_preview(recipe, args, bridge_preview, unet=unet, vae=vae, data=data, sigma_b=sigma_b, context=context)
    result = fit(unet, objective, data, forward=forward, prepare=prepare, **args)
    if args.get("output_dir"):
        lora.save(unet, Path(args["output_dir"]) / "lora.safetensors")
    return result


def flux_lora(recipe: dict[str, Any]):
    """Flux LoRA (default: rank 16 on the 95 `omnix` layers) with flow matching on images and captions (or one fixed
    `text.prompt`), logit-normal times shifted by Flux's resolution rule, guidance embedding at `objective.guidance`."""
    args = fit_arguments(recipe)
    device, models = device_of(recipe), recipe["models"]
    flux, ae = part(models["flux"], "flux", device), part(models["vae"], "vae", device)
    spec = recipe.get("lora") or {}
    lora.inject(flux, spec.get("targets", "omnix"), rank=int(spec.get("rank", 16)), alpha=spec.get("alpha"))
    if (recipe.get("fit") or {}).get("gradient_checkpointing"):
        flux.gradient_checkpointing(True)
    text = text_encoders(recipe, device, ("clip", "t5"))
    d = recipe["data"]
    data = ImageFolder(d["root"], d["size"])
    o = recipe.get("objective") or {}
    max_length = int(o.get("max_length", 512))
    fixed = (recipe.get("text") or {}).get("prompt")
    size = (d["size"], d["size"]) if isinstance(d["size"], int) else tuple(d["size"])
    timesteps = Shifted.flux(LogitNormal(o.get("mean", 0.0), o.get("std", 1.0)), (size[0] // 16) * (size[1] // 16))
    objective = flow_matching(samplers.FlowSchedule(), timesteps)
    guidance = float(o.get("guidance", 1.0))

    @torch.no_grad()
    def prepare(batch):
        captions = [fixed] * len(batch["caption"]) if fixed is not None else list(batch["caption"])
        c = flux_conditioning(captions, text["clip"], text["clip_tok"], text["t5"], text["t5_tok"],
                              max_length=max_length)
        g = torch.full((len(captions),), guidance)
        return {"x0": latents(ae, batch["image"]), "cond": {"txt": c["txt"].float(), "y": c["y"].float(),
                                                           "guidance": g}}

    with_preview(recipe, args, flux_preview, flux=flux, ae=ae, data=data, guidance=guidance, max_length=max_length,
                 prompt=fixed, **text)
    result = fit(flux, objective, data, forward=flux_forward, prepare=prepare, **args)
    if args.get("output_dir"):
        lora.save(flux, Path(args["output_dir"]) / "lora.safetensors")
    return result


SYSTEMS = {"scribble": scribble, "lbm-lora": lbm_lora, "flux-lora": flux_lora}

__all__ = ["SYSTEMS", "ScribbleNet", "flux_lora", "lbm_lora", "part", "scribble"]
