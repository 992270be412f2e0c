"""Tests of the verify pass: the invariant holds on the test models at several ratios and with
every method; a corrupted slim model or a forced removal of pinned channels fails and names the
node; verify refuses to run before slim; removing channels that are already dead (zero) leaves
the original model's outputs unchanged."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import analyze, conv_bn_stack, group_with, outputs, prune
from test_analyze import Attention, Chain, Concat, Residual
from test_slim import Mixed
from torch import nn

import pcompiler
from pcompiler.errors import CompileError, PassError, VerifyError
from pcompiler.passes.verify import verify_program
from pcompiler.passmanager import make_pass

IMG = torch.randn(2, 3, 8, 8)
MODELS = {
    "residual": (Residual, IMG),
    "concat": (Concat, IMG),
    "mixed": (Mixed, IMG),
    "stack": (conv_bn_stack, IMG),
    "attention": (Attention, torch.randn(2, 5, 16)),
}


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine parameters (fresh ones are 0 / 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method, options", [
    ("l1", {"ratio": 0.25}), ("l1", {"ratio": 0.75}), ("l1", {"ratio": 0.5, "global_ranking": True}),
    ("random", {"ratio": 0.5, "seed": 3}), ("l1", {"ratio": 0.6, "round_to": 2}),
])
def test_invariant_holds(name, method, options):
    make, x = MODELS[name]
    torch.manual_seed(0)
    prog = prune(randomize_norms(make()), x, method=method, **options)  # checks the invariant itself too
    result = prog.info["verify"]
    assert result["ok"] is True and result["max_relative_error"] < 1e-5
    assert prog.info["slim"]["channels_removed"] > 0
    widths = prog.info["slim"]["layers"]
    assert any(w["out"][1] < w["out"][0] for w in widths.values() if "out" in w)


def test_corrupted_slim_model_fails_and_names_the_node():
    prog = prune(Residual(), IMG, ratio=0.5)
    broken = prog.replace(gm=copy.deepcopy(prog.gm))
    with torch.no_grad():
        broken.gm.c.weight[0, 0] += 1.0
    with pytest.raises(VerifyError, match=r"first difference at node 'c' \(call_module c\)") as err:
        verify_program(broken)
    assert err.value.exit_code == 3 and "output 0 differs" in str(err.value)
    with pytest.raises(PassError, match=r"pass 'verify' failed: .*node 'c'") as err:
        pcompiler.run(broken, [make_pass("verify")])
    assert err.value.exit_code == 3
    assert verify_program(prog)["ok"] is True  # the intact one still passes


def test_verify_before_slim_is_refused():
    prog = pcompiler.run(analyze(Residual(), IMG), [make_pass("l1", ratio=0.5)])
    with pytest.raises(CompileError, match="run 'slim' before it"):
        verify_program(prog)
    with pytest.raises(PassError, match=r"pass 'verify' failed: verify needs a slimmed program.*\[ran before: analyze, l1\]"):
        pcompiler.run(prog, [make_pass("verify")])
    assert prog.reference is None and "verify" not in prog.info


def test_forced_removal_through_softmax_is_caught():
    model = Chain(nn.Linear(3, 8), nn.Softmax(-1), nn.Linear(8, 2))
    prog = analyze(model, torch.randn(4, 3))
    g = group_with(prog, "a.weight", 0)
    assert g.pinned == ("softmax normalizes over these channels",)
    forced = prog.replace(selection={g.id: (0, 1, 2, 3)})
    with pytest.raises(CompileError, match=r"group .* is pinned: softmax normalizes over these channels"):
        pcompiler.run(forced, [make_pass("slim")])
    # Simulate a rule that forgot to pin: verify must still catch the broken invariant.
    groups = tuple(dataclasses.replace(x, pinned=()) if x.id == g.id else x for x in prog.analysis.groups)
    forced = forced.replace(analysis=dataclasses.replace(prog.analysis, groups=groups))
    slim = pcompiler.run(forced, [make_pass("slim")])
    assert (slim.gm.a.out_features, slim.gm.h.in_features) == (4, 4)
    with pytest.raises(VerifyError, match=r"removed channels zeroed: error .* beyond .*first difference at node 'mid'"):
        verify_program(slim)


def test_dead_channels_removed_leave_the_original_outputs():
    model = Chain(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()), nn.Conv2d(8, 4, 3))
    randomize_norms(model).eval()
    dead = [1, 4, 6, 7]
    with torch.no_grad():
        for t in (model.a.weight, model.a.bias, model.mid[0].weight, model.mid[0].bias):
            t[dead] = 0.0
    original = copy.deepcopy(model)
    prog = prune(model, IMG, ratio=0.5)
    assert list(prog.selection.values()) == [tuple(dead)]
    assert (prog.gm.a.out_channels, prog.gm.h.in_channels) == (4, 4)
    for x in (IMG, torch.randn(3, 3, 8, 8)):
        for got, want in zip(outputs(prog.gm, (x,)), outputs(original, (x,)), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
