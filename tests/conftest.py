"""Shared fixtures: tiny models with random non-zero weights, the diffusers peers built once per session, and the
full-size key manifests in tests/manifests/. Fixtures hand out models in eval mode; a test must not change them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

MANIFESTS = Path(__file__).resolve().parent / "manifests"  # copies of shared/manifests: a fresh clone has them


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per test process (ZOO_TEST_THREADS=N for more), passed on to child processes too.

    The tensors here are tiny: a second OpenMP thread buys little, and on a shared machine its spin-waiting multiplies
    the CPU time (measured at load 4: test_resume_is_exact_across_processes 40 -> 11 CPU s, the suite 554 -> 157)."""
    threads = int(os.environ.get("ZOO_TEST_THREADS", "1"))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter and buffer with random non-zero values (zero-initialised layers hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.randn(t.shape, generator=g) * std + std / 4)
    return module


def manifest(name: str) -> dict[str, tuple[list[int], str]]:
    """A full-size official key manifest: key -> (shape, dtype)."""
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} is missing (tests/manifests/ ships with the repo)")
    return {k: (list(v[0]), v[1]) for k, v in json.loads(path.read_text()).items()}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output's scale (max |b|)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---- tiny models and their peers, built once per test session ----

# a tiny Flux in the official constructor's names, and the diffusers FluxTransformer2DModel of the same shape
FLUX_TINY = dict(in_channels=16, vec_in_dim=24, context_in_dim=40, hidden_size=64, mlp_ratio=4.0, num_heads=4,
                 depth=2, depth_single_blocks=3, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True)


@pytest.fixture(scope="session")
def tiny_flux() -> torch.nn.Module:
    """The shipped `tiny-flux` config with random non-zero weights (seed 0)."""
    import zoo

    return randomize(zoo.build("tiny-flux"), seed=0).eval()


@pytest.fixture(scope="session")
def flux_peer():
    """guidance (bool) -> diffusers' FluxTransformer2DModel shaped like FLUX_TINY, random weights (seed 1), cached."""
    diffusers = pytest.importorskip("diffusers")
    built: dict[bool, torch.nn.Module] = {}

    def peer(guidance: bool) -> torch.nn.Module:
        if guidance not in built:
            m = diffusers.FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=guidance,
                axes_dims_rope=(4, 6, 6))
            built[guidance] = randomize(m, seed=1, std=0.1).eval()
        return built[guidance]

    return peer


def sd15_like(std: float = 0.1) -> torch.nn.Module:
    """A fresh diffusers UNet2DConditionModel shaped like `tiny-unet` (SD1.x-like), random weights (seed 1)."""
    import diffusers

    m = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2)
    return randomize(m, seed=1, std=std).eval()


def sdxl_like(std: float = 0.1) -> torch.nn.Module:
    """A fresh diffusers UNet2DConditionModel shaped like `tiny-sdxl` (text_time conditioning), random weights."""
    import diffusers

    m = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
        attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 24)
    return randomize(m, seed=2, std=std).eval()


def sd_vae_like(std: float = 0.05) -> torch.nn.Module:
    """A fresh diffusers AutoencoderKL shaped like `tiny-vae` (4 latent channels, 8x down), random weights (seed 3)."""
    import diffusers

    m = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return randomize(m, seed=3, std=std).eval()


@pytest.fixture(scope="session")
def unet_peers() -> dict[str, torch.nn.Module]:
    """`sd15_like()` and `sdxl_like()` built once, for tests that only read them (use the functions to modify)."""
    pytest.importorskip("diffusers")
    return {"tiny-unet": sd15_like(), "tiny-sdxl": sdxl_like()}
