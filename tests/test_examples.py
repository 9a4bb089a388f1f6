"""Every script in examples/ runs, in its --smoke mode, as a user would start it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from natgrad.data import dataset_info
from natgrad.models import build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: every example and the tests below that run it
COVERED = {"train_kfac.py", "precondition_adamw.py", "analyse_checkpoint.py",
           "distributed_train.py", "laplace_calibration.py"}


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("WORLD_SIZE", None)  # a plain process, even inside a launcher
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in output:\n{text}"
    return float(found.group(1))


def test_every_example_is_run_and_says_how():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == COVERED, "an example without a smoke test (or a test without its example)"
    for name in scripts:
        doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
        assert doc and "What it shows" in doc and f"examples/{name}" in doc, name


def test_train_kfac():
    done = run("examples/train_kfac.py", "--smoke")
    assert done.returncode == 0, done.stderr
    assert "preconditioned" in done.stdout and "projected(d=785, r=24)" in done.stdout
    assert number(r"final test accuracy: ([\d.]+)", done.stdout) > 0.3  # chance is 0.1


def test_train_kfac_rejects_bad_input():
    done = run("examples/train_kfac.py", "--rank", "0")
    assert done.returncode == 2 and "--rank must be positive, got 0" in done.stderr


def test_precondition_adamw():
    done = run("examples/precondition_adamw.py", "--smoke")
    assert done.returncode == 0, done.stderr
    summary = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    assert len(summary) == 20 and all(line.startswith("  preconditioned") for line in summary)
    assert "[embedding]" in done.stdout and "[norm]" in done.stdout
    # 16 steps; an untrained model scores about 0.13-0.17 on this task
    assert number(r"final test token accuracy: ([\d.]+)", done.stdout) > 0.25


def analysis_numbers(out: str) -> tuple[float, float, float, float]:
    trace = number(r"exact Fisher: trace ([\d.e+-]+)", out)
    residual = number(r"largest relative residual ([\d.e+-]+)", out)
    error = number(r"K-FAC relative error .* = ([\d.]+)", out)
    overlap = number(r"eigenspace overlap ([\d.]+)", out)
    return trace, residual, error, overlap


def test_analyse_checkpoint_trains_one(tmp_path):
    done = run("examples/analyse_checkpoint.py", "--smoke")
    assert done.returncode == 0, done.stderr
    assert "mlp with 25,450 parameters, Fisher over 64 mnist5k samples" in done.stdout
    trace, residual, error, overlap = analysis_numbers(done.stdout)
    assert trace > 0 and residual < 1e-2 and 0 < error < 1.5 and 0 <= overlap <= 1


def test_analyse_checkpoint_loads_one(tmp_path):
    torch.manual_seed(0)
    info = dataset_info("teacher")
    path = save_checkpoint(tmp_path / "teacher.pt", build_model("mlp", info, (12,)), "mlp", info,
                           (12,))
    done = run("examples/analyse_checkpoint.py", "--checkpoint", str(path), "--smoke")
    assert done.returncode == 0, done.stderr
    assert "teacher.pt: mlp with 304 parameters, Fisher over 64 teacher samples" in done.stdout
    analysis_numbers(done.stdout)
    missing = run("examples/analyse_checkpoint.py", "--checkpoint", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    junk = run("examples/analyse_checkpoint.py", "--checkpoint", str(tmp_path / "junk.pt"))
    assert junk.returncode == 1 and "not a checkpoint written by" in junk.stderr


def test_distributed_train_single_process(tmp_path):
    done = run("examples/distributed_train.py", "--smoke", "--save", str(tmp_path / "opt.pt"))
    assert done.returncode == 0, done.stderr
    assert "1 process(es)" in done.stdout
    assert number(r"between ranks: ([\d.e+-]+)", done.stdout) == 0.0
    assert number(r"test accuracy ([\d.]+)", done.stdout) > 0.3
    assert "state" in torch.load(tmp_path / "opt.pt", weights_only=False)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_distributed_train_two_processes(tmp_path):
    done = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "examples/distributed_train.py", "--smoke", "--save", str(tmp_path / "opt.pt"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es), backend gloo" in done.stdout
    assert done.stdout.count("test accuracy") == 1  # only rank 0 prints
    assert number(r"between ranks: ([\d.e+-]+)", done.stdout) < 1e-5
    assert "state" in torch.load(tmp_path / "opt.pt", weights_only=False)


def test_laplace_calibration():
    pytest.importorskip("laplace", reason="laplace-torch is an optional extra")
    done = run("examples/laplace_calibration.py", "--smoke", timeout=600)
    assert done.returncode == 0, done.stderr
    assert "picked" in done.stdout and "natgrad backend" in done.stdout
    assert 0.0 <= number(r"ECE ([\d.]+)\n", done.stdout) <= 1.0
