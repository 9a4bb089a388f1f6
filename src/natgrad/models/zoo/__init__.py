"""The zoo: tiny, randomly initialised replicas of the networks users bring (issue 24).

natgrad's own networks (:mod:`natgrad.models`) are built from the layers it preconditions; the
zoo is built the way timm and Hugging Face ``transformers`` build theirs — norm layers that
subclass torch's with another forward, depthwise convolutions, squeeze-excitation, layer scale,
class tokens, in-place residuals, ``F.scaled_dot_product_attention``, tied embeddings,
``Conv1D``, RMSNorm — so that the test suite (``tests/zoo``) and ``benchmarks/zoo_steps.py``
check natgrad on them.

:data:`ZOO` maps a name to a :class:`ZooModel`: how to build it and how to make a batch for it.

>>> spec = ZOO["mobilenet_like"]
>>> spec.inputs, spec.output
('image', 'class')

The image networks (:mod:`~natgrad.models.zoo.nets`) need torch only; the ``transformers``
models (:mod:`~natgrad.models.zoo.hf`) need the ``zoo`` extra, imported when one is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry.

    Attributes:
        build: ``build(**widths) -> nn.Module`` (torch's global RNG); without arguments the
            zoo's tiny widths, else the network's or builder's own keyword arguments (e.g.
            ``width=32``, ``dim=64``).
        inputs: ``"image"`` (``(B, 3, 16, 16)`` floats) or ``"tokens"`` (``(B, 8)`` ids below
            16).
        output: ``"class"`` (logits ``(B, C)``) or ``"sequence"`` (next-token logits
            ``(B, T, vocab)``; the label of position ``t`` is the token at ``t + 1``).
        num_classes: ``C`` for ``"class"`` outputs, the vocabulary for ``"sequence"``.
        transformers: built with Hugging Face ``transformers`` (the ``zoo`` extra).
    """

    build: Callable[..., nn.Module]
    inputs: str
    output: str
    num_classes: int
    transformers: bool = False

    def batch(self, n: int, generator: torch.Generator,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` for ``n`` samples drawn from ``generator``: random images and class ids,
        or random token ids with ``y`` the ids themselves (``(n, T)``: the Fisher operators'
        sequence targets; a causal LM's loss shifts them) or a class per sequence."""
        import torch

        if self.inputs == "image":
            x = torch.randn(n, 3, 16, 16, generator=generator, dtype=dtype)
            return x, torch.randint(0, self.num_classes, (n,), generator=generator)
        ids = torch.randint(0, 16, (n, 8), generator=generator)
        if self.output == "sequence":
            return ids, ids.clone()
        return ids, torch.randint(0, self.num_classes, (n,), generator=generator)


def _net(cls_name: str) -> Callable[..., nn.Module]:
    def build(**widths: Any) -> nn.Module:
        from . import nets

        return getattr(nets, cls_name)(**widths)

    return build


def _hf(fn_name: str) -> Callable[..., nn.Module]:
    def build(**widths: Any) -> nn.Module:
        from . import hf

        return getattr(hf, fn_name)(**widths)

    return build


#: name → how to build the model and its batches
ZOO: dict[str, ZooModel] = {
    "mobilenet_like": ZooModel(_net("MobileNetLike"), "image", "class", 5),
    "convnext_like": ZooModel(_net("ConvNeXtLike"), "image", "class", 5),
    "vit_like": ZooModel(_net("ViTLike"), "image", "class", 5),
    "resnet_inplace": ZooModel(_net("ResNetInplace"), "image", "class", 5),
    "gpt2": ZooModel(_hf("gpt2_tiny"), "tokens", "sequence", 16, transformers=True),
    "bert": ZooModel(_hf("bert_tiny"), "tokens", "class", 3, transformers=True),
    "llama": ZooModel(_hf("llama_tiny"), "tokens", "sequence", 16, transformers=True),
}


def build_zoo_model(name: str, **widths: Any) -> nn.Module:
    """Build zoo model ``name`` (``widths``: see :attr:`ZooModel.build`); ``ValueError``
    listing the accepted names otherwise."""
    try:
        spec = ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; accepted: {', '.join(ZOO)}") from None
    return spec.build(**widths)


__all__ = ["ZOO", "ZooModel", "build_zoo_model"]
