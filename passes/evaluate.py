"""evaluate: the data task's metric of the current model on the validation data (top-1
accuracy; a language model's perplexity: pcompiler.tasks), stored as info[key].

It runs on the runtime's device without moving the model (a copy runs there where needed).
The CLI runs it three times, with keys of the task's prefix: `acc_before` / `ppl_before` (the
user's model), `acc_pruned` / `ppl_pruned` (right after slim, before fine-tuning) and
`acc_final` / `ppl_final`. It changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pcompiler.data import DataSource
from pcompiler.errors import CompileError
from pcompiler.inference import evaluate
from pcompiler.ir import Program
from pcompiler.passmanager import DATA, WEIGHTS, PassResult, register_pass
from pcompiler.runtime import CPU, Runtime


@register_pass
@dataclass(frozen=True)
class Evaluate:
    name: ClassVar[str] = "evaluate"
    requires: ClassVar = (DATA, WEIGHTS)
    ensures: ClassVar = ()
    data: DataSource | None = None
    key: str = "accuracy"
    runtime: Runtime = CPU

    def run(self, prog: Program) -> PassResult:
        if self.data is None:
            raise CompileError("evaluate needs data", hint="pass --data, or data=... in the pass API")
        value = evaluate(prog.gm, self.data.val, device=self.runtime.device, task=self.data.task)
        return PassResult(prog.replace(info={**prog.info, self.key: value}), changed=False)
