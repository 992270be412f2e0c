"""The regularizing methods' mathematics (docs/methods.md), checked against hand computations on
tiny models: the TPP Gram term, GReg's lambda schedule and stopping, which slices a penalty
touches, GReg-2's picking, the receding regularizer's gradient and BN conversion, slimming's
subgradient; and each method end to end on a few steps of real data."""

import copy
import math

import numpy as np
import pytest
import torch
from helpers import analyze, group_with
from torch import nn

import pcompiler
from pcompiler.data import DataSource
from pcompiler.passes.greg1 import GReg1
from pcompiler.passes.greg2 import GReg2
from pcompiler.passes.receding import BoundedBatchNorm, Receding, rni_penalty, to_bounded, to_standard
from pcompiler.passes.regularize import Budget, ChannelPenalty, Growth, is_filter, lambda_cap
from pcompiler.passes.select import Plan
from pcompiler.passes.slimming import SparsityHooks
from pcompiler.passes.tpp import TPP, gram_term
from pcompiler.passmanager import make_pass
from pcompiler.train import TrainConfig

torch.set_num_threads(1)
QUIET = TrainConfig(progress=False, log_every=1)
HALF = Plan(ratio=0.5)


def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def tiny_data(n: int = 48) -> DataSource:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    ds = torch.utils.data.TensorDataset(x, y)
    return DataSource("tiny", ds, ds, 3, (1, 6, 6), None)


def program(model=None):
    return analyze(model or tiny_cnn(), torch.randn(2, 1, 6, 6))


# ---------------------------------------------------------------------------------------------
# TPP


