"""Where tensors run: one `Runtime` value, decided once at start-up and handed to every pass and
target that runs a model (docs/design.md, "Runtime, devices and precision").

    runtime = Runtime.resolve("cuda", amp=True)   # under torchrun: cuda:LOCAL_RANK, group joined

A Runtime holds the device, the rank and world size, the mixed-precision dtype and whether
training is deterministic. Nothing else in pcompiler reads torchrun's environment, picks a
device or a precision, or sets cuDNN's flags.

Moving a model: `Module.to` gives every parameter new storage on a real move (CPU to CUDA and
back), so a pass that moved the model it was given would change the Program it was handed.
`placed` and `copy_to` never touch their argument: they return the model itself where it already
lives on the device, or a copy made there directly (each tensor copied once, to the device, not
first on the host). The copy also moves what `Module.to` misses in graphs read by torch.export:
tensor constants kept as plain attributes and the `device=` arguments of factory ops
(`arange(..., device=cpu)`), so the copy runs on the device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from pcompiler.distributed import join, world
from pcompiler.errors import CompileError
from pcompiler.precision import amp_dtype


@dataclass(frozen=True)
class Runtime:
    """The device, the process's place in a torchrun group, and the training precision.

    `amp`: the autocast dtype of training (None: float32); float16 trains with a GradScaler.
    `deterministic`: cuDNN picks kernels deterministically during training (same seed, same
    weights), restored when training ends."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    amp: torch.dtype | None = None
    deterministic: bool = True

    @staticmethod
    def resolve(device: str = "cpu", amp: bool = False) -> Runtime:
        """The runtime of this process: `device` checked (cuda:LOCAL_RANK under torchrun), the
        process group joined when torchrun started several processes, and with `amp` the
        precision this device trains in natively."""
        rank, size, local = world()
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise CompileError(f"--device {device}: not a device", hint="cpu, cuda or cuda:N") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise CompileError(f"--device {device}: no CUDA device is available here", hint="use --device cpu")
            if size > 1:
                if dev.index is not None:
                    raise CompileError(f"--device {device} under torchrun: each process takes cuda:LOCAL_RANK",
                                       hint="pass --device cuda")
                dev = torch.device("cuda", local)
            elif dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            if dev.index >= torch.cuda.device_count():
                raise CompileError(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                   hint="cuda:0 is the first")
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise CompileError(f"--device {device}: pcompiler runs on cpu or cuda", hint="use --device cpu or cuda")
        if amp and dev.type != "cuda":
            raise CompileError("--amp needs a CUDA device: a CPU trains in float32", hint="add --device cuda, or leave out --amp")
        join(dev)
        return Runtime(device=dev, rank=rank, world_size=size, amp=amp_dtype(dev) if amp else None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to `amp` on this device for the block (nothing without amp)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler where float16 needs one (its range is too small for small gradients)."""
        return torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None

    @contextlib.contextmanager
    def training_flags(self) -> Iterator[None]:
        """cuDNN picks kernels deterministically (never by timing) for the block; restored after."""
        if self.device.type != "cuda":
            yield
            return
        before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        if self.deterministic:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before

    @contextlib.contextmanager
    def full_float32(self) -> Iterator[None]:
        """float32 matmuls and convolutions in full float32 for the block, not TF32 (CUDA's
        default for convolutions rounds their inputs to 10 bits: a proof could not tell a wrong
        channel from that); restored after."""
        if self.device.type != "cuda":
            yield
            return
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    def describe(self) -> dict[str, Any]:
        """What report.json records."""
        return {"device": str(self.device), "rank": self.rank, "world_size": self.world_size,
                "amp": None if self.amp is None else str(self.amp).removeprefix("torch."),
                "deterministic": self.deterministic,
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None}

    def replace(self, **changes: Any) -> Runtime:
        return dataclasses.replace(self, **changes)


CPU = Runtime()


# ---------------------------------------------------------------------------------------------
# Models on a device


def _tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, str]]:
    """(module, name, tensor, kind) of every parameter, buffer and plain tensor attribute."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                yield m, name, p, "parameter"
        for name, b in m._buffers.items():
            if b is not None:
                yield m, name, b, "buffer"
        for name, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                yield m, name, v, "constant"


def _graph_devices(model: nn.Module) -> set[torch.device]:
    """The devices named in the graphs' node arguments (factory ops' `device=`, `.to(device)`)."""
    found: set[torch.device] = set()
    for m in model.modules():
        if isinstance(m, fx.GraphModule):
            for n in m.graph.nodes:
                fx.node.map_aggregate((n.args, n.kwargs),
                                      lambda a: found.add(a) if isinstance(a, torch.device) else None)
    return found


def lives_on(model: nn.Module, device: torch.device) -> bool:
    """Whether every tensor of `model`, and every device its graphs name, is `device`."""
    device = torch.device(device)
    same = lambda d: d.type == device.type and (device.index is None or d.index in (None, device.index))  # noqa: E731
    return all(same(t.device) for *_, t, _ in _tensors(model)) and all(same(d) for d in _graph_devices(model))


def copy_to(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A copy of `model` on `device`, made there directly; `model` is untouched."""
    device = torch.device(device)
    memo: dict[int, Any] = {}
    for _, _, t, kind in _tensors(model):
        if id(t) in memo:
            continue
        moved = t.detach().to(device, copy=True)
        memo[id(t)] = nn.Parameter(moved, requires_grad=t.requires_grad) if kind == "parameter" else moved
    with warnings.catch_warnings():  # torch's own pytree specs, deep-copied with an export module
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        out = copy.deepcopy(model, memo)
    for m in out.modules():
        if isinstance(m, fx.GraphModule) and _retarget(m.graph, device):
            m.recompile()
    return out


def placed(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` itself where it lives on `device`; else `copy_to(model, device)`."""
    return model if lives_on(model, device) else copy_to(model, device)


def _retarget(graph: fx.Graph, device: torch.device) -> bool:
    """Point every device argument of `graph`'s nodes at `device`; whether any changed."""
    changed = False

    def swap(a: Any) -> Any:
        nonlocal changed
        if isinstance(a, torch.device) and a != device:
            changed = True
            return device
        return a

    for n in graph.nodes:
        n.args = fx.node.map_aggregate(n.args, swap)
        n.kwargs = fx.node.map_aggregate(n.kwargs, swap)
    return changed
