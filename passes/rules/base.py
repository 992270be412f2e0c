"""The op-rule registry and the context a rule talks to.

An op rule says, for one fx node, how the channels of its inputs, outputs and parameters map
onto each other. It does so with a few calls on `RuleContext`:

- `same(a, b)`: dimension a and dimension b are the same channels, index for index;
- `link(a, ia, b, ib)`: element ia[k] of a is element ib[k] of b (concat offsets, blocks, ...);
- `pin(ref, reason)`: these channels may not be removed, and why;
- `approximate(ref, reason, where)`: removing these channels is not exactly zeroing them (a
  LayerNorm's statistics): pinned, unless the user asked to prune them anyway
  (`--prune-normalized`);
- `role(ref, Role.X)`: a parameter dimension produces, consumes or rides along with a channel;
- `choice(...)`: a reshape that splits one dim into several (or merges several into one) can
  carry channels through only one of the sub-dims; the analysis picks which (see analyze.py);
- `head(ref)`: this dim holds attention heads; such choices carry whole heads where they can.

A rule may also rewrite the graph after `slim` (`RewriteContext`): module attributes
(`out_channels`, `groups`, ...) and literal constants (view sizes, split sizes, sdpa scale).

Rules are registered by fx target: the module class for call_module, the ATen overload (the
export frontend's graphs) or the function for call_function, the method name for call_method.
No rule for a target: its channels are pinned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from pcompiler.ir import DimRef, TensorInfo, ValuePath, iter_tensors, node_value, tensor_at


class RuleError(Exception):
    """A rule met a case it cannot map; the analysis pins the node's channels with this reason."""


@dataclass(frozen=True)
class OpRule:
    analyze: Callable[[fx.Node, RuleContext], None]
    rewrite: Callable[[fx.Node, RewriteContext], None] | None = None


_RULES: dict[Any, OpRule] = {}


def rule(*targets: Any) -> Callable:
    """Register the decorated function as the analyze rule of every target."""

    def deco(fn: Callable[[fx.Node, RuleContext], None]) -> Callable:
        for t in targets:
            old = _RULES.get(t)
            _RULES[t] = OpRule(fn, old.rewrite if old else None)
        return fn

    return deco


def targets_of(analyze: Callable[[fx.Node, RuleContext], None]) -> list[Any]:
    """Every registry key whose analyze rule is `analyze` (for tests that cover a whole rule)."""
    return [t for t, r in _RULES.items() if r.analyze is analyze]


def rewriter(*targets: Any) -> Callable:
    """Register the decorated function as the slim-time rewrite of every target."""

    def deco(fn: Callable[[fx.Node, RewriteContext], None]) -> Callable:
        for t in targets:
            if t not in _RULES:
                raise KeyError(f"rewrite for {t!r} registered before its analyze rule")
            _RULES[t] = OpRule(_RULES[t].analyze, fn)
        return fn

    return deco


def lookup(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, OpRule | None]:
    """The registry key of `node` and its rule (None when there is none). Functions of
    libraries the rules must not import (torchvision's fx-wrapped ops) are registered by their
    qualified name."""
    if node.op == "call_module":
        key: Any = type(gm.get_submodule(node.target))
    else:
        key = node.target
    found = _RULES.get(key)
    if found is None and node.op == "call_function":
        found = _RULES.get(target_name(key))
    return key, found


def target_name(key: Any) -> str:
    if isinstance(key, str):
        return f"Tensor.{key}"
    if isinstance(key, torch._ops.OpOverload):
        return str(key)  # aten.add_.Tensor
    mod = getattr(key, "__module__", "") or ""
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None) or repr(key)
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def aten_ops(*names: str) -> list[torch._ops.OpOverload]:
    """The overloads of each named ATen op that an exported graph can hold on tensors:
    aten_ops("add") is aten.add.Tensor, aten.add.Scalar, ...; not aten.add.out (it writes into
    its `out=`), nor overloads on numbers (aten.add.int: arithmetic on sizes). An overload is
    on tensors when it takes or returns one, wherever in its schema: aten.einsum.default takes
    the equation first, aten.zeros.default only sizes."""
    ops = []
    for name in names:
        packet = getattr(torch.ops.aten, name)
        for overload in packet.overloads():
            op = getattr(packet, overload)
            args = op._schema.arguments
            writes_out = any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in args)
            on_tensors = any("Tensor" in str(a.type) for a in (*args, *op._schema.returns))
            if on_tensors and not writes_out:
                ops.append(op)
    return ops


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


@dataclass(frozen=True)
class Choice:
    """A reshape block: `single` (one dim) is split into / merged from `multi` (several dims,
    outer to inner). Channels flow through one sub-dim only; the others are pinned."""

    node: str
    single: DimRef
    multi: tuple[DimRef, ...]
    sizes: tuple[int, ...]


