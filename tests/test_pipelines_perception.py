"""pipelines.perception (OmniX) against the official algorithm written here on diffusers' parts: a tiny
FluxTransformer2DModel with peft adapter pairs (OmniX's target modules), per-item adapters through peft's mixed
batches, a cross-batch attention processor as OmniX's `cross_lora.py`, diffusers' Euler scheduler and tiled VAE
encode, OmniX's seam blend and wrap-around tiled decode. The adapters travel as the published folder layout
(`rgb_to_<task>/{rgb,<task>}/pytorch_lora_weights.safetensors`, written by diffusers' own `save_lora_weights`)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lora
import pipelines
from checkpoints_convert import flux_from_diffusers
from tests.conftest import max_rel_err
from tests.test_pipelines_flux import tiny_system

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # several adapters on one model

H, W, L_TXT = 32, 96, 5  # 2:1; latent 4 x 12, so the 6 blended columns fit
TILE = 32  # VAE tile in pixels: small, so the tiled encode and the row-tiled decode both run
TASKS = ("depth", "normal", "albedo")
OMNIX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]  # utils/lora.py
COND = {"txt": torch.randn(1, L_TXT, 24, generator=torch.Generator().manual_seed(7)),
        "y": torch.randn(1, 16, generator=torch.Generator().manual_seed(8))}


class CrossBatchProcessor:
    """OmniX's FluxAttnProcessor2_0_CrossLoRA on today's diffusers attention: every item's queries attend to the
    keys and values of all items of the batch (one panorama: [condition, target])."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # (B, L, H, D)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        b = q.shape[0]
        k, v = (t.flatten(0, 1)[None].expand(b, -1, -1, -1) for t in (k, v))  # b s h d -> bs (b s) h d
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        txt, img = out[:, : encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1] :]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


def omnix_decode(vae, z):
    """OmniX's `tiled_decode` (src/modules/blend_h.py) with diffusers' own blend_v / blend_h."""
    rows_every = int(vae.tile_latent_min_size * (1 - vae.tile_overlap_factor))
    extent = int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    limit = vae.tile_sample_min_size - extent
    w = z.shape[3]
    z = torch.cat([z, z[:, :, :, :2]], dim=-1)
    rows = [vae.decoder(z[:, :, i : i + vae.tile_latent_min_size]) for i in range(0, z.shape[2], rows_every)]
    out = []
    for i, tile in enumerate(rows):
        if i > 0:
            tile = vae.blend_v(rows[i - 1], tile, extent)
        f = tile.shape[-1] // z.shape[-1]
        out.append(vae.blend_h(tile[:, :, :limit, w * f :], tile[:, :, :limit, : w * f], tile.shape[-1] - w * f))
    return torch.cat(out, dim=2)


def camray(height, width):
    """OmniX's `get_camray` in float64 numpy: the unit view ray per equirectangular pixel, x front, y up, z left."""
    lon = np.pi - 2 * np.pi * (np.arange(width) + 0.5) / width
    lat = np.pi / 2 - np.pi * (np.arange(height) + 0.5) / height
    lat, lon = np.meshgrid(lat, lon, indexing="ij")
    rays = np.stack([np.cos(lat) * np.cos(lon), np.sin(lat), np.cos(lat) * np.sin(lon)])
    return torch.from_numpy(rays)[None].float()


