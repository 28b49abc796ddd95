"""Gradient (activation) checkpointing per block, with torch's own non-reentrant `torch.utils.checkpoint`."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointed:
    """Mixin for a model whose forward runs its blocks through `self.run(block, ...)`.

    `model.gradient_checkpointing(True)` makes every such block keep only its inputs and recompute its
    activations in the backward pass; outputs and gradients are identical to running it plainly.
    """

    checkpointing: bool = False

    def gradient_checkpointing(self, enabled: bool = True) -> nn.Module:
        """Switch checkpointing on or off for this model and every checkpointed submodule; returns the model."""
        for m in self.modules():
            if isinstance(m, Checkpointed):
                m.checkpointing = bool(enabled)
        return self

    def run(self, block: Callable, *args, **kwargs):
        """block(*args, **kwargs), checkpointed when switched on and a backward pass is being recorded."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)
