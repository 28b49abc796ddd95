"""The world model: shapes and errors for every input, zero-init equivalence with the base Sana, guidance with the
null action, the autoencoder choices."""
from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, randomize

import samplers
import zoo
from zoo.world_model import WorldModel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids oversubscription stalls on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> WorldModel:
    torch.manual_seed(0)
    return randomize(zoo.build("tiny-world-model", **overrides), seed=1)


def inputs(model: WorldModel, batch: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k, c = model.params.history, model.latent_channels
    x = torch.randn(batch, c, size, size, generator=g)
    history = torch.randn(batch, k, c, size, size, generator=g)
    actions = torch.randint(0, model.params.num_actions, (batch, k), generator=g)
    return x, torch.tensor([250.0, 800.0][:batch]), history, actions


def test_output_has_the_latent_shape_for_ids_and_one_hot_actions():
    model = tiny()
    x, t, history, actions = inputs(model)
    out = model(x, t, history, actions)
    assert out.shape == x.shape and torch.isfinite(out).all()
    one_hot = torch.nn.functional.one_hot(actions, model.params.num_actions).float()
    assert max_rel_err(model(x, t, history, one_hot), out) < 1e-6


@pytest.mark.parametrize("bad", [(2, 1, 2, 5), (2, 3), (2, 2, 4), (2,)])
def test_actions_of_another_shape_name_both_accepted_shapes(bad):
    model = tiny()
    x, t, history, _ = inputs(model)
    actions = torch.zeros(bad) if len(bad) != 2 else torch.zeros(bad, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, 2\) integer action ids .* or \(B, 2, 5\) one-hot") as e:
        model(x, t, history, actions)
    assert str(tuple(bad)) in str(e.value)


def test_float_ids_and_out_of_range_ids_are_errors():
    model = tiny()
    x, t, history, actions = inputs(model)
    with pytest.raises(ValueError, match=r"action ids span \[0, 5\]"):
        model(x, t, history, torch.full_like(actions, 5).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match=r"\(2, 2\) \(torch.float32\)"):
        model(x, t, history, actions.float())
    with pytest.raises(ValueError, match="actions has batch 1, the frames have 2"):
        model(x, t, history, actions[:1])


def test_bad_history_latent_and_level_are_named():
    model = tiny()
    x, t, history, actions = inputs(model)
    with pytest.raises(ValueError, match=r"history has shape \(2, 3, 3, 16, 16\), expected \(B, 2, 3, h, w\)"):
        model(x, t, torch.randn(2, 3, 3, 16, 16), actions)
    with pytest.raises(ValueError, match=r"h, w = x's \(16, 16\)"):
        model(x, t, history[..., :8, :8], actions)
    with pytest.raises(ValueError, match=r"x has shape \(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), t, history, actions)
    with pytest.raises(ValueError, match=r"history_level has shape \(3,\), expected \(2,\)"):
        model(x, t, history, actions, history_level=torch.zeros(3))
    with pytest.raises(ValueError, match="history_noise=0"):
        tiny(history_noise=0.0)(x, t, history, actions, history_level=torch.zeros(2))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="in_channels=3, .* needs in_channels=8"):
        zoo.build("tiny-world-model", autoencoder="tiny-dc-ae")
    with pytest.raises(ValueError, match="must be a dc_ae or autoencoder_kl config, got arch 'sana'"):
        zoo.build("tiny-world-model", autoencoder="tiny-sana")
    with pytest.raises(ValueError, match="null_action='none'"):
        zoo.build("tiny-world-model", null_action="none")
    with pytest.raises(ValueError, match="target='residual'"):
        zoo.build("tiny-world-model", target="residual")
    with pytest.raises(ValueError, match="prediction='eps'"):
        zoo.build("tiny-world-model", prediction="eps")
    with pytest.raises(ValueError, match="target_scale must be > 0"):
        zoo.build("tiny-world-model", target_scale=0.0)


def test_at_init_it_is_the_base_sana_and_sana_weights_load_unchanged():
    model = zoo.build("tiny-world-model")
    randomize(model.action_embedder, seed=2)
    sana = randomize(zoo.build(model.params.sana_config()), seed=3)
    model.sana.load_state_dict(sana.state_dict(), strict=True)  # released Sana keys, as they are
    assert set(model.state_dict()) >= {f"sana.{k}" for k in sana.state_dict()}
    x, t, history, actions = inputs(model)
    y = model.action_embedder(actions, 2)
    y = torch.cat([y, model.level_embedder(torch.zeros(2))[:, None]], dim=1)
    want = sana(x, t, y, torch.ones(2, y.shape[1], dtype=torch.bool))
    assert max_rel_err(model(x, t, history, actions), want) < 1e-6
    # the zero-initialised history encoder: no history reaches the output yet, but it gets gradients
    out = model(x, t, torch.randn_like(history), actions)
    assert max_rel_err(out, want) < 1e-6
    out.square().mean().backward()
    assert model.history_embedder.proj.weight.grad.abs().max() > 0


def test_history_changes_the_output_once_trained():
    model = tiny()
    x, t, history, actions = inputs(model)
    assert (model(x, t, history, actions) - model(x, t, history + 1, actions)).abs().max() > 1e-3


@pytest.mark.parametrize("null_action", ["learned", "zero"])
def test_guidance_with_the_null_action(null_action):
    model = tiny(null_action=null_action)
    if null_action == "zero":
        assert "action_embedder.null_embedding" not in model.state_dict()
    x, t, history, actions = inputs(model)
    t = t / 1000

    def cond(x_, t_):
        return model(x_, t_ * 1000, history, actions)

    def uncond(x_, t_):
        return model(x_, t_ * 1000, history, None)

    u, c = uncond(x, t), cond(x, t)
    assert (u - c).abs().max() > 1e-4  # the null action is another condition
    guided = samplers.Guidance(3.0, uncond_fn=uncond).wrap(cond)(x, t)
    assert max_rel_err(guided, u + 3.0 * (c - u)) < 1e-6
    keep = torch.tensor([False, True])  # guidance dropout per sample = the null action on that row
    mixed = model(x, t * 1000, history, actions, keep_actions=keep)
    assert max_rel_err(mixed[0], u[0]) < 1e-6 and max_rel_err(mixed[1], c[1]) < 1e-6


def test_history_noise_level_is_embedded_and_augmentation_is_seeded():
    model = tiny()
    x, t, history, actions = inputs(model)
    a, level = model.noise_history(history, torch.Generator().manual_seed(5))
    b, level_b = model.noise_history(history, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(level, level_b) and level.shape == (2,)
    assert (level >= 0).all() and (level <= model.params.history_noise).all()
    assert (model(x, t, history, actions, history_level=level) - model(x, t, history, actions)).abs().max() > 1e-5


@pytest.mark.parametrize("autoencoder,latent,factor", [("tiny-dc-ae", 8, 8), ("tiny-vae", 4, 8)])
def test_latent_space_world_models(autoencoder, latent, factor):
    model = zoo.build("tiny-world-model", autoencoder=autoencoder, sana={
        **zoo.build("tiny-world-model").params.sana, "in_channels": latent})
    randomize(model, seed=4)
    frames = torch.rand(1, 3, 3, 16, 16) * 2 - 1  # (B, k + 1, C, H, W)
    z = model.encode(frames)
    assert z.shape == (1, 3, latent, 16 // factor, 16 // factor)
    assert model.decode(z).shape == frames.shape
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    out = model(z[:, -1], torch.tensor([100.0]), z[:, :2], torch.randint(0, 5, (1, 2)))
    assert out.shape == z[:, -1].shape
    with pytest.raises(ValueError, match=r"frames has shape \(2, 4, 16, 16\)"):
        model.encode(torch.rand(2, 4, 16, 16))


@pytest.mark.parametrize("target", ["frame", "delta"])
def test_targets_round_trip(target):
    model = tiny(target=target, target_scale=20.0)
    _, _, history, _ = inputs(model)
    nxt = torch.randn_like(history[:, 0])
    x0 = model.to_target(nxt, history)
    assert max_rel_err(x0, 20.0 * (nxt - history[:, -1] if target == "delta" else nxt)) < 1e-6
    assert max_rel_err(model.from_target(x0, history), nxt) < 1e-6
