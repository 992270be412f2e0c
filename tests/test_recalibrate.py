"""recalibrate: running statistics re-estimated on training batches, nothing else changed."""

import copy

import pytest
import torch
from helpers import analyze
from torch import nn

import pcompiler
from pcompiler.data import DataSource
from pcompiler.inference import recalibrate_norms
from pcompiler.passmanager import make_pass

pytestmark = pytest.mark.usefixtures("moves_allocate")  # every move allocates, as on a GPU: no pass may move what it was given


def data(n: int = 128) -> DataSource:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, 5, 5, generator=g) * 3 + 1
    ds = torch.utils.data.TensorDataset(x, torch.arange(n) % 2)
    return DataSource("tiny", ds, ds, 2, (2, 5, 5), None)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    with torch.no_grad():  # statistics that belong to some other data
        model[1].running_mean.fill_(7.0)
        model[1].running_var.fill_(0.01)
    return model.eval()


def test_statistics_are_the_data_statistics_of_the_batches():
    model, d = net(), data()
    assert recalibrate_norms(model, d.train, batches=2, batch_size=64) == 1
    x = d.train.tensors[0]
    z = model[0](x)  # everything the BN saw: 2 batches of 64 = the whole set, in some order
    bn = model[1]
    assert torch.allclose(bn.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    # the running variance averages the batches' unbiased variances
    order = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    per_batch = [z[order[i:i + 64]].transpose(0, 1).reshape(4, -1).var(1) for i in (0, 64)]
    assert torch.allclose(bn.running_var, sum(per_batch) / 2, rtol=1e-4)
    assert bn.momentum == 0.1 and not model.training and not bn.training  # restored


def test_same_batches_same_statistics_and_weights_untouched():
    a, b = net(), net()
    weights = copy.deepcopy(a.state_dict())
    recalibrate_norms(a, data().train, batches=1, batch_size=32, seed=5)
    recalibrate_norms(b, data().train, batches=1, batch_size=32, seed=5)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in weights)
    assert all(torch.equal(a.state_dict()[k], weights[k]) for k in weights if "running" not in k and "tracked" not in k)


def test_pass_recalibrates_a_copy_and_records_it():
    prog = analyze(net(), torch.randn(1, 2, 5, 5))
    before = prog.gm.get_buffer("1.running_mean").clone()
    out = pcompiler.run(prog, [make_pass("recalibrate", data=data(), batches=2)])
    assert torch.equal(prog.gm.get_buffer("1.running_mean"), before)  # the input Program is unchanged
    assert not torch.allclose(out.gm.get_buffer("1.running_mean"), before)
    assert out.info["recalibration"] == {"norms": 1, "batches": 2, "batch_size": 64}
    assert out.history[-1].changed


def test_pass_needs_data_and_a_model_without_running_statistics_is_unchanged():
    prog = analyze(net(), torch.randn(1, 2, 5, 5))
    with pytest.raises(pcompiler.CompileError, match="recalibrate needs data"):
        pcompiler.run(prog, [make_pass("recalibrate")])
    plain = analyze(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3))
    ds = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    out = pcompiler.run(plain, [make_pass("recalibrate", data=DataSource("t", ds, ds, 2, (3,), None))])
    assert out.info["recalibration"]["norms"] == 0 and not out.history[-1].changed
