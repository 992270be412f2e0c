"""PyTorch targets: the GraphModule pickle (.pt), a torch.export program (.pt2), a state dict.

- `.pt`: `torch.save` of the GraphModule, saved in eval mode. A GraphModule pickles as its
  generated code plus its submodules, so when those are standard torch modules (what `slim`
  produces) it loads with `torch.load(path, weights_only=False)` without the user's code. The
  export reloads the file and compares outputs, and says in `note` which globals of the pickle or
  functions of the graph live outside torch (those would need the user's code to load).
- `.pt2`: `torch.export.export(gm, example_inputs)` in eval mode, then `torch.export.save`;
  loads with plain `torch.export.load(path).module()` and no pickle. Checked the same way.
- `state_dict.pt`: `torch.save(gm.state_dict())`, loads with `torch.load(path)` (weights only).

Every file is written whole or not at all (`pcompiler.outdir.atomic_write`): a run killed while
writing leaves the previous file, never half of a new one.

`export_all` writes every format into one folder and records the results in
`prog.info["exports"]`. Assumes the Program's model runs on its example inputs (real weights:
a model on the meta device cannot be exported and says so).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.fx as fx

from pcompiler.compare import flatten_tensors
from pcompiler.costs import eval_mode
from pcompiler.dtypes import dtype_name, dtype_of
from pcompiler.errors import one_line
from pcompiler.inputs import dynamic_dims, widened
from pcompiler.ir import Program, call_with, owner_of
from pcompiler.outdir import atomic_write
from pcompiler.targets import (
    ExportResult,
    NotApplicable,
    compare_outputs,
    guarded,
    reference_outputs,
    require_weights,
)

log = logging.getLogger("pcompiler")

# Module prefixes whose globals any torch install can resolve.
_STANDARD_MODULES = ("torch", "collections", "builtins", "__builtin__", "copyreg", "_codecs",
                     "numpy", "operator", "_operator", "math", "functools", "typing")

# export_all: format -> file name. "pt" also writes the state dict.
FILE_NAMES = {"pt": "model.pt", "state_dict": "state_dict.pt", "pt2": "model.pt2", "onnx": "model.onnx", "hf": "hf",
              "eager": "model_eager.pt"}


def _dtype_name(prog: Program) -> str:
    return dtype_name(dtype_of(prog.gm))


def _is_standard(module_name: str | None) -> bool:
    root = (module_name or "").split(".")[0]
    return root in _STANDARD_MODULES


def foreign_code(gm: fx.GraphModule, pickle_path: Path | None = None) -> list[str]:
    """What loading `gm` would need beyond torch: functions the graph calls and (if given a
    torch.save file) globals its pickle refers to, from modules other than torch's."""
    names: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and not _is_standard(getattr(node.target, "__module__", None)):
            names.add(f"{getattr(node.target, '__module__', '?')}.{getattr(node.target, '__name__', node.target)}")
    if pickle_path is not None:
        # Globals outside the weights-only allowlist: torch.nn classes and the like, plus any
        # class or function from the user's code.
        for qualname in torch.serialization.get_unsafe_globals_in_checkpoint(pickle_path):
            if not _is_standard(qualname):
                names.add(qualname)
    return sorted(names)


def save_graph_module(prog: Program, path: str | Path) -> ExportResult:
    """`torch.save` the GraphModule (in eval mode) to `path`, reload it and compare outputs."""
    path = Path(path)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"the GraphModule to {path}")
        with eval_mode(prog.gm), atomic_write(path) as tmp:
            torch.save(prog.gm, tmp)
        want = reference_outputs(prog)
        loaded = torch.load(path, weights_only=False)
        with torch.no_grad():
            got = flatten_tensors(loaded(*prog.example_inputs))
        err = compare_outputs(got, want, f"the reloaded {path.name}")
        foreign = foreign_code(prog.gm, path)
        note = f"loading needs code outside torch: {', '.join(foreign)}" if foreign else None
        return err, note

    return guarded("pt", path, body, dtype=_dtype_name(prog))


