"""The one training loop: determinism, the lr schedule, hooks, checkpoint/resume after a kill, and
DDP under torchrun against a single process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcompiler.data import DataSource, random_crop_flip
from pcompiler.distill import Distillation
from pcompiler.errors import CompileError
from pcompiler.inference import evaluate
from pcompiler.passes.select import Plan
from pcompiler.precision import FLOAT32_TINY, flushing_subnormals
from pcompiler.runtime import Runtime, copy_to
from pcompiler.train import Hooks, TrainConfig, _lr_factor, train

torch.set_num_threads(1)


def net(bn: bool = True, dropout: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(8)] if bn else []
    drop = [nn.Dropout(0.2)] if dropout else []  # draws from the global RNG: resume must restore it
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *norm, nn.ReLU(), *drop,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def data(n: int = 40, augment: bool = True) -> DataSource:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    ds = torch.utils.data.TensorDataset(x, y)
    aug = (lambda x, g: random_crop_flip(x, g, 1, True)) if augment else None
    return DataSource("tiny", ds, ds, 3, (1, 6, 6), aug)


CFG = TrainConfig(steps=30, lr=0.05, batch_size=8, progress=False, log_every=5, schedule="cosine")


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_same_seed_same_weights_and_another_seed_differs():
    a, b, c = net(), net(), net()
    train(a, data(), CFG)
    train(b, data(), CFG)
    train(c, data(), TrainConfig(**{**CFG.__dict__, "seed": 1}))
    assert same(a, b) and not same(a, c) and not same(a, net())


def test_curve_schedule_and_accuracy():
    model = net()
    result = train(model, data(), CFG)
    assert result.steps == 30 and [p["step"] for p in result.curve] == [5, 10, 15, 20, 25, 30]
    assert result.curve[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    assert result.curve[0]["lr"] == pytest.approx(0.05 * _lr_factor("cosine", 30)(5))
    assert _lr_factor("step", 100)(49) == 1 and _lr_factor("step", 100)(50) == pytest.approx(0.1)
    assert _lr_factor("step", 100)(75) == pytest.approx(0.01)
    assert all(0 <= p["acc"] <= 1 and p["loss"] > 0 for p in result.curve)
    assert evaluate(model, data().val) > 0.5  # it learned the (easy) classes


class Recorder(Hooks):
    """Counts hook calls, adds a loss term and a gradient penalty, stops at a step."""

    def __init__(self, stop_at: int | None = None):
        self.calls = {"loss_term": 0, "after_backward": 0, "after_step": 0}
        self.stop_at = stop_at

    def loss_term(self, model, step):
        self.calls["loss_term"] += 1
        return 0.0 * model[0].weight.sum()

    def after_backward(self, model, step):
        self.calls["after_backward"] += 1
        model[0].weight.grad.add_(model[0].weight.detach())  # an L2 penalty of 1

    def after_step(self, model, step):
        self.calls["after_step"] += 1
        return {"penalty": float(step)}

    def finished(self, step):
        return self.stop_at is not None and step >= self.stop_at

    def param_groups(self, model):
        return [{"params": [model[-1].weight], "lr_scale": 10.0, "weight_decay": 0.0}]


def test_hooks_are_called_each_step_and_can_stop_training():
    hooks = Recorder(stop_at=12)
    result = train(net(), data(), CFG, hooks)
    assert result.steps == 12 and hooks.calls == {"loss_term": 12, "after_backward": 12, "after_step": 12}
    assert result.curve[-1]["step"] == 12 and result.curve[-1]["penalty"] == pytest.approx(11.5)


def test_a_lazy_logged_value_is_computed_only_on_the_steps_that_log():
    computed = []

    class Lazy(Hooks):
        def after_step(self, model, step):
            return {"size": lambda: computed.append(step) or float(step), "plain": float(step)}

    result = train(net(), data(), TrainConfig(steps=12, batch_size=8, progress=False, log_every=5), Lazy())
    assert computed == [5, 10, 12]
    assert [(p["size"], p["plain"]) for p in result.curve] == [(5.0, 3.0), (10.0, 8.0), (12.0, 11.5)]


def test_gradient_penalty_and_param_groups_take_effect():
    a, b = net(bn=False), net(bn=False)
    train(a, data(augment=False), CFG)
    train(b, data(augment=False), CFG, Recorder())
    assert b[0].weight.norm() < a[0].weight.norm()  # the extra L2 shrank it


class Subnormals(Hooks):
    """Each step: halves the first conv's weights (as a growing penalty drives a pruned filter to 0)
    and records how many subnormal results a kernel split over torch's intra-op threads kept."""

    def __init__(self):
        self.kept: list[int] = []

    def after_step(self, model, step):
        with torch.no_grad():
            model[0].weight.mul_(0.5)
        self.kept.append(int(torch.full((1 << 20,), FLOAT32_TINY).mul_(0.5).count_nonzero()))
        return {}


