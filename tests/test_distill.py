"""Distillation from the input model: the finetune and regularizing passes with a teacher, and the
--distill options of the command line. (The loss itself is tested with the loop, in test_train.py.)"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import pcompiler
from pcompiler.cli import main
from pcompiler.data import DataSource
from pcompiler.distill import Distillation
from pcompiler.passmanager import make_pass
from pcompiler.train import TrainConfig

pytestmark = pytest.mark.usefixtures("moves_allocate")  # every move allocates, as on a GPU: no pass may move what it was given

torch.set_num_threads(1)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits_resnet.pt"
CFG = TrainConfig(lr=0.05, batch_size=8, progress=False, log_every=5)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def data(n: int = 40) -> DataSource:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    ds = torch.utils.data.TensorDataset(torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float(), y)
    return DataSource("tiny", ds, ds, 3, (1, 6, 6), None)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_finetune_distills_from_the_input_model_and_records_the_settings():
    model = net()
    before = state(model)
    prog = pcompiler.trace(model, (torch.randn(2, 1, 6, 6),))
    passes = [make_pass("analyze"), make_pass("l1", ratio=0.5), make_pass("slim"),
              make_pass("finetune", data=data(), epochs=2, train=CFG, teacher=model)]
    info = pcompiler.run(prog, passes).info["finetune"]
    assert info["distill"] == {"temperature": Distillation.temperature, "alpha": Distillation.alpha}
    assert info["train"]["distill"] == info["distill"] and all("distill" in p for p in info["curve"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    plain = pcompiler.run(pcompiler.trace(net(), (torch.randn(2, 1, 6, 6),)), [*passes[:3], make_pass(
        "finetune", data=data(), epochs=2, train=CFG)]).info["finetune"]
    assert plain["distill"] is None and "distill" not in plain["curve"][0]


def test_regularization_distills_only_when_given_a_teacher():
    model = net()
    settings = Distillation(temperature=2.0, alpha=0.5)
    cfg = TrainConfig(**{**CFG.__dict__, "distill": settings})
    prog = pcompiler.run(pcompiler.trace(model, (torch.randn(2, 1, 6, 6),)), [make_pass("analyze")])
    out = pcompiler.run(prog, [make_pass("slimming", ratio=0.5, data=data(), steps=10, train=cfg, teacher=model)])
    method = out.info["method_settings"]
    assert method["teacher"] == "Sequential" and method["train"]["distill"] == {"temperature": 2.0, "alpha": 0.5}
    assert "distill" in out.info["regularization"]["curve"][-1]
    plain = pcompiler.run(prog, [make_pass("slimming", ratio=0.5, data=data(), steps=10, train=CFG)])
    assert plain.info["method_settings"]["teacher"] is None and plain.info["method_settings"]["train"]["distill"] is None


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_distill_on_digits_writes_the_settings_into_the_report(tmp_path):
    out = tmp_path / "out"
    result = invoke(EXAMPLE, "--method", "tpp", "--ratio", "0.5", "--data", "digits", "--reg-steps", "20",
                    "--finetune-epochs", "0.5", "--distill", "--distill-alpha", "0.5", "--distill-regularization",
                    "--no-progress", "--formats", "pt2", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["distill"] == {"temperature": Distillation.temperature, "alpha": 0.5,
                                             "finetune": True, "regularization": True}
    assert report["finetune"]["distill"] == {"temperature": Distillation.temperature, "alpha": 0.5}
    assert report["method_settings"]["train"]["distill"] == report["finetune"]["distill"]
    assert report["method_settings"]["teacher"] == "DigitsResNet"
    assert "distill" in report["regularization"]["curve"][-1] and "distill" in report["finetune"]["curve"][-1]
    assert report["acc_before"] == pytest.approx(358 / 360)  # the teacher was not trained along


@pytest.mark.parametrize("args, fragment", [
    (("--method", "l1", "--distill"), "--distill trains with the input model as teacher and needs --data"),
    (("--method", "l1", "--data", "digits", "--distill", "--finetune-epochs", "0"), "--finetune-epochs 0"),
    (("--method", "tpp", "--data", "digits", "--distill-regularization"), "--distill-regularization needs --distill"),
    (("--method", "l1", "--data", "digits", "--distill", "--distill-regularization"), "no regularization phase"),
    (("--method", "l1", "--data", "digits", "--distill", "--distill-temperature", "0"), "temperature must be > 0"),
    (("--method", "l1", "--data", "digits", "--distill", "--distill-alpha", "1.5"), "alpha must be in [0, 1]"),
    (("--method", "tpp", "--data", "digits", "-p", "teacher=x"), "its own option"),
])
def test_cli_distill_option_errors(tmp_path, args, fragment):
    result = invoke(EXAMPLE, "--ratio", "0.5", *args, "-o", tmp_path / "o")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
