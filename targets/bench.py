"""Bench target: what a model costs: parameters and FLOPs (counted by `pcompiler.costs`), and
measured latency.

Latency (`measure_latency`, `bench`): each model runs on each backend at each batch size; the
models are timed *alternately* (A B, then B A, ...) in one loop, so that drift of a shared machine
(other load, clocks, thermal state) hits them alike. Per model: p50, p90, mean and min of the
timed calls; the speedup is the median of the per-round ratios original / slim (paired, so it
is robust to drift), and the efficiency is that speedup divided by the FLOPs reduction (1.0:
the latency falls exactly as much as the FLOPs). Backends (`BACKENDS`, run by `targets/backends.py`):

- `torch-cpu`: eager fp32 under inference_mode, `threads` intra-op threads.
- `onnxruntime-cpu`: the model exported to ONNX (static shapes, one file per batch size, in a
  temporary folder) and run by the CPU provider with `threads` intra-op threads.
- on CUDA, when torch sees a GPU: `torch-cuda-fp32` and `torch-cuda-bf16` (eager; bf16: floating
  weights, buffers and inputs cast to bfloat16), `torch-cuda-compile` (bf16, `torch.compile` with
  static shapes; its compilation happens in the warm-up). The model is copied onto the device
  with `runtime.copy_to` and keeps the memory format it has (no channels_last: the model is timed
  as the user runs it, and a model that `.view()`s a conv's output would fail in channels_last).
- `onnxruntime-cuda`, when a session on onnxruntime's CUDA provider really runs there (a
  one-node model is tried: onnxruntime-gpu installed and its CUDA libraries loading): fp32 with
  inputs and outputs bound on the GPU (IOBinding), so no host copies are timed.

The CUDA backends run on `LatencySettings.device` ("cuda": the current device, or "cuda:N"),
which each row records. Each onnxruntime row records the provider its sessions ran on; a
session that onnxruntime put on another provider than the backend's (it falls back to the CPU
with a warning only) makes the row an error saying so, not CPU timings under a CUDA name.

A CUDA call is timed to the end of its work (`torch.cuda.synchronize`). Repetitions: `warmup`
untimed calls per model, then enough rounds that each model runs for at least `min_seconds`,
between `min_reps` and `max_reps`. A backend or batch size that fails (a model ONNX cannot
export, out of memory) gives a row with `error` instead of timings; the others still run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pcompiler.costs import eval_mode, static_costs
from pcompiler.errors import CompileError, one_line
from pcompiler.input_checks import check_input_memory
from pcompiler.targets.backends import (
    BACKENDS,
    PROVIDERS,
    RUNNERS,
    available_backends,
    cpu_channel_block,
    cpu_threads,
    cuda_device,
    machine,
    unavailable_backends,
)
from pcompiler.targets.onnx import ProviderFallback

log = logging.getLogger("pcompiler")

__all__ = ["BACKENDS", "RUNNERS", "LatencySettings", "Timing", "alternate", "available_backends", "bench",
           "backend_round_to", "default_round_to", "machine", "make_inputs", "measure_latency", "unavailable_backends"]


# ---------------------------------------------------------------------------------------------
# Latency

BATCH_SIZES = (1, 8, 64)

# Channel multiple whose widths the device's kernels run at full speed (`--round-to`'s default).
# CPU: oneDNN and onnxruntime's MLAS block channels by 8 (AVX2) or 16 (AVX-512); docs/benchmarks.md
# ("Latency") measures what rounding to 8 and to 16 buys against not rounding. CUDA: tensor cores
# take fp16/bf16 channels in multiples of 8 (NVIDIA's performance guide).
ROUND_TO = {"cpu": 8, "cuda": 8}


def default_round_to(device: str | torch.device) -> int:
    """The channel multiple that suits `device` (1 for a device not in ROUND_TO)."""
    return ROUND_TO.get(torch.device(device).type, 1)


def backend_round_to(backend: str) -> int:
    """The channel multiple of `backend`'s kernels, for `--latency` (whose latency model is measured
    on that lattice only): the CPU's NCHWc channel block where it is known, else ROUND_TO's."""
    kind = RUNNERS[backend][0] if backend in RUNNERS else "cpu"
    return (cpu_channel_block() or ROUND_TO["cpu"]) if kind == "cpu" else ROUND_TO[kind]


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured (see the module docstring). backends: None = every available one.
    threads: CPU intra-op threads (None: torch's current setting). device: where the CUDA
    backends run ("cuda": the current CUDA device; "cuda:N")."""

    batch_sizes: tuple[int, ...] = BATCH_SIZES
    backends: tuple[str, ...] | None = None
    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 200
    min_seconds: float = 1.0
    threads: int | None = None
    device: str = "cuda"

    def __post_init__(self) -> None:
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind != "cuda":
            raise CompileError(f"bench device {self.device!r}: the device of the CUDA backends must be a CUDA device",
                               hint="cuda or cuda:N (the CPU backends need no device)")


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one model: percentiles over `reps` timed calls."""

    p50: float
    p90: float
    mean: float
    min: float
    reps: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        ordered = sorted(samples)
        return cls(p50=statistics.median(ordered), p90=_percentile(ordered, 0.9), mean=statistics.fmean(ordered),
                   min=ordered[0], reps=len(ordered))


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted values (numpy's default method)."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)



def make_inputs(example_inputs: Sequence[torch.Tensor], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like `example_inputs` with the first (batch) dimension set to `batch`:
    normal noise for floating inputs, zeros (a valid index) for integer ones. Refused (CompileError)
    before allocating when they would not fit in memory."""
    check_input_memory([tuple(t.shape) for t in example_inputs if t.dim()], largest_batch=batch, option="bench:",
                       element_bytes=max((t.element_size() for t in example_inputs), default=4))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in example_inputs:
        shape = (batch, *t.shape[1:]) if t.dim() else ()
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=t.dtype))
        else:
            out.append(torch.zeros(shape, dtype=t.dtype))
    return tuple(out)



