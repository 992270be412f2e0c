"""Working precision: the dtype a model computes in, and copies and runs of a graph in another.

A leaf of the core: it imports nothing from pcompiler. Checkpoints ship in bfloat16 or float16
(`HALF`); pcompiler prunes them in that dtype. Two places need the same graph in float32: the
proof (passes/verify.py runs both graphs with `promoted` values, one module at a time) and a
runtime without half-precision kernels (targets/onnx.py writes a `cast_copy`). Either way the
graph's own casts to a half dtype (Hugging Face's RMSNorm casts back to its input's dtype) are
cast to the wider dtype too, or the float32 graph would still round in between.
"""

from __future__ import annotations

import copy
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
