"""`model.gradient_checkpointing(True)`: the same outputs and gradients as a plain forward/backward."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.conftest import randomize

SIZES = {"tiny-flux": 32, "tiny-unet": 32, "tiny-controlnet": 32, "tiny-sana": 64, "tiny-vae": 32}


def outputs_and_grads(model: torch.nn.Module, args, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    out = torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out.flatten()
    (out * torch.linspace(-1, 1, out.numel())).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", SIZES)
def test_checkpointing_changes_neither_outputs_nor_gradients(name):
    torch.manual_seed(0)
    model = randomize(zoo.build(name), std=0.1)
    args, kwargs = zoo.example_inputs(model, batch=2, height=SIZES[name], width=SIZES[name])
    plain_out, plain_grads = outputs_and_grads(model, args, kwargs)
    assert model.gradient_checkpointing(True) is model
    assert all(m.checkpointing for m in model.modules() if hasattr(m, "checkpointing"))
    ckpt_out, ckpt_grads = outputs_and_grads(model, args, kwargs)
    assert torch.equal(ckpt_out, plain_out)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for k, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[k], g, rtol=1e-6, atol=1e-6 * g.abs().max().item(), msg=k)


def test_checkpointing_saves_activation_memory_and_switches_off():
    model = randomize(zoo.build("tiny-flux"), std=0.1)
    args, kwargs = zoo.example_inputs(model, batch=1, height=64, width=64, txt_len=16)

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*args, **kwargs)
        return total

    plain = saved_bytes()
    checkpointed = saved_bytes() if model.gradient_checkpointing(True) else None
    assert checkpointed < 0.5 * plain
    model.gradient_checkpointing(False)
    assert saved_bytes() == plain
