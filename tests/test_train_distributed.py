"""train.fit under torchrun on CPU (gloo, 2 processes spawned here): DDP and FSDP2 equal one process on the same
global batch, and a sharded checkpoint written by 2 processes resumes in 1."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys

import torch
import torch.distributed as dist

import train
import zoo
from tests.conftest import randomize
from train.forwards import flux_forward


def run(mode, out=None, steps=6, resume=None, save_every=None):
    torch.manual_seed(0)
    model = randomize(zoo.build("tiny-flux"), seed=3, std=0.05)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 4, 4, generator=g), {"txt": torch.randn(3, 48, generator=g),
                                                 "y": torch.randn(32, generator=g)}) for _ in range(16)]
    objective = train.flow_matching(cond_drop=0.2)
    # adam_eps 1e-6: with the default 1e-8, entries whose gradient is ~0 turn float summation-order noise (the
    # 2-process batch is reduced in another order) into lr-sized steps; the losses agree either way
    result = train.fit(model, objective, data, batch_size=4, steps=steps, lr=1e-3, warmup=2, lr_schedule="cosine",
                       forward=flux_forward, accumulate=2, clip_grad_norm=1.0, ema_decay=0.9, seed=7, parallel=mode,
                       adam_eps=1e-6, output_dir=out, save_every=save_every, resume=resume, progress=False)
    return model, result


def full(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


if __name__ == "__main__":
    out = sys.argv[1]
    for mode in ("ddp", "fsdp"):
        model, result = run(mode, f"{out}/{mode}", save_every=3)
        params = full(model)
        if dist.get_rank() == 0:
            torch.save({"params": params, "losses": result.losses}, f"{out}/{mode}.pt")
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_ddp_and_fsdp2_equal_one_process_and_a_sharded_checkpoint_resumes_in_one(tmp_path):
    (tmp_path / "dist_run.py").write_text(textwrap.dedent(SCRIPT))
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "dist_run.py"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import dist_run
    finally:
        sys.path.remove(str(tmp_path))
    single_model, single = dist_run.run("none")
    reference = dist_run.full(single_model)
    for mode in ("ddp", "fsdp"):
        got = torch.load(tmp_path / "out" / f"{mode}.pt", weights_only=True)
        assert max(abs(a - b) / abs(b) for a, b in zip(got["losses"], single.losses)) < 1e-5, mode
        errors = {n: _rel(got["params"][n], p) for n, p in reference.items()}
        assert max(errors.values()) < 1e-5, (mode, max(errors.items(), key=lambda kv: kv[1]))
    sharded = tmp_path / "out" / "fsdp" / "checkpoint-0000003.dcp"
    assert (sharded / "train.json").is_file() and (tmp_path / "out" / "fsdp" / "checkpoint-0000006.dcp").is_dir()
    resumed_model, resumed = dist_run.run("none", tmp_path / "resumed", resume=sharded)  # steps 4..6, one process
    assert max(abs(a - b) / abs(b) for a, b in zip(resumed.losses, single.losses[3:])) < 1e-5
    assert len(resumed.losses) == 3
    for n, p in reference.items():
        assert _rel(resumed_model.state_dict()[n], p) < 1e-5, n
