"""Ms. Pac-Man data: seeded reproducible collection, the compact file (atomic, checked), windows inside episodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.data import atari

pytest.importorskip("ale_py")


@pytest.fixture(scope="module")
def episodes() -> atari.Episodes:
    return atari.collect(160, seed=3, max_episode_frames=50)


def test_collection_is_reproducible_under_its_seed(episodes):
    again = atari.collect(160, seed=3, max_episode_frames=50)
    assert np.array_equal(episodes.frames, again.frames) and np.array_equal(episodes.actions, again.actions)
    other = atari.collect(40, seed=4, max_episode_frames=50)
    assert not np.array_equal(episodes.actions[:40], other.actions)
    assert episodes.frames.shape == (160, 64, 64, 3) and episodes.frames.dtype == np.uint8
    assert episodes.starts.tolist() == [0, 50, 100, 150] and episodes.num_actions == 9
    assert (episodes.actions[episodes.ends - 1] == -1).all()
    inside = np.ones(160, bool)
    inside[episodes.ends - 1] = False
    assert ((episodes.actions[inside] >= 0) & (episodes.actions[inside] < 9)).all()
    assert np.abs(np.diff(episodes.frames[60:100].astype(int), axis=0)).max() > 0  # the game moves


def test_sticky_policy_repeats_actions_more_than_random(episodes):
    rand = atari.collect(60, seed=3, policy="random", max_episode_frames=50)

    def repeats(e):
        a = e.actions[e.actions >= 0]
        return (a[1:] == a[:-1]).mean()

    assert repeats(episodes) > repeats(rand) + 0.3
    with pytest.raises(ValueError, match="policy='greedy'"):
        atari.collect(10, policy="greedy")


def test_file_round_trip_is_exact_and_atomic(episodes, tmp_path):
    path = atari.save(episodes, tmp_path / "pac.npz")
    back = atari.load(path)
    for name in ("frames", "actions", "starts"):
        assert np.array_equal(getattr(back, name), getattr(episodes, name))
    assert (back.seed, back.game, back.policy, back.num_actions) == (3, atari.GAME, "sticky", 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pac.npz"]  # no temporary file left
    with pytest.raises(ValueError, match="must end in .npz"):
        atari.save(episodes, tmp_path / "pac.safetensors")
    np.savez(tmp_path / "other.npz", frames=episodes.frames)
    with pytest.raises(ValueError, match="not a zoo-atari-1 dataset file"):
        atari.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        atari.load(tmp_path / "missing.npz")


def test_windows_never_cross_an_episode_boundary(episodes):
    # frames that encode their own index, so each window shows exactly which frames it took
    n = len(episodes)
    coded = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], 3, axis=-1).repeat(4, 1).repeat(4, 2)
    ep = atari.Episodes(coded, episodes.actions, episodes.starts, 0)
    k = 4
    data = atari.Windows(ep, history=k)
    assert len(data) == sum(e - s - k for s, e in zip(ep.starts, ep.ends))
    episode_of = np.searchsorted(ep.starts, np.arange(n), side="right") - 1
    seen = set()
    for i in range(len(data)):
        frames, actions = data[i]
        idx = ((frames[:, 0, 0, 0] + 1) * 127.5).round().long().numpy()
        assert frames.shape == (k + 1, 3, 4, 4) and actions.shape == (k,) and actions.dtype == torch.int64
        assert np.array_equal(idx, np.arange(idx[0], idx[0] + k + 1))  # consecutive
        assert len(set(episode_of[idx])) == 1  # one episode
        assert (actions >= 0).all() and torch.equal(actions, torch.from_numpy(ep.actions[idx[0]:idx[0] + k]))
        seen.add(int(idx[0]))
    # every window that fits is there: the last frame of each episode is some window's next frame
    assert all(e - k - 1 in seen for e in ep.ends)
    with pytest.raises(ValueError, match="no episode is longer than history=60"):
        atari.Windows(ep, history=60)


def test_split_keeps_whole_episodes(episodes):
    first, rest = episodes.split(0.7)
    assert len(first) + len(rest) == len(episodes)
    assert first.starts.tolist() == [0, 50, 100] and rest.starts.tolist() == [0]
    assert np.array_equal(rest.frames, episodes.frames[150:])


def test_bad_episode_arrays_are_named():
    frames = np.zeros((10, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"actions has shape \(9,\), expected \(10,\)"):
        atari.Episodes(frames, np.full(9, -1), np.array([0]), 0)
    with pytest.raises(ValueError, match="last frame must have action -1"):
        atari.Episodes(frames, np.zeros(10, np.int64), np.array([0]), 0)
    with pytest.raises(ValueError, match=r"frames must be \(N, H, W, 3\) uint8"):
        atari.Episodes(frames.astype(np.float32), np.full(10, -1), np.array([0]), 0)
