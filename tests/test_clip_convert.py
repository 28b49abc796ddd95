"""checkpoints_convert.clip: OpenCLIP and SD1.x text-encoder layouts <-> transformers CLIP names, key for key equal to
diffusers' single-file converters, bit-exact round trips, models that run the same."""
from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, randomize

import zoo
from checkpoints_convert import KeyMapError
from checkpoints_convert import clip as cc_clip
from checkpoints_convert.text import clip_text_from_diffusers

transformers = pytest.importorskip("transformers", reason="transformers builds the CLIP text models")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils", reason="diffusers' converters are the peer")

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=24, hidden_act="gelu", eos_token_id=2)


def hf_clip(with_projection: bool) -> torch.nn.Module:
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return randomize(cls(transformers.CLIPTextConfig(**TINY)).eval(), seed=4)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The released (zoo-native) names: transformers 5 leaves `text_model.` out of CLIPTextModel's state dict."""
    sd = {k: v for k, v in model.state_dict().items() if k not in cc_clip.IGNORED}
    return sd if any(k.startswith("text_model.") for k in sd) else clip_text_from_diffusers(sd)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prefix", [cc_clip.SD2_PREFIX, cc_clip.SDXL_G_PREFIX])
def test_openclip_layout_equals_diffusers_convert_open_clip_checkpoint(prefix):
    ref = hf_clip(with_projection=True)
    sd = state(ref)
    openclip = cc_clip.transformers_to_openclip(sd, prefix)
    assert openclip[prefix + "transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert torch.equal(openclip[prefix + "text_projection"], sd["text_projection.weight"].T)  # OpenCLIP: x @ P
    openclip[prefix + "logit_scale"] = torch.tensor(4.6)  # in every OpenCLIP checkpoint, unused by the text tower
    ours = cc_clip.openclip_to_transformers(openclip, prefix)
    theirs = single_file.convert_open_clip_checkpoint(ref, dict(openclip), prefix=prefix)
    if prefix == cc_clip.SD2_PREFIX:  # diffusers' SD2 text encoder has no projection: it skips the key; we keep it
        assert "text_projection.weight" not in theirs
        theirs["text_projection.weight"] = ours["text_projection.weight"]
    assert same(ours, theirs)
    assert same(ours, sd)  # lossless: the q/k/v split and the transpose undo the fusion exactly


def test_openclip_round_trips_bit_exactly_both_ways():
    sd = state(hf_clip(with_projection=True))
    oc = cc_clip.transformers_to_openclip(sd, cc_clip.SDXL_G_PREFIX)
    assert same(cc_clip.openclip_to_transformers(oc, cc_clip.SDXL_G_PREFIX), sd)
    assert same(cc_clip.transformers_to_openclip(cc_clip.openclip_to_transformers(oc, cc_clip.SDXL_G_PREFIX),
                                                 cc_clip.SDXL_G_PREFIX), oc)


def test_sd1_layout_equals_diffusers_convert_ldm_clip_checkpoint_and_round_trips():
    ref = hf_clip(with_projection=False)
    sd = state(ref)
    full = cc_clip.transformers_to_ldm_clip(sd)  # cond_stage_model.transformer.text_model...
    full[cc_clip.SD1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(16)[None]  # SD1.x files have it
    full["model.diffusion_model.out.2.weight"] = torch.ones(1)  # the rest of the checkpoint stays out
    ours = cc_clip.ldm_clip_to_transformers(full)
    theirs = single_file.convert_ldm_clip_checkpoint(dict(full))
    theirs.pop("text_model.embeddings.position_ids")  # an arange buffer, not a weight: we drop it
    assert same(ours, theirs) and same(ours, sd)
    xl = cc_clip.transformers_to_ldm_clip(sd, cc_clip.SDXL_L_PREFIX)
    assert same(cc_clip.ldm_clip_to_transformers(xl, cc_clip.SDXL_L_PREFIX), sd)


def test_text_encoders_of_an_sdxl_checkpoint_load_into_zoo_clip_and_match_transformers():
    l_ref, g_ref = hf_clip(with_projection=False), hf_clip(with_projection=True)
    ckpt = {**cc_clip.transformers_to_ldm_clip(state(l_ref), cc_clip.SDXL_L_PREFIX),
            **cc_clip.transformers_to_openclip(state(g_ref), cc_clip.SDXL_G_PREFIX),
            "model.diffusion_model.out.2.weight": torch.ones(1)}
    found = cc_clip.text_encoders(ckpt)
    assert list(found) == [cc_clip.SDXL_L_PREFIX, cc_clip.SDXL_G_PREFIX]
    ids = torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    for sd, ref, proj in ((found[cc_clip.SDXL_L_PREFIX], l_ref, False), (found[cc_clip.SDXL_G_PREFIX], g_ref, True)):
        ours = zoo.build({"arch": "clip_text", **TINY, "with_projection": proj}).eval()
        ours.load_state_dict(sd, strict=True)
        with torch.no_grad():
            want = ref(ids)
            hidden, pooled = ours(ids)
            assert max_rel_err(hidden, want.last_hidden_state) <= 1e-5
            assert max_rel_err(pooled, want.text_embeds if proj else want.pooler_output) <= 1e-5


def test_clip_layout_errors_name_the_keys():
    sd = state(hf_clip(with_projection=True))
    with pytest.raises(KeyMapError, match="no key starts with"):
        cc_clip.openclip_to_transformers(sd, cc_clip.SD2_PREFIX)
    oc = cc_clip.transformers_to_openclip(sd, cc_clip.SD2_PREFIX)
    oc[cc_clip.SD2_PREFIX + "visual.proj"] = torch.ones(2)
    with pytest.raises(KeyMapError, match="visual.proj"):
        cc_clip.openclip_to_transformers(oc, cc_clip.SD2_PREFIX)
    oc.pop(cc_clip.SD2_PREFIX + "visual.proj")
    oc[cc_clip.SD2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"] = torch.ones(95, 32)
    with pytest.raises(KeyMapError, match="in_proj_weight has shape"):
        cc_clip.openclip_to_transformers(oc, cc_clip.SD2_PREFIX)
    del sd["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(KeyMapError, match=r"layer 0: self_attn weight lacks \['k_proj'\]"):
        cc_clip.transformers_to_openclip(sd)


def test_openclip_tower_is_detected_converted_and_loaded_by_zoo_load():
    import checkpoints_convert as cc

    ref = hf_clip(with_projection=True)
    ckpt = cc_clip.transformers_to_openclip(state(ref), cc_clip.SDXL_G_PREFIX)
    ckpt[cc_clip.SDXL_G_PREFIX + "logit_scale"] = torch.tensor(4.6)
    tower = {k.removeprefix(cc_clip.SDXL_G_PREFIX): v for k, v in ckpt.items()}  # as a loader splits the checkpoint
    det = cc.detect(tower)
    assert (det.family, det.layout, det.config) == ("clip_text", "openclip", None)
    assert same(dict(cc.convert(tower, to="official")), state(ref))
    ids = torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="assumed"):
        guessed = zoo.load(None, tower)  # fields off the shapes; heads and eos pooling assumed as released
    g = guessed.config
    assert (g.hidden_size, g.num_hidden_layers, g.with_projection) == (32, 3, True)
    ours = zoo.load({"arch": "clip_text", **TINY, "with_projection": True}, tower)
    with torch.no_grad():
        assert max_rel_err(ours(ids)[1], ref(ids).text_embeds) <= 1e-5


def test_full_size_openclip_towers_are_named_by_detect():
    import checkpoints_convert as cc

    for name in ("clip-h", "clip-g"):
        meta = zoo.build(name, device="meta").state_dict()
        assert cc.detect(cc_clip.transformers_to_openclip(meta)).config == name


def test_cli_writes_the_openclip_layout_and_reads_it_back(tmp_path, capsys):
    from checkpoints_convert.__main__ import main
    from checkpoints_convert.io import load_file, save_file
    from checkpoints_convert.text import clip_text_to_diffusers

    sd = state(hf_clip(with_projection=True))
    save_file(sd, tmp_path / "clip.safetensors")
    save_file(clip_text_to_diffusers(sd), tmp_path / "clip-diffusers.safetensors")
    want = cc_clip.transformers_to_openclip(sd)
    for src in ("clip.safetensors", "clip-diffusers.safetensors"):
        dst = tmp_path / f"oc-{src}"
        assert main([str(tmp_path / src), str(dst), "--to", "openclip", "-q"]) == 0, capsys.readouterr().err
        assert "(clip_text -> openclip)" in capsys.readouterr().out
        assert same(dict(load_file(dst)), want)
    back = tmp_path / "back.safetensors"
    assert main([str(tmp_path / "oc-clip.safetensors"), str(back), "--to", "official", "-q"]) == 0
    assert same(dict(load_file(back)), sd)
    save_file(randomize(zoo.build("tiny-vae"), seed=0).state_dict(), tmp_path / "vae.safetensors")
    assert main([str(tmp_path / "vae.safetensors"), str(tmp_path / "vae-oc.safetensors"), "--to", "openclip"]) == 2
    assert "to='openclip' is the layout of a CLIP text tower" in capsys.readouterr().err
    assert not (tmp_path / "vae-oc.safetensors").exists()
