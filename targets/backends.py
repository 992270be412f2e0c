"""The latency backends of the bench (`targets/bench.py`): how each runs a model, and which this
machine has.

A runner turns (model, inputs, threads, workdir, device) into a no-argument callable that does
one forward pass and returns when its work is done (a CUDA call after `torch.cuda.synchronize`).
`RUNNERS` maps each backend's name to (device kind, dtype, runner):

- `torch-cpu`: the model as given, eager, under inference_mode.
- `onnxruntime-cpu` / `onnxruntime-cuda`: the model exported to ONNX (static shapes) and run by
  onnxruntime's CPU or CUDA provider; on CUDA, inputs and outputs are bound on the GPU
  (IOBinding), so no host copies are timed.
- `torch-cuda-fp32`, `torch-cuda-bf16`, `torch-cuda-compile`: a copy of the model made on the
  device (`runtime.copy_to`), its floating tensors and inputs cast to the dtype, in the memory
  format the model has (no channels_last: it is timed as the user runs it, and a model that
  `.view()`s a conv's output fails in channels_last); compile: `torch.compile`, static shapes.

The CUDA runners run on the device they are given ("cuda:N"). onnxruntime falls back to the CPU
provider, with a warning only, when the CUDA provider is missing or fails to load;
`targets.onnx.session` refuses such a session (`ProviderFallback`), and `unavailable_backends`
lists onnxruntime-cuda as available only when a session on the CUDA provider really runs there.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pcompiler.errors import CompileError, one_line
from pcompiler.runtime import copy_to
from pcompiler.targets.onnx import CPU_PROVIDER, import_onnxruntime, provider_problem, session, write_onnx

BACKENDS = ("torch-cpu", "onnxruntime-cpu", "torch-cuda-fp32", "torch-cuda-bf16", "torch-cuda-compile",
            "onnxruntime-cuda")


def available_backends(device: str = "cuda") -> tuple[str, ...]:
    """The backends this machine can run (the CUDA ones on `device`), in BACKENDS order."""
    missing = unavailable_backends(device)
    return tuple(b for b in BACKENDS if b not in missing)


def unavailable_backends(device: str = "cuda") -> dict[str, str]:
    """Each backend this machine cannot run, with why. onnxruntime-cuda is available only when a
    session on the CUDA provider of `device` really runs there (tried on a one-node model):
    onnxruntime falls back to the CPU, with a warning only, when the provider fails to load."""
    missing: dict[str, str] = {}
    try:
        import_onnxruntime()
    except CompileError as e:
        missing |= dict.fromkeys(("onnxruntime-cpu", "onnxruntime-cuda"), one_line(e))
    if not torch.cuda.is_available():
        missing |= {b: "torch sees no CUDA device" for b in BACKENDS if RUNNERS[b][0] == "cuda"}
    elif "onnxruntime-cuda" not in missing:
        problem = provider_problem("CUDAExecutionProvider", _device_id(cuda_device(device)))
        if problem is not None:
            missing["onnxruntime-cuda"] = problem
    return missing


def cuda_device(name: str = "cuda") -> torch.device:
    """The CUDA device `name` ("cuda" or "cuda:N") stands for, with its index where torch sees a
    GPU ("cuda": the current device); refused when the machine has no such device."""
    device = torch.device(name)
    if not torch.cuda.is_available():
        return device
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise CompileError(f"bench device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                           hint="cuda:0 is the first")
    return device


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` while inside."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device_id(device: torch.device | None) -> int:
    return device.index if device is not None and device.index is not None else 0


def _onnxruntime():
    try:
        return import_onnxruntime()
    except CompileError:
        return None


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags (Linux's /proc/cpuinfo; elsewhere the platform's name, no flags)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return cpu, flags


def cpu_channel_block() -> int | None:
    """The channel block of onnxruntime's NCHWc convolutions on this CPU: 16 with AVX-512, 8 with
    AVX2 (None: unknown). `--round-to` stays 8 on both: on resnet50 at 2x fewer FLOPs, rounding to
    16 measured the same speedup as 8 on an AVX-512 machine (docs/benchmarks.md, "Latency"), and
    16 would leave a 16-channel group nothing to remove."""
    flags = _cpuinfo()[1]
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else None


def machine(device: str = "cuda") -> dict[str, Any]:
    """What the timings were measured on (the GPU: `device`'s)."""
    cpu = _cpuinfo()[0]
    ort = _onnxruntime()
    return {
        "cpu": cpu,
        "cpu_channel_block": cpu_channel_block(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(cuda_device(device)) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": getattr(ort, "__version__", None),
        "onnxruntime_providers": ort.get_available_providers() if ort is not None else None,
    }


# (model, inputs, threads, workdir, device) -> one forward pass; see the module docstring.
Runner = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], int, Path, torch.device], Callable[[], Any]]


