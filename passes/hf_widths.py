"""hf_widths: keep to the widths a Hugging Face config can hold, for the `hf/` folder output.

A `save_pretrained` folder rebuilds the model from its config, so every pruned width must be a
config field (pcompiler/hf.py, `width_fields`: the feed-forward widths; hidden_size and the
head counts of RMSNorm'd models). This pass pins every prunable
group whose width is none of those fields (`field_of`), with the reason, so the method never
selects it, and records the field of each other group for the folder target. The same count
per layer then follows from layer-wise selection (the default), which removes the same number
from groups of the same size: a plain folder. A selection whose layers differ (calib's measured
allocation, --global) gets a folder with its own modeling file (targets/hf.py). The folder
target checks the widths and the outputs, and says so where a run could not keep to them.

With `pin` off (the default formats, where hf/ is written only if it can be) nothing is pinned:
the pass only records which field holds each group, and the folder target skips hf/ where the
method changed a width no field holds.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

from pcompiler.hf import HEAD_FIELDS, field_of
from pcompiler.ir import Program
from pcompiler.passmanager import ANALYSIS, PassResult, register_pass

log = logging.getLogger("pcompiler")


@register_pass
@dataclass(frozen=True)
class HfWidths:
    """Pin the groups whose width no field of the Hugging Face config holds (`fields`: name ->
    value); with `pin` off, only record the field of each group."""

    name: ClassVar[str] = "hf_widths"
    requires: ClassVar = (ANALYSIS,)
    ensures: ClassVar = (ANALYSIS,)
    fields: tuple[tuple[str, int], ...] = ()
    pin: bool = True

    def run(self, prog: Program) -> PassResult:
        analysis = prog.require_analysis(self.name)
        widths = dict(self.fields)
        shown = ", ".join(f"{k}={v}" for k, v in widths.items() if k not in HEAD_FIELDS) or "none"
        reason = (f"the hf/ folder keeps this width: no field of the model's config holds it (the ones that can "
                  f"change: {shown}); --formats without hf prunes it")
        groups, held = [], {}
        for g in analysis.groups:
            field = field_of(g.size, g.block, widths) if g.prunable else None
            if g.prunable and field is None and self.pin:
                g = dataclasses.replace(g, pinned=(*g.pinned, reason))
            elif field is not None:
                held[g.id] = field
            groups.append(g)
        log.info("hf_widths: %d groups %s the config's widths (%s)", len(held),
                 "prunable within" if self.pin else "of", shown)
        info = {**prog.info, "hf_widths": {"fields": widths, "prunable": len(held), "groups": held}}
        return PassResult(prog.replace(analysis=dataclasses.replace(analysis, groups=tuple(groups)), info=info),
                          changed=False)
