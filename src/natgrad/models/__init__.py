"""Models: :class:`MLP`, :class:`SmallCNN`, :class:`ResNet8`, :class:`CausalTransformer`,
:class:`GPT`, :class:`DeepAutoencoder`, :class:`WideCNN` and the :data:`MODELS` table.

>>> from natgrad.data import dataset_info
>>> model = build_model("mlp", dataset_info("mnist5k"))
>>> loss_kind("autoencoder")
'bce'

The table (:data:`MODELS`) and its functions import no torch until a model is built; the network
classes are imported on first access. :mod:`natgrad.models.zoo` holds tiny replicas of the
networks users bring from timm and Hugging Face ``transformers`` (for tests and benchmarks; not
in the table).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import (
    MODELS,
    ModelSpec,
    build_model,
    default_dataset,
    get_model_spec,
    load_checkpoint,
    loss_kind,
    payload_digest,
    read_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:  # pragma: no cover - imported lazily by __getattr__
    from .gpt import GPT
    from .nets import MLP, DeepAutoencoder, SmallCNN
    from .resnet import ResNet8
    from .transformer import CausalTransformer
    from .widecnn import WideCNN

#: network class → the module defining it
_NETWORKS = {"MLP": "nets", "DeepAutoencoder": "nets", "SmallCNN": "nets", "ResNet8": "resnet",
             "CausalTransformer": "transformer", "GPT": "gpt", "WideCNN": "widecnn"}

__all__ = [
    "MLP",
    "CausalTransformer",
    "GPT",
    "ResNet8",
    "MODELS",
    "DeepAutoencoder",
    "ModelSpec",
    "SmallCNN",
    "WideCNN",
    "build_model",
    "default_dataset",
    "get_model_spec",
    "load_checkpoint",
    "loss_kind",
    "payload_digest",
    "read_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in _NETWORKS:
        return getattr(importlib.import_module(f"{__name__}.{_NETWORKS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
