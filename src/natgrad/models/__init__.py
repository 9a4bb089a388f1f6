"""Models: :class:`MLP`, :class:`SmallCNN`, :class:`ResNet8`, :class:`CausalTransformer`,
:class:`DeepAutoencoder`, :class:`WideCNN` and the :data:`MODELS` table.

>>> from natgrad.data import dataset_info
>>> model = build_model("mlp", dataset_info("mnist5k"))
>>> loss_kind("autoencoder")
'bce'
"""

from .nets import MLP, DeepAutoencoder, SmallCNN
from .registry import (
    MODELS,
    ModelSpec,
    build_model,
    get_model_spec,
    load_checkpoint,
    loss_kind,
    save_checkpoint,
)
from .resnet import ResNet8
from .transformer import CausalTransformer
from .widecnn import WideCNN

__all__ = [
    "MLP",
    "CausalTransformer",
    "ResNet8",
    "MODELS",
    "DeepAutoencoder",
    "ModelSpec",
    "SmallCNN",
    "WideCNN",
    "build_model",
    "get_model_spec",
    "load_checkpoint",
    "loss_kind",
    "save_checkpoint",
]
