"""Command-line manners: ``--version``, help without importing torch, plain-text help, one-line
failures with exit codes 1 / 2 / 130 (tracebacks only under ``NATGRAD_DEBUG`` / ``--debug``), and
no progress-bar control characters when the output is not a terminal."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import natgrad
import natgrad.experiments.compare as compare_experiment
from natgrad.cli.common import describe, plain
from natgrad.cli.main import DEBUG_ENV, build_parser, main

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_natgrad(*args: str, env: dict[str, str] | None = None, code: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m natgrad ARGS`` (or ``python -c CODE ARGS``) on this checkout's sources."""
    environ = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    environ.update({"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})})
    head = ["-c", code] if code is not None else ["-m", "natgrad"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True,
                          env=environ, timeout=timeout)


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every (sub-)command of ``parser`` as an argv prefix, e.g. ``("bench", "scaling")``."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*prefix, name))


COMMANDS = list(command_paths(build_parser()))


def test_every_command_is_covered():
    assert {("compare",), ("analyze",), ("bench", "scaling"), ("bench", "stability"),
            ("reproduce",)} <= set(COMMANDS)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"natgrad {natgrad.__version__}\n"


def test_version_and_help_import_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "import natgrad.cli.main as m\n"
        "m.build_parser()\n"
        f"for argv in {[[*c, '--help'] for c in COMMANDS] + [['--version']]!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert m.main(argv) == 0, argv\n"
        "heavy = sorted(n for n in ('torch', 'numpy', 'scipy', 'matplotlib', 'tqdm')\n"
        "               if n in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = run_natgrad(code=code)
    assert proc.returncode == 0, proc.stderr


def test_lazy_package_attributes_still_work():
    from natgrad import KFAC

    assert natgrad.KFAC is KFAC and "KFAC" in natgrad.__all__
    assert {"KFAC", "__version__", "fisher", "models"} <= set(dir(natgrad))
    assert natgrad.fisher.__name__ == "natgrad.fisher"
    with pytest.raises(AttributeError, match="no_such_thing"):
        natgrad.no_such_thing  # noqa: B018


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "natgrad")
def test_help_is_plain_text(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: natgrad")
    for markup in ("``", ":mod:", ":class:", ":func:", ":data:", "`"):
        assert markup not in out, (markup, out)


def test_plain_and_describe():
    assert plain("``natgrad compare``: see :mod:`natgrad.bench`") == (
        "natgrad compare: see natgrad.bench")
    assert plain("a :class:`~natgrad.experiments.compare.CompareConfig`") == "a CompareConfig"
    assert plain("use `natgrad compare --save-model`") == "use natgrad compare --save-model"
    assert describe("``a``\nb c.\n\nSecond paragraph.") == "a b c."


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--optimizers", "sgd,lbfgs"], "unknown optimizer 'lbfgs'"),
     (["--epochs", "zero"], "invalid int value")],
)
def test_usage_error_is_one_line_exit_2(args, message, tmp_path):
    proc = run_natgrad("compare", *args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("natgrad compare: error: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def broken_run_compare(cfg):
    raise RuntimeError("factor refresh failed\n  at layer 3")


def test_failure_during_work_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(compare_experiment, "run_compare", broken_run_compare)
    assert main(["compare", "--out", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == ("natgrad compare: error: RuntimeError: factor refresh failed; at layer 3\n")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_re_raises(how, tmp_path, monkeypatch):
    monkeypatch.setattr(compare_experiment, "run_compare", broken_run_compare)
    argv = ["compare", "--out", str(tmp_path), "--no-progress"]
    if how == "env":
        monkeypatch.setenv(DEBUG_ENV, "1")
    else:
        monkeypatch.delenv(DEBUG_ENV, raising=False)
        argv.insert(0, "--debug")
    with pytest.raises(RuntimeError, match="factor refresh failed"):
        main(argv)


def test_interrupt_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(compare_experiment, "run_compare", interrupted)
    assert main(["compare", "--out", str(tmp_path), "--no-progress"]) == 130
    assert capsys.readouterr().err == "natgrad compare: interrupted\n"


FAILING = (
    "import sys\n"
    "import natgrad.experiments.compare as c\n"
    "def fail(cfg):\n"
    "    raise OSError(28, 'No space left on device')\n"
    "c.run_compare = fail\n"
    "from natgrad.cli.main import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


def test_failure_in_a_process_has_no_traceback_unless_debugging(tmp_path):
    args = ("compare", "--out", str(tmp_path), "--no-progress")
    proc = run_natgrad(*args, code=FAILING)
    assert proc.returncode == 1
    assert proc.stderr == "natgrad compare: error: OSError: [Errno 28] No space left on device\n"
    debug = run_natgrad(*args, code=FAILING, env={DEBUG_ENV: "1"})
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "No space left on device" in debug.stderr


def test_piped_compare_prints_no_control_characters(tmp_path):
    proc = run_natgrad("compare", "--epochs", "1", "--limit-train", "256", "--limit-test", "256",
                       "--optimizers", "sgd", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "summary" in proc.stdout
    assert "\x1b" not in text and "\r" not in text
