"""Griffe extension for the documentation site: the docstrings' Sphinx roles as cross-references.

patchad's docstrings are Google style and name other objects with Sphinx roles
(``:func:`~patchad.ops.coreset.greedy_seconds```, ``:meth:`update```), which mkdocstrings would
print as they are. This extension resolves each role's target the way Python would see the
name from where the docstring is (the object, its class with inherited members, its module and
its imports; or an absolute ``patchad.`` path) and replaces the role with an optional
cross-reference: a link where the target has a page on the site, plain code where it has none
(a private helper module). A target that exists nowhere is a real broken reference: it is
logged as a warning, which fails ``mkdocs build --strict``. Targets outside patchad (the
standard library, numpy) become plain code. ``~`` shows the last name only, as in Sphinx.
A line ending in reStructuredText's ``::`` (a literal block follows) ends in ``:``, as Sphinx
prints it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from typing import Any

import griffe

LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)
ROLE = re.compile(r":(?:func|meth|class|attr|mod|data|exc|obj):`(?P<tilde>~?)\.?(?P<name>[\w.]+)`")
_log = logging.getLogger("mkdocs.plugins.patchad_roles")


def _target(obj: Any) -> Any | None:
    """An alias's target, or None when it lies outside the loaded packages (``torch.Tensor``)."""
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _member(obj: Any, name: str) -> Any | None:
    members = obj.all_members if obj.is_class else obj.members
    return members.get(name)


def _lookup(obj: Any, name: str) -> Any | None:
    """The object ``name`` means in ``obj``'s docstring, or None."""
    head, *rest = name.split(".")
    found = None
    if head == obj.package.name:
        found = obj.package
    scope = obj
    while found is None and scope is not None:
        found = _member(scope, head)
        scope = scope.parent
    for part in rest:
        if found is None or _target(found) is None:
            return found  # not found, or an import from outside: nothing to look into
        found = _member(_target(found), part)
    return found


def _replace(obj: Any, match: re.Match[str]) -> str:
    name = match["name"]
    text = name.rsplit(".", 1)[-1] if match["tilde"] else name
    found = _lookup(obj, name)
    if found is None:
        head = name.split(".")[0]
        if head != obj.package.name and importlib.util.find_spec(head) is not None:
            return f"`{text}`"  # the standard library or a dependency: no page here
        _log.warning("%s: docstring names %r, which does not exist", obj.path, name)
        return f"`{text}`"
    target = _target(found)
    if target is None:
        return f"`{text}`"  # imported from outside the package
    return f'<autoref identifier="{target.path}" optional><code>{text}</code></autoref>'


def _walk(obj: Any) -> None:
    if obj.docstring is not None and ":" in obj.docstring.value:
        value = ROLE.sub(lambda m: _replace(obj, m), obj.docstring.value)
        obj.docstring.value = LITERAL.sub(":", value)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _walk(pkg)
