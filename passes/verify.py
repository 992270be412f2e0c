"""verify: the rewrite invariant (docs/design.md, "The rewrite and its proof").

First, the traced graph must reproduce the user's model (tracing itself runs nothing). Then:
take the model as it was before `slim`, set the producer slices of the removed channels to zero
(weights, biases, norm scale and shift, and parameters tied to them such as added position
embeddings); its outputs must equal the slim model's outputs: finite values within the VERIFY
tolerance, NaN and infinities exactly (`pcompiler.compare`: a NaN or an infinity on one side
only is a failure, never a pass). Checked on the example inputs and on a second random draw of
the same shapes.

Where `compensate` folded removed channels' values into their consumers, the reference gets
them back: its graph sets the channels' inputs at those consumers (0 in the zeroed model) to
the constants, or to their least-squares predictions from the kept inputs. Exact folds (linear,
convs without zero padding) must then match within tolerance. A fold into a zero-padded conv is
exact only away from the borders, a mean or least-squares fold only in expectation: the rewrite
itself is proved by comparing the slim model with those folds taken out (bias and weight
changes) against the reference with only the exact constants injected, and the slim model's deviation from the fully
injected reference is reported under "approximate" (size and consumers) without failing. The
result's "reference" says what was compared.

On failure the two graphs are run node by node (the slim graph keeps the node names), the
reference values restricted to the kept channels, and the error names the first node whose
values differ and the groups that pass through it. Exit code 3 in the CLI.

Groups whose channels pass an op where zeroing is not removal (LayerNorm, softmax, a variance
over them, a divisor) are pinned by the analysis, so they are never removed silently. The one
exception is asked for: `--prune-normalized` removes channels a LayerNorm normalizes. The slim
LayerNorm normalizes over the kept channels; the reference's LayerNorms do the same
(`rules.layers.normalize_over_kept`), so the rewrite is still proved exactly, and the slim
model's deviation from the plain zeroed original is reported under "approximate" with the norms. A node a
rewrite changed on purpose (a mean over the kept channels, scaled back by the node after it:
`ir.RESCALED_KEY`) is compared at that next node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pcompiler.compare import VERIFY, Comparison, Tolerance, compare, flatten_tensors
from pcompiler.dtypes import HALF, PromotedInterpreter, dtype_name
from pcompiler.errors import CompileError, VerifyError
from pcompiler.ir import (
    RESCALED_KEY,
    DimRef,
    Fold,
    Program,
    Role,
    iter_tensors,
    node_value,
    shared_copy,
    tensor_of,
)
from pcompiler.memory import page_out, streamed, trim
from pcompiler.passes.compensate import fold, inject_constants
from pcompiler.passes.rules.layers import normalize_over_kept
from pcompiler.passes.trace import check_program
from pcompiler.passmanager import SLIMMED, PassResult, register_pass
from pcompiler.runtime import CPU, Runtime, lives_on

log = logging.getLogger("pcompiler")


@dataclass
class Reference:
    """The original as verify compares with it: `gm`, a copy of the pre-slim model that shares
    its tensors (`ir.shared_copy`: hooks and norm rewrites go on the copy, the weights are in
    memory once), and `zeros`, the removed channels' producer slices, by tensor, that read as zero
    (id -> (tensor, [(dim, positions)])): `_Recorder` zeroes a copy of each as it reads it."""

    gm: fx.GraphModule
    zeros: dict[int, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]


def zeroed_reference(prog: Program) -> Reference:
    """The pre-slim model with the removed channels' producer slices reading as zero."""
    ref = shared_copy(prog.reference)
    analysis = prog.require_analysis("verify")
    zeros: dict[int, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = {}
    for gid, channels in prog.require_selection("verify").items():
        ch = np.asarray(channels, dtype=np.int64)
        for p in analysis.groups[gid].params:
            if p.role == Role.CONSUME or p.is_buffer:
                continue
            t = tensor_of(ref, p.param)
            cuts = zeros.setdefault(id(t), (t, []))[1]
            cuts.append((p.dim, torch.as_tensor(p.index[ch].ravel(), device=t.device)))
    return Reference(ref, zeros)


def _inputs(prog: Program) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    second = tuple(
        torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) if t.is_floating_point() else t
        for t in prog.example_inputs
    )
    return [prog.example_inputs, second]


