"""Packaging: the core depends on torch and numpy only; the README's set-up files install every extra."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            names.add(re.split(r"[<>=\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_core_dependencies_are_torch_and_numpy_and_the_set_up_files_cover_every_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert requirement_names(project["dependencies"]) == {"torch", "numpy"}
    extras = project["optional-dependencies"]
    runtime = requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    tests = runtime | requirement_names((ROOT / "requirements-test.txt").read_text().splitlines())
    for extra in ("eval", "train", "pretrained", "serve"):
        assert requirement_names(extras[extra]) <= runtime, extra  # README command 1 installs the demo's extras
    assert requirement_names(extras["test"]) - {"oclear-ext"} <= tests
    assert {"eval", "train", "pretrained", "serve"} <= set(re.findall(r"\w+", extras["demo"][0].split("[")[1]))