def _torch_cpu(model, inputs, threads, workdir, device):
    def call():
        with torch.inference_mode():
            return model(*inputs)

    return call


def on_device(model: torch.nn.Module, inputs: Sequence[torch.Tensor], device: torch.device | str,
              dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A copy of `model` made on `device` (`runtime.copy_to`: `model` is untouched) with its
    floating parameters, buffers and tensor constants cast to `dtype`, and `inputs` there (the
    floating ones in `dtype`). Memory formats are kept: the model runs as the user runs it."""
    moved = copy_to(model, device)  # keeps the eval flags measure_latency set (no .eval(): export modules refuse it)
    moved.to(dtype=dtype)  # floating parameters and buffers only
    for m in moved.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.is_floating_point():
                setattr(m, name, value.to(dtype))
    xs = tuple(t.to(device, dtype=dtype if t.is_floating_point() else t.dtype) for t in inputs)
    return moved, xs


def _torch_cuda(dtype: torch.dtype, compile: bool) -> Runner:
    def runner(model, inputs, threads, workdir, device):
        model, xs = on_device(model, inputs, device, dtype)
        fn = torch.compile(model, dynamic=False) if compile else model

        def call():
            with torch.inference_mode():
                out = fn(*xs)
            torch.cuda.synchronize(device)
            return out

        return call

    return runner


def _onnxruntime_runner(provider: str) -> Runner:
    def runner(model, inputs, threads, workdir, device):
        import_onnxruntime()  # before the export: without it, say how to install it, not after seconds
        path = workdir / f"b{inputs[0].shape[0] if inputs and inputs[0].dim() else 0}.onnx"
        names = [f"input_{i}" for i in range(len(inputs))]
        write_onnx(model, inputs, path, names=names)
        # Not spinning: idle pool threads of one model would take the cores from the other
        # model's call that follows (measured: a small model's p90 8x its p50).
        sess = session(path, threads, provider, spinning=False, device_id=_device_id(device))
        wanted = [i.name for i in sess.get_inputs()]
        if provider == CPU_PROVIDER:
            feed = {n: t.numpy() for n, t in zip(names, inputs) if n in wanted}
            return lambda: sess.run(None, feed)
        return _bound_on_gpu(sess, {n: t for n, t in zip(names, inputs) if n in wanted}, device)

    return runner


def _bound_on_gpu(sess, inputs: Mapping[str, torch.Tensor], device: torch.device) -> Callable[[], Any]:
    """A call of `sess` with inputs and outputs bound on `device` (IOBinding): time the model,
    not host <-> device copies."""
    on_gpu = {n: t.to(device).contiguous() for n, t in inputs.items()}
    binding = sess.io_binding()
    for n, t in on_gpu.items():
        binding.bind_input(n, "cuda", _device_id(device), _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
    for o in sess.get_outputs():
        binding.bind_output(o.name, "cuda", _device_id(device))

    def call():
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    call.inputs = on_gpu  # keeps the bound tensors alive as long as the call
    return call


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


RUNNERS: dict[str, tuple[str, str, Runner]] = {  # name -> (device, dtype, runner)
    "torch-cpu": ("cpu", "float32", _torch_cpu),
    "onnxruntime-cpu": ("cpu", "float32", _onnxruntime_runner(CPU_PROVIDER)),
    "torch-cuda-fp32": ("cuda", "float32", _torch_cuda(torch.float32, compile=False)),
    "torch-cuda-bf16": ("cuda", "bfloat16", _torch_cuda(torch.bfloat16, compile=False)),
    "torch-cuda-compile": ("cuda", "bfloat16", _torch_cuda(torch.bfloat16, compile=True)),
    "onnxruntime-cuda": ("cuda", "float32", _onnxruntime_runner("CUDAExecutionProvider")),
}
PROVIDERS = {"onnxruntime-cpu": CPU_PROVIDER, "onnxruntime-cuda": "CUDAExecutionProvider"}  # onnxruntime's
