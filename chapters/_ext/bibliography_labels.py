"""Author-year labels in the bibliography, to match the author-year citations in the text.

sphinxcontrib-bibtex cites "Jacot et al. (2018)" in the text (``bibtex_reference_style:
author_year``) but labels the References page with pybtex's alpha labels, "[JGH18]". This extension
registers a pybtex label style that gives "Jacot et al., 2018" instead, and a formatting style,
``author_year_plain``, that is pybtex's ``plain`` with those labels; ``_config.yml`` makes it the default.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from string import ascii_lowercase

from pybtex.database import Entry, Person
from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx


def _surname(person: Person) -> str:
    """The printed surname, LaTeX accents and braces resolved: ``Cl{\\'e}ment`` -> ``Clément``."""
    return str(Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text"))


def _authors(entry: Entry) -> str:
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_surname(p) for p in people]
    if not names:
        return entry.key
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]} and {names[1]}"
    return f"{names[0]} et al."


class AuthorYearLabelStyle(BaseLabelStyle):
    """``Surname, year``, ``Surname and Surname, year`` or ``Surname et al., year``; a letter after the
    year tells apart two works whose labels would otherwise be the same."""

    def format_labels(self, sorted_entries: Iterable[Entry]) -> Iterator[str]:
        entries = list(sorted_entries)
        labels = [f"{_authors(e)}, {e.fields.get('year', 'n.d.')}" for e in entries]
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:
                seen[label] += 1
                label += ascii_lowercase[seen[label] - 1]
            yield label


class AuthorYearPlainStyle(PlainStyle):
    default_label_style = "author_year"


def setup(app: Sphinx) -> dict[str, object]:
    register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle)
    register_plugin("pybtex.style.formatting", "author_year_plain", AuthorYearPlainStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
