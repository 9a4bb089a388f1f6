"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert "test accuracy after one epoch" in capsys.readouterr().out


def test_readme_set_up_has_exactly_two_commands():
    text = README.read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert [c.strip() for c in commands] == [
        "pip install torch==2.13.0 && pip install -e '.[plots,progress]' && natgrad compare",
        "pip install torch==2.13.0 && pip install -c .ci/constraints.txt -e '.[dev]' "
        "&& ruff check . && lint-imports && pytest",
    ]


def test_ci_runs_the_test_set_up_then_builds_the_docs():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "echo"))]
    pinned = "pip install -c .ci/constraints.txt"  # the extras install next to the tested torch
    steps = ["pip install torch==2.13.0", f"{pinned} -e '.[dev]'", "ruff check .",
             "lint-imports", "pytest",
             f"{pinned} -e '.[docs]'", "mkdocs build --strict"]
    positions = [next((i for i, c in enumerate(commands) if step in c), -1) for step in steps]
    assert -1 not in positions and positions == sorted(positions), dict(zip(steps, positions))
    constraints = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in constraints
