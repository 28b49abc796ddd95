"""`python -m train COMMAND`: the training entry points.

    python -m train world-model [--out DIR ...]        the Ms. Pac-Man world model, end to end (train/world.py)
    python -m train memory CONFIG [--batch ...]        memory planner for a model config (train/memory.py)
    python -m train RECIPE.yaml [key=value ...]        a training recipe (train/recipes.py)
"""
from __future__ import annotations

import importlib
import sys

# command -> module whose main(argv) runs it; a YAML path or a shipped recipe name goes to the recipes module
COMMANDS = {"world-model": "train.world", "memory": "train.memory"}
RECIPES = "train.recipes"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        return importlib.import_module(COMMANDS[command]).main(rest)
    if command.startswith("-"):
        known = ", ".join(COMMANDS)
        print(f"python -m train: unknown option {command!r}; commands: {known} or a recipe", file=sys.stderr)
        return 2
    return importlib.import_module(RECIPES).main(argv)


if __name__ == "__main__":
    sys.exit(main())
