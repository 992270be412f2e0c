"""slim: physically remove the selected channels.

For every selected group, its positions are removed from every member parameter and buffer
(producers, consumers and tied slices alike), then each node's op rule rewrites what depended
on channel counts (module attributes such as `out_channels` and `groups`, literal view/split
sizes, slice bounds, the sdpa scale). The result is a new GraphModule of the same standard
modules; the model before slimming is kept as `prog.reference` for `verify`, sharing every
tensor slim did not cut with the slim model (`shared_copy`): the weights are in memory once.

Assumes `analyze` ran on this exact graph and a method stored `prog.selection`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.fx as fx

from pcompiler.errors import CompileError
from pcompiler.ir import (
    DimRef,
    Program,
    Removal,
    Role,
    Selection,
    owner_of,
    shared_copy,
    tensor_at,
    tensor_of,
)
from pcompiler.memory import page_out
from pcompiler.passes.rules.base import RewriteContext, lookup
from pcompiler.passes.trace import propagate_shapes
from pcompiler.passmanager import ANALYSIS, SELECTION, SLIMMED, PassResult, register_pass

log = logging.getLogger("pcompiler")


def removal_of(prog: Program, selection: Selection) -> Removal:
    analysis = prog.require_analysis("slim")
    params: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    spaces: dict[DimRef, list[np.ndarray]] = defaultdict(list)
    for gid, channels in selection.items():
        group = analysis.groups[gid]
        ch = np.asarray(channels, dtype=np.int64)
        for p in group.params:
            params[(p.param, p.dim)].append(p.index[ch].ravel())
        for s in group.spaces:
            spaces[s.ref].append(s.index[ch].ravel())
    return Removal(
        params={k: np.unique(np.concatenate(v)) for k, v in params.items()},
        spaces={k: np.unique(np.concatenate(v)) for k, v in spaces.items()},
    )


def _aliases(gm: fx.GraphModule) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Every (module, attribute) that holds each tensor, by the tensor's id: a tied weight (GPT-2's
    embedding and LM head) has two names, of which the graph may read only one."""
    found: dict[int, list[tuple[torch.nn.Module, str]]] = defaultdict(list)
    for _, m in gm.named_modules(remove_duplicate=False):
        for attr, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None:
                found[id(t)].append((m, attr))
    return found


def _slice_tensors(gm: fx.GraphModule, removal: Removal) -> None:
    """Cut the removed positions out of each parameter and buffer (the cuts of all its names
    together), and put the result under every name that held it: its tied aliases too."""
    by_tensor: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    named: dict[int, tuple[torch.nn.Module, str]] = {}
    for (name, dim), removed in removal.params.items():
        owner, attr = owner_of(gm, name)
        key = id(getattr(owner, attr))
        named.setdefault(key, (owner, attr))
        by_tensor[key][dim] = np.union1d(by_tensor[key].get(dim, removed), removed)
    aliases = _aliases(gm)
    for key, cuts in by_tensor.items():
        owner, attr = named[key]
        old = getattr(owner, attr)
        t = old.detach()
        for dim, removed in cuts.items():
            keep = np.setdiff1d(np.arange(t.shape[dim]), removed)
            t = t.index_select(dim, torch.as_tensor(keep, device=t.device))
        t = t.contiguous()
        page_out(old)  # the checkpoint's pages just read, where it is memory-mapped
        new = torch.nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else t
        for m, a in aliases.get(key, [(owner, attr)]):
            if a in m._parameters:
                m._parameters[a] = new
            elif a in m._buffers:
                m._buffers[a] = new
            else:
                setattr(m, a, new)


def layer_widths(prog: Program, before: fx.GraphModule, after: fx.GraphModule) -> dict[str, dict[str, list[int]]]:
    """Per module: {"out": [before, after], "in": [before, after]} from its produce/consume dims."""
    layers: dict[str, dict[str, list[int]]] = {}
    for g in prog.require_analysis("slim").groups:
        for p in g.params:
            if p.role not in (Role.PRODUCE, Role.CONSUME) or p.is_buffer:
                continue
            w_before = tensor_of(before, p.param)
            if w_before.ndim < 2 and p.role == Role.PRODUCE and not p.param.endswith("weight"):
                continue  # biases say nothing new
            module = p.param.rpartition(".")[0] or p.param
            key = "out" if p.role == Role.PRODUCE else "in"
            entry = layers.setdefault(module, {})
            entry.setdefault(key, [int(w_before.shape[p.dim]), int(tensor_of(after, p.param).shape[p.dim])])
    return layers


def slim_program(prog: Program, check: bool = True) -> Program:
    """Return a Program whose `gm` has the selected channels removed."""
    selection = prog.require_selection("slim")
    analysis = prog.require_analysis("slim")
    for gid in selection:
        group = analysis.groups[gid]
        if not group.prunable:
            why = "; ".join(group.pinned) or "no parameter produces these channels"
            raise CompileError(f"the selection removes channels of group {gid} ({group.label()}), which is pinned: {why}")
    reference = prog.gm
    gm = shared_copy(reference)
    removal = removal_of(prog, selection)
    _slice_tensors(gm, removal)

    nodes = {n.name: n for n in gm.graph.nodes}

    def new_size(ref: DimRef) -> int:
        return tensor_at(nodes[ref.node], ref.path).shape[ref.dim] - len(removal.removed(ref))

    ctx = RewriteContext(gm, new_size, removal.removed)
    for node in list(gm.graph.nodes):  # a rewrite may insert nodes (mean_rewrite)
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        _, op_rule = lookup(node, gm)
        if op_rule is not None and op_rule.rewrite is not None:
            op_rule.rewrite(node, ctx)
    gm.graph.eliminate_dead_code()  # size computations a rewrite replaced by literals
    gm.recompile()
    if check:
        try:
            propagate_shapes(gm, prog.example_inputs, prog.opaque)
        except CompileError as e:  # a rule's bug, not the user's: exit 1 through the pass manager
            where = f" at node '{e.node}'" if e.node else ""
            raise SlimmedGraphFails(
                f"the slimmed graph does not run{where}: {e.message} (an op rule missed a constant that depends "
                "on channel counts: please report the model; --skip GLOB on the module involved works around it)"
            ) from e
    return prog.replace(gm=gm, reference=reference, removal=removal)


class SlimmedGraphFails(RuntimeError):
    """The rewrite produced a graph that does not run: a bug in an op rule (exit 1)."""


@register_pass
@dataclass(frozen=True)
class Slim:
    """Remove the selected channels from every producer and consumer."""

    name: ClassVar[str] = "slim"
    requires: ClassVar = (ANALYSIS, SELECTION)
    ensures: ClassVar = (SLIMMED,)

    def run(self, prog: Program) -> PassResult:
        if not prog.require_selection(self.name):
            log.info("slim: nothing selected")
        out = slim_program(prog)
        removed = sum(len(v) for v in prog.selection.values())
        info = {
            **out.info,
            "slim": {
                "groups_pruned": len(prog.selection),
                "channels_removed": removed,
                "layers": layer_widths(prog, out.reference, out.gm),
            },
        }
        return PassResult(out.replace(info=info), changed=removed > 0)


slim = Slim