def subnormal_count(*tensors: torch.Tensor) -> int:
    return sum(int(((t != 0) & (t.abs() < FLOAT32_TINY)).sum()) for t in tensors if t.is_floating_point())


def test_training_flushes_subnormals_in_every_thread_and_restores_the_setting():
    pytest.importorskip("sklearn.utils._openmp_helpers")  # a second OpenMP runtime beside torch's, as --data digits loads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one parallel kernel spans the calling thread and an OpenMP worker
    try:
        # the worker exists before training (threads started later would inherit the flags)
        assert int(torch.full((1 << 20,), FLOAT32_TINY).mul_(0.5).count_nonzero()) == 1 << 20
        model, hooks = net(dropout=False), Subnormals()
        with torch.no_grad():
            model[0].weight.mul_(1e-36)  # 200 halvings reach the subnormals, and then 0
        train(model, data(), TrainConfig(steps=200, lr=0.0, momentum=0.0, weight_decay=0.0, batch_size=8,
                                         progress=False), hooks)
        assert hooks.kept == [0] * 200  # no thread kept a subnormal result during training
        assert subnormal_count(*model.state_dict().values()) == 0 and not model[0].weight.any()
        # after it the flags are as before, on the calling thread and the workers alike
        assert not flushing_subnormals()
        assert int(torch.full((1 << 20,), FLOAT32_TINY).mul_(0.5).count_nonzero()) == 1 << 20
    finally:
        torch.set_num_threads(threads)


class Killed(Exception):
    pass


class KillAt(Hooks):
    """Raises at `step`, as if the process died there (after the checkpoint before it)."""

    def __init__(self, inner: Hooks, step: int):
        self.inner, self.step = inner, step

    def __getattribute__(self, name):
        if name in ("inner", "step", "after_step"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "inner"), name)

    def after_step(self, model, step):
        if step == self.step:
            raise Killed
        return self.inner.after_step(model, step)


def _greg_hooks(model):
    """GReg-1's hooks on `model` (a state that must survive the resume: lambda, ratios)."""
    import pcompiler
    from pcompiler.passes.greg1 import GReg1
    from pcompiler.passmanager import make_pass

    prog = pcompiler.run(pcompiler.trace(model, (torch.randn(2, 1, 6, 6),)), [make_pass("analyze")])
    prog.gm.train()
    return prog.gm, GReg1(ratio=0.5, data=data()).make_hooks(prog, budget=30, plan=Plan(ratio=0.5))


def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    cfg = TrainConfig(**{**CFG.__dict__, "checkpoint": ckpt, "checkpoint_every": 7})
    full, hooks = _greg_hooks(net())
    train(full, data(), cfg, hooks)
    lam_full = {g: v.clone() for g, v in hooks.lam.items()}

    os.remove(ckpt)
    part, hooks = _greg_hooks(net())
    with pytest.raises(Killed):
        train(part, data(), cfg, KillAt(hooks, 17))
    assert torch.load(ckpt, weights_only=False)["step"] == 14

    resumed, hooks = _greg_hooks(net())
    result = train(resumed, data(), TrainConfig(**{**cfg.__dict__, "resume": True}), hooks)
    assert result.resumed_from == 14 and result.steps == 30
    assert same(resumed, full)
    assert all(torch.equal(lam_full[g], hooks.lam[g]) for g in lam_full)
    assert [p["step"] for p in result.curve] == [5, 10, 15, 20, 25, 30]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    cfg = TrainConfig(**{**CFG.__dict__, "checkpoint": ckpt, "checkpoint_every": 10})
    train(net(), data(), cfg)
    with pytest.raises(CompileError, match="lr 0.05 -> 0.1"):
        train(net(), data(), TrainConfig(**{**cfg.__dict__, "resume": True, "lr": 0.1}))


