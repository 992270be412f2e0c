"""Pass contract, pass registry and the pass manager.

A pass is a frozen dataclass with a class attribute `name`, its options as fields, and
`run(prog) -> PassResult`. Passes register themselves with `@register_pass`; the CLI and the
Python API look them up by name (`make_pass("l1", ratio=0.5)`).

The manager runs passes in order, times each, records the history on the Program, can dump the
graph after each pass, and turns a failure into a `PassError` that says which pass failed, at
which node if the pass said so, why, and what ran before.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

from pcompiler.errors import CompileError, InternalError, PassError, one_line
from pcompiler.ir import PassRecord, Program

log = logging.getLogger("pcompiler")


@dataclass(frozen=True)
class PassResult:
    program: Program
    changed: bool


@runtime_checkable
class Pass(Protocol):
    name: ClassVar[str]

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
    _REGISTRY[name] = cls
    return cls


def registered_passes() -> dict[str, type]:
    import pcompiler.passes  # noqa: F401  (importing registers every pass)

    return dict(_REGISTRY)


def make_pass(name: str, **options) -> Pass:
    passes = registered_passes()
    if name not in passes:
        raise CompileError(f"no pass named '{name}'", hint=f"known passes: {', '.join(sorted(passes))}")
    cls = passes[name]
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(options)
    unknown = sorted(set(options) - known)
    if unknown:
        raise CompileError(f"pass '{name}' has no option {', '.join(unknown)}", hint=f"its options: {', '.join(sorted(known)) or 'none'}")
    return cls(**options)


Instrument = Callable[[Pass, Program, float], None]


def dump_instrument(folder: str | Path) -> Instrument:
    """An instrument that writes the graph after each pass to FOLDER/NN-name.txt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(p: Pass, prog: Program, seconds: float) -> None:
        n = len(prog.history)
        (folder / f"{n:02d}-{p.name}.txt").write_text(str(prog.gm.graph))

    return dump


def run(prog: Program, passes: Iterable[Pass], instruments: Iterable[Instrument] = ()) -> Program:
    """Run `passes` over `prog` in order; return the final Program."""
    instruments = list(instruments)
    for p in passes:
        before = [r.name for r in prog.history]
        t0 = time.perf_counter()
        try:
            result = p.run(prog)
        except PassError:
            raise
        except CompileError as e:
            raise PassError(p.name, e, before) from e
        except Exception as e:  # noqa: BLE001 - a bug in the pass: re-raised with its name
            raise InternalError(p.name, one_line(e), before) from e
        seconds = time.perf_counter() - t0
        prog = result.program
        prog.history = [*prog.history, PassRecord(p.name, seconds, result.changed)]
        log.info("pass %s: %.3fs%s", p.name, seconds, " (changed)" if result.changed else "")
        for inst in instruments:
            inst(p, prog, seconds)
    return prog
