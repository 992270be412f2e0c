"""The trace pass: turn an `nn.Module` into a `Program` (a torch.fx graph with shapes).

`trace(model, example_inputs)` does three things:

1. Symbolic tracing with torch.fx. Standard `torch.nn` modules (and `leaf_modules`) stay whole
   as `call_module` leaves; containers and user modules (torchvision's and timm's included) are
   traced through. A submodule whose forward cannot be traced (data-dependent control flow,
   iterating a shape, ...) becomes an *opaque leaf*: the nodes it had produced are erased, one
   `call_module` node stands for it, and tracing goes on around it. The innermost failing
   module is the one made opaque. Failure in the root's own forward is a `CompileError`.
2. Shape propagation: the graph is run once on the example inputs (on the meta device when the
   model lives there, so a large model needs no real memory) and every node's value is recorded
   with `pcompiler.ir.set_node_value`.
3. Equivalence: off meta, the traced graph's output must equal the model's own output
   (`pcompiler.compare` with the TRACE tolerance: NaN and infinities must match exactly).

Assumes example inputs are positional tensors, and that the model is deterministic in eval
mode (the model is put into eval mode, in place).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from pcompiler.compare import TRACE, compare, flatten_tensors
from pcompiler.errors import CompileError, one_line
from pcompiler.ir import INT_KEY, Program, call_with, describe, set_node_value
from pcompiler.passes.decompose import decompose_multihead_attention
from pcompiler.passes.exported import export_graph
from pcompiler.passes.rules.base import lookup, target_name

log = logging.getLogger("pcompiler")

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Tracer(fx.Tracer):
    """A Tracer that keeps torch.nn modules whole and turns untraceable submodules opaque."""

    def __init__(self, leaf_modules: tuple[type, ...]):
        super().__init__()
        self.leaf_types = tuple(leaf_modules)
        self.opaque: dict[str, str] = {}
        # torch.fx keeps this cache as a local of `trace`; we grab it from `getattr` so a failed
        # submodule's get_attr proxies can be dropped with the nodes they point to.
        self._param_cache: dict[str, fx.Proxy] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque or isinstance(m, self.leaf_types):
            return True
        if isinstance(m, _CONTAINERS):
            return False
        return type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._param_cache = parameter_proxy_cache
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last = next(iter(reversed(self.graph.nodes)), None)
        stack_depth = len(self.module_stack)
        num_calls = dict(self.num_calls)
        opaque_before = dict(self.opaque)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure inside makes the module opaque
            reason = one_line(e)
        self._undo(last)
        # Tracer.call_module pushed onto module_stack and bumped num_calls before the forward
        # raised; undo both so the leaf call below records the same scope a normal leaf would.
        while len(self.module_stack) > stack_depth:
            self.module_stack.popitem(last=True)
        self.num_calls.clear()
        self.num_calls.update(num_calls)
        # Modules made opaque inside this one are gone with its nodes.
        self.opaque.clear()
        self.opaque.update(opaque_before)
        self.opaque[qualname] = reason
        log.warning("cannot trace %s (%s); keeping it as an opaque module", qualname, reason)
        return super().call_module(m, forward, args, kwargs)  # now a leaf: one call_module node

    def _undo(self, last: fx.Node | None) -> None:
        """Erase every node created after `last`, newest first."""
        created: list[fx.Node] = []
        for node in reversed(self.graph.nodes):
            if node is last:
                break
            created.append(node)
        erased = set(created)
        for node in created:
            self.graph.erase_node(node)
            self.node_name_to_scope.pop(node.name, None)
        if self._param_cache is not None:
            for name in [k for k, p in self._param_cache.items() if p.node in erased]:
                del self._param_cache[name]


def _meta_layer_norm(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor | None:
    shape = tuple(m.normalized_shape)
    ok = tuple(x.shape[x.ndim - len(shape):]) == shape and all(
        t is None or tuple(t.shape) == shape for t in (m.weight, m.bias))
    return torch.empty_like(x) if ok else None


def _meta_linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    out, inp = m.weight.shape
    ok = x.ndim and x.shape[-1] == inp and x.dtype == m.weight.dtype and (m.bias is None or m.bias.shape == (out,))
    return x.new_empty((*x.shape[:-1], out)) if ok else None


# Modules whose output shape and dtype follow from their input and weights without running a
# kernel: on meta tensors torch would run their decompositions (layer_norm's is 40% of a
# ConvNeXt's shape propagation). Exact types only (a subclass may change what forward returns);
# sizes are read from the weights, not from attributes that may be stale; an input the module
# would refuse (None here) runs the module, which raises.
_META_SHAPES = {nn.LayerNorm: _meta_layer_norm, nn.GELU: lambda m, x: torch.empty_like(x), nn.Linear: _meta_linear}


class _ShapeProp(fx.Interpreter):
    """Runs the graph and records every node's value (shape and dtype)."""

    def __init__(self, gm: fx.GraphModule, opaque: dict[str, str], on_meta: bool):
        super().__init__(gm)
        self.opaque, self.on_meta = opaque, on_meta

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        m = self.fetch_attr(target)
        shape = _META_SHAPES.get(type(m)) if self.on_meta and not kwargs and len(args) == 1 else None
        if shape is not None and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            out = shape(m, args[0])
            if out is not None:
                return out
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            hint = "check that --input-shape (the example inputs) matches what the model expects"
            if self.on_meta and n.op == "call_module" and n.target in self.opaque:
                # An opaque module was opaque because of data-dependent code, which meta
                # tensors cannot run.
                hint = f"'{n.target}' is opaque ({self.opaque[n.target]}); trace with real weights and inputs"
            raise CompileError(
                f"shape propagation failed at {n.op} {_target_name(n)}: {one_line(e)}",
                node=n.name,
                hint=hint,
            ) from e
        set_node_value(n, describe(result))
        if isinstance(result, int) and not isinstance(result, bool):
            n.meta[INT_KEY] = result  # sizes computed in the graph (x.shape[-1] // 2 ...)
        return result


