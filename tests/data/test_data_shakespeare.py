"""The embedded Shakespeare text: splits, windows, vocabulary, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from natgrad.data import DataError, dataset_info, load_dataset
from natgrad.data.shakespeare import (
    decode,
    embedded_path,
    encode,
    load_corpus,
    load_shakespeare_splits,
    windows,
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_file_is_small_and_registered(corpus):
    assert embedded_path().stat().st_size <= 3 * 1024 * 1024
    vocab, ids = corpus
    info = dataset_info("shakespeare_char")
    assert len(vocab) == info.vocab == info.num_classes  # the torch-free info matches the file
    assert info.is_sequence and info.input_shape == (64,)


def test_splits_are_90_5_5_and_read_as_text(corpus):
    vocab, ids = corpus
    n = {k: len(v) for k, v in ids.items()}
    total = sum(n.values())
    assert 4.5e6 < total < 5.5e6
    assert abs(n["train"] / total - 0.9) < 1e-3 and abs(n["validation"] - n["test"]) <= 42
    train = decode(ids["train"], vocab)
    assert "HAMLET, PRINCE OF DENMARK" in train and "Shall I compare thee" in train
    assert vocab == "".join(sorted(vocab)) and vocab[0] == "\n"


def test_splits_share_no_long_passage(corpus):
    vocab, ids = corpus
    train = decode(ids["train"], vocab)
    for split in ("validation", "test"):
        held = decode(ids[split], vocab)
        # 200-character passages from the held-out splits never occur in the training text
        starts = range(1000, len(held) - 200, len(held) // 20)
        assert not any(held[s:s + 200] in train for s in starts)


def test_registry_windows_are_next_character_targets():
    train, test = load_dataset("shakespeare_char")
    assert train.x.shape[1] == 64 and train.x.dtype == train.y.dtype == torch.int64
    assert torch.equal(train.x[:, 1:], train.y[:, :-1])  # the target is the input shifted by one
    assert torch.equal(train.x[1:, 0], train.y[:-1, -1])  # non-overlapping, contiguous windows
    assert train.info == test.info == dataset_info("shakespeare_char")


@pytest.mark.parametrize("context, stride", [(16, None), (8, 3)])
def test_context_and_stride_are_selectable(context, stride):
    splits = load_shakespeare_splits(context, stride)
    assert set(splits) == {"train", "validation", "test"}
    val = splits["validation"]
    assert val.x.shape[1] == context and val.info.input_shape == (context,)
    step = stride or context
    assert torch.equal(val.x[1, : context - step], val.x[0, step:])


def test_windows_cover_every_full_window():
    ids = np.arange(11, dtype=np.uint8)
    x, y = windows(ids, 3, 2)
    assert x.tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8]]
    assert y[-1].tolist() == [7, 8, 9]  # the window starting at 8 would need id 11: left out
    with pytest.raises(ValueError, match="no window"):
        windows(ids[:3], 3, 1)


def test_encode_decode_round_trip(corpus):
    vocab, _ = corpus
    text = "To be, or not to be: that is the question.\n"
    assert decode(encode(text, vocab), vocab) == text
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("naïve", vocab)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_context_is_named(bad):
    with pytest.raises(ValueError, match="context must be a positive integer"):
        load_shakespeare_splits(bad)


def test_missing_or_damaged_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(tmp_path / "none.npz")
    damaged = tmp_path / "bad.npz"
    damaged.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_corpus(damaged)
    partial = tmp_path / "partial.npz"
    np.savez(partial, vocab=np.array([97], dtype=np.uint8))
    with pytest.raises(DataError, match="missing array"):
        load_corpus(partial)
