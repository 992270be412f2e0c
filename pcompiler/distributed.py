"""Processes started by torchrun: this process's place in the group, joining the group at start-up,
and leaving it so that no rank waits on another past a timeout.

The life of a group, as `pipeline.compile_model` and the CLI run it:
1. `join` at start-up, before any pass (`Runtime.resolve`): gloo on CPU, NCCL on CUDA.
2. The passes run on every rank; training steps all-reduce their gradients (DDP).
3. `release` once the collective work is done: every rank meets once, then the other ranks
   leave the group and exit, while rank 0 alone exports, times and writes the report (minutes
   on a large model: nobody waits on it in a barrier that could time out).
4. `finish` on rank 0 at the end; `abort` on any rank that fails, at once and without a barrier:
   its peers' pending collectives then fail instead of waiting, and torchrun stops the group
   with the failed rank's error.

The timeout of a collective is torch's default unless PCOMPILER_DIST_TIMEOUT (seconds) says
otherwise.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

_device: torch.device | None = None  # the device the group was joined with (barriers on NCCL name it)


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return world()[0] == 0


def active() -> bool:
    """Whether this process is in a process group now."""
    return dist.is_available() and dist.is_initialized()


def join(device: torch.device) -> None:
    """Join torchrun's process group when it started several processes (once)."""
    global _device
    if world()[1] <= 1 or active():
        return
    timeout = os.environ.get("PCOMPILER_DIST_TIMEOUT")
    kwargs = {"timeout": datetime.timedelta(seconds=float(timeout))} if timeout else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    _device = device


def _barrier() -> None:
    if _device is not None and _device.type == "cuda":
        dist.barrier(device_ids=[_device.index])
    else:
        dist.barrier()


def release() -> None:
    """The collective work is done: meet once, then every rank but 0 leaves the group."""
    if not active():
        return
    _barrier()
    if not is_main_process():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the group, if still in it (rank 0 after its exports)."""
    if active():
        dist.destroy_process_group()


def abort() -> None:
    """Leave the group at once after an error, so that no peer waits for this rank."""
    if active():
        dist.destroy_process_group()
