"""A measured latency target (`--latency X --backend B`): the `Budget` the method pass searches.

`reduction(original, slim)` times both models on one backend at one batch size, alternately
(`bench.measure_latency`: the same loop, warm-up and paired ratios as `--bench`), and returns the
median per-round ratio original / slim. `model(...)` is the predictor of the search
(passes/select.py, `_search_measured`): the kernel model measured with the backend's profiler
(targets/latency_model.py: onnxruntime's, or torch.profiler on torch-cpu and the eager CUDA
backends); `predictor="flops"`, torch-cuda-compile, or a model whose kernels cannot be tied to the
groups: None, and the search predicts by FLOPs with one ratio for every group. Each step of the
search costs one export and one timing of both models.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pcompiler.errors import CompileError
from pcompiler.ir import Lattice
from pcompiler.targets.backends import BACKENDS, PROVIDERS, available_backends
from pcompiler.targets.bench import LatencySettings, measure_latency
from pcompiler.targets.latency_model import KernelModel, ModelUnavailable, measure_model

log = logging.getLogger("pcompiler")
PREDICTORS = ("profile", "flops")
# How the kernel model's prediction is spent: one ratio for every group (bisected on the model), or
# passes/select.py's knapsack. Uniform is the default: on the digits networks at --latency 2,
# fine-tuned alike, the knapsack kept 96.2% (ResNet, 3 seeds, 93.6-98.9) against 98.8% with one
# ratio; docs/bench_latency_accuracy.md.
ALLOCATIONS = ("uniform", "knapsack")
# onnxruntime's kernel model is profiled on one thread whatever --threads is: on resnet50,
# mobilenet_v2 and vit_b_16 at batch 1 and 8, a model profiled at 1 thread predicted the 2-thread
# speedups of 20 random prunings with 2-7% mean error, one profiled at 2 threads with 11-27%
# (parallel kernels' times under its profiler do not add up to the call);
# docs/bench_latency_fidelity.md. torch's is profiled at --threads (an op's time under
# torch.profiler is the calling thread's wall time, its parallel work inside it): over the same
# 12 rows at 2 threads, 3.5% mean error against 5.6% for a 1-thread model (resnet50 at batch 1:
# 2.7% against 17.4%); docs/bench_latency_fidelity_torch_cpu.md.
PROFILE_THREADS = 1

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
    predictor: str = "profile"  # PREDICTORS: the kernel model where the backend has one, or FLOPs
    allocation: str = "uniform"  # ALLOCATIONS: with the kernel model, one ratio for all, or the knapsack

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise CompileError(f"--backend {self.backend}: unknown backend", hint=f"choose from {', '.join(BACKENDS)}")
        if self.backend not in available_backends(self.device):
            raise CompileError(f"--backend {self.backend} does not run on this machine",
                               hint=f"available here: {', '.join(available_backends(self.device))}")
        if self.allocation not in ALLOCATIONS:
            raise CompileError(f"--latency-allocation {self.allocation}: unknown", hint=f"choose from {', '.join(ALLOCATIONS)}")
        if self.predictor not in PREDICTORS:
            raise CompileError(f"--latency-predictor {self.predictor}: unknown", hint=f"choose from {', '.join(PREDICTORS)}")
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

    def model(self, original: torch.nn.Module, example_inputs: tuple, lattices: list[Lattice],
              slim: Callable[[Mapping[int, int]], torch.nn.Module]) -> tuple[KernelModel | None, dict[str, Any]]:
        """The kernel model of `original` on the backend and its description, or None and why not."""
        if self.predictor == "flops":
            return None, {"kind": "flops", "why": "asked for (--latency-predictor flops)"}
        try:
            model = measure_model(original, example_inputs, lattices, slim, self.backend, self.batch,
                                  self.profile_threads(), self.device)
        except ModelUnavailable as e:
            log.warning("latency model unavailable (%s): predicting by FLOPs, one ratio for every group", e)
            return None, {"kind": "flops", "why": str(e)}
        return model, {**model.describe(), "profiled_threads": self.profile_threads()}

    def profile_threads(self) -> int:
        """The CPU threads the kernel model is profiled at (see PROFILE_THREADS)."""
        return PROFILE_THREADS if self.backend in PROVIDERS else self.threads or torch.get_num_threads()

    def describe(self) -> dict[str, Any]:
        return {"what": self.what, **dataclasses.asdict(self),
                "threads": self.threads or torch.get_num_threads()}
