"""The architecture as import rules: models/ never imports guides/, the shared layer
(ELBOs, sites, networks, distributions, replay, envs, DP, diagnostics) never imports an
algorithm, and every Pyro model lives in models/ (no pyro.sample outside models/ and guides/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the layer that may import algorithms: the registry and the drivers that run them by name
DRIVERS = {"pplrl/runner.py", "pplrl/cli.py", "pplrl/diagnose.py", "pplrl/plugins.py", "pplrl/__main__.py"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("models"), ids=lambda p: p.name)
def test_models_never_import_guides_or_algorithms(path):
    bad = {m for m in imports(path) if m.split(".")[0] == "guides" or m.startswith("pplrl.algorithms")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", [p for p in files("pplrl") if "algorithms" not in p.parts
                                  and str(p.relative_to(ROOT)) not in DRIVERS], ids=lambda p: p.name)
def test_framework_modules_never_import_algorithms(path):
    bad = {m for m in imports(path) if m.startswith("pplrl.algorithms")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", [p for p in files("pplrl")], ids=lambda p: p.name)
def test_no_sample_sites_outside_models_and_guides(path):
    """Beliefs are written in models/ and guides/; the framework and the algorithms only run them."""
    text = path.read_text()
    assert "pyro.sample(" not in text and "pyro.factor(" not in text, path.relative_to(ROOT)
