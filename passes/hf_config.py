"""hf_config: keep the widths a method chose to ones the Hugging Face config class accepts.

After the method, for `--formats hf`: the hf_widths pass kept the selection to widths config
fields hold, but a config class may refuse a combination of them (LLaMA's: hidden_size must
divide by num_attention_heads; hidden 192 and 6 heads at ratio 0.2 keep 160 and 3). Where
transformers refuses the widths (`hf.config_problem`), this pass gives back removed channels,
the best-scored first, in whole `round_to` units of the width and in every group of the field
alike: the stream (hidden_size) and the heads together,
which constrain each other (BERT: the stream is heads x head size), the fewest channels first,
then each feed-forward width, until the config accepts the widths or the fields are whole
again. Keeping a channel is always a valid rewrite; the run then removes a little less.
What it gave back is recorded under info["hf_config"]. A problem it cannot fix is left for the
hf target, which says it. A method searching a budget (--params-removed, --speedup) applies the
same give-back to each trial (`legalize`, wired by the pipeline as the method's `legal`), so the
ratio it lands on meets the budget with the channels given back; after it this pass has nothing
left to give.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pcompiler.hf import config_problem, slim_widths
from pcompiler.ir import Program, Selection, round_unit
from pcompiler.passmanager import SELECTION, PassResult, register_pass

log = logging.getLogger("pcompiler")

# The fields that constrain one another (LLaMA: hidden_size divides by the heads; BERT: hidden_size
# is heads x head size): their groups give channels back together, the fewest channels first.
STRUCTURE = ("hidden_size", "num_key_value_heads", "num_attention_heads")


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
        return PassResult(self.legalize(prog, warn=True), changed=False)

    def legalize(self, prog: Program, warn: bool = False) -> Program:
        """`prog` with the fewest channels given back that make its widths ones the config accepts
        (itself where they are, or where no field holds them: the hf target says so). The method
        calls it on each trial of a budget search too (SelectOptions.legal), so that the budget
        counts what the folder will hold."""
        try:
            problem = config_problem(self.model, slim_widths(self.model, prog))
        except ValueError:  # widths no field holds, or that differ other than by block: the hf target says so
            return prog
        if problem is None:
            return prog
        held: dict[int, str] = prog.info["hf_widths"]["groups"]
        shrunk = {f for gid, f in held.items() if prog.selection.get(gid)}
        searches = [[f for f in STRUCTURE if f in shrunk], *([f] for f in sorted(shrunk - set(STRUCTURE)))]
        for fields in filter(None, searches):
            found = self._search(prog, held, fields)
            if found is not None:
                trial, given, which = found
                (log.info if warn else log.debug)("hf_config: %s; %d channels of %s kept back", problem, given, which)
                info = {**prog.info, "hf_config": {"refused": problem, "field": which, "kept_back": given}}
                return trial.replace(info=info)
        if warn:
            log.warning("hf_config: %s, and no width kept back fixes it", problem)
        return prog

    def _search(self, prog: Program, held: dict[int, str], fields: list[str]) -> tuple[Program, int, str] | None:
        """The selection with the fewest channels of `fields` given back (every combination of
        whole units per field) that the config accepts, how many, and the fields that gave them;
        None where none does."""
        per_field = []
        for field in fields:
            groups = [gid for gid, f in held.items() if f == field and prog.selection.get(gid)]
            units = max(-(-len(prog.selection[g]) // _unit(prog, g, self.round_to)) for g in groups)
            width = _unit(prog, groups[0], self.round_to) * prog.analysis.groups[groups[0]].block
            per_field.append((groups, units, width))
        combos = sorted(itertools.product(*(range(units + 1) for _, units, _ in per_field)),
                        key=lambda steps: sum(s * w for s, (_, _, w) in zip(steps, per_field)))
        for steps in combos:
            if not any(steps):
                continue
            selection = dict(prog.selection)
            for step, (groups, _, _) in zip(steps, per_field):
                selection = _given_back(prog, selection, groups, step, self.round_to)
            trial = prog.replace(selection=selection)
            if config_problem(self.model, slim_widths(self.model, trial)) is None:
                given = sum(len(prog.selection[g]) - len(selection.get(g, ())) for groups, _, _ in per_field for g in groups)
                return trial, given, ", ".join(f for f, step in zip(fields, steps) if step)
        return None


def _unit(prog: Program, gid: int, round_to: int) -> int:
    """Channels of one step: round_to positions, counting a head of `block` positions as `block` wide."""
    return round_unit(round_to, prog.analysis.groups[gid].block)


def _given_back(prog: Program, selection: Selection, groups: list[int], step: int, round_to: int) -> Selection:
    """`selection` with `step` units of each of `groups`' removals kept back: its best-scored
    removed channels."""
    selection = dict(selection)
    for gid in groups:
        removed = np.asarray(prog.selection[gid])
        scores = (prog.scores or {}).get(gid)
        order = removed[np.argsort(-np.asarray(scores)[removed], kind="stable")] if scores is not None else removed[::-1]
        keep = order[step * _unit(prog, gid, round_to):]
        if len(keep):
            selection[gid] = tuple(sorted(int(i) for i in keep))
        else:
            selection.pop(gid, None)
    return selection
