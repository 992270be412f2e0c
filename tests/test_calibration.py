"""The calibration statistics (pcompiler/calibration.py) and the calib method
(passes/calibrated.py): what each consumer reads, measured on graphs of both frontends, and
scores that keep the channels that carry the most where weight magnitude would drop them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pcompiler
from pcompiler.calibration import calibrate, calibrate_runs, readers
from pcompiler.data import DataSource
from pcompiler.errors import CompileError
from pcompiler.passes.calibrated import reconstruction
from pcompiler.passes.compensate import RIDGE
from pcompiler.passmanager import make_pass

torch.set_num_threads(1)


def mlp() -> nn.Module:
    """Hidden channel 3's filter is tiny by magnitude (one weight of 1), but it reads input
    feature 0, which varies 100x more than the others: it carries most of the signal."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        m[0].weight[3] = 0.0
        m[0].weight[3, 0] = 1.0
        m[0].weight[:, 0][torch.arange(16) != 3] = 0.0
    return m


def inputs(n: int = 256) -> torch.Tensor:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    x[:, 0] *= 100
    return x


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_statistics_are_those_of_what_each_consumer_reads(frontend):
    prog = pcompiler.trace(mlp(), (inputs(4),), frontend=frontend)
    found = readers(prog.gm, {"0.weight", "2.weight"})
    assert set(found) == {"0.weight", "2.weight"}
    x = inputs()
    cal = calibrate(prog.gm, found, [(x[:100],), (x[100:],)], norms=True)
    hidden = torch.relu(mlp()[0](x)).double()
    stats = cal.stats["2.weight"]
    assert stats.rows == 256 and cal.batches == 2
    torch.testing.assert_close(stats.mean, hidden.mean(0))
    torch.testing.assert_close(stats.variance, hidden.var(0, unbiased=False))
    torch.testing.assert_close(stats.column_norms, mlp()[2].weight.double().square().sum(0))


def test_what_comes_after_the_last_input_a_reader_reads_is_not_run():
    """The last reader's own call and what follows it (a language model's head and its logits)
    change no statistic: calibration stops at the last input a reader reads, and the statistics
    are the same as the whole graph's."""
    model = nn.Sequential(*mlp(), nn.Softmax(-1))
    prog = pcompiler.trace(model, (inputs(4),), frontend="fx")
    calls = {name: 0 for name in ("0", "2", "3")}
    for name in calls:
        prog.gm.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    x = inputs()
    cal = calibrate(prog.gm, readers(prog.gm, {"0.weight", "2.weight"}), [(x[:100],), (x[100:],)])
    assert calls == {"0": 2, "2": 0, "3": 0}
    torch.testing.assert_close(cal.stats["2.weight"].mean, torch.relu(mlp()[0](x)).double().mean(0))


class ThreeReaders(nn.Module):
    """q, k and v read one input, as in an attention block; o reads their sum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(6, 3), nn.Linear(5, 2)

    def forward(self, x):
        return self.o(self.q(x) + self.k(x)) + self.v(x).sum(-1, keepdim=True)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_readers_of_one_input_share_its_statistics_and_the_covariance_survives_a_large_mean(frontend):
    """q, k and v's statistics are one measurement (the same tensors), each with its own column
    norms; the covariance, its float32 products taken on inputs shifted by the first batch's
    mean, matches float64's on inputs whose mean is 10^4 their spread."""
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x @ torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1e4
    prog = pcompiler.trace(ThreeReaders(), (x[:4].float(),), frontend=frontend)
    names = {"q.weight", "k.weight", "v.weight", "o.weight"}
    cal = calibrate(prog.gm, readers(prog.gm, names), [(x[:256].float(),), (x[256:].float(),)], norms=True,
                    grams={"q.weight"})
    q, k, v, o = (cal.stats[n] for n in ("q.weight", "k.weight", "v.weight", "o.weight"))
    assert q.gram is k.gram is v.gram and q.total is v.total and q.rows == v.rows == 512 and o.gram is None
    assert not torch.equal(q.column_norms, k.column_norms) and len(v.column_norms) == 6
    xf = x.float().double()  # what the model reads
    torch.testing.assert_close(q.covariance, torch.cov(xf.T, correction=0), rtol=1e-5, atol=1e-5 * float(xf.var(0).min()))


def test_calib_keeps_the_channel_that_carries_the_signal_where_l1_drops_it():
    x = inputs()
    data = DataSource("planted", torch.utils.data.TensorDataset(x, torch.zeros(256, dtype=torch.long)),
                      torch.utils.data.TensorDataset(x, torch.zeros(256, dtype=torch.long)), 4, (8,), None)
    prog = pcompiler.run(pcompiler.trace(mlp(), (x[:2],)), [make_pass("analyze")])
    kept = {}
    for method, options in (("l1", {}), *(("calib", {"data": data, "score": s, "samples": 64})
                                          for s in ("fluctuation", "wanda", "activation", "reconstruction"))):
        out = make_pass(method, ratio=0.5, round_to=1, **options).run(prog).program
        (gid,) = out.selection
        kept[options.get("score", method)] = 3 not in out.selection[gid]
    assert kept == {"l1": False, "fluctuation": True, "wanda": True, "activation": True, "reconstruction": True}


