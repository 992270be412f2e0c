"""Working precision: the dtype a model computes in, and copies and runs of a model in another.

A leaf of the core: it imports nothing from pcompiler. Checkpoints ship in bfloat16 or float16
(`HALF`); pcompiler prunes them in that dtype. Three places need the same model in float32:
the proof (passes/verify.py runs both graphs with a `PromotedInterpreter`, one module's weights
in float32 at a time, on the run's device: `--device cuda` proves a model larger than the GPU), a runtime without half-precision kernels (targets/onnx.py writes a
`cast_copy`), and the check of the hf/ folder (`promoted_modules`: its modules' weights read in
float32 while each runs). Either way the graph's own casts to a half dtype (Hugging Face's
RMSNorm casts back to its input's dtype) are cast to the wider dtype too, or the float32 graph
would still round in between.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

HALF = (torch.bfloat16, torch.float16)


def dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of most of its floating-point parameters' values
    (float32 for a model with none). A bfloat16 checkpoint keeps a few float32 buffers (rotary
    frequencies); its weights say bfloat16."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def promoted(value: Any, dtype: torch.dtype) -> Any:
    """`value` (a tensor, a dtype, or tuples, lists and dicts of them) with each half-precision
    tensor cast to `dtype` and each half-precision dtype (an argument of a cast, a factory
    call) replaced by it."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dtype in HALF:
            return v.to(dtype)
        return dtype if isinstance(v, torch.dtype) and v in HALF else v

    return fx.node.map_aggregate(value, one)


def cast_copy(gm: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """A copy of `gm` that computes in `dtype` where it computed in a half dtype: its
    half-precision parameters and buffers cast, and so are the graph's half dtype arguments."""
    out = copy.deepcopy(gm)
    out._apply(lambda t: t.to(dtype) if t.is_floating_point() and t.dtype in HALF else t)
    for node in out.graph.nodes:
        node.args, node.kwargs = promoted(node.args, dtype), promoted(node.kwargs, dtype)
    out.recompile()
    return out


def placed_values(value: Any, device: torch.device) -> Any:
    """`value` (tensors, devices, or tuples, lists and dicts of them) with each tensor on
    `device` and each device named (a factory call's `device=`, a `.to(cpu)`) replaced by it."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.device != device:
            return v.to(device)
        return device if isinstance(v, torch.device) else v

    return fx.node.map_aggregate(value, one)


class PromotedInterpreter(fx.Interpreter):
    """Runs a graph in `dtype` where it computed in a half dtype, and on `device`: each module's
    parameters and buffers are read as copies in `dtype` (where half) on `device` while it runs
    (`read`: one module at a time, the model itself unchanged: a model larger than the device's
    memory runs block by block), and so are attributes; the graph's half dtype arguments and
    inputs become `dtype`, its tensors and the devices it names `device`. With both None it runs
    the graph as it is."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__(gm)
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)

    def _args(self, value: Any) -> Any:
        if self.dtype is not None:
            value = promoted(value, self.dtype)
        return value if self.device is None else placed_values(value, self.device)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return super().run(*self._args(args), **kwargs)

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as this run reads it: in `dtype` where half, on `device`."""
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() and t.dtype in HALF else t.dtype
        device = self.device if self.device is not None else t.device
        return t if (dtype, device) == (t.dtype, t.device) else t.detach().to(device=device, dtype=dtype)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            return self.read(value)
        return self._args(value)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_function(target, *self._args((args, kwargs)))

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_method(target, *self._args((args, kwargs)))

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        own = (*module.named_parameters(), *module.named_buffers())
        changed = {k: v for k, t in own if (v := self.read(t)) is not t}
        args, kwargs = self._args((args, kwargs))
        return torch.func.functional_call(module, changed, args, kwargs, strict=False) if changed else module(*args, **kwargs)


@contextlib.contextmanager
def promoted_modules(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """While the block runs `model` (any nn.Module), each module's own half-precision parameters
    and buffers are `dtype` copies during its forward, and its own again after: the model
    computes in `dtype` on its weights' exact values, with one module's copies in memory."""
    originals: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}

    def before(m: nn.Module, args: Any) -> None:
        swapped = originals.setdefault(id(m), [])
        for store in (m._parameters, m._buffers):
            for k, t in list(store.items()):
                if t is not None and t.is_floating_point() and t.dtype in HALF:
                    swapped.append((store, k, t))
                    store[k] = t.detach().to(dtype)

    def after(m: nn.Module, args: Any, output: Any) -> None:
        for store, k, t in originals.pop(id(m), []):
            store[k] = t

    handles = []
    for m in model.modules():
        if any(t.is_floating_point() and t.dtype in HALF for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for swapped in originals.values():  # a forward that raised
            for store, k, t in swapped:
                store[k] = t
