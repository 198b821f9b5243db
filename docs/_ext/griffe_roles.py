"""Griffe extension for the API pages: the docstrings' Sphinx conventions, read at build time.

The package's docstrings keep their Sphinx-style markup (they read well in ``help()`` and editors);
this turns it into what mkdocstrings renders, without changing a package file:

- roles (``:func:`x```, ``:class:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:``,
  ``:obj:``) become cross-references to the object's entry (``~a.b.c`` shows ``c``). The name is
  resolved in the scope of the docstring's object, as Python would (imports, then the enclosing
  module); a name outside ``lightning_muon`` (``torch.optim.Muon``) becomes code. The reference is
  "optional" for autorefs, and ``docs/_ext/hooks.py`` fails the strict build when one into
  ``lightning_muon`` resolves to no entry.
- a ``#:`` comment above a module or class attribute (Sphinx's attribute docstring) becomes that
  attribute's docstring, so documented constants show their text instead of an empty entry.
"""

from __future__ import annotations

import contextlib
import html
import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|exc|obj):`(?P<target>[^`]+)`")
_PACKAGE = "lightning_muon"
API_DIR = Path(__file__).resolve().parent.parent / "api"


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` seen from ``obj``; None when it is not an object of the package."""
    if name.startswith("."):  # relative, as in an import: ".groups" is a sibling of obj's module
        module = obj.module
        base = module.path if module.is_init_module else module.path.rsplit(".", 1)[0]
        for _ in range(len(name) - len(name.lstrip(".")) - 1):
            base = base.rsplit(".", 1)[0]
        name = f"{base}.{name.lstrip('.')}"
    head, _, rest = name.partition(".")
    if name.startswith(_PACKAGE + ".") or name == _PACKAGE:
        path = name
    else:
        try:
            path = obj.resolve(head)
        except griffe.NameResolutionError:
            scope = obj if obj.is_class or obj.is_module else obj.parent
            while scope is not None and head not in scope.members:
                scope = scope.parent
            if scope is None:
                return None
            path = f"{scope.path}.{head}"
        path = f"{path}.{rest}" if rest else path
    return path if path.split(".")[0] == _PACKAGE else None


def _canonical(obj: griffe.Object | griffe.Alias) -> str | None:
    try:
        return obj.canonical_path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _shown(obj: griffe.Object | griffe.Alias) -> bool:
    """Whether mkdocstrings renders ``obj`` with ``show_if_no_docstring: false`` (it or a member has text)."""
    try:
        return obj.has_docstrings if (obj.is_class or obj.is_module) else obj.has_docstring
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False


def rendered_paths(pkg: griffe.Module, api_dir: Path = API_DIR) -> dict[str, str]:
    """``{canonical path: identifier of its entry}`` for every object the API pages render: the
    ``::: module`` blocks of ``docs/api/*.md`` (a module's public members, their members, and its
    submodules with ``show_submodules: true``). A page's root module gets its anchor from the page."""
    out: dict[str, str] = {}

    def visit(obj: griffe.Object | griffe.Alias, shown_as: str, submodules: bool) -> None:
        for name, member in obj.members.items():
            if name.startswith("_") or not _shown(member):
                continue
            is_module = member.is_module if not member.is_alias else False
            if member.is_alias:
                try:
                    is_module = member.final_target.is_module
                except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                    continue
                if is_module:  # a re-exported module is not rendered as a member
                    continue
            if is_module and not submodules:
                continue
            path = f"{shown_as}.{name}"
            canonical = _canonical(member) or path
            out.setdefault(canonical, path)
            out.setdefault(path, path)
            if member.is_class or is_module:
                visit(member, path, submodules)

    for page in sorted(api_dir.glob("*.md")):
        for m in re.finditer(r"^::: *([\w.]+)(.*?)(?=^::: |\Z)", page.read_text(), flags=re.M | re.S):
            ident, options = m[1], m[2]
            if ident.split(".")[0] != pkg.name:
                continue
            root = pkg if ident == pkg.name else pkg[ident.split(".", 1)[1]]
            out.setdefault(ident, ident)
            visit(root, ident, "show_submodules: true" in options)
    return out


def convert_roles(obj: griffe.Object, text: str, rendered: dict[str, str]) -> str:
    """``text`` with each Sphinx role replaced by a cross-reference to an entry of ``rendered``
    (:func:`rendered_paths`), or code when the object has no entry."""

    def replace(m: re.Match) -> str:
        target = m["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        path = _resolve(obj, target)
        if path is not None and path not in rendered:
            with contextlib.suppress(KeyError, ValueError):
                path = _canonical(obj.modules_collection[path]) or path
        if path is None or path not in rendered:
            return f"`{shown}`"
        path = rendered[path]
        code = f'<code class="lm-role">{html.escape(shown)}</code>'
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return _ROLE.sub(replace, text)


def _comment_docstring(attr: griffe.Attribute) -> str | None:
    """The ``#:`` lines right above ``attr``'s assignment, joined; None when there are none."""
    try:
        lines = attr.lines_collection[attr.filepath]
    except (KeyError, TypeError, griffe.BuiltinModuleError):
        return None
    if attr.lineno is None:
        return None
    found = []
    i = attr.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        found.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(found) or None


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != _PACKAGE:
            return
        objects = list(_walk(pkg))
        for obj in objects:  # first the #: comments: they decide which attributes have an entry
            if obj.is_attribute and obj.docstring is None and (text := _comment_docstring(obj)):
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
        rendered = rendered_paths(pkg)
        for obj in objects:
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = convert_roles(obj, obj.docstring.value, rendered)
