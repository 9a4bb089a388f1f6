"""The table of models: name → builder, loss kind and default widths. Adding a model is one entry.

Checkpoints written by :func:`save_checkpoint` hold the registry name, widths and data-set info
next to the ``state_dict``, so :func:`load_checkpoint` can rebuild the network, and the SHA-256
digest of all of it (:func:`payload_digest`), which :func:`load_checkpoint` verifies: a damaged
file is refused with an error naming it (a checkpoint written before the digest existed loads with
a warning that it could not be checked). The table imports no torch (the command line's help
lists it): the networks are imported when one is built.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.info import DatasetInfo

if TYPE_CHECKING:  # pragma: no cover - torch and the networks are imported on first use
    from torch import nn

Builder = Callable[[DatasetInfo, tuple[int, ...]], "nn.Module"]


def _mlp(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Module:
    from .nets import MLP

    return MLP(info.in_features, hidden, info.num_classes)


def _cnn(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Module:
    from .nets import SmallCNN

    return SmallCNN(info.in_channels, info.num_classes, info.image_size)


def _autoencoder(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Module:
    from .nets import DeepAutoencoder

    return DeepAutoencoder(info.in_features, hidden)


def _resnet8(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Module:
    from .resnet import ResNet8

    return ResNet8(info.in_channels, info.num_classes)


def _transformer(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Module:
    from .transformer import CausalTransformer

    return CausalTransformer(info.vocab, info.num_classes, info.input_shape[0])


def _gpt(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Module:
    from .gpt import GPT

    if len(hidden) != 3:
        raise ValueError(f"model 'gpt' takes hidden = (width, depth, heads), got {hidden}")
    width, depth, heads = hidden
    return GPT(info.vocab, info.input_shape[0], width, depth, heads)


def _widecnn(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Module:
    from .widecnn import WideCNN

    return WideCNN(info.in_channels, info.num_classes, hidden)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        builder: ``builder(info, hidden) -> nn.Module``.
        loss_kind: key of :data:`natgrad.losses.LOSSES` the model is trained with.
        default_hidden: widths used when none are given (empty: the model takes no widths).
        reconstruct: the target is the input itself (autoencoders), not the label.
        needs_images: the model needs ``(C, H, W)`` inputs (``[0, 1]`` pixels for ``bce``).
        needs_tokens: the model needs token-sequence inputs (one label per position).
        dataset: the data set used when none is named (``None``: ``majority`` for token models,
            ``mnist5k`` otherwise).
    """

    builder: Builder
    loss_kind: str
    default_hidden: tuple[int, ...] = ()
    reconstruct: bool = False
    needs_images: bool = False
    needs_tokens: bool = False
    dataset: str | None = None

    @property
    def takes_hidden(self) -> bool:
        """Whether ``hidden`` widths are meaningful for this model."""
        return bool(self.default_hidden)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        _mlp,
        "cross_entropy",
        default_hidden=(256, 128),
    ),
    "cnn": ModelSpec(
        _cnn,
        "cross_entropy",
        needs_images=True,
    ),
    "autoencoder": ModelSpec(
        _autoencoder,
        "bce",
        default_hidden=(1000, 500, 250, 30),
        reconstruct=True,
        needs_images=True,
    ),
    "resnet8": ModelSpec(
        _resnet8,
        "cross_entropy",
        needs_images=True,
    ),
    "transformer": ModelSpec(
        _transformer,
        "cross_entropy",
        needs_tokens=True,
    ),
    "gpt": ModelSpec(  # hidden = (width, depth, heads); 0.43M parameters on shakespeare_char
        _gpt,
        "cross_entropy",
        default_hidden=(128, 2, 4),
        needs_tokens=True,
        dataset="shakespeare_char",
    ),
    "widecnn": ModelSpec(  # hidden = the conv channels
        _widecnn,
        "cross_entropy",
        default_hidden=(128, 256, 512),
        needs_images=True,
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ``ValueError`` listing the accepted names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}") from None


def loss_kind(name: str) -> str:
    """The loss kind (``"cross_entropy"``, ``"bce"``, …) a registered model is trained with."""
    return get_model_spec(name).loss_kind


def default_dataset(name: str) -> str:
    """The data set a registered model uses when none is named: its entry's ``dataset``, else the
    generated ``majority`` sequences for token models and the embedded ``mnist5k`` sample for
    the others."""
    spec = get_model_spec(name)
    if spec.dataset is not None:
        return spec.dataset
    return "majority" if spec.needs_tokens else "mnist5k"


