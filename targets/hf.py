"""The Hugging Face target: the slim model as a `save_pretrained` folder (`OUT/hf/`).

The user's transformers model is rebuilt from a copy of its config in which each pruned width
is set to its new value (pcompiler/hf.py, `width_fields`), the slim program's weights are
loaded into it by name (the export frontend keeps the model's parameter names), and it is saved
with `save_pretrained` (safetensors). The folder is then loaded back with `from_pretrained`
and its outputs compared with the slim program's on the example inputs.

Where hidden_size changed, the stream's RMSNorms are rewritten for Hugging Face's own code,
which divides by the kept D' channels: the analysis made removal exact by scaling each mean of
squares by D'/D, which is the same as RMSNorm weights times sqrt(D/D') and eps times D/D'
(`rms_norm_eps` in the config); `head_dim` is written out, as hidden_size / heads no longer is
the head size. The comparison with the slim program checks it.

The new widths come from the selection: each group the method shrank holds the config field
the hf_widths pass found for it (`hf.field_of`); a group of key/value heads also sets
num_attention_heads (its query heads go with it).

Fails, with the reason, where a width changed that no config field holds (run with the
`hf_widths` pass, as the pipeline does for Hugging Face models, so the method leaves those
alone), where one field's layers have different widths (global ranking), or where a weight's
shape does not fit the rebuilt model.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
from pathlib import Path

import torch
from torch import nn

from pcompiler.compare import flatten_tensors
from pcompiler.costs import eval_mode
from pcompiler.hf import width_fields
from pcompiler.ir import Program, call_with
from pcompiler.targets import ExportResult, compare_outputs, guarded, reference_outputs, require_weights


def new_widths(model: nn.Module, prog: Program) -> dict[str, int]:
    """Each config width field -> its value in the slim program, from the groups the selection
    shrank and the field the hf_widths pass found for each; raises ValueError where a group
    shrank that no field holds, or where one field's layers differ."""
    fields = width_fields(model)
    held = (prog.info.get("hf_widths") or {}).get("groups")
    if held is None:
        raise ValueError("no record of which groups the config's fields hold (prune with the hf_widths pass, as the "
                         "pipeline does for Hugging Face models, or leave out --formats hf)")
    found: dict[str, set[int]] = {}
    unheld = []
    for gid, removed in (prog.selection or {}).items():
        if not removed:
            continue
        group = prog.analysis.groups[gid]
        field = held.get(gid)
        if field is None:
            unheld.append(f"group {gid} ({group.label()})")
        else:
            found.setdefault(field, set()).add(group.size - len(removed))
    if unheld:
        raise ValueError(f"widths no field of the config holds changed: {', '.join(unheld[:4])}"
                         f"{' ...' if len(unheld) > 4 else ''} (prune with the hf_widths pass, or leave out --formats hf)")
    uneven = {f: sorted(v) for f, v in found.items() if len(v) > 1}
    if uneven:
        raise ValueError(f"the config holds one width per field, and the layers differ: {uneven} (use layer-wise "
                         "selection, the default, not --global)")
    widths = {f: v.pop() for f, v in found.items()}
    if "num_key_value_heads" in widths:  # whole key/value heads went, each with its query heads
        per_group = fields["num_attention_heads"] // fields["num_key_value_heads"]
        widths["num_attention_heads"] = widths["num_key_value_heads"] * per_group
    return widths


def save_hf(prog: Program, model: nn.Module, path: str | Path) -> ExportResult:
    """Write the slim model as a `save_pretrained` folder at `path`, reload it and compare."""
    path = Path(path)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"a Hugging Face folder to {path}")
        widths = new_widths(model, prog)
        config = copy.deepcopy(model.config)
        for field, value in widths.items():
            setattr(config, field, value)
        stream = _stream_ratio(model.config, widths)
        if stream != 1.0:
            config.rms_norm_eps = model.config.rms_norm_eps * stream
        if {"hidden_size", "num_attention_heads"} & set(widths):  # hidden_size / heads no longer is the head size
            old = model.config
            config.head_dim = getattr(old, "head_dim", None) or old.hidden_size // old.num_attention_heads
        slim = type(model)(config)
        missing, unexpected = slim.load_state_dict(prog.gm.state_dict(), strict=False)
        tied = {k for k in missing if k in _tied_keys(slim)}
        if set(missing) - tied or unexpected:
            raise ValueError(f"the slim weights do not fit {type(model).__name__}: missing {sorted(set(missing) - tied)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        norms = _rescale_stream_norms(slim, widths.get("hidden_size"), stream)
        # Written beside, then renamed: a run killed halfway leaves the old folder (or none).
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        slim.save_pretrained(tmp, safe_serialization=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        loaded = type(model).from_pretrained(path, local_files_only=True, use_safetensors=True)
        want = reference_outputs(prog)
        with torch.no_grad(), eval_mode(loaded):
            got = flatten_tensors(call_with(loaded, prog.example_inputs, prog.keywords))
        err = compare_outputs(got, want, f"the reloaded {path.name}/ folder")
        before = width_fields(model)
        changed = ", ".join(f"{f} {before[f]} -> {widths[f]}" for f in before if f in widths) or "no width changed"
        if norms:
            changed += f"; rms_norm_eps x {stream:g} and {norms} RMSNorm weights x sqrt({stream:g})"
        return err, f"config: {changed}"

    return guarded("hf", path, body)


def _stream_ratio(config: object, widths: dict[str, int]) -> float:
    """D/D' of the residual stream (1.0 where hidden_size kept); a ValueError where it changed
    and the config has no rms_norm_eps (a stream normalized some other way cannot be held)."""
    new = widths.get("hidden_size")
    if new is None or new == config.hidden_size:
        return 1.0
    if not isinstance(getattr(config, "rms_norm_eps", None), float):
        raise ValueError(f"hidden_size changed ({config.hidden_size} -> {new}) but the config has no rms_norm_eps to "
                         "rescale (prune with the hf_widths pass, or leave out --formats hf)")
    return config.hidden_size / new


def _rescale_stream_norms(slim: nn.Module, hidden: int | None, ratio: float) -> int:
    """Multiply the weight of each RMSNorm over the stream by sqrt(ratio); how many there were."""
    if ratio == 1.0:
        return 0
    norms = [m for m in slim.modules() if type(m).__name__.endswith("RMSNorm")
             and isinstance(getattr(m, "weight", None), torch.Tensor) and tuple(m.weight.shape) == (hidden,)]
    with torch.no_grad():
        for m in norms:
            m.weight.mul_(ratio ** 0.5)
    return len(norms)


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that share storage with another (tied embeddings): a state dict may hold one."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update({name, seen[id(p)]})
        seen.setdefault(id(p), name)
    return tied
