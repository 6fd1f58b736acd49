"""What a reader relies on, checked on the sources: exercises with hidden solutions, and an API
reference that covers every module and every public name of ntkbook."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import jupytext
from conftest import CHAPTERS, HTML, BookBuild, toc_files

import ntkbook

SOLUTION_TAG = "hide-cell"


def sections(chapter: Path) -> list[tuple[str, list]]:
    """The chapter's cells grouped by level-2 heading: ``[(heading, cells), ...]``; cells before the
    first heading go under ``""``."""
    grouped: list[tuple[str, list]] = [("", [])]
    for cell in jupytext.read(chapter).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("## "):
                    grouped.append((line[3:].strip(), []))
        grouped[-1][1].append(cell)
    return grouped


def test_chapter_ends_with_two_or_three_exercises_and_hidden_solutions(chapter: Path) -> None:
    grouped = sections(chapter)
    headings = [heading for heading, _ in grouped]
    assert headings.count("Exercises") == 1, f"{chapter.name} needs one '## Exercises' section, has {headings}"
    position = headings.index("Exercises")
    cells = grouped[position][1]
    prose = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    exercises = re.findall(r"^\d+\. ", prose, flags=re.MULTILINE)
    assert 2 <= len(exercises) <= 3, f"{chapter.name}: {len(exercises)} numbered exercises, expected 2 or 3"
    solutions = [c for c in cells if c.cell_type == "code"]
    assert len(solutions) >= len(exercises), (
        f"{chapter.name}: {len(exercises)} exercises but {len(solutions)} solution cells"
    )
    for cell in solutions:
        tags = cell.metadata.get("tags", [])
        assert SOLUTION_TAG in tags, f"{chapter.name}: solution cell not tagged {SOLUTION_TAG}:\n{cell.source[:200]}"
        # Solutions are executed with the chapter (nbval, the book, Colab), so they are tested too.
        assert not {"skip-execution", "raises-exception"} & set(tags), f"{chapter.name}: a solution is not executed"
    later_code = [c for _, group in grouped[position + 1 :] for c in group if c.cell_type == "code"]
    assert not later_code, f"{chapter.name}: code after the exercises; the exercises must close the chapter"


def modules() -> list[str]:
    """``ntkbook`` and every module in it."""
    return ["ntkbook"] + [
        f"ntkbook.{m.name}" for m in pkgutil.iter_modules(ntkbook.__path__) if not m.name.startswith("_")
    ]


def public_names(module_name: str) -> list[str]:
    """Functions and classes a module defines itself (not imports) whose names do not start with ``_``."""
    module = importlib.import_module(module_name)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module_name
    ]


def test_api_reference_documents_every_module() -> None:
    api = (CHAPTERS / "api.md").read_text()
    assert "chapters/api" in toc_files(), "the API reference is not in _toc.yml"
    for name in modules():
        assert re.search(rf"automodule:: {re.escape(name)}\s", api), f"chapters/api.md does not document {name}"


def test_every_public_name_has_a_docstring() -> None:
    # autodoc skips members without a docstring, so this is what puts each one on the API page.
    for module_name in modules():
        module = importlib.import_module(module_name)
        for name in public_names(module_name):
            assert inspect.getdoc(getattr(module, name)), f"{module_name}.{name} has no docstring"


def test_api_page_shows_every_public_name(built_book: BookBuild) -> None:
    assert built_book.returncode == 0, "the book did not build; see test_book.py"
    page = (HTML / "chapters" / "api.html").read_text()
    for module_name in modules():
        for name in public_names(module_name):
            assert f'id="{module_name}.{name}"' in page, f"the API page does not show {module_name}.{name}"


def test_readme_documents_the_timing_tag() -> None:
    readme = (CHAPTERS.parent / "README.md").read_text()
    assert "`timing`" in readme, "README's 'Adding a chapter' must explain the `timing` cell tag"
