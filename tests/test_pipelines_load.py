"""pipelines.load: a diffusers repo folder (sharded), ComfyUI-style separate files and an all-in-one SD checkpoint,
written here from tiny random models; dtype per component, offload, and missing components named with the file
expected."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import pipelines
import zoo
from checkpoints_convert import autoencoder_from_diffusers, flux_from_diffusers, save_file
from tests.conftest import randomize

diffusers = pytest.importorskip("diffusers")


def same(model: torch.nn.Module, sd: dict) -> bool:
    mine = model.state_dict()
    return mine.keys() == sd.keys() and all(torch.equal(mine[k].float(), sd[k].float()) for k in sd)


@pytest.fixture(scope="module")
def flux_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-repo")
    tr = randomize(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)), seed=1)
    vae = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159), seed=2)
    tr.save_pretrained(root / "transformer", max_shard_size="40KB")  # sharded, with its index
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": [None, None], "text_encoder_2": [None, None]}))
    return root, flux_from_diffusers(tr.state_dict()), autoencoder_from_diffusers(vae.state_dict())


def test_diffusers_repo_folder_with_sharded_transformer_and_dtype_per_component(flux_repo, tmp_path):
    root, model_sd, ae_sd = flux_repo
    assert len(list((root / "transformer").glob("*.safetensors"))) > 1
    parts = pipelines.load("flux", root, dtype={"model": "bf16"})
    assert isinstance(parts, pipelines.flux.FluxParts) and parts.clip is None and parts.t5 is None
    assert parts.model.img_in.weight.dtype == torch.bfloat16 and parts.ae.decoder.conv_in.weight.dtype == torch.float32
    assert same(parts.model, {k: v.to(torch.bfloat16) for k, v in model_sd.items()}) and same(parts.ae, ae_sd)
    assert parts.ae.scale_factor == pytest.approx(0.3611) and parts.ae.shift_factor == pytest.approx(0.1159)
    # a component the index lists but the folder lacks: named, with the files expected
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(pipelines.MissingComponent,
                       match=r"lists 'vae' \(ae\), but .*vae/ holds none of diffusion_pytorch_model.safetensors"):
        pipelines.load("flux", broken)


def test_comfyui_style_separate_files_and_a_missing_ae(tmp_path):
    model = randomize(zoo.build("tiny-flux", in_channels=64, out_channels=64), seed=3)
    ae = randomize(zoo.build("tiny-vae-flux"), seed=4)
    # what no shape tells (the rope split) rides in the file's metadata, as checkpoints_convert writes it
    told = {"zoo_fields": json.dumps({"axes_dim": [4, 6, 6], "theta": 10000})}
    save_file(model.state_dict(), tmp_path / "flux1-tiny.safetensors", told)
    with pytest.raises(pipelines.MissingComponent, match=r"flux: no ae found in .*; expected "
                                                                     r"ae.safetensors"):
        pipelines.load("flux", tmp_path)
    save_file(ae.state_dict(), tmp_path / "ae.safetensors")
    parts = pipelines.load("panorama", tmp_path, offload=True)
    assert parts.offload and same(parts.model, model.state_dict()) and same(parts.ae, ae.state_dict())
    assert parts.model.params.axes_dim == [4, 6, 6]
    explicit = pipelines.load("flux", {"model": tmp_path / "flux1-tiny.safetensors", "ae": tmp_path / "ae.safetensors"})
    assert same(explicit.model, model.state_dict())


def test_all_in_one_sd_checkpoint_is_split_into_unet_vae_and_text_encoder(tmp_path):
    unet, vae, clip = (randomize(zoo.build(n), seed=i) for i, n in enumerate(("tiny-unet", "tiny-vae", "tiny-clip")))
    full = {**{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
            **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
            **{f"cond_stage_model.transformer.{k}": v for k, v in clip.state_dict().items()}}
    save_file(full, tmp_path / "sd-tiny.safetensors")
    parts = pipelines.load("sd", tmp_path / "sd-tiny.safetensors", dtype="fp16")
    assert isinstance(parts, pipelines.sd.SDParts) and parts.tok is None
    assert same(parts.unet, {k: v.half() for k, v in unet.state_dict().items()})
    assert same(parts.vae, {k: v.half() for k, v in vae.state_dict().items()})
    assert same(parts.clip, {k: v.half() for k, v in clip.state_dict().items()})
    no_vae = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, tmp_path / "no-vae.safetensors")
    with pytest.raises(pipelines.MissingComponent, match=r"sd: no vae found in .*no-vae.safetensors; "
                                                                     r"expected a VAE file"):
        pipelines.load("sd", tmp_path / "no-vae.safetensors")
    with pytest.raises(ValueError, match=r"unknown pipeline family 'sd3'"):
        pipelines.load("sd3", tmp_path / "sd-tiny.safetensors")


def test_sana_from_separate_files(tmp_path):
    model, vae = randomize(zoo.build("tiny-sana"), seed=7), randomize(zoo.build("tiny-dc-ae"), seed=8)
    save_file(model.state_dict(), tmp_path / "sana.safetensors")
    save_file(vae.state_dict(), tmp_path / "dc-ae.safetensors")
    parts = pipelines.load("sana", tmp_path)
    assert isinstance(parts, pipelines.sana.SanaParts) and parts.gemma is None
    assert same(parts.model, model.state_dict()) and same(parts.vae, vae.state_dict())


def test_all_in_one_sdxl_checkpoint_reads_both_text_encoders_and_sets_the_sdxl_vae_scale(tmp_path):
    from checkpoints_convert.clip import transformers_to_openclip

    unet, vae, clip_l, clip_g = (randomize(zoo.build(n), seed=i) for i, n in
                                 enumerate(("tiny-sdxl", "tiny-vae", "tiny-clip", "tiny-clip-g")))
    full = {**{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
            **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
            **{f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.state_dict().items()},
            **{f"conditioner.embedders.1.model.{k}": v
               for k, v in transformers_to_openclip(clip_g.state_dict()).items()}}
    save_file(full, tmp_path / "sdxl-tiny.safetensors")
    parts = pipelines.load("sdxl", tmp_path / "sdxl-tiny.safetensors")
    assert parts.is_sdxl and parts.vae.scale_factor == 0.13025
    assert same(parts.clip, clip_l.state_dict()) and same(parts.clip_g, clip_g.state_dict())


def test_an_official_lbm_file_and_its_yaml_give_the_bridge_parts(tmp_path):
    from checkpoints_convert import unet_from_diffusers
    from tests.test_pipelines_bridge import diffusers_unet, diffusers_vae

    unet, vae = diffusers_unet(4), diffusers_vae()  # LBMModel.state_dict(): denoiser. + vae.vae_model.
    save_file({**{f"denoiser.{k}": v for k, v in unet.state_dict().items()},
               **{f"vae.vae_model.{k}": v for k, v in vae.state_dict().items()}}, tmp_path / "model.safetensors")
    (tmp_path / "config.yaml").write_text("backbone_signature: stabilityai/stable-diffusion-xl-base-1.0\n"
                                          "bridge_noise_sigma: 0.005\n")
    parts = pipelines.load("bridge", tmp_path)
    assert isinstance(parts, pipelines.bridge.BridgeParts) and parts.sigma_b == 0.005
    assert parts.vae.scale_factor == 0.13025  # the SDXL backbone's VAE config, whose scale the official code uses
    # the file itself (the YAML beside it is read too)
    assert pipelines.load("bridge", tmp_path / "model.safetensors").sigma_b == 0.005
    assert same(parts.unet, unet_from_diffusers(unet.state_dict()))
    assert same(parts.vae, autoencoder_from_diffusers(vae.state_dict()))
