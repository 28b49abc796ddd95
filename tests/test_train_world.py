"""World-model rollout (shapes, errors, determinism, PNG strip / GIF) and training: a tiny model overfits 8 real
Ms. Pac-Man windows and then beats copy-last-frame on them."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import randomize
from test_world_model import one_thread  # noqa: F401  (autouse: one thread for tiny tensors)

import zoo
from pipelines.world_model import psnr, rollout, save_gif, save_strip

pytest.importorskip("ale_py")


def test_rollout_shapes_determinism_and_guidance():
    model = randomize(zoo.build("tiny-world-model"), seed=0, std=0.05)
    first = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    actions = torch.randint(0, 5, (2, 2 + 3 - 1))  # k + n - 1 actions for n = 3 frames
    a = rollout(model, first, actions, steps=3, seed=0, progress=False)
    assert a.shape == (2, 3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, rollout(model, first, actions, steps=3, seed=0, progress=False))
    assert not torch.equal(a, rollout(model, first, actions, steps=3, seed=1, progress=False))
    one_hot = torch.nn.functional.one_hot(actions, 5).float()
    assert torch.allclose(a, rollout(model, first, one_hot, steps=3, seed=0, progress=False), atol=1e-5)
    guided = rollout(model, first, actions, steps=3, seed=0, guidance=2.0, progress=False)
    assert guided.shape == a.shape and not torch.equal(guided, a)


def test_rollout_bad_inputs_are_named():
    model = zoo.build("tiny-world-model")
    first = torch.zeros(1, 2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"first_frames has shape \(1, 3, 16, 16\), expected \(B, 2, 3, H, W\)"):
        rollout(model, first[:, 0], torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"actions has shape \(1, 1\), expected \(1, 2 \+ n - 1\)"):
        rollout(model, first, torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance must be >= 1"):
        rollout(model, first, torch.zeros(1, 2, dtype=torch.long), guidance=0.5)


def test_strip_and_gif_files(tmp_path):
    from PIL import Image

    rows = [torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1]
    png = save_strip(tmp_path / "strip.png", rows, gap=2, scale=2)
    assert Image.open(png).size == (2 * (4 * 18 - 2), 2 * (2 * 18 - 2))
    gif = Image.open(save_gif(tmp_path / "roll.gif", rows[0]))
    assert gif.n_frames == 4 and gif.size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roll.gif", "strip.png"]
    with pytest.raises(ValueError, match="writes .png"):
        save_strip(tmp_path / "strip.jpg", rows)


def test_tiny_model_overfits_8_windows_and_beats_copy_last_frame():
    from train import world
    from train.data import atari

    # 8 windows of the start-up pause, where the ghosts blink with a period of 4 frames: history k = 4 sees it
    episodes = atari.collect(40, seed=0, size=16, max_episode_frames=None)
    windows = atari.Windows(episodes, history=4)
    data = [windows[i] for i in range(10, 34, 3)]
    torch.manual_seed(0)
    model = zoo.build("tiny-world-model", history=4, num_actions=9, target="delta", target_scale=20.0,
                      prediction="x0", history_noise=0.0)
    tic = time.perf_counter()
    result = world.train(model, data, steps=500, batch_size=8, lr=5e-3, action_drop=0.0, shift=3.0, warmup=10,
                         progress=False)
    assert time.perf_counter() - tic <= 60
    assert sum(result.losses[-10:]) < 0.3 * sum(result.losses[:10])
    model_psnr, copy_psnr = world.next_frame_psnr(model, data, list(range(8)), steps=4, shift=3.0)
    assert model_psnr > copy_psnr + 0.5, (model_psnr, copy_psnr)
    frames, _ = data[0]
    assert psnr(frames[-1:], frames[-1:]) == float("inf")


def test_main_job_end_to_end_at_toy_size(tmp_path, capsys):
    import yaml

    from train import world

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({"arch": "world_model", **{**vars(zoo.get_config("tiny-world-model")),
                                                                 "num_actions": 9, "target": "delta"}}))
    out = tmp_path / "run"
    args = ["--out", str(out), "--config", str(config), "--frames", "120", "--episode-frames", "60", "--size", "16",
            "--steps", "2", "--batch", "4", "--eval-windows", "4", "--rollout", "3", "--starts", "1",
            "--sample-steps", "2", "--no-progress"]
    assert world.main(args) == 0
    assert {"pacman.npz", "loss.png", "rollout.png", "rollout.gif", "summary.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["eval_windows"] == 4 and summary["psnr_copy_last_frame"] > 0 and summary["steps"] == 2
    assert "copy-last-frame" in capsys.readouterr().out
    with pytest.raises(ValueError, match="the data has 9 actions, the model config 5"):
        world.main(["--out", str(out), "--config", "tiny-world-model", "--no-progress"])
