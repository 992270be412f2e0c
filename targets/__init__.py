"""Backends a slim Program is written to, one file each, and what they share.

- `pytorch`: the GraphModule as a pickle (`model.pt`), a `torch.export` program (`model.pt2`)
  that loads with plain torch and no pickle, a state dict, and `export_all` that writes them all.
- `onnx`: `torch.onnx.export`, then onnxruntime runs the file and its outputs are compared with
  torch's.
- `bench`: static costs (parameters, FLOPs) and latency of original against slim; `backends`:
  how each latency backend runs a model, and which this machine has.

Every export function returns an `ExportResult` and never raises for a failed export: a model
that one backend cannot take still gets the others written. Each export reloads what it wrote
and compares outputs with the Program's GraphModule on the example inputs, in eval mode.

This module holds what the backends share: `ExportResult`, the check of a reloaded file's
outputs (`pcompiler.compare` with the EXPORT tolerance) and the guard that turns
an exception into a one-line reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pcompiler.compare import Tolerance, compare, export_tolerance, flatten_tensors
from pcompiler.costs import eval_mode
from pcompiler.errors import CompileError, one_line
from pcompiler.ir import Program

log = logging.getLogger("pcompiler")

@dataclass(frozen=True)
class ExportResult:
    """What one export wrote and whether it reproduces the model.

    format: "pt", "pt2", "onnx", "state_dict", "eager" or "hf". ok: the file was written and
    (where it can be run) gives the model's outputs within tolerance. error: one line saying why
    not, when not ok. skipped: not ok because the format does not apply to this model (the
    model's code holds its sizes, its config cannot hold the widths), and it was among the
    default formats rather than asked for: not a failure of the run. max_error: the largest
    absolute output difference found by the check (None: not run). seconds: time to write and
    check. note: anything worth knowing that is not an error (which ONNX exporter was used,
    modules that need the user's code to unpickle, ...). dtype: the floating-point dtype the
    file holds (None: not written)."""

    format: str
    path: str
    ok: bool
    error: str | None = None
    max_error: float | None = None
    seconds: float = 0.0
    note: str | None = None
    skipped: bool = False
    dtype: str | None = None


class NotApplicable(CompileError):
    """The format cannot hold this model (not a fault of the export): a skip where the format
    was only among the defaults, a failure where it was asked for."""


class ExportCheckFailed(CompileError):
    """The file was written but does not reproduce the model; carries the measured error."""

    def __init__(self, message: str, max_error: float | None = None):
        super().__init__(message)
        self.max_error = max_error


def guarded(fmt: str, path: str | Path, body: Callable[[], tuple[float | None, str | None]],
            dtype: str | None = None) -> ExportResult:
    """Run `body` (which writes and checks, returning (max_error, note)) and wrap the outcome
    (`dtype`: what the file holds).

    Any exception becomes ok=False with a one-line reason; the full traceback goes to the log.
    `NotApplicable` marks the result skipped (export_all keeps that only for default formats)."""
    t0 = time.perf_counter()
    try:
        max_error, note = body()
    except Exception as e:  # noqa: BLE001 - an export failure is a result, not a crash
        skipped = isinstance(e, NotApplicable)
        (log.info if skipped else log.warning)("export %s to %s %s: %s", fmt, path,
                                               "does not apply" if skipped else "failed", one_line(e))
        log.debug("export %s traceback", fmt, exc_info=True)
        return ExportResult(fmt, str(path), False, one_line(e), getattr(e, "max_error", None),
                            time.perf_counter() - t0, skipped=skipped)
    log.info("export %s: wrote %s (max error %s)", fmt, path, max_error)
    return ExportResult(fmt, str(path), True, None, max_error, time.perf_counter() - t0, note, dtype=dtype)


def require_weights(prog: Program, what: str) -> None:
    """Refuse to export a model that has no weights (lives on the meta device)."""
    if prog.on_meta or any(p.is_meta for p in prog.gm.parameters()):
        raise ValueError(
            f"cannot write {what}: the model is on the meta device and has no weights "
            "(load the checkpoint with real weights to export it)"
        )


def compare_outputs(got: list[Any], want: list[torch.Tensor], what: str, tolerance: Tolerance | None = None) -> float:
    """Max abs difference between two flat output lists (`pcompiler.compare` with the export
    tolerance of each reference output's dtype, `export_tolerance`, unless `tolerance` is given,
    on the CPU); raises
    ExportCheckFailed if the count, a shape, a NaN or an infinity, or a finite value differs. The
    max error is inf when a NaN or an infinity differs."""
    if len(got) != len(want):
        raise ExportCheckFailed(f"{what} gives {len(got)} outputs, torch gives {len(want)}")
    worst, failures = 0.0, []
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = torch.as_tensor(g).detach().cpu(), w.detach().cpu()
        if g.shape != w.shape:
            raise ExportCheckFailed(f"{what} output {i} has shape {tuple(g.shape)} against {tuple(w.shape)} (torch's)")
        c = compare(g, w, tolerance or export_tolerance(w.dtype))
        worst = max(worst, c.max_error)
        if not c.ok:
            failures.append(f"output {i}: {c.reason}")
    if failures:
        raise ExportCheckFailed(f"{what} differs from torch ({'; '.join(failures)})", worst)
    return worst


def reference_outputs(prog: Program) -> list[torch.Tensor]:
    """The Program's outputs on its example inputs, in eval mode, flattened."""
    with torch.no_grad(), eval_mode(prog.gm):
        return flatten_tensors(prog.gm(*prog.example_inputs))


__all__ = ["ExportResult", "NotApplicable", "compare_outputs"]
