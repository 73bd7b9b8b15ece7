"""The documentation site builds with ``mkdocs build --strict`` (no broken link, anchor or
docstring reference), works offline, and renders the API reference from the docstrings.

One build for the whole module; skipped where the ``docs`` extra is not installed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def _site_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"site_tools_{name}", ROOT / "site_tools" / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roles_link_what_exists_and_report_what_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import griffe

    roles = _site_tool("roles")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""See :func:`~pkg.helper`, :class:`Thing`, :func:`os.path.join` and :func:`missing`.\n'
        "Also :meth:`OrderedDict.move_to_end`.\n\n"
        'An example::\n\n    pkg.helper()\n"""\n\n'
        "from collections import OrderedDict\n\n\n"
        'def helper() -> None:\n    """Help."""\n\n\n'
        'class Thing:\n    """Uses :meth:`go`."""\n\n    def go(self) -> None:\n        """Go."""\n'
    )
    with caplog.at_level("WARNING"):
        module = griffe.load(
            "pkg", search_paths=[tmp_path], extensions=griffe.load_extensions(roles.SphinxRoles)
        )
    text = module.docstring.value
    assert '<autoref identifier="pkg.helper" optional><code>helper</code></autoref>' in text
    assert '<autoref identifier="pkg.Thing" optional><code>Thing</code></autoref>' in text
    assert "`os.path.join`" in text  # outside the package: plain code
    assert "`OrderedDict.move_to_end`" in text  # imported from outside: plain code
    assert "An example:\n" in text
    assert 'identifier="pkg.Thing.go"' in module["Thing"].docstring.value
    assert [r.getMessage() for r in caplog.records] == [
        "pkg: docstring names 'missing', which does not exist"
    ]


def test_links_out_of_docs_are_checked_then_become_paths() -> None:
    hooks = _site_tool("hooks")
    docs = ROOT / "docs"
    page = docs / "scale.md"

    def rewrite(markdown: str) -> str:
        return hooks.LINK.sub(lambda m: hooks._rewrite(m, page, docs, ROOT, docs), markdown)

    assert rewrite("[`knn.txt`](../benchmarks/results/knn.txt)") == ("`benchmarks/results/knn.txt`")
    assert rewrite("[the README](../README.md#install)") == "[the README](start.md#install)"
    assert rewrite("[m](methods.md#x)") == "[m](methods.md#x)"
    # a target that does not exist stays a link, for mkdocs --strict to reject
    assert rewrite("[gone](../benchmarks/results/gone.txt)") == (
        "[gone](../benchmarks/results/gone.txt)"
    )
