"""The documentation: the guide's code runs, the API pages point at real modules, and the
docstring rewriting of docs/_ext/griffe_rst.py does what it says.

The site itself is built by ``mkdocs build --strict`` in .ci/run (the ``docs`` extra)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = sorted((DOCS / "guide").glob("*.md"))


def load_extension():
    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "_ext" / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(page: Path) -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    return [b for b in blocks if not b.lstrip().startswith("--8<--")]  # included examples


def test_every_guide_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert GUIDE and all(f"guide/{p.name}" in nav for p in GUIDE)


@pytest.mark.parametrize("page", [p for p in GUIDE if python_blocks(p)], ids=lambda p: p.stem)
def test_guide_code_runs(page, capsys):
    namespace = {"__name__": f"guide_{page.stem}"}
    for code in python_blocks(page):  # in order, sharing names, as a reader would run them
        exec(compile(code, str(page), "exec"), namespace)
    capsys.readouterr()


def test_api_directives_name_real_objects():
    directives = []
    for page in sorted((DOCS / "api").glob("*.md")):
        directives += re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M)
    assert "natgrad.KFAC" in directives and "natgrad.fisher" in directives
    for path in directives:
        module, _, attr = path.rpartition(".")
        try:
            importlib.import_module(path)
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(module), attr), path


def test_roles_become_code_spans():
    rst = load_extension().rst_to_markdown
    text = "See :class:`~natgrad.factors.KroneckerFactor`, :func:`make_factor` and :meth:`a.b`."
    assert rst(text) == "See `KroneckerFactor`, `make_factor` and `a.b`."
    assert rst(":data:`the table <natgrad.factors.STRATEGIES>`") == "`the table`"
    assert rst("``literal`` stays") == "``literal`` stays"


def test_literal_blocks_and_doctests_become_fences():
    rst = load_extension().rst_to_markdown
    text = "Usage::\n\n    opt = KFAC(model)\n    opt.step()\n\nAfter."
    assert rst(text) == "Usage:\n\n```python\nopt = KFAC(model)\nopt.step()\n```\n\nAfter."
    doctest = "Intro.\n\n>>> 1 + 1\n2\n\nMore."
    assert rst(doctest) == "Intro.\n\n```pycon\n>>> 1 + 1\n2\n```\n\nMore."
    assert rst("A line ending in a colon::\nNo indented block.") == (
        "A line ending in a colon::\nNo indented block.")


def test_joined_arguments_are_split():
    rst = load_extension().rst_to_markdown
    text = ("Summary.\n\nArgs:\n    names: the names.\n    dtype, device: of the vectors\n"
            "        (continued).\n\nReturns:\n    x, y: not arguments.")
    assert rst(text) == (
        "Summary.\n\nArgs:\n    names: the names.\n    dtype: of the vectors\n"
        "        (continued).\n    device: of the vectors\n        (continued).\n\n"
        "Returns:\n    x, y: not arguments.")
