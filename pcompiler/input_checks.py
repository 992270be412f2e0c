"""Checks on what the user hands pcompiler, made before any slow work starts.

- `check_finite(model, source)`: every floating parameter and buffer (a BatchNorm's running
  statistics too) must hold only finite values; a model with NaN or inf weights gives NaN
  outputs, so pruning it would measure nothing. `loading.load_model` calls it on every model.
- `check_input_memory(shapes)`: example inputs of these shapes (float32) must fit in a safe
  share of the memory available now (`/proc/meminfo` MemAvailable, or `os.sysconf` where there
  is no /proc), before a single tensor is allocated. `inputs.parse_inputs` calls it;
  `largest_batch` checks the shapes with their batch (first) dimension replaced by the largest
  batch a benchmark will time (`pcompile bench --batches`, `--bench-batches`).

A leaf of the core: it imports nothing from pcompiler but the errors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pcompiler.errors import CompileError

__all__ = ["available_memory", "check_finite", "check_input_memory", "MEMORY_SHARE"]

# The example inputs may take at most this share of the available memory: the model's weights
# and activations, and the rest of the machine, need the remainder.
MEMORY_SHARE = 0.5
_GIB = 1024**3
_SHOWN = 4  # offending tensors named in the error


def _non_finite(t: torch.Tensor) -> str | None:
    """'3 NaN', '1 inf', '3 NaN, 1 inf', or None when every value is finite."""
    if t.is_meta or not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
        return None
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)


def check_finite(model: nn.Module, source: str | os.PathLike[str]) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf, naming the first of them
    (in module order) and how many values each holds. `source` names the file it came from."""
    bad: list[str] = []
    seen: set[int] = set()  # a tensor shared by two modules is named once
    with torch.no_grad():
        for prefix, module in model.named_modules():
            for name, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                found = _non_finite(t.detach())
                if found is not None:
                    bad.append(f"{prefix + '.' if prefix else ''}{name} ({found})")
    if bad:
        shown = ", ".join(bad[:_SHOWN]) + (f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
        noun = "tensor holds" if len(bad) == 1 else "tensors hold"
        raise CompileError(
            f"'{source}': {len(bad)} {noun} non-finite values: {shown}",
            hint="the training that wrote it diverged or the file was damaged; load an earlier checkpoint whose "
                 "weights are finite, or retrain with a lower learning rate",
        )


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now, or None where the system does not say."""
    found = _meminfo_available()
    if found is not None:
        return found
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


def check_input_memory(shapes: Sequence[Sequence[int]], *, largest_batch: int | None = None,
                       option: str = "--input-shape", element_bytes: int | Sequence[int] = 4) -> None:
    """Refuse example inputs of `shapes` (`element_bytes` per value, float32 by default; or one
    per shape) that
    would take more than MEMORY_SHARE of the available memory. With `largest_batch`, each shape's
    first dimension is replaced by it (a benchmark's batches). `option` names what set them."""
    sized = shapes if largest_batch is None else [(largest_batch, *s[1:]) if s else s for s in shapes]
    sizes = [element_bytes] * len(shapes) if isinstance(element_bytes, int) else list(element_bytes)
    need = sum(math.prod(s) * b for s, b in zip(sized, sizes))
    have = available_memory()
    if have is None or need <= MEMORY_SHARE * have:
        return
    shown = "; ".join(",".join(str(d) for d in s) for s in shapes)
    what = f"{shown}: the example inputs" if largest_batch is None else f"batch {largest_batch} of inputs {shown}"
    raise CompileError(
        f"{option} {what} would take {_gib(need)}, more than {MEMORY_SHARE:.0%} of the {_gib(have)} of memory "
        "available", hint=_smaller(shapes, MEMORY_SHARE * have / max(sizes), largest_batch is not None),
    )


def _smaller(shapes: Sequence[Sequence[int]], values: float, batches: bool) -> str:
    """How to fit: the largest batch (first dimension) whose inputs fit in `values` values."""
    per_sample = sum(math.prod(s[1:]) for s in shapes if s)
    fit = int(values // per_sample) if per_sample else 0
    if fit < 1:
        return "even one sample does not fit: use smaller inputs, or a machine with more memory"
    if batches:
        return f"time batches of at most {fit}"
    example = ",".join(str(d) for d in (1, *shapes[0][1:]))
    return f"use a smaller batch (the first dimension; at most {fit} fit), e.g. {example}"
