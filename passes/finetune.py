"""finetune: train the slim model on the data for a few epochs (the one loop, no hooks).

Runs after `slim` (and `verify`): the weights change, the structure does not. Its own lr
(docs/methods.md, "Fine-tuning and distillation": start at the regularization lr or lower; a 10x higher start undoes the work) with a
cosine schedule by default. With a `teacher` (the user's input model, never the Program being
trained) it distills: `train.distill` sets temperature and alpha, the defaults of
`pcompiler.distill.Distillation` when it is None. It trains a copy of the model made on the
runtime's device, and returns it to where the given model lives. The curve and the settings go to
`info["finetune"]` (`"distill"`: None without a teacher).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from pcompiler.costs import device_of
from pcompiler.data import DataSource
from pcompiler.distill import with_teacher
from pcompiler.errors import CompileError
from pcompiler.ir import Program
from pcompiler.passmanager import DATA, WEIGHTS, PassResult, register_pass
from pcompiler.runtime import CPU, Runtime, copy_to
from pcompiler.train import TrainConfig, train


@register_pass
@dataclass(frozen=True)
class Finetune:
    name: ClassVar[str] = "finetune"
    requires: ClassVar = (DATA, WEIGHTS)
    ensures: ClassVar = ()
    data: DataSource | None = None
    epochs: float = 10.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(schedule="cosine"))
    teacher: nn.Module | None = None  # distill from it (the input model), with train.distill's settings
    runtime: Runtime = CPU

    def steps(self) -> int:
        per_epoch = max(1, len(self.data.train) // self.train.batch_size)
        return int(round(self.epochs * per_epoch))

    def run(self, prog: Program) -> PassResult:
        if self.data is None:
            raise CompileError("finetune needs data", hint="pass --data, or data=... in the pass API")
        if self.epochs < 0:
            raise CompileError(f"finetune epochs must be >= 0, got {self.epochs}")
        cfg = dataclasses.replace(with_teacher(self.train, self.teacher), steps=self.steps(), label="fine-tune")
        home = device_of(prog.gm)
        gm = copy_to(prog.gm, self.runtime.device)  # the given Program stays as it was
        result = train(gm, self.data, cfg, teacher=self.teacher, runtime=self.runtime)
        gm = copy_to(gm, home) if self.runtime.device != home else gm
        gm.eval()
        distill = None if cfg.distill is None else dataclasses.asdict(cfg.distill)
        info = {**prog.info, "finetune": {
            "epochs": self.epochs, "steps": result.steps, "seconds": result.seconds, "curve": result.curve,
            "resumed_from": result.resumed_from, "train": dataclasses.asdict(cfg), "distill": distill}}
        return PassResult(prog.replace(gm=gm, info=info), changed=result.steps > 0)
