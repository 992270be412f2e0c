"""The report of one compilation: what was removed, what it saves, whether it is still right.

`build_report(prog)` turns a Program at the end of a pipeline into one plain dict that
`json.dumps` accepts; `write_report` writes it as report.json. Later views (report.md, plots)
read the same dict, so every number is here and nothing is formatted for display.

Reads, and assumes nothing else about, these parts of the Program:
- `prog.gm` (the model after), `prog.reference` (the model before `slim`; when absent the model
  never changed and before = after), `prog.example_inputs` (for FLOPs).
- `prog.analysis.groups` and `prog.selection` (channel groups; absent before `analyze`), and
  `prog.scores` (each channel's importance when the method selected: `importance`).
- `prog.info`: "slim" -> {"layers": {module: {"before": n, "after": m}}, ...}, "verify",
  "exports"; every other key is passed through under its own name.
- `prog.history` (the passes that ran).

Ratios are after / before (the fraction kept: 0.5 means half the FLOPs remain). FLOPs count a
multiply-add as 2 (see `pcompiler.costs`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcompiler.costs import count_flops, count_params
from pcompiler.errors import one_line
from pcompiler.ir import Program
from pcompiler.memory import streamed
from pcompiler.outdir import atomic_write

log = logging.getLogger("pcompiler")
# How far above its --params-removed budget a run may end before the report warns: compensation's
# new biases (least squares on a LLaMA) add about 0.6% of the parameters after the search.
BUDGET_SLACK = 0.02
# How far beyond it a run may remove before the report says why (the search lands on the lowest
# ratio that meets the budget; its steps are the widths' rounding units).
BUDGET_OVER = 0.05

# Keys build_report computes itself; prog.info keys of the same name are not passed through.
CORE_KEYS = (
    "model", "method", "settings", "params_before", "params_after", "param_ratio", "flops_before",
    "flops_after", "flops_ratio", "groups", "layers", "verify", "exports", "passes", "inputs", "frontend",
    "versions", "warnings", "importance",
)


def _ratio(after: int | None, before: int | None) -> float | None:
    if after is None or not before:
        return None
    return after / before


def _budget_warning(prog: Program, asked: float | None, before: int | None, after: int | None) -> str | None:
    """Why the parameters removed are not the --params-removed asked (None: they are, within
    BUDGET_SLACK below and BUDGET_OVER above)."""
    if not asked or not before or after is None:
        return None
    removed = 1 - after / before
    if removed < asked - BUDGET_SLACK:
        given = prog.info.get("hf_config")
        why = (f": {given['kept_back']} channels of {given['field']} were kept back so that the hf/ folder's config accepts "
               f"the widths ({given['refused']}); without --formats hf the budget is met and hf/ written where it fits"
               if given else "")
        return f"removed {removed:.1%} of the parameters, not the {asked:.0%} asked{why}"
    if removed > asked + BUDGET_OVER:
        return (f"removed {removed:.1%} of the parameters, more than the {asked:.0%} asked: the lowest ratio that meets it "
                "removes that much, as widths move in steps (--round-to, whole heads, and with --formats hf the widths "
                "the config accepts: a small model's hidden_size in steps of its head count)")
    return None


def _groups_summary(prog: Program) -> dict[str, Any] | None:
    """Counts of channel groups and, per group, its size, removed channels, pinned reasons and the
    ops that make removing its channels approximate; "approximate" counts such groups pruned."""
    if prog.analysis is None:
        return None
    selection = prog.selection or {}
    groups = prog.analysis.groups
    reasons = Counter(r for g in groups for r in g.pinned)
    items = [
        {
            "id": g.id,
            "label": g.label(),
            "size": g.size,
            "removed": len(selection.get(g.id, ())),
            "prunable": g.prunable,
            "pinned": list(g.pinned),
            **({"approximate": list(g.approximate)} if g.approximate else {}),
        }
        for g in groups
    ]
    return {
        "total": len(groups),
        "prunable": sum(g.prunable for g in groups),
        "pruned": sum(1 for g in groups if selection.get(g.id)),
        "pinned": sum(1 for g in groups if g.pinned),
        "pinned_reasons": dict(reasons.most_common()),
        "approximate": sum(1 for g in groups if g.approximate and selection.get(g.id)),
        "channels_prunable": sum(g.size for g in groups if g.prunable),
        "channels_removed": sum(len(selection.get(g.id, ())) for g in groups),
        "items": items,
    }


def build_report(
    prog: Program,
    *,
    model_path: str | Path | None = None,
    method: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-able report of `prog` (see the module docstring for what is read).

    model_path: the input model file; method: the pruning method's name; settings: the options
    the run used (ratio, steps, ...), recorded as given. A cost that cannot be computed (a model
    FlopCounterMode cannot run) is None, with the reason in `warnings`, rather than an error."""
    warnings: list[str] = []
    before_gm = prog.reference if prog.reference is not None else prog.gm

    def flops(gm: torch.nn.Module, which: str) -> int | None:
        try:
            with streamed(gm):  # a memory-mapped checkpoint's pages given back layer by layer
                return count_flops(gm, prog.example_inputs)
        except Exception as e:  # noqa: BLE001 - a report with a gap beats no report
            warnings.append(f"FLOPs of the model {which} not counted: {one_line(e)}")
            log.warning("%s", warnings[-1])
            return None

    params_after = count_params(prog.gm)
    flops_after = flops(prog.gm, "after")
    if before_gm is prog.gm:
        params_before, flops_before = params_after, flops_after
    else:
        params_before, flops_before = count_params(before_gm), flops(before_gm, "before")

    slim = dict(prog.info.get("slim") or {})
    asked = (settings or {}).get("params_removed")
    budget = _budget_warning(prog, asked, params_before, params_after)
    if budget is not None:
        warnings.append(budget)
        log.warning("%s", budget)
    report: dict[str, Any] = {
        "model": None if model_path is None else str(model_path),
        "method": method,
        "settings": dict(settings) if settings else {},
        "params_before": params_before,
        "params_after": params_after,
        "param_ratio": _ratio(params_after, params_before),
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flops_ratio": _ratio(flops_after, flops_before),
        "groups": _groups_summary(prog),
        "layers": slim.pop("layers", {}),
        "verify": prog.info.get("verify"),
        "exports": prog.info.get("exports", []),
        "passes": [{"name": r.name, "seconds": r.seconds, "changed": r.changed} for r in prog.history],
        "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in prog.example_inputs],
        "frontend": prog.frontend,
        "versions": {"pcompiler": _version(), "torch": torch.__version__},
        "warnings": warnings,
    }
    if prog.scores and prog.analysis is not None:  # per channel, the method's score at selection
        sel = prog.selection or {}
        report["importance"] = {str(gid): {"label": prog.analysis.groups[gid].label(), "scores": scores,
                                           "removed": list(sel.get(gid, ()))} for gid, scores in prog.scores.items()}
    if slim:  # what slim recorded besides the per-layer counts
        report["slim"] = slim
    for key, value in prog.info.items():
        if key in ("slim", "verify", "exports"):
            continue
        if key in CORE_KEYS:
            log.debug("prog.info[%r] is not copied into the report: the report computes that key", key)
            continue
        report[key] = value
    return to_jsonable(report)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pcompiler")
    except PackageNotFoundError:
        return "unknown"


def to_jsonable(value: Any) -> Any:
    """A copy of `value` that `json.dumps` accepts: numpy and torch scalars become numbers,
    arrays and tensors lists, dataclasses dicts, paths/dtypes/devices/enums strings, tuples and
    sets lists; non-finite floats become the strings "inf", "-inf", "nan" (JSON has no such
    numbers). Anything else becomes its `str`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v) for v in value), key=str)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if not isinstance(value, (Path, torch.dtype, torch.device)):
        log.debug("report: %s value stored as its str", type(value).__name__)
    return str(value)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write `report` as JSON (indent 2) to `path`, creating its folder; return the path."""
    path = Path(path)
    text = json.dumps(to_jsonable(report), indent=2) + "\n"
    with atomic_write(path) as tmp:  # whole or not at all
        tmp.write_text(text)
    log.info("report written to %s", path)
    return path
