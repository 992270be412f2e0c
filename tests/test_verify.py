"""Tests of the verify pass: the invariant holds on the test models at several ratios and with
every method; a corrupted slim model or a forced removal of pinned channels fails and names the
node; verify refuses to run before slim; removing channels that are already dead (zero) leaves
the original model's outputs unchanged. And the comparison it uses (pcompiler/compare.py): NaN
and infinities exact, its results as numbers; a NaN or infinity on one side fails, never passes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import analyze, conv_bn_stack, group_with, outputs, prune
from test_analyze import Attention, Chain, Concat, Residual
from test_slim import Mixed
from torch import nn

import pcompiler
from pcompiler.compare import VERIFY, compare
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


NAN, INF = float("nan"), float("inf")


def test_compare_is_exact_on_nan_and_infinities():
    want = torch.tensor([1.0, -2.0, INF, -INF, NAN], dtype=torch.float64)
    same = compare(want.clone(), want, VERIFY)
    assert same.ok and (same.max_error, same.scale, same.nonfinite_mismatches) == (0.0, 2.0, 0)
    near = compare(want + torch.tensor([1e-5, 0, 0, 0, 0]), want, VERIFY)
    assert near.ok and near.max_error == pytest.approx(1e-5, rel=1e-3) and near.relative_error == pytest.approx(5e-6, rel=1e-3)
    far = compare(want + torch.tensor([1e-3, 0, 0, 0, 0]), want, VERIFY)
    assert not far.ok and far.max_error == pytest.approx(1e-3, rel=1e-3) and "beyond 0.00021" in far.reason
    for got, count in [([NAN, -2.0, INF, -INF, NAN], 1),  # NaN where the reference has a number
                       ([1.0, -2.0, INF, -INF, 0.0], 1),  # a number where it has NaN
                       ([1.0, -2.0, -INF, INF, NAN], 2),  # the infinities' signs swapped
                       ([INF, -2.0, 5.0, -INF, NAN], 2)]:  # inf for a number, a number for inf
        c = compare(torch.tensor(got, dtype=torch.float64), want, VERIFY)
        assert not c.ok and c.max_error == INF and c.nonfinite_mismatches == count, (got, c)
        differ = "1 position differs" if count == 1 else f"{count} positions differ"
        assert f"{differ} in NaN or infinity" in c.reason
    shape = compare(torch.zeros(4), want, VERIFY)
    assert not shape.ok and shape.max_error == INF and shape.reason == "shape (4,) against (5,)"
    ints = compare(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), VERIFY)
    assert not ints.ok and ints.max_error == 1.0 and ints.reason == "1 values differ"


def test_forced_removal_through_reciprocal_fails_on_the_infinity():
    """Linear -> reciprocal -> Linear: the zeroed reference is 1/0 = inf there, the slim model
    has no channel; analyze pins it, and a rule that forgot to must fail verify, not pass it."""
    model = Chain(nn.Linear(8, 16), torch.reciprocal, nn.Linear(16, 4))
    x = torch.randn(2, 8)
    prog = prune(model, x, ratio=0.5)
    g = group_with(prog, "a.weight", 0)
    assert g.pinned == ("reciprocal(0) = inf, not 0: removing a channel here is not zeroing it",)
    assert prog.selection == {} and prog.info["verify"]["max_error"] == 0.0
    groups = tuple(dataclasses.replace(x, pinned=()) if x.id == g.id else x for x in prog.analysis.groups)
    forced = prog.replace(analysis=dataclasses.replace(prog.analysis, groups=groups), selection={g.id: tuple(range(8))},
                          reference=None, removal=None, info={})
    slim = pcompiler.run(forced, [make_pass("slim")])
    with pytest.raises(VerifyError, match=r"positions differ in NaN or infinity.*first difference at node 'h'") as err:
        verify_program(slim)
    assert err.value.exit_code == 3


class MaskedOutput(nn.Module):
    """An output with -inf at fixed positions (a masked logit)."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("mask", torch.tensor([True, False, False, True]))

    def forward(self, x):
        return self.h(torch.relu(self.a(x))).masked_fill(self.mask, float("-inf"))


def test_output_masked_with_infinity_is_still_compared():
    prog = prune(MaskedOutput(), torch.randn(3, 8), ratio=0.5)
    assert prog.selection and prog.info["verify"]["max_error"] < 1e-5  # -inf = -inf, the rest finite
    broken = prog.replace(gm=copy.deepcopy(prog.gm))
    with torch.no_grad():
        broken.gm.h.weight[1, 0] += 1.0  # output column 1 is not masked
    with pytest.raises(VerifyError, match=r"output 0 differs .*: error .* beyond .*first difference at node 'h'"):
        verify_program(broken)


def test_compare_counts_the_numbers_it_compared():
    want = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert compare(want.clone(), want, VERIFY).finite == 2
    assert compare(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]), VERIFY).finite == 3
    assert compare(torch.full((3,), float("nan")), torch.full((3,), float("nan")), VERIFY).finite == 0


