"""What is known about each data set before loading it, importable without torch or numpy.

:class:`DatasetInfo` (input shape, classes, vocabulary), the info of every registered data set
and the file names of the file-backed ones: :mod:`natgrad.data.registry` builds its table from
these (so the command line's help lists the data sets without importing torch), and the loader
modules import them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
        name: registry name, e.g. ``"mnist5k"``.
        input_shape: shape of one input, ``(C, H, W)`` for images, ``(D,)`` for vectors or
            ``(T,)`` for token sequences.
        num_classes: number of labels (per position for sequences).
        vocab: the number of token values for token-sequence inputs (int64 ids, one label
            per position); 0 for real-valued inputs.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    vocab: int = 0

    @property
    def is_sequence(self) -> bool:
        """True for token-sequence inputs ``(T,)`` of int64 ids with a label per position."""
        return self.vocab > 0

    @property
    def is_image(self) -> bool:
        """True for ``(C, H, W)`` inputs."""
        return len(self.input_shape) == 3 and not self.is_sequence

    @property
    def in_features(self) -> int:
        """Number of input values per sample (``C·H·W`` for images)."""
        return math.prod(self.input_shape)

    @property
    def in_channels(self) -> int:
        """Channels ``C`` of an image input (1 for a vector input)."""
        return self.input_shape[0] if self.is_image else 1

    @property
    def image_size(self) -> int:
        """Height ``H`` (= width) of a square image input."""
        if not self.is_image:
            raise ValueError(f"data set {self.name!r} has no images (input {self.input_shape})")
        return self.input_shape[1]


MNIST5K_INFO = DatasetInfo("mnist5k", (1, 28, 28), 10)
MNIST_INFO = DatasetInfo("mnist", (1, 28, 28), 10)
FASHION_INFO = DatasetInfo("fashion-mnist", (1, 28, 28), 10)
CIFAR10_INFO = DatasetInfo("cifar10", (3, 32, 32), 10)
TEACHER_INFO = DatasetInfo("teacher", (20,), 4)
MAJORITY_INFO = DatasetInfo("majority", (16,), 8, vocab=8)
#: at the default context of 64 characters; 84 = the characters of the embedded text
SHAKESPEARE_CHAR_INFO = DatasetInfo("shakespeare_char", (64,), 84, vocab=84)

#: the four IDX files of MNIST and Fashion-MNIST (raw or ``.gz``)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: CIFAR-10's pickle batches and the folder they are extracted to
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)
CIFAR_SUBDIR = "cifar-10-batches-py"