def slim_eager(prog: Program, model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the user's `model` with the slim program's layers and weights put in place by
    name: each torch.nn leaf of the program replaces the module at its path, every other
    parameter and buffer takes the program's tensor. Only a model whose code reads sizes from
    its layers (plain conv nets) then runs; `save_eager` checks."""
    eager = copy.deepcopy(model)
    placed = set()
    for name, module in prog.gm.named_modules():
        if name and not list(module.children()) and type(module).__module__.startswith("torch.nn.modules"):
            try:
                eager.get_submodule(name)
            except AttributeError:
                continue
            eager.set_submodule(name, copy.deepcopy(module))
            placed |= {f"{name}.{k}" for k, _ in (*module.named_parameters(), *module.named_buffers())}
    for name, t in [*prog.gm.named_parameters(), *prog.gm.named_buffers()]:
        if name in placed:
            continue
        try:
            owner, attr = owner_of(eager, name)
            old = getattr(owner, attr)
        except AttributeError:  # a constant the graph made (export's lifted tensors)
            continue
        new = t.detach().clone()
        setattr(owner, attr, torch.nn.Parameter(new, old.requires_grad) if isinstance(old, torch.nn.Parameter) else new)
    return eager.eval()


def save_eager(prog: Program, model: torch.nn.Module, path: str | Path) -> ExportResult:
    """The user's own model class, slimmed in place (`slim_eager`), if it then gives the slim
    program's outputs: `torch.save` to `path` (loading it needs the user's code). Where the
    model's code holds sizes of its own (heads, split sizes, a hidden width), it does not, and
    the result says why instead."""
    path = Path(path)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"the eager model to {path}")
        eager = slim_eager(prog, model)
        want = reference_outputs(prog)
        try:
            with torch.no_grad():
                got = flatten_tensors(call_with(eager, prog.example_inputs, prog.keywords))
            compare_outputs(got, want, f"{type(model).__name__} with the slim layers")
        except Exception as e:  # noqa: BLE001 - the model's own code does not fit its slim layers
            raise NotApplicable(f"{type(model).__name__}'s code holds sizes of its own, so it cannot run "
                             f"with the slim layers in place ({one_line(e, 160)}); model.pt2 and model.pt hold the "
                             "slim model") from e
        with atomic_write(path) as tmp:
            torch.save(eager, tmp)
        loaded = torch.load(path, weights_only=False)
        with torch.no_grad():
            err = compare_outputs(flatten_tensors(call_with(loaded, prog.example_inputs, prog.keywords)), want,
                                  f"the reloaded {path.name}")
        return err, f"{type(model).__module__}.{type(model).__qualname__}: loading needs that code"

    return guarded("eager", path, body, dtype=_dtype_name(prog))


def save_state_dict(prog: Program, path: str | Path) -> ExportResult:
    """`torch.save` the GraphModule's state dict to `path` (loads with weights_only=True)."""
    path = Path(path)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"the state dict to {path}")
        state = prog.gm.state_dict()
        with atomic_write(path) as tmp:
            torch.save(state, tmp)
        loaded = torch.load(path, weights_only=True)
        if list(loaded) != list(state):
            raise ValueError(f"the reloaded {path.name} has other keys than the model's state dict")
        return None, None

    return guarded("state_dict", path, body, dtype=_dtype_name(prog))


