"""finetune: train the slim model on the data for a few epochs (the one loop, no hooks).

Runs after `slim` (and `verify`): the weights change, the structure does not. Its own lr
(METHODS.md: start at the regularization lr or lower; a 10x higher start undoes the work) with a
cosine schedule by default. The curve goes to `info["finetune"]`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from pcompiler.data import DataSource
from pcompiler.ir import Program
from pcompiler.passmanager import CompileError, PassResult, register_pass
from pcompiler.train import TrainConfig, train


@register_pass
@dataclass(frozen=True)
class Finetune:
    name: ClassVar[str] = "finetune"
    data: DataSource | None = None
    epochs: float = 10.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(schedule="cosine"))

    def steps(self) -> int:
        per_epoch = max(1, len(self.data.train) // self.train.batch_size)
        return int(round(self.epochs * per_epoch))

    def run(self, prog: Program) -> PassResult:
        if self.data is None:
            raise CompileError("finetune needs data", hint="pass --data, or data=... in the pass API")
        if self.epochs < 0:
            raise CompileError(f"finetune epochs must be >= 0, got {self.epochs}")
        cfg = dataclasses.replace(self.train, steps=self.steps(), label="fine-tune")
        result = train(prog.gm, self.data, cfg)
        prog.gm.eval()
        info = {**prog.info, "finetune": {
            "epochs": self.epochs, "steps": result.steps, "seconds": result.seconds, "curve": result.curve,
            "resumed_from": result.resumed_from, "train": dataclasses.asdict(cfg)}}
        return PassResult(prog.replace(info=info), changed=False)
