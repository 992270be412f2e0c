"""Tests of the compensate pass and of what verify compares after it: removing dead channels whose
output is a constant (a BN shift through ReLU) leaves the original model's outputs unchanged
when the consumer is a Linear or an unpadded conv; a zero-padded conv differs only at its
borders and verify reports that deviation; with data, near-constant channels are folded and
varying ones are not; consumers that cannot take a fold are skipped with a reason; a wrong fold
fails verify; the input Program is left as it was."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import analyze, check_modules, group_with, outputs
from test_analyze import Chain
from torch import nn

import pcompiler
from pcompiler.data import DataSource
from pcompiler.errors import PassError, VerifyError
from pcompiler.passes import compensate
from pcompiler.passes.verify import verify_program
from pcompiler.passmanager import make_pass
from pcompiler.report import build_report

pytestmark = pytest.mark.usefixtures("moves_allocate")  # every move allocates, as on a GPU: no pass may move what it was given

IMG = torch.randn(2, 3, 8, 8)
DEAD = [1, 3, 5, 7]


def kill(producer: nn.Module, norm: nn.Module, dead: list[int]) -> None:
    """Zero the producer's rows `dead`; give the norm a positive shift and random statistics, so
    the dead channels output relu(shift - scale * mean / std) > 0."""
    torch.manual_seed(0)
    with torch.no_grad():
        producer.weight[dead] = 0.0
        if producer.bias is not None:
            producer.bias[dead] = 0.0
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(0.5, 1.0)
        norm.running_mean.uniform_(-0.3, 0.3)
        norm.running_var.uniform_(0.5, 2.0)


def bn_constant(bn: nn.BatchNorm2d | nn.BatchNorm1d, dead: list[int]) -> torch.Tensor:
    """relu(BN(0)) of the dead channels, by hand."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return torch.relu(bn.bias - scale * bn.running_mean)[dead].detach().double()


def slimmed(model: nn.Module, x: torch.Tensor, remove: dict[str, list[int]]):
    """trace -> analyze -> select `remove` (producer weight -> channels) -> slim."""
    prog = analyze(model.eval(), x)
    selection = {group_with(prog, param, 0).id: tuple(ch) for param, ch in remove.items()}
    return pcompiler.run(prog.replace(selection=selection), [make_pass("slim")])


def compensated(model: nn.Module, x: torch.Tensor, remove: dict[str, list[int]], **options):
    return pcompiler.run(slimmed(model, x, remove), [make_pass("compensate", **options), make_pass("verify")])


def same_outputs(a: nn.Module, b: nn.Module, *xs: torch.Tensor, tol: float = 1e-5) -> bool:
    return all((ga - gb).abs().max() <= tol for x in xs for ga, gb in zip(outputs(a, (x,)), outputs(b, (x,)), strict=True))


def pooled_head() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    kill(model[0], model[1], DEAD)
    return model.eval()


def test_dead_channels_fold_exactly_into_a_linear_after_global_pooling():
    model = pooled_head()
    original = copy.deepcopy(model)
    prog = compensated(model, IMG, {"0.weight": DEAD})
    (fold,) = prog.compensation.folds
    assert (fold.module, fold.positions.tolist(), fold.exact) == ("5", DEAD, True)
    np.testing.assert_allclose(fold.constants, bn_constant(original[1], DEAD).numpy(), rtol=1e-6)
    assert not fold.rel_std.any() and prog.compensation.skipped == ()
    assert (prog.gm.get_submodule("5").in_features, prog.gm.get_submodule("0").out_channels) == (4, 4)
    assert same_outputs(prog.gm, original, IMG, torch.randn(5, 3, 8, 8))  # the unpruned model's function
    assert not same_outputs(slimmed(copy.deepcopy(original), IMG, {"0.weight": DEAD}).gm, original, IMG)
    v = prog.info["verify"]
    assert v["ok"] is True and "approximate" not in v
    assert v["reference"] == ("original with the removed channels zeroed and 4 compensated channel inputs (at 5) "
                              "replaced by their constants")
    info = prog.info["compensation"]
    assert (info["folded"], info["exact"], info["approximate"]) == (4, 4, 0)
    assert info["consumers"]["5"]["kind"] == "Linear" and [r.changed for r in prog.history][-2:] == [True, False]
    report = build_report(prog)
    assert report["compensation"]["folded"] == 4 and json.dumps(report)


