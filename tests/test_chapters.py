"""Chapter hygiene: every chapter is paired, listed, bootstrapped and seeded."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jupytext
import nbformat
import yaml
from conftest import CHAPTERS, ROOT, chapter_sources, toc_files

BOOTSTRAP_MARKER = "# Colab bootstrap: install ntkbook when it is not importable"
# torch.* and numpy.random.* functions that draw random numbers.
TORCH_RANDOM = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson"}
TORCH_RANDOM_METHODS = {
    "normal_",
    "uniform_",
    "bernoulli_",
    "random_",
    "exponential_",
    "cauchy_",
    "geometric_",
    "log_normal_",
}


def code_cells(path: Path) -> list[str]:
    notebook = jupytext.read(path)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_chapters() -> None:
    assert chapter_sources(), "no chapters/NN_topic.md found"


def test_md_and_ipynb_pair_is_in_sync(chapter: Path) -> None:
    twin = chapter.with_suffix(".ipynb")
    assert twin.exists(), f"{twin.name} is missing: run `jupytext --sync {chapter.relative_to(ROOT)}`"
    source = jupytext.read(chapter)
    paired = nbformat.read(twin, as_version=4)
    as_cells = lambda nb: [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in nb.cells]
    assert as_cells(paired) == as_cells(source), f"{twin.name} differs from {chapter.name}: run `jupytext --sync`"
    formats = source.metadata.get("jupytext", {}).get("formats", "")
    assert formats == "md:myst,ipynb", f"{chapter.name} must declare jupytext formats md:myst,ipynb"


def test_ipynb_has_no_outputs(chapter: Path) -> None:
    paired = nbformat.read(chapter.with_suffix(".ipynb"), as_version=4)
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{chapter.stem}.ipynb has committed outputs"


def test_chapter_is_in_the_toc(chapter: Path) -> None:
    assert f"chapters/{chapter.stem}" in toc_files()


def test_every_toc_entry_exists() -> None:
    for entry in toc_files():
        assert (ROOT / f"{entry}.md").exists(), f"_toc.yml lists {entry} but {entry}.md does not exist"


def test_first_code_cell_is_the_hidden_colab_bootstrap(chapter: Path) -> None:
    notebook = jupytext.read(chapter)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first.source.startswith(BOOTSTRAP_MARKER), f"{chapter.name}: first code cell must be the bootstrap"
    assert "remove-cell" in first.metadata.get("tags", []), f"{chapter.name}: tag the bootstrap cell remove-cell"
    assert "NTKBOOK_INSTALL" in first.source
    repository = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert f"git+{repository}" in first.source, f"{chapter.name}: bootstrap must install from {repository}"
    # Every chapter shares the one bootstrap, so a fix to it reaches all of them.
    reference = next(c for c in jupytext.read(chapter_sources()[0]).cells if c.cell_type == "code")
    assert first.source == reference.source


def random_calls_without_generator(source: str) -> list[str]:
    """Calls that draw from global random state: numpy.random.* other than default_rng, torch
    sampling functions and in-place samplers without ``generator=``, and Python's ``random``."""
    problems = []
    tree = ast.parse(re.sub(r"^\s*[%!].*$", "", source, flags=re.MULTILINE))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name == "random" for alias in node.names):
            problems.append("import random")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        text = ast.unparse(node.func)
        has_generator = any(k.arg in {"generator", "seed"} for k in node.keywords)
        if (
            re.match(r"(np|numpy)\.random\.", text)
            and name != "default_rng"
            or text.startswith("torch.")
            and name in TORCH_RANDOM
            and not has_generator
            or name in TORCH_RANDOM_METHODS
            and not has_generator
        ):
            problems.append(text)
    return problems


def test_random_draws_come_from_seeded_generators(chapter: Path) -> None:
    for source in code_cells(chapter):
        assert not random_calls_without_generator(source), (
            f"{chapter.name} draws from global random state: {random_calls_without_generator(source)}; "
            "use torch.Generator().manual_seed(...) or numpy.random.default_rng(seed)"
        )


def test_the_hygiene_check_catches_global_random_state() -> None:
    assert random_calls_without_generator("x = torch.randn(3, 4)") == ["torch.randn"]
    assert random_calls_without_generator("x = np.random.normal(size=3)") == ["np.random.normal"]
    assert random_calls_without_generator("w.normal_()") == ["w.normal_"]
    assert random_calls_without_generator("x = torch.randn(3, generator=g)") == []
    assert random_calls_without_generator("rng = np.random.default_rng(0)") == []


def test_chapters_import_helpers_from_ntkbook(chapter: Path) -> None:
    sources = "\n".join(code_cells(chapter))
    assert re.search(r"^\s*(import ntkbook|from ntkbook)", sources, flags=re.MULTILINE)
    assert "class TwoLayerNet" not in sources and "def empirical_ntk" not in sources


def test_landing_page_maps_every_chapter() -> None:
    landing = (CHAPTERS / "index.md").read_text()
    for chapter in chapter_sources():
        label = re.search(r"^\(([\w-]+)\)=\s*$", chapter.read_text(), flags=re.MULTILINE)
        assert label, f"{chapter.name} needs a (label)= target above its title"
        assert f"<{label.group(1)}>" in landing, f"chapters/index.md does not link to {chapter.name}"