def omnix_reference(tr, vae, panorama, task, steps, seed, blend_extend=6):
    """pipeline_omnix.OmniXPipeline.__call__ for one panorama and one task, on diffusers' parts -> the target map."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from diffusers.utils.torch_utils import randn_tensor

    conds = pipelines.perception.conditions_of(task)
    n = len(conds) + 1  # num_images_per_prompt = len(lora_names)
    names = [pipelines.perception.condition_adapter(task, c) for c in conds] + [task]
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "adapter_names": names}), with_kwargs=True)
             for m in tr.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    g = torch.Generator().manual_seed(seed)
    lh, lw = H // 8, W // 8
    latents = randn_tensor((n, 16, lh, lw), generator=g)  # prepare_latents: every item
    images = {"rgb": panorama * 2 - 1, "camray": camray(H, W)}
    for i, c in enumerate(conds):  # prepare_condition_latents, in order
        latents[i] = (vae.encode(images[c]).latent_dist.sample(g)[0] - vae.config.shift_factor) \
            * vae.config.scaling_factor
    latents = torch.cat([latents, latents[:, :, :, :blend_extend]], dim=-1)
    condition = latents[:-1].clone()
    wide = lw + blend_extend
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(n, lh // 2, wide // 2, "cpu", torch.float32)
    pack = lambda x: x.view(n, 16, lh // 2, 2, wide // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, 64)  # noqa: E731
    unpack = lambda x: x.view(n, lh // 2, wide // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, 16, lh, wide)  # noqa: E731
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                      max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    mu = calculate_shift(ids.shape[0], 256, 4096, 0.5, 1.15)
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    x = pack(latents)
    for t in timesteps:
        v = tr(hidden_states=x, timestep=t.expand(n) / 1000, guidance=torch.full((n,), 3.5),
               pooled_projections=COND["y"].expand(n, -1), encoder_hidden_states=COND["txt"].expand(n, -1, -1),
               txt_ids=torch.zeros(L_TXT, 3), img_ids=ids, return_dict=False)[0]
        u = unpack(sched.step(v, t, x, return_dict=False)[0])
        u = vae.blend_h(u, u, blend_extend)
        u[:-1] = condition
        x = pack(u)
    last = unpack(x)[-1:]  # the target's latents after the last step
    u = vae.blend_h(unpack(x), unpack(x), blend_extend)[:, :, :, :lw]
    image = omnix_decode(vae, u / vae.config.scaling_factor + vae.config.shift_factor)
    for h in hooks:
        h.remove()
    return (image[-1:] / 2 + 0.5).clamp(0, 1), last


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A tiny diffusers Flux-dev + Flux VAE with peft adapter pairs per task, the published folder of their files,
    and our Flux / VAE loaded from the converted state dicts."""
    torch.manual_seed(0)
    kw, parts = tiny_system(dev=True)  # the FluxPipeline parity test's tiny Flux-dev + VAE, ours converted from them
    tr, vae, model, ae = kw["transformer"], kw["vae"], parts.model, parts.ae
    with torch.no_grad():  # sharper attention, so positions (RoPE, the seam's columns) change the result
        for name, p in tr.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                p.copy_(3 + torch.rand(p.shape, generator=torch.Generator().manual_seed(5)))
    model.load_state_dict(flux_from_diffusers(tr.state_dict()), strict=True)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = TILE, TILE // 8
    folder = tmp_path_factory.mktemp("omnix")
    g = torch.Generator().manual_seed(10)
    for task in (*TASKS, "normal_camray"):
        folder_name, conds, target = pipelines.perception.TASKS[task]
        for sub, name in [(c, f"{task}_{c}") for c in conds] + [(target, task)]:
            tr.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                           target_modules=OMNIX_TARGETS), adapter_name=name)
            with torch.no_grad():
                for m in tr.modules():
                    if isinstance(m, peft.tuners.lora.LoraLayer):
                        m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape, generator=g) * 0.3)
            sd = peft.get_peft_model_state_dict(tr, adapter_name=name)
            diffusers.FluxPipeline.save_lora_weights(folder / folder_name / sub, transformer_lora_layers=sd,
                                                     weight_name=pipelines.perception.FILE)
    return tr, vae, model, ae, folder


def panorama() -> torch.Tensor:
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))


def run(model, ae, tasks, seen=None, **kw):
    parts = pipelines.flux.FluxParts(model=model, ae=ae)
    cb = None if seen is None else (lambda i, n, x: seen.append(x) if i == n else None)
    kw = {"steps": 2, **kw}
    return pipelines.perception.generate(parts, panorama(), tasks, conditioning=COND, seed=0, vae_tile=TILE,
                                         progress=False, callback=cb, **kw)


def test_published_adapters_reproduce_the_official_omnix_algorithm(system):
    tr, vae, base, ae, folder = system
    model = copy.deepcopy(base)
    reports = pipelines.perception.load_published(model, folder, tasks=["depth", "normal_camray"])
    assert sorted(reports) == ["depth", "depth_rgb", "normal_camray", "normal_camray_camray", "normal_camray_rgb"]
    # OmniX's targets on FLUX: img q, k, v (fused qkv), proj, MLP of the double block; q, k, v rows of linear1
    assert all(len(r.modules) == 4 + 1 and not r.unmatched for r in reports.values())
    seen: list[torch.Tensor] = []
    got = run(model, ae, ["depth", "normal_camray"], seen)
    assert sorted(got) == ["depth", "normal_camray"] and got["depth"].shape == (1, 1, H, W)
    assert max_rel_err(pipelines.perception.ray_map(H, W), camray(H, W)) <= 1e-6
    tr.set_attn_processor(CrossBatchProcessor())
    with torch.no_grad():
        for task, latents in zip(("depth", "normal_camray"), seen):
            want, want_latents = omnix_reference(tr, vae, panorama(), task, steps=2, seed=0)
            assert max_rel_err(latents, want_latents) <= 1e-5, task
            want = want.mean(dim=1, keepdim=True) if task == "depth" else want  # OmniX's perceive_panoramic_depth
            assert max_rel_err(got[task], want) <= 1e-4, task
            assert (got[task] - want).abs().max() <= 1e-4, task


