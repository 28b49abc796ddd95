"""train.recipes: each shipped recipe runs 2 steps at tiny overrides on generated images, writes its checkpoint,
trained weights and a preview; overrides and bad recipes give clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import train
from checkpoints_convert import load_file
from train import recipes
from train.__main__ import main as cli

BPE = "tests/data/bpe_simple_vocab_16e6.txt.gz"
CAPTIONS = ["a red square", "a blue circle"]


def images(folder, pairs: bool) -> str:
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        for sub in ("source", "target") if pairs else ("",):
            path = folder / sub / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (72, 64, 3), dtype=np.uint8)).save(path)
        (folder / ("target" if pairs else "") / f"img{i}.txt").write_text(caption)
    return str(folder)


def t5_tokenizer(folder) -> str:
    """A word-level tokenizer.json with T5's special tokens (a stand-in for spiece.model)."""
    tk = pytest.importorskip("tokenizers")
    words = sorted({w for c in ["", *CAPTIONS] for w in c.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def tiny(tmp_path, **extra) -> list[str]:
    """Overrides every recipe shares: 2 steps of 2 images at 64 px on CPU, a preview at the end."""
    common = {"device": "cpu", "data.size": 64, "fit.steps": 2, "fit.batch_size": 2, "fit.warmup": 0,
              "fit.output_dir": str(tmp_path / "run"), "fit.save_every": 2, "fit.progress": False,
              "preview.every": 2, "preview.steps": 2, **extra}
    return [f"{k}={v}" for k, v in common.items()]


def run(name, overrides):
    result = recipes.run(recipes.apply_overrides(recipes.read_recipe(name), overrides))
    assert result.step == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert result.checkpoint is not None and result.checkpoint.is_file()
    return result


def test_scribble_recipe_trains_unet_and_hint_encoder_in_fp16_with_checkpointing_and_accumulation(tmp_path):
    result = run("scribble", tiny(tmp_path, **{
        "data.root": images(tmp_path / "pairs", pairs=True), "models.unet": "tiny-unet", "models.vae": "tiny-vae",
        "models.clip": {"config": "tiny-clip", "tokenizer": BPE}, "fit.accumulate": 2, "fit.ema_decay": 0.9,
        "fit.precision": "fp16", "objective.cond_drop": 0.5}))
    assert any(n.startswith("unet.") for n in result.trainable) and any(n.startswith("hint_encoder.")
                                                                          for n in result.trainable)
    out = tmp_path / "run"
    unet = load_file(out / "unet.safetensors")
    assert "input_blocks.0.0.weight" in unet and unet["input_blocks.0.0.weight"].dtype == torch.float32
    assert load_file(out / "hint_encoder.safetensors")
    assert (out / "previews" / "step-0000002.png").is_file()
    assert [r["step"] for r in train.read_metrics(out)] == [1, 2]


def test_lbm_lora_recipe_trains_only_the_adapters_of_the_named_modules(tmp_path):
    result = run("lbm-lora", tiny(tmp_path, **{
        "data.root": images(tmp_path / "pairs", pairs=True), "models.unet": {"config": "tiny-unet"},
        "models.vae": {"config": "tiny-vae"}, "lora.rank": 4, "lora.conv_rank": 2, "fit.precision": "fp32",
        "fit.trainable": ["attn1", "in_layers"], "fit.gradient_checkpointing": True}))
    assert result.trainable and all(".lora_" in n for n in result.trainable)
    assert all("attn1" in n or "in_layers" in n for n in result.trainable)
    adapters = load_file(tmp_path / "run" / "lora.safetensors")
    assert adapters and any("in_layers" in k for k in adapters)
    assert (tmp_path / "run" / "previews" / "step-0000002.png").is_file()


def test_flux_lora_recipe_trains_rank_16_adapters_on_the_omnix_layers(tmp_path):
    flux = {"config": "tiny-flux", "set": {"context_in_dim": 32, "in_channels": 64, "out_channels": 64}}
    result = run("flux-lora", tiny(tmp_path, **{
        "data.root": images(tmp_path / "images", pairs=False), "models.flux": flux,
        "models.vae": "tiny-vae-flux", "models.clip": {"config": "tiny-clip", "tokenizer": BPE},
        "models.t5": {"config": "tiny-t5", "tokenizer": t5_tokenizer(tmp_path)}, "objective.max_length": 8,
        "fit.precision": "fp32", "fit.accumulate": 1}))
    layers = {n.split(".lora_")[0] for n in result.trainable}
    assert len(layers) == 2 * 1 + 2 * 2  # tiny-flux: 2 double blocks' img qkv + 2 single blocks' linear1/linear2
    adapters = load_file(tmp_path / "run" / "lora.safetensors")
    assert {min(v.shape) for k, v in adapters.items() if v.ndim == 2} == {16}  # rank 16
    assert (tmp_path / "run" / "previews" / "step-0000002.png").is_file()


def test_cli_overrides_and_bad_recipes_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown section 'fitt'"):
        recipes.apply_overrides(recipes.read_recipe("scribble"), ["fitt.steps=3"])
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        recipes.apply_overrides({"recipe": "scribble"}, ["fit.steps"])
    assert recipes.apply_overrides({"recipe": "x", "fit": {"lr": 1}}, ["fit.lr=3e-5"])["fit"]["lr"] == 3e-5
    with pytest.raises(FileNotFoundError, match="shipped: .*flux-lora.*lbm-lora.*scribble"):
        recipes.read_recipe("nope")
    with pytest.raises(ValueError, match="not a system"):
        recipes.run({"recipe": "dreambooth"})
    with pytest.raises(ValueError, match=r"fit: unknown argument\(s\) \['stepz'\]"):
        recipes.run(recipes.apply_overrides(recipes.read_recipe("lbm-lora"), [
            "models.unet=tiny-unet", "models.vae=tiny-vae", f"data.root={images(tmp_path, True)}", "fit.stepz=1",
            "data.size=64", "lora.rank=2", "device=cpu"]))
    assert cli(["nope.yaml"]) == 2 and "no recipe file" in capsys.readouterr().err
    assert cli(["scribble", f"data.root={tmp_path / 'absent'}", "models.unet=tiny-unet", "models.vae=tiny-vae",
                f"models.clip={{config: tiny-clip, tokenizer: {BPE}}}", "device=cpu"]) == 2
    assert "image folder" in capsys.readouterr().err


def test_a_recipe_stopped_and_resumed_ends_bit_identical_to_one_straight_run(tmp_path):
    """Seeded parts, deterministic encoding (posterior mean) and fit's checkpoints: 1 step + resume + 1 step == 2."""
    common = {"data.root": images(tmp_path / "pairs", pairs=True), "models.unet": "tiny-unet", "models.vae":
              "tiny-vae", "lora.rank": 2, "lora.conv_rank": 2, "fit.trainable": ["attn1"], "preview.every": "null"}
    run("lbm-lora", tiny(tmp_path / "a", **common))
    recipe = recipes.apply_overrides(recipes.read_recipe("lbm-lora"), tiny(tmp_path / "b", **common))
    first = recipes.run(recipes.apply_overrides(recipe, ["fit.stop_at=1"]))
    assert first.step == 1
    rest = recipes.run(recipe)  # resume: auto in the shipped recipe
    assert rest.step == 2 and len(rest.losses) == 1
    a, b = (load_file(tmp_path / x / "run" / "lora.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
