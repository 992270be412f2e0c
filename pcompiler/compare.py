"""Output comparison: one function, named tolerances, a typed result.

A leaf of the core: it imports nothing from pcompiler. Every place that asks "do these outputs
match?" (trace reproducing the model, verify proving the rewrite, an export reloading its file)
calls `compare` with one of the named tolerances below.

Semantics, per tensor pair (`got` against the reference `want`):
- the shapes must be equal;
- where `want` is NaN, `got` must be NaN; where `want` is an infinity, `got` must be the same
  infinity (same sign); where `want` is finite, `got` must be finite;
- the finite values must satisfy |got - want| <= atol + rtol * scale, where scale is the largest
  |want| over the finite reference values;
- integer and bool tensors must be equal.

Anything else is a mismatch. `max_error` never hides a non-finite mismatch: it is `inf` whenever
`nonfinite_mismatches` (the count of positions whose NaN/inf pattern differs) is not zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Tolerance:
    """Finite values match when |got - want| <= atol + rtol * max |want| (finite reference values)."""

    rtol: float
    atol: float

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


TRACE = Tolerance(rtol=1e-4, atol=1e-5)  # the traced graph against the user's model
VERIFY = Tolerance(rtol=1e-4, atol=1e-5)  # the slim model against the zeroed original
EXPORT = Tolerance(rtol=1e-3, atol=1e-4)  # a written file (pt, pt2, ONNX) against the Program
# A file in half precision against the Program: each computes in that dtype, and rounds in
# another order (hf/'s rescaled RMSNorm weights, a runtime's kernels): 4 units of the dtype's
# precision (machine epsilon) of the output's scale.
HALF_EXPORT = {torch.bfloat16: Tolerance(rtol=4 * 2**-7, atol=2**-7 / 16),
               torch.float16: Tolerance(rtol=4 * 2**-10, atol=2**-10 / 16)}


def export_tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance an exported file's outputs of `dtype` are held to."""
    return HALF_EXPORT.get(dtype, EXPORT)


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing one tensor with its reference.

    ok: every position matches (see the module docstring). max_error: the largest |got - want|
    over the positions where both are finite; inf when the shapes differ or any non-finite
    position mismatches. scale: the largest |want| over its finite values. nonfinite_mismatches:
    how many positions have NaN or an infinity on one side that the other does not match.
    reason: one line saying why not ok (None when ok). finite: how many positions were compared
    as numbers (both finite; every position of an integer tensor): 0 means the values proved
    nothing beyond their NaN/inf pattern."""

    ok: bool
    max_error: float
    scale: float
    nonfinite_mismatches: int = 0
    reason: str | None = None
    finite: int = 0

    @property
    def relative_error(self) -> float:
        """max_error relative to the reference's scale (inf for a non-finite mismatch)."""
        return self.max_error / max(self.scale, 1e-12)


def compare(got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> Comparison:
    """Compare `got` with the reference `want` under `tol` (module docstring: the semantics)."""
    if tuple(got.shape) != tuple(want.shape):
        return Comparison(False, math.inf, 0.0, 0, f"shape {tuple(got.shape)} against {tuple(want.shape)}")
    if want.numel() == 0:
        return Comparison(True, 0.0, 0.0)
    g, w = _as_real(got.detach()), _as_real(want.detach())
    if not (w.is_floating_point() or g.is_floating_point()):
        wrong = int((g != w.to(g.device)).sum())
        diff = (g.double() - w.double().to(g.device)).abs().max()
        scale = float(w.double().abs().max())
        return Comparison(wrong == 0, float(diff), scale, 0, f"{wrong} values differ" if wrong else None, w.numel())
    g, w = g.double(), w.double().to(g.device)
    w_finite, g_finite = torch.isfinite(w), torch.isfinite(g)
    same_nonfinite = torch.where(torch.isnan(w), torch.isnan(g), g == w)
    mismatched = int(((~w_finite & ~same_nonfinite) | (w_finite & ~g_finite)).sum())
    both = w_finite & g_finite
    err = float((g[both] - w[both]).abs().max()) if bool(both.any()) else 0.0
    scale = float(w[w_finite].abs().max()) if bool(w_finite.any()) else 0.0
    finite = int(both.sum())
    if mismatched:
        return Comparison(False, math.inf, scale, mismatched,
                          f"{mismatched} position{'s' if mismatched > 1 else ''} differ{'' if mismatched > 1 else 's'} in NaN or "
                          f"infinity (finite error {err:.3g})", finite)
    ok = err <= tol.bound(scale)
    reason = None if ok else f"error {err:.3g} beyond {tol.bound(scale):.3g} (scale {scale:.3g})"
    return Comparison(ok, err, scale, 0, reason, finite)


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors inside a model output, in order: tuples and lists in order, dicts by value
    order (the order pytree and the ONNX exporter use); non-tensor leaves are dropped."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_tensors(v)]
    return []


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


__all__ = ["EXPORT", "HALF_EXPORT", "TRACE", "VERIFY", "Comparison", "Tolerance", "compare", "export_tolerance",
           "flatten_tensors"]
