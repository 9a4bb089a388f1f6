"""Bad input: one line on stderr, exit code 2, no traceback, before any training."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from natgrad.cli.main import main
from natgrad.data.idx import write_idx

CASES = [
    (["--model", "resnet"], "autoencoder"),  # argparse quoting varies by Python version
    (["--data", "imagenet"], "accepted: mnist5k, mnist, fashion-mnist, cifar10, teacher"),
    (["--optimizers", "sgd,lbfgs"], "accepted: sgd, adam"),
    (["--optimizers", "sgd,sgd"], "listed twice"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer"),
    (["--epochs", "two"], "invalid int value"),
    (["--lr", "sgd"], "NAME=VALUE"),
    (["--lr", "sgd=abc"], "NAME=VALUE"),
    (["--lr", "sgd=-1"], "NAME=VALUE"),
    (["--optimizers", "sgd,adam", "--lr", "adam=0.1,kfac=1"], "not among --optimizers: sgd, adam"),
    (["--hidden", "10,x"], "--hidden expects positive integers"),
    (["--model", "cnn", "--hidden", "10"], "takes no hidden widths"),
    (["--model", "cnn", "--data", "teacher"], "needs an image data set"),
    (["--data", "mnist"], "needs --data-dir DIR containing train-images-idx3-ubyte"),
    (["--data", "cifar10", "--data-dir", "/nonexistent/x"], "no such directory"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--target-accuracy", "2"], "--target-accuracy must be in (0, 1]"),
    (["--threads", "0"], "--threads must be a positive integer"),
]


@pytest.mark.parametrize(("args", "message"), CASES)
def test_usage_errors(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["compare", *args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("natgrad compare: error: "), err
    assert message in err
    assert not out.exists()  # nothing ran


def test_corrupt_data_file_is_a_usage_error(tmp_path, capsys):
    for name, shape in [
        ("train-images-idx3-ubyte", (4, 28, 28)),
        ("train-labels-idx1-ubyte", (4,)),
        ("t10k-images-idx3-ubyte", (2, 28, 28)),
        ("t10k-labels-idx1-ubyte", (2,)),
    ]:
        write_idx(tmp_path / name, np.zeros(shape, np.uint8))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03trunc")
    assert main(["compare", "--data", "mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t10k-images-idx3-ubyte" in err


def test_no_command(capsys):
    assert main([]) == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--model", "resnet"], "invalid choice"), (["--lr", "sgd=oops"], "NAME=VALUE")],
)
def test_subprocess_one_line_no_traceback(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "natgrad", "compare", *args],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
