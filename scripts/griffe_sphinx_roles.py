"""Griffe extension: render the project's docstrings well in the API reference.

Three rewrites, applied to the docstring text before griffe parses it (the source is untouched):

1. Sphinx roles become links (below).
2. A Google-style ``Example:`` section whose body is a doctest becomes ``Examples:``, which griffe
   parses as code (as an admonition, ``data[0][1]`` would read as a Markdown reference link).
3. A parameter line documenting several names at once (``layers, exclude: ...``) is split into
   one entry per name, which griffe needs to match the signature.

The docstrings of ``oodunleash`` use Sphinx roles such as ``:func:`~oodunleash.masks.layer_masks.select_layers```
and ``:meth:`OODUnleash.fit```. mkdocstrings renders Markdown, where these would show up verbatim.
This extension, listed under ``plugins.mkdocstrings.handlers.python.options.extensions`` in
``mkdocs.yml``, rewrites each role into an *optional* autorefs cross-reference: a link when the
target is rendered somewhere in the site, plain code otherwise (so a role pointing at a private
helper never breaks ``mkdocs build --strict``).

Names are resolved the way Sphinx would: relative to the object that owns the docstring, then
relative to the package root (``OODUnleash.fit`` from inside ``oodunleash.finetune.loop`` resolves to
``oodunleash.wrapper.OODUnleash.fit`` through the alias exported by ``oodunleash/__init__.py``).
A leading ``~`` shows only the last component, as in Sphinx.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|data|attr|mod|exc|obj|const):`(?P<text>[^`]+)`"
)


def _lookup(root: griffe.Object, path: str) -> griffe.Object | griffe.Alias | None:
    """``root[path]`` relative to ``root``, or ``None`` when it does not exist."""
    if path == root.path:
        return root
    prefix = root.path + "."
    if not path.startswith(prefix):
        return None
    try:
        return root[path[len(prefix) :]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _canonical(obj: griffe.Object | griffe.Alias) -> str:
    try:
        return obj.final_target.path if isinstance(obj, griffe.Alias) else obj.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return obj.path


def resolve(owner: griffe.Object, package: griffe.Object, name: str) -> str | None:
    """Full canonical path of ``name`` as written in a docstring of ``owner``, if it exists."""
    name = name.strip().lstrip(".")
    head, _, tail = name.partition(".")
    candidates = []
    try:
        resolved_head = owner.resolve(head)
        candidates.append(f"{resolved_head}.{tail}" if tail else resolved_head)
    except (griffe.NameResolutionError, Exception):  # noqa: BLE001 - any failure: try the next rule
        pass
    # A method named from its class's docstring, or from a sibling method, may be inherited;
    # inherited members are rendered under the class (``inherited_members: true``).
    scope: griffe.Object | None = owner
    while scope is not None:
        if scope.is_class and head in scope.all_members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    candidates.append(name)
    candidates.append(f"{package.path}.{name}")
    for candidate in candidates:
        found = _lookup(package, candidate)
        if found is not None:
            return _canonical(found)
    return None


def rewrite(text: str, owner: griffe.Object, package: griffe.Object) -> str:
    """Replace every Sphinx role of ``text`` by an optional autorefs cross-reference."""

    def replace(match: re.Match[str]) -> str:
        raw = match["text"].strip()
        short = raw.startswith("~")
        name = raw.lstrip("~")
        shown = name.rsplit(".", 1)[-1] if short else name
        code = f"<code>{html.escape(shown)}</code>"
        target = resolve(owner, package, name)
        if target is None:
            return code
        return f'<autoref identifier="{html.escape(target)}" optional>{code}</autoref>'

    return ROLE.sub(replace, text)


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if isinstance(member, griffe.Alias):
            continue
        yield from _walk(member)


EXAMPLE_HEADER = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*\n(?=[ \t]+>>>)", re.MULTILINE)
SHARED_PARAMS = re.compile(
    r"^(?P<indent>[ \t]+)(?P<names>\w+(?:,[ \t]*\w+)+):(?P<rest>[ \t].*(?:\n(?P=indent)[ \t]+\S.*)*)",
    re.MULTILINE,
)
SECTION = re.compile(r"^[ \t]*(?:Args|Arguments|Parameters|Attributes|Other Parameters):[ \t]*$")


def split_shared_parameters(text: str) -> str:
    """``a, b: text`` inside an Args section becomes ``a: text`` and ``b: text``."""
    out, in_args = [], False
    blocks = re.split(r"(\n[ \t]*\n)", text)  # sections are separated by blank lines
    for block in blocks:
        first = block.lstrip("\n").split("\n", 1)[0]
        if SECTION.match(first):
            in_args = True
        elif first.strip() and not first.startswith((" ", "\t")):
            in_args = False
        if in_args:

            def expand(match: re.Match[str]) -> str:
                names = [n.strip() for n in match["names"].split(",")]
                return "\n".join(f"{match['indent']}{n}:{match['rest']}" for n in names)

            block = SHARED_PARAMS.sub(expand, block)
        out.append(block)
    return "".join(out)


def normalise(text: str, owner: griffe.Object, package: griffe.Object) -> str:
    """All three rewrites."""
    text = EXAMPLE_HEADER.sub(lambda m: f"{m['indent']}Examples:\n", text)
    text = split_shared_parameters(text)
    return rewrite(text, owner, package) if ":" in text else text


class SphinxRoles(griffe.Extension):
    """Normalise every docstring of a package once the package is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = normalise(obj.docstring.value, obj, pkg)
