"""checkpoints_convert.convert: official <-> diffusers for each family, bit-exact round trips, dtype casts."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert.convert import cast, convert
from checkpoints_convert.detect import DetectError
from checkpoints_convert.io import CheckpointError
from tests.conftest import manifest, randomize

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def _tiny_flux(seed: int = 0) -> dict[str, torch.Tensor]:
    return randomize(zoo.build("tiny-flux"), seed=seed).state_dict()


def _assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_flux_round_trip_is_bit_exact_in_every_dtype(dtype):
    sd = {k: v.to(dtype) for k, v in _tiny_flux().items()}
    d = convert(sd, to="diffusers")
    assert "x_embedder.weight" in d and all(v.dtype == dtype for v in d.values())
    _assert_identical(convert(d, to="official"), sd)
    _assert_identical(convert(sd, to="official"), sd)  # already official: unchanged


def test_prefixed_input_is_unwrapped_and_other_models_left_out():
    sd = _tiny_flux()
    wrapped = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    wrapped["vae.decoder.conv_in.weight"] = torch.ones(1)
    _assert_identical(convert(wrapped, to="official"), sd)
    _assert_identical(convert(convert(wrapped, to="diffusers"), to="official"), sd)


def test_flux_to_diffusers_equals_diffusers_own_converter():
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    # diffusers' converter assumes width 3072: full width, one block of each kind, fp16 bit patterns tiled from a
    # random pool of prime length (only bytes move, so any pattern will do; no two rows or halves repeat)
    g = torch.Generator().manual_seed(0)
    pool = torch.empty(1_000_003, dtype=torch.int16).random_(generator=g)
    model = zoo.build("flux-dev", device="meta", depth=1, depth_single_blocks=1)
    sd = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        n = v.numel()
        tiled = pool.repeat(n // pool.numel() + 2)[7919 * i % pool.numel():][:n]
        sd[k] = tiled.view(torch.float16).reshape(v.shape)
    _assert_identical(dict(convert(sd, to="diffusers")), convert_flux_transformer_checkpoint_to_diffusers(dict(sd)))


def test_full_size_flux_converts_onto_diffusers_model_keys_and_shapes():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(guidance_embeds=True).state_dict()
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _) in manifest("flux1-dev").items()}
    ours = convert(sd, to="diffusers")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    back = convert(ours, to="official")
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_cast_to_fp8_keeps_vectors_in_bf16_and_ints_untouched():
    sd = {"w": torch.randn(4, 4) * 1000, "b": torch.randn(4), "n": torch.tensor([1, 2])}
    out = cast(sd, "fp8")
    assert (out["w"].dtype, out["b"].dtype, out["n"].dtype) == (torch.float8_e4m3fn, torch.bfloat16, torch.int64)
    assert out["w"].float().abs().max() <= 448  # saturates rather than overflowing to NaN
    assert torch.equal(out["n"], sd["n"])
    with pytest.raises(ValueError, match="unknown dtype 'fp4'"):
        cast(sd, "fp4")


def test_bad_requests_raise_clear_errors():
    sd = _tiny_flux()
    with pytest.raises(ValueError, match="to='comfy'"):
        convert(sd, to="comfy")
    with pytest.raises(DetectError, match="asked for family 'unet'"):
        convert(sd, to="diffusers", family="unet")
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}
    with pytest.raises(CheckpointError, match="python -m lora convert"):
        convert(lora, to="diffusers")


T2I = {"arch": "t2i_adapter", "channels": [32, 64], "nums_rb": 2, "cin": 64, "sk": True, "use_conv": False}
FAMILIES = [("tiny-unet", "unet"), ("tiny-sdxl", "unet"), ("tiny-controlnet", "controlnet"), (T2I, "t2i_adapter"),
            ("tiny-sana", "sana"), ("tiny-vae", "autoencoder"), ("tiny-vae-flux", "autoencoder")]
SANA_OFFICIAL_ONLY = ("pos_embed", "y_embedder.y_embedding")  # diffusers has no such tensors


@pytest.mark.parametrize("spec, family", FAMILIES, ids=lambda x: x if isinstance(x, str) else "t2i")
def test_every_family_round_trips_through_convert(spec, family):
    from checkpoints_convert.convert import key_map
    from checkpoints_convert.detect import detect

    sd = {k: v.half() for k, v in randomize(zoo.build(spec), seed=4).state_dict().items()}
    d = convert(sd, to="diffusers")
    assert (detect(sd).family, detect(d).family, detect(d).layout) == (family, family, "diffusers")
    _assert_identical(dict(d), key_map(family, "diffusers")({k: v for k, v in sd.items()
                                                             if k not in SANA_OFFICIAL_ONLY or family != "sana"}))
    back = convert(d, to="official")
    if family == "sana":  # dropped by diffusers, remade as zeros of the default shapes
        assert all(not back.pop(k).any() for k in SANA_OFFICIAL_ONLY)
        sd = {k: v for k, v in sd.items() if k not in SANA_OFFICIAL_ONLY}
    _assert_identical(back, sd)


def _diffusers_peer(name: str):
    diffusers = pytest.importorskip("diffusers")
    vae = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    with torch.device("meta"):
        if name == "sd15-unet":
            return diffusers.UNet2DConditionModel(cross_attention_dim=768)
        if name == "sdxl-unet":
            return diffusers.UNet2DConditionModel(
                cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10], block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=[5, 10, 20], use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
        if name == "sd-vae":
            return diffusers.AutoencoderKL(latent_channels=4, **vae)
        return diffusers.AutoencoderKL(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **vae)


@pytest.mark.parametrize("name", ["sd15-unet", "sdxl-unet", "sd-vae", "flux-ae"])
def test_full_size_manifests_convert_onto_diffusers_models(name):
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _) in manifest(name).items()}
    ref = {k: tuple(v.shape) for k, v in _diffusers_peer(name).state_dict().items()}
    ours = convert(sd, to="diffusers")
    assert {k: tuple(v.shape) for k, v in ours.items()} == ref
    assert {k: tuple(v.shape) for k, v in convert(ours, to="official").items()} == {k: v.shape for k, v in sd.items()}


def test_family_picks_one_model_out_of_a_full_checkpoint():
    unet = randomize(zoo.build("tiny-unet"), seed=7).state_dict()
    vae = randomize(zoo.build("tiny-vae"), seed=8).state_dict()
    full = {**{f"model.diffusion_model.{k}": v for k, v in unet.items()},
            **{f"first_stage_model.{k}": v for k, v in vae.items()}}
    _assert_identical(dict(convert(full, to="diffusers", family="autoencoder")), dict(convert(vae, to="diffusers")))
    _assert_identical(dict(convert(full, to="official")), unet)  # no family: the diffusion model
