"""Tests of selection (passes/select.py) on hand-set scores: the per-group count, rounding,
global ranking, skip globs, option checks, the FLOPs-targeted ratio search, and the random
method's seed. Selections are then slimmed and verified (the invariant must hold for any)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import analyze, conv_bn_stack, group_with, prune
from torch import nn

import pcompiler
from pcompiler.costs import count_flops, count_params
from pcompiler.errors import CompileError
from pcompiler.passes.select import SelectOptions, select
from pcompiler.passmanager import make_pass

X = torch.randn(1, 3, 4, 4)
# Group A (10 channels) on a scale of hundreds, in a shuffled order; group B (4) on a scale of ones.
A_SCORES = (np.array([3, 7, 0, 9, 1, 5, 2, 8, 6, 4]) + 1) * 100.0
B_SCORES = np.array([1.0, 1.0, 10.0, 1.0])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = nn.Conv2d(3, 10, 1), nn.Conv2d(10, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture
def net():
    """(program after analyze, id of group A, id of group B, their scores)."""
    prog = analyze(Net(), X)
    ga, gb = group_with(prog, "a.weight", 0).id, group_with(prog, "b.weight", 0).id
    assert [g.id for g in prog.analysis.prunable] == [ga, gb]
    return prog, ga, gb, {ga: A_SCORES, gb: B_SCORES}


def slim_with(prog, selection):
    """Slim `prog` with a hand-made selection; check the invariant and the new widths."""
    out = pcompiler.run(prog.replace(selection=selection), [make_pass("slim"), make_pass("verify")])
    assert out.info["verify"]["ok"] and out.info["verify"]["max_relative_error"] < 1e-5
    ga, gb = group_with(prog, "a.weight", 0).id, group_with(prog, "b.weight", 0).id
    removed_a, removed_b = len(selection.get(ga, ())), len(selection.get(gb, ()))
    assert (out.gm.a.out_channels, out.gm.b.in_channels) == (10 - removed_a, 10 - removed_a)
    assert (out.gm.b.out_channels, out.gm.h.in_channels) == (4 - removed_b, 4 - removed_b)
    assert out.info["slim"]["channels_removed"] == removed_a + removed_b
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("min_keep", [1, 2, 3])
def test_count_is_ceil_ratio_capped_by_min_keep(net, ratio, min_keep):
    prog, ga, gb, scores = net
    sel = select(prog.analysis, scores, SelectOptions(ratio=ratio, min_keep=min_keep))
    for gid, n in ((ga, 10), (gb, 4)):
        want = min(math.ceil(Fraction(str(ratio)) * n), n - min_keep)  # exact: 0.7 * 10 is 7, not 8
        removed = sel.get(gid, ())
        assert len(removed) == want
        lowest = np.argsort(scores[gid], kind="stable")[:want]
        assert removed == tuple(sorted(lowest.tolist()))
    slim_with(prog, sel)


@pytest.mark.parametrize("ratio, round_to, removed_a, removed_b", [
    (0.5, 4, 2, 0),  # A keeps 5 -> 8; B keeps 2 -> 4 (nothing removed)
    (0.8, 3, 7, 1),  # A keeps 2 -> 3; B keeps min_keep = 1 -> 3
    (0.3, 2, 2, 2),  # A keeps 7 -> 8; B keeps 2 -> 2
    (0.5, 1, 5, 2),
])
def test_round_to_rounds_kept_count_up(net, ratio, round_to, removed_a, removed_b):
    prog, ga, gb, scores = net
    sel = select(prog.analysis, scores, SelectOptions(ratio=ratio, round_to=round_to))
    assert len(sel.get(ga, ())) == removed_a and len(sel.get(gb, ())) == removed_b
    for gid, n in ((ga, 10), (gb, 4)):
        kept = n - len(sel.get(gid, ()))
        assert kept % round_to == 0 or kept == n
    slim_with(prog, sel)


def test_global_ranking_normalizes_by_group_mean(net):
    prog, ga, gb, scores = net
    # Normalized: A = (1..10) / 5.5, B = (1, 1, 10, 1) / 3.25. The 7th lowest of the 14 is A's
    # 4th (4 / 5.5); B's three 1s (0.31) fall below it but B keeps min_keep = 1 channel anyway.
    glob = select(prog.analysis, scores, SelectOptions(ratio=0.5, global_ranking=True))
    assert glob == {ga: (0, 2, 4, 6), gb: (0, 1, 3)}
    layer = select(prog.analysis, scores, SelectOptions(ratio=0.5))
    assert layer == {ga: (0, 2, 4, 6, 9), gb: (0, 1)}
    # Rescaling one group's scores changes nothing under global ranking (it would unnormalized).
    scaled = {ga: scores[ga] / 1000, gb: scores[gb]}
    assert select(prog.analysis, scaled, SelectOptions(ratio=0.5, global_ranking=True)) == glob
    assert select(prog.analysis, scores, SelectOptions(ratio=0.0, global_ranking=True)) == {}
    slim_with(prog, glob)


def test_shares_scale_each_groups_ratio_up_to_the_cap(net):
    """With shares, group g loses ceil(min(SHARE_CAP, r * share_g) * N_g) of its lowest-scored
    channels: A (10) at 0.5 x 0.4 loses 2, B (4) at 0.5 x 3 is capped at 0.9 (4 - min_keep = 3)."""
    from pcompiler.passes.select import SHARE_CAP

    prog, ga, gb, scores = net
    out = select(prog.analysis, scores, SelectOptions(ratio=0.5, shares={ga: 0.4, gb: 3.0}))
    assert out == {ga: (2, 4), gb: (0, 1, 3)} and SHARE_CAP == 0.9
    assert select(prog.analysis, scores, SelectOptions(ratio=0.5, shares={ga: 1.0})) == \
        select(prog.analysis, scores, SelectOptions(ratio=0.5))  # a group without a share: 1
    slim_with(prog, out)


@pytest.mark.parametrize("rise_a, rise_b", [(0.4, 0.26), (0.4, 0.4)])
def test_measured_shares_weigh_each_groups_loss_by_what_its_cut_saves(net, monkeypatch, rise_a, rise_b):
    """A group's share is (median harm / its harm) ** SHARE_EXPONENT, harm = the log-perplexity
    rise with its lowest-scored half cut over the parameters that cut saves: A's half (5
    channels) saves 5 x (3 + 1) + 5 x 4 = 40, B's (2) 2 x (10 + 1) + 2 x 2 = 26. Rises in that
    proportion give equal shares; equal rises favour cutting A, which saves more."""
    from types import SimpleNamespace

    import pcompiler.inference
    from pcompiler.passes.select import SHARE_EXPONENT, measured_shares
    from pcompiler.tasks import CAUSAL_LM

    prog, ga, gb, scores = net
    widths = lambda gm: (gm.a.out_channels, gm.b.out_channels)  # noqa: E731
    rise = {(10, 4): 0.0, (5, 4): rise_a, (10, 2): rise_b}
    monkeypatch.setattr(pcompiler.inference, "evaluate", lambda gm, windows, **kw: math.exp(rise[widths(gm)]))
    data = SimpleNamespace(train=torch.utils.data.TensorDataset(torch.randn(40, 3)), task=CAUSAL_LM)
    shares = measured_shares(prog, prog.analysis, scores, SelectOptions(), data, seed=0, device="cpu")
    harm = {ga: rise_a / 40, gb: rise_b / 26}
    median = (harm[ga] + harm[gb]) / 2
    assert shares == pytest.approx({g: (median / h) ** SHARE_EXPONENT for g, h in harm.items()})
    assert (shares[ga] > 1 > shares[gb]) if rise_a == rise_b else shares[ga] == pytest.approx(shares[gb])


def test_a_trial_shares_what_slim_leaves_whole_and_counts_shapes_on_meta(net):
    """The searches' trials: a slimmed copy that shares the tensors slim does not cut (h's bias)
    and leaves the model as it was; on the meta device it has the same shapes, so the parameter
    search counts with no second model in memory."""
    from pcompiler.passes.select import _trial_slim

    prog, ga, gb, scores = net
    selection = select(prog.analysis, scores, SelectOptions(ratio=0.5))
    before = {n: t.clone() for n, t in prog.gm.state_dict().items()}
    trial, shapes = _trial_slim(prog, selection), _trial_slim(prog, selection, shapes_only=True)
    assert trial.gm.h.bias is prog.gm.h.bias and trial.gm.a.weight.shape == (5, 3, 1, 1)
    assert all(torch.equal(t, before[n]) for n, t in prog.gm.state_dict().items())
    assert {p.device.type for p in shapes.gm.parameters()} == {"meta"}
    assert {n: p.shape for n, p in shapes.gm.named_parameters()} == {n: p.shape for n, p in trial.gm.named_parameters()}
    assert count_params(shapes.gm) == count_params(trial.gm) < count_params(prog.gm)


@pytest.mark.parametrize("skip, kept_groups", [
    (("a",), "B"), (("h",), "A"), (("b",), ""), (("x*",), "AB"), (("[ab]",), ""), (("*",), ""),
])
def test_skip_globs_exclude_groups_with_a_matching_module(net, skip, kept_groups):
    prog, ga, gb, scores = net
    sel = select(prog.analysis, scores, SelectOptions(ratio=0.5, skip=skip))
    assert set(sel) == {gid for gid, label in ((ga, "A"), (gb, "B")) if label in kept_groups}
    slim_with(prog, sel)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(CompileError, match=r"outside \[0, 1\)"):
        SelectOptions(ratio=ratio).check()
    prog = analyze(Net(), X)
    with pytest.raises(CompileError, match=rf"pass 'l1' failed: ratio {ratio} is outside"):
        pcompiler.run(prog, [make_pass("l1", ratio=ratio)])
    assert prog.selection is None


def test_speedup_search_halves_flops():
    x = torch.randn(1, 3, 16, 16)
    model = conv_bn_stack()
    before = count_flops(model, (x,))
    prog = prune(model, x, speedup=2.0)
    after = count_flops(prog.gm, (x,))
    assert before / 2.6 < after <= before / 2
    assert 0 < prog.info["method_settings"]["ratio_used"] < 0.5
    assert prog.gm.get_submodule("0").out_channels < 16


def test_param_ratio_search_removes_that_fraction_of_the_parameters():
    """--params-removed 0.3: the lowest ratio whose slim model keeps at most 70% of the parameters
    (a channel fewer would keep more), on a chain where a channel weighs different amounts."""
    x = torch.randn(1, 3, 16, 16)
    model = conv_bn_stack()
    before = count_params(model)
    prog = prune(model, x, params=0.3)
    after = count_params(prog.gm)
    assert 0.6 * before < after <= 0.7 * before
    ratio = prog.info["method_settings"]["ratio_used"]
    assert count_params(prune(conv_bn_stack(), x, ratio=ratio - 0.02).gm) > 0.7 * before
    with pytest.raises(CompileError, match="--speedup, --params-removed and --latency each set the budget"):
        pcompiler.run(analyze(Net(), X), [make_pass("l1", speedup=2.0, params=0.3)])
    with pytest.raises(CompileError, match=r"removing 100% of the parameters|outside \(0, 1\)"):
        pcompiler.run(analyze(Net(), X), [make_pass("l1", params=1.0)])


def test_speedup_out_of_reach_says_so():
    prog = analyze(Net(), X)
    with pytest.raises(CompileError, match="100.0x FLOPs reduction is out of reach"):
        pcompiler.run(prog, [make_pass("l1", speedup=100.0)])


def test_random_seed_repeats_and_varies():
    x = torch.randn(1, 3, 8, 8)
    model = conv_bn_stack()
    first, again, other = (prune(model, x, method="random", ratio=0.5, seed=s) for s in (0, 0, 1))
    assert first.selection == again.selection != other.selection
    assert [len(v) for v in first.selection.values()] == [8, 16, 16]
    assert [len(v) for v in other.selection.values()] == [8, 16, 16]
    torch.testing.assert_close(first.gm(x), again.gm(x))