def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(calls: Mapping[str, Callable[[], Any]], settings: LatencySettings) -> dict[str, list[float]]:
    """Time each call alternately: warm-up, then rounds in which every call runs once (the order
    reversed every other round) until each has run `min_seconds` (within min/max_reps).
    Returns the per-call seconds of each name, round by round."""
    names = list(calls)
    for name in names:
        for _ in range(settings.warmup):
            calls[name]()
    one_round = sum(_timed(calls[n]) for n in names)  # one more untimed warm-up round
    wanted = math.ceil(settings.min_seconds * len(names) / max(one_round, 1e-9))
    reps = max(settings.min_reps, min(settings.max_reps, wanted))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(_timed(calls[name]))
    return samples


def _row(backend: str, batch: int, threads: int, settings: LatencySettings, cuda: torch.device | None) -> dict[str, Any]:
    kind, dtype, _ = RUNNERS[backend]
    row = {"backend": backend, "batch": batch, "device": "cpu" if kind == "cpu" else str(cuda), "dtype": dtype,
           "threads": threads if kind == "cpu" else None, "warmup": settings.warmup}
    if backend in PROVIDERS:
        row["provider"] = None  # the provider the sessions ran on, once known
    return row


def measure_latency(models: Mapping[str, torch.nn.Module], example_inputs: Sequence[torch.Tensor],
                    settings: LatencySettings = LatencySettings()) -> list[dict[str, Any]]:
    """Latency of each model (e.g. {"original": a, "slim": b}) on each backend and batch size,
    timed alternately. One row per (backend, batch): {"backend", "batch", "device" ("cpu" or
    "cuda:N"), "dtype", "threads", "warmup", ["provider": onnxruntime's, on onnxruntime rows],
    "reps", "<name>": Timing as a dict, ..., "speedup" (when there are "original" and "slim": the
    median per-round ratio original/slim)} or {..., "error"}."""
    backends = settings.backends if settings.backends is not None else available_backends(settings.device)
    unknown = [b for b in backends if b not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    threads = settings.threads or torch.get_num_threads()
    cuda = cuda_device(settings.device) if any(RUNNERS[b][0] == "cuda" for b in backends) else None
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_threads(threads))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pcompiler-bench-")))
        for model in models.values():
            stack.enter_context(eval_mode(model))
        for backend in backends:
            for batch in settings.batch_sizes:
                rows.append(_row(backend, batch, threads, settings, cuda))
                _measure(rows[-1], models, example_inputs, settings, tmp / backend, cuda)
    return rows


def _measure(row: dict[str, Any], models: Mapping[str, torch.nn.Module], example_inputs: Sequence[torch.Tensor],
             settings: LatencySettings, workdir: Path, cuda: torch.device | None) -> None:
    """Time `models` on the row's backend and batch size into `row`, or write why not into it."""
    backend, batch, threads = row["backend"], row["batch"], settings.threads or torch.get_num_threads()
    try:
        inputs = make_inputs(example_inputs, batch)
        calls = {}
        for name, model in models.items():
            (workdir / name).mkdir(parents=True, exist_ok=True)
            calls[name] = RUNNERS[backend][2](model, inputs, threads, workdir / name, cuda)
        samples = alternate(calls, settings)
    except Exception as e:  # noqa: BLE001 - one backend failing is a result, not a crash
        # A session onnxruntime put on another provider is an error, not a note beside timings:
        # they would be the CPU's under a CUDA backend's name (and in the speedup headline).
        if isinstance(e, ProviderFallback):
            row["provider"] = e.used
        row["error"] = one_line(e)
        log.warning("bench %s at batch %d failed: %s", backend, batch, row["error"])
        log.debug("bench traceback", exc_info=True)
        return
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if backend in PROVIDERS:
        row["provider"] = PROVIDERS[backend]  # session() refuses a session on any other
    row["reps"] = len(next(iter(samples.values())))
    for name, s in samples.items():
        row[name] = dataclasses.asdict(Timing.of(s))
    if "original" in samples and "slim" in samples:
        row["speedup"] = statistics.median(a / b for a, b in zip(samples["original"], samples["slim"]))
    log.info("bench %s batch %d: %s", backend, batch, ", ".join(f"{n} p50 {row[n]['p50'] * 1e3:.3g} ms" for n in samples))


def bench(models: Mapping[str, torch.nn.Module], example_inputs: Sequence[torch.Tensor],
          settings: LatencySettings = LatencySettings()) -> dict[str, Any]:
    """Static costs and latency of `models` (see `measure_latency`), with the machine and the
    settings. Each latency row with a speedup also gets `flops_reduction` (original FLOPs /
    slim FLOPs) and `efficiency` (speedup / flops_reduction)."""
    costs = {name: static_costs(m, example_inputs) for name, m in models.items()}
    rows = measure_latency(models, example_inputs, settings)
    if "original" in costs and "slim" in costs and costs["slim"]["flops"]:
        reduction = costs["original"]["flops"] / costs["slim"]["flops"]
        for row in rows:
            if "speedup" in row:
                row["flops_reduction"] = reduction
                row["efficiency"] = row["speedup"] / reduction
    threads = settings.threads or torch.get_num_threads()
    return {"machine": machine(settings.device), "settings": {**dataclasses.asdict(settings), "threads": threads},
            "costs": costs, "latency": rows}
