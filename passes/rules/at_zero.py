"""What an element-wise node gives when its channel input is zero: f(0), evaluated from the op.

Removing a channel equals zeroing it only where f(0) = 0 (docs/design.md, "Op rules"). The element-wise
rule asks `at_zero` instead of trusting a list of ops: it runs the node's own op (the module for
call_module, the function or the tensor method otherwise) on a small zeros tensor standing for
its first argument, with the node's constant arguments as they are. Other tensor arguments are
not known at analysis time, so the op is run once for each of a few probe fills of them (True
and False for masks; 0, 1, -1 and 0.5 for numbers): f(0) = 0 must hold for every probe.
Arguments computed at run time are read from the trace where it recorded them (sizes, a
tensor's dtype); any other is a reason the op cannot be evaluated.

Assumes the node's shapes were recorded by the trace pass. Probes are at most 4 wide per dim
(element-wise ops broadcast the same way on any size), on the device of the model's weights.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from pcompiler.errors import one_line
from pcompiler.ir import TensorInfo, int_value, op_name, tensor_at
from pcompiler.passes.rules.base import lookup

_PROBES = {torch.bool: (True, False)}
_NUMBER_PROBES = (0.0, 1.0, -1.0, 0.5)
_WIDTH = 4


@dataclass(frozen=True)
class AtZero:
    """f(0) of one node. zero: f(0) = 0 everywhere, for every probe of the other tensor
    arguments. value: a value f(0) took that is not 0 (None when zero or not evaluated).
    error: why the op could not be evaluated (None when it was)."""

    op: str
    zero: bool
    value: float | None = None
    error: str | None = None

    @property
    def finite(self) -> bool:
        return self.value is not None and math.isfinite(self.value)

    def reason(self) -> str:
        """Why the channels are pinned (only meaningful when not zero)."""
        if self.error is not None:
            return (f"{self.op} cannot be evaluated at 0 ({self.error}): removing a channel equals zeroing it "
                    "only where f(0) = 0")
        return f"{self.op}(0) = {self.value:.6g}, not 0: removing a channel here is not zeroing it"


class _Unknown(Exception):
    """An argument whose value the analysis does not know."""


def _shown_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """The op as a user writes it: the module class, or the function's, method's or ATen op's name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return op_name(node.target)


def _probe_device(gm: fx.GraphModule) -> torch.device:
    p = next(iter(gm.parameters()), None)
    return p.device if p is not None and not p.is_meta else torch.device("cpu")


def _small(info: TensorInfo, fill: Any, device: torch.device) -> torch.Tensor:
    shape = tuple(min(s, _WIDTH) for s in info.shape)
    return torch.full(shape, fill, dtype=info.dtype, device=device)


def _constant(value: fx.Node, device: torch.device) -> Any:
    """The value of a non-tensor node the trace knows: an int size, a tensor's dtype or device."""
    n = int_value(value)
    if n is not None:
        return n
    if value.op == "call_function" and value.target is getattr and len(value.args) == 2:
        owner, attr = value.args
        info = tensor_at(owner) if isinstance(owner, fx.Node) else None
        if info is not None and attr == "dtype":
            return info.dtype
        if info is not None and attr == "device":
            return device
    raise _Unknown(f"argument '{value.name}' is computed at run time")


def _arguments(node: fx.Node, zeroed: Collection[fx.Node], fill: Any, device: torch.device) -> tuple[tuple, dict]:
    """The node's arguments with those in `zeroed` as zeros and the other tensors filled with `fill`."""

    def value(a: fx.Node) -> Any:
        info = tensor_at(a)
        if a in zeroed:
            return _small(info, False if info.dtype == torch.bool else 0, device)
        if info is not None:
            return _small(info, fill if info.dtype == torch.bool else float(fill), device)
        return _constant(a, device)

    # Devices written into the graph (export records `.to(x.device)` as the traced device, the
    # meta device for a model that lives there) become the probes' device.
    on_probe = lambda v: device if isinstance(v, torch.device) else v  # noqa: E731
    args = tree_map(on_probe, fx.node.map_arg(node.args, value))
    kwargs = tree_map(on_probe, fx.node.map_arg(node.kwargs, value))
    return args, kwargs


