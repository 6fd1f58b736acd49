"""The book builds with -W: no Sphinx warning, no failing cell, every page present."""

from __future__ import annotations

import re

import pytest
from conftest import CHAPTERS, HTML, ROOT, BookBuild, chapter_sources
from pybtex.database import Entry, Person, parse_file


@pytest.mark.slow
def test_book_builds_without_warnings(built_book: BookBuild) -> None:
    log = built_book.log
    assert built_book.returncode == 0, log[-8000:]
    assert "WARNING" not in log.replace("[IPKernelApp] WARNING | Kernel is running over TCP", ""), log[-8000:]
    for chapter in chapter_sources():
        page = HTML / "chapters" / f"{chapter.stem}.html"
        assert page.exists(), f"{page} was not built"
        assert "Traceback" not in page.read_text(), f"{page.name} shows a traceback"


@pytest.mark.slow
def test_references_page_labels_each_work_as_the_text_cites_it(built_book: BookBuild) -> None:
    """In-text citations read "Jacot et al. (2018)"; the References page must label that entry
    "[Jacot et al., 2018]", not with pybtex's alpha label "[JGH18]"."""
    assert built_book.returncode == 0, built_book.log[-8000:]
    page = (HTML / "chapters" / "references.html").read_text()
    labels = re.findall(r'<span class="label"><span class="fn-bracket">\[</span>(.*?)<span', page)
    assert len(labels) == len(parse_file(ROOT / "references.bib").entries), labels
    for label in labels:
        assert re.fullmatch(r"[A-Z][\w\- ]+( and [A-Z][\w\-]+| et al\.)?, \d{4}[a-z]?", label), label
    assert "Jacot et al., 2018" in labels and "Cho and Saul, 2009" in labels


def test_author_year_labels_tell_apart_same_author_same_year(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(CHAPTERS / "_ext"))
    from bibliography_labels import AuthorYearLabelStyle

    def entry(authors: str, year: str) -> Entry:
        return Entry("article", fields={"year": year}, persons={"author": [Person(a) for a in authors.split(" and ")]})

    entries = [
        entry("Cho, Youngmin and Saul, Lawrence", "2009"),
        entry("Yang, Greg", "2019"),
        entry("Yang, Greg", "2019"),
        entry("Cl{\\'e}ment, Anne and Bach, Francis and Lee, Jaehoon", "2020"),
    ]
    assert list(AuthorYearLabelStyle().format_labels(entries)) == [
        "Cho and Saul, 2009",
        "Yang, 2019a",
        "Yang, 2019b",
        "Clément et al., 2020",
    ]
