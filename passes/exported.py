"""The torch.export frontend of the trace pass: a model's exported graph as a Program.

`export_graph(model, args, kwargs)` runs `torch.export.export(..., strict=False)` and returns
the graph module of ATen ops it makes, in the form every later pass reads:

- Flat inputs and outputs. The graph's placeholders are the model's tensor inputs, positional
  ones first and then keyword ones, in the order of the call (named as the model names them:
  `x`, `input_ids`, `attention_mask`); the output is the tuple of the output's tensors (a
  Hugging Face `ModelOutput` or a dict gives its values in order; a model that returns one
  tensor returns it as it is). Export's input checks (its pre-forward hook, taken without the
  guard module: `check_guards=False`) and its metadata assertions are dropped: they check the
  shapes slim changes.
- A dynamic batch. Where every input has the same first dimension, the model is exported with
  it dynamic (on a batch of 2 where the example's is 1), and for token ids the sequence length
  too (`inputs.dynamic_dims`), so sizes the model computes from its input's batch and length
  stay computed, and model.pt2 takes any batch and length; where export cannot, they are the
  example's.
- Standard torch.nn layers as leaves. Where the nodes of one call of a torch.nn module that has
  an op rule (Conv2d, Linear, BatchNorm2d, LayerNorm, Embedding, ReLU, ...) read one tensor and
  make one, they are replaced by one `call_module` node of the module itself, keeping its
  parameters by their names ('layer1.0.conv1.weight', from the graph signature). Their module
  rules then apply, and the training methods see real modules: a BatchNorm that trains with
  batch statistics (export in eval mode bakes `training=False` into `aten.batch_norm`), a
  Dropout that drops. Everything else stays ATen ops, with rules keyed by ATen overload.

Shapes are recorded afterwards by the trace pass's shape propagation (on the meta device), as
for the symbolic-tracing frontend.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pcompiler.errors import CompileError, one_line
from pcompiler.hf import cache_off
from pcompiler.inputs import dynamic_dims, widened
from pcompiler.passes.rules.base import lookup

log = logging.getLogger("pcompiler")

aten = torch.ops.aten

# Export's checks on its inputs: they hold the traced sizes, which slim changes.
_CHECKS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}
# Modules export already decomposes into prunable pieces, which their module rule would pin.
_KEEP_DECOMPOSED = (nn.MultiheadAttention,)


def export_graph(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    """The exported graph of `model` called as `model(*args, **kwargs)` (module docstring)."""
    name = type(model).__name__
    try:
        with _attributes_kept(model), cache_off(model), warnings.catch_warnings():
            # That is what _attributes_kept undoes; the user has nothing to change.
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            ep = _export_dynamic_batch(model, args, kwargs) or torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 - export's own message says what it refused
        raise CompileError(
            f"cannot export {name} with torch.export: {one_line(e)}",
            hint="check that the example inputs are what the model's forward takes (--input-shape, "
            "--input NAME=SHAPE:DTYPE); code torch.export cannot follow (data-dependent branches on "
            "tensor values) must be rewritten with torch.cond or moved out of forward",
        ) from e
    gm = ep.module(check_guards=False)
    for refused in ("train", "eval"):  # export's module refuses them; training needs them
        vars(gm).pop(refused, None)
    gm._forward_pre_hooks.clear()  # checks the call against the nested signature; ours is flat
    gm._forward_pre_hooks_with_kwargs.clear()
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs (module docstring)
    # Unpickling a GraphModule re-creates its tracer class: export's needs arguments it cannot give.
    gm._tracer_cls = graph._tracer_cls = None
    gm._tracer_extras = {}
    gm.meta.clear()  # export's shape environment: sympy objects a plain torch.load cannot resolve
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _CHECKS and not node.users:
            graph.erase_node(node)
    out = graph.output_node()
    flat, _ = torch.utils._pytree.tree_flatten(out.args[0])
    single = ep.call_spec.out_spec is not None and ep.call_spec.out_spec.is_leaf()
    out.args = (flat[0] if single and len(flat) == 1 else tuple(flat),)
    _collapse_leaf_modules(gm, model)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    # In eval mode like the model it was exported from: ep.module() starts in training mode over
    # the model's eval-mode layers, and a later `gm.train(gm.training)` (restoring a mode) would
    # put every BatchNorm and Dropout into training.
    gm.eval()
    return gm


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Undo what the forward assigns to the model's modules while export runs it (Ultralytics'
    Detect caches anchors made from export's fake tensors, which the model cannot run with), and
    what it puts into their dicts, lists and sets (timm's LeViT caches its attention biases in a dict
    attribute: a fake tensor there fails the model's next real run)."""
    saved = [(m, {k: (v, copy.copy(v) if _in_place(k, v) else None) for k, v in vars(m).items()})
             for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in set(vars(m)) - set(attrs):
                delattr(m, k)
            for k, (v, contents) in attrs.items():
                vars(m)[k] = v
                if contents is None:
                    continue
                if isinstance(v, (dict, set)):
                    v.clear()
                    v.update(contents)
                elif isinstance(v, list):
                    v[:] = contents


def _in_place(name: str, value: Any) -> bool:
    """Whether an attribute is restored by its contents (the object kept: others may hold it)."""
    return name in _MODULE_DICTS or type(value) in (dict, list, set)


_MODULE_DICTS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def _export_dynamic_batch(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """torch.export with the batch (first) dimension of every input dynamic, or None where the
    inputs do not share one (or mix positional and keyword ones) or the model fixes it. Exported
    on a batch of 2 where the example's is 1 (export specializes size-1 dims): the graph then
    reads the batch size where the model's code does (views, expands), and the slim program
    takes any batch."""
    tensors = [*args, *kwargs.values()]
    dims = dynamic_dims(tensors)
    if not dims or (args and kwargs):
        return None

    batch = dict.fromkeys(dims, torch.export.Dim.AUTO)
    try:
        if kwargs:
            return torch.export.export(model, (), dict(zip(kwargs, widened(list(kwargs.values())))),
                                       dynamic_shapes={k: batch for k in kwargs}, strict=False)
        return torch.export.export(model, widened(args),
                                   dynamic_shapes=tuple(batch for _ in args), strict=False)
    except Exception as e:  # noqa: BLE001 - the static export below says its own error, if any
        log.debug("export with a dynamic batch failed (%s); exporting with the example's", one_line(e))
        return None


def _module_calls(gm: fx.GraphModule) -> dict[str, tuple[str, list[fx.Node]]]:
    """Each innermost module call (its nn_module_stack key) -> (module path, its nodes in order)."""
    calls: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (path, _) = next(reversed(stack.items()))
        calls.setdefault(key, (path, []))[1].append(node)
    return calls


def _collapse_leaf_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    for path, nodes in _module_calls(gm).values():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, _KEEP_DECOMPOSED) or not type(module).__module__.startswith("torch.nn"):
            continue
        members = set(nodes)
        own = {f"{path}.{n}" for n, _ in (*module.named_parameters(), *module.named_buffers())}
        inputs = {a for n in nodes for a in n.all_input_nodes
                  if a not in members and not (a.op == "get_attr" and a.target in own)}
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            log.debug("export: %s (%s) stays as ATen ops: %d inputs, %d outputs",
                      path, type(module).__name__, len(inputs), len(outputs))
            continue
        _install(gm, path, module)
        (x,) = inputs
        with gm.graph.inserting_after(outputs[0]):
            call = gm.graph.call_module(path, (x,))
        call.meta["nn_module_stack"] = outputs[0].meta.get("nn_module_stack")
        if lookup(call, gm)[1] is None:  # no module rule: its ATen ops are the better map
            gm.graph.erase_node(call)
            continue
        outputs[0].replace_all_uses_with(call)
        for n in reversed(nodes):
            gm.graph.erase_node(n)


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put the user's `module` at `path` in `gm` (its parameters are the ones export lifted)."""
    parent, _, name = path.rpartition(".")
    owner = gm
    for part in parent.split(".") if parent else ():
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    setattr(owner, name, module)
