"""The registry: names, YAML paths, dicts, overrides, and clear errors for bad configs."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from torch import nn

import zoo
from zoo.flux import FluxParams
from zoo.registry import make_config

TINY = dict(zoo.get_config("tiny-flux").__dict__)


def test_list_models_has_the_flux_configs():
    assert {"flux-dev", "flux-schnell", "dit360", "tiny-flux"} <= set(zoo.list_models())


def test_build_by_name_path_dict_and_config_agree(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("arch: flux\n" + "".join(f"{k}: {v}\n" for k, v in TINY.items()))
    built = [zoo.build("tiny-flux"), zoo.build(str(path)), zoo.build({"arch": "flux", **TINY}),
             zoo.build(zoo.get_config("tiny-flux"))]
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in built]
    assert all(s == shapes[0] for s in shapes)


def test_overrides_device_and_dtype():
    m = zoo.build("tiny-flux", depth=1, guidance_embed=False, dtype=torch.float16)
    assert len(m.double_blocks) == 1 and m.guidance_in is None
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    assert {p.device.type for p in zoo.build("flux-dev", device="meta").parameters()} == {"meta"}


def test_unknown_field_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hiden_size'\] for arch 'flux'"):
        zoo.build({"arch": "flux", **TINY, "hiden_size": 64})


def test_missing_field_is_an_error_naming_it():
    fields = {k: v for k, v in TINY.items() if k != "num_heads"}
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['num_heads'\]"):
        zoo.get_config({"arch": "flux", **fields})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_heads": 5}, r"hidden_size 64 is not divisible by num_heads 5"),
        ({"axes_dim": [4, 4, 4]}, r"axes_dim \[4, 4, 4\] sums to 12; expected the head dim .* = 16"),
        ({"hidden_size": 0}, r"hidden_size must be a positive integer"),
    ],
)
def test_invalid_values_are_errors_naming_field_and_expectation(override, message):
    with pytest.raises(ValueError, match=message):
        zoo.build("tiny-flux", **override)


def test_unknown_names_and_archs_are_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean flux-dev"):
        zoo.build("flux-deb")
    with pytest.raises(ValueError, match="unknown arch 'fluxx'"):
        zoo.build({"arch": "fluxx"})
    with pytest.raises(ValueError, match="no 'arch' field"):
        zoo.build({"hidden_size": 3})
    with pytest.raises(FileNotFoundError):
        zoo.build(str(tmp_path / "missing.yaml"))


def test_ignored_fields_are_accepted_and_dropped():
    @dataclasses.dataclass
    class ToyConfig:
        width: int
        IGNORED_FIELDS: ClassVar[frozenset] = frozenset({"use_checkpoint"})

    @zoo.register("toy_registry_test", ToyConfig)
    class Toy(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.lin = nn.Linear(cfg.width, cfg.width)

    m = zoo.build({"arch": "toy_registry_test", "width": 3, "use_checkpoint": True})
    assert m.lin.weight.shape == (3, 3)
    assert make_config("toy_registry_test", {"width": 2}) == ToyConfig(2)
    assert isinstance(zoo.get_config("flux-dev"), FluxParams)
