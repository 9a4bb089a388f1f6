"""Finding the tensor the likelihood sees (the logits) in whatever the model's forward returns.

``output_key`` says where it is: ``None`` (the default) takes a tensor as it is, the ``"logits"``
entry of a mapping (a dict, or a Hugging Face ``ModelOutput``) or the ``.logits`` attribute of an
object; a string names another key or attribute, an integer an index of a tuple or list. Anything
else is refused with an error that says what to pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def check_output_key(key: Any) -> str | int | None:
    """``key`` if it is ``None``, a string or a non-negative integer; ``ValueError`` otherwise."""
    if key is None or isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    raise ValueError(f"invalid output_key={key!r}: expected None, a key/attribute name (str) or "
                     "a tuple index (int >= 0)")


def find_output(output: Any, key: str | int | None) -> Tensor:
    """The logits inside ``output`` (see the module docstring); ``ValueError`` saying what to pass
    when they cannot be found."""
    if key is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping) and "logits" in output:
            key = "logits"
        elif not isinstance(output, (tuple, list)) and isinstance(
                getattr(output, "logits", None), Tensor):
            key = "logits"
        else:
            raise ValueError(
                f"natgrad: the model returned a {type(output).__name__}, not a tensor; pass "
                "output_key=<key, attribute or index of the logits> (e.g. output_key=0 for a "
                "tuple whose first entry is the logits)"
            )
    try:
        if isinstance(key, int):
            found = output[key]
        elif isinstance(output, Mapping):
            found = output[key]
        else:
            found = getattr(output, key)
    except (KeyError, IndexError, AttributeError, TypeError):
        raise ValueError(f"natgrad: output_key={key!r} is not in the model's output "
                         f"({type(output).__name__})") from None
    if not isinstance(found, Tensor):
        raise ValueError(f"natgrad: output_key={key!r} gives a {type(found).__name__}, not the "
                         "logits tensor")
    return found

