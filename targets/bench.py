"""Bench target: what a model costs. For now the static costs, parameters and FLOPs.

FLOPs come from torch's own `torch.utils.flop_counter.FlopCounterMode`, which counts the ops it
knows (matmul, linear, conv, attention, ...) by their shapes and counts a multiply-add as 2
FLOPs: a Linear(10, 20) on a batch of 4 is 2 * 4 * 10 * 20 = 1600. Element-wise ops (ReLU,
add, norms) are not counted. It runs the model once, on any device including `meta` (a model
too big to run: meta weights and meta inputs give the same count without doing the work).

Latency (percentiles of original against slim on torch and onnxruntime, CPU and CUDA, several
batch sizes) is planned for this file; it will sit in the section at the end and use the same
`example_inputs` convention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from pcompiler.targets import eval_mode

log = logging.getLogger("pcompiler")


def count_params(module: torch.nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers not counted)."""
    return sum(p.numel() for p in module.parameters())


def _device_of(module: torch.nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def count_flops(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass of `module` on `example_inputs` (multiply-add = 2).

    Runs in eval mode under no_grad (so batch-norm statistics are not updated) and restores the
    training flags after. If the module is on the meta device, real inputs are moved to meta."""
    inputs = tuple(example_inputs)
    device = _device_of(module)
    if device is not None and device.type == "meta":
        inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), eval_mode(module), counter:
        module(*inputs)
    return int(counter.get_total_flops())


def static_costs(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """{"params": ..., "flops": ...} of one model."""
    return {"params": count_params(module), "flops": count_flops(module, example_inputs)}


# ---------------------------------------------------------------------------------------------
# Latency: not yet (see the module docstring).