def _dynamic_dims(exported: torch.export.ExportedProgram) -> list[int]:
    """The dimensions every user input has symbolic in `exported` (0: batch, 1: sequence)."""
    user_inputs = set(exported.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in exported.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if not vals or not all(isinstance(v, torch.Tensor) and v.dim() for v in vals):
        return []
    return [d for d in range(min(v.dim() for v in vals)) if all(isinstance(v.shape[d], torch.SymInt) for v in vals)]


def _export(gm: torch.nn.Module, inputs: tuple[torch.Tensor, ...], keywords: tuple[str, ...] = (),
            ) -> tuple[torch.export.ExportedProgram, str]:
    """torch.export with the batch (first) dimension dynamic where the model allows it, and for
    token ids the sequence too (`inputs.dynamic_dims`), else static; the last len(keywords)
    inputs are taken by those names, as the model took them. Exported on a batch of 2
    (torch.export specializes size-1 dimensions)."""
    n = len(inputs) - len(keywords)
    names = list(inspect.signature(gm.forward).parameters)
    dims = dynamic_dims(list(inputs))
    if dims and len(names) == len(inputs):
        wide = widened(inputs)
        try:
            with torch.no_grad():
                exported = torch.export.export(gm, wide[:n], dict(zip(keywords, wide[n:])),
                                               dynamic_shapes=dict.fromkeys(names, dict.fromkeys(dims, torch.export.Dim.AUTO)))
            found = _dynamic_dims(exported)
            if 0 in found:
                return exported, "dynamic batch dimension" + (" and sequence length" if 1 in found and 1 in dims else "")
            why = "the model fixes it"
        except Exception as e:  # noqa: BLE001 - fall back to the static export, which says its own error
            why = f"dynamic export failed: {one_line(e, 160)}"
    else:
        why = "the inputs do not share a batch dimension"
    with torch.no_grad():
        return torch.export.export(gm, inputs[:n], dict(zip(keywords, inputs[n:]))), f"static batch ({why})"


def export_program(prog: Program, path: str | Path) -> ExportResult:
    """`torch.export` the GraphModule (eval mode) and `torch.export.save` it to `path` (.pt2),
    with a dynamic batch dimension (and sequence length, for token ids) where the model allows
    it (`note` says which), taking keyword inputs by their names; reload with
    `torch.export.load(path).module()` and compare outputs."""
    path = Path(path)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"a torch.export program to {path}")
        with eval_mode(prog.gm):
            exported, note = _export(prog.gm, tuple(prog.example_inputs), prog.keywords)
        with atomic_write(path) as tmp:
            torch.export.save(exported, tmp)
        want = reference_outputs(prog)
        with torch.no_grad():
            got = flatten_tensors(call_with(torch.export.load(path).module(), prog.example_inputs, prog.keywords))
        return compare_outputs(got, want, f"the reloaded {path.name}"), note

    return guarded("pt2", path, body, dtype=_dtype_name(prog))


def export_all(
    prog: Program, out_dir: str | Path, formats: Iterable[str] = ("pt", "pt2", "onnx"),
    model: torch.nn.Module | None = None, optional: Iterable[str] = (), onnx_dtype: str = "auto",
) -> list[ExportResult]:
    """Write each format into `out_dir` (model.pt and state_dict.pt for "pt", model.pt2,
    model.onnx in `onnx_dtype` (targets/onnx.py), model_eager.pt for "eager" and the folder
    hf/ for "hf", which need the user's `model`) and record the results in
    `prog.info["exports"]` as a list of dicts.

    A failed export is a result with ok=False; the other formats are still written. A format of
    `optional` (one that was among the defaults, not asked for) that does not apply to the model
    is a result marked skipped; asked for, it is a failure."""
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FILE_NAMES]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}: choose from {sorted(FILE_NAMES)}")
    if "pt" in formats and "state_dict" not in formats:
        formats.insert(formats.index("pt") + 1, "state_dict")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for fmt in formats:
        target = out / FILE_NAMES[fmt]
        if fmt == "pt":
            results.append(save_graph_module(prog, target))
        elif fmt == "state_dict":
            results.append(save_state_dict(prog, target))
        elif fmt == "pt2":
            results.append(export_program(prog, target))
        elif fmt in ("hf", "eager"):
            if model is None:
                raise ValueError(f"the {fmt} format needs the user's model (model=...)")
            if fmt == "eager":
                results.append(save_eager(prog, model, target))
            else:
                from pcompiler.targets.hf import save_hf  # imports transformers only when asked for

                results.append(save_hf(prog, model, target))
        else:
            from pcompiler.targets.onnx import export_onnx  # imports onnx only when asked for

            results.append(export_onnx(prog, target, dtype=onnx_dtype))
    optional = set(optional)
    results = [r if not r.skipped or r.format in optional else dataclasses.replace(r, skipped=False) for r in results]
    prog.info["exports"] = [dataclasses.asdict(r) for r in results]
    failed = [r.format for r in results if not r.ok and not r.skipped]
    if failed:
        log.warning("exports that failed: %s (see prog.info['exports'] for why)", ", ".join(failed))
    return results
