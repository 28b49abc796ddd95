"""python -m pipelines, in process on tiny files: an SD prompt through an all-in-one checkpoint with its tokenizer,
an LBM bridge with a LoRA at a scale, the summary line, and bad command lines that write nothing."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import lora
import pipelines
import zoo
from checkpoints_convert import save_file
from pipelines.__main__ import main, parse_lora
from tests.conftest import randomize

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """An all-in-one SD1.x-style checkpoint (UNet, VAE, CLIP under their LDM prefixes) and a tokenizer folder."""
    root = tmp_path_factory.mktemp("sd")
    unet, vae, clip = (randomize(zoo.build(n), seed=i, std=0.05) for i, n in
                       enumerate(("tiny-unet", "tiny-vae", "tiny-clip")))
    save_file({**{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
               **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
               **{f"cond_stage_model.transformer.{k}": v for k, v in clip.state_dict().items()}},
              root / "sd-tiny.safetensors")
    (root / "tokenizer").mkdir()
    shutil.copy(DATA / "bpe_simple_vocab_16e6.txt.gz", root / "tokenizer")
    return root


def test_sd_prompt_to_png_with_summary(sd_folder, tmp_path, capsys):
    out = tmp_path / "fox.png"
    rc = main(["sd", "--model", str(sd_folder), "--prompt", "a red fox", "--out", str(out), "--steps", "2",
               "--height", "32", "--width", "32", "--guidance", "3", "--seed", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    line = captured.out
    assert "wrote" in line and "s/step (2 steps)" in line and "peak memory" in line
    assert "\r" not in captured.err  # a redirected log gets no progress-bar frames (a terminal gets the bar)
    img = pipelines.load_image(out)
    assert img.shape == (1, 3, 32, 32)
    # the same call through the library gives the same picture (up to PNG's 8 bits)
    parts = pipelines.load("sd", sd_folder)
    want = pipelines.sd.generate(parts, "a red fox", steps=2, height=32, width=32, guidance=3.0, seed=1,
                                 progress=False)
    assert (img - want).abs().max() <= 1 / 255 + 1e-6


def test_bridge_with_a_lora_at_a_scale(tmp_path, capsys):
    # an LBM-style UNet without cross-attention (the released ones attend to the image only)
    unet = randomize(zoo.build("tiny-unet", attention_resolutions=[], disable_middle_transformer=True,
                               context_dim=None), seed=5, std=0.05).eval()
    vae = randomize(zoo.build("tiny-vae"), seed=6, std=0.05)
    model_dir = tmp_path / "lbm"
    model_dir.mkdir()
    # no attention: no shape tells the head count, so the file carries it (as checkpoints_convert writes such fields)
    save_file(unet.state_dict(), model_dir / "unet.safetensors", {"zoo_fields": json.dumps({"num_heads": 2})})
    save_file(vae.state_dict(), model_dir / "vae.safetensors")
    (model_dir / "config.yaml").write_text("bridge_noise_sigma: 0.005\n")
    tuned = copy.deepcopy(unet)
    lora.inject(tuned, ["*.in_layers.2", "*.out_layers.3"], rank=2, adapter="relight", init="gaussian")
    for layer in lora.lora_layers(tuned).values():
        torch.nn.init.normal_(layer.lora_up["relight"].weight, std=0.1)
    lora.save(tuned, tmp_path / "relight.safetensors", adapter="relight")
    src = tmp_path / "source.png"
    pipelines.save_png(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), src)
    out = tmp_path / "out.png"
    rc = main(["bridge", "--model", str(model_dir), "--image", str(src), "--out", str(out),
               "--lora", f"{tmp_path / 'relight.safetensors'}:0.7", "--steps", "2"])
    assert rc == 0, capsys.readouterr().err
    parts = pipelines.load("bridge", model_dir)
    assert parts.sigma_b == 0.005
    lora.load(parts.unet, tmp_path / "relight.safetensors", adapter="relight")
    want = pipelines.bridge.generate(parts, pipelines.load_image(src), steps=2, seed=0, lora_scale=0.7,
                                     progress=False)
    assert (pipelines.load_image(out) - want).abs().max() <= 1 / 255 + 1e-6


def test_bad_command_lines_name_the_problem_and_write_nothing(sd_folder, tmp_path, capsys):
    cases = [
        (["sd", "--model", str(sd_folder), "--prompt", "x", "--out", str(tmp_path / "a.jpg")], "must be a .png"),
        (["bridge", "--model", str(sd_folder), "--out", str(tmp_path / "b.png")], "bridge needs --image"),
        (["sd", "--model", str(sd_folder), "--out", str(tmp_path / "c.png")], "sd needs --prompt"),
        (["sd", "--model", str(sd_folder), "--prompt", "x", "--lora", "nope.safetensors:0.5",
          "--out", str(tmp_path / "d.png")], "no such file nope.safetensors"),
        (["sd", "--model", str(sd_folder), "--prompt", "x", "--height", "36", "--width", "32",
          "--out", str(tmp_path / "e.png")], "height=36 is not a positive multiple of 32"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["sdxl", "--model", str(empty), "--prompt", "x", "--out", str(tmp_path / "f.png")],
                  "sdxl: no unet found"))
    flux_dir = tmp_path / "flux"  # a Flux model given an SD (UNet) LoRA
    flux_dir.mkdir()
    save_file(zoo.build("tiny-flux", in_channels=64, out_channels=64).state_dict(), flux_dir / "flux.safetensors",
              {"zoo_fields": json.dumps({"axes_dim": [4, 6, 6], "theta": 10000})})
    save_file(zoo.build("tiny-vae-flux").state_dict(), flux_dir / "ae.safetensors")
    unet = zoo.build("tiny-unet")
    lora.inject(unet, lora.PRESETS["sd-attn"], rank=2, adapter="style")
    sd_lora = lora.save(unet, flux_dir / "sd-style.lora.safetensors", adapter="style")
    cases.append((["flux", "--model", str(flux_dir), "--prompt", "x", "--lora", str(sd_lora),
                   "--out", str(tmp_path / "g.png")], "does not fit this flux model (Flux)"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "flux"]
    assert parse_lora("C:/loras/a.safetensors:0.25") == (Path("C:/loras/a.safetensors"), 0.25)
    assert parse_lora("a.safetensors") == (Path("a.safetensors"), 1.0)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """ComfyUI-style separate files for a tiny Flux system with both text encoders and their tokenizers."""
    pytest.importorskip("sentencepiece")
    from tests.test_tokenizers import train_spm

    root = tmp_path_factory.mktemp("flux")
    told = {"zoo_fields": json.dumps({"axes_dim": [4, 6, 6], "theta": 10000})}
    save_file(randomize(zoo.build("tiny-flux", in_channels=64, out_channels=64), seed=1, std=0.05).state_dict(),
              root / "flux1-tiny.safetensors", told)
    save_file(randomize(zoo.build("tiny-vae-flux"), seed=2, std=0.05).state_dict(), root / "ae.safetensors")
    save_file(randomize(zoo.build("tiny-clip"), seed=3, std=0.05).state_dict(), root / "clip_l.safetensors")
    save_file(randomize(zoo.build("tiny-t5", d_model=48), seed=4, std=0.05).state_dict(), root / "t5xxl.safetensors",
              {"zoo_fields": json.dumps({"feed_forward_proj": "gated-gelu", "relative_attention_max_distance": 128})})
    (root / "tokenizer").mkdir()
    shutil.copy(DATA / "bpe_simple_vocab_16e6.txt.gz", root / "tokenizer")
    (root / "tokenizer_2").mkdir()
    train_spm(root / "tokenizer_2", "spiece.model", vocab_size=300, model_type="unigram", pad_id=0, eos_id=1,
              unk_id=2, bos_id=-1)
    return root


def test_flux_and_perception_from_separate_files_with_text_encoders(flux_folder, tmp_path, capsys):
    parts = pipelines.load("flux", flux_folder)
    assert parts.clip is not None and parts.t5 is not None and parts.t5_tok is not None
    for task in ("distance", "normal"):  # one adapter file per perception task, named by its stem
        m = copy.deepcopy(parts.model)
        lora.inject(m, lora.PRESETS["omnix"], rank=2, adapter=task, init="gaussian")
        for layer in lora.lora_layers(m).values():
            torch.nn.init.normal_(layer.lora_up[task].weight, std=0.2)
        lora.save(m, tmp_path / f"{task}.safetensors", adapter=task, format="diffusers")
    for sub, src in (("rgb", "normal"), ("depth", "distance")):  # a folder in the published OmniX layout
        (tmp_path / "omnix" / "rgb_to_depth" / sub).mkdir(parents=True)
        shutil.copy(tmp_path / f"{src}.safetensors", tmp_path / "omnix/rgb_to_depth" / sub / pipelines.perception.FILE)
    small = ["--steps", "2", "--seed", "3"]
    assert main(["flux", "--model", str(flux_folder), "--prompt", "a fox", "--out", str(tmp_path / "fox.png"),
                 "--height", "32", "--width", "48", "--lora", f"{tmp_path / 'distance.safetensors'}:0.5", *small]) == 0
    pipelines.save_png(torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0)), tmp_path / "pano.png")
    assert main(["perception", "--model", str(flux_folder), "--image", str(tmp_path / "pano.png"),
                 "--out", str(tmp_path / "maps.png"), "--lora", str(tmp_path / "distance.safetensors"),
                 "--lora", str(tmp_path / "normal.safetensors"), "--lora", str(tmp_path / "omnix"),
                 *small]) == 0, capsys.readouterr().err
    assert pipelines.load_image(tmp_path / "fox.png").shape == (1, 3, 32, 48)
    # the CLI's flux run = the library's, with the LoRA at 0.5
    lora.load(parts.model, tmp_path / "distance.safetensors", adapter="distance")
    want = pipelines.flux.generate(parts, "a fox", height=32, width=48, steps=2, seed=3, adapters={"distance": 0.5},
                                   progress=False)
    assert (pipelines.load_image(tmp_path / "fox.png") - want).abs().max() <= 1 / 255 + 1e-6
    maps = [pipelines.load_image(tmp_path / f"maps-{t}.png") for t in ("distance", "normal", "depth")]
    assert maps[0].shape == (1, 3, 32, 64) and not torch.equal(maps[0], maps[1])
    assert not torch.equal(maps[0], maps[2])  # the same target adapter; "depth" runs its condition with depth_rgb
    assert "(6 steps)" in capsys.readouterr().out  # perception: 3 tasks x 2 steps


def test_sana_prompt_through_gemma_and_its_tokenizer(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    from tests.test_tokenizers import train_spm

    root = tmp_path / "sana"
    (root / "tokenizer").mkdir(parents=True)
    save_file(randomize(zoo.build("tiny-sana"), seed=1, std=0.05).state_dict(), root / "sana.safetensors")
    save_file(randomize(zoo.build("tiny-dc-ae"), seed=2, std=0.05).state_dict(), root / "dc-ae.safetensors")
    gemma = zoo.build("tiny-gemma", hidden_size=48, vocab_size=768)  # Sana's caption width, the tokenizer's vocab
    told = {k: getattr(gemma.config, k) for k in ("head_dim", "query_pre_attn_scalar", "sliding_window",
                                                  "attn_logit_softcapping")}
    save_file(randomize(gemma, seed=3, std=0.05).state_dict(), root / "gemma.safetensors",
              {"zoo_fields": json.dumps(told)})
    train_spm(root / "tokenizer", "tokenizer.model", vocab_size=700, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
              unk_id=3, byte_fallback=True, add_dummy_prefix=False, bos_piece="<bos>", eos_piece="<eos>")
    out = tmp_path / "cat.png"
    assert main(["sana", "--model", str(root), "--prompt", "a cat", "--out", str(out), "--steps", "2",
                 "--height", "64", "--width", "64"]) == 0, capsys.readouterr().err
    assert "s/step (2 steps)" in capsys.readouterr().out
    parts = pipelines.load("sana", root)
    want = pipelines.sana.generate(parts, "a cat", steps=2, height=64, width=64, seed=0, progress=False)
    assert (pipelines.load_image(out) - want).abs().max() <= 1 / 255 + 1e-6


def test_scribble_with_its_hint_encoder_and_attention_heatmaps(sd_folder, tmp_path, capsys):
    from zoo.hint_encoder import HintEncoder

    root = tmp_path / "scribble"
    shutil.copytree(sd_folder, root)
    enc = randomize(HintEncoder.for_unet(zoo.build("tiny-unet"), hint_channels=1, zero_init=False), seed=9, std=0.1)
    save_file(enc.state_dict(), root / "hint_encoder.safetensors")
    (root / "hint_encoder.json").write_text(json.dumps({"hint_channels": 1, "zero_init": False}))
    sketch = tmp_path / "sketch.png"
    pipelines.save_png((torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.8).float(), sketch)
    out = tmp_path / "cat.png"
    assert main(["scribble", "--model", str(root), "--image", str(sketch), "--prompt", "a cat", "--out", str(out),
                 "--steps", "2", "--guidance", "2", "--attention-maps"]) == 0, capsys.readouterr().err
    parts = pipelines.load("scribble", root)
    assert torch.equal(parts.adapter.heads[0].weight, enc.heads[0].weight)
    want = pipelines.scribble.generate(parts, pipelines.load_image(sketch), "a cat", steps=2, guidance=2.0, seed=0,
                                       progress=False)
    assert (pipelines.load_image(out) - want).abs().max() <= 1 / 255 + 1e-6
    n = len(parts.tok.encode("a cat"))  # <start>, a, cat, <end>
    assert sorted(p.name for p in tmp_path.glob("cat-tok*.png")) == [f"cat-tok{i:02d}.png" for i in range(n)]


def test_sdxl_all_in_one_checkpoint_with_both_tokenizers(tmp_path, capsys):
    from checkpoints_convert.clip import transformers_to_openclip

    root = tmp_path / "sdxl"
    root.mkdir()
    # the UNet takes the two encoders' widths (32 + 48), SDXL's y (pooled bigG 48 + 6 x 256 size features) and
    # SDXL's 64-channel heads (an all-in-one file does not tell its head width; the loader assumes SDXL's)
    unet = randomize(zoo.build("tiny-sdxl", context_dim=80, adm_in_channels=48 + 6 * 256, model_channels=64,
                               num_head_channels=64), seed=0, std=0.05)
    vae, clip_l, clip_g = (randomize(zoo.build(n), seed=i, std=0.05) for i, n in
                           enumerate(("tiny-vae", "tiny-clip", "tiny-clip-g"), start=1))
    save_file({**{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
               **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
               **{f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.state_dict().items()},
               **{f"conditioner.embedders.1.model.{k}": v
                  for k, v in transformers_to_openclip(clip_g.state_dict()).items()}},
              root / "sdxl-tiny.safetensors")
    for name in ("tokenizer", "tokenizer_2"):
        (root / name).mkdir()
        shutil.copy(DATA / "bpe_simple_vocab_16e6.txt.gz", root / name)
    out = tmp_path / "owl.png"
    rc = main(["sdxl", "--model", str(root), "--prompt", "an owl", "--negative-prompt", "blurry", "--out", str(out),
               "--steps", "2", "--height", "32", "--width", "64", "--guidance", "4", "--seed", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "s/step (2 steps)" in captured.out
    parts = pipelines.load("sdxl", root)
    assert parts.is_sdxl and parts.tok is not None and parts.tok_g is not None
    want = pipelines.sd.generate(parts, "an owl", "blurry", steps=2, height=32, width=64, guidance=4.0, seed=2,
                                 progress=False)
    got = pipelines.load_image(out)
    assert got.shape == (1, 3, 32, 64)
    assert (got - want).abs().max() <= 1 / 255 + 1e-6


def test_panorama_from_separate_files_wraps_its_seam(flux_folder, tmp_path, capsys):
    out = tmp_path / "pano.png"
    rc = main(["panorama", "--model", str(flux_folder), "--prompt", "a beach", "--out", str(out), "--steps", "2",
               "--height", "32", "--width", "64", "--seed", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "s/step (2 steps)" in captured.out
    parts = pipelines.load("panorama", flux_folder)
    want = pipelines.panorama.generate(parts, "a beach", height=32, width=64, steps=2, seed=4, progress=False)
    got = pipelines.load_image(out)
    assert got.shape == (1, 3, 32, 64)
    assert (got - want).abs().max() <= 1 / 255 + 1e-6
    # a panorama is 2:1: the CLI says so and writes nothing
    assert main(["panorama", "--model", str(flux_folder), "--prompt", "x", "--out", str(tmp_path / "bad.png"),
                 "--height", "32", "--width", "48"]) == 2
    assert "equirectangular panorama is 2:1" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