def test_batch_must_split_evenly_and_bad_options_are_errors():
    with pytest.raises(CompileError, match="schedule"):
        train(net(), data(), TrainConfig(schedule="linear"))
    with pytest.raises(CompileError, match="checkpoint path"):
        train(net(), data(), TrainConfig(checkpoint_every=5))


# ---------------------------------------------------------------------------------------------
# Distillation from a teacher


def test_distillation_loss_is_the_formula_and_its_gradient_is_the_step():
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 3).double(), nn.Linear(5, 3).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    d = Distillation(temperature=3.0, alpha=0.7)
    cfg = TrainConfig(steps=1, lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=12, log_every=1,
                      progress=False, distill=d)
    # By hand: the whole data set is the one batch (a mean does not depend on the order).
    w = student.weight.detach().clone().requires_grad_()
    z_s, z_t = F.linear(x, w, student.bias.detach()), teacher(x).detach()
    ce = -z_s.log_softmax(1)[torch.arange(12), y].mean()
    p_t = (z_t / 3).softmax(1)
    kl = (p_t * (p_t.log() - (z_s / 3).log_softmax(1))).sum(1).mean()
    objective = 0.3 * ce + 0.7 * 9 * kl
    objective.backward()

    result = train(student, DataSource("tiny", ds, ds, 3, (5,), None), cfg, teacher=teacher)
    point = result.curve[0]
    assert point["loss"] == pytest.approx(ce.item(), rel=1e-6) and point["distill"] == pytest.approx(9 * kl.item(), rel=1e-6)
    assert torch.allclose(student.weight, w.detach() - 0.1 * w.grad, atol=1e-6, rtol=0)


def test_alpha_zero_is_bitwise_the_run_without_teacher():
    teacher = net()
    teacher[0].weight.data.mul_(3.0)  # a teacher unlike the student
    a, b = net(), net()
    train(a, data(), CFG)
    train(b, data(), TrainConfig(**{**CFG.__dict__, "distill": Distillation(alpha=0.0)}), teacher=teacher)
    assert same(a, b)


def test_teacher_is_neither_trained_nor_moved_nor_left_in_eval_mode():
    teacher, before = net(), net()
    teacher.train()
    teacher[1].eval()  # a module in its own mode keeps it
    modes = [m.training for m in teacher.modules()]
    student = net(bn=True)
    student[0].weight.data.mul_(0.5)
    result = train(student, data(), TrainConfig(**{**CFG.__dict__, "distill": Distillation()}), teacher=teacher)
    assert same(teacher, before)  # weights and running statistics
    assert [m.training for m in teacher.modules()] == modes and modes.count(False) == 1
    assert all("distill" in p and p["distill"] >= 0 for p in result.curve)
    plain = net(bn=True)
    plain[0].weight.data.mul_(0.5)
    train(plain, data(), CFG)
    assert not same(student, plain)  # the teacher changed the training


@pytest.mark.parametrize("distill, teacher, match", [
    (Distillation(temperature=0.0), True, "temperature must be > 0"),
    (Distillation(alpha=1.5), True, r"alpha must be in \[0, 1\]"),
    (Distillation(), False, "distill is set but teacher is not"),
    (None, True, "a teacher is set but TrainConfig.distill is not"),
])
def test_distillation_option_errors(distill, teacher, match):
    cfg = TrainConfig(**{**CFG.__dict__, "distill": distill})
    with pytest.raises(CompileError, match=match):
        train(net(), data(), cfg, teacher=net() if teacher else None)


def test_the_trained_model_cannot_be_its_own_teacher():
    model = net()
    with pytest.raises(CompileError, match="shares weights"):
        train(model, data(), TrainConfig(**{**CFG.__dict__, "distill": Distillation()}), teacher=model)


