"""The pass contract, the pass registry and the pass manager.

A pass is a frozen dataclass with a class attribute `name`, its options as fields, and
`run(prog) -> PassResult`. It declares what it needs and what it provides as `Fact`s:

    requires: ClassVar[tuple[Fact, ...]] = (ANALYSIS, DATA)
    ensures: ClassVar[tuple[Fact, ...]] = (SELECTION,)

The manager (`run`) holds every pass to one contract, checked around each call:
- before: every required fact holds, or the user gets a `PassError` (exit 2) with the fact's
  hint (run 'analyze' first, pass --data, ...);
- a pass never modifies the Program it is given (graph, parameters and buffers, the typed
  fields, `info`); it returns a new one (`Program.replace`, a copy of the model to train);
- `changed` is True when the returned model differs from the given one (graph or weights);
  attaching analysis, a selection or info is not a change. False with a different model is a
  broken contract;
- after: every ensured fact holds.
A CompileError inside a pass is the user's (PassError, the cause's exit code: 2, or 3 for a
failed verify); any other exception, and a broken contract, is pcompiler's (InternalError, exit
1, the pass named). The manager also times each pass, records the history, and runs instruments
(e.g. `dump_instrument`, which writes the graph after each pass). It imports no pass: passes
register themselves (`@register_pass`) and are found by name (`make_pass("l1", ratio=0.5)`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from pcompiler.errors import CompileError, InternalError, PassError, one_line
from pcompiler.ir import PassRecord, Program
from pcompiler.memory import page_out, trim

log = logging.getLogger("pcompiler")


@dataclass(frozen=True)
class Fact:
    """Something a pass requires or ensures: a check on the Program (and the pass's options),
    and what a user does to make it hold."""

    name: str
    holds: Callable[[Program, Any], bool]
    hint: str


ANALYSIS = Fact("channel groups", lambda prog, p: prog.analysis is not None, "run the 'analyze' pass before it")
SELECTION = Fact("a selection of channels", lambda prog, p: prog.selection is not None,
                 "run a method (l1, random, tpp, ...) before it")
SLIMMED = Fact("a slimmed program", lambda prog, p: prog.reference is not None and prog.removal is not None,
               "run the 'slim' pass before it")
DATA = Fact("data", lambda prog, p: getattr(p, "data", None) is not None,
            "pass --data (e.g. --data digits), or data=... in the pass API")
WEIGHTS = Fact("real weights", lambda prog, p: not prog.on_meta,
               "load a checkpoint with weights; a model on the meta device cannot run")


@dataclass(frozen=True)
class PassResult:
    program: Program
    changed: bool


@runtime_checkable
class Pass(Protocol):
    name: ClassVar[str]
    requires: ClassVar[tuple[Fact, ...]]
    ensures: ClassVar[tuple[Fact, ...]]

    def run(self, prog: Program) -> PassResult: ...


_REGISTRY: dict[str, type] = {}
P = TypeVar("P", bound=type)


def register_pass(cls: P) -> P:
    """Class decorator: make a pass available by its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} must define a class attribute `name` to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"two passes are named '{name}': {_REGISTRY[name].__qualname__} and {cls.__qualname__}")
    for attr in ("requires", "ensures"):
        if not isinstance(getattr(cls, attr, None), tuple):
            raise TypeError(f"{cls.__qualname__} must declare `{attr}: ClassVar = (...)`, the Facts it "
                            f"{attr[:-1]}s (an empty tuple for none)")
    for fact in (*cls.requires, *cls.ensures):
        if not isinstance(fact, Fact):
            raise TypeError(f"{cls.__qualname__}.requires/ensures must hold Facts, not {fact!r}")
    _REGISTRY[name] = cls
    return cls


def registered_passes() -> dict[str, type]:
    import pcompiler.passes  # noqa: F401  (importing registers every pass)

    return dict(_REGISTRY)


def check_options(name: str, options: dict[str, Any]) -> type:
    """The pass class `name`, once `options` are known fields of it of the declared types."""
    passes = registered_passes()
    if name not in passes:
        raise CompileError(f"no pass named '{name}'", hint=f"known passes: {', '.join(sorted(passes))}")
    cls = passes[name]
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(options)
    unknown = sorted(set(options) - known)
    if unknown:
        raise CompileError(f"pass '{name}' has no option {', '.join(unknown)}", hint=f"its options: {', '.join(sorted(known)) or 'none'}")
    if dataclasses.is_dataclass(cls):
        _check_types(name, cls, options)
    return cls


def make_pass(name: str, **options) -> Pass:
    return check_options(name, options)(**options)


_SCALARS = (bool, int, float, str, type(None))