class RuleContext:
    """What a rule sees of the analysis: shapes, and calls that record channel maps."""

    def __init__(self, analysis_state: Any, gm: fx.GraphModule):
        self._s = analysis_state
        self.gm = gm

    # --- shapes -------------------------------------------------------------------------------
    @staticmethod
    def info(value: Any, path: ValuePath = ()) -> TensorInfo | None:
        """TensorInfo of a node argument (None for constants and non-tensors)."""
        return tensor_at(value, path) if isinstance(value, fx.Node) else None

    def ref(self, node: fx.Node, dim: int, path: ValuePath = ()) -> DimRef:
        t = tensor_at(node, path)
        if t is None:
            raise RuleError(f"'{node.name}' has no tensor value to take dim {dim} of")
        if not -t.ndim <= dim < t.ndim:
            raise RuleError(f"dim {dim} out of range for '{node.name}' of shape {list(t.shape)}")
        return DimRef(dim % t.ndim, node=node.name, path=path)

    def param_ref(self, qualname: str, dim: int) -> DimRef:
        return DimRef(dim, param=qualname)

    def size(self, ref: DimRef) -> int:
        return self._s.size_of(ref)

    # --- channel maps --------------------------------------------------------------------------
    def same(self, a: DimRef, b: DimRef) -> None:
        """a and b are the same channels. A size-1 side is a broadcast and couples nothing."""
        na, nb = self.size(a), self.size(b)
        if na == nb:
            idx = np.arange(na)
            self._s.add_link(a, idx, b, idx)
        elif na != 1 and nb != 1:
            raise RuleError(f"{a} has {na} channels but {b} has {nb}")

    def link(self, a: DimRef, ia: np.ndarray, b: DimRef, ib: np.ndarray) -> None:
        self._s.add_link(a, np.asarray(ia, dtype=np.int64), b, np.asarray(ib, dtype=np.int64))

    def same_shape(self, a: fx.Node, b: fx.Node, a_path: ValuePath = (), b_path: ValuePath = ()) -> None:
        """Every dim of a is the same as b's (right-aligned, as broadcasting aligns them)."""
        ta, tb = tensor_at(a, a_path), tensor_at(b, b_path)
        if ta is None or tb is None:
            return
        for k in range(1, min(ta.ndim, tb.ndim) + 1):
            self.same(self.ref(a, -k, a_path), self.ref(b, -k, b_path))

    def pin(self, ref: DimRef, reason: str) -> None:
        self._s.add_pin(ref, reason)

    def approximate(self, ref: DimRef, reason: str, where: str) -> None:
        """Removing `ref`'s channels is not exactly zeroing them, because of `where` (an op, by
        the user's name for it): pinned for `reason`, unless the user asked to prune such
        channels (`--prune-normalized`); then their group lists `where` as approximate."""
        self._s.add_approximate(ref, reason, where)

    def pin_tensor(self, value: Any, reason: str) -> None:
        """Pin every dim of every tensor in a node's value (for non-nodes: nothing)."""
        if isinstance(value, fx.Node):
            for path, t in iter_tensors(node_value(value)):
                for d in range(t.ndim):
                    self.pin(DimRef(d, node=value.name, path=path), reason)

    def pin_node(self, node: fx.Node, reason: str) -> None:
        """Pin every dim of the node's output and of every tensor it reads (params included)."""
        self.pin_tensor(node, reason)
        for inp in node.all_input_nodes:
            self.pin_tensor(inp, reason)
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            for pname, p in list(mod.named_parameters(recurse=True)) + list(mod.named_buffers(recurse=True)):
                for d in range(p.ndim):
                    self.pin(self.param_ref(f"{node.target}.{pname}", d), reason)

    def role(self, ref: DimRef, role: str) -> None:
        """Declare the role of a parameter dim. `ref` may be a dim of a get_attr node's value."""
        self._s.set_role(ref, role)

    def head(self, ref: DimRef) -> None:
        """`ref` is a dim of attention heads (batch dims of an attention contraction): a reshape
        that splits or merges it carries channels by whole heads, where it can (analyze.py)."""
        self._s.add_head(ref)

    def choice(self, node: fx.Node, single: DimRef, multi: list[DimRef]) -> None:
        self._s.add_choice(Choice(node.name, single, tuple(multi), tuple(self.size(m) for m in multi)))

    # --- module parameters -----------------------------------------------------------------------
    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(node.target)

    def module_param(self, node: fx.Node, name: str, dim: int, role: str) -> DimRef | None:
        """The dim of parameter/buffer `name` of the node's module, with its role; None if absent."""
        t = getattr(self.module(node), name, None)
        if not isinstance(t, torch.Tensor):
            return None
        ref = self.param_ref(f"{node.target}.{name}", dim)
        self.role(ref, role)
        return ref


class RewriteContext:
    """What a rewrite sees after slicing: the new size of every dim."""

    def __init__(self, gm: fx.GraphModule, new_size: Callable[[DimRef], int], removed: Callable[[DimRef], np.ndarray]):
        self.gm = gm
        self._new_size = new_size
        self._removed = removed
        self._aliases: dict[str, str] = {}

    def _ref(self, node: fx.Node, dim: int, path: ValuePath) -> DimRef:
        t = tensor_at(node, path)
        assert t is not None, f"no tensor at '{node.name}'"
        return DimRef(dim % t.ndim, node=self._aliases.get(node.name, node.name), path=path)

    def new_size(self, node: fx.Node, dim: int, path: ValuePath = ()) -> int:
        return self._new_size(self._ref(node, dim, path))

    def removed(self, node: fx.Node, dim: int, path: ValuePath = ()) -> np.ndarray:
        """Positions removed from dim `dim` of the node's value (original numbering)."""
        return self._removed(self._ref(node, dim, path))

    def insert_after(self, node: fx.Node, target: Any, args: tuple) -> fx.Node:
        """A call of `target` on `args` right after `node`, taking over `node`'s uses; its dims
        are `node`'s (same sizes, same channels removed) for the rewrites of later nodes."""
        with node.graph.inserting_after(node):
            new = node.graph.call_function(target, args)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        new.meta.update(node.meta)
        self._aliases[new.name] = self._aliases.get(node.name, node.name)
        return new

    def old_size(self, node: fx.Node, dim: int, path: ValuePath = ()) -> int:
        t = tensor_at(node, path)
        assert t is not None
        return t.shape[dim]

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(node.target)