def test_resume_refuses_other_distillation_settings(tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "checkpoint": str(tmp_path / "c.pt"), "checkpoint_every": 10,
                         "distill": Distillation(alpha=0.5)})
    train(net(), data(), cfg, teacher=net())
    with pytest.raises(CompileError, match="distill"):
        train(net(), data(), TrainConfig(**{**cfg.__dict__, "resume": True, "distill": Distillation(alpha=0.9)}),
              teacher=net())


# ---------------------------------------------------------------------------------------------
# The command line, as users run it: a real kill, and torchrun


def _files(tmp_path: Path, bn: bool):
    model = net(bn, dropout=False)  # under torchrun each rank draws its own dropout masks
    torch.save(model, tmp_path / "model.pt")
    d = data(96, augment=False)
    x, y = d.train.tensors
    np.savez(tmp_path / "d.npz", x_train=x.numpy(), y_train=y.numpy(), x_val=x.numpy(), y_val=y.numpy())
    return tmp_path / "model.pt", f"npz:{tmp_path / 'd.npz'}"


def _cli(model, spec, out, *extra):
    return ["-m", "pcompiler.cli", str(model), "--method", "greg1", "--ratio", "0.5", "--data", spec,
            "--finetune-epochs", "2", "--batch-size", "16", "--lr", "0.01", "--formats", "pt", "--no-progress",
            "-o", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# Each also through torch.export: the methods then train the exported module (exported.py).
FRONTENDS = pytest.mark.parametrize("frontend", ["auto", "export"])


@pytest.mark.slow
@FRONTENDS
def test_cli_resume_after_sigkill(tmp_path, frontend):
    model, spec = _files(tmp_path, bn=True)
    steps = ["--reg-steps", "6000", "--checkpoint-every", "100", "--frontend", frontend]
    subprocess.run([sys.executable, *_cli(model, spec, tmp_path / "a", *steps)], check=True, env=ENV,
                   capture_output=True)
    ckpt = tmp_path / "b" / "checkpoints" / "regularization.pt"
    proc = subprocess.Popen([sys.executable, *_cli(model, spec, tmp_path / "b", *steps)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 6000 and not (tmp_path / "b" / "state_dict.pt").exists()
    out = subprocess.run([sys.executable, *_cli(model, spec, tmp_path / "b", *steps, "--resume")], env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    a = torch.load(tmp_path / "a" / "state_dict.pt")
    b = torch.load(tmp_path / "b" / "state_dict.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["regularization"]["resumed_from"] == killed_at
    assert report["frontend"] == ("fx" if frontend == "auto" else "export")


@pytest.mark.slow
@FRONTENDS
def test_torchrun_two_processes_match_one(tmp_path, frontend):
    model, spec = _files(tmp_path, bn=False)  # BatchNorm statistics are per process under DDP
    steps = ["--reg-steps", "40", "--frontend", frontend]
    one = subprocess.run([sys.executable, *_cli(model, spec, tmp_path / "one", *steps)], env=ENV,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *_cli(model, spec, tmp_path / "two", *steps)], env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "state_dict.pt")
    b = torch.load(tmp_path / "two" / "state_dict.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    import json

    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["regularization"]["world_size"] == 2
    assert report["frontend"] == ("fx" if frontend == "auto" else "export")
    assert not (tmp_path / "two" / "report.json.tmp").exists()


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_mixed_precision_trains_through_autocast_and_float16_through_a_grad_scaler(amp, monkeypatch):
    """Both AMP branches on CPU autocast, as --amp takes them on CUDA (bfloat16 from Ampere on,
    float16 with loss scaling before): the scaler's unscale comes before the hooks' penalty."""
    scalers = []
    make = Runtime.grad_scaler
    monkeypatch.setattr(Runtime, "grad_scaler", lambda self: scalers.append(make(self)) or scalers[-1])
    seen = []

    class Dtypes(Recorder):
        def loss_term(self, model, step):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().loss_term(model, step)

        def after_backward(self, model, step):
            super().after_backward(model, step)
            # unscaled: a scaled gradient would be 2**16 times as large (an overflow is inf, and skipped)
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            assert grads[grads.isfinite()].abs().max() < 100

    runtime = Runtime(amp=amp)
    model, hooks = net(), Dtypes()
    result = train(model, data(), CFG, hooks, runtime=runtime)
    assert result.steps == 30 and set(seen) == {amp} and hooks.calls["after_backward"] == 30
    assert all(np.isfinite(p["loss"]) for p in result.curve) and result.curve[-1]["loss"] < result.curve[0]["loss"]
    assert (scalers[0] is not None) == (amp == torch.float16)
    if amp == torch.float16:
        assert scalers[0].get_scale() > 0 and scalers[0]._enabled
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps float32 master weights


def test_amp_and_devices_are_decided_by_the_runtime():
    assert Runtime.resolve("cpu") == Runtime()
    with pytest.raises(CompileError, match="--amp needs a CUDA device"):
        Runtime.resolve("cpu", amp=True)
    with pytest.raises(CompileError, match="not a device"):
        Runtime.resolve("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CompileError, match="no CUDA device"):
            Runtime.resolve("cuda")
    with pytest.raises(ValueError, match="must live on meta"):
        train(net(), data(), CFG, runtime=Runtime(device=torch.device("meta")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_training_with_hooks_is_deterministic_and_leaves_cudnn_as_it_was():
    runtime = Runtime.resolve("cuda", amp=True)
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    a, b = copy_to(net(), runtime.device), copy_to(net(), runtime.device)
    ra = train(a, data(), CFG, Recorder(), runtime=runtime)
    train(b, data(), CFG, Recorder(), runtime=runtime)
    assert next(a.parameters()).device == runtime.device and ra.steps == 30
    assert same(a, b)
    assert all(np.isfinite(p["loss"]) for p in ra.curve)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == flags


FLAKY_DATA = '''
import os
import torch

class Flaky(torch.utils.data.Dataset):
    """Rank 1 fails on its 40th sample (its third step of 16): rank 0 then waits in an all-reduce."""

    def __init__(self, x, y, fail):
        self.x, self.y, self.fail, self.reads = x, y, fail, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        if self.fail and self.reads > 40 and os.environ.get("RANK") == "1":
            raise RuntimeError("rank 1's data went away")
        return self.x[i], int(self.y[i])

def data():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(96) % 3
    x = torch.randn(96, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    return Flaky(x, y, True), Flaky(x, y, False)
'''


@pytest.mark.slow
def test_torchrun_a_failing_rank_stops_the_others_promptly_with_its_error(tmp_path):
    model, _ = _files(tmp_path, bn=False)
    (tmp_path / "flaky.py").write_text(FLAKY_DATA)
    env = {**ENV, "PYTHONPATH": str(tmp_path), "PCOMPILER_DIST_TIMEOUT": "600"}
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *_cli(model, "py:flaky:data", tmp_path / "out", "--reg-steps", "200")],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode != 0
    assert "rank 1's data went away" in run.stderr
    assert time.time() - t0 < 120  # the collective timeout is 600 s: nobody waited for it


SLOW_MAIN = '''
import sys, time, torch
from torch import nn
from pcompiler import distributed
from pcompiler.data import DataSource
from pcompiler.runtime import Runtime
from pcompiler.train import TrainConfig, train

runtime = Runtime.resolve("cpu")
x, y = torch.randn(64, 4), torch.arange(64) % 2
ds = torch.utils.data.TensorDataset(x, y)
model = nn.Linear(4, 2)
train(model, DataSource("t", ds, ds, 2, (4,), None), TrainConfig(steps=5, batch_size=16, progress=False), runtime=runtime)
distributed.release()  # as compile_model does once the passes are done
if runtime.is_main:
    time.sleep(float(sys.argv[1]))  # exports and a benchmark of a large model
distributed.finish()
print("rank", runtime.rank, "done")
'''


@pytest.mark.slow
def test_torchrun_the_other_ranks_do_not_wait_for_rank_0s_exports(tmp_path):
    (tmp_path / "slow_main.py").write_text(SLOW_MAIN)
    env = {**ENV, "PCOMPILER_DIST_TIMEOUT": "3"}  # rank 0's exports take longer than a collective may wait
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "slow_main.py"), "8"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 done" in run.stdout and "rank 1 done" in run.stdout
