"""Resident memory of weights read from disk: give back the pages of a checkpoint once read.

transformers reads a safetensors checkpoint memory-mapped: the model's weights are pages of the
file, resident once touched and counted in the process's resident memory, but clean (the file
holds them). A run reads them several times (the trace's check, the scores, slim, verify, the
exports), and a model of 13.5 GB touched whole beside its slim copy would need 2.6 times the
checkpoint. `page_out` hands the pages of the given tensors that are private mappings of a file
back to the kernel (madvise MADV_PAGEOUT, Linux 5.4+): they are read from the file again when
next touched. Pages the process wrote to (copy-on-write, so no longer the file's) are never lost:
the kernel keeps them (without swap) or swaps them; anonymous memory is not touched at all.

The pass manager pages out the Program's models after each pass; slim after each tensor it
sliced; verify after each module of the reference; a forward of a model under `streamed` after
each module (compensate's measurements, verify's check of the trace, the hf/ folder's check).
Elsewhere (no Linux, no mapping) it does nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import logging
import mmap
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger("pcompiler")

MADV_PAGEOUT = 21
_PAGE = mmap.PAGESIZE
_madvise: Any = None


def _libc_madvise() -> Any:
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise = libc.madvise
    return _madvise


def file_mappings() -> list[tuple[int, int]]:
    """The (start, end) addresses of this process's private mappings of regular files, sorted."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/") and parts[1].endswith("p") and parts[4] != "0":
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return sorted(spans)


def _tensors(things: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for t in things:
        if isinstance(t, nn.Module):
            out += [*t.parameters(), *t.buffers()]
        elif isinstance(t, torch.Tensor):
            out.append(t)
    return out


def page_out(*things: nn.Module | torch.Tensor | None, spans: list[tuple[int, int]] | None = None) -> int:
    """Give back the file-backed pages of these modules' parameters and buffers (and tensors'):
    the bytes advised (module docstring). `spans`: `file_mappings()` read once by the caller."""
    tensors = _tensors(x for x in things if x is not None)
    spans = spans if spans is not None else (file_mappings() if tensors else [])
    advised = 0
    for lo, hi in {r for t in tensors for r in _mapped(t, spans)}:
        if _libc_madvise()(lo, hi - lo, MADV_PAGEOUT) == 0:
            advised += hi - lo
    return advised


def _mapped(t: torch.Tensor, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The page-aligned ranges of `t`'s storage that lie in the file mappings `spans`."""
    if t.device.type != "cpu" or not spans:
        return []
    storage = t.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    out = []
    i = max(bisect.bisect_right([s for s, _ in spans], lo) - 1, 0)
    while i < len(spans) and spans[i][0] < hi:
        a = max(lo, spans[i][0]) + _PAGE - 1
        a -= a % _PAGE
        b = min(hi, spans[i][1])
        b -= b % _PAGE
        if b > a:
            out.append((a, b))
        i += 1
    return out


def _paging_out(tensors: list[torch.Tensor], spans: list[tuple[int, int]]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:  # None: the output stays
        page_out(*tensors, spans=spans)

    return hook


@contextlib.contextmanager
def streamed(*models: nn.Module | None) -> Iterator[None]:
    """While the block runs these models, each module's own file-backed pages are given back as
    soon as its forward returns: a forward of a memory-mapped model then holds about one layer's
    weights resident, not the model's. Models with no file-backed tensor get no hooks."""
    spans = file_mappings() if sys.platform.startswith("linux") else []
    handles = []
    for model in (m for m in models if m is not None and spans):
        for m in model.modules():
            own = [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if _mapped(t, spans)]
            if own:
                handles.append(m.register_forward_hook(_paging_out(own, spans)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trim() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim): freed activations
    of a pass (many of a few MB each) otherwise stay resident in the heap."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
