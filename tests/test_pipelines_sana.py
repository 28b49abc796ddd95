"""pipelines.sana: equal to diffusers' SanaPipeline on tiny random components (same weights, same initial latents)."""
from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, randomize
from test_dc_ae import PEERS
from test_dc_ae import tiny as tiny_dc_ae
from test_text_sana import gemma_pair, gemma_tokenizer_folder

import pipelines.sana as sana_pipe
import zoo
from checkpoints_convert import sana_to_diffusers
from checkpoints_convert.dc_ae import dc_ae_to_diffusers
from zoo import tokenizers

transformers = pytest.importorskip("transformers", reason="transformers builds the peer Gemma-2")
diffusers = pytest.importorskip("diffusers", reason="diffusers' SanaPipeline is the reference")

CAPTION = 24  # Gemma width = Sana caption_channels
SANA = dict(arch="sana", input_size=8, patch_size=1, in_channels=8, hidden_size=32, depth=2, num_heads=2,
            mlp_ratio=2.5, pred_sigma=False, caption_channels=CAPTION, model_max_length=8, linear_head_dim=8,
            y_norm=True, use_pe=False)
GEMMA = dict(vocab_size=700, hidden_size=CAPTION, intermediate_size=32, num_hidden_layers=2, num_attention_heads=3,
             num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
             attn_logit_softcapping=2.0)


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    """(our SanaParts, diffusers' SanaPipeline) holding the same random weights."""
    folder = gemma_tokenizer_folder(tmp_path_factory.mktemp("gemma_tok"))
    gemma, peer_gemma = gemma_pair(GEMMA)

    model = randomize(zoo.build(SANA).eval(), seed=6, std=0.1)
    peer_model = diffusers.SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=CAPTION,
        mlp_ratio=2.5, sample_size=8, patch_size=1, interpolation_scale=None).eval()
    peer_model.load_state_dict(sana_to_diffusers(model.state_dict()), strict=True)

    vae = tiny_dc_ae("tiny-dc-ae")
    peer_vae = diffusers.AutoencoderDC(**PEERS["tiny-dc-ae"]).eval()
    peer_vae.load_state_dict(dc_ae_to_diffusers(dict(vae.state_dict())), strict=True)

    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
    ref_tok = transformers.GemmaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    pipe = diffusers.SanaPipeline(tokenizer=ref_tok, text_encoder=peer_gemma, vae=peer_vae, transformer=peer_model,
                                  scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    parts = sana_pipe.SanaParts(model=model, vae=vae, gemma=gemma, tok=tokenizers.gemma(folder))
    return parts, pipe


@pytest.mark.parametrize("steps,guidance", [(5, 4.5), (2, 1.0)])
def test_sana_pipeline_matches_diffusers_sana_pipeline(systems, steps, guidance):
    parts, pipe = systems
    prompts = ["A red fox in the snow", "a castle at sunset, oil painting"]
    latents = torch.randn(2, 8, 8, 12, generator=torch.Generator().manual_seed(0))  # 64 x 96 px: non-square
    theirs, ours = [], []

    def keep(pipe, i, t, kwargs):
        theirs.append(kwargs["latents"])
        return {}

    want = pipe(prompts, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance, height=64, width=96,
                latents=latents, output_type="pt", use_resolution_binning=False, max_sequence_length=8,
                callback_on_step_end=keep).images
    got = sana_pipe.generate(parts, prompts, height=64, width=96, steps=steps, guidance=guidance, latents=latents,
                             max_length=8, progress=False, callback=lambda i, n, x: ours.append(x))
    assert got.shape == want.shape == (2, 3, 64, 96)
    assert max_rel_err(got, want) <= 1e-4
    # the tiny random decoder squashes differences: every step's latents must agree too
    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs):
        assert max_rel_err(a, b) <= 1e-4
    assert (got[0] - got[1]).abs().max() > 1e-3  # the prompts steer the images


def test_sana_pipeline_seed_batch_and_conditioning_inputs(systems):
    parts, _ = systems
    cond = sana_pipe.encode_prompt(parts, "a cat", max_length=8)
    neg = sana_pipe.encode_prompt(parts, "", max_length=8, instruction=False)
    kw = dict(height=64, width=64, steps=2, max_length=8, progress=False)
    a = sana_pipe.generate(parts, conditioning=cond, negative_conditioning=neg, seed=1, batch=2, **kw)
    b = sana_pipe.generate(parts, "a cat", seed=1, batch=2, **kw)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert (a[0] - a[1]).abs().max() > 1e-3  # two images per prompt draw different noise


def test_sana_pipeline_bad_input_is_named(systems):
    parts, _ = systems
    kw = dict(steps=2, max_length=8, progress=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        sana_pipe.generate(parts, "a cat", height=60, width=64, **kw)
    with pytest.raises(ValueError, match="latents has shape"):
        sana_pipe.generate(parts, ["a", "b"], height=64, width=64, latents=torch.randn(1, 8, 8, 8), **kw)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        sana_pipe.generate(parts, height=64, width=64, **kw)
    with pytest.raises(ValueError, match="lack"):
        sana_pipe.generate(sana_pipe.SanaParts(model=parts.model, vae=parts.vae), "a cat", height=64, width=64, **kw)
    with pytest.raises(ValueError, match="batch and token count"):
        neg = sana_pipe.encode_prompt(parts, ["", ""], max_length=8, instruction=False)
        sana_pipe.generate(parts, "a cat", negative_conditioning=neg, height=64, width=64, **kw)


def test_sana_pipeline_leaves_timestep_rounding_to_the_model(systems):
    parts, _ = systems
    continuous = zoo.build({**SANA, "integer_timesteps": False}).eval()
    continuous.load_state_dict(parts.model.state_dict())
    kw = dict(height=64, width=64, steps=2, max_length=8, seed=3, progress=False)
    official = sana_pipe.generate(parts, "a cat", **kw)
    other = sana_pipe.SanaParts(continuous, parts.vae, parts.gemma, parts.tok)
    diffusers_time = sana_pipe.generate(other, "a cat", **kw)
    assert max_rel_err(diffusers_time, official) > 1e-5  # 1000 t is fractional on the shifted grid: int() matters
