"""finetune: train the slim model on the data for a few epochs (the one loop, no hooks).

Runs after `slim` (and `verify`): the weights change, the structure does not. Its own lr
(docs/methods.md, "Fine-tuning and distillation": start at the regularization lr or lower; a 10x higher start undoes the work) with a
cosine schedule by default. With a `teacher` (the user's input model, never the Program being
trained) it distills: `train.distill` sets temperature and alpha, the defaults of
`pcompiler.train.Distillation` when it is None. The curve and the settings go to
`info["finetune"]` (`"distill"`: None without a teacher).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from pcompiler.data import DataSource
from pcompiler.errors import CompileError
from pcompiler.ir import Program
from pcompiler.passmanager import DATA, WEIGHTS, PassResult, register_pass
from pcompiler.train import TrainConfig, train, with_teacher


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

    def steps(self) -> int:
        per_epoch = max(1, len(self.data.train) // self.train.batch_size)
        return int(round(self.epochs * per_epoch))

    def run(self, prog: Program) -> PassResult:
        if self.data is None:
            raise CompileError("finetune needs data", hint="pass --data, or data=... in the pass API")
        if self.epochs < 0:
            raise CompileError(f"finetune epochs must be >= 0, got {self.epochs}")
        cfg = dataclasses.replace(with_teacher(self.train, self.teacher), steps=self.steps(), label="fine-tune")
        gm = copy.deepcopy(prog.gm)  # the given Program stays as it was
        result = train(gm, self.data, cfg, teacher=self.teacher)
        gm.eval()
        distill = None if cfg.distill is None else dataclasses.asdict(cfg.distill)
        info = {**prog.info, "finetune": {
            "epochs": self.epochs, "steps": result.steps, "seconds": result.seconds, "curve": result.curve,
            "resumed_from": result.resumed_from, "train": dataclasses.asdict(cfg), "distill": distill}}
        return PassResult(prog.replace(gm=gm, info=info), changed=result.steps > 0)
