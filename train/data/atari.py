"""Atari frames for world models: seeded episode collection with the Arcade Learning Environment, one compact file,
and (history, actions, next frame) windows that never cross an episode boundary.

    episodes = collect(4000, seed=0)                   # Ms. Pac-Man, sticky-random policy, 64 x 64 RGB frames
    save(episodes, "pacman.npz"); episodes = load("pacman.npz")
    train, held_out = episodes.split(0.9)              # whole episodes on each side
    data = Windows(train, history=4)                   # data[i] = (frames (k+1, 3, H, W) in [-1, 1], actions (k,))

Needs the `[games]` extra (gymnasium, ale-py; ale-py ships the Ms. Pac-Man ROM). Step i records the observation
frame i and the action taken in it, which leads to frame i + 1; an episode's last frame has no action (-1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from checkpoints_convert import atomic_path

GAME = "ALE/MsPacman-v5"
POLICIES = ("random", "sticky")
FORMAT = "zoo-atari-1"


@dataclass
class Episodes:
    """Frames of consecutive episodes: frames (N, H, W, 3) uint8, actions (N,) int64 (-1 on an episode's last
    frame), starts (E,) int64 index of each episode's first frame, plus how they were collected."""

    frames: np.ndarray
    actions: np.ndarray
    starts: np.ndarray
    seed: int
    game: str = GAME
    policy: str = "sticky"
    num_actions: int = 9

    def __post_init__(self):
        n = len(self.frames)
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}")
        if self.actions.shape != (n,):
            raise ValueError(f"actions has shape {self.actions.shape}, expected ({n},) (one per frame)")
        starts = self.starts
        if starts.ndim != 1 or not len(starts) or starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= n:
            raise ValueError(f"starts must be increasing frame indices from 0 below {n}, got {starts[:8]}...")
        if (self.actions[self.ends - 1] != -1).any():
            raise ValueError("each episode's last frame must have action -1 (no next frame)")

    @property
    def ends(self) -> np.ndarray:
        """(E,) one past each episode's last frame."""
        return np.append(self.starts[1:], len(self.frames))

    def __len__(self) -> int:
        return len(self.frames)

    def episode(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        s, t = self.starts[e], self.ends[e]
        return self.frames[s:t], self.actions[s:t]

    def select(self, episodes: list[int]) -> Episodes:
        """The given episodes, in that order, as a new Episodes."""
        parts = [self.episode(e) for e in episodes]
        if not parts:
            raise ValueError("select needs at least one episode")
        lengths = np.array([len(f) for f, _ in parts])
        return Episodes(np.concatenate([f for f, _ in parts]), np.concatenate([a for _, a in parts]),
                        np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), self.seed, self.game,
                        self.policy, self.num_actions)

    def split(self, fraction: float) -> tuple[Episodes, Episodes]:
        """(first episodes, the rest): whole episodes, about `fraction` of the frames first; at least one each."""
        if len(self.starts) < 2:
            raise ValueError("splitting needs at least 2 episodes; collect more frames or shorter episodes")
        cut = int(np.searchsorted(self.starts, fraction * len(self.frames)))
        cut = min(max(cut, 1), len(self.starts) - 1)
        return self.select(list(range(cut))), self.select(list(range(cut, len(self.starts))))


def _make_env(game: str):
    try:
        import ale_py
        import gymnasium as gym
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Atari collection needs the games extra: pip install '.[games]' (gymnasium, ale-py)") from e
    gym.register_envs(ale_py)
    return gym.make(game)


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))


def collect(frames: int, *, seed: int = 0, policy: str = "sticky", stickiness: float = 0.8, size: int = 64,
            max_episode_frames: int | None = 500, game: str = GAME, progress: bool = False) -> Episodes:
    """Play `frames` frames of `game` (all of them kept, episodes cut at `max_episode_frames`), the same ones for the
    same arguments. `policy`: "random" draws every action uniformly; "sticky" keeps the last action with
    probability `stickiness` (the agent then runs along corridors instead of jittering)."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}; expected one of {POLICIES}")
    if frames < 2 or size < 8 or not 0.0 <= stickiness < 1.0:
        raise ValueError(f"need frames >= 2, size >= 8, 0 <= stickiness < 1; got {frames}, {size}, {stickiness}")
    if max_episode_frames is not None and max_episode_frames < 2:
        raise ValueError(f"max_episode_frames must be >= 2 or None, got {max_episode_frames}")
    env = _make_env(game)
    rng = np.random.default_rng(seed)
    num_actions = int(env.action_space.n)
    out = np.empty((frames, size, size, 3), np.uint8)
    actions = np.full(frames, -1, np.int64)
    starts, action = [0], 0
    obs, _ = env.reset(seed=seed)  # seeds the emulator (its sticky actions) once; later resets continue from it
    from tqdm.auto import tqdm

    for i in tqdm(range(frames), desc=f"collect {game}", unit="frame", disable=None if progress else True):
        out[i] = _resize(obs, size)
        if i == frames - 1:
            break
        if policy == "random" or rng.random() >= stickiness:
            action = int(rng.integers(num_actions))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated or (max_episode_frames and i + 1 - starts[-1] >= max_episode_frames):
            obs, _ = env.reset()
            starts.append(i + 1)  # frame i ended its episode: it keeps action -1
        else:
            actions[i] = action
    env.close()
    if starts[-1] == frames - 1:  # a one-frame tail episode holds no transition
        starts.pop()
        out, actions = out[:-1], actions[:-1]
    return Episodes(out, actions, np.array(starts, np.int64), seed, game, policy, num_actions)


def save(episodes: Episodes, path: str | Path) -> Path:
    """Write one compressed .npz (frames, actions, starts, seed, game, policy, num_actions) atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"the dataset file must end in .npz, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, format=FORMAT, frames=episodes.frames, actions=episodes.actions,
                            starts=episodes.starts, seed=episodes.seed, game=episodes.game, policy=episodes.policy,
                            num_actions=episodes.num_actions)
    return path


def load(path: str | Path) -> Episodes:
    """Read a file written by `save` (checked: a clear error names what is missing or inconsistent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        keys = ("format", "frames", "actions", "starts", "seed", "game", "policy", "num_actions")
        missing = [k for k in keys if k not in f.files]
        if missing or str(f["format"]) != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} dataset file (missing {missing or 'the format tag'})")
        return Episodes(f["frames"], f["actions"].astype(np.int64), f["starts"].astype(np.int64), int(f["seed"]),
                        str(f["game"]), str(f["policy"]), int(f["num_actions"]))


def to_model(frames: np.ndarray | Tensor) -> Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames))
    return x.movedim(-1, -3).float() / 127.5 - 1.0


class Windows:
    """Map-style dataset of every window (k history frames, their k actions, the next frame) inside one episode:
    item i = (frames (k+1, 3, H, W) float in [-1, 1], oldest first and the next frame last; actions (k,) int64)."""

    def __init__(self, episodes: Episodes, history: int):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.episodes, self.history = episodes, history
        # window starts s with s + history <= the episode's last frame index
        self.index = np.concatenate([np.arange(s, e - history) for s, e in zip(episodes.starts, episodes.ends)]
                                    or [np.zeros(0, np.int64)]).astype(np.int64)
        if not len(self.index):
            raise ValueError(f"no episode is longer than history={history} frames")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s, k = int(self.index[i]), self.history
        return to_model(self.episodes.frames[s : s + k + 1]), torch.from_numpy(self.episodes.actions[s : s + k].copy())


__all__ = ["GAME", "Episodes", "Windows", "collect", "load", "save", "to_model"]
