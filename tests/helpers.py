"""Helpers shared by the pass tests: build the analysis of a tiny model, run the pipeline, and
check what every pipeline run must satisfy.

`prune` runs trace -> analyze -> method -> slim -> verify and then `check_slim`: the slim model's
modules are standard torch.nn classes whose attributes match their new weights, every member
parameter lost exactly the selected positions, and the invariant holds, checked here
independently of `verify`: the user's model with the removed channels' producer slices zeroed
(by parameter name, not through the trace) gives the slim model's outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import pcompiler
from pcompiler.ir import ChannelGroup, Program
from pcompiler.passmanager import make_pass

TOL = 1e-5


def analyze(model: nn.Module, *inputs: torch.Tensor) -> Program:
    return pcompiler.run(pcompiler.trace(model, inputs), [make_pass("analyze")])


def group_with(prog: Program, param: str, dim: int) -> ChannelGroup:
    """The one group holding a slice of `param` along `dim`."""
    found = [g for g in prog.analysis.groups if any(p.param == param and p.dim == dim for p in g.params)]
    assert len(found) == 1, f"{param}[dim {dim}] is in {len(found)} groups"
    return found[0]


def members(group: ChannelGroup) -> set[tuple[str, int, str]]:
    return {(p.param, p.dim, p.role) for p in group.params}


def index_of(group: ChannelGroup, param: str, dim: int) -> np.ndarray:
    (p,) = [p for p in group.params if p.param == param and p.dim == dim]
    return p.index


def prune(model: nn.Module, *inputs: torch.Tensor, method: str = "l1", attention: str = "heads", **options) -> Program:
    """The whole pipeline on `model`, then `check_slim`. Returns the final Program."""
    original = copy.deepcopy(model).eval()  # trace puts the model in eval mode
    prog = pcompiler.trace(model, inputs)
    prog = pcompiler.run(prog, [make_pass("analyze", attention=attention), make_pass(method, **options), make_pass("slim"),
                                make_pass("verify")])
    check_slim(prog, original)
    return prog


def outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def zero_removed(model: nn.Module, prog: Program) -> nn.Module:
    """A copy of `model` with the producer slices of the selected channels set to zero."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for gid, channels in prog.selection.items():
            for p in prog.analysis.groups[gid].producers:
                t = model.get_parameter(p.param)
                t.index_fill_(p.dim, torch.as_tensor(p.index[list(channels)].ravel()), 0.0)
    return model


def check_slim(prog: Program, original: nn.Module) -> None:
    assert prog.info["verify"]["ok"] is True
    assert prog.info["verify"]["max_relative_error"] < TOL
    check_modules(prog.gm, opaque=tuple(prog.opaque))
    # Every member lost exactly the union of its selected positions.
    removed: dict[tuple[str, int], set[int]] = {}
    for gid, channels in prog.selection.items():
        for p in prog.analysis.groups[gid].params:
            removed.setdefault((p.param, p.dim), set()).update(p.index[list(channels)].ravel().tolist())
    for (name, dim), gone in removed.items():
        before, after = _tensor(prog.reference, name), _tensor(prog.gm, name)
        assert after.shape[dim] == before.shape[dim] - len(gone), name
    want = outputs(zero_removed(original, prog), prog.example_inputs)
    for got, ref in zip(outputs(prog.gm, prog.example_inputs), want, strict=True):
        assert_same(got, ref)


def assert_same(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal shapes, NaN and infinities in the same places (the same sign), finite values
    within TOL of the reference's largest finite value (at least 1)."""
    assert got.shape == ref.shape
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf() & (got > 0), ref.isinf() & (ref > 0))
    assert torch.equal(got.isinf() & (got < 0), ref.isinf() & (ref < 0))
    finite = ref.isfinite()
    if finite.any():
        scale = ref[finite].abs().max().item()
        assert (got[finite] - ref[finite]).abs().max().item() <= TOL * max(1.0, scale)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def check_modules(gm: nn.Module, opaque: tuple[str, ...] = ()) -> None:
    """Every submodule (but the opaque ones, kept as they were) is a torch.nn class and its size
    attributes match its weights."""
    for name, m in gm.named_modules():
        if m is gm or any(name == o or name.startswith(o + ".") for o in opaque):
            continue
        assert type(m).__module__.startswith("torch.nn."), f"{name} is a {type(m).__qualname__}"
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels, name
            assert m.out_channels % m.groups == 0, name
            assert m.bias is None or m.bias.shape == (m.out_channels,), name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.shape == m.bias.shape == m.running_mean.shape == m.running_var.shape == (m.num_features,)
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
            assert m.bias is None or m.bias.shape == (m.out_features,), name
        elif isinstance(m, nn.GroupNorm):
            assert m.weight.shape == (m.num_channels,) and m.num_channels % m.num_groups == 0, name
        elif isinstance(m, nn.Embedding):
            assert m.weight.shape == (m.num_embeddings, m.embedding_dim), name


def conv_bn_stack() -> nn.Sequential:
    """A plain conv stack (for FLOPs and selection tests)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 10, 1),
    )


__all__ = ["TOL", "analyze", "assert_same", "check_modules", "check_slim", "conv_bn_stack", "group_with", "index_of",
           "members", "outputs", "prune", "zero_removed"]
