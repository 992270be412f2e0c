"""Bench target: what a model costs: parameters and FLOPs (counted by `pcompiler.costs`), and
measured latency.

Latency (`measure_latency`, `bench`): each model runs on each backend at each batch size; the
models are timed *alternately* (A B, then B A, ...) in one loop, so that drift of a shared machine
(other load, clocks, thermal state) hits them alike. Per model: p50, p90, mean and min of the
timed calls; the speedup is the median of the per-round ratios original / slim (paired, so it
is robust to drift), and the efficiency is that speedup divided by the FLOPs reduction (1.0:
the latency falls exactly as much as the FLOPs). Backends (`BACKENDS`):

- `torch-cpu`: eager fp32 under inference_mode, `threads` intra-op threads.
- `onnxruntime-cpu`: the model exported to ONNX (static shapes, one file per batch size, in a
  temporary folder) and run by the CPU provider with `threads` intra-op threads.
- on CUDA, when torch sees a GPU: `torch-cuda-fp32` and `torch-cuda-bf16` (eager, weights and
  inputs in channels_last, bf16 weights and inputs), `torch-cuda-compile` (bf16 channels_last,
  `torch.compile` with static shapes; its compilation happens in the warm-up).
- `onnxruntime-cuda`, when onnxruntime-gpu provides the CUDA provider: fp32 with inputs and
  outputs bound on the GPU (IOBinding), so no host copies are timed.

A CUDA call is timed to the end of its work (`torch.cuda.synchronize`). Repetitions: `warmup`
untimed calls per model, then enough rounds that each model runs for at least `min_seconds`,
between `min_reps` and `max_reps`. A backend or batch size that fails (a model ONNX cannot
export, out of memory) gives a row with `error` instead of timings; the others still run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pcompiler.costs import eval_mode, static_costs
from pcompiler.errors import one_line
from pcompiler.input_checks import check_input_memory

log = logging.getLogger("pcompiler")


# ---------------------------------------------------------------------------------------------
# Latency

BACKENDS = ("torch-cpu", "onnxruntime-cpu", "torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-compile",
            "onnxruntime-cuda")
BATCH_SIZES = (1, 8, 64)

# Channel multiple whose widths the device's kernels run at full speed (`--round-to`'s default).
# CPU: oneDNN and onnxruntime's MLAS block channels by 8 (AVX2) or 16 (AVX-512). Measured on a
# 2-core AVX-512 EPYC, resnet50 pruned to 2x fewer FLOPs, onnxruntime at batch 64 (see
# docs/benchmarks.md): speedup 1.46 with widths not rounded, 1.97 rounded to 8; 16 measured the
# same as 8 (1.96x both, one run), so 8 (the finer choice). CUDA: tensor cores take fp16/bf16 channels in multiples of 8 (NVIDIA's
# performance guide); not measured here (no GPU was lent).
ROUND_TO = {"cpu": 8, "cuda": 8}


def default_round_to(device: str | torch.device) -> int:
    """The channel multiple that suits `device` (1 for a device not in ROUND_TO)."""
    return ROUND_TO.get(torch.device(device).type, 1)


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured (see the module docstring). backends: None = every available one.
    threads: CPU intra-op threads (None: torch's current setting)."""

    batch_sizes: tuple[int, ...] = BATCH_SIZES
    backends: tuple[str, ...] | None = None
    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 200
    min_seconds: float = 1.0
    threads: int | None = None


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