class TwoHeads(nn.Module):
    """conv -> BN -> ReLU -> (1x1 conv, padded 3x3 conv)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.h1, self.h3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        return self.h1(y), self.h3(y)


def two_heads() -> TwoHeads:
    model = TwoHeads()
    kill(model.a, model.bn, DEAD)
    return model.eval()


def test_1x1_conv_is_exact_and_padded_3x3_is_approximate_at_the_borders():
    model = two_heads()
    original = copy.deepcopy(model)
    prog = compensated(model, IMG, {"a.weight": DEAD})
    assert {f.module: f.exact for f in prog.compensation.folds} == {"h1": True, "h3": False}
    v = prog.info["verify"]
    assert v["ok"] is True and v["max_relative_error"] < 1e-5
    assert v["approximate"]["where"] == ["h3"] and v["approximate"]["max_error"] > 1e-3
    assert v["reference"].endswith("(the slim model without its 1 approximate folds)")
    x = torch.randn(3, 3, 8, 8)
    (g1, g3), (w1, w3) = outputs(prog.gm, (x,)), outputs(original, (x,))
    torch.testing.assert_close(g1, w1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g3[..., 1:-1, 1:-1], w3[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    border = (g3 - w3).abs().amax((0, 1))
    assert border[0].min() > 1e-3 and border[:, -1].min() > 1e-3
    assert prog.info["compensation"]["approximate"] == 4


def test_linear_batchnorm1d_relu_linear_is_exact():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    kill(model[0], model[1], DEAD)
    original = copy.deepcopy(model.eval())
    z = torch.randn(4, 5)
    prog = compensated(model, z, {"0.weight": DEAD})
    (fold,) = prog.compensation.folds
    np.testing.assert_allclose(fold.constants, bn_constant(original[1], DEAD).numpy(), rtol=1e-6)
    assert fold.exact and prog.gm.get_submodule("3").in_features == 4
    assert same_outputs(prog.gm, original, z, torch.randn(7, 5))


def tiny_data(n: int = 64) -> DataSource:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3)
    return DataSource("tiny", ds, ds, 3, (3, 8, 8), None)


def test_with_data_near_constant_channels_are_folded_and_varying_ones_not():
    model = pooled_head()
    with torch.no_grad():
        model[0].weight[2] = 1e-4 * torch.randn(3, 3, 3)  # near-constant after BN and pooling
    without = compensated(copy.deepcopy(model), IMG, {"0.weight": [1, 2, 3, 4]})
    assert without.compensation.folds[0].positions.tolist() == [1, 3]  # only the exact ones
    assert without.info["compensation"]["consumers"]["5"]["not_constant"] == 2
    prog = compensated(model, IMG, {"0.weight": [1, 2, 3, 4]}, data=tiny_data(), batches=2, batch_size=16)
    (fold,) = prog.compensation.folds
    assert fold.positions.tolist() == [1, 2, 3]  # channel 4 is a live filter: it varies
    assert fold.rel_std[1] > 0 and fold.rel_std[[0, 2]].tolist() == [0.0, 0.0] and fold.rel_std.max() <= 1e-2
    summary = prog.info["compensation"]["consumers"]["5"]
    assert summary["not_constant"] == 1 and summary["min_rel_std_not_folded"] > 1e-2
    assert prog.info["compensation"]["source"] == "2 batches of 16 from the training data, tol 0.01"
    assert prog.info["verify"]["ok"] is True and "3 compensated channel inputs" in prog.info["verify"]["reference"]


def test_depthwise_convs_carry_the_constant_to_the_next_consumer():
    def model(padding: int) -> nn.Module:
        m = Chain(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(),
                  nn.Conv2d(8, 8, 3, padding=padding, groups=8)), nn.Conv2d(8, 4, 1))
        kill(m.a, m.mid[0], DEAD)
        return m.eval()

    unpadded = model(0)
    prog = compensated(copy.deepcopy(unpadded), IMG, {"a.weight": DEAD})
    assert [f.module for f in prog.compensation.folds] == ["h"]  # the depthwise conv went with the group
    assert same_outputs(prog.gm, unpadded, IMG, torch.randn(3, 3, 8, 8))
    padded = compensated(model(1), IMG, {"a.weight": DEAD})  # its borders differ: not a constant
    assert padded.compensation.folds == () and padded.info["compensation"]["consumers"]["h"]["not_constant"] == 4


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.fc = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.up = nn.ConvTranspose1d(8, 2, 2)

    def forward(self, z):
        y = torch.relu(self.bn(self.a(z)))
        return F.linear(y, self.fc.weight, self.fc.bias), self.up(y[:, :, None])


def test_functional_consumers_take_folds_and_others_are_skipped_with_a_reason():
    """F.linear on a weight (as torch.export leaves every Linear) takes the fold into a bias the
    graph now reads; a transposed conv cannot take one, and says so."""
    model = Functional()
    kill(model.a, model.bn, DEAD)
    original = copy.deepcopy(model.eval())
    prog = compensated(model, torch.randn(4, 5), {"a.weight": DEAD})
    (fold,) = prog.compensation.folds
    assert (fold.module, fold.positions.tolist(), fold.exact, fold.conv) == ("fc", DEAD, True, False)
    torch.testing.assert_close(torch.as_tensor(fold.constants), bn_constant(original.bn, DEAD))
    assert dict(prog.compensation.skipped) == {
        "up.weight": "a ConvTranspose1d consumes it: only Linear and Conv (groups 1) consumers are folded into"}
    assert prog.info["compensation"]["skipped"] == dict(prog.compensation.skipped)
    assert prog.info["verify"]["ok"] and "4 compensated channel inputs (at fc)" in prog.info["verify"]["reference"]
    z = torch.randn(6, 5)
    torch.testing.assert_close(prog.gm(z)[0], original(z)[0], rtol=1e-5, atol=1e-5)  # the linear head: unchanged


def test_a_consumer_without_bias_gets_one_of_its_slim_width():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    kill(model[0], model[1], DEAD)
    kill(model[3], model[4], [1, 4])  # its own outputs 1 and 4 are dead too
    original = copy.deepcopy(model.eval())
    prog = compensated(model, IMG, {"0.weight": DEAD, "3.weight": [1, 4]})
    assert prog.reference.get_submodule("3").bias is None and prog.gm.get_submodule("3").bias.shape == (4,)
    want = compensate.bias_delta(original[3], np.array(DEAD), bn_constant(original[1], DEAD).numpy())[[0, 2, 3, 5]]
    torch.testing.assert_close(prog.gm.get_submodule("3").bias.double(), want, rtol=1e-5, atol=1e-6)
    assert {f.module for f in prog.compensation.folds} == {"3", "6"}
    check_modules(prog.gm)
    assert same_outputs(prog.gm, original, IMG, torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("make, consumer", [(pooled_head, "0.weight"), (two_heads, "a.weight")])
def test_a_wrong_fold_fails_verify(monkeypatch, make, consumer):
    right = compensate.fold

    def twice(gm, reference, removal, f):
        right(gm, reference, removal, f)
        right(gm, reference, removal, f)

    monkeypatch.setattr(compensate, "fold", twice)
    prog = pcompiler.run(slimmed(make(), IMG, {consumer: DEAD}), [make_pass("compensate")])
    with pytest.raises(VerifyError, match=r"compensated channel inputs .* replaced by their constants.*: error .* beyond .*first "
                                          r"difference at node") as err:
        verify_program(prog)
    assert err.value.exit_code == 3
    with pytest.raises(PassError, match="pass 'verify' failed") as err:
        pcompiler.run(prog, [make_pass("verify")])
    assert err.value.exit_code == 3


def test_the_input_program_is_left_as_it_was():
    prog = slimmed(two_heads(), IMG, {"a.weight": DEAD})
    state = {k: v.clone() for k, v in prog.gm.state_dict().items()}
    out = pcompiler.run(prog, [make_pass("compensate")])
    assert out.gm is not prog.gm and out.compensation is not None
    assert prog.compensation is None and "compensation" not in prog.info and len(prog.history) == 2
    assert all(torch.equal(v, prog.gm.state_dict()[k]) for k, v in state.items()) and prog.gm.h1.bias.shape == (4,)
    assert not any(m._forward_pre_hooks for m in prog.reference.modules())
    assert not any(m.training for m in prog.reference.modules())
    with pytest.raises(PassError, match="compensate already ran on this program"):
        pcompiler.run(out, [make_pass("compensate")])
    with pytest.raises(PassError, match=r"batches \(0\) and batch_size \(64\) must be at least 1"):
        pcompiler.run(prog, [make_pass("compensate", data=tiny_data(), batches=0)])


def test_with_mean_every_removed_channels_mean_is_folded_and_the_output_moves_less():
    """FLAP's bias compensation: a varying channel's mean input goes into the consumer's bias (a
    fold exact in expectation: verify proves the rewrite without it and reports its effect);
    on the data the slim model's outputs then sit closer to the original's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(1.0)  # every hidden channel has a clearly positive mean
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(2))
    data = DataSource("tiny", torch.utils.data.TensorDataset(x, torch.zeros(256, dtype=torch.long)),
                      torch.utils.data.TensorDataset(x, torch.zeros(256, dtype=torch.long)), 3, (6,), None)
    errors = {}
    for mean in (False, True):
        prog = compensated(copy.deepcopy(model), x[:2], {"0.weight": [0, 2, 5]}, data=data, batches=4, batch_size=64,
                           fit="mean" if mean else "constant")
        with torch.no_grad():
            errors[mean] = float((prog.gm(x) - model(x)).square().mean())
        consumer = prog.info["compensation"]["consumers"]["2"]
        assert consumer.get("mean_folded", 0) == (3 if mean else 0) and consumer["folded"] == 0
        assert prog.info["verify"]["ok"] and ("approximate" in prog.info["verify"]) == mean
    (fold,) = prog.compensation.folds
    hidden = torch.relu(model[0](x))[:, [0, 2, 5]].double().mean(0)
    torch.testing.assert_close(torch.as_tensor(fold.constants), hidden, rtol=1e-6, atol=1e-6)
    assert fold.exact is False and errors[True] < 0.5 * errors[False]


