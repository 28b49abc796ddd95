"""checkpoints_convert.detect: family, config name, layout and prefix from keys and shapes (full size on meta)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import zoo
from checkpoints_convert.detect import DetectError, detect, detect_all
from checkpoints_convert.flux import flux_to_diffusers
from tests.conftest import manifest


def _meta(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, (shape, _) in manifest(name).items()}


@pytest.mark.parametrize("name, config", [("flux1-dev", "flux-dev"), ("flux1-schnell", "flux-schnell")])
def test_flux_releases_detected_in_every_layout(name, config):
    sd = _meta(name)
    for layout, prefix, d in [("official", "", sd), ("diffusers", "", flux_to_diffusers(sd)),
                              ("official", "model.diffusion_model.", {f"model.diffusion_model.{k}": v
                                                                      for k, v in sd.items()})]:
        det = detect(d)
        assert (det.family, det.layout, det.config, det.prefix) == ("flux", layout, config, prefix)


def test_flux_fields_read_off_the_shapes_build_the_release_config():
    for sd in (_meta("flux1-dev"), flux_to_diffusers(_meta("flux1-dev"))):
        fields = detect(sd).fields
        assert zoo.get_config(fields) == zoo.get_config("flux-dev")
    few = zoo.build("flux-schnell", device="meta", depth=1, depth_single_blocks=2).state_dict()
    det = detect(few)
    assert det.config is None  # not the release: 1 + 2 blocks
    assert dataclasses.asdict(zoo.get_config(det.fields)) == dataclasses.asdict(
        zoo.get_config("flux-schnell", depth=1, depth_single_blocks=2))


@pytest.mark.parametrize("name, family, config", [
    ("sd15-unet", "unet", "sd15"), ("sdxl-unet", "unet", "sdxl-base"),
    ("sd-vae", "autoencoder", "vae-sd"), ("flux-ae", "autoencoder", "vae-flux"),
])
def test_official_manifests_detected(name, family, config):
    det = detect(_meta(name))
    assert (det.family, det.layout, det.config) == (family, "official", config)


def test_full_sd_checkpoint_reports_the_unet_and_lists_the_vae():
    sd = {f"model.diffusion_model.{k}": v for k, v in _meta("sd15-unet").items()}
    sd.update({f"first_stage_model.{k}": v for k, v in _meta("sd-vae").items()})
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
    det = detect(sd)
    assert (det.family, det.config, det.prefix) == ("unet", "sd15", "model.diffusion_model.")
    assert det.components == {"first_stage_model.": "autoencoder"}
    assert {d.family: d.config for d in detect_all(sd)} == {"unet": "sd15", "autoencoder": "vae-sd"}


def test_lora_kinds_and_base_family():
    a, b = torch.zeros(4, 64), torch.zeros(64, 4)
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    peft = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": a,
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": b}
    for sd, kind in ((kohya, "kohya"), (peft, "diffusers")):
        det = detect(sd)
        assert (det.family, det.layout, det.fields["base"], det.fields["ranks"]) == ("lora", kind, "flux", [4])


def test_unknown_state_dict_names_the_nearest_families_and_what_they_miss():
    sd = zoo.build("tiny-flux", device="meta").state_dict()
    del sd["txt_in.weight"]
    with pytest.raises(DetectError, match=r"(?s)nearest:\n  flux \(official\): 75% .*missing \['txt_in.weight'\]"):
        detect(sd)
    with pytest.raises(DetectError, match="empty state dict"):
        detect({})


@pytest.mark.parametrize("config, family", [
    ("sd21", "unet"), ("sdxl-refiner", "unet"), ("controlnet-sd15", "controlnet"), ("sana-600m", "sana"),
    ("vae-flux", "autoencoder"),
])
def test_shipped_release_configs_detected_in_both_layouts(config, family):
    from checkpoints_convert.convert import convert

    sd = zoo.build(config, device="meta").state_dict()
    for layout, d in (("official", sd), ("diffusers", convert(sd, to="diffusers"))):
        det = detect(d)
        assert (det.family, det.layout, det.config) == (family, layout, config)
