"""Griffe extension: the reStructuredText habits of natgrad's docstrings, as Markdown.

The docstrings are Google style (``Args:``, ``Returns:``, ``Attributes:``) but cross-reference
with Sphinx roles and write literal blocks the reST way. Before mkdocstrings renders them, this
extension rewrites (in the documentation only; the sources are untouched):

* ``:class:`~a.b.C```, ``:func:`f```, ``:meth:`...``` … → a code span of the name (``C``, ``f``);
* ``Paragraph::`` followed by an indented block → ``Paragraph:`` and a ``python`` code fence;
* doctest lines (``>>>`` with their output) → a ``pycon`` code fence;
* ``a, b: text`` in an ``Args:`` section → one entry per name, as Google style wants.

It is configured in ``mkdocs.yml`` (``plugins: mkdocstrings: handlers: python: options:
extensions``) and tested in ``tests/test_docs.py``.
"""

from __future__ import annotations

import re
from typing import Any

try:
    import griffe
except ImportError:  # the docs extra is not installed: the rewriting functions still work
    griffe = None

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`([^`]+)`")
ARGS_HEADER = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args):\s*$")
JOINED_ITEM = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+):(\s.*|)$")


def _role(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    explicit = re.fullmatch(r"(.*?)\s*<(.+)>", target)  # :role:`text <target>`
    if explicit:
        return f"`{explicit.group(1)}`"
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_blocks(lines: list[str]) -> list[str]:
    """``text::`` + blank + indented block → ``text:`` + a fenced block (dedented)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and line.strip() != "::" and i + 1 < len(lines):
            base = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block_end = j
            while block_end < len(lines) and (
                not lines[block_end].strip() or _indent(lines[block_end]) > base
            ):
                block_end += 1
            block = lines[j:block_end]
            while block and not block[-1].strip():
                block.pop()
            if block and _indent(block[0]) > base:
                depth = min(_indent(b) for b in block if b.strip())
                pad = " " * base
                out.append(line.rstrip()[:-1])
                out += ["", pad + "```python"]
                out += [pad + b[depth:] if b.strip() else "" for b in block]
                out += [pad + "```", ""]
                i = block_end
                continue
        out.append(line)
        i += 1
    return out


def _doctests(lines: list[str]) -> list[str]:
    """Runs of ``>>>`` lines and their output (up to a blank line) → a ``pycon`` fence."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(">>>"):
            pad = " " * _indent(lines[i])
            out.append(pad + "```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(pad + "```")
            continue
        out.append(lines[i])
        i += 1
    return out


def _split_joined_args(lines: list[str]) -> list[str]:
    """``dtype, device: text`` under ``Args:`` → ``dtype: text`` and ``device: text``."""
    out: list[str] = []
    section: int | None = None  # indentation of the current Args: header
    i = 0
    while i < len(lines):
        line = lines[i]
        header = ARGS_HEADER.match(line)
        if header:
            section = len(header.group(1))
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        item = JOINED_ITEM.match(line) if section is not None else None
        if item and len(item.group(1)) > section:
            j = i + 1
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(item.group(1)):
                j += 1
            for name in re.split(r"\s*,\s*", item.group(2)):
                out.append(f"{item.group(1)}{name}:{item.group(3)}")
                out += lines[i + 1:j]
            i = j
            continue
        out.append(line)
        i += 1
    return out


def rst_to_markdown(text: str) -> str:
    """A docstring's text with the reST constructs above rewritten as Markdown."""
    lines = ROLE.sub(_role, text).splitlines()
    return "\n".join(_doctests(_literal_blocks(_split_joined_args(lines))))


if griffe is not None:

    class RstToMarkdown(griffe.Extension):
        """Rewrite every docstring of the loaded package with :func:`rst_to_markdown`."""

        def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
            if not obj.is_alias and obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value)
