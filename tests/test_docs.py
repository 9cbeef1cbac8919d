"""The docs that are generated from code are current, and the code is ruff clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmfw.config.reference import recipe_reference

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    page = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert page == recipe_reference(), (
        "docs/recipe-reference.md is stale: run `python -m mmfw.config.reference > "
        "docs/recipe-reference.md`"
    )


def test_reference_lists_every_installed_plugin():
    import mmfw

    page = recipe_reference()
    for kind, names in mmfw.available().items():
        for name in names:
            assert f"### {kind} `{name}`" in page


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert 'pip install -e ".[test]"' in readme and 'pip install -e ".[test]"' in ci


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "core", "plugins", "tests"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_no_concrete_plugin():
    """core/mmfw reaches plugins only through the registry."""
    for path in (ROOT / "core" / "mmfw").rglob("*.py"):
        text = path.read_text()
        for pkg in ("mmfw_losses", "mmfw_encoders", "mmfw_data", "mmfw_adapters",
                    "mmfw_backends", "mmfw_schedulers", "timm", "transformers"):
            assert f"import {pkg}" not in text and f"from {pkg}" not in text, (path, pkg)


def test_the_kinds_table_of_plugins_md_is_the_hookspecs() -> None:
    """docs/plugins.md lists every kind with its hook and factory context, as declared."""
    from mmfw.spi.hookspecs import KINDS

    page = (ROOT / "docs" / "plugins.md").read_text()
    for k in KINDS.values():
        ctx = ", ".join(f"`{c}`" for c in k.context) or "—"
        assert f"| `{k.name}` | `{k.hook}` | {ctx} |" in page, k.name
