"""UNet: official manifests, injection points and the channel-tracing suite on meta, configs, forward behaviour."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.conftest import manifest, randomize
from zoo.unet import InjectionPoint

SD15_POINTS = [  # (name, channels, stride) of SD 1.5, written out by hand from the official architecture
    ("input_blocks.0", 320, 1), ("input_blocks.1", 320, 1), ("input_blocks.2", 320, 1),
    ("input_blocks.3", 320, 2), ("input_blocks.4", 640, 2), ("input_blocks.5", 640, 2),
    ("input_blocks.6", 640, 4), ("input_blocks.7", 1280, 4), ("input_blocks.8", 1280, 4),
    ("input_blocks.9", 1280, 8), ("input_blocks.10", 1280, 8), ("input_blocks.11", 1280, 8),
    ("middle_block", 1280, 8),
]
SDXL_POINTS = [
    ("input_blocks.0", 320, 1), ("input_blocks.1", 320, 1), ("input_blocks.2", 320, 1),
    ("input_blocks.3", 320, 2), ("input_blocks.4", 640, 2), ("input_blocks.5", 640, 2),
    ("input_blocks.6", 640, 4), ("input_blocks.7", 1280, 4), ("input_blocks.8", 1280, 4),
    ("middle_block", 1280, 4),
]


@pytest.mark.parametrize("name, man, n_keys, n_params", [
    ("sd15", "sd15-unet", 686, 859_520_964), ("sdxl-base", "sdxl-unet", 1680, 2_567_463_684)])
def test_full_size_unet_on_meta_equals_official_manifest(name, man, n_keys, n_params):
    want = manifest(man)
    sd = zoo.build(name, device="meta").state_dict()
    assert len(want) == n_keys
    assert sorted(sd) == sorted(want)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v[0] for k, v in want.items()}
    assert sum(v.numel() for v in sd.values()) == n_params == sum(torch.Size(v[0]).numel() for v in want.values())


@pytest.mark.parametrize("name, table", [("sd15", SD15_POINTS), ("sdxl-base", SDXL_POINTS)])
def test_injection_points_table_by_value(name, table):
    points = zoo.build(name, device="meta").injection_points()
    assert [(p.name, p.channels, p.stride) for p in points] == table
    assert all(isinstance(p, InjectionPoint) for p in points)
    assert [p.index for p in points] == list(range(len(table) - 1)) + [-1]


@pytest.mark.parametrize("name, size", [("sd15", 512), ("sdxl-base", 1024), ("sdxl-refiner", 768)])
def test_trace_full_size_on_meta_matches_every_injection_point(name, size):
    model = zoo.build(name, device="meta")
    args, kwargs = zoo.example_inputs(model, height=size, width=size, device="meta")
    t = zoo.trace(model, *args, **kwargs)
    lat = size // 8
    for p in model.injection_points():
        assert t[p.name].outputs == [(1, p.channels, lat // p.stride, lat // p.stride)], p
    assert t.output.shape == (1, 4, lat, lat)
    # every decoder block receives its input plus exactly its skip: the "expects 1920, got 1280" class of bug
    skips = [p.channels for p in model.injection_points()[:-1]]
    prev = t["middle_block"].outputs[0][1]
    for i in range(len(model.output_blocks)):
        assert t[f"output_blocks.{i}.0"].inputs[0][1] == prev + skips[-1 - i] == model.output_blocks[i][0].channels
        prev = t[f"output_blocks.{i}"].outputs[0][1]

def test_sd21_config_is_linear_projection_with_64_dim_heads_and_v_prediction():
    cfg = zoo.get_config("sd21")
    assert cfg.parameterization == "v" and cfg.context_dim == 1024
    m = zoo.build("sd21", device="meta")
    st = m.input_blocks[1][1]
    assert isinstance(st.proj_in, torch.nn.Linear)
    assert st.transformer_blocks[0].attn2.to_k.weight.shape == (320, 1024)
    assert [m.input_blocks[i][1].transformer_blocks[0].attn1.heads for i in (1, 4, 7)] == [5, 10, 20]
    assert sum(p.numel() for p in m.parameters()) == 865_910_724


def test_official_unet_config_dict_builds_unchanged_with_ignored_fields():
    official = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[4, 2, 1],
                    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                    transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False, use_fp16=True)
    m = zoo.build({"arch": "unet", **official}, device="meta")
    assert len(m.input_blocks) == 12 and len(m.output_blocks) == 12
    with pytest.raises(ValueError, match="unknown field"):
        zoo.build({"arch": "unet", **official, "num_res_block": 2}, device="meta")


def test_scribble_unet_shape():
    cfg = zoo.get_config("scribble-unet")
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks) == (160, [1, 2, 4, 4], [1, 1, 1, 1])
    m = zoo.build("scribble-unet", device="meta")
    assert [p.channels for p in m.injection_points()] == [160, 160, 160, 320, 320, 640, 640, 640, 640]


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-sdxl"])
def test_tiny_forward_shapes_and_batch_independence(name):
    m = randomize(zoo.build(name), std=0.05).eval()
    (x, t), kw = m.example_inputs(batch=2, height=64, width=96)
    with torch.no_grad():
        out = m(x, t, **kw)
        one = m(x[:1], t[:1], **{k: v[:1] for k, v in kw.items()})
    assert out.shape == x.shape
    torch.testing.assert_close(out[:1], one, atol=1e-5, rtol=1e-5)


def test_zero_control_and_zero_features_leave_the_output_unchanged_and_nonzero_ones_change_it():
    m = randomize(zoo.build("tiny-unet"), std=0.05).eval()
    torch.manual_seed(0)
    (x, t), kw = m.example_inputs(batch=2, height=64, width=64)
    pts = m.injection_points()
    zeros = [torch.zeros(2, p.channels, 8 // p.stride, 8 // p.stride) for p in pts]
    with torch.no_grad():
        base = m(x, t, **kw)
        assert torch.equal(m(x, t, **kw, control=zeros), base)
        assert torch.equal(m(x, t, **kw, features={2: zeros[2]}), base)
        for i in (0, len(pts) - 1):  # the first skip and the middle
            ctrl = [z.clone() for z in zeros]
            ctrl[i] += torch.randn_like(ctrl[i])  # not a constant: GroupNorm would absorb a uniform shift
            assert not torch.allclose(m(x, t, **kw, control=ctrl), base)
        assert not torch.allclose(m(x, t, **kw, features={2: torch.randn_like(zeros[2])}), base)


def test_unet_runs_in_bfloat16_with_float32_norm_statistics():
    m = randomize(zoo.build("tiny-unet"), std=0.05).eval()
    (x, t), kw = m.example_inputs(height=32, width=32)
    with torch.no_grad():
        ref = m(x, t, **kw)
        out = m.to(torch.bfloat16)(x.bfloat16(), t, context=kw["context"].bfloat16())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 0.1
