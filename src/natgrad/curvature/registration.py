"""Which layers get a curvature block, and why every other parameter takes the plain step.

One rule, used by the optimizer, the analysis and the distributed coordinator alike:

1. a module gets a block when a layer helper is registered for its class (or a base class, or
   its name, :mod:`natgrad.layers.registry`) and accepts its configuration; a candidate (a
   subclass with its own ``forward``, a name-pattern match) is checked on its first recorded
   forward and dropped, with the reason, when it does not compute the helper's formula;
2. all of its parameters must be optimised (in the parameter list, ``requires_grad``);
3. **shared parameters** (tied weights, e.g. GPT-2's ``wte.weight`` = ``lm_head.weight``): a
   tensor belongs to one block only, that of its *first* use in model order (its owner). The
   owner's block is built from the owner's statistics alone and preconditions the tensor's whole
   gradient — the sum over all its uses, as autograd accumulates it; a later layer using a tensor
   an earlier one holds gets no block of its own. :attr:`Registration.shared` states this per
   parameter (docs/DESIGN.md, "Shared parameters").

Every parameter left over is listed with the reason (its module's, or that no helper knows its
module type). :meth:`Registration.coverage` is the preconditioned fraction of the parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..layers import LayerHelper, helper_class, helper_for


@dataclass
class Registration:
    """The outcome of :func:`discover`.

    Attributes:
        layers: module name → helper, for the preconditioned layers (model order).
        skipped: module name → why a module with a helper is not preconditioned.
        plain: parameter name → why it takes the plain step (optimised parameters only).
        shared: parameter name → how a tensor used by several registered layers is treated.
        shared_uses: layer name → the layer whose block holds its shared parameters (such a
            layer is also in ``skipped``: its other parameters, if any, take the plain step).
    """

    layers: dict[str, LayerHelper] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    plain: dict[str, str] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    shared_uses: dict[str, str] = field(default_factory=dict)

    def coverage(self, model: nn.Module, params: Iterable[Tensor] | None = None) -> float:
        """The fraction of the optimised parameters' entries (default: all of ``model``'s,
        each tensor counted once) that a block preconditions."""
        tensors = {id(p): p for p in (model.parameters() if params is None else params)}
        held = {id(p) for h in self.layers.values() for p in h.params}
        total = sum(p.numel() for p in tensors.values())
        return sum(p.numel() for i, p in tensors.items() if i in held) / max(1, total)

    def skip(self, name: str, reason: str, model: nn.Module, optimised: set[int]) -> None:
        """Take a layer out (e.g. found to be called functionally), recording ``reason``."""
        helper = self.layers.pop(name)
        self.skipped[name] = reason
        names = {id(p): n for n, p in model.named_parameters()}
        for p in helper.params:
            if id(p) in optimised:
                self.plain[names.get(id(p), "?")] = f"layer {name!r}: {reason}"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel,
                                              nn.DataParallel)) else model


def discover(model: nn.Module, params: Iterable[Tensor] | None = None) -> Registration:
    """Apply the rule of the module docstring to ``model`` (``params``: the optimised
    parameters, default all of the model's)."""
    optimised = ({id(p) for p in model.parameters()} if params is None
                 else {id(p) for p in params})
    reg = Registration()
    owner_of: dict[int, str] = {}
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        helper, reason = helper_for(module)
        if helper is None:
            if reason is not None:
                reg.skipped[name] = reason
            continue
        if not all(id(p) in optimised and p.requires_grad for p in helper.params):
            reg.skipped[name] = "not all of its parameters are optimised"
            continue
        shared = [owner_of[id(p)] for p in helper.params if id(p) in owner_of]
        if shared:  # tied weights: the tensor's block is its first use's (rule 3)
            for p in helper.params:
                users.setdefault(id(p), []).append(name)
            reg.skipped[name] = (f"shares parameters with layer {shared[0]!r}, whose block "
                                 "preconditions them")
            reg.shared_uses[name] = shared[0]
            continue
        helper.name = name
        reg.layers[name] = helper
        for p in helper.params:
            owner_of[id(p)] = name
            users.setdefault(id(p), []).append(name)
    names = {id(p): n for n, p in model.named_parameters()}
    for pid, who in users.items():
        if len(who) > 1 and pid in owner_of:
            uses = ", ".join(repr(w) for w in who)
            reg.shared[names.get(pid, "?")] = (
                f"shared by layers {uses}: one block, layer {owner_of[pid]!r}'s, built from that "
                "use's statistics only, preconditions the gradient summed over all uses")
    # every optimised parameter outside a block, with its module's reason
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or id(p) not in optimised or id(p) in owner_of:
                seen.add(id(p))
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if mname in reg.skipped:
                reg.plain[full] = f"layer {mname or '<model>'!r}: {reg.skipped[mname]}"
            elif helper_class(module) is None:
                reg.plain[full] = (f"{type(module).__name__} has no layer helper "
                                   "(natgrad.layers.register_layer)")
            else:
                reg.plain[full] = f"not a weight of {type(module).__name__} natgrad preconditions"
    return reg
