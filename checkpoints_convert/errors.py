"""The errors of checkpoints_convert (a module of its own so io and detect need not import each other)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A file that is not a readable, safe checkpoint (corrupt, truncated, unsafe pickle, ...); says why."""


class DetectError(CheckpointError):
    """No known family matches: the message lists the nearest ones and what they missed."""