def test_outputs_that_are_never_numbers_prove_nothing_and_fail():
    """log of a negative everywhere: the same NaN on both sides, on every input tried."""
    model = Chain(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nan_everywhere = nn.Sequential(model, nn.ReLU())

    class AllNaN(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nan_everywhere

        def forward(self, x):
            return torch.log(-self.m(x) - 1)

    prog = analyze(AllNaN(), torch.randn(4, 8))
    with pytest.raises(PassError, match="verify compared no number: every output value") as err:
        pcompiler.run(prog, [make_pass("l1", ratio=0.5, round_to=1), make_pass("slim"), make_pass("verify")])
    assert err.value.exit_code == 3


def test_a_wrong_channel_the_outputs_hide_is_found_inside(monkeypatch):
    """sigmoid wrongly taken as channel-preserving, then a layer scale of 1e-7: the outputs
    differ by less than the tolerance, the sigmoid's kept values do not match: verify fails."""
    from pcompiler.passes.rules import base

    def preserves_channels(node, ctx):
        ctx.same_shape(node.args[0], node)

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 8)
            self.register_buffer("scale", torch.full((8,), 1e-7))

        def forward(self, x):
            return x.sum(-1, keepdim=True) + self.scale * self.b(torch.sigmoid(self.a(x)))

    monkeypatch.setitem(base._RULES, torch.sigmoid, base.OpRule(preserves_channels))
    prog = pcompiler.run(analyze(Hidden(), torch.randn(3, 4)), [make_pass("l1", ratio=0.5, round_to=1),
                                                                make_pass("slim")])
    assert prog.selection and prog.gm.a.out_features == 4
    with pytest.raises(VerifyError, match=r"outputs match the .*, but a value inside does not: first difference "
                                          r"at node 'b' \(call_module b\)") as err:
        verify_program(prog)
    assert err.value.exit_code == 3


class PreNorm(nn.Module):
    """A pre-norm transformer block on a residual stream under LayerNorms (a module, a functional
    call, a final norm); the attention splits heads with `c // heads`, c the stream's width."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.emb, self.n1, self.att = nn.Linear(6, dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.n2_w, self.n2_b = nn.Parameter(torch.rand(dim) + 0.5), nn.Parameter(torch.rand(dim) - 0.5)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.n, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.emb(x)
        x = x + self.att(self.n1(x))
        x = x + self.mlp(F.layer_norm(x, (x.shape[-1],), self.n2_w, self.n2_b, 1e-6))
        return self.head(self.n(x))


def randomize_layernorms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def prune_normalized(model: nn.Module, x: torch.Tensor, frontend: str = "auto", **options) -> pcompiler.Program:
    prog = pcompiler.trace(model, (x,), frontend=frontend)
    return pcompiler.run(prog, [make_pass("analyze", prune_normalized=True), make_pass("l1", **options),
                                make_pass("slim"), make_pass("verify")])


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pruned_layernorm_stream_is_proved_exactly_and_its_deviation_reported(frontend):
    """The slim LayerNorms normalize over the kept channels: equal to a reference whose norms do
    the same (within the usual tolerance), and off from the plain zeroed original by a reported
    amount, with the norms named."""
    torch.manual_seed(0)
    model, x = randomize_layernorms(PreNorm()), torch.randn(2, 5, 6)
    prog = prune_normalized(model, x, frontend, ratio=0.5)
    v = prog.info["verify"]
    assert v["ok"] and v["max_relative_error"] < 1e-5, v
    assert "its 3 LayerNorms that lost channels normalizing over the kept ones" in v["reference"]
    n1, functional, n = v["approximate"]["where"]
    assert (n1, n) == ("n1", "n") and functional.startswith("layer_norm")  # a functional norm by its node
    assert 0.01 < v["approximate"]["max_relative_error"] < 2.0
    gm = prog.gm
    assert (gm.emb.out_features, gm.head.in_features, tuple(gm.n1.normalized_shape)) == (8, 8, (8,))
    assert (gm.att.qkv.out_features, gm.get_submodule("mlp.0").in_features, gm.get_submodule("mlp.2").out_features) == (24, 8, 8)  # 2 heads of 4
    with torch.no_grad():
        want = model(x)
    assert gm(x).shape == want.shape
    # The deviation is the norms' alone: the zeroed original with kept-channel norms is what came out.
    broken = prog.replace(gm=copy.deepcopy(gm))
    with torch.no_grad():
        broken.gm.n1.weight[0] += 0.5
    with pytest.raises(VerifyError, match=r"first difference at node 'n1'"):
        verify_program(broken)


def test_layernorm_over_two_dims_keeps_the_kept_positions():
    """normalized_shape (C, L): the norm over the kept channels' positions of both dims."""
    torch.manual_seed(0)
    model = randomize_layernorms(Chain(nn.Conv1d(3, 8, 1), nn.LayerNorm([8, 5]), nn.Conv1d(8, 2, 1)))
    prog = prune_normalized(model, torch.randn(2, 3, 5), ratio=0.5)
    assert prog.gm.mid.normalized_shape == (4, 5) and prog.gm.mid.weight.shape == (4, 5)
    # Rescaled as an RMSNorm is (exact where the kept channels' mean is zero): weight x sqrt(D/D'), eps x D/D'.
    kept = [c for c in range(8) if c not in prog.selection[group_with(prog, "a.weight", 0).id]]
    assert torch.allclose(prog.gm.mid.weight, model.mid.weight[kept] * 2 ** 0.5)
    assert prog.gm.mid.eps == pytest.approx(2 * model.mid.eps) and torch.equal(prog.gm.mid.bias, model.mid.bias[kept])
    assert prog.info["verify"]["max_relative_error"] < 1e-5 and prog.info["verify"]["approximate"]["where"] == ["mid"]
