"""Memory planner: what one training step of a model config needs, before any weight exists.

Weights, gradients and optimizer state follow from the parameter count and `fit`'s rules (trained parameters kept
in fp32, frozen ones in the training dtype, AdamW's two fp32 moments). Activations are measured, not guessed: the
model is built on the `meta` device and one forward runs under `torch.autograd.graph.saved_tensors_hooks`, which
sees every tensor autograd keeps for the backward pass (counted once per storage, parameters excluded). The step's
peak comes from running that forward and its backward on meta while tracking, per op, the bytes of every storage
created and still alive (so gradients replacing freed activations, checkpoint recomputation and backward temporaries
are all in it). The meta tensors are wrapped as fake CPU tensors, so the CPU's kernel choices (fused attention) and
autocast apply; autocast's op lists are the CPU's, and CUDA's keep a few more ops (norms, softmax) in fp32, so a
GPU's half-precision activations come out somewhat higher than planned.

    python -m train memory scribble-unet --batch 2 --size 256 --dtype fp16 --checkpointing
    python -m train memory flux-dev --size 512 --dtype bf16 --checkpointing --lora omnix --rank 16
"""

from __future__ import annotations

import argparse
import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora
import zoo

from .trainable import select_trainable

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1, "none": 0}  # fp32 tensors per trained parameter (SGD: momentum)


@dataclass
class MemoryPlan:
    """Bytes of one training step. `peak` = weights + optimizer state + batch + the step's largest live set."""

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    setting: str = ""

    def __str__(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("saved activations", self.activations), ("peak of a step", self.peak)]
        head = (f"{self.setting}\nparameters {self.parameters:,} ({self.trainable:,} trained)\n"
                if self.setting else "")
        return head + "\n".join(f"  {name:<18} {_human(n):>10}" for name, n in rows)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops since entering that are still alive, and their maximum (`peak`).
    `existing`: tensors made before (parameters, the batch), whose views are no new memory."""

    def __init__(self, existing: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # one id per storage while it lives; views share it
        if key in self._tracked or key in self._existing:
            return
        n = storage.nbytes()
        self._tracked.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._tracked.discard(key)
        self.live -= n


def saved_bytes(run, exclude: Sequence[Tensor] = ()) -> tuple[Any, int]:
    """(run(), bytes autograd saved for backward during it), each storage once, `exclude`'s storages (the
    parameters) not counted."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def plan(
    model: Any,
    *,
    batch: int = 1,
    size: int | tuple[int, int] = 512,
    dtype: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool = False,
    trainable: Sequence[str] | None = None,
    lora_targets: str | Sequence[str] | None = None,
    lora_rank: int = 16,
    lora_conv_rank: int | None = None,
    **overrides: Any,
) -> MemoryPlan:
    """Plan one `fit` step of `model` (a zoo config name, YAML path, dict or config, built on meta with `overrides`)
    on a batch of `batch` images of `size` pixels (int or (height, width)), inputs from `model.example_inputs`.

    `dtype`: fp32, or bf16/fp16 autocast with frozen weights stored in that dtype; `optimizer`: adamw, sgd
    (momentum) or none; `trainable`: partial module names as in `fit` (default everything, or every adapter).
    `lora_targets` (a `lora` preset or globs): inject adapters of `lora_rank` (`lora_conv_rank` on k x k convs) first,
    so that the adapters train and the base is frozen.
    """
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be one of {list(PRECISIONS)}, got {dtype!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_STATES)}, got {optimizer!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    height, width = (size, size) if isinstance(size, int) else size
    net = zoo.build(model, device="meta", **overrides)
    if not hasattr(net, "example_inputs"):
        raise TypeError(f"{type(net).__name__} has no example_inputs(); the planner cannot make its batch")
    if checkpointing:
        if not hasattr(net, "gradient_checkpointing"):
            raise ValueError(f"{type(net).__name__} has no gradient_checkpointing switch")
        net.gradient_checkpointing(True)
    if lora_targets is not None:
        lora.inject(net, lora_targets, rank=lora_rank, conv_rank=lora_conv_rank, dtype=torch.float32)
    names = set(select_trainable(net, trainable))
    half = PRECISIONS[dtype]
    if half is not None:  # frozen weights in the training dtype, as a half-precision base is stored
        for n, p in net.named_parameters():
            if n not in names and p.is_floating_point():
                p.data = p.data.to(half)

    with _fake_cpu():
        # fake CPU tensors (meta underneath): CPU kernel choices (fused attention) and CPU autocast apply
        net = net.to_empty(device="cpu")
        params = [p for _, p in net.named_parameters()]
        args, kwargs = net.example_inputs(batch=batch, height=height, width=width, device=params[0].device)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        autocast = (torch.autocast("cpu", dtype=half) if half is not None else contextlib.nullcontext())
        live = LiveBytes(existing=params + [b for b in net.buffers()] + inputs)
        with live:
            with autocast:
                out, activations = saved_bytes(lambda: net(*args, **kwargs), exclude=params)
            loss = sum(o.float().square().mean() for o in tree_leaves(out) if isinstance(o, Tensor))
            del out
            loss.backward()

    trained = [p for n, p in net.named_parameters() if n in names]
    n_trained = sum(p.numel() for p in trained)
    weights = sum(_nbytes(p) if n not in names else 4 * p.numel() for n, p in net.named_parameters())
    gradients = 4 * n_trained
    states = 4 * n_trained * OPTIMIZER_STATES[optimizer] + (4 * len(trained) if optimizer == "adamw" else 0)
    peak = weights + states + sum(_nbytes(t) for t in inputs) + live.peak
    setting = (f"{model if isinstance(model, str) else type(net).__name__}: batch {batch}, {height}x{width} px, "
               f"{dtype}, {optimizer}, checkpointing {'on' if checkpointing else 'off'}")
    return MemoryPlan(sum(p.numel() for p in params), n_trained, weights, gradients, states, activations, peak,
                      setting)


def _fake_cpu():
    from torch._subclasses.fake_tensor import FakeTensorMode  # imported here: it takes seconds

    return FakeTensorMode(allow_non_fake_inputs=True)


def _parse_bytes(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    if not num or t[len(num):] not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GB, 512MB)")
    return int(float(num) * units[t[len(num):]])


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants key=value, got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train memory", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="zoo config name or YAML path (e.g. scribble-unet)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--dtype", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="adamw")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing per block")
    p.add_argument("--trainable", nargs="+", default=None, help="partial module names that train (default all)")
    p.add_argument("--lora", nargs="+", default=None, metavar="TARGET", help="LoRA preset or globs (e.g. omnix)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--conv-rank", type=int, default=None, help="LoRA rank of k x k convs")
    p.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model_channels=128")
    p.add_argument("--budget", type=_parse_bytes, default=None, help="memory to fit in, e.g. 4GB")
    a = p.parse_args(argv)
    result = plan(a.config, batch=a.batch, size=a.size, dtype=a.dtype, optimizer=a.optimizer,
                  checkpointing=a.checkpointing, trainable=a.trainable,
                  lora_targets=None if a.lora is None else a.lora[0] if len(a.lora) == 1 else a.lora,
                  lora_rank=a.rank, lora_conv_rank=a.conv_rank, **dict(a.set))
    print(result)
    if a.budget is not None:
        fits = result.peak <= a.budget
        print(f"{'fits' if fits else 'does not fit'} in {_human(a.budget)} "
              f"({100 * result.peak / a.budget:.0f}% of it, before the framework's own overhead)")
        return 0 if fits else 1
    return 0


__all__ = ["LiveBytes", "MemoryPlan", "main", "plan", "saved_bytes"]
