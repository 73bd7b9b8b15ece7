"""The documentation site builds with ``mkdocs build --strict`` (no broken link, anchor or
docstring reference), works offline, and renders the API reference from the docstrings.

One build for the whole module; skipped where the ``docs`` extra is not installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="needs the docs extra: pip install -e '.[docs]'")
pytest.importorskip("material", reason="needs the docs extra: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="needs the docs extra")

ROOT = Path(__file__).resolve().parents[1]
#: A <link> or <script> that loads something from another host.
REMOTE = re.compile(r"<(?:link|script)\b[^>]*\b(?:href|src)=\"(?:https?:)?//", re.IGNORECASE)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_every_docs_page_and_api_page_is_built(site: Path) -> None:
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"README"}
    assert all((site / name / "index.html").is_file() for name in pages)
    api = {p.stem for p in (ROOT / "docs" / "api").glob("*.md")}
    assert {"patchcore", "padim", "spade", "prediction", "runtime", "outputs", "export"} <= api
    assert all((site / "api" / name / "index.html").is_file() for name in api)
    assert (site / "index.html").is_file()
    assert (site / "start" / "index.html").is_file()  # the repository README


def test_api_page_shows_signature_docstring_and_cross_references(site: Path) -> None:
    html = (site / "api" / "patchcore" / "index.html").read_text()
    assert 'id="patchad.detectors.PatchCore"' in html
    assert "coreset_ratio" in html
    assert "Locally aware patch features" in html  # the class docstring
    assert ":func:" not in html  # the docstrings' Sphinx roles became references
    assert ":meth:" not in html
    assert 'href="../detector/#patchad.detectors.Detector' in html  # the base class links


def test_links_out_of_docs_become_repository_paths(site: Path) -> None:
    html = (site / "scale" / "index.html").read_text()
    assert "<code>benchmarks/results/scale_256.txt</code>" in html
    assert "../benchmarks/results/" not in html


def test_site_loads_nothing_from_other_hosts(site: Path) -> None:
    pages = site.rglob("*.html")
    remote = [str(p.relative_to(site)) for p in pages if REMOTE.search(p.read_text())]
    assert not remote, f"pages loading remote fonts or scripts: {remote}"
    assert "fonts.googleapis" not in (site / "index.html").read_text()
    assert (site / "search" / "search_index.json").is_file()  # the search is local