def check_model_args(name: str, info: DatasetInfo, hidden: Sequence[int] | None) -> ModelSpec:
    """Validate a model / data-set / widths combination; ``ValueError`` saying what is wrong."""
    spec = get_model_spec(name)
    if spec.needs_images and not info.is_image:
        raise ValueError(f"model {name!r} needs an image data set, not {info.name!r}")
    if spec.needs_tokens != info.is_sequence:
        kind = "a token-sequence data set" if spec.needs_tokens else "a non-sequence data set"
        raise ValueError(f"model {name!r} needs {kind}, not {info.name!r}")
    if hidden is not None:
        if not spec.takes_hidden:
            raise ValueError(f"model {name!r} takes no hidden widths")
        if len(hidden) == 0 or any(h <= 0 for h in hidden):
            raise ValueError(f"hidden widths must be positive integers, got {tuple(hidden)}")
    return spec


def build_model(
    name: str, dataset_info: DatasetInfo, hidden: Sequence[int] | None = None
) -> nn.Module:
    """Build a registered model for a data set (initialised from torch's global RNG).

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"resnet8"``, ``"transformer"``, ``"gpt"``,
            ``"autoencoder"`` or ``"widecnn"``.
        dataset_info: input shape and number of classes.
        hidden: widths (MLP hidden layers; autoencoder encoder widths; the GPT's
            ``(width, depth, heads)``); default per model.
    """
    spec = check_model_args(name, dataset_info, hidden)
    widths = tuple(hidden) if hidden is not None else spec.default_hidden
    return spec.builder(dataset_info, widths)


#: the checkpoint entry holding :func:`payload_digest` of every other entry
DIGEST_KEY = "sha256"


def _feed(h: Any, value: Any) -> None:
    """Feed ``value`` to the hash ``h`` canonically: mappings by sorted key, sequences in order,
    tensors by dtype, shape and raw bytes, scalars and strings typed (so ``1`` ≠ ``"1"``)."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"M{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"B%d" % len(value) + bytes(value))
    elif isinstance(value, str):
        data = value.encode()
        h.update(b"S%d" % len(data) + data)
    else:  # None, bool, int, float, torch.dtype / torch.Size-like scalars
        h.update(f"{type(value).__name__}:{value!r};".encode())


def payload_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's entries other than :data:`DIGEST_KEY`, computed over
    their values (tensor bytes included), independent of how ``torch.save`` laid them out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    name: str,
    dataset_info: DatasetInfo,
    hidden: Sequence[int] | None = None,
    **extra: Any,
) -> Path:
    """Save ``{"model", "hidden", "dataset", "input_shape", "num_classes", "state_dict", …}`` and
    their SHA-256 digest (``"sha256"``, verified by :func:`load_checkpoint`)."""
    import torch

    spec = get_model_spec(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": name,
        "hidden": list(hidden) if hidden is not None else list(spec.default_hidden),
        "dataset": dataset_info.name,
        "input_shape": list(dataset_info.input_shape),
        "num_classes": dataset_info.num_classes,
        "vocab": dataset_info.vocab,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    if DIGEST_KEY in extra:
        raise ValueError(f"save_checkpoint: {DIGEST_KEY!r} is reserved for the checkpoint's "
                         "digest")
    payload[DIGEST_KEY] = payload_digest(payload)
    torch.save(payload, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The entries of a checkpoint file, verified against its SHA-256 digest.

    Raises:
        ValueError: naming the file, when it cannot be read, is not a natgrad checkpoint, or
            its contents do not match the digest stored with them (the file is damaged).
            Nothing is built or changed.

    A checkpoint without a digest (written before natgrad stored one) is returned with a
    ``UserWarning`` saying that it could not be checked.
    """
    import torch

    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # zip / unpickling errors of a damaged file: one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"checkpoint {path}: cannot be read, the file is damaged or not a "
                         f"torch checkpoint ({first})") from None
    missing = [k for k in ("model", "dataset", "input_shape", "num_classes", "state_dict")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path}: not a natgrad checkpoint (no {missing})")
    stored = ckpt.get(DIGEST_KEY)
    if stored is None:
        warnings.warn(f"checkpoint {path} has no SHA-256 digest (written before natgrad stored "
                      "one): loaded without an integrity check", UserWarning, stacklevel=3)
        return ckpt
    computed = payload_digest(ckpt)
    if computed != stored:
        raise ValueError(f"checkpoint {path}: its contents do not match the SHA-256 digest "
                         f"stored with them (stored {str(stored)[:16]}…, computed "
                         f"{computed[:16]}…): the file is damaged; nothing was loaded")
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint`; returns ``(model, checkpoint dict)``.

    The file is verified first (:func:`read_checkpoint`): a damaged one raises ``ValueError``
    naming it, and nothing is built."""
    ckpt = read_checkpoint(path)
    info = DatasetInfo(ckpt["dataset"], tuple(ckpt["input_shape"]), ckpt["num_classes"],
                       ckpt.get("vocab", 0))
    spec = get_model_spec(ckpt["model"])
    hidden = tuple(ckpt["hidden"]) if spec.takes_hidden else None
    model = build_model(ckpt["model"], info, hidden)
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt
