"""Where tensors run, checked without a GPU: the `meta` device stands in for CUDA. A tensor left
on the CPU next to a meta one raises, as a CPU tensor next to a CUDA one does; a dispatch mode
sees every op of a training step and which devices its tensors are on."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import pcompiler
from pcompiler.data import DataSource
from pcompiler.errors import VerifyError
from pcompiler.passes.select import Plan
from pcompiler.passmanager import make_pass
from pcompiler.runtime import Runtime, copy_to, lives_on, placed
from pcompiler.train import Hooks, TrainConfig, train

torch.set_num_threads(1)
aten = torch.ops.aten
META = torch.device("meta")


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def test_copy_to_leaves_the_model_and_copies_every_tensor_once():
    model = cnn()
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    same_device = copy_to(model, "cpu")
    for k, v in same_device.state_dict().items():
        assert v.data_ptr() != before[k][0] and torch.equal(v, before[k][1]), k
    assert all(v.data_ptr() == before[k][0] for k, v in model.state_dict().items())
    assert placed(model, "cpu") is model and lives_on(model, "cpu") and not lives_on(model, META)
    on_meta = copy_to(model, META)
    assert lives_on(on_meta, META) and all(p.requires_grad for p in on_meta.parameters())
    assert on_meta(torch.zeros(2, 3, 8, 8, device=META)).shape == (2, 4)


class Constants(nn.Module):
    """What torch.export keeps out of `Module.to`'s reach: a plain tensor attribute (a lifted
    constant) and a factory op's device argument."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.c = torch.ones(4)

    def forward(self, x):
        return self.lin(x) * self.c + torch.arange(x.shape[1], device=x.device)[:4].float()


def _transformers():
    return pytest.importorskip("transformers")


def _llama():
    T = _transformers()
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, use_cache=False)
    return T.LlamaForCausalLM(cfg), (torch.randint(0, 96, (2, 8)),)


def _yolo():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    return tasks.DetectionModel("yolov8n.yaml", verbose=False), (torch.randn(1, 3, 64, 64),)


def _reloaded_pt2(tmp_path):
    from pcompiler.targets.pytorch import export_program

    model, args = Constants(), (torch.randn(2, 4),)
    prog = pcompiler.trace(model, args, frontend="export")
    assert export_program(prog, tmp_path / "model.pt2").ok
    return torch.export.load(tmp_path / "model.pt2").module(), args


# ---------------------------------------------------------------------------------------------
# No op of a training step mixes devices, and no step waits for the device


