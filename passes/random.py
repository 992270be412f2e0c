"""random: uniformly random channels (the sanity floor every method must beat)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pcompiler.ir import Program
from pcompiler.passes.select import MethodPass
from pcompiler.passmanager import register_pass


@register_pass
@dataclass(frozen=True)
class Random(MethodPass):
    """Remove uniformly random channels; `seed` makes the draw repeatable."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def scores(self, prog: Program) -> dict[int, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {g.id: rng.random(g.size) for g in prog.require_analysis(self.name).prunable}