def test_gram_term_equals_hand_computation_on_a_tiny_conv():
    w = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -1.0]]], [[[3.0, 0.0]]]])  # 3 filters of 1x1x2
    pruned = torch.tensor([1])
    rows = [[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]
    gram = [[sum(a * b for a, b in zip(r, s)) for s in rows] for r in rows]
    # Target: the Gram matrix with row 1 and column 1 zeroed, so only those entries differ.
    diff = [[gram[i][j] if (i == 1 or j == 1) else 0.0 for j in range(3)] for i in range(3)]
    want = sum(d * d for row in diff for d in row) / 9
    assert gram_term(w, 0, pruned).item() == pytest.approx(want)
    assert want == pytest.approx((2 * ((-1.5) ** 2) + 2 * 1.5**2 + 1.25**2) / 9)


def test_gram_term_vanishes_only_when_pruned_filters_are_uncorrelated_and_zero():
    kept = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ortho = torch.tensor([[0.0, 0.0, 2.0]])  # uncorrelated with the kept filters, norm 2
    w = torch.cat([kept, ortho]).requires_grad_()
    term = gram_term(w, 0, torch.tensor([2]))
    assert term.item() == pytest.approx(2.0**4 / 9)  # only its own Gram entry |w_p|^2 remains
    term.backward()
    assert w.grad[:2].abs().max() == 0 and w.grad[2].abs().max() > 0
    z = torch.cat([kept, torch.zeros(1, 3)]).requires_grad_()
    term = gram_term(z, 0, torch.tensor([2]))
    term.backward()
    assert term.item() == 0 and z.grad.abs().max() == 0


def gram_term_reference(w: torch.Tensor, dim: int, pruned: torch.Tensor) -> torch.Tensor:
    """docs/methods.md, "TPP": the formula as written: the whole N x N Gram matrix and its target."""
    rows = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    gram = rows @ rows.t()
    target = gram.detach().clone()
    target[pruned, :] = 0
    target[:, pruned] = 0
    return ((gram - target) ** 2).mean()


@pytest.mark.parametrize("shape,dim", [((12, 5, 3, 3), 0), ((7, 9, 2, 2), 1), ((10, 30), 0), ((1, 4), 0)])
@pytest.mark.parametrize("pruned_count", ["none", "one", "half", "all"])
def test_gram_term_equals_the_full_gram_formula_in_value_and_gradient(shape, dim, pruned_count):
    g = torch.Generator().manual_seed(sum(shape) + dim)
    n = shape[dim]
    k = {"none": 0, "one": 1, "half": n // 2, "all": n}[pruned_count]
    pruned = torch.randperm(n, generator=g)[:k]
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    got_w, want_w = w.clone().requires_grad_(), w.clone().requires_grad_()
    got, want = gram_term(got_w, dim, pruned), gram_term_reference(want_w, dim, pruned)
    got.backward()
    want.backward()
    assert torch.allclose(got.detach(), want.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(got_w.grad, want_w.grad, rtol=1e-10, atol=1e-14)
    if k == 0:
        assert got.item() == 0 and got_w.grad.abs().max() == 0


def test_tpp_loss_term_is_lw_lambda_sum_over_layers():
    prog = program()
    hooks = TPP(ratio=0.5, data=tiny_data(), gram_every=1).make_hooks(prog, budget=200, plan=HALF)
    hooks.lam = 0.3
    want = sum(gram_term(w, d, i) for w, d, i, _ in hooks.grams)
    assert len(hooks.grams) == 2  # the two conv producers; the Linear reads the last group
    assert hooks.loss_term(prog.gm, 0).item() == pytest.approx(1000 * 0.3 * want.item(), rel=1e-6)
    assert hooks.loss_term(prog.gm, 1).item() == pytest.approx(1000 * 0.3 * want.item(), rel=1e-6)


def test_tpp_gram_term_every_kth_step_k_times_as_heavy_within_its_cap():
    prog = program()
    hooks = TPP(ratio=0.5, data=tiny_data(), gram_every=4).make_hooks(prog, budget=200, plan=HALF)
    hooks.lam = 0.3
    want = sum(gram_term(w, d, i) for w, d, i, _ in hooks.grams)
    assert all(hooks.loss_term(prog.gm, step) is None for step in (1, 2, 3, 5))
    assert hooks.loss_term(prog.gm, 4).item() == pytest.approx(4 * 1000 * 0.3 * want.item(), rel=1e-6)
    hooks.gram_caps = {k: 0.4 for k in hooks.gram_caps}  # k * lambda may not pass the cap
    assert hooks.loss_term(prog.gm, 8).item() == pytest.approx(1000 * 0.4 * want.item(), rel=1e-6)
    with pytest.raises(pcompiler.CompileError, match="gram_every"):
        TPP(ratio=0.5, data=tiny_data(), gram_every=0).make_hooks(prog, budget=200, plan=HALF)


def test_tpp_leaves_out_only_gram_terms_that_are_exactly_zero():
    prog = program()
    hooks = TPP(ratio=0.5, data=tiny_data(), gram_every=1).make_hooks(prog, budget=200, plan=HALF)
    hooks.load_state_dict({"lam": 1.0, "stabilize_from": 0})
    hooks._zero_out(hooks.zero_interval)  # stabilization zeroes the first layer
    w, d, idx, _ = hooks.grams[0]
    assert not w.detach().index_select(d, idx).any()
    assert len(hooks.live_grams()) == len(hooks.grams) - 1
    weights = [w for w, _, _, _ in hooks.grams]
    want = 1000 * sum(gram_term(w, d, i) for w, d, i, _ in hooks.grams)
    got = hooks.loss_term(prog.gm, 0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    left_out = torch.autograd.grad(got, weights, allow_unused=True, materialize_grads=True)
    for a, b in zip(left_out, torch.autograd.grad(want, weights), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=0)
    assert left_out[0].abs().max() == 0


def test_tpp_lambda_grows_to_tau_then_zeroes_layer_by_layer():
    prog = program()
    hooks = TPP(ratio=0.5, data=tiny_data()).make_hooks(prog, budget=110, plan=HALF)
    g = hooks.growth
    assert (g.interval, g.ceiling) == (10, pytest.approx(1000.0)) and g.delta == pytest.approx(100.0)
    assert g.stabilize == 10 and hooks.zero_interval == 1
    step = 0
    while hooks.stabilize_from is None:
        step += 1
        hooks.after_step(prog.gm, step)
        assert hooks.lam <= g.ceiling
    assert hooks.lam == g.ceiling and step % 10 == 0
    # (i+1) * zero_interval steps into stabilization, the i-th group's pruned slices are exactly 0.
    hooks.after_step(prog.gm, step + 1)
    first, second = hooks.layers
    assert all(float(w.detach().index_select(d, i).abs().max()) == 0 for w, d, i in first)
    assert max(float(w.detach().index_select(d, i).abs().max()) for w, d, i in second) > 0
    hooks.after_step(prog.gm, step + 2)
    assert all(float(w.detach().index_select(d, i).abs().max()) == 0 for w, d, i in second)
    assert not hooks.finished(step + 9) and hooks.finished(step + 10)


# ---------------------------------------------------------------------------------------------
# Penalties


def test_penalty_adds_lambda_w_to_exactly_the_selected_slices():
    prog = program()
    gm = prog.gm
    group = group_with(prog, "0.weight", 0)
    penalty = ChannelPenalty(gm, [group], lambda p: is_filter(gm, p))
    for p in gm.parameters():
        p.grad = torch.zeros_like(p)
    lam = torch.zeros(group.size)
    lam[[1, 4]] = 0.5
    penalty.set_lambda({group.id: lam})
    penalty.add_grad()
    size = penalty.size()
    w = gm.get_parameter("0.weight")
    expected = torch.zeros_like(w)
    expected[[1, 4]] = 0.5 * w.detach()[[1, 4]]
    assert torch.equal(w.grad, expected)
    for name, p in gm.named_parameters():  # bias, BN and the next conv's input columns untouched
        if name != "0.weight":
            assert p.grad.abs().max() == 0, name
    assert size == pytest.approx(0.5 * 0.5 * float((w.detach()[[1, 4]] ** 2).sum()))


def test_tpp_penalty_reaches_biases_and_norms_only_when_enabled():
    for l2_norm in (True, False):
        prog = program()
        hooks = TPP(ratio=0.5, data=tiny_data(), l2_norm=l2_norm).make_hooks(prog, 200, HALF)
        hooks.lam = 1.0
        with torch.no_grad():
            prog.gm.get_parameter("1.bias").fill_(0.5)  # BN shifts start at 0: make them visible
        for p in prog.gm.parameters():
            p.grad = torch.zeros_like(p)
        hooks.after_backward(prog.gm, 0)
        sel = hooks.selection[group_with(prog, "0.weight", 0).id]
        kept = [c for c in range(6) if c not in sel]
        for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
            grad = prog.gm.get_parameter(name).grad
            assert grad[kept].abs().max() == 0, name
            touched = grad[list(sel)].abs().max() > 0
            assert bool(touched) == (l2_norm or name.startswith("0.")), name
        # The next conv reads the pruned channels (its input columns): untouched, except in its own
        # pruned rows, which belong to its output group.
        own = hooks.selection[group_with(prog, "3.weight", 0).id]
        rows = [r for r in range(8) if r not in own]
        assert prog.gm.get_parameter("3.weight").grad[rows][:, list(sel)].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# GReg


def test_growth_scaling_keeps_the_papers_numbers_at_the_papers_length():
    g = Growth()
    assert g.length == 110_000
    assert g.scaled(1.0) == g
    small = g.scaled(2200 / 110_000, 50.0)  # phases 50x shorter, lambdas 50x larger
    assert small.delta == pytest.approx(0.25) and small.ceiling == 50 and small.stabilize == 200
    assert small.interval == 10 and small.length == 2200


@pytest.mark.parametrize("steps", [600, 3000, 110_000])
def test_budget_keeps_the_papers_total_push(steps):
    paper = Growth()
    cfg = TrainConfig(lr=1e-3, momentum=0.9)
    fit = Budget.fit(steps, paper.length, cfg, paper.ceiling)
    assert not fit.capped and fit.lam == pytest.approx(110_000 / steps)
    fitted = paper.scaled(fit.step_factor, fit.lam)
    # sum(lr * lambda): about 60 for the paper's 110k steps at lr 1e-3, whatever the budget.
    assert paper.push(1e-3) == pytest.approx(60.0, rel=1e-3)
    assert fitted.push(1e-3) == pytest.approx(paper.push(1e-3), rel=0.02)
    assert fitted.length == pytest.approx(steps, rel=0.01)
    if steps == 110_000:
        assert fitted == paper  # the paper's schedule exactly
    # a 10x larger lr needs 10x smaller lambdas for the same push
    assert Budget.fit(steps, paper.length, TrainConfig(lr=1e-2), 1.0).lam == pytest.approx(fit.lam / 10)


def test_budget_caps_lambda_where_stepping_would_be_unstable():
    cfg = TrainConfig(lr=1e-3, momentum=0.9)
    fit = Budget.fit(10, 110_000, cfg, 1.0)  # would need lambda 11000: lr * lambda = 11
    assert fit.capped and fit.lam * cfg.lr == pytest.approx(1.9)  # lr * lambda <= 1 + momentum
    assert lambda_cap(TrainConfig(lr=0.1, momentum=0.0)) == pytest.approx(10.0)


def test_greg_reports_the_push_it_delivered():
    prog = program()
    hooks = GReg1(ratio=0.5, data=tiny_data()).make_hooks(prog, budget=200, plan=HALF)
    hooks.limit = math.inf
    for step in range(1, 201):
        hooks.after_step(prog.gm, step)
    summary = hooks.summary()
    assert summary["schedule_fit"]["push_paper"] == pytest.approx(60.0, rel=1e-3)
    # lr_at defaults to the paper's 1e-3; the delivered push follows lambda step by step
    assert summary["push_delivered"]["min"] == pytest.approx(summary["schedule_fit"]["push_planned"], rel=0.05)


def test_greg_lambda_grows_by_delta_every_ku_until_tau_then_stabilizes():
    prog = program()
    hooks = GReg1(ratio=0.5, data=tiny_data()).make_hooks(prog, budget=110, plan=HALF)
    delta, tau = hooks.growth.delta, hooks.growth.ceiling
    # 110 steps = 1/1000 of the paper's length: lambda 1000x larger (the push kept), delta 1000^2 x.
    assert tau == pytest.approx(1000.0) and delta == pytest.approx(100.0)
    hooks.limit = math.inf  # no magnitude stop: tau ends the growth
    seen = []
    for step in range(1, 200):
        hooks.after_step(prog.gm, step)
        lam = hooks.lam[next(iter(hooks.selection))]
        seen.append(float(lam.max()))
        if hooks.stabilize_from is not None:
            break
    # +delta exactly at multiples of K_u = 10, constant in between.
    assert seen[8] == 0 and seen[9] == pytest.approx(delta) and seen[18] == pytest.approx(delta)
    assert seen[19] == pytest.approx(2 * delta)
    assert max(seen) > tau and max(seen) <= tau + delta + 1e-9  # stops once it passed tau
    start = hooks.stabilize_from
    lam_then = {g: v.clone() for g, v in hooks.lam.items()}
    for step in range(start + 1, start + 200):
        hooks.after_step(prog.gm, step)
    assert all(torch.equal(lam_then[g], hooks.lam[g]) for g in lam_then)  # fixed while stabilizing
    assert not hooks.finished(start + hooks.growth.stabilize - 1) and hooks.finished(start + hooks.growth.stabilize)
    for gid, chans in hooks.selection.items():  # kept channels never get a penalty
        kept = [c for c in range(hooks.groups[gid].size) if c not in chans]
        assert hooks.lam[gid][kept].abs().max() == 0


def test_greg_magnitude_ratio_stops_a_group_early():
    prog = program()
    hooks = GReg1(ratio=0.5, data=tiny_data()).make_hooks(prog, budget=11_000, plan=HALF)
    gid = group_with(prog, "0.weight", 0).id
    with torch.no_grad():  # the pruned filters of this group are already ~0
        prog.gm.get_parameter("0.weight")[list(hooks.selection[gid])] *= 1e-6
    hooks.after_step(prog.gm, 10)
    assert gid in hooks.done and hooks.mag[gid] >= 1000
    other = next(g for g in hooks.selection if g != gid)
    assert other not in hooks.done and float(hooks.lam[other].max()) > 0
    assert float(hooks.lam[gid].max()) == 0  # stopped before growing


def test_greg2_picks_by_magnitude_after_the_picking_phase():
    prog = program()
    m = GReg2(ratio=0.5, data=tiny_data())
    hooks = m.make_hooks(prog, budget=1200, plan=HALF)
    assert hooks.picking and hooks.selection == {}
    gid = group_with(prog, "0.weight", 0).id
    w = prog.gm.get_parameter("0.weight")
    step = 0
    while hooks.picking:
        step += 1
        if step == 5:  # during picking, make filters 0, 2, 5 the smallest
            with torch.no_grad():
                w[[0, 2, 5]] *= 0.01
        hooks.after_step(prog.gm, step)
    assert hooks.selection[gid] == (0, 2, 5)
    scale = 119_000 / 1200  # both phases' lambdas scale by the paper's length / the budget
    assert hooks.pick_ceiling == pytest.approx(1e-2 * scale) and hooks.kept_lambda == pytest.approx(-1e-4 * scale)
    assert hooks.pick_lambda >= hooks.pick_ceiling * (1 - 1e-9)
    lam = hooks.lam[gid]
    assert torch.allclose(lam[[0, 2, 5]], torch.full((3,), hooks.pick_lambda))
    assert torch.allclose(lam[[1, 3, 4]], torch.full((3,), hooks.kept_lambda))  # kept: small negative penalty


# ---------------------------------------------------------------------------------------------
# Receding and slimming


def test_receding_regularizer_gradient():
    w = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    lam, b = 1e-3, 3.0
    (lam * rni_penalty(w, b)).backward()
    s = torch.sigmoid(w.detach() + b)
    assert torch.allclose(w.grad, -lam * torch.log(s) * s * (1 - s), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("train_mode", [False, True])
def test_receding_conversion_leaves_outputs_unchanged(train_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(288))
    with torch.no_grad():  # a "trained" BN: signed scales, shifts, statistics
        for bn in (model[1], model[4]):
            bn.weight.copy_(torch.randn_like(bn.weight))
            bn.weight[0] = 0.0
            bn.bias.copy_(torch.randn_like(bn.bias))
            bn.running_mean.copy_(torch.randn_like(bn.running_mean))
            bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    x = torch.randn(4, 3, 8, 8)
    ref = copy.deepcopy(model).train(train_mode)(x)
    bounded = copy.deepcopy(model)
    assert to_bounded(bounded) == ["1", "4"]
    assert isinstance(bounded[1], BoundedBatchNorm)
    s = bounded[1].importance()
    assert float(s.max()) == pytest.approx(0.9) and float(s.min()) >= 1e-3 - 1e-9
    # In train mode the second BN divides by its batch's std (as low as 0.01 for some of the 288
    # features at batch 4), amplifying the first BN's float32 rounding (~5e-7) about 70x.
    tol = 1e-4 if train_mode else 1e-5
    assert torch.allclose(bounded.train(train_mode)(x), ref, atol=tol)
    back = copy.deepcopy(bounded)
    to_standard(back)
    assert type(back[1]) is nn.BatchNorm2d and type(back[4]) is nn.BatchNorm1d
    assert torch.allclose(back.train(train_mode)(x), ref, atol=tol)


def test_receding_channel_that_recedes_is_removable():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    b = BoundedBatchNorm(bn).eval()
    with torch.no_grad():
        b.weight[2] = -30.0  # sigmoid ~ 1e-13: receded
    y = b(torch.randn(2, 4, 3, 3))
    assert y[:, 2].abs().max() < 1e-9  # the shift recedes too: output 0, not beta


def test_slimming_adds_s_sign_gamma():
    model = tiny_cnn()
    hooks = SparsityHooks(model, 1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    hooks.after_backward(model, 0)
    assert torch.equal(model[1].weight.grad, 1e-4 * torch.sign(model[1].weight.detach()))
    assert model[0].weight.grad.abs().max() == 0 and model[1].bias.grad.abs().max() == 0
    assert hooks.size == pytest.approx(1e-4 * float(model[1].weight.detach().abs().sum() + model[4].weight.detach().abs().sum()))


# ---------------------------------------------------------------------------------------------
# End to end: every method trains, selects and slims a real (tiny) model


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("method", ["slimming", "greg1", "greg2", "tpp", "receding"])
def test_method_trains_selects_and_slims(method, frontend):
    """On either frontend's graph: the export frontend's BatchNorms are modules that train."""
    model = tiny_cnn()
    original = copy.deepcopy(model).eval()
    prog = pcompiler.trace(model, (torch.randn(2, 1, 6, 6),), frontend=frontend)
    opts = dict(data=tiny_data(), steps=60, train=QUIET)
    if method == "receding":
        opts.update(global_ranking=False, min_keep=1)
    prog = pcompiler.run(prog, [make_pass("analyze"), make_pass(method, ratio=0.5, **opts),
                                make_pass("slim"), make_pass("verify")])
    info = prog.info
    assert info["method_settings"]["steps_done"] <= 60 and info["regularization"]["steps"] == info["method_settings"]["steps_done"]
    assert len(info["regularization"]["curve"]) == info["method_settings"]["steps_done"]
    assert {"step", "loss", "acc", "lr", "penalty"} <= set(info["regularization"]["curve"][-1])
    assert sorted(len(v) for v in prog.selection.values()) == [3, 4]  # half of 6 and of 8
    assert prog.gm.get_parameter("0.weight").shape[0] == 3
    assert info["verify"]["ok"]
    # The input model is untouched: methods train a copy.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    if method == "receding":
        assert all(type(m) is not BoundedBatchNorm for m in prog.gm.modules())
        assert info["method_settings"]["lam_used"] > 1e-4  # the budget scaled lam up from 1e-4


def test_methods_need_data():
    prog = program()
    with pytest.raises(pcompiler.CompileError, match="needs data"):
        pcompiler.run(prog, [make_pass("tpp", ratio=0.5)])


def test_receding_selects_globally_by_importance():
    model = tiny_cnn()
    with torch.no_grad():  # start importances 0.9 * |gamma| / max |gamma|, all distinct
        model[1].weight.copy_(torch.tensor([6.0, 5, 4, 3, 2, 1]))
        model[4].weight.copy_(torch.arange(1, 9).float() + 0.3)
    prog = program(model)
    out = pcompiler.run(prog, [Receding(ratio=0.5, data=tiny_data(), steps=0, train=QUIET)])
    # The 7 (= ceil(0.5 * 14)) lowest of {k/6} and {(k + 0.3)/8.3} (x 0.9): 3 of the first BN, 4 of the second.
    assert out.selection[group_with(prog, "0.weight", 0).id] == (3, 4, 5)
    assert out.selection[group_with(prog, "3.weight", 0).id] == (0, 1, 2, 3)
    scores = out.scores[group_with(prog, "0.weight", 0).id]
    assert np.allclose(scores, 0.9 * np.array([6, 5, 4, 3, 2, 1]) / 6, atol=1e-6)


def test_receding_refuses_a_model_without_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(pcompiler.CompileError, match="no affine BatchNorm"):
        pcompiler.run(program(model), [Receding(ratio=0.5, data=tiny_data(), steps=5, train=QUIET)])


class TinyTransformer(nn.Module):
    """Tokens -> embedding -> self-attention (lowered to Linear layers) -> MLP -> mean -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x.flatten(1).unflatten(1, (6, 6)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("method", ["greg1", "tpp"])
def test_filter_methods_on_attention_and_mlp_widths(method):
    prog = pcompiler.trace(TinyTransformer(), (torch.randn(2, 1, 6, 6),))
    prog = pcompiler.run(prog, [make_pass("analyze"), make_pass(method, ratio=0.5, data=tiny_data(), steps=40, train=QUIET),
                                make_pass("slim"), make_pass("verify")])
    assert prog.info["verify"]["ok"] and prog.selection
    assert prog.gm.get_submodule("mlp.0").out_features == 16  # the MLP's hidden width halved


def test_receding_on_a_trained_model_polarizes_the_importances():
    """With the ratio as target, the lowest-ranked half of the channels recede below 0.05 while the
    rest stay above 0.5: two modes, and what is removed has receded."""
    torch.manual_seed(0)
    prog = program()
    out = pcompiler.run(prog, [Receding(ratio=0.5, data=tiny_data(), steps=300, train=QUIET, min_keep=1)])
    modes = out.info["method_settings"]["bimodality"]
    assert modes["receded"] >= 0.45 and modes["stayed"] >= 0.45 and modes["between"] <= 0.1
    for gid, chans in out.selection.items():
        assert (out.scores[gid][list(chans)] < 0.05).all()
    assert out.info["method_settings"]["lam_final"] > out.info["method_settings"]["lam_used"]  # lambda grew


def test_receding_from_scratch_reinitializes_and_uses_the_papers_fixed_lambda():
    prog = program()
    weight = prog.gm.get_parameter("0.weight").clone()
    m = Receding(ratio=0.5, data=tiny_data(), steps=0, train=QUIET, from_scratch=True)
    hooks = m.make_hooks(prog, budget=100, plan=None)
    assert not torch.equal(prog.gm.get_parameter("0.weight"), weight)  # drawn anew
    assert hooks.target is None and hooks.lam == pytest.approx(1e-3) and hooks.b == 3.0  # VGG-style: no adds
    bn = hooks.bounded[0]
    assert torch.equal(bn.scale, torch.ones_like(bn.scale)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