class DeviceAudit(TorchDispatchMode):
    """Records, per training step, the ops whose tensors sit on two devices (a 0-dim CPU tensor is a
    scalar, allowed), host-to-device copies, and device-to-host reads (`.item()`, `.cpu()`), which
    on CUDA make the host wait. On meta those reads return zeros, so the step runs on."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.events: dict[int, list[tuple]] = collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device == META:
            self.events[self.step].append(("read", str(func)))
            return False if args[0].dtype == torch.bool else 0
        if func is aten._to_copy.default:
            src, dst = args[0].device, torch.device(kwargs.get("device") or args[0].device)
            if src == META and dst.type == "cpu":
                self.events[self.step].append(("read", tuple(args[0].shape)))
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if src.type == "cpu" and dst == META and args[0].dim() > 0:
                self.events[self.step].append(("copy", tuple(args[0].shape)))
            return func(*args, **kwargs)
        devices = {t.device for t in pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            self.events[self.step].append(("mixed", str(func), sorted(map(str, devices))))
        return func(*args, **kwargs)


class Steps(Hooks):
    """Delegates to `inner`; tells the audit which step the events that follow belong to."""

    def __init__(self, inner: Hooks | None, audit: DeviceAudit):
        self.inner, self.audit = inner or Hooks(), audit

    def param_groups(self, model):
        return self.inner.param_groups(model)

    def loss_term(self, model, step):
        return self.inner.loss_term(model, step)

    def after_backward(self, model, step):
        self.inner.after_backward(model, step)

    def after_step(self, model, step):
        out = self.inner.after_step(model, step)
        self.audit.step = step
        return out

    def finished(self, step):
        return self.inner.finished(step)


@pytest.mark.parametrize("method", [None, "slimming", "greg1", "greg2", "tpp", "receding"])
def test_no_training_step_mixes_devices_or_waits_for_the_device(method):
    """The model and the hooks on `meta` as they would be on CUDA. Per step the only transfers are
    the batch's two tensors in; the methods' work every K_u = 10 steps (GReg's magnitude ratio,
    receding's ranking) and the log points may read from the device, nothing else."""
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    data = DataSource("tiny", ds, ds, 4, (3, 8, 8), None)
    prog = pcompiler.run(pcompiler.trace(cnn(), (torch.randn(1, 3, 8, 8),)), [make_pass("analyze")])
    runtime, steps = Runtime(device=META), 25
    cfg = TrainConfig(steps=steps, batch_size=16, progress=False, log_every=1000)
    audit = DeviceAudit()
    with audit:
        gm, hooks = copy_to(prog.gm, META), None
        if method is not None:  # built as the pass builds them: on the model already on the device
            opts = make_pass(method, ratio=0.5, data=data, train=cfg, runtime=runtime)
            hooks = opts.make_hooks(prog.replace(gm=gm, source=None), steps, Plan(ratio=0.5) if opts.selects_by_l1 else None)
        audit.events.clear()
        train(gm, data, cfg, Steps(hooks, audit), runtime=runtime)
    mixed = [e for events in audit.events.values() for e in events if e[0] == "mixed"]
    assert not mixed, mixed[:5]
    # the events after step s's after_step belong to step s + 1; step 0: the optimizer's creation
    for s in range(1, steps - 1):
        if (s + 1) % 10 == 0:  # a K_u step's hooks (after_step of steps 10, 20) run under label s
            continue
        kinds = collections.Counter(e[0] for e in audit.events[s])
        assert kinds == {"copy": 2}, (s, audit.events[s])


@pytest.mark.parametrize("name", ["constants", "llama", "yolov8n", "model.pt2"])
def test_export_read_models_run_whole_on_another_device(name, tmp_path):
    torch.manual_seed(0)
    if name == "model.pt2":
        gm, args = _reloaded_pt2(tmp_path)
    else:
        model, args = {"constants": lambda: (Constants(), (torch.randn(2, 4),)), "llama": _llama,
                       "yolov8n": _yolo}[name]()
        gm = pcompiler.trace(model.eval(), args, frontend="export").gm
    moved = copy_to(gm, META)
    assert lives_on(moved, META) and lives_on(gm, "cpu")  # the original stays where it was
    with torch.no_grad(), DeviceAudit() as audit:  # (YOLO's graph reads a value: meta returns 0)
        out = moved(*(a.to(META) for a in args))
    assert not [e for events in audit.events.values() for e in events if e[0] == "mixed"]
    assert all(t.device == META for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    if name in ("constants", "model.pt2"):  # what a plain Module.to leaves behind
        with pytest.raises(RuntimeError, match="device"):
            copy.deepcopy(gm).to(META)(*(a.to(META) for a in args))


# ---------------------------------------------------------------------------------------------
# verify on the run's device, a module's weights at a time


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_runs_on_the_device_a_module_at_a_time(dtype):
    """--device cuda proves a one-shot run on the GPU without the model moving there whole:
    each module's weights are copied to the device while it runs (in float32 for bfloat16), the
    inputs, the graph's constants and its factory ops' devices too, and no op mixes devices.
    The model stays on the CPU, and the same proof on the CPU passes."""
    from pcompiler.passes.verify import verify_program

    model, args = _llama()
    model = model.to(dtype)
    prog = pcompiler.trace(model.eval(), args, frontend="export")
    for name in ("analyze", "l1", "slim"):
        prog = make_pass(name, **({"ratio": 0.25} if name == "l1" else {})).run(prog).program
    on_cpu = verify_program(prog)
    assert prog.selection and on_cpu["ok"] and on_cpu["device"] == "cpu"
    # On meta each value read is 0 (DeviceAudit), so both models run to the end and verify then
    # finds no finite number to compare, which it says.
    with DeviceAudit() as audit, pytest.raises(VerifyError, match="compared no number"):
        verify_program(prog, device=META)
    events = [e for step in audit.events.values() for e in step]
    assert not [e for e in events if e[0] == "mixed"], events
    weights = sum(1 for t in prog.gm.parameters() if t.dim() > 0)
    assert sum(1 for e in events if e[0] == "copy") >= 2 * weights  # both models' weights went, read by read
    assert lives_on(prog.gm, "cpu") and lives_on(prog.reference, "cpu")


def test_the_streaming_interpreter_moves_what_module_to_misses():
    """An export-read graph's plain tensor constants and `arange(..., device=cpu)` run on the
    interpreter's device too (as copy_to's copy does), the graph's module untouched."""
    from pcompiler.dtypes import PromotedInterpreter

    model, args = Constants(), (torch.randn(2, 4),)
    gm = pcompiler.trace(model, args, frontend="export").gm
    with torch.no_grad(), DeviceAudit() as audit:
        out = PromotedInterpreter(gm, device=META).run(*args)
    assert out.device == META and lives_on(gm, "cpu")
    events = [e for events in audit.events.values() for e in events]
    assert not [e for e in events if e[0] == "mixed"]
    # copied: the input, the weight, the bias and the constant; the arange is made on the device
    assert sorted(e[1] for e in events if e[0] == "copy") == [(2, 4), (4,), (4,), (4, 4)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_on_cuda_proves_what_the_cpu_proves():
    from pcompiler.passes.verify import verify_program

    prog = pcompiler.trace(cnn().to(torch.bfloat16).eval(), (torch.randn(2, 3, 8, 8, dtype=torch.bfloat16),),
                           frontend="export")
    for name in ("analyze", "l1", "slim"):
        prog = make_pass(name, **({"ratio": 0.25} if name == "l1" else {})).run(prog).program
    runtime = Runtime.resolve("cuda")
    with runtime.full_float32():
        on_cpu, on_gpu = verify_program(prog), verify_program(prog, device=runtime.device)
    assert on_gpu["ok"] and on_gpu["device"] == "cuda:0" and on_gpu["max_error"] <= 10 * on_cpu["max_error"] + 1e-5
    assert lives_on(prog.gm, "cpu")
