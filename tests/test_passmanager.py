"""Tests of the pass manager: the registry, pass lookup errors, failures wrapped with context,
the history, and instruments (timing, graph dumps)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import analyze
from torch import nn

import pcompiler
from pcompiler.errors import CompileError, InternalError, PassError
from pcompiler.passmanager import Pass, PassResult, dump_instrument, make_pass, registered_passes

X = torch.randn(2, 3, 8, 8)


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Linear(16 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(-1, 16 * 4 * 4))


PIPELINE = ("analyze", "l1", "slim", "verify")


def pipeline():
    return [make_pass(name, **({"ratio": 0.5} if name == "l1" else {})) for name in PIPELINE]


def test_registry_keys_are_pass_names():
    passes = registered_passes()
    assert set(PIPELINE) | {"random"} <= set(passes)
    for key, cls in passes.items():
        assert key == cls.name, f"{cls.__qualname__} is registered as '{key}' but named '{cls.name}'"
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls.__qualname__
        assert isinstance(make_pass(key), Pass)


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(CompileError, match=r"no pass named 'prune-everything'") as err:
        make_pass("prune-everything")
    assert err.value.hint == f"known passes: {', '.join(sorted(registered_passes()))}"
    assert err.value.exit_code == 2


@dataclass(frozen=True)
class Boom:
    """A pass that fails with whatever it is given."""

    name: ClassVar[str] = "boom"
    error: Exception = RuntimeError("kaput")

    def run(self, prog):
        raise self.error


class NodeError(CompileError):
    exit_code = 7


def test_failing_pass_is_wrapped_with_its_name_and_history():
    prog = analyze(Flatten(), X)
    with pytest.raises(InternalError) as err:  # not a CompileError: a bug, exit 1
        pcompiler.run(prog, [make_pass("l1", ratio=0.5), Boom()])
    e = err.value
    assert (e.pass_name, e.exit_code) == ("boom", 1)
    assert str(e) == "internal error in pass 'boom': RuntimeError: kaput [ran before: analyze, l1]"
    assert isinstance(e.__cause__, RuntimeError)

    cause = NodeError("weight of Conv is not constant", node="conv", hint="fold it first")
    with pytest.raises(PassError) as err:
        pcompiler.run(pcompiler.trace(Flatten(), (X,)), [Boom(error=cause)])
    e = err.value
    assert (e.node, e.hint, e.exit_code, e.cause) == ("conv", "fold it first", 7, cause)
    assert str(e) == ("at node 'conv': pass 'boom' failed: weight of Conv is not constant "
                      "[ran before: nothing] (fold it first)")


def test_pass_error_is_not_wrapped_twice():
    inner = PassError("inner", CompileError("x"), [])
    with pytest.raises(PassError) as err:
        pcompiler.run(analyze(Flatten(), X), [Boom(error=inner)])
    assert err.value is inner


def test_history_records_each_pass_with_its_time():
    start = pcompiler.trace(Flatten(), (X,))
    prog = pcompiler.run(start, pipeline())
    assert [r.name for r in prog.history] == list(PIPELINE)
    assert [r.changed for r in prog.history] == [False, False, True, False]
    assert all(isinstance(r.seconds, float) and 0 < r.seconds < 60 for r in prog.history)
    assert start.history == []  # the input Program is left as it was
    assert prog.info["verify"]["ok"] and prog.info["verify"]["max_relative_error"] < 1e-5
    assert (prog.gm.conv.out_channels, prog.gm.fc.in_features) == (8, 128)


def test_instruments_see_every_pass_and_dump_writes_one_file_each(tmp_path):
    seen = []

    def record(p, prog, seconds):
        seen.append((p.name, len(prog.history), prog.history[-1].seconds == seconds))

    prog = pcompiler.run(pcompiler.trace(Flatten(), (X,)), pipeline(),
                         instruments=[record, dump_instrument(tmp_path / "ir")])
    assert seen == [(name, i + 1, True) for i, name in enumerate(PIPELINE)]
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["01-analyze.txt", "02-l1.txt", "03-slim.txt", "04-verify.txt"]
    before, after = (tmp_path / "ir" / "02-l1.txt").read_text(), (tmp_path / "ir" / "03-slim.txt").read_text()
    assert "(%relu, -1, 256)" in before and "(%relu, -1, 128)" in after  # the rewritten view
    assert after == str(prog.gm.graph) == (tmp_path / "ir" / "04-verify.txt").read_text()


def test_pass_result_contract():
    prog = analyze(Flatten(), X)
    result = make_pass("l1", ratio=0.25).run(prog)
    assert isinstance(result, PassResult) and result.changed is False
    assert result.program is not prog and prog.selection is None
    assert [len(v) for v in result.program.selection.values()] == [4]
