"""The book builds with -W: no Sphinx warning, no failing cell, every page present."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, chapter_sources


@pytest.mark.slow
def test_book_builds_without_warnings() -> None:
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "-W", "-n", "--keep-going"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-8000:]
    assert "WARNING" not in log.replace("[IPKernelApp] WARNING | Kernel is running over TCP", ""), log[-8000:]
    html = ROOT / "_build" / "html"
    for chapter in chapter_sources():
        page = html / "chapters" / f"{chapter.stem}.html"
        assert page.exists(), f"{page} was not built"
        assert "Traceback" not in page.read_text(), f"{page.name} shows a traceback"