PROOF_DTYPE = torch.float32


def proof_dtype(gm: nn.Module) -> torch.dtype | None:
    """The dtype verify runs `gm` in: float32 where its weights are half precision (the rewrite
    is proved on the same values, exactly representable, without half precision's rounding, whose
    order differs between a zeroed and a removed channel); None: its own dtype."""
    found = {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()}
    return PROOF_DTYPE if found & set(HALF) else None


class _Recorder(PromotedInterpreter):
    """Runs a graph (in `dtype`: dtypes.PromotedInterpreter) and keeps the value of every node
    that computes one (not its inputs and attributes). `zeros` (a Reference's): tensors read with
    slices zeroed, in a copy. After each module of a half-precision model (a checkpoint as it
    ships: memory-mapped, copied to float32 a module at a time) the heap its copies took and the
    checkpoint's pages it read are given back (`memory.trim`, `memory.page_out`)."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype | None = None,
                 zeros: dict[int, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] | None = None,
                 device: torch.device | None = None):
        super().__init__(gm, dtype, device)
        self.values: dict[str, Any] = {}
        self.zeros = zeros or {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op not in ("placeholder", "get_attr"):
            self.values[n.name] = out
        return out

    def read(self, t: torch.Tensor) -> torch.Tensor:
        out = super().read(t)
        cuts = self.zeros.get(id(t), (None, ()))[1]
        if cuts:
            out = out.clone() if out is t else out  # never into the model's own tensor
            for dim, positions in cuts:
                out.index_fill_(dim, positions.to(out.device), 0.0)
        return out

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(target, args, kwargs)
        if self.dtype is not None or self.device is not None:  # its copies are freed: give the heap back, and the checkpoint's pages
            trim()
            page_out(self.fetch_attr(target))
        return out


def _recorded(gm: fx.GraphModule | Reference, inputs: tuple, dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Run `gm` (a Reference: its graph, its zeros) once on `inputs` (in `dtype`, on `device`, a
    module at a time: see _Recorder): every computed node's value by name, and the flat outputs."""
    rec = _Recorder(gm.gm, dtype, gm.zeros, device) if isinstance(gm, Reference) else _Recorder(gm, dtype, device=device)
    with torch.no_grad():
        out = rec.run(*inputs)
    return rec.values, flatten_tensors(out)


def _first_node_difference(prog: Program, ref_values: dict[str, Any], slim_values: dict[str, Any],
                           tol: Tolerance) -> str | None:
    """Name the first node whose slim value differs from the (zeroed) reference's kept channels
    (None: every node agrees). Values whose shapes do not line up after dropping the removed
    channels (parameters read by get_attr, sizes) are not compared."""
    removal = prog.removal
    for node in prog.gm.graph.nodes:
        if node.name not in ref_values or node.op == "output" or node.meta.get(RESCALED_KEY):
            continue
        for path, _ in iter_tensors(node_value(node)):
            r, s = ref_values[node.name], slim_values[node.name]
            for i in path:
                r, s = r[i], s[i]
            if node.op == "get_attr" or not isinstance(r, torch.Tensor) or not r.is_floating_point():
                continue
            for d in range(r.ndim):
                removed = removal.removed(DimRef(d, node=node.name, path=path))
                if len(removed):
                    keep = np.setdiff1d(np.arange(r.shape[d]), removed)
                    r = r.index_select(d, torch.as_tensor(keep, device=r.device))
            if isinstance(s, torch.Tensor) and s.shape == r.shape and not compare(s, r, tol).ok:
                groups = [g.id for g in prog.analysis.groups if g.id in prog.selection
                          and any(sp.ref.node == node.name for sp in g.spaces)]
                return f"first difference at node '{node.name}' ({node.op} {node.target}), groups {groups}"
    return None


