"""Tests of the pass manager: the registry, pass lookup errors, failures wrapped with context,
the history, instruments (timing, graph dumps), and the contract (requires, ensures, no change
to the given Program, what `changed` means)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import analyze
from torch import nn

import pcompiler
import pcompiler.pipeline
import pcompiler.train
from pcompiler.errors import CompileError, InternalError, PassError
from pcompiler.passmanager import Pass, PassResult, dump_instrument, make_pass, registered_passes

pytestmark = pytest.mark.usefixtures("moves_allocate")  # every move allocates, as on a GPU: no pass may move what it was given

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
    requires: ClassVar = ()
    ensures: ClassVar = ()
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


# ---------------------------------------------------------------------------------------------
# The contract: requires / ensures, no change to the given Program, what `changed` means


@dataclass(frozen=True)
class Rogue:
    """A pass that breaks the contract in the way it is told to."""

    name: ClassVar[str] = "rogue"
    how: str = "mutate"
    requires: ClassVar = ()
    ensures: ClassVar = ()

    def run(self, prog):
        if self.how == "mutate":  # trains in place, as finetune once did
            with torch.no_grad():
                prog.gm.fc.weight.mul_(2)
            return PassResult(prog.replace(), changed=True)
        if self.how == "info":
            prog.info["sneaky"] = 1
            return PassResult(prog, changed=False)
        if self.how == "unchanged-but-changed":
            import copy

            gm = copy.deepcopy(prog.gm)
            with torch.no_grad():
                gm.fc.bias.add_(1)
            return PassResult(prog.replace(gm=gm), changed=False)
        return PassResult(prog, changed=False)


@dataclass(frozen=True)
class Promises(Rogue):
    name: ClassVar[str] = "promises"
    ensures: ClassVar = (pcompiler.passmanager.SELECTION,)
    how: str = "nothing"


def test_unmet_precondition_is_a_user_error_with_its_hint():
    prog = pcompiler.trace(Flatten(), (X,))
    for name, options, needs, hint in (
        ("slim", {}, "channel groups", "run the 'analyze' pass before it"),
        ("l1", {"ratio": 0.5}, "channel groups", "run the 'analyze' pass before it"),
        ("verify", {}, "a slimmed program", "run the 'slim' pass before it"),
        ("tpp", {"ratio": 0.5}, "channel groups", "run the 'analyze' pass before it"),
        ("evaluate", {}, "data", "pass --data (e.g. --data digits), or data=... in the pass API"),
        ("finetune", {}, "data", "pass --data (e.g. --data digits), or data=... in the pass API"),
    ):
        with pytest.raises(PassError) as err:
            pcompiler.run(prog, [make_pass(name, **options)])
        assert (err.value.exit_code, err.value.hint) == (2, hint), name
        assert str(err.value).startswith(f"pass '{name}' failed: {name} needs {needs} [ran before: nothing]")
    with pytest.raises(PassError, match="slim needs a selection of channels"):
        pcompiler.run(prog, [make_pass("analyze"), make_pass("slim")])
    with pytest.raises(PassError, match="tpp needs data"):
        pcompiler.run(prog, [make_pass("analyze"), make_pass("tpp", ratio=0.5)])


@pytest.mark.parametrize("how, says", [
    ("mutate", "modified the Program it was given"),
    ("info", "modified the Program it was given"),
    ("unchanged-but-changed", "said it changed nothing, but fc.bias differs"),
])
def test_a_pass_that_breaks_the_contract_is_an_internal_error(how, says):
    prog = analyze(Flatten(), X)
    weight = prog.gm.fc.weight.clone()
    with pytest.raises(InternalError, match=says) as err:
        pcompiler.run(prog, [Rogue(how=how)])
    assert (err.value.pass_name, err.value.exit_code) == ("rogue", 1)
    if how == "mutate":  # detected, not prevented: the manager does not pay for a copy per pass
        assert torch.equal(prog.gm.fc.weight, 2 * weight)


def test_an_ensured_fact_that_does_not_hold_is_an_internal_error():
    with pytest.raises(InternalError, match="promised a selection of channels and did not provide it"):
        pcompiler.run(analyze(Flatten(), X), [Promises()])


def test_every_registered_pass_declares_facts_and_methods_ensure_a_selection():
    passes = registered_passes()
    methods = {n for n, c in passes.items() if pcompiler.passmanager.SELECTION in c.ensures}
    assert all(isinstance(c.requires, tuple) and isinstance(c.ensures, tuple) for c in passes.values())
    assert methods == {"l1", "random", "calib", "slimming", "greg1", "greg2", "tpp", "receding"}
    with_data = {n for n in methods if pcompiler.passmanager.DATA in passes[n].requires}
    assert with_data == {"calib", "slimming", "greg1", "greg2", "tpp", "receding"}
    assert {n for n in methods if pcompiler.pipeline.trains(n)} == with_data - {"calib"}  # calib only measures
    assert passes["slim"].ensures == (pcompiler.passmanager.SLIMMED,)


def test_finetune_trains_a_copy():
    from pcompiler.data import DataSource

    ds = torch.utils.data.TensorDataset(torch.randn(64, 3, 2, 2), torch.randint(0, 3, (64,)))
    prog = analyze(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), torch.randn(1, 3, 2, 2))
    before = {k: v.clone() for k, v in prog.gm.state_dict().items()}
    out = pcompiler.run(prog, [make_pass("finetune", data=DataSource("t", ds, ds, 3, (3, 2, 2), None), epochs=1,
                                         train=pcompiler.train.TrainConfig(batch_size=16, progress=False))])
    assert all(torch.equal(prog.gm.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(out.gm.state_dict()["1.weight"], before["1.weight"]) and out.history[-1].changed
