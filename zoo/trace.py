"""Shape/channel tracing: every module's path, type, input and output shapes and parameter count, via forward hooks.

Works on `meta` tensors, so a full-size model traces with no weights: `zoo.trace(zoo.build("flux-dev", device="meta"),
*args)`. `str(trace)` is a table; `trace.rows` the records; `trace["double_blocks.0"]` one of them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def _shapes(x) -> list[tuple[int, ...]]:
    """Shapes of the tensors in a (nested) argument, in order."""
    if isinstance(x, Tensor):
        return [tuple(x.shape)]
    if isinstance(x, (list, tuple)):
        return [s for v in x for s in _shapes(v)]
    if isinstance(x, dict):
        return [s for v in x.values() for s in _shapes(v)]
    if hasattr(x, "__dataclass_fields__"):
        return [s for v in vars(x).values() for s in _shapes(v)]
    return []


@dataclass
class TraceRow:
    path: str
    type: str
    inputs: list[tuple[int, ...]]
    outputs: list[tuple[int, ...]]
    params: int
    input_names: list[str] = field(default_factory=list)  # the forward's argument names (the model's own row)


class Trace:
    """The rows of one traced forward, in call order (a module called twice appears twice)."""

    def __init__(self, rows: list[TraceRow], output):
        self.rows = rows
        self.output = output

    def __getitem__(self, path: str) -> TraceRow:
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(f"no traced module {path!r}")

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        def fmt(shapes, names=()):
            text = ["x".join(map(str, s)) or "scalar" for s in shapes]
            if len(names) == len(text):
                text = [f"{n}={t}" for n, t in zip(names, text)]
            return ", ".join(text) or "-"

        table = [("path", "type", "inputs", "outputs", "params")]
        table += [(r.path or "(model)", r.type, fmt(r.inputs, r.input_names), fmt(r.outputs), f"{r.params:,}")
                  for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in table]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def trace(model: nn.Module, *args, max_depth: int | None = None, **kwargs) -> Trace:
    """Run `model(*args, **kwargs)` under no_grad and record each module call (paths of <= `max_depth` parts)."""
    rows: list[TraceRow] = []
    open_rows: list[TraceRow] = []  # rows are made on entry (so parents precede children) and closed on exit
    handles = []

    def enter(path: str):
        def record(module, m_args, m_kwargs):
            n = sum(p.numel() for p in module.parameters())
            row = TraceRow(path, type(module).__name__, _shapes(m_args) + _shapes(m_kwargs), [], n)
            rows.append(row)
            open_rows.append(row)

        return record

    def leave(module, m_args, m_kwargs, output):
        open_rows.pop().outputs = _shapes(output)

    for path, module in model.named_modules():
        if max_depth is not None and path and path.count(".") >= max_depth:
            continue
        handles.append(module.register_forward_pre_hook(enter(path), with_kwargs=True))
        handles.append(module.register_forward_hook(leave, with_kwargs=True))
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if rows and rows[0].path == "":
        rows[0].input_names = _input_names(model, args, kwargs)
    return Trace(rows, output)


def _input_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """One name per input tensor of the model's call, in the order `_shapes` lists them (`y[1]` inside a list)."""
    params = list(inspect.signature(model.forward).parameters)
    names = []
    for name, value in [(params[i] if i < len(params) else f"arg{i}", a) for i, a in enumerate(args)] + \
            list(kwargs.items()):
        n = len(_shapes(value))
        names += [name] if n == 1 and isinstance(value, Tensor) else [f"{name}[{i}]" for i in range(n)]
    return names


def example_inputs(model: nn.Module, **kwargs) -> tuple[tuple, dict]:
    """Sensible inputs for a model's forward (per family: `model.example_inputs(batch=, height=, width=, ...)`)."""
    if not hasattr(model, "example_inputs"):
        raise TypeError(f"{type(model).__name__} has no example_inputs(); pass inputs to zoo.trace yourself")
    return model.example_inputs(**kwargs)
