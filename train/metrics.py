"""Training metrics: one JSON object per logged step appended to `metrics.jsonl`, mirrored to TensorBoard when
the `tensorboard` package is installed."""

from __future__ import annotations

import json
from pathlib import Path


class Metrics:
    """Appends {"step": ..., name: value, ...} lines; only the process with rank 0 writes."""

    def __init__(self, output_dir: str | Path | None, enabled: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl" if output_dir is not None and enabled else None
        self.tensorboard = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                pass
            else:
                self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, step: int, **values: float) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for k, v in values.items():
                self.tensorboard.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The logged rows of a run, in order."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]
