"""Shared fixtures: repository paths and the list of chapters."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
HTML = ROOT / "_build" / "html"


def chapter_sources() -> list[Path]:
    """Every executable chapter: ``chapters/NN_topic.md`` (the landing and reference pages are not notebooks)."""
    return sorted(p for p in CHAPTERS.glob("[0-9][0-9]_*.md"))


@pytest.fixture(params=chapter_sources(), ids=lambda p: p.stem)
def chapter(request: pytest.FixtureRequest) -> Path:
    return request.param


def toc_files() -> list[str]:
    """Every page of the book, as listed in ``_toc.yml`` (root first), e.g. ``chapters/01_loop_ntk``."""

    def walk(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["file"]] if "file" in node else []
            return found + [f for value in node.values() for f in walk(value)]
        if isinstance(node, list):
            return [f for item in node for f in walk(item)]
        return []

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + walk(toc)


@dataclass(frozen=True)
class BookBuild:
    """The outcome of one ``jupyter-book build`` of the repository into ``_build/html``."""

    returncode: int
    log: str


@pytest.fixture(scope="session")
def built_book() -> BookBuild:
    """Build the book once per test session, as ``bash .ci/book`` does (-W -n, every chapter executed).

    ``tests/test_book.py`` checks the build itself; the browser, determinism and Colab tests read
    ``_build/html`` and ``_build/jupyter_execute`` from this same build instead of building again.
    """
    # Build from nothing, as .ci/book's --all does: Sphinx otherwise re-reads (and so executes) only
    # the sources it thinks changed, and stale doctrees leave citation links pointing at old anchors.
    # Every page, image and executed notebook checked afterwards then comes from this build.
    shutil.rmtree(ROOT / "_build", ignore_errors=True)
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "-W", "-n", "--keep-going", "--all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return BookBuild(result.returncode, result.stdout + result.stderr)