def _correlated(n: int, conv: bool = False) -> tuple[nn.Module, torch.Tensor, DataSource]:
    """A model whose hidden channels 0, 2 and 5 are mostly linear in the others: inputs in a
    3-dim subspace of 6 dims (plus a little noise), a first layer without its nonlinearity."""
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(3, 6, generator=g)
    x = torch.randn(n, 3, generator=g) @ basis + 0.05 * torch.randn(n, 6, generator=g) + 0.5
    if conv:
        x = x[:, :, None, None].expand(n, 6, 5, 5) + 0.05 * torch.randn(n, 6, 5, 5, generator=g)
        model = nn.Sequential(nn.Conv2d(6, 8, 1), nn.Conv2d(8, 3, 3), nn.Flatten())
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    torch.manual_seed(0)
    for m in model:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    data = DataSource("tiny", torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long)),
                      torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long)), 3, tuple(x.shape[1:]), None)
    return model.eval(), x, data


@pytest.mark.parametrize("conv", [False, True])
def test_least_squares_predicts_the_removed_inputs_from_the_kept_ones(conv):
    """--compensate lstsq: the removed channels' inputs, predicted by least squares from the kept
    ones, move into the consumer's kept weight columns and bias. On data from the same
    distribution the output error falls far below the mean fold's; verify proves the rewrite
    with the fold taken out (weights and bias) and reports the slim model against the reference
    whose removed inputs read as their predictions: equal up to rounding, for a Linear and for a
    3x3 conv without padding alike."""
    model, x, data = _correlated(512, conv)
    errors, progs = {}, {}
    for fit in ("mean", "lstsq"):
        prog = compensated(copy.deepcopy(model), x[:2], {"0.weight": [0, 2, 5]}, data=data, batches=4, batch_size=64,
                           fit=fit)
        with torch.no_grad():
            errors[fit] = float((prog.gm(x) - model(x)).square().mean())
        progs[fit] = prog
    prog = progs["lstsq"]
    consumer = prog.info["compensation"]["consumers"]["1"]
    assert consumer["fitted"] == 3 and consumer["variance_explained"] > 0.9
    (fold,) = prog.compensation.folds
    assert fold.predict.shape == (3, 5) and list(fold.sources) == [1, 3, 4, 6, 7] and not fold.exact
    assert errors["lstsq"] < 0.05 * errors["mean"]
    verified = prog.info["verify"]
    assert verified["ok"] and verified["approximate"]["max_error"] < 1e-4
    # The kept weight columns changed by W[:, removed] @ predict; taking the fold out restores them.
    w = model[1].weight.detach().double()
    expected = w[:, [1, 3, 4, 6, 7]] + torch.einsum("or...,rk->ok...", w[:, [0, 2, 5]], torch.as_tensor(fold.predict).double())
    torch.testing.assert_close(prog.gm.get_submodule("1").weight.double(), expected, rtol=1e-5, atol=1e-6)