def _output_comparisons(gm: fx.GraphModule, reference: Reference, inputs: tuple, tol: Tolerance,
                        dtype: torch.dtype | None, device: torch.device | None) -> list[Comparison]:
    """`compare` of each of `gm`'s outputs with the reference's, in order (both run in `dtype` on `device`)."""
    return _compare_flat(_recorded(gm, inputs, dtype, device)[1], _recorded(reference, inputs, dtype, device)[1], tol)


def _compare_flat(got: list[torch.Tensor], want: list[torch.Tensor], tol: Tolerance) -> list[Comparison]:
    if len(want) != len(got):
        raise VerifyError(f"the slim model returns {len(got)} tensors, the original {len(want)}")
    return [compare(g, w, tol) for g, w in zip(got, want)]


def _compare(prog: Program, reference: Reference, what: str, tol: Tolerance,
             dtype: torch.dtype | None, device: torch.device | None = None) -> tuple[float, float]:
    """Max abs and relative error of `prog.gm` against `reference` on the check inputs; a
    VerifyError naming the first differing node when an output does not match (a NaN or an
    infinity that the other side does not have included)."""
    worst, worst_rel, finite, values, inputs_tried = 0.0, 0.0, 0, 0, _inputs(prog)
    for inputs in inputs_tried:
        (ref_values, want), (slim_values, got) = (_recorded(reference, inputs, dtype, device),
                                                  _recorded(prog.gm, inputs, dtype, device))
        values += sum(t.numel() for t in want)
        # Every node, not only the outputs: a wrong channel the outputs barely react to (a layer
        # scale of 1e-6, a saturated activation) still shows where it is made.
        where = _first_node_difference(prog, ref_values, slim_values, tol)
        for i, c in enumerate(_compare_flat(got, want, tol)):
            worst, worst_rel, finite = max(worst, c.max_error), max(worst_rel, c.relative_error), finite + c.finite
            if not c.ok:
                _fail(prog, f"the slim model's output {i} differs from the {what}: {c.reason}; "
                      f"{where or 'no single node differs beyond tolerance (accumulated error)'}")
        if where is not None:
            _fail(prog, f"the slim model's outputs match the {what}, but a value inside does not: {where}")
        del ref_values, slim_values, want, got  # before the next draw's run
    removed = any(len(c) for c in (prog.selection or {}).values())
    if removed and finite == 0 and worst == 0.0 and values:
        raise VerifyError(f"verify compared no number: every output value of the {what} is NaN or infinite on the "
                          f"{len(inputs_tried)} inputs tried, so they cannot show whether the rewrite is right",
                          hint="give inputs on which the model's outputs are finite (--input-shape), or check the "
                          "model: its outputs are not numbers")
    return worst, worst_rel


def _fail(prog: Program, message: str) -> None:
    blame = "an op rule" if prog.compensation is None else "an op rule or in compensate (--no-compensate tells)"
    raise VerifyError(message, hint=f"this is a bug in {blame}: please report it with the model; --skip the module "
                      "to work around it")


def constant_reference(prog: Program, folds: Iterable[Fold]) -> Reference:
    """The zeroed reference with each fold's constants injected at its consumer's input."""
    ref = zeroed_reference(prog)
    inject_constants(ref.gm, folds)
    return ref


def _without_folds(prog: Program, folds: Iterable[Fold]) -> fx.GraphModule:
    """A copy of the slim model with `folds`' bias (and weight) changes taken out again."""
    gm = shared_copy(prog.gm)
    for f in folds:
        fold(gm, prog.reference, prog.removal, f, sign=-1)
    return gm


def _reference_text(folds: tuple[Fold, ...]) -> str:
    if not folds:
        return "original with the removed channels zeroed"
    n = sum(len(f.positions) for f in folds)
    where = ", ".join(dict.fromkeys(f.module for f in folds))
    return f"original with the removed channels zeroed and {n} compensated channel inputs (at {where}) replaced by their constants"