def _run(node: fx.Node, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        self_, *rest = args
        return getattr(self_, node.target)(*rest, **kwargs)
    return node.target(*args, **kwargs)


def _fills(node: fx.Node, zeroed: Collection[fx.Node]) -> tuple[Any, ...]:
    """The probe fills for the node's other tensor arguments (one run when there are none)."""
    others = [a for a in node.all_input_nodes if a not in zeroed and tensor_at(a) is not None]
    if not others:
        return (0.0,)
    if all(tensor_at(a).dtype == torch.bool for a in others):
        return _PROBES[torch.bool]
    if any(tensor_at(a).dtype == torch.bool for a in others):  # a mask and a number: both ways
        return (True, False, *_NUMBER_PROBES)
    return _NUMBER_PROBES


def at_zero(node: fx.Node, zeroed: fx.Node | Collection[fx.Node], gm: fx.GraphModule) -> AtZero:
    """f(0) of `node` with its argument(s) `zeroed` zero (module docstring: how it is evaluated)."""
    zeroed = {zeroed} if isinstance(zeroed, fx.Node) else set(zeroed)
    name, device = _shown_name(node, gm), _probe_device(gm)
    for fill in _fills(node, zeroed):
        try:
            args, kwargs = _arguments(node, zeroed, fill, device)
            with torch.no_grad():
                out = _run(node, gm, args, kwargs)
        except _Unknown as e:
            return AtZero(name, False, error=str(e))
        except Exception as e:  # noqa: BLE001 - an op that cannot run at 0 is pinned, with why
            return AtZero(name, False, error=one_line(e))
        if not isinstance(out, torch.Tensor):
            return AtZero(name, False, error=f"it returns {type(out).__name__}, not a tensor")
        nonzero = out[out != 0]
        if nonzero.numel():
            return AtZero(name, False, value=float(nonzero.flatten()[0]))
    return AtZero(name, True)


_MULTIPLY = ("mul", "mul_", "imul")  # operator.mul, torch.mul, Tensor.mul, aten.mul.Tensor, ... by op_name
_PRODUCTS = ("matmul", "bmm")  # attention's p @ v: a finite p times a zero v is zero
# On the way to such a product: reshapes, a further added mask, dropout, the softmax over keys
# (finite values, each row its own).
_PASS_THROUGH = ("view", "reshape", "_unsafe_view", "permute", "transpose", "contiguous", "clone", "softmax",
                 "_softmax", "add", "add_", "dropout")


def gates_only(node: fx.Node, gm: fx.GraphModule, seen: set[fx.Node] | None = None) -> bool:
    """Whether every user of `node` multiplies it with another tensor that is zero where the
    channel is removed, so a finite f(0) never reaches further: a gate (x * sigmoid(...)), or
    attention's p @ v reached through reshapes, added masks, dropout and the softmax (a removed
    head's logits plus a bias or mask give some distribution over the keys, which multiplies
    that head's zero values). The other factor must not itself be an element-wise op with
    f(0) != 0 (verify checks the rest)."""
    seen = set() if seen is None else seen
    if not node.users or node in seen:
        return bool(node.users)
    seen.add(node)
    for user in node.users:
        kind = _kind(user, gm)
        if kind in _MULTIPLY or kind in _PRODUCTS:
            others = [a for a in user.all_input_nodes if a is not node and tensor_at(a) is not None]
            if not others or any(_carries_constant(a, gm) for a in others):
                return False
        elif kind not in _PASS_THROUGH or not gates_only(user, gm, seen):
            return False
    return True


def _kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if node.op == "call_module":
        return "dropout" if isinstance(gm.get_submodule(node.target), (torch.nn.Dropout, torch.nn.Identity)) else None
    return op_name(node.target) if node.op in ("call_function", "call_method") else None


def _carries_constant(value: fx.Node, gm: fx.GraphModule) -> bool:
    if value.op not in ("call_function", "call_method", "call_module"):
        return False
    _, found = lookup(value, gm)
    first = value.args[0] if value.args else None
    if found is None or found.analyze.__name__ != "unary" or not isinstance(first, fx.Node):
        return False
    return not at_zero(value, first, gm).zero
