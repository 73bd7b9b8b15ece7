"""MkDocs hooks for the documentation site (``mkdocs.yml``: ``hooks``).

The Markdown files are written to be read in the repository: their relative links may point
outside ``docs/`` (``../benchmarks/results/...``, ``../src/...``, ``../README.md``), which a site
built from ``docs/`` cannot serve. Instead of relaxing ``mkdocs build --strict`` for such links,
this hook, for every link whose target exists:

- ``README.md`` at the repository root: the site's page ``start.md``, generated from it (its own
  links are rewritten by the same rules, relative to the repository root);
- a file or folder inside ``docs/``: the same link, relative to the page's place in the site;
- any other file or folder of the repository: plain code naming its repository path
  (``benchmarks/results/knn.txt``), checked to exist at build time.

A link whose target does not exist is left as it is, so MkDocs still reports it as a broken
link (a warning, an error under ``--strict``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

#: The site page generated from the repository's README.md.
START = "start.md"
#: An inline Markdown link or image: [text](target) or [text](target "title").
LINK = re.compile(r"\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files: Files, config: Any) -> Files:
    """Add the page generated from the repository's README.md."""
    readme = _root(config) / "README.md"
    files.append(File.generated(config, START, content=readme.read_text(encoding="utf-8")))
    return files


def _rewrite(match: re.Match[str], source: Path, page_dir: Path, root: Path, docs: Path) -> str:
    target = match["target"]
    if "://" in target or target.startswith(("#", "mailto:")):
        return match[0]
    path, _, anchor = target.partition("#")
    resolved = (source.parent / path).resolve()
    if not path or not resolved.exists():
        return match[0]  # MkDocs reports it: a broken link stays an error under --strict
    if resolved == root / "README.md":
        resolved = docs / START
    if resolved == docs or docs in resolved.parents or resolved == docs / START:
        new = Path(os.path.relpath(resolved, page_dir)).as_posix()
        if path.endswith("/") and not new.endswith("/"):
            new += "/"
        new += f"#{anchor}" if anchor else ""
        return f"[{match['text']}]({new}{match['title'] or ''})"
    name = resolved.relative_to(root).as_posix() + ("/" if resolved.is_dir() else "")
    text = match["text"].strip("`")
    if not text or name.endswith(text) or name.removesuffix("README.md").endswith(text):
        return f"`{name}`"
    return f"{match['text']} (`{name}`)"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite the page's relative links as the module docstring says."""
    root, docs = _root(config), Path(config["docs_dir"]).resolve()
    src = page.file.src_uri
    source = root / "README.md" if src == START else docs / src
    page_dir = (docs / src).parent
    lines, inside = [], False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            inside = not inside
        if not inside:
            line = LINK.sub(lambda m: _rewrite(m, source, page_dir, root, docs), line)
        lines.append(line)
    return "".join(lines)