def _target_name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__qualname__", None) or getattr(t, "__name__", str(t))


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    """The path of the first place where `a` (traced) and `b` (model) differ, or None."""
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return where
        return None if compare(a, b, TRACE).ok else where
    if isinstance(b, Mapping):
        if not isinstance(a, Mapping) or set(a) != set(b):
            return where
        return next((d for k in b if (d := _first_difference(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(b, (tuple, list)):
        if not isinstance(a, (tuple, list)) or len(a) != len(b):
            return where
        fields = getattr(b, "_fields", None)  # namedtuple: name items by field
        names = [f".{f}" for f in fields] if fields else [f"[{i}]" for i in range(len(b))]
        return next((d for x, y, s in zip(a, b, names) if (d := _first_difference(x, y, where + s))), None)
    if isinstance(b, float) and isinstance(a, float):
        return None if compare(torch.tensor(a), torch.tensor(b), TRACE).ok else where
    try:
        return None if bool(a == b) else where
    except Exception:  # noqa: BLE001 - what cannot be compared is not taken as equal
        return f"{where} (a {type(b).__name__}, which cannot be compared)"


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], opaque: dict[str, str] | None = None) -> Any:
    """Run `gm` on `inputs`, record every node's value, and return the output."""
    on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs)
    with torch.no_grad():
        if not on_meta:
            # Shapes need no arithmetic: meta copies of the weights (no data is copied) give
            # them without running a kernel. Code that needs real values (data-dependent
            # branches in opaque modules) falls back to a real run.
            meta = {k: v.to("meta") for k, v in [*gm.named_parameters(), *gm.named_buffers()]}
            meta_inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
            try:
                with _reparametrize_module(gm, meta):
                    return _ShapeProp(gm, opaque or {}, True).run(*meta_inputs)
            except Exception as e:  # noqa: BLE001 - the real run below reports real errors
                log.debug("shape propagation on meta failed (%s); running the model", one_line(e))
        return _ShapeProp(gm, opaque or {}, on_meta).run(*inputs)


def check_reproduces(source: nn.Module, gm: fx.GraphModule, inputs: tuple, keywords: tuple[str, ...] = (),
                     flat: bool = False) -> None:
    """Raise CompileError unless `gm` gives `source`'s outputs on `inputs`. `flat`: the graph
    returns the tensors of the model's output as one tuple (the export frontend)."""
    with torch.no_grad():
        got, want = gm(*inputs), call_with(source, inputs, keywords)
        if flat:
            got, want = tuple(flatten_tensors(got)), tuple(flatten_tensors(want))
        where = _first_difference(got, want, "output")
    if where is not None:
        raise CompileError(
            f"the trace of {type(source).__name__} does not reproduce the model: {where} differs",
            hint="the model may be non-deterministic in eval mode or depend on Python state "
            "fixed at trace time; pass the module involved as a leaf module",
        )


def check_program(prog: Program, gm: fx.GraphModule) -> None:
    """`check_reproduces` for `gm` against `prog.source`, called the way `prog` was traced."""
    check_reproduces(prog.source, gm, prog.example_inputs, prog.keywords, flat=prog.frontend == "export")


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


FRONTENDS = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    kwargs: Mapping[str, torch.Tensor] | None = None,
    frontend: str = "auto",
    leaf_modules: tuple[type, ...] = (),
    decompose_attention: bool = True,
    check: bool = False,
) -> Program:
    """Trace `model` into a Program: an fx graph with standard modules as leaves, untraceable
    submodules as opaque leaves (`Program.opaque`), and every node's value recorded.

    `frontend`: "fx" is symbolic tracing; "export" is torch.export (exported.py), which reads
    what symbolic tracing cannot (Hugging Face transformers, Ultralytics YOLO, branches on
    shapes) and takes keyword inputs (`kwargs`); "auto" uses symbolic tracing where it reads
    the whole model and torch.export where it fails, leaves modules opaque or keeps a library
    function whole that no rule reads (torchvision's Swin attention).

    If the model's parameters are on the meta device, the example inputs are moved there too
    and shapes are propagated without real memory. Shapes come from meta tensors, so tracing
    runs no kernel; `check=True` also runs the model and the graph and compares outputs (the
    `verify` pass always does, so the pipeline checks the trace without paying for it twice).
    `decompose_attention` lowers nn.MultiheadAttention into prunable pieces (decompose.py)."""
    if frontend not in FRONTENDS:
        raise CompileError(f"unknown frontend {frontend!r}", hint=f"choose one of {', '.join(FRONTENDS)}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(kwargs or {})
    model.eval()
    if _on_meta(model):
        inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
        kwargs = {k: t.to("meta") if isinstance(t, torch.Tensor) else t for k, t in kwargs.items()}
    prog = _trace_export(model, inputs, kwargs) if frontend == "export" or kwargs else \
        _choose(model, inputs, frontend, leaf_modules, decompose_attention)
    if check and not prog.on_meta:
        check_program(prog, prog.gm)
    return prog


def _choose(model: nn.Module, inputs: tuple, frontend: str, leaf_modules: tuple[type, ...],
            decompose_attention: bool) -> Program:
    """Symbolic tracing, or torch.export where it fails or leaves modules opaque ("auto")."""
    try:
        prog = _trace_fx(model, inputs, leaf_modules, decompose_attention)
    except CompileError as e:
        if frontend == "fx":
            raise
        try:
            prog = _trace_export(model, inputs, {})
        except CompileError as e2:
            raise CompileError(f"{e.message}; torch.export failed too: {e2.message}", node=e.node,
                               hint=e.hint) from e2
        log.info("symbolic tracing failed (%s); traced with torch.export", e.message)
        return prog
    unread = [*prog.opaque, *_functions_without_rules(prog.gm)] if frontend == "auto" else []
    if unread:
        try:
            exported = _trace_export(model, inputs, {})
        except CompileError as e:
            log.info("torch.export failed too (%s); keeping the symbolic trace", e.message)
            return prog
        log.info("symbolic tracing left %s whole; traced with torch.export", ", ".join(unread))
        return exported
    return prog


def _functions_without_rules(gm: fx.GraphModule) -> list[str]:
    """Functions the symbolic trace kept whole (torch.fx.wrap'ed ones, such as torchvision's
    Swin attention) that no op rule reads: torch.export traces into them."""
    return sorted({target_name(n.target) for n in gm.graph.nodes if n.op == "call_function"
                   and not isinstance(n.target, type)  # a namedtuple of outputs, ...
                   and getattr(n.target, "__module__", "").split(".")[0] not in ("torch", "_operator", "operator", "builtins", "math")
                   and lookup(n, gm)[1] is None})


def _trace_export(model: nn.Module, inputs: tuple, kwargs: dict[str, Any]) -> Program:
    gm = export_graph(model, inputs, kwargs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    keywords = tuple(names[len(inputs):])
    if set(keywords) != set(kwargs):
        raise CompileError(f"the exported graph's inputs {names} do not match the keyword inputs {sorted(kwargs)}")
    flat = (*inputs, *(kwargs[k] for k in keywords))
    propagate_shapes(gm, flat)
    return Program(gm=gm, example_inputs=flat, source=model, keywords=keywords, frontend="export")


def _trace_fx(model: nn.Module, inputs: tuple, leaf_modules: tuple[type, ...], decompose_attention: bool) -> Program:
    name = type(model).__name__

    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise CompileError(
            f"cannot trace {name}: its forward failed under torch.fx: {one_line(e)}",
            hint="move the data-dependent code into a submodule, or pass it as a leaf module "
            "(leaf_modules=...)",
        ) from e
    gm = fx.GraphModule(model, graph, class_name=name)
    # Unpickling a GraphModule re-creates its tracer class; ours is pcompiler's, which a file
    # meant to load without our code must not name.
    gm._tracer_cls = graph._tracer_cls = None
    # Under `from __future__ import annotations` fx records annotations as strings, which the
    # GraphModule's pickling cannot resolve; the types carry nothing the passes use.
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    gm.recompile()
    gm.eval()
    if decompose_attention:
        decompose_multihead_attention(gm)

    propagate_shapes(gm, inputs, tracer.opaque)
    return Program(gm=gm, example_inputs=inputs, opaque=dict(tracer.opaque), source=model)
