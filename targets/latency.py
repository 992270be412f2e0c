"""A measured latency target (`--latency X --backend B`): the `Budget` the method pass searches.

`reduction(original, slim)` times both models on one backend at one batch size, alternately
(`bench.measure_latency`: the same loop, warm-up and paired ratios as `--bench`), and returns the
median per-round ratio original / slim. The search (passes/select.py, `_search_measured`) uses
FLOPs to predict where the target lies and corrects by what this measures, so each step costs
one export and one timing of both models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pcompiler.errors import CompileError
from pcompiler.targets.backends import BACKENDS, available_backends
from pcompiler.targets.bench import LatencySettings, measure_latency

TOLERANCE = 0.05  # relative: about the spread of paired medians on a shared 2-core machine


@dataclass(frozen=True)
class LatencyBudget:
    """Latency on `backend` at `batch` with `threads` CPU threads, wanted `target` times lower."""

    what: ClassVar[str] = "latency"
    target: float
    backend: str = "onnxruntime-cpu"
    batch: int = 1
    threads: int | None = None
    tolerance: float = TOLERANCE
    min_seconds: float = 1.0  # per model and step
    device: str = "cuda"  # where the CUDA backends run

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise CompileError(f"--backend {self.backend}: unknown backend", hint=f"choose from {', '.join(BACKENDS)}")
        if self.backend not in available_backends(self.device):
            raise CompileError(f"--backend {self.backend} does not run on this machine",
                               hint=f"available here: {', '.join(available_backends(self.device))}")
        if self.batch < 1 or (self.threads is not None and self.threads < 1) or not 0 < self.tolerance < 1:
            raise CompileError(f"--latency-batch ({self.batch}) and --threads ({self.threads}) must be at least 1 and the "
                               f"tolerance ({self.tolerance}) in (0, 1)")

    def settings(self) -> LatencySettings:
        return LatencySettings(batch_sizes=(self.batch,), backends=(self.backend,), threads=self.threads,
                               min_seconds=self.min_seconds, device=self.device)

    def reduction(self, original: torch.nn.Module, slim: torch.nn.Module, example_inputs: tuple) -> float:
        (row,) = measure_latency({"original": original, "slim": slim}, example_inputs, self.settings())
        if "error" in row:
            raise CompileError(f"--latency: timing on {self.backend} at batch {self.batch} failed: {row['error']}",
                               hint="choose another --backend, or use --speedup (FLOPs)")
        return float(row["speedup"])

    def describe(self) -> dict[str, Any]:
        return {"what": self.what, **dataclasses.asdict(self),
                "threads": self.threads or torch.get_num_threads()}
