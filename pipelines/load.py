"""`pipelines.load(family, path)`: a whole system's parts from the layouts people have.

- a diffusers repo folder: `model_index.json` + one subfolder per component (weights possibly sharded, each with its
  `config.json`); every component the index lists must be there;
- ComfyUI-style separate files in one folder (or a {role: file} dict): the transformer/UNet, `ae.safetensors`,
  `clip_l.safetensors`, `t5xxl_*.safetensors`, ...; each file's model is recognised by `checkpoints_convert.detect`;
- one all-in-one checkpoint (SD1.x/2.x/SDXL: UNet + VAE + text encoders under their LDM/SGM prefixes; an official
  LBM file: `denoiser.` + `vae.vae_model.`, with `bridge_noise_sigma` and the backbone, whose VAE latent scale LBM
  uses, from the official YAML beside), split by `checkpoints_convert.detect_all` / `select` and the prefixes below.
Every component goes through `zoo.load` (any layout, converted to the official one) with its own dtype; tokenizers
come from `tokenizer/`, `tokenizer_2/` subfolders when present. A missing required component is an error naming it
and the file expected; text encoders that are absent from a loose folder stay None (then pass conditioning=).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import zoo
from checkpoints_convert import load_file
from checkpoints_convert.convert import select
from checkpoints_convert.detect import detect_all
from checkpoints_convert.errors import CheckpointError
from pipelines.bridge import BridgeParts
from pipelines.flux import FluxParts
from pipelines.scribble import ScribbleParts
from pipelines.sd import SDParts

FLUX_LIKE = ("flux", "panorama", "perception")
SD_LIKE = ("sd", "sdxl", "scribble", "bridge")
FAMILIES = FLUX_LIKE + SD_LIKE + ("sana",)
# role -> diffusers subfolder, per system
SUBFOLDERS = {
    "flux": {"model": "transformer", "ae": "vae", "clip": "text_encoder", "t5": "text_encoder_2"},
    "sd": {"unet": "unet", "vae": "vae", "clip": "text_encoder"},
    "sdxl": {"unet": "unet", "vae": "vae", "clip": "text_encoder", "clip_g": "text_encoder_2"},
    "sana": {"model": "transformer", "vae": "vae", "gemma": "text_encoder"},
}
TOKENIZERS = {"flux": {"clip_tok": ("tokenizer", "clip"), "t5_tok": ("tokenizer_2", "t5")},
              "sd": {"tok": ("tokenizer", "clip")},
              "sdxl": {"tok": ("tokenizer", "clip"), "tok_g": ("tokenizer_2", "clip")},
              "sana": {"tok": ("tokenizer", "gemma")}}
# what a loose folder should hold for each role (named in errors)
EXPECTED = {"model": "a Flux transformer file (e.g. flux1-dev.safetensors)", "ae": "ae.safetensors (the Flux VAE)",
            "unet": "a UNet file or an all-in-one checkpoint (e.g. sd_xl_base_1.0.safetensors)",
            "vae": "a VAE file (e.g. vae.safetensors) or an all-in-one checkpoint that contains one",
            "clip": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5": "t5xxl_fp16.safetensors",
            "sana_model": "a Sana transformer file", "sana_vae": "a DC-AE file (e.g. dc-ae-f32c32-sana-1.0)"}
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           "model.safetensors.index.json")
# prefixes `detect` does not strip, with the part found under each: the text encoders inside LDM/SGM all-in-one
# checkpoints (and ComfyUI saves) -- CLIP-L in transformers layout, SD2.x's OpenCLIP-H and SDXL's OpenCLIP-bigG in
# open_clip layout (checkpoints_convert reads both) -- and the parts of an official LBM file (`LBMModel.state_dict()`:
# the diffusers UNet as `denoiser.`, the diffusers VAE as `vae.vae_model.`)
PREFIXES = {"cond_stage_model.transformer.": "clip", "conditioner.embedders.0.transformer.": "clip",
            "text_encoders.clip_l.transformer.": "clip", "cond_stage_model.model.": "clip",
            "conditioner.embedders.1.model.": "clip_g", "denoiser.": "unet", "vae.vae_model.": "vae"}
LBM_FIELDS = {"bridge_noise_sigma", "backbone_signature", "unet_input_channels", "vae_num_channels"}
LBM_BACKBONE = "stabilityai/stable-diffusion-xl-base-1.0"  # the official get_model's default backbone_signature
SDXL_SCALE = 0.13025  # SGM's SDXL VAE scale; its shapes are SD's, so a file without config reads as 0.18215


class MissingComponent(FileNotFoundError):
    """A required part of a system is not where the layout says it should be."""


def _system(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown pipeline family {family!r}; expected one of {', '.join(FAMILIES)}")
    return "flux" if family in FLUX_LIKE else family if family in ("sdxl", "sana") else "sd"


def _required(family: str) -> tuple[str, str]:
    return ("model", "ae") if family in FLUX_LIKE else ("model", "vae") if family == "sana" else ("unet", "vae")


def _role(det, system: str) -> str | None:
    """Which part a detected model plays in `system` (None: not one of its parts)."""
    fam = det.family
    if system == "sana":
        return {"sana": "model", "dc_ae": "vae", "gemma2": "gemma"}.get(fam)
    if fam == "flux":
        return "model" if system == "flux" else None
    if fam == "autoencoder":
        return "ae" if system == "flux" else "vae"
    if fam == "unet":
        return "unet" if system != "flux" else None
    if fam == "clip_text":
        return "clip_g" if system == "sdxl" and det.config == "clip-g" else "clip"
    if fam == "t5_encoder":
        return "t5" if system == "flux" else None
    if fam in ("controlnet", "t2i_adapter"):
        return {"controlnet": "controlnet", "t2i_adapter": "adapter"}[fam] if system != "flux" else None
    return None


def _dtype_for(dtype, role: str):
    return dtype.get(role) if isinstance(dtype, Mapping) else dtype


def _from_diffusers(root: Path, system: str) -> dict[str, Any]:
    """{role: component folder} as model_index.json lists them; a listed but absent component is an error."""
    index = json.loads((root / "model_index.json").read_text())
    found = {}
    for role, sub in SUBFOLDERS[system].items():
        listed = index.get(sub)
        if listed is None or (isinstance(listed, list) and listed[0] is None):
            continue
        folder = root / sub
        if not folder.is_dir() or not any((folder / w).is_file() for w in WEIGHTS):
            raise MissingComponent(f"{root}: model_index.json lists {sub!r} ({role}), but {folder}/ holds none of "
                                   f"{', '.join(WEIGHTS)}")
        found[role] = folder
    return found


def _from_files(files: list[Path], system: str) -> dict[str, Any]:
    """{role: file or state dict} from loose files; a file holding several models (an all-in-one checkpoint) is
    split by their prefixes."""
    found: dict[str, Any] = {}
    where: dict[str, Path] = {}
    for f in files:
        try:
            ck = load_file(f)
            dets = detect_all(ck)
        except CheckpointError:
            continue  # not a model file of ours (a LoRA, ...): the roles left empty are reported by the caller
        subs: list[tuple] = [(det, None) for det in dets]
        for p, part in PREFIXES.items():
            if any(k.startswith(p) for k in ck):
                sub = {k[len(p):]: v for k, v in ck.items() if k.startswith(p)}
                subs += [(det, sub, part) for det in detect_all(sub) if not det.prefix]
        for det, sub, *part in subs:
            role = _role(det, system)
            role = part[0] if part and role is not None else role
            if role is None:
                continue
            if role in found:
                raise ValueError(f"two files give the {role}: {where[role]} and {f}; keep one or pass a "
                                 "{role: file} dict")
            whole = sub is None and not det.prefix and len(subs) == 1  # the file is this model: zoo.load reads it
            found[role] = f if whole else sub if sub is not None else select(ck, det.family, det)[1]
            where[role] = f
    return found


def _explicit(paths: Mapping[str, str | Path], system: str) -> dict[str, Any]:
    found = {}
    for role, p in paths.items():
        p = Path(p)
        if not p.exists():
            raise MissingComponent(f"the {role} file {p} does not exist (expected {EXPECTED.get(role, role)})")
        found[role] = p
    return found


def _tokenizers(root: Path | None, system: str) -> dict[str, Any]:
    if root is None:
        return {}
    from zoo import tokenizers

    out = {}
    for role, (sub, kind) in TOKENIZERS[system].items():
        if (root / sub).is_dir():
            out[role] = getattr(tokenizers, kind)(root / sub)
    return out


def load(
    family: str,
    path: str | Path | Mapping[str, str | Path],
    *,
    dtype: str | torch.dtype | Mapping[str, str | torch.dtype] | None = None,
    device: str | torch.device = "cpu",
    offload: bool = False,
) -> Any:  # FluxParts | SDParts | ScribbleParts | BridgeParts | SanaParts
    """The parts of `family` (flux, panorama, perception, sd, sdxl, scribble, bridge, sana) from `path`: a
    diffusers repo folder, a folder of separate files, one all-in-one checkpoint, or a {role: file} dict (roles:
    model, ae, clip, t5 for Flux; unet, vae, clip, clip_g, controlnet, adapter for SD; model, vae, gemma for Sana).
    `dtype`: one for all parts or {role: dtype} (e.g. {"model": "bf16"}; unlisted roles keep the file's).
    `offload=True`: parts stay on the CPU and visit `device` only while they run."""
    system = _system(family)
    root = None
    if isinstance(path, Mapping):
        found = _explicit(path, system)
    else:
        path = Path(path)
        if not path.exists():
            raise MissingComponent(f"{path}: no such file or folder")
        if path.is_dir() and (path / "model_index.json").is_file():
            found, root = _from_diffusers(path, system), path
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".ckpt", ".pt"))
            found, root = _from_files(files, system), path
        else:
            found = _from_files([path], system)
    for role in _required(family):
        if role not in found:
            what = EXPECTED[f"sana_{role}" if family == "sana" else role]
            raise MissingComponent(f"{family}: no {role} found in {path}; expected {what}")
    load_to = "cpu" if offload else device
    parts: dict[str, nn.Module | Any] = {}
    for role, src in found.items():
        parts[role] = zoo.load(None, src, dtype=_dtype_for(dtype, role), device=load_to)
    parts.update(_tokenizers(root, system))
    common = dict(offload=offload, device=device if offload else None)
    if system == "flux":
        return FluxParts(**parts, **common)
    if system == "sana":
        from pipelines.sana import SanaParts

        return SanaParts(**parts, **common)
    if system == "sdxl" and getattr(parts["vae"], "scale_factor", None) == 0.18215:
        parts["vae"].scale_factor = SDXL_SCALE
    if family == "bridge":
        lbm = _lbm_config(root if root is not None or isinstance(path, Mapping) else path.parent)
        if "xl" in lbm.get("backbone_signature", "") and getattr(parts["vae"], "scale_factor", None) == 0.18215:
            parts["vae"].scale_factor = SDXL_SCALE  # the backbone's VAE config, which the official code reads
        return BridgeParts(unet=parts["unet"], vae=parts["vae"], sigma_b=float(lbm.get("bridge_noise_sigma", 0.0)),
                           **common)
    if family == "scribble":
        parts["adapter"] = _hint_encoder(root, parts["unet"], load_to)
        return ScribbleParts(**parts, **common)
    return SDParts(**parts, **common)


def _lbm_config(folder: Path | None) -> dict[str, Any]:
    """The official LBM YAML config beside the weights ({} without one); its `backbone_signature` defaults to SDXL,
    as the official `get_model` does: the VAE (and its latent scale) comes from that backbone."""
    import yaml

    for f in sorted(folder.glob("*.yaml")) if folder is not None else []:
        cfg = yaml.safe_load(f.read_text()) or {}
        if isinstance(cfg, dict) and LBM_FIELDS & cfg.keys():
            return {"backbone_signature": LBM_BACKBONE, **cfg}
    return {}


def _hint_encoder(root: Path | None, unet: nn.Module, device) -> nn.Module:
    """ScribbleDiffusion's sketch encoder: `hint_encoder.safetensors` (+ `hint_encoder.json`: HintEncoderConfig
    fields other than the UNet) beside the other files."""
    from zoo.hint_encoder import HintEncoder

    f = root / "hint_encoder.safetensors" if root is not None else None
    if f is None or not f.is_file():
        raise MissingComponent(f"scribble: no hint encoder; expected hint_encoder.safetensors (+ hint_encoder.json) "
                               f"in {root}")
    fields = json.loads(f.with_suffix(".json").read_text()) if f.with_suffix(".json").is_file() else {}
    enc = HintEncoder.for_unet(unet, **fields)
    enc.load_state_dict(dict(load_file(f)), strict=True)
    return enc.to(device).eval()


__all__ = ["FAMILIES", "MissingComponent", "load"]
