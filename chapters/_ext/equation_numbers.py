"""Equation numbers per chapter: equation 2 of ``chapters/03_lazy_training`` is (3.2).

The book's parts make the chapters several table-of-contents trees, and Sphinx either numbers
equations through the whole book (no numbered tree) or restarts its chapter numbers in every part.
The chapter number is in each file's name, so after Sphinx has numbered the equations this
renumbers them as ``(chapter, position in the chapter)``, in the same order. Pages without a
number in their name (the landing page, the back matter) keep Sphinx's numbers.
"""

from __future__ import annotations

import re

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

CHAPTER = re.compile(r"(?:^|/)(\d+)_[^/]+$")


def renumber(app: Sphinx, env: BuildEnvironment) -> list[str]:
    changed = []
    for docname, numbers in env.toc_fignumbers.items():
        match = CHAPTER.search(docname)
        equations = numbers.get("displaymath")
        if not match or not equations:
            continue
        chapter = int(match.group(1))
        in_order = sorted(equations, key=lambda label: equations[label])
        renumbered = {label: (chapter, k) for k, label in enumerate(in_order, start=1)}
        if renumbered != equations:
            numbers["displaymath"] = renumbered
            changed.append(docname)
    return changed


def setup(app: Sphinx) -> dict[str, object]:
    # After Sphinx's own TocTreeCollector (priority 500) has assigned the numbers.
    app.connect("env-get-updated", renumber, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