def test_vae_tiling_is_diffusers_encode_and_omnix_decode(system):
    _, vae, _, ae, _ = system
    g = torch.Generator().manual_seed(4)
    x, z = torch.rand(1, 3, H, W, generator=g) * 2 - 1, torch.randn(1, 16, H // 8, W // 8, generator=g)
    with torch.no_grad():
        want = vae.encode(x).latent_dist  # tiled: tiles of TILE pixels
        got = pipelines.omnix_vae.encode(ae, x, TILE)
        assert max_rel_err(got.mean, want.mean) <= 1e-5 and max_rel_err(got.std, want.std) <= 1e-5
        assert max_rel_err(pipelines.omnix_vae.decode(ae, z, TILE), omnix_decode(vae, z)) <= 1e-5
        assert max_rel_err(pipelines.omnix_vae.decode(ae, z, TILE), ae.decode(z)) > 1e-2  # the tiling did something


def test_three_tasks_give_three_maps_and_switching_equals_a_model_with_only_that_pair(system):
    _, _, base, ae, folder = system
    model = copy.deepcopy(base)
    pipelines.perception.load_published(model, folder, tasks=TASKS)
    layers = dict(lora.lora_layers(model))
    seen: list[torch.Tensor] = []
    maps = run(model, ae, ["normal", "albedo", "depth"], seen, steps=1)
    assert [t.shape[1] for t in maps.values()] == [3, 3, 1]
    for i in range(3):  # final latents (the tiny random VAE would blur the comparison)
        for j in range(i + 1, 3):
            assert max_rel_err(seen[i], seen[j]) > 1e-3
    assert dict(lora.lora_layers(model)) == layers  # switching never re-injected a layer
    fresh = copy.deepcopy(base)
    pipelines.perception.load_published(fresh, folder, tasks=["albedo"])
    alone: list[torch.Tensor] = []
    single = run(fresh, ae, ["albedo"], alone, steps=1)["albedo"]
    assert max_rel_err(alone[0], seen[1]) <= 1e-6 and max_rel_err(single, maps["albedo"]) <= 1e-6
    # without its rgb adapter, the condition runs on the base weights: another result
    lora.remove(fresh, "albedo_rgb")
    assert max_rel_err(run(fresh, ae, ["albedo"], steps=1)["albedo"], single) > 1e-4


def test_a_bf16_base_with_adapters_runs_without_dtype_errors(system):
    _, _, base, ae, folder = system
    model = copy.deepcopy(base).to(torch.bfloat16)
    pipelines.perception.load_published(model, folder, tasks=["depth"])
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.lora_down["depth"].weight.dtype == torch.bfloat16
    out = run(model, ae, ["depth"], steps=1)["depth"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_cross_batch_attention_stays_within_each_panoramas_items():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(6, 2, 5, 8, generator=g) for _ in range(3))  # 2 panoramas x 3 items, (B, H, L, D)
    attend = pipelines.perception.cross_batch(3)
    both = attend(q, k, v)
    for p in range(2):
        items = slice(3 * p, 3 * p + 3)
        alone = attend(q[items], k[items], v[items])
        assert torch.allclose(both[items], alone, atol=1e-6)
        keys, vals = (t[items].transpose(0, 1).flatten(1, 2)[None].expand(3, -1, -1, -1) for t in (k, v))  # 3 L keys
        want = F.scaled_dot_product_attention(q[items], keys, vals)
        assert torch.allclose(alone, want.transpose(1, 2).flatten(2), atol=1e-6)


def test_pbr_gives_roughness_and_metallic():
    image = torch.rand(2, 3, 8, 8)
    out = pipelines.perception.maps("pbr", image)
    assert list(out) == ["roughness", "metallic"]
    assert torch.equal(out["roughness"], image[:, :1]) and torch.equal(out["metallic"], image[:, 1:2])


def test_bad_input_is_named(system, tmp_path):
    _, _, base, ae, folder = system
    model = copy.deepcopy(base)
    pipelines.perception.load_published(model, folder, tasks=["depth"])
    with pytest.raises(ValueError, match=r"task\(s\) \['normal'\] have no LoRA adapter .*\['depth', 'depth_rgb'\]"):
        run(model, ae, ["depth", "normal"])
    with pytest.raises(ValueError, match=r"roughness and metallic are the maps of task 'pbr'"):
        run(model, ae, ["metallic"])
    with pytest.raises(ValueError, match=r"already has adapter\(s\) \['depth', 'depth_rgb'\]"):
        pipelines.perception.load_published(model, folder, tasks=["depth"])
    with pytest.raises(ValueError, match=r"missing: \[.*rgb_to_pbr/pbr/pytorch_lora_weights.safetensors"):
        pipelines.perception.load_published(model, folder, tasks=["pbr"])
    parts = pipelines.flux.FluxParts(model=model, ae=ae)
    with pytest.raises(ValueError, match=r"perception: width=40 is not a positive multiple of 16"):
        pipelines.perception.generate(parts, torch.rand(1, 3, 32, 40), ["depth"], conditioning=COND,
                                      progress=False)
    with pytest.raises(ValueError, match=r"blend_extend must be an even number of latent columns in \[0, 4\]"):
        pipelines.perception.generate(parts, torch.rand(1, 3, 32, 32), ["depth"], conditioning=COND,
                                      progress=False)
