"""The code's standing checks: ruff over the package, tests, tools and benchmarks; mypy over the package."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> list[str]:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' installs it)")
    return [name]


def test_ruff_is_clean():
    result = subprocess.run(_tool("ruff") + ["check", "src", "tests", "tools", "benchmarks"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_the_package():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    if "No module named mypy" in result.stderr:
        pytest.skip("mypy is not installed (pip install -e '.[test]' installs it)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_layout_names_every_module():
    """README's "How the code is laid out" names every module of the package (and no module that
    is not there), so the map stays true to the tree."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "src" / "musetwilight"
    modules = {path.stem for path in package.rglob("*.py") if path.stem not in ("__init__", "__main__")}
    named = set(re.findall(r"[a-z_]+", section))
    assert sorted(modules - named) == []
    listed = set(re.findall(r"^ {6}([a-z_]+)(?:\.py|/)", section, flags=re.M))
    folders = {path.name for path in package.iterdir() if path.is_dir() and not path.name.startswith("__")}
    assert listed == {path.stem for path in package.glob("*.py") if path.stem not in ("__init__", "__main__")} | folders