def available_backends() -> tuple[str, ...]:
    """The backends this machine can run, in BACKENDS order."""
    names = ["torch-cpu"]
    ort = _onnxruntime()
    if ort is not None:
        names.append("onnxruntime-cpu")
    if torch.cuda.is_available():
        names += ["torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-compile"]
        if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            names.append("onnxruntime-cuda")
    return tuple(names)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def machine() -> dict[str, Any]:
    """What the timings were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ort = _onnxruntime()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": getattr(ort, "__version__", None),
    }


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


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# A runner turns (model, inputs) into a no-argument callable that does one forward pass and
# returns when its work is done. Each gets its own copy of the model (they move and cast it).
Runner = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], int, Path], Callable[[], Any]]


def _torch_cpu(model, inputs, threads, workdir):
    def call():
        with torch.inference_mode():
            return model(*inputs)

    return call


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _torch_cuda(dtype: torch.dtype, compile: bool) -> Runner:
    def runner(model, inputs, threads, workdir):
        # The copy keeps the eval flags measure_latency set (no .eval(): torch.export modules refuse it).
        model = copy.deepcopy(model).to("cuda", dtype=dtype, memory_format=torch.channels_last)
        xs = tuple(_channels_last(t.to("cuda", dtype=dtype if t.is_floating_point() else t.dtype)) for t in inputs)
        fn = torch.compile(model, dynamic=False) if compile else model

        def call():
            with torch.inference_mode():
                out = fn(*xs)
            torch.cuda.synchronize()
            return out

        return call

    return runner


def _onnxruntime_runner(cuda: bool) -> Runner:
    def runner(model, inputs, threads, workdir):
        from pcompiler.targets.onnx import session, write_onnx

        path = workdir / f"b{inputs[0].shape[0] if inputs and inputs[0].dim() else 0}.onnx"
        names = [f"input_{i}" for i in range(len(inputs))]
        write_onnx(model, inputs, path, names=names)
        # Not spinning: idle pool threads of one model would take the cores from the other
        # model's call that follows (measured: a small model's p90 8x its p50).
        sess = session(path, threads, "CUDAExecutionProvider" if cuda else "CPUExecutionProvider", spinning=False)
        wanted = [i.name for i in sess.get_inputs()]
        feed = {n: t.numpy() for n, t in zip(names, inputs) if n in wanted}
        if not cuda:
            return lambda: sess.run(None, feed)
        # Inputs and outputs stay on the GPU: time the model, not host <-> device copies.
        on_gpu = {n: torch.from_numpy(a).to("cuda") for n, a in feed.items()}
        binding = sess.io_binding()
        for n, t in on_gpu.items():
            binding.bind_input(n, "cuda", 0, _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cuda")

        def call():
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return call

    return runner


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


RUNNERS: dict[str, tuple[str, str, Runner]] = {  # name -> (device, dtype, runner)
    "torch-cpu": ("cpu", "float32", _torch_cpu),
    "onnxruntime-cpu": ("cpu", "float32", _onnxruntime_runner(cuda=False)),
    "torch-cuda-fp32": ("cuda", "float32", _torch_cuda(torch.float32, compile=False)),
    "torch-cuda-bf16": ("cuda", "bfloat16", _torch_cuda(torch.bfloat16, compile=False)),
    "torch-cuda-compile": ("cuda", "bfloat16", _torch_cuda(torch.bfloat16, compile=True)),
    "onnxruntime-cuda": ("cuda", "float32", _onnxruntime_runner(cuda=True)),
}


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


def _row(backend: str, batch: int, threads: int, settings: LatencySettings) -> dict[str, Any]:
    device, dtype, _ = RUNNERS[backend]
    return {"backend": backend, "batch": batch, "device": device, "dtype": dtype,
            "threads": threads if device == "cpu" else None, "warmup": settings.warmup}


def measure_latency(models: Mapping[str, torch.nn.Module], example_inputs: Sequence[torch.Tensor],
                    settings: LatencySettings = LatencySettings()) -> list[dict[str, Any]]:
    """Latency of each model (e.g. {"original": a, "slim": b}) on each backend and batch size,
    timed alternately. One row per (backend, batch): {"backend", "batch", "device", "dtype",
    "threads", "warmup", "reps", "<name>": Timing as a dict, ..., "speedup" (when there are
    "original" and "slim": the median per-round ratio original/slim)} or {..., "error"}."""
    backends = settings.backends if settings.backends is not None else available_backends()
    unknown = [b for b in backends if b not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    threads = settings.threads or torch.get_num_threads()
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_threads(threads))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pcompiler-bench-"))
        for model in models.values():
            stack.enter_context(eval_mode(model))
        for backend in backends:
            for batch in settings.batch_sizes:
                row = _row(backend, batch, threads, settings)
                rows.append(row)
                try:
                    inputs = make_inputs(example_inputs, batch)
                    calls = {}
                    for name, model in models.items():
                        workdir = Path(tmp) / backend / name
                        workdir.mkdir(parents=True, exist_ok=True)
                        calls[name] = RUNNERS[backend][2](model, inputs, threads, workdir)
                    samples = alternate(calls, settings)
                except Exception as e:  # noqa: BLE001 - one backend failing is a result, not a crash
                    row["error"] = one_line(e)
                    log.warning("bench %s at batch %d failed: %s", backend, batch, row["error"])
                    log.debug("bench traceback", exc_info=True)
                    continue
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                row["reps"] = len(next(iter(samples.values())))
                for name, s in samples.items():
                    row[name] = dataclasses.asdict(Timing.of(s))
                if "original" in samples and "slim" in samples:
                    row["speedup"] = statistics.median(a / b for a, b in zip(samples["original"], samples["slim"]))
                log.info("bench %s batch %d: %s", backend, batch,
                         ", ".join(f"{n} p50 {row[n]['p50'] * 1e3:.3g} ms" for n in samples))
    return rows


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
    return {"machine": machine(), "settings": {**dataclasses.asdict(settings), "threads": threads},
            "costs": costs, "latency": rows}
