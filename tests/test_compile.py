"""torch.compile(fullgraph=True): Flux, UNet, Sana and AutoencoderKL trace as one graph and match eager.

`fullgraph=True` turns any graph break into an error, so each test also proves the model has none. Inductor's C++
build costs tens of seconds of CPU per model on these machines, so Flux (the smallest graph) goes through inductor
and the others through `aot_eager`, which runs the same Dynamo capture and AOTAutograd functionalisation but
executes the captured graph eagerly.
"""
from __future__ import annotations

import torch

import zoo
from tests.conftest import max_rel_err, randomize
from zoo.flux import img_ids, txt_ids


def tiny(name: str, **overrides) -> torch.nn.Module:
    return randomize(zoo.build(name, **overrides), seed=0, std=0.1).eval()


def assert_compiles_like_eager(fn, args: tuple, kwargs: dict, backend: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with torch.no_grad():
        want = fn(*args, **kwargs)
        got = compiled(*args, **kwargs)
    assert got.shape == want.shape
    assert max_rel_err(got, want) <= 1e-5


def test_flux_compiles_with_inductor_in_one_graph_and_matches_eager():
    model = tiny("tiny-flux", depth=1, depth_single_blocks=1)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 16, generator=g), torch.randn(1, 5, 48, generator=g)
    args = (img, img_ids(1, 8, 8), txt, txt_ids(1, 5), torch.tensor([0.5]), torch.randn(1, 32, generator=g))
    assert_compiles_like_eager(model, args, {"guidance": torch.tensor([3.5])}, backend="inductor")


def test_unet_compiles_in_one_graph_and_matches_eager():
    model = tiny("tiny-unet", channel_mult=[1, 2], attention_resolutions=[2])  # down, attention, up: each once
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]))
    assert_compiles_like_eager(model, args, {"context": torch.randn(1, 5, 32, generator=g)}, backend="aot_eager")


def test_sana_with_a_caption_mask_compiles_in_one_graph_and_matches_eager():
    model = tiny("tiny-sana", depth=1)  # one block: the masked attention path is the same in every block
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 8, 4, 6, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 1, 5, 48, generator=g))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # a padded caption, as the pipelines pass it
    assert_compiles_like_eager(model, args, {"mask": mask}, backend="aot_eager")


def test_autoencoder_round_trip_compiles_in_one_graph_and_matches_eager():
    model = tiny("tiny-vae", ch_mult=[1, 2])  # ldm layout: encoder, quant convs, posterior mode, decoder
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert_compiles_like_eager(model, (x,), {}, backend="aot_eager")
