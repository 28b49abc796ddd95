"""ControlNet: official cldm layout, diffusers ControlNetModel parity, key maps, from_unet, bad input."""
from __future__ import annotations

import pytest
import torch

import zoo
from checkpoints_convert.unet import controlnet_from_diffusers, controlnet_to_diffusers
from tests.conftest import max_rel_err, randomize
from zoo.controlnet import ControlNet

diffusers = pytest.importorskip("diffusers")


def peer():
    m = diffusers.ControlNetModel(
        in_channels=4, conditioning_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        attention_head_dim=2)
    return randomize(m, seed=4, std=0.1).eval()


def test_full_size_controlnet_sd15_layout_on_meta():
    m = zoo.build("controlnet-sd15", device="meta")
    sd = m.state_dict()
    assert len(sd) == 340 and sum(v.numel() for v in sd.values()) == 361_279_120
    assert sd["input_hint_block.0.weight"].shape == (16, 3, 3, 3)
    assert sd["input_hint_block.14.weight"].shape == (320, 256, 3, 3)
    assert sd["zero_convs.11.0.weight"].shape == (1280, 1280, 1, 1) and "zero_convs.12.0.weight" not in sd
    assert sd["middle_block_out.0.weight"].shape == (1280, 1280, 1, 1)
    # the encoder copy has exactly the UNet's keys and shapes
    unet = zoo.build("sd15", device="meta").state_dict()
    enc = {k: v.shape for k, v in sd.items() if not k.startswith(("input_hint", "zero_convs", "middle_block_out"))}
    assert enc == {k: v.shape for k, v in unet.items() if k.startswith(("time_embed", "input_blocks", "middle_block"))}


def test_controlnet_matches_diffusers_controlnetmodel_and_feeds_the_unet():
    ref = peer()
    ours = zoo.build("tiny-controlnet").eval()
    ours.load_state_dict(controlnet_from_diffusers(ref.state_dict()), strict=True)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    hint, t = torch.rand(2, 3, 128, 64, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=c, controlnet_cond=hint, return_dict=False)
        got = ours(x, hint, t, c)
    want = [*down, mid]
    assert len(got) == len(want) == len(zoo.build("tiny-unet", device="meta").injection_points())
    for a, b in zip(got, want):
        assert a.shape == b.shape and max_rel_err(a, b) <= 1e-5
    unet = randomize(zoo.build("tiny-unet"), seed=5, std=0.05).eval()
    with torch.no_grad():
        assert unet(x, t, context=c, control=got).shape == x.shape


def test_controlnet_key_map_round_trips_and_equals_diffusers_convert_controlnet_checkpoint():
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    model = zoo.build("controlnet-sd15", device="meta", model_channels=32, context_dim=32)  # full layout, small width
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g, dtype=torch.float16) for k, v in model.state_dict().items()}
    ours = controlnet_to_diffusers(dict(sd))
    theirs = convert_controlnet_checkpoint(dict(sd), {"layers_per_block": 2})
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = controlnet_from_diffusers(ours)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_controlnet_from_unet_copies_the_encoder_and_starts_as_a_no_op():
    unet = randomize(zoo.build("tiny-unet"), seed=6, std=0.05).eval()
    cn = ControlNet.from_unet(unet, hint_channels=1).eval()
    usd = unet.state_dict()
    for k, v in cn.state_dict().items():
        if k.startswith(("input_blocks", "middle_block.", "time_embed")):
            assert torch.equal(v, usd[k]), k
    (x, t), kw = unet.example_inputs(batch=2, height=64, width=64)
    hint = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        control = cn(x, hint, t, kw["context"])
        assert all(not c.any() for c in control)  # zero convs: the UNet is untouched at the start of training
        assert torch.equal(unet(x, t, **kw, control=control), unet(x, t, **kw))


def test_controlnet_bad_hint_and_context():
    cn = zoo.build("controlnet-sd15", device="meta")
    (x, hint, t), kw = cn.example_inputs(device="meta")
    with pytest.raises(ValueError, match=r"hint has shape \(1, 3, 64, 64\), expected \(1, 3, 512, 512\)"):
        cn(x, torch.zeros(1, 3, 64, 64, device="meta"), t, **kw)
    with pytest.raises(ValueError, match="context has 1024 features, this ControlNet's cross-attention expects 768"):
        cn(x, hint, t, torch.zeros(1, 77, 1024, device="meta"))
    with pytest.raises(ValueError, match="missing required field"):
        zoo.build({k: v for k, v in zoo.get_config("controlnet-sd15").__dict__.items() if k != "hint_channels"}
                  | {"arch": "controlnet"}, device="meta")


def test_sdxl_like_controlnet_with_text_time_and_y_matches_diffusers():
    from layers.embeddings import timestep_embedding

    ref = randomize(diffusers.ControlNetModel(
        in_channels=4, conditioning_channels=3, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=48,
        attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40),
        seed=12, std=0.1).eval()
    fields = dict(zoo.get_config("tiny-sdxl").__dict__)
    ours = zoo.build({**fields, "arch": "controlnet", "hint_channels": 3}).eval()
    ours.load_state_dict(controlnet_from_diffusers(ref.state_dict()), strict=True)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 48, generator=g)
    te = torch.randn(2, 16, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 2, 4, 32, 48]])
    y = torch.cat([te, timestep_embedding(ids.flatten(), 4, time_factor=1.0, keep_dtype=False).reshape(2, -1)], 1)
    hint, t = torch.rand(2, 3, 64, 96, generator=g), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=c, controlnet_cond=hint, return_dict=False,
                        added_cond_kwargs={"text_embeds": te, "time_ids": ids})
        got = ours(x, hint, t, c, y=y)
    assert len(got) == len(down) + 1 == 10
    for a, b in zip(got, [*down, mid]):
        assert a.shape == b.shape and max_rel_err(a, b) <= 1e-5
    assert sorted(controlnet_to_diffusers(ours.state_dict())) == sorted(ref.state_dict())
