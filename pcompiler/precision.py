"""Floating-point settings of a training run: subnormal numbers flushed to zero on CPU, and the
mixed-precision dtype a device trains in (`amp_dtype`).

Why: the regularizing methods drive the pruned filters, their norm scales and their momentum
buffers geometrically towards zero, through float32's subnormal range (below 1.18e-38). Many
x86 CPUs compute on subnormal operands or results through a microcode assist many times slower
than the normal path, so late steps of a long schedule cost several times an early one. With
flush-to-zero and denormals-are-zero on, such values become 0, which is what the methods mean
them to be; no value of normal size changes.

`torch.set_flush_denormal` sets the flags (x86 MXCSR's FTZ and DAZ; AArch64's FPCR FZ) of the
calling thread only, and torch's intra-op OpenMP threads keep the flags they started with. New
threads inherit their creator's flags, so `subnormals_flushed` restarts the OpenMP thread pool
(`omp_pause_resource_all`, OpenMP 5.0) after setting them, and again after restoring them: every
thread that runs a CPU kernel inside the block flushes, and none does after it unless it did before.

CUDA needs nothing: NVIDIA GPUs add and multiply float32 and float16 subnormals at full rate, and
bfloat16 shares float32's range. The block is a no-op for any device but the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("pcompiler")

FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32
_OPENMP_LIBRARY = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.so[^/]*$")
_OMP_PAUSE_SOFT = 1


def flushing_subnormals() -> bool:
    """Whether the calling thread flushes subnormal results to zero now (probed: a normal float32
    halved into the subnormal range, on a one-element tensor, so on this thread)."""
    return bool(torch.tensor([FLOAT32_TINY], dtype=torch.float32).mul_(0.5).item() == 0.0)


@cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """Every OpenMP runtime loaded in this process that can restart its thread pool. torch's CPU
    wheel brings its own libgomp, and others may be loaded beside it (scikit-learn bundles one):
    all are restarted, which costs nothing to those not in use."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return ()
    paths: list[str | None] = []
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the runtimes already loaded
        for line in maps.read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if _OPENMP_LIBRARY.search(path) and path not in paths:
                paths.append(path)
    if not paths:
        paths.append(None)  # elsewhere: the symbols visible to the whole process
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            continue
        found.append(lib)
    return tuple(found)


def _restart_intra_op_threads() -> bool:
    """End the OpenMP worker threads of the calling thread; the next parallel kernel starts new
    ones, which inherit the calling thread's floating-point flags. False where that is not
    possible here."""
    if torch.get_num_threads() <= 1:
        return True
    results = [lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) for lib in _openmp_runtimes()]
    return bool(results) and all(r == 0 for r in results)


@contextlib.contextmanager
def subnormals_flushed(device: torch.device | str) -> Iterator[bool]:
    """Inside the block, on CPU, every thread that runs torch's CPU kernels flushes subnormal
    inputs and results to zero; after it, the flags are what they were. Yields whether flushing
    is on in every thread (False: off, or on in the calling thread only, with the reason logged)."""
    if torch.device(device).type != "cpu":
        yield False
        return
    before = flushing_subnormals()
    if not torch.set_flush_denormal(True):
        log.debug("this CPU cannot flush subnormals to zero: late training steps may be slower")
        yield False
        return
    everywhere = _restart_intra_op_threads()
    if not everywhere:
        log.debug("subnormals are flushed on the calling thread only: torch's intra-op threads "
                  "could not be restarted (no OpenMP runtime with omp_pause_resource_all found)")
    try:
        yield everywhere
    finally:
        torch.set_flush_denormal(before)
        _restart_intra_op_threads()


def amp_dtype(device: torch.device) -> torch.dtype:
    """The mixed-precision dtype `device` trains in natively: bfloat16 on CUDA devices of compute
    capability 8.0 and later (Ampere on), float16 before (T4, V100: bfloat16 would be emulated;
    float16 then trains with a GradScaler). Asked of `device` itself, not the current device."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16