def _check_types(name: str, cls: type, options: dict[str, Any]) -> None:
    """Options declared as numbers, flags, strings (or None) must be given as such: -p delta=abc
    is the user's error, named, not a crash inside the pass. Other declared types are not checked."""
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        want = hints.get(key)
        allowed = typing.get_args(want) if typing.get_origin(want) in (typing.Union, types.UnionType) else (want,)
        if not allowed or not all(t in _SCALARS for t in allowed):
            continue
        ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in allowed)
        ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            expected = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
            raise CompileError(f"pass '{name}': option {key}={value!r} has the wrong type ({expected} expected)",
                               hint=f"e.g. -p {key}=" + {"bool": "true", "int": "10", "float": "1e-4", "str": "text",
                                                          "none": "none"}["none" if allowed[0] is type(None) else allowed[0].__name__])


Instrument = Callable[[Pass, Program, float], None]


def dump_instrument(folder: str | Path) -> Instrument:
    """An instrument that writes the graph after each pass to FOLDER/NN-name.txt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(p: Pass, prog: Program, seconds: float) -> None:
        n = len(prog.history)
        (folder / f"{n:02d}-{p.name}.txt").write_text(str(prog.gm.graph))

    return dump


# ---------------------------------------------------------------------------------------------
# The contract's checks


def _fingerprint(prog: Program) -> tuple:
    """What a pass must leave as it was: the graph, each parameter and buffer (storage and
    in-place version counter: training or `fill_` bumps it), the typed fields and info's entries."""
    tensors = tuple((name, t.data_ptr(), t._version, tuple(t.shape))
                    for name, t in (*prog.gm.named_parameters(), *prog.gm.named_buffers()))
    shallow = lambda d: None if d is None else tuple((k, id(v)) for k, v in d.items())  # noqa: E731
    return (id(prog.gm), str(prog.gm.graph), tensors, id(prog.analysis), shallow(prog.selection),
            shallow(prog.scores), id(prog.reference), id(prog.removal), id(prog.compensation),
            shallow(prog.info), len(prog.history), prog.example_inputs)


def _model_differs(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """Why model b is not model a (None: same graph, same tensors by value)."""
    if a is b:
        return None
    if str(getattr(a, "graph", "")) != str(getattr(b, "graph", "")):
        return "the graph"
    ta = dict((*a.named_parameters(), *a.named_buffers()))
    tb = dict((*b.named_parameters(), *b.named_buffers()))
    if ta.keys() != tb.keys():
        return "the parameter names"
    for name, t in ta.items():
        if t.shape != tb[name].shape or (not t.is_meta and not torch.equal(t, tb[name])):
            return f"{name}"
    return None


def _unmet(p: Pass, prog: Program, facts: Iterable[Fact]) -> Fact | None:
    return next((f for f in facts if not f.holds(prog, p)), None)


def _run_one(p: Pass, prog: Program, before: list[str]) -> PassResult:
    if not isinstance(p, Pass):
        raise InternalError(getattr(p, "name", type(p).__name__), "is not a pass: it needs `name`, `requires`, "
                            "`ensures` and `run`", before)
    missing = _unmet(p, prog, p.requires)
    if missing is not None:
        raise PassError(p.name, CompileError(f"{p.name} needs {missing.name}", hint=missing.hint), before)
    fingerprint = _fingerprint(prog)
    try:
        result = p.run(prog)
    except PassError:
        raise
    except CompileError as e:
        raise PassError(p.name, e, before) from e
    except Exception as e:  # noqa: BLE001 - a bug in the pass: re-raised with its name
        raise InternalError(p.name, one_line(e), before) from e
    if not isinstance(result, PassResult) or not isinstance(result.program, Program):
        raise InternalError(p.name, f"returned {type(result).__name__}, not a PassResult with a Program", before)
    if _fingerprint(prog) != fingerprint:
        raise InternalError(p.name, "modified the Program it was given (a pass returns a new one: "
                            "Program.replace, and a copy of the model it changes)", before)
    if not result.changed:
        what = _model_differs(prog.gm, result.program.gm)
        if what is not None:
            raise InternalError(p.name, f"said it changed nothing, but {what} differs", before)
    broken = _unmet(p, result.program, p.ensures)
    if broken is not None:
        raise InternalError(p.name, f"promised {broken.name} and did not provide it", before)
    return result


def run(prog: Program, passes: Iterable[Pass], instruments: Iterable[Instrument] = ()) -> Program:
    """Run `passes` over `prog` in order, each under the contract; return the final Program.
    After each pass the pages of a memory-mapped checkpoint that it read, and the heap it freed,
    are given back (`memory.page_out`, `memory.trim`)."""
    instruments = list(instruments)
    for p in passes:
        before = [r.name for r in prog.history]
        t0 = time.perf_counter()
        result = _run_one(p, prog, before)
        seconds = time.perf_counter() - t0
        prog = result.program.replace(history=[*prog.history, PassRecord(p.name, seconds, result.changed)])
        log.info("pass %s: %.3fs%s", p.name, seconds, " (changed)" if result.changed else "")
        page_out(prog.source, prog.reference, prog.gm)  # the checkpoint's pages the pass read (pcompiler/memory.py)
        trim()
        for inst in instruments:
            inst(p, prog, seconds)
    return prog
