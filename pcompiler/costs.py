"""What a model costs and where it runs: parameters, FLOPs, its device, eval mode for a block.

A leaf of the core (imports nothing from pcompiler): the report, the selection by speedup and the
bench target all count with these.

FLOPs come from torch's `torch.utils.flop_counter.FlopCounterMode`, which counts the ops it knows
(matmul, linear, conv, attention, ...) by their shapes, a multiply-add as 2 FLOPs: a
Linear(10, 20) on a batch of 4 is 2 * 4 * 10 * 20 = 1600. Element-wise ops (ReLU, add, norms)
are not counted. It runs the model once, on any device including `meta` (meta weights and meta
inputs give the same count without doing the work).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (CPU for a model with neither)."""
    t = next(iter((*model.parameters(), *model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put `module` in eval mode for the block, then restore each submodule's training flag.

    Sets the flags directly rather than calling `.eval()`, which a torch.export module refuses."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def count_params(module: torch.nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers not counted)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass of `module` on `example_inputs` (multiply-add = 2).

    Runs in eval mode under no_grad (so batch-norm statistics are not updated) and restores the
    training flags after. If the module is on the meta device, real inputs are moved to meta."""
    inputs = tuple(example_inputs)
    if device_of(module).type == "meta":
        inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), eval_mode(module), counter:
        module(*inputs)
    return int(counter.get_total_flops())


def static_costs(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """{"params": ..., "flops": ...} of one model."""
    return {"params": count_params(module), "flops": count_flops(module, example_inputs)}
