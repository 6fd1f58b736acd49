"""The built site in a real browser: every page of ``_toc.yml`` as a reader sees it.

Debian's Chromium (``/usr/bin/chromium``; ``bash .ci/test`` installs it) driven by Playwright, headless,
against ``_build/html`` served on 127.0.0.1. Every request that leaves 127.0.0.1 is blocked and
counted as a failure: the site must work offline, MathJax included. A full-page screenshot of every
page goes to ``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from conftest import CHAPTERS, HTML, ROOT, BookBuild, toc_files
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Without these, headless Chromium keeps calling Google services, which a closed network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "_build" / "screenshots"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())

pytestmark = pytest.mark.slow


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site(built_book: BookBuild) -> Iterator[str]:
    """The built HTML served on an ephemeral port of 127.0.0.1; yields the base URL."""
    assert built_book.returncode == 0, "the book did not build; see test_book.py\n" + built_book.log[-4000:]
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium; Playwright never downloads a browser of its own here."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `apt-get install chromium` (bash .ci/test does it)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class _Anchors(HTMLParser):
    """Collects the ``id`` and ``name`` attributes of one HTML file: the targets of ``#fragment`` links."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(value for key, value in attrs if key in ("id", "name") and value)


@functools.cache
def anchors_of(path: Path) -> frozenset[str]:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8"))
    return frozenset(parser.ids)


def local_file(url: str, base: str) -> Path:
    """The file under ``_build/html`` that a same-site URL serves (a folder serves its index.html)."""
    path = HTML / unquote(urlsplit(url).path[len(urlsplit(base).path) :])
    return path / "index.html" if path.is_dir() else path


def source_has_math(entry: str) -> bool:
    """Whether a page's source holds math: ``$...$``/``$$`` outside code, or autodoc'd docstrings with :math:."""
    text = (ROOT / f"{entry}.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    if re.search(r"\$[^$\s]", prose) or "{math}" in prose:
        return True
    modules = re.findall(r"automodule::\s+([\w.]+)", text)
    for module in modules:
        path = ROOT / (module.replace(".", "/") + ".py")
        path = path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"
        if ":math:" in path.read_text() or ".. math::" in path.read_text():
            return True
    return False


def hidden_cells(entry: str) -> int:
    """How many code cells of a chapter carry the ``hide-cell`` tag (exercise solutions)."""
    text = (ROOT / f"{entry}.md").read_text()
    return len(re.findall(r"```\{code-cell\}[^\n]*\n:tags: \[[^\]]*\bhide-cell\b", text))


def git_tracks(path: Path) -> bool:
    result = subprocess.run(
        ["git", "ls-files", "--error-unmatch", str(path.relative_to(ROOT))], cwd=ROOT, capture_output=True
    )
    return result.returncode == 0


# Everything in <main> that is prose: code, outputs, API signatures and MathJax's own markup removed.
PROSE_JS = """() => {
  const main = document.querySelector('main') || document.body;
  const clone = main.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .cell_output, .output, dt.sig').forEach(e => e.remove());
  return clone.textContent;
}"""

MATH_JS = """() => {
  const math = [...document.querySelectorAll('.math')];
  return {
    count: math.length,
    untypeset: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)),
    containers: document.querySelectorAll('mjx-container').length,
    errors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
  };
}"""

IMAGES_JS = (
    """() => [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}))"""
)


@pytest.mark.parametrize("entry", toc_files())
def test_page_in_the_browser(entry: str, site: str, browser: object) -> None:
    page_file = HTML / f"{entry}.html"
    assert page_file.exists(), f"{entry} is in _toc.yml but {page_file} was not built"
    url = site + f"{entry}.html"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console_errors: list[str] = []
    failed_requests: list[str] = []
    offsite_requests: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(f"uncaught: {e}"))
    page.on(
        "requestfailed", lambda r: failed_requests.append(f"{r.url} ({r.failure})") if r.url.startswith(site) else None
    )
    page.on("response", lambda r: failed_requests.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None)

    def offline_only(route: object) -> None:
        if route.request.url.startswith(site) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            offsite_requests.append(route.request.url)
            route.abort()

    page.route("**/*", offline_only)
    response = page.goto(url, wait_until="load")
    assert response is not None and response.status == 200, f"{url}: HTTP {response and response.status}"
    # MathJax typesets asynchronously after load; its startup promise resolves when the page is done.
    # If MathJax never starts (say its script did not load), the checks below report what is missing.
    try:
        page.wait_for_function(
            "() => !window.MathJax || (window.MathJax.startup && window.MathJax.startup.promise)", timeout=20_000
        )
        page.evaluate("async () => { if (window.MathJax && MathJax.startup) { await MathJax.startup.promise; } }")
    except PlaywrightTimeoutError:
        pass
    page.wait_for_load_state("networkidle")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{entry.replace('/', '_')}.png"), full_page=True)

    assert not offsite_requests, f"{entry}: the page reaches off the site (it must work offline): {offsite_requests}"
    assert not failed_requests, f"{entry}: requests failed {failed_requests}"
    assert not console_errors, f"{entry}: console errors {console_errors}"

    broken_images = [image["src"] for image in page.evaluate(IMAGES_JS) if not image["ok"]]
    assert not broken_images, f"{entry}: images that did not load {broken_images}"

    math = page.evaluate(MATH_JS)
    if source_has_math(entry):
        assert math["count"] > 0 and math["containers"] > 0, f"{entry}: the source has math but the page shows none"
    assert not math["untypeset"], f"{entry}: math MathJax did not typeset: {math['untypeset'][:5]}"
    assert not math["errors"], f"{entry}: MathJax errors: {math['errors'][:5]}"
    prose = page.evaluate(PROSE_JS)
    for raw in ("$$", "\\begin", "\\(", "\\["):
        assert raw not in prose, (
            f"{entry}: raw TeX {raw!r} left in the text: ...{prose[max(prose.find(raw) - 80, 0) : prose.find(raw) + 80]}..."
        )
    stray = re.search(r"\$[^$\s][^$\n]{0,80}\$", prose)
    assert stray is None, f"{entry}: unrendered inline math {stray.group(0) if stray else ''!r}"

    check_links(entry, page, site)
    check_buttons(entry, page, site)
    if (CHAPTERS / f"{Path(entry).name}.md") in CHAPTERS.glob("[0-9][0-9]_*.md"):
        check_hidden_solutions(entry, page)
    page.close()


