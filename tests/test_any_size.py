"""zoo.load(None, FILE) at sizes no shipped config has: every family's config read off keys and shapes, what no
shape tells taken from config.json / our metadata or assumed and said so; a file of another family and a lone shard
named plainly. Files are made by diffusers at random sizes; outputs are compared with diffusers'."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
from checkpoints_convert import convert, detect, load_file, save_file
from tests.conftest import max_rel_err, randomize
from zoo.load import LoadError

diffusers = pytest.importorskip("diffusers")


def _flux_peer():
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
                                         pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    return randomize(m, seed=1, std=0.1).eval()


def _flux_outputs(model, ref):
    from zoo.flux import img_ids, txt_ids

    g = torch.Generator().manual_seed(0)
    img, txt, y = torch.randn(1, 6, 8, generator=g), torch.randn(1, 5, 24, generator=g), torch.randn(1, 12, generator=g)
    iid, tid, t = img_ids(1, 4, 6), txt_ids(1, 5), torch.tensor([0.4])
    tid[..., 1] = torch.arange(5, dtype=torch.float32)
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=iid[0],
                   txt_ids=tid[0], return_dict=False)[0]
        return model(img, iid, txt, tid, t, y), want


def test_flux_of_any_head_width_loads_from_a_diffusers_folder_with_its_rope_axes(tmp_path):
    ref = _flux_peer()
    ref.save_pretrained(tmp_path / "transformer")
    model = zoo.load(None, tmp_path / "transformer")
    assert (model.params.num_heads, model.params.axes_dim, model.params.hidden_size) == (3, [4, 6, 6], 48)
    assert max_rel_err(*_flux_outputs(model, ref)) <= 1e-5


def test_flux_rope_axes_are_assumed_and_said_so_or_read_from_our_metadata(tmp_path):
    ref = _flux_peer()
    official = dict(convert(ref.state_dict(), to="official"))
    save_file(official, tmp_path / "plain.safetensors")
    det = detect(load_file(tmp_path / "plain.safetensors"))
    assert det.fields["num_heads"] == 3 and det.assumed == {"axes_dim": [2, 6, 8], "theta": 10000}
    with pytest.warns(UserWarning, match=r"axes_dim=\[2, 6, 8\].*assumed"):
        zoo.load(None, tmp_path / "plain.safetensors")
    tag = {"zoo_fields": json.dumps({"axes_dim": [4, 6, 6], "theta": 10000})}
    save_file(official, tmp_path / "tagged.safetensors", tag)
    model = zoo.load(None, tmp_path / "tagged.safetensors")
    assert max_rel_err(*_flux_outputs(model, ref)) <= 1e-5


def _unet_peer(controlnet: bool):
    kw = dict(in_channels=4, layers_per_block=2, block_out_channels=(32, 96),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=20,
              attention_head_dim=[2, 6], transformer_layers_per_block=[2, 1], use_linear_projection=True)
    if controlnet:
        m = diffusers.ControlNetModel(conditioning_channels=2, **kw)
    else:
        m = diffusers.UNet2DConditionModel(sample_size=8, out_channels=3, up_block_types=(
            "UpBlock2D", "CrossAttnUpBlock2D"), **{**kw, "layers_per_block": 1})
    return randomize(m, seed=2, std=0.1).eval()


@pytest.mark.parametrize("controlnet", [False, True], ids=["unet", "controlnet"])
def test_unet_and_controlnet_of_any_structure_load_and_match_diffusers(tmp_path, controlnet):
    ref = _unet_peer(controlnet)
    ref.save_pretrained(tmp_path / "m")
    model = zoo.load(None, tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 20, generator=g), torch.tensor([300.0])
    with torch.no_grad():
        if controlnet:
            hint = torch.rand(1, 2, 64, 64, generator=g)
            down, mid = ref(x, t, encoder_hidden_states=c, controlnet_cond=hint, return_dict=False)
            got, want = model(x, hint, t, c), [*down, mid]
        else:
            got, want = [model(x, t, context=c)], [ref(x, t, encoder_hidden_states=c).sample]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) <= 1e-5


def test_t2i_adapter_of_any_width_loads_and_matches_diffusers(tmp_path):
    ref = randomize(diffusers.T2IAdapter(in_channels=2, channels=[16, 48], num_res_blocks=3, downscale_factor=8,
                                         adapter_type="full_adapter"), seed=3, std=0.1).eval()
    save_file(ref.state_dict(), tmp_path / "a.safetensors")
    model = zoo.load(None, tmp_path / "a.safetensors")
    img = torch.rand(1, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(model(img), ref(img)):
            assert max_rel_err(a, b) <= 1e-5


def _sana_peer():
    m = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        mlp_ratio=2.0, sample_size=8, patch_size=1)
    return randomize(m, seed=4, std=0.1).eval()


def _sana_outputs(model, ref):
    g = torch.Generator().manual_seed(0)
    x, y, t = torch.randn(1, 4, 8, 6, generator=g), torch.randn(1, 5, 12, generator=g), torch.tensor([400.0])
    with torch.no_grad():
        return model(x, t, y[:, None]), ref(x, encoder_hidden_states=y, timestep=t, return_dict=False)[0]


def test_sana_of_any_width_loads_from_diffusers_and_converted_to_official(tmp_path):
    ref = _sana_peer()
    ref.save_pretrained(tmp_path / "transformer")
    assert max_rel_err(*_sana_outputs(zoo.load(None, tmp_path / "transformer"), ref)) <= 1e-5
    save_file(dict(convert(ref.state_dict(), to="official")), tmp_path / "official.safetensors",
              {"zoo_fields": json.dumps({"num_heads": 2, "linear_head_dim": 8})})
    assert max_rel_err(*_sana_outputs(zoo.load(None, tmp_path / "official.safetensors"), ref)) <= 1e-5
    save_file(dict(convert(ref.state_dict(), to="official")), tmp_path / "plain.safetensors")
    det = detect(load_file(tmp_path / "plain.safetensors"))
    assert det.fields["hidden_size"] == 16 and set(det.assumed) == {"num_heads", "linear_head_dim"}


def test_autoencoder_of_any_width_loads_from_a_diffusers_folder_with_its_scale(tmp_path):
    ref = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=2, block_out_channels=(32, 64), layers_per_block=2, latent_channels=6,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        scaling_factor=0.5), seed=5, std=0.1).eval()
    ref.save_pretrained(tmp_path / "vae")
    model = zoo.load(None, tmp_path / "vae")
    assert model.params.scale_factor == 0.5 and model.params.embed_dim == 6
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        assert max_rel_err(model.encode(x).mean, mean) <= 1e-5
        assert max_rel_err(model.decode(mean), ref.decode(mean).sample) <= 1e-5


def test_a_file_of_another_family_and_a_lone_shard_say_so(tmp_path):
    unet = zoo.build("tiny-unet", device="meta").state_dict()
    with pytest.raises(LoadError, match=r"this file holds a UNet \(official layout\), not flux"):
        zoo.load("tiny-flux", {k: torch.zeros(v.shape) for k, v in unet.items()})
    sd = zoo.build("tiny-flux").state_dict()
    keys = sorted(sd)
    for i, part in enumerate((keys[:10], keys[10:]), 1):
        save_file({k: sd[k] for k in part}, tmp_path / f"model-0000{i}-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(LoadError, match=r"shard 1 of 2 .* index file .*model\.safetensors\.index\.json"):
        zoo.load(None, tmp_path / "model-00001-of-00002.safetensors")


def test_convert_keeps_what_config_json_told_in_the_file_metadata(tmp_path):
    from checkpoints_convert.__main__ import main

    _sana_peer().save_pretrained(tmp_path / "transformer")
    assert main([str(tmp_path / "transformer"), str(tmp_path / "o.safetensors"), "--to", "official", "-q"]) == 0
    det = detect(load_file(tmp_path / "o.safetensors"))
    assert det.layout == "official" and det.assumed == {} and det.fields["num_heads"] == 2


def test_text_encoders_of_any_size_load_from_transformers_folders(tmp_path):
    transformers = pytest.importorskip("transformers")
    clip_cfg = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=10, bos_token_id=97, eos_token_id=98, pad_token_id=0, hidden_act="gelu",
        attn_implementation="eager")
    t5_cfg = transformers.T5Config(vocab_size=64, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=3,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=10,
                                   feed_forward_proj="gated-gelu", attn_implementation="eager")
    clip = randomize(transformers.CLIPTextModel(clip_cfg).eval(), seed=6)
    t5 = randomize(transformers.T5EncoderModel(t5_cfg).eval(), seed=7)
    clip.save_pretrained(tmp_path / "text_encoder")
    t5.save_pretrained(tmp_path / "text_encoder_2")
    ids = torch.randint(1, 60, (1, 10), generator=torch.Generator().manual_seed(0))
    ids[0, 0], ids[0, 6] = 97, 98
    with torch.no_grad():
        hidden, pooled = zoo.load(None, tmp_path / "text_encoder")(ids)
        want = clip(ids)
        assert max_rel_err(hidden, want.last_hidden_state) <= 1e-5
        assert max_rel_err(pooled, want.pooler_output) <= 1e-5
        ids = ids % 64
        got = zoo.load(None, tmp_path / "text_encoder_2")(ids)
        assert max_rel_err(got, t5(ids).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("mix", [False, True])
def test_dc_ae_of_any_structure_loads_from_a_diffusers_folder_with_its_scale_and_activations(tmp_path, mix):
    evit, res = "EfficientViTBlock", "ResBlock"
    kw = dict(decoder_norm_types=("batch_norm", "rms_norm", "rms_norm"), decoder_act_fns=("relu6", "silu", "silu"),
              encoder_layers_per_block=(0, 2, 1), decoder_layers_per_block=(0, 1, 2), decoder_conv_act_fn="silu",
              encoder_qkv_multiscales=((),) * 3, decoder_qkv_multiscales=((),) * 3) if mix else dict(
        encoder_layers_per_block=(1, 2, 1), decoder_layers_per_block=(2, 1, 1), downsample_block_type="Conv",
        upsample_block_type="interpolate", encoder_qkv_multiscales=((), (5,), (5,)),
        decoder_qkv_multiscales=((), (5,), (5,)))
    ref = randomize(diffusers.AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=32, encoder_block_types=(res, evit, evit),
        decoder_block_types=(res, evit, evit), encoder_block_out_channels=(16, 32, 64),
        decoder_block_out_channels=(16, 32, 64), scaling_factor=0.3, **kw), seed=3, std=0.1).eval()
    for n, b in ref.named_buffers():
        if n.endswith("running_var"):
            b.abs_()
    ref.save_pretrained(tmp_path / "dc")
    model = zoo.load(None, tmp_path / "dc")
    assert model.params.scaling_factor == 0.3 and model.params.decoder.out_act == ("silu" if mix else "relu")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ref.encode(x).latent
        assert max_rel_err(model.encode(x), z) <= 1e-5
        assert max_rel_err(model.decode(z), ref.decode(z).sample) <= 1e-5
    det = detect(convert(ref.state_dict(), to="official"))  # no config.json: the releases' activations, said so
    assert det.assumed["scaling_factor"] == (1.0 if mix else 0.41407) and "decoder_act" in det.assumed
