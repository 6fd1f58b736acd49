"""The code is formatted by the configured formatter (ruff format, settings in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_package_and_tests_are_formatted() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is pinned in requirements.txt; install the environment with `bash .ci/setup`")
    done = subprocess.run([ruff, "format", "--check", "ntkbook", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"run `ruff format ntkbook tests`:\n{done.stdout}{done.stderr}"
