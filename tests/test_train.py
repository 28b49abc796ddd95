"""train.fit: learning is real, exact resume in a new process, trainable sets (LoRA, partial names), checkpoint
errors, mixed precision and metrics."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lora
import samplers
import train
import zoo
from tests.conftest import randomize

ROOT = Path(__file__).resolve().parents[1]


class VelocityMLP(nn.Module):
    """A small time-conditioned MLP: the tiny model of the learning test."""

    def __init__(self, dim: int = 8, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def test_learning_is_real_flow_matching_reaches_near_the_analytic_minimum_and_samples_match_the_data():
    torch.manual_seed(0)
    mu, sd = torch.linspace(-1, 2, 8), torch.linspace(0.3, 1.0, 8)
    data = list(mu + sd * torch.randn(4096, 8, generator=torch.Generator().manual_seed(1)))
    model = VelocityMLP()
    result = train.fit(model, train.flow_matching(timesteps=train.Uniform()), data, batch_size=256, steps=600,
                       lr=3e-3, warmup=20, lr_schedule="cosine", progress=False)
    # the best possible loss for independent Gaussian coordinates: E_t mean_d s_d^2 / ((1 - t)^2 s_d^2 + t^2)
    t = torch.linspace(0, 1, 20001)[:, None]
    minimum = (sd**2 / ((1 - t) ** 2 * sd**2 + t**2)).mean().item()  # about 1.09
    start, end = sum(result.losses[:10]) / 10, sum(result.losses[-100:]) / 100
    # measured (torch 2.13, CPU): start 2.815 (mean of the first 10 steps), end 1.105 (last 100), minimum 1.021
    assert start > 2.5 and end < minimum + 0.1, (start, end, minimum)
    with torch.no_grad():
        noise = torch.randn(4000, 8, generator=torch.Generator().manual_seed(5))
        x = samplers.sample(model, noise, sampler="euler", steps=50, schedule=samplers.FlowSchedule())
    assert (x.mean(0) - mu).abs().max() < 0.1, x.mean(0)
    assert ((x.std(0) - sd).abs() / sd).max() < 0.1, x.std(0)


RESUME_SCRIPT = """
import sys, torch, train, zoo
from tests.conftest import randomize

def run(steps, out, resume=None, stop_at=None):
    torch.manual_seed(0)
    model = randomize(zoo.build("tiny-unet"), seed=3, std=0.05)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 8, 8, generator=g), {"context": torch.randn(3, 32, generator=g)}) for _ in range(24)]
    objective = train.noise_prediction(samplers.VPSchedule(prediction="v"), min_snr_gamma=5.0, cond_drop=0.2)
    return model, train.fit(model, objective, data, batch_size=4, steps=steps, lr=1e-3, warmup=3,
                            lr_schedule="cosine", accumulate=2, clip_grad_norm=1.0, ema_decay=0.9, seed=7,
                            output_dir=out, save_every=5, resume=resume, progress=False, weight_decay=0.01,
                            stop_at=stop_at)

import samplers
if __name__ == "__main__":
    model, result = run(10, sys.argv[1], resume=sys.argv[2])
    torch.save({"params": dict(model.state_dict()), "ema": result.ema.shadow, "losses": result.losses},
               sys.argv[3])
