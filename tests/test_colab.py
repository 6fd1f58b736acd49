"""Every chapter runs in a simulated bare Colab runtime, and prints the same as it did in the book build.

The simulation: each chapter's committed ``.ipynb`` is copied alone into an empty folder outside the
repository and executed by nbclient with a kernel from a fresh virtual environment that holds only
what a bare Colab runtime brings for this book (torch, numpy, matplotlib, scikit-learn, ipykernel), not ntkbook.
The chapter's bootstrap cell must install ntkbook itself, from ``NTKBOOK_INSTALL``: a copy of the
checkout's package files (a copy, because pip's build writes ``build/`` and ``*.egg-info`` into the
source folder, which is the working tree here). ntkbook is uninstalled again after each chapter, so
every chapter starts as bare as a new Colab runtime.

Determinism: the book build (``tests/conftest.py::built_book``) already executed every chapter once,
into ``_build/jupyter_execute``; the Colab run is a second execution in another environment. Their
printed output (stdout and results' text) must agree cell by cell, except in cells tagged ``timing``
(times differ from run to run; README, "Adding a chapter") and in the bootstrap cell (pip talks
only where it installs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, BookBuild
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

# What a bare Colab runtime provides for this book; versions as pinned in requirements.txt.
RUNTIME_PACKAGES = ("torch", "numpy", "matplotlib", "scikit-learn", "ipykernel")
KERNEL_NAME = "colab-simulation"
EXECUTED = ROOT / "_build" / "colab"
TIMING_TAG = "timing"

pytestmark = pytest.mark.slow


def pinned(package: str) -> str:
    """``package==version`` as requirements.txt pins it."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package.lower():
            return f"{package}=={version.strip()}"
    raise AssertionError(f"requirements.txt does not pin {package}")


@dataclass(frozen=True)
class ColabRuntime:
    python: Path
    kernel_dirs: Path
    ntkbook_source: Path


@dataclass(frozen=True)
class ColabRun:
    notebook: nbformat.NotebookNode
    error: str | None


@pytest.fixture(scope="session")
def colab_runtime(tmp_path_factory: pytest.TempPathFactory) -> ColabRuntime:
    """A fresh virtual environment with only the Colab packages, registered as a Jupyter kernel."""
    base = tmp_path_factory.mktemp("colab")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *map(pinned, RUNTIME_PACKAGES)],
        check=True,
        capture_output=True,
        text=True,
    )
    kernel_prefix = base / "jupyter"
    subprocess.run(
        [str(python), "-m", "ipykernel", "install", "--prefix", str(kernel_prefix), "--name", KERNEL_NAME],
        check=True,
        capture_output=True,
    )
    source = base / "ntkbook-checkout"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "ntkbook", source / "ntkbook", ignore=shutil.ignore_patterns("__pycache__"))
    return ColabRuntime(python, kernel_prefix / "share" / "jupyter" / "kernels", source)


def ntkbook_importable(python: Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('ntkbook') is None)"
    return subprocess.run([str(python), "-c", probe], cwd="/", env=kernel_environment(python)).returncode == 0


def kernel_environment(python: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any trace of the book's own virtual environment."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    book_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([str(python.parent)] + [p for p in env["PATH"].split(os.pathsep) if p != book_bin])
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def run_in_colab(colab_runtime: ColabRuntime, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], ColabRun]:
    """Execute a chapter's .ipynb in the Colab simulation (once per chapter and session)."""
    runs: dict[str, ColabRun] = {}

    def run(chapter: Path) -> ColabRun:
        if chapter.stem in runs:
            return runs[chapter.stem]
        assert not ntkbook_importable(colab_runtime.python), "ntkbook is already installed in the Colab runtime"
        folder = tmp_path_factory.mktemp(f"colab-{chapter.stem}")
        notebook_path = folder / f"{chapter.stem}.ipynb"
        shutil.copy2(chapter.with_suffix(".ipynb"), notebook_path)
        notebook = nbformat.read(notebook_path, as_version=4)
        manager = KernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(colab_runtime.kernel_dirs)]),
        )
        client = NotebookClient(
            notebook, km=manager, timeout=600, startup_timeout=180, resources={"metadata": {"path": str(folder)}}
        )
        error = None
        try:
            client.execute(
                env=kernel_environment(colab_runtime.python, NTKBOOK_INSTALL=str(colab_runtime.ntkbook_source))
            )
        except Exception as exc:  # noqa: BLE001 (any failure of the chapter is the finding)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            installed = ntkbook_importable(colab_runtime.python)
            subprocess.run(
                [str(colab_runtime.python), "-m", "pip", "uninstall", "--yes", "--quiet", "ntkbook"],
                capture_output=True,
            )
        if error is None and not installed:
            error = "the chapter ran, but its bootstrap cell did not install ntkbook into the runtime"
        EXECUTED.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, EXECUTED / notebook_path.name)
        runs[chapter.stem] = ColabRun(notebook, error)
        return runs[chapter.stem]

    return run


def test_chapter_runs_in_a_bare_colab_runtime(chapter: Path, run_in_colab: Callable[[Path], ColabRun]) -> None:
    result = run_in_colab(chapter)
    assert result.error is None, f"{chapter.stem}.ipynb fails in the Colab simulation:\n{result.error[-6000:]}"


def printed_output(cell: nbformat.NotebookNode) -> str:
    """What a code cell printed: its stdout and the plain text of its results and displays.

    stderr is left out (warnings quote interpreter paths, which differ between the two
    environments), and so are memory addresses such as ``0x7f3a...``.
    """
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return re.sub(r"0x[0-9a-f]+", "0x…", "".join(parts))


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_printed_output_is_deterministic(
    chapter: Path, built_book: BookBuild, run_in_colab: Callable[[Path], ColabRun]
) -> None:
    book_notebook = ROOT / "_build" / "jupyter_execute" / "chapters" / f"{chapter.stem}.ipynb"
    assert built_book.returncode == 0 and book_notebook.exists(), f"the book build did not execute {chapter.name}"
    colab = run_in_colab(chapter)
    assert colab.error is None, f"{chapter.stem} did not run in the Colab simulation"
    first = code_cells(nbformat.read(book_notebook, as_version=4))
    second = code_cells(colab.notebook)
    assert [c.source.strip() for c in first] == [c.source.strip() for c in second], (
        f"{chapter.stem}: the book and the .ipynb have different code cells; run `jupytext --sync`"
    )
    for index, (a, b) in enumerate(zip(first[1:], second[1:]), start=2):
        if TIMING_TAG in a.metadata.get("tags", []):
            continue
        assert printed_output(a) == printed_output(b), (
            f"{chapter.stem}, code cell {index}, printed differently in two executions "
            f"(tag the cell `{TIMING_TAG}` if it prints times):\n--- book build\n{printed_output(a)}\n"
            f"--- Colab simulation\n{printed_output(b)}\n--- source\n{a.source[:600]}"
        )
