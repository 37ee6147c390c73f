"""The code's standing checks: ruff over the package, tests, tools and benchmarks, mypy over the core."""

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


def test_mypy_is_clean_on_the_core():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    if "No module named mypy" in result.stderr:
        pytest.skip("mypy is not installed (pip install -e '.[test]' installs it)")
    assert result.returncode == 0, result.stdout + result.stderr
