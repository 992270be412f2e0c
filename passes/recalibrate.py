"""recalibrate: after `slim`, re-estimate the running statistics of the norms on training batches.

docs/methods.md, "After selection": removing channels changes what every later norm sees. A channel
that a BatchNorm renormalized while its filter shrank still outputs a constant until it is
removed; removing it shifts the next layer's input by a constant that the next norm's running
mean does not know. Recalibrating (forward passes in train mode for the norms, no gradients,
no parameter change) fixes the statistics for every method alike. Norms without running
statistics (LayerNorm, GroupNorm) are not affected.

Assumes data; changes only buffers (`running_mean`, `running_var`, `num_batches_tracked`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pcompiler.costs import device_of
from pcompiler.data import DataSource
from pcompiler.errors import CompileError
from pcompiler.inference import recalibrate_norms
from pcompiler.ir import Program
from pcompiler.passmanager import DATA, WEIGHTS, PassResult, register_pass
from pcompiler.runtime import CPU, Runtime, copy_to

# Batches of the training data used by default: enough that the statistics stop changing on the
# bundled examples, with a margin for models with more, smaller norms (docs/benchmarks.md measures it).
DEFAULT_BATCHES = 50


@register_pass
@dataclass(frozen=True)
class Recalibrate:
    """Reset and re-estimate the running statistics of every BatchNorm/InstanceNorm."""

    name: ClassVar[str] = "recalibrate"
    requires: ClassVar = (DATA, WEIGHTS)
    ensures: ClassVar = ()
    data: DataSource | None = None
    batches: int = DEFAULT_BATCHES
    batch_size: int = 64
    seed: int = 0
    runtime: Runtime = CPU

    def run(self, prog: Program) -> PassResult:
        if self.data is None:
            raise CompileError("recalibrate needs training data",
                               hint="pass --data, or data=... in the pass API (--no-recalibrate skips it)")
        if self.batches < 0 or self.batch_size < 1:
            raise CompileError(f"recalibrate: batches must be >= 0 and batch size >= 1, got {self.batches}, "
                               f"{self.batch_size}")
        home, device = device_of(prog.gm), self.runtime.device
        gm = copy_to(prog.gm, device)  # its own copy, on the runtime's device
        norms = recalibrate_norms(gm, self.data.train, batches=self.batches, batch_size=self.batch_size,
                                  seed=self.seed, device=device, task=self.data.task)
        if device != home:
            gm = copy_to(gm, home)
        record = {"norms": norms, "batches": self.batches, "batch_size": self.batch_size}
        return PassResult(prog.replace(gm=gm, info={**prog.info, "recalibration": record}), changed=norms > 0)
