"""Shared fixtures: repository paths and the list of chapters."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"


def chapter_sources() -> list[Path]:
    """Every executable chapter: ``chapters/NN_topic.md`` (the landing and reference pages are not notebooks)."""
    return sorted(p for p in CHAPTERS.glob("[0-9][0-9]_*.md"))


@pytest.fixture(params=chapter_sources(), ids=lambda p: p.stem)
def chapter(request: pytest.FixtureRequest) -> Path:
    return request.param
