"""The book builds with -W: no Sphinx warning, no failing cell, every page present."""

from __future__ import annotations

import pytest

from conftest import HTML, BookBuild, chapter_sources


@pytest.mark.slow
def test_book_builds_without_warnings(built_book: BookBuild) -> None:
    log = built_book.log
    assert built_book.returncode == 0, log[-8000:]
    assert "WARNING" not in log.replace("[IPKernelApp] WARNING | Kernel is running over TCP", ""), log[-8000:]
    for chapter in chapter_sources():
        page = HTML / "chapters" / f"{chapter.stem}.html"
        assert page.exists(), f"{page} was not built"
        assert "Traceback" not in page.read_text(), f"{page.name} shows a traceback"
