"""hf_config: keep the widths a method chose to ones the Hugging Face config class accepts.

After the method, for `--formats hf`: the hf_widths pass kept the selection to widths config
fields hold, but a config class may refuse a combination of them (LLaMA's: hidden_size must
divide by num_attention_heads; hidden 192 and 6 heads at ratio 0.2 keep 160 and 3). Where
transformers refuses the widths (`hf.config_problem`), this pass gives back removed channels,
the best-scored first, one `round_to` unit of the width at a time and in every group of the
field alike (the config holds one width per field): first of the stream (hidden_size), then of
the heads, then of the feed-forward widths, until the config accepts the widths or the field is
whole again. Keeping a channel is always a valid rewrite; the run then removes a little less.
What it gave back is recorded under info["hf_config"]. A problem it cannot fix is left for the
hf target, which says it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pcompiler.hf import config_problem, slim_widths
from pcompiler.ir import Program, Selection
from pcompiler.passmanager import SELECTION, PassResult, register_pass

log = logging.getLogger("pcompiler")

# The fields whose groups give channels back, in this order.
ORDER = ("hidden_size", "num_key_value_heads")


@register_pass
@dataclass(frozen=True)
class HfConfig:
    """Give back removed channels until the Hugging Face config of `model` accepts the widths."""

    name: ClassVar[str] = "hf_config"
    requires: ClassVar = (SELECTION,)
    ensures: ClassVar = ()  # it keeps the selection a method made (a pass that ensures one is a method)
    model: Any = None  # the transformers model whose config the slim folder is written from
    round_to: int = 1

    def run(self, prog: Program) -> PassResult:
        try:
            problem = config_problem(self.model, slim_widths(self.model, prog))
        except ValueError:  # widths no field holds, or uneven: the hf target says so
            return PassResult(prog, changed=False)
        if problem is None:
            return PassResult(prog, changed=False)
        held: dict[int, str] = prog.info["hf_widths"]["groups"]
        fields = [*ORDER, *sorted({f for f in held.values() if f not in ORDER})]
        for field in fields:
            groups = [gid for gid, f in held.items() if f == field and prog.selection.get(gid)]
            for step in range(1, max((len(prog.selection[g]) for g in groups), default=0) + 1):
                selection = _given_back(prog, groups, step, self.round_to)
                trial = prog.replace(selection=selection)
                if config_problem(self.model, slim_widths(self.model, trial)) is None:
                    given = sum(len(prog.selection[g]) - len(selection.get(g, ())) for g in groups)
                    log.info("hf_config: %s; %d channels of %s kept back", problem, given, field)
                    info = {**prog.info, "hf_config": {"refused": problem, "field": field, "kept_back": given}}
                    return PassResult(trial.replace(info=info), changed=False)
                if all(not selection.get(g) for g in groups):
                    break
        log.warning("hf_config: %s, and no width kept back fixes it", problem)
        return PassResult(prog, changed=False)


def _given_back(prog: Program, groups: list[int], step: int, round_to: int) -> Selection:
    """The selection with `step` units of each group's width kept back: its best-scored removed
    channels (a unit: round_to channels, counting a head of `block` positions as `block` wide)."""
    selection = dict(prog.selection)
    for gid in groups:
        removed = np.asarray(prog.selection[gid])
        block = prog.analysis.groups[gid].block
        unit = max(1, round_to // math.gcd(round_to, block))
        scores = (prog.scores or {}).get(gid)
        order = removed[np.argsort(-np.asarray(scores)[removed], kind="stable")] if scores is not None else removed[::-1]
        keep = order[step * unit:]
        if len(keep):
            selection[gid] = tuple(sorted(int(i) for i in keep))
        else:
            selection.pop(gid)
    return selection
