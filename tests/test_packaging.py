"""Packaging: one version source, and a wheel that ships py.typed, the data and its licences."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import natgrad
from natgrad._version import UNKNOWN, package_version, source_version

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_pyproject():
    declared = source_version(ROOT / "pyproject.toml")
    assert declared is not None and declared[0].isdigit()
    assert natgrad.__version__ == declared == package_version()


def test_source_version_reads_only_natgrad(tmp_path):
    path = tmp_path / "pyproject.toml"
    assert source_version(path) is None  # no file
    path.write_text('[project]\nname = "other"\nversion = "9.9"\n')
    assert source_version(path) is None
    path.write_text('[tool.x]\nversion = "1.0"\n\n[project]\nname = "natgrad"\n'
                    'version = "2.3.4"\n\n[tool.y]\nversion = "5"\n')
    assert source_version(path) == "2.3.4"
    path.write_text('[project]\nname = "natgrad"\ndynamic = ["version"]\n[tool.y]\nversion = "5"\n')
    assert source_version(path) is None
    assert UNKNOWN.startswith("0+")


def test_wheel_contents(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject asks for
    tree = tmp_path / "tree"  # a clean copy: the build writes nothing into this checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("natgrad-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"natgrad-{natgrad.__version__}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
    assert {"natgrad/py.typed", "natgrad/data/mnist5k.npz", "natgrad/data/mnist5k.LICENSE.md",
            "natgrad/data/shakespeare_char.npz", "natgrad/data/shakespeare_char.LICENSE.md",
            f"{info}/licenses/LICENSE"} <= names
    assert "License-Expression: MIT" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [line.split()[1] for line in requires if "extra ==" not in line]
    assert any(c.startswith("torch") for c in core)
    assert not [c for c in core if c.startswith(("matplotlib", "scipy", "tqdm", "transformers"))
                ], core
    for extra, package in (("plots", "matplotlib"), ("scipy", "scipy"), ("progress", "tqdm"),
                           ("zoo", "transformers")):
        assert any(line.startswith(f"Requires-Dist: {package}") and f'extra == "{extra}"' in line
                   for line in requires), (extra, requires)
