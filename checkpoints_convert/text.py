"""CLIP text encoder files as transformers 5 saves them (the `text_encoder/` folders of diffusers pipelines): the
`text_model.` prefix of the released files (our native names) dropped. Layout name 'diffusers' for that folder form.
A text tower in the OpenCLIP layout (layout 'openclip', SD2.x / SDXL checkpoints) is read by both functions through
`checkpoints_convert.clip`."""
from __future__ import annotations

from torch import Tensor

from checkpoints_convert.clip import is_openclip, openclip_to_transformers

OWN = ("text_projection.",)  # CLIPTextModelWithProjection's projection sits outside `text_model.` in both


def clip_text_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Released CLIP text keys (`text_model.encoder...`) -> transformers 5's saved keys (`encoder...`)."""
    sd = openclip_to_transformers(sd) if is_openclip(sd) else sd
    return {k if k.startswith(OWN) else k.removeprefix("text_model."): v for k, v in sd.items()}


def clip_text_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 5's saved CLIP text keys (or an OpenCLIP text tower) -> the released (native) keys."""
    if is_openclip(sd):
        return openclip_to_transformers(sd)
    return {k if k.startswith(OWN) else f"text_model.{k}": v for k, v in sd.items()}
