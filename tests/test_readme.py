"""Every ```python snippet in the README runs as written."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, capsys, monkeypatch):
    module = types.ModuleType(f"readme_snippet_{index}")  # a real module, so dataclasses in a snippet work
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), module.__dict__)
