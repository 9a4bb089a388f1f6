"""Progress bars: drawn only on a terminal, never when switched off, nothing without tqdm."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from natgrad.data import load_dataset
from natgrad.experiments.train import TrainConfig, train
from natgrad.models import build_model
from natgrad.optim import make_optimizer
from natgrad.progress import NullBar, progress_bar

tqdm = pytest.importorskip("tqdm").tqdm  # the dev extra installs it


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_tqdm_bar():
    stream = Terminal()
    bar = progress_bar(range(3), file=stream, desc="work")
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    bar.close()
    assert "work" in stream.getvalue()


@pytest.mark.parametrize("stream", [io.StringIO(), None], ids=["pipe", "no-isatty"])
def test_no_bar_off_a_terminal(stream):
    if stream is None:
        stream = object()  # a stream without isatty()
    bar = progress_bar(total=5, file=stream, desc="work")
    assert isinstance(bar, NullBar)
    bar.update(2)
    bar.set_postfix(loss=1.0)
    bar.set_postfix_str("x")
    bar.set_description("y")
    bar.refresh()
    bar.close()
    assert (bar.n, bar.total) == (2, 5)
    if isinstance(stream, io.StringIO):
        assert stream.getvalue() == ""


def test_disable_wins_on_a_terminal():
    stream = Terminal()
    assert isinstance(progress_bar(total=2, file=stream, disable=True), NullBar)
    assert stream.getvalue() == ""


def test_without_tqdm_nothing_is_drawn(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    stream = Terminal()
    bar = progress_bar(["a", "b"], file=stream)
    assert isinstance(bar, NullBar) and len(bar) == 2
    assert list(bar) == ["a", "b"] and bar.n == 2
    assert stream.getvalue() == ""


def test_null_bar_write_and_errors(capsys):
    out = io.StringIO()
    NullBar.write("to a file", file=out)
    progress_bar(total=1, disable=True).write("to stdout")
    assert out.getvalue() == "to a file\n"
    assert capsys.readouterr().out == "to stdout\n"
    with pytest.raises(TypeError, match="without an iterable"):
        list(NullBar(total=3))


def test_training_loop_draws_no_bar_into_a_pipe(capsys):
    # pytest's captured stderr is not a terminal: progress=True must leave it empty.
    train_set, test_set = load_dataset("teacher")
    torch.manual_seed(0)
    model = build_model("mlp", train_set.info, hidden=(8,))
    opt = make_optimizer("sgd", model, lr=0.1)
    train(model, opt, train_set.subset(256), test_set.subset(64), "cross_entropy",
          TrainConfig(epochs=1, batch_size=64, progress=True, desc="epochs"))
    assert capsys.readouterr().err == ""