def check_links(entry: str, page: object, site: str) -> None:
    """Every same-site link leads to a file of the build, and every #fragment to an anchor in it."""
    hrefs = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    broken = []
    for href in hrefs:
        if not href.startswith(site):
            continue
        target = local_file(href, site)
        fragment = unquote(urlsplit(href).fragment)
        if not target.is_file():
            broken.append(f"{href} (no such file)")
        elif fragment and target.suffix == ".html" and fragment not in anchors_of(target):
            broken.append(f"{href} (no anchor #{fragment})")
    assert not broken, f"{entry}: broken internal links {broken}"


def check_buttons(entry: str, page: object, site: str) -> None:
    """The download buttons fetch a file; a chapter's Colab button opens its committed .ipynb."""
    downloads = page.evaluate(
        "() => [...document.querySelectorAll('.dropdown-download-buttons a[href]')].map(a => a.href)"
    )
    assert any(href.endswith(".md") for href in downloads), f"{entry}: no download button for the .md source"
    for href in downloads:
        response = page.request.get(href)
        assert response.status == 200 and response.body(), f"{entry}: download {href} gives HTTP {response.status}"
    assert page.locator(".dropdown-download-buttons button.btn-download-pdf-button").count() == 1, (
        f"{entry}: no print-to-PDF button"
    )
    # The PDF button calls window.print(); printing the page to PDF is what a reader then gets.
    pdf = page.pdf()
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000, f"{entry}: printing to PDF gives {len(pdf)} bytes"

    colab = CONFIG["launch_buttons"]["colab_url"].rstrip("/")
    links = page.evaluate(f"() => [...document.querySelectorAll('a[href^=\"{colab}\"]')].map(a => a.href)")
    if not re.fullmatch(r"chapters/\d\d_\w+", entry):
        assert not links, f"{entry} is not a notebook but offers Colab: {links}"
        return
    repository = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    branch = CONFIG["repository"]["branch"]
    expected = f"{colab}/github/{repository}/blob/{branch}/{entry}.ipynb"
    assert links == [expected], f"{entry}: Colab button(s) {links}, expected {expected}"
    notebook = ROOT / f"{entry}.ipynb"
    assert notebook.exists(), f"the Colab button of {entry} opens {notebook.name}, which does not exist"
    assert git_tracks(notebook), f"the Colab button of {entry} opens {notebook.name}, which git does not track"


def check_hidden_solutions(entry: str, page: object) -> None:
    """Exercise solutions (``hide-cell`` cells) are collapsed: the reader sees a toggle, not the code
    or its output, which would give the answer away."""
    expected = hidden_cells(entry)
    toggles = page.locator("details.hide.above-input")
    assert toggles.count() == expected, f"{entry}: {toggles.count()} collapsed code cells, {expected} tagged hide-cell"
    for i in range(expected):
        toggle = toggles.nth(i)
        assert toggle.get_attribute("open") is None, f"{entry}: solution {i + 1} is open by default"
        assert not toggle.locator("pre").first.is_visible(), f"{entry}: the code of solution {i + 1} is visible"
        outputs = toggle.locator(".cell_output")
        assert all(not outputs.nth(j).is_visible() for j in range(outputs.count())), (
            f"{entry}: the output of solution {i + 1} is visible"
        )
        assert toggle.locator("summary").is_visible(), f"{entry}: solution {i + 1} has no visible toggle"