def test_verify_fails_when_a_least_squares_fold_is_applied_wrong():
    """The fold verify takes out must be the one applied: a slim model whose weight change is
    doubled fails verify (the check is not vacuous)."""
    model, x, data = _correlated(512)
    prog = compensated(model, x[:2], {"0.weight": [0, 2, 5]}, data=data, batches=4, batch_size=64, fit="lstsq")
    (fold,) = prog.compensation.folds
    broken = compensate.weight_delta(prog.reference, prog.removal, fold)
    compensate.add_to_weight(prog.gm.get_submodule("1"), broken)
    with pytest.raises(VerifyError):
        verify_program(prog)


def test_least_squares_over_several_runs_fits_the_same(monkeypatch):
    """Second moments over the memory budget are measured in several runs over the same seeded
    batches: the fits are the same as in one run."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    _, x, data = _correlated(256)
    remove = {"0.weight": [0, 2], "1.weight": [1, 5]}
    one = compensated(copy.deepcopy(model), x[:2], remove, data=data, batches=2, batch_size=64, fit="lstsq")
    monkeypatch.setattr(compensate, "GRAM_BYTES", 8 * 8 * 8)  # one 8-input consumer per run
    two = compensated(copy.deepcopy(model), x[:2], remove, data=data, batches=2, batch_size=64, fit="lstsq")
    assert one.info["compensation"]["runs"] == 1 and two.info["compensation"]["runs"] == 2
    for a, b in zip(one.compensation.folds, two.compensation.folds, strict=True):
        np.testing.assert_allclose(a.predict, b.predict, rtol=1e-6, atol=1e-7)


def test_a_runs_second_moments_are_let_go_before_the_next_run_measures(monkeypatch):
    """Several runs keep one run's matrices alive at a time: each run's consumers are fitted, and
    its statistics dropped, before the next run (at 7B, 33 runs' 61 GiB held together would be
    more than the machine's memory, which is why there are runs)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    _, x, data = _correlated(256)
    monkeypatch.setattr(compensate, "GRAM_BYTES", 8 * 8 * 8)  # one 8-input consumer per run
    real, earlier, alive = compensate.calibrate_runs, [], []

    def watched(*args, **kwargs):
        for out in real(*args, **kwargs):
            gc.collect()
            alive.append(sum(ref() is not None for ref in earlier))
            earlier.extend(weakref.ref(s) for s in out.stats.values())
            yield out
            del out

    monkeypatch.setattr(compensate, "calibrate_runs", watched)
    prog = compensated(model, x[:2], {"0.weight": [0, 2], "1.weight": [1, 5]}, data=data, batches=2, batch_size=64,
                       fit="lstsq")
    assert prog.info["compensation"]["runs"] == 2 and alive == [0, 0]
    assert [f.module for f in prog.compensation.folds] == ["1", "2"] and all(f.predict is not None
                                                                            for f in prog.compensation.folds)


def test_the_runs_share_one_pass_over_the_batches(monkeypatch):
    """Three runs, each resuming each batch where the last stopped: every layer runs once per
    batch (three passes from the start would run the first layer three times), and the fits
    are those of one run."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    _, x, data = _correlated(256)
    remove = {"0.weight": [0, 2], "1.weight": [1, 5], "2.weight": [3]}
    one = compensated(copy.deepcopy(model), x[:2], remove, data=data, batches=2, batch_size=64, fit="lstsq")
    monkeypatch.setattr(compensate, "GRAM_BYTES", 8 * 8 * 8)  # one 8-input consumer per run
    calls, measuring, real = {}, [False], compensate.calibrate_runs

    def counted(*args, **kwargs):
        measuring[0] = True
        yield from real(*args, **kwargs)
        measuring[0] = False

    monkeypatch.setattr(compensate, "calibrate_runs", counted)
    def count(name: str) -> None:
        if measuring[0]:
            calls[name] = calls.get(name, 0) + 1

    for name, m in model.named_children():
        m.register_forward_hook(lambda mod, args, out, name=name: count(name))
    three = compensated(model, x[:2], remove, data=data, batches=2, batch_size=64, fit="lstsq")
    assert one.info["compensation"]["runs"] == 1 and three.info["compensation"]["runs"] == 3
    assert calls == {"0": 2, "1": 2, "2": 2}  # 2 batches; the head "3" reads no measured input: never run
    for a, b in zip(one.compensation.folds, three.compensation.folds, strict=True):
        np.testing.assert_allclose(a.predict, b.predict, rtol=1e-6, atol=1e-7)


class _Fan(nn.Module):
    """Two layers read one hidden input, as q, k and v read a block's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + self.c(h)


def test_readers_of_one_input_go_in_one_run_and_count_one_matrix(monkeypatch):
    """b and c read one input: with room for one 8-input matrix per run, their fits take one run
    (one shared measurement), and are the ones of an unlimited budget."""
    _, x, data = _correlated(256)
    remove = {"a.weight": [0, 2, 5]}
    one = compensated(_Fan().eval(), x[:2], remove, data=data, batches=2, batch_size=64, fit="lstsq")
    monkeypatch.setattr(compensate, "GRAM_BYTES", 8 * 8 * 8)
    tight = compensated(_Fan().eval(), x[:2], remove, data=data, batches=2, batch_size=64, fit="lstsq")
    assert one.info["compensation"]["runs"] == tight.info["compensation"]["runs"] == 1
    assert {f.module for f in tight.compensation.folds} == {"b", "c"}
    for a, b in zip(one.compensation.folds, tight.compensation.folds, strict=True):
        np.testing.assert_allclose(a.predict, b.predict, rtol=1e-6, atol=1e-7)


def test_least_squares_on_a_bfloat16_model_is_proved():
    """A bfloat16 consumer's folded weight is rounded to bfloat16; verify takes the fold out by
    restoring the reference's own slice (after checking the slim weight is exactly that slice
    plus the fold), so the proof holds where subtracting the fold back would leave rounding."""
    model, x, _ = _correlated(512)
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    y = torch.zeros(len(x), dtype=torch.long)
    data = DataSource("tiny", torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x, y), 3, (6,), None)
    prog = compensated(model, x[:2], {"0.weight": [0, 2, 5]}, data=data, batches=4, batch_size=64, fit="lstsq")
    assert prog.info["verify"]["ok"] and prog.compensation.folds[0].predict is not None
    assert prog.gm.get_submodule("1").weight.dtype == torch.bfloat16