"""


def test_resume_is_exact_across_processes(tmp_path):
    """10 steps straight == 5 steps, save, new process, resume, 5 steps: every parameter bit-identical."""
    script = tmp_path / "resume_run.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT))
    sys.path.insert(0, str(tmp_path))
    try:
        import resume_run
    finally:
        sys.path.remove(str(tmp_path))
    straight_model, straight = resume_run.run(10, tmp_path / "straight")
    _, half = resume_run.run(10, tmp_path / "split", stop_at=5)
    ckpt = tmp_path / "split" / "checkpoint-0000005.safetensors"
    assert half.checkpoint == ckpt and ckpt.is_file()
    out = tmp_path / "resumed.pt"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "split"), "latest", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(out, weights_only=True)
    assert resumed["losses"] == straight.losses[5:]
    for name, p in straight_model.state_dict().items():
        assert torch.equal(resumed["params"][name], p), name
    for name, s in straight.ema.shadow.items():
        assert torch.equal(resumed["ema"][name], s), name
    rows = train.read_metrics(tmp_path / "split")
    assert [r["step"] for r in rows] == list(range(1, 11))  # the resumed run appends steps 6..10


def test_checkpoint_of_another_model_or_a_truncated_file_is_a_clear_error(tmp_path):
    data = list(torch.randn(4, 8))
    objective = train.flow_matching()
    train.fit(VelocityMLP(), objective, data, batch_size=2, steps=2, lr=1e-3, output_dir=tmp_path / "a", progress=False)
    ckpt = tmp_path / "a" / "checkpoint-0000002.safetensors"
    with pytest.raises(train.ResumeError, match="written for a VelocityMLP with 6 trained tensors.*hidden|shape"):
        train.fit(VelocityMLP(hidden=32), objective, data, batch_size=2, steps=4, lr=1e-3, resume=ckpt,
                  progress=False)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(train.ResumeError, match="truncated"):
        train.fit(VelocityMLP(), objective, data, batch_size=2, steps=4, lr=1e-3, resume=truncated, progress=False)
    from checkpoints_convert import save_file

    weights = save_file(VelocityMLP().state_dict(), tmp_path / "weights.safetensors")
    with pytest.raises(train.ResumeError, match="not a train.fit checkpoint"):
        train.fit(VelocityMLP(), objective, data, batch_size=2, steps=4, lr=1e-3, resume=weights, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.fit(VelocityMLP(), objective, data, batch_size=2, steps=4, lr=1e-3, resume="latest",
                  output_dir=tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="precision"):
        train.fit(VelocityMLP(), objective, data, batch_size=2, steps=1, lr=1e-3, precision="fp8", progress=False)


def test_partial_name_selection_lists_exactly_the_matching_modules():
    model = zoo.build("tiny-unet")
    names = train.select_trainable(model, ["attn1", "ff.net"])
    expected = [n for n, _ in model.named_parameters() if ".attn1." in n or ".ff.net." in n]
    assert names == expected and len(names) > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected
    with pytest.raises(ValueError, match="matches no module"):
        train.select_trainable(model, ["no_such_block"])


def test_lora_only_training_changes_only_adapter_tensors():
    model = zoo.build("tiny-unet")
    lora.inject(model, ["*attn1.to_q", "*attn1.to_v", "*ff.net.2", "*proj_in"], rank=2)
    randomize(model, seed=1, std=0.1)  # adapters too: a zero B would leave A's first gradients at zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 8, 8, generator=g), {"context": torch.randn(3, 32, generator=g)}) for _ in range(4)]
    result = train.fit(model, train.noise_prediction(), data, batch_size=2, steps=3, lr=1e-2,
                       trainable=["attn1", "ff.net"], progress=False)
    assert result.trainable and all(".lora_" in n for n in result.trainable)
    assert not any("proj_in" in n for n in result.trainable)  # adapters outside the partial names stay frozen
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (n in result.trainable), n


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_frozen_weights_in_storage_dtype(precision, tmp_path):
    model = randomize(VelocityMLP(), seed=0)
    model.net[0].to(torch.bfloat16)  # a frozen layer in half storage
    data = list(torch.randn(8, 8))
    result = train.fit(model, train.flow_matching(), data, batch_size=4, steps=3, lr=1e-3, precision=precision,
                       trainable=["net.2", "net.4"], output_dir=tmp_path, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert model.net[0].weight.dtype == torch.bfloat16 and model.net[2].weight.dtype == torch.float32
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("loss" in r and "lr" in r for r in rows)