def _home(gm: nn.Module) -> str:
    """The device the model's weights are on ('cpu' for a model without any)."""
    return str(next((t.device for t in (*gm.parameters(), *gm.buffers())), torch.device("cpu")))


def _precision_text(gm: nn.Module, dtype: torch.dtype | None) -> str:
    """What the proof ran in, for the report: the dtype, and the model's where that differs."""
    own = ", ".join(sorted({dtype_name(t.dtype) for t in gm.parameters() if t.is_floating_point()}))
    if dtype is None:
        return own or "no floating-point weights"
    return f"{dtype_name(dtype)} (the model's {own} weights, read exactly as {dtype_name(dtype)})"


def verify_program(prog: Program, tol: Tolerance = VERIFY, device: torch.device | None = None) -> dict[str, Any]:
    """Compare the slim model with the zeroed original (where `compensate` folded constants, with
    them injected). Approximate folds (zero-padded convs) are taken out of the slim model for
    the exact comparison, and LayerNorms that lost channels (`--prune-normalized`) normalize over
    the kept channels in its reference; the slim model's deviation from the zeroed original
    itself is reported under "approximate". `device`: where both run, a module's weights at a
    time (None: where the program lives)."""
    if prog.reference is None:
        raise CompileError("verify needs a slimmed program: run 'slim' before it")
    if prog.on_meta:
        return {"ok": None, "skipped": "the model is on the meta device; nothing to run"}
    if prog.source is not None:
        with streamed(prog.source, prog.reference):
            check_program(prog, prog.reference)
    folds = prog.compensation.folds if prog.compensation is not None else ()
    exact, approx = tuple(f for f in folds if f.exact), tuple(f for f in folds if not f.exact)
    reference = constant_reference(prog, exact)
    norms = normalize_over_kept(reference.gm, prog.removal.removed)
    what = _reference_text(exact) + (f" (the slim model without its {len(approx)} approximate folds)" if approx else "")
    if norms:
        what += f", its {len(norms)} LayerNorms that lost channels normalizing over the kept ones"
    checked = prog.replace(gm=_without_folds(prog, approx)) if approx else prog
    dtype = proof_dtype(prog.gm)
    worst, worst_rel = _compare(checked, reference, what, tol, dtype, device)
    result: dict[str, Any] = {"ok": True, "reference": what, "max_error": worst, "max_relative_error": worst_rel,
                              "rtol": tol.rtol, "atol": tol.atol, "precision": _precision_text(prog.gm, dtype),
                              "device": str(device) if device is not None else _home(prog.gm)}
    if approx or norms:
        full = constant_reference(prog, folds)
        found = [c for inputs in _inputs(prog) for c in _output_comparisons(prog.gm, full, inputs, tol, dtype, device)]
        result["approximate"] = {
            "reference": _reference_text(folds),
            "max_error": max(c.max_error for c in found),
            "max_relative_error": max(c.relative_error for c in found),
            "where": list(dict.fromkeys(f.module for f in approx)) + norms,
        }
    return result


@register_pass
@dataclass(frozen=True)
class Verify:
    """Check that the slim model equals the original with the removed channels zeroed (and the
    constants `compensate` folded injected)."""

    name: ClassVar[str] = "verify"
    requires: ClassVar = (SLIMMED,)
    ensures: ClassVar = ()
    rtol: float = VERIFY.rtol
    atol: float = VERIFY.atol
    runtime: Runtime = CPU  # where both models run, a module's weights copied there at a time

    def run(self, prog: Program) -> PassResult:
        device = self.runtime.device if not lives_on(prog.gm, self.runtime.device) else None
        with self.runtime.full_float32():
            result = verify_program(prog, Tolerance(self.rtol, self.atol), device)
        log.info("verify: %s", result)
        return PassResult(prog.replace(info={**prog.info, "verify": result}), changed=False)


verify = Verify
