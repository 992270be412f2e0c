"""verify: the rewrite invariant (DESIGN.md, "The rewrite and its proof").

First, the traced graph must reproduce the user's model (tracing itself runs nothing). Then:
take the model as it was before `slim`, set the producer slices of the removed channels to zero
(weights, biases, norm scale and shift, and parameters tied to them such as added position
embeddings); its outputs must equal the slim model's outputs within float tolerance. Checked on
the example inputs and on a second random draw of the same shapes.

On failure the two graphs are run node by node (the slim graph keeps the node names), the
reference values restricted to the kept channels, and the error names the first node whose
values differ and the groups that pass through it. Exit code 3 in the CLI.

Groups whose channels pass an op where zeroing is not removal (LayerNorm, softmax, mean over
them, a divisor) are pinned by the analysis, so they are never removed silently.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx

from pcompiler.ir import DimRef, Program, Role, iter_tensors, node_value, tensor_of
from pcompiler.passes.trace import check_reproduces
from pcompiler.passmanager import CompileError, PassResult, register_pass

log = logging.getLogger("pcompiler")


class VerifyError(CompileError):
    exit_code = 3


def zeroed_reference(prog: Program) -> fx.GraphModule:
    """The pre-slim model with the removed channels' producer slices set to zero."""
    ref = copy.deepcopy(prog.reference)
    analysis = prog.require_analysis("verify")
    with torch.no_grad():
        for gid, channels in prog.require_selection("verify").items():
            ch = np.asarray(channels, dtype=np.int64)
            for p in analysis.groups[gid].params:
                if p.role == Role.CONSUME or p.is_buffer:
                    continue
                t = tensor_of(ref, p.param)
                t.index_fill_(p.dim, torch.as_tensor(p.index[ch].ravel(), device=t.device), 0.0)
    return ref


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return []


def _error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, scale of b) as floats."""
    if a.shape != b.shape:
        return float("inf"), 1.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0


def _inputs(prog: Program) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    second = tuple(
        torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) if t.is_floating_point() else t
        for t in prog.example_inputs
    )
    return [prog.example_inputs, second]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _locate(prog: Program, zeroed: fx.GraphModule, inputs: tuple, rtol: float, atol: float) -> str:
    """Name the first node whose slim value differs from the zeroed reference's kept channels."""
    ref_rec, slim_rec = _Recorder(zeroed), _Recorder(prog.gm)
    with torch.no_grad():
        ref_rec.run(*inputs)
        slim_rec.run(*inputs)
    removal = prog.removal
    for node in prog.gm.graph.nodes:
        if node.name not in ref_rec.values or node.op == "output":
            continue
        for path, _ in iter_tensors(node_value(node)):
            r, s = ref_rec.values[node.name], slim_rec.values[node.name]
            for i in path:
                r, s = r[i], s[i]
            if not isinstance(r, torch.Tensor) or not r.is_floating_point():
                continue
            for d in range(r.ndim):
                removed = removal.removed(DimRef(d, node=node.name, path=path))
                if len(removed):
                    keep = np.setdiff1d(np.arange(r.shape[d]), removed)
                    r = r.index_select(d, torch.as_tensor(keep))
            err, scale = _error(s, r)
            if err > atol + rtol * scale:
                groups = [g.id for g in prog.analysis.groups if g.id in prog.selection
                          and any(sp.ref.node == node.name for sp in g.spaces)]
                return f"first difference at node '{node.name}' ({node.op} {node.target}), groups {groups}"
    return "no single node differs beyond tolerance (accumulated error)"


def verify_program(prog: Program, rtol: float = 1e-4, atol: float = 1e-5) -> dict[str, Any]:
    if prog.reference is None:
        raise CompileError("verify needs a slimmed program: run 'slim' before it")
    if prog.on_meta:
        return {"ok": None, "skipped": "the model is on the meta device; nothing to run"}
    if prog.source is not None:
        check_reproduces(prog.source, prog.reference, prog.example_inputs)
    zeroed = zeroed_reference(prog)
    worst, worst_rel = 0.0, 0.0
    for inputs in _inputs(prog):
        with torch.no_grad():
            want, got = _flat(zeroed(*inputs)), _flat(prog.gm(*inputs))
        if len(want) != len(got):
            raise VerifyError(f"the slim model returns {len(got)} tensors, the original {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            err, scale = _error(g, w)
            worst = max(worst, err)
            worst_rel = max(worst_rel, err / max(scale, 1e-12))
            if err > atol + rtol * scale:
                where = _locate(prog, zeroed, inputs, rtol, atol)
                raise VerifyError(
                    f"the slim model's output {i} differs from the original with the removed channels "
                    f"zeroed by {err:.3g} (scale {scale:.3g}); {where}",
                    hint="this is a bug in an op rule: please report it with the model; --skip the "
                    "module to work around it",
                )
    return {"ok": True, "max_error": worst, "max_relative_error": worst_rel, "rtol": rtol, "atol": atol}


@register_pass
@dataclass(frozen=True)
class Verify:
    """Check that the slim model equals the original with the removed channels zeroed."""

    name: ClassVar[str] = "verify"
    rtol: float = 1e-4
    atol: float = 1e-5

    def run(self, prog: Program) -> PassResult:
        result = verify_program(prog, self.rtol, self.atol)
        log.info("verify: %s", result)
        return PassResult(prog.replace(info={**prog.info, "verify": result}), changed=False)


verify = Verify
