"""Training recipes: a YAML file names the system, its parts, the data and `fit`'s arguments.

    python -m train scribble.yaml data.root=my/pairs fit.steps=500      (or a shipped recipe by name: scribble)

Shipped recipes (configs/recipes/): `scribble` (a 160-channel UNet + hint encoder from scratch, DDIM cosine eps
objective, fp16 + checkpointing + accumulation), `lbm-lora` (LoRA with rank / conv_rank on a UNet, the LBM bridge
objective, partial-name trainable adapters), `flux-lora` (rank-16 LoRA on Flux's 95 `omnix` layers, flow matching).
Overrides are `dotted.key=value`, the value read as YAML (`fit.lr=3e-5`, `lora.targets=[a, b]`). The systems
themselves (what is encoded, which model function, what is saved) are in `train/systems.py`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

import configs

RECIPE_DIR = Path(configs.__file__).resolve().parent / "recipes"  # installed with the configs package
SECTIONS = ("recipe", "seed", "device", "data", "models", "objective", "lora", "fit", "preview", "text")


def shipped() -> list[str]:
    """Names of the recipes in configs/recipes/."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def read_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A recipe dict from a YAML path or a shipped recipe name."""
    path = Path(name_or_path)
    if not path.is_file():
        candidate = RECIPE_DIR / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise FileNotFoundError(f"no recipe file {str(name_or_path)!r} and no shipped recipe of that name; "
                                    f"shipped: {shipped()}")
        path = candidate
    recipe = yaml.safe_load(path.read_text())
    if not isinstance(recipe, dict) or "recipe" not in recipe:
        raise ValueError(f"{path}: a recipe is a YAML mapping with a `recipe:` key naming the system")
    return recipe


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `recipe` with every `dotted.key=value` set (value parsed as YAML); an unknown top-level section
    is an error, deeper keys may be new."""
    out = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {parts[0]!r}; sections: {list(SECTIONS)}")
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = _value(text)
    return out


def _value(text: str) -> Any:
    """YAML, except that a number YAML 1.1 reads as a string (3e-5: no dot) is the number."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def run(recipe: dict[str, Any]):
    """Build the recipe's system and train it; returns `fit`'s FitResult."""
    from . import systems

    name = recipe.get("recipe")
    if name not in systems.SYSTEMS:
        raise ValueError(f"recipe: {name!r} is not a system; systems: {sorted(systems.SYSTEMS)}")
    torch.manual_seed(int(recipe.get("seed", 0)))  # fresh weights and LoRA factors: the same in every run
    return systems.SYSTEMS[name](recipe)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\nshipped recipes: {', '.join(shipped())}")
        return 0 if argv else 2
    try:
        recipe = apply_overrides(read_recipe(argv[0]), argv[1:])
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m train: {e}", file=sys.stderr)
        return 2
    try:
        result = run(recipe)
    except (FileNotFoundError, ValueError) as e:  # a recipe mistake (paths, keys, data): one line, no traceback
        print(f"python -m train {argv[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    where = f", last checkpoint {result.checkpoint}" if result.checkpoint else ""
    print(f"trained {result.step} steps, final loss {result.losses[-1]:.4f}{where}" if result.losses else
          f"nothing to train: already at step {result.step}{where}")
    return 0


__all__ = ["RECIPE_DIR", "apply_overrides", "main", "read_recipe", "run", "shipped"]