def test_calib_is_refused_without_data_and_its_options_elsewhere(tmp_path):
    from click.testing import CliRunner

    from pcompiler.cli import main

    path = tmp_path / "m.pt"
    torch.save(mlp(), path)
    for args, message in ((["--method", "calib"], "measures activations and needs --data"),
                          (["--method", "l1", "--data", "digits", "--calibration-samples", "8"], "--method calib"),
                          (["--method", "calib", "--data", "digits", "--reg-steps", "8"], "a method that trains")):
        result = CliRunner().invoke(main, [str(path), "--trust", "--ratio", "0.5", *args, "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, result.output
    with pytest.raises(CompileError, match="unknown score"):
        make_pass("calib", data=object(), score="taylor").check()


def _joint(w: torch.Tensor, cov: torch.Tensor, removed: list[int]) -> float:
    """tr(W_R S_R|K W_R^T): the expected squared output error of removing positions R when the
    kept ones predict them by least squares (S damped as the fold damps it)."""
    s = cov + RIDGE * float(cov.diagonal().mean()) * torch.eye(len(cov), dtype=cov.dtype)
    k = [i for i in range(len(cov)) if i not in removed]
    cond = s[removed][:, removed] - s[removed][:, k] @ torch.linalg.solve(s[k][:, k], s[k][:, removed])
    return float(torch.trace(w[:, removed] @ cond @ w[:, removed].T))


def test_reconstruction_scores_are_the_output_error_each_removal_adds_in_greedy_order():
    """Three channels of two positions each (heads): the first removed is the one whose removal
    costs least with the others refitting, at exactly that cost; the second's score is what it
    adds to the first's (or the first's, if less: scores rise with the order)."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64) @ mix
    cov = torch.cov(x.T, correction=0)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    index = torch.arange(6).reshape(3, 2).numpy()
    scores = reconstruction([(w, cov, index)], 3, steps=3)
    alone = [_joint(w, cov, list(index[c])) for c in range(3)]
    first = int(min(range(3), key=alone.__getitem__))
    assert scores[first] == pytest.approx(alone[first]) and scores.argmin() == first
    second = sorted(range(3), key=scores.__getitem__)[1]
    both = _joint(w, cov, [*index[first], *index[second]])
    assert scores[second] == pytest.approx(max(alone[first], both - alone[first]))


def test_reconstruction_removes_a_channel_the_others_predict_where_activation_keeps_it():
    """Inputs 1 and 5 are one large signal (5 = 2 x 1 plus a little noise); input 3 is small and
    independent. By activation, 3 goes first; by reconstruction, one of the copies goes first, at
    almost no cost, and 3 later."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=gen, dtype=torch.float64)
    x[:, 1] *= 10
    x[:, 5] = 2 * x[:, 1] + 0.01 * torch.randn(1000, generator=gen, dtype=torch.float64)
    x[:, 3] *= 0.5
    w = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    scores = reconstruction([(w, torch.cov(x.T, correction=0), torch.arange(8).reshape(8, 1).numpy())], 8, steps=8)
    assert int(scores.argmin()) in (1, 5)
    assert x.square().mean(0).argmin() == 3 and scores[3] > scores[1:6:4].min()


def test_runs_resume_where_the_last_stopped_on_a_traced_decoder():
    """calibrate_runs on a traced bfloat16 LLaMA, its weights in four runs: each run resumes
    each batch from the values the last one kept (the residual stream, rotary embeddings, the
    mask), the embedding runs once per batch, not once per run, and every statistic is the one
    a single run measures."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64))
    model = model.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 128, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.long)) for _ in range(3)]
    prog = pcompiler.trace(model, (), kwargs={"input_ids": batches[0][0], "attention_mask": batches[0][1]})
    names = list(readers(prog.gm, [n for n, p in prog.gm.named_parameters() if n.endswith("proj.weight")]))
    assert len(names) == 14
    runs = [names[:3], names[3:7], names[7:10], names[10:]]
    embedded = []
    embedding = next(m for m in prog.gm.modules() if isinstance(m, nn.Embedding))
    embedding.register_forward_hook(lambda *_: embedded.append(1))
    whole = calibrate(prog.gm, names, batches, dtype=torch.float32, grams=names)
    assert len(embedded) == 3
    parts = list(calibrate_runs(prog.gm, runs, lambda: batches, dtype=torch.float32, grams=names))
    assert len(embedded) == 6 and [len(p.stats) for p in parts] == [3, 4, 3, 4]
    for part in parts:
        assert part.batches == 3
        for name, stats in part.stats.items():
            torch.testing.assert_close(stats.total, whole.stats[name].total, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(stats.gram, whole.stats[name].gram, rtol=1e-6, atol=1e-6)
