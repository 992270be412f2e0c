"""The one training loop: every regularizing method and fine-tuning run through `train`.

Methods do not write loops; they pass `Hooks`:
- `param_groups(model)`: optimizer groups of their own (e.g. 10x lr, no weight decay);
- `loss_term(model, step)`: added to the cross-entropy loss before backward;
- `after_backward(model, step)`: a gradient penalty (grad += lambda * w), after DDP's all-reduce
  and AMP's unscale, before the optimizer step;
- `after_step(model, step)`: the schedule update; returns numbers to log (the penalty's size),
  averaged over the steps between two log points. A value may instead be a zero-argument callable,
  for a number that costs a pass over the weights: the loop calls it only on the steps it logs
  (every `log_every` steps and the last) and logs what it returns then;
- `finished(step)`: stop early (GReg stops when every group has grown and stabilized);
- `state_dict` / `load_state_dict`: what `--resume` must restore besides model and optimizer.

What the loop guarantees:
- Data order: the global batch of step t is a slice of a permutation seeded by (seed, epoch);
  under DDP (started by torchrun: WORLD_SIZE > 1) rank r takes every W-th sample of it, so the
  global batch is the same at any world size. Augmentation draws from a generator seeded by
  (seed, step, rank), never from the global RNG.
- Same seed, same device, same world size: the same weights (on CUDA with deterministic cuDNN). A checkpoint (model, optimizer,
  scheduler, hooks, RNG states, curve) is written every `checkpoint_every` steps; `resume`
  continues from it and ends with the weights an uninterrupted run ends with.
- AMP (CUDA only): bfloat16 autocast where supported, else float16 with a GradScaler whose
  gradients are unscaled before `after_backward`.

The loss is cross-entropy: the data are (x, class) pairs (see `pcompiler.data`). With a teacher
(`train(..., teacher=...)`, settings in `TrainConfig.distill`) it is the distillation loss
(1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) of Hinton et al.
(2015). The teacher sees the student's (augmented) batch, in eval mode under no_grad, on the
training device and inside autocast; under DDP each rank runs it on its own share of the batch.
It is never trained; its mode and device are restored after. The curve's "loss" stays the
cross-entropy (comparable with a run without teacher); "distill" is the T^2 * KL term.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pcompiler.costs import device_of
from pcompiler.data import DataSource
from pcompiler.errors import CompileError
from pcompiler.outdir import atomic_write
from pcompiler.precision import subnormals_flushed

log = logging.getLogger("pcompiler")

SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class Distillation:
    """How a teacher's logits z_t join the loss: temperature T (> 0) softens both distributions,
    alpha (in [0, 1]) weighs the T^2 * KL term against the cross-entropy (0: cross-entropy only).
    The defaults are a common choice in the distillation literature; docs/bench_distill.md compares others."""

    temperature: float = 4.0
    alpha: float = 0.9

    def check(self, label: str) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise CompileError(f"{label}: distillation temperature must be > 0, got {self.temperature}",
                               hint="e.g. --distill-temperature 4; 1 leaves the teacher's probabilities as they are")
        if not 0.0 <= self.alpha <= 1.0:
            raise CompileError(f"{label}: distillation alpha must be in [0, 1], got {self.alpha}",
                               hint="e.g. --distill-alpha 0.9; 0 is cross-entropy only, 1 the teacher only")


@dataclass(frozen=True)
class TrainConfig:
    """One training phase. `steps` counts optimizer steps (global batches)."""

    steps: int = 1000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "constant"  # constant | cosine (to 0) | step (x0.1 at 50% and 75%)
    device: str = "cpu"
    amp: bool = False  # CUDA only; ignored on CPU
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    checkpoint_every: int = 0  # 0: no checkpoints
    checkpoint: str | None = None  # file the checkpoints go to
    resume: bool = False  # continue from `checkpoint` if it exists
    log_every: int = 10
    progress: bool = True
    label: str = "train"
    distill: Distillation | None = None  # with a teacher (train(..., teacher=...)): its loss settings

    def check(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr < 0:
            raise CompileError(f"{self.label}: steps must be >= 0, batch size >= 1 and lr >= 0")
        if self.schedule not in SCHEDULES:
            raise CompileError(f"{self.label}: unknown lr schedule '{self.schedule}'", hint=f"one of {', '.join(SCHEDULES)}")
        if self.checkpoint_every and not self.checkpoint:
            raise CompileError(f"{self.label}: checkpoint_every needs a checkpoint path")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise CompileError("--device cuda: no CUDA device is available here", hint="use --device cpu")
        if self.distill is not None:
            self.distill.check(self.label)


def with_teacher(cfg: TrainConfig, teacher: nn.Module | None) -> TrainConfig:
    """`cfg` for a run with `teacher`: the default `Distillation` when it sets none; unchanged without one."""
    if teacher is None or cfg.distill is not None:
        return cfg
    return dataclasses.replace(cfg, distill=Distillation())


class Hooks:
    """What a method plugs into the loop; every hook defaults to doing nothing."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        return None

    def loss_term(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def after_step(self, model: nn.Module, step: int) -> dict[str, float | Callable[[], float]]:
        return {}

    def finished(self, step: int) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    steps: int  # steps done (may stop before the budget when the hooks say so)
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None
    world_size: int = 1


# ---------------------------------------------------------------------------------------------
# Distributed


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str) -> torch.device:
    """Join torchrun's process group when there is one (gloo on CPU, NCCL on CUDA) and return this
    process's device."""
    rank, size, local = world()
    dev = torch.device(device)
    if dev.type == "cuda" and size > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def finish_distributed() -> None:
    """Leave the process group (if this process joined one) once every rank is done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    return world()[0] == 0


# ---------------------------------------------------------------------------------------------
# Pieces


def _lr_factor(schedule: str, steps: int):
    def factor(t: int) -> float:
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / max(steps, 1)))
        if schedule == "step":
            return 0.1 ** ((t >= steps // 2) + (t >= (3 * steps) // 4))
        return 1.0

    return factor


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The lr the loop uses for the optimizer step taken at `step` (0-based)."""
    return cfg.lr * _lr_factor(cfg.schedule, cfg.steps)(step)


def _batches(n: int, cfg: TrainConfig, start: int, rank: int, size: int) -> Iterator[list[int]]:
    """This rank's sample indices for steps start, start+1, ... (see the module docstring)."""
    if cfg.batch_size % size:
        raise CompileError(f"batch size {cfg.batch_size} is not divisible by the {size} processes",
                           hint="choose a batch size that is a multiple of the process count")
    per_epoch = max(1, n // cfg.batch_size)  # incomplete last batches are dropped
    step = start
    while True:
        epoch, first = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        for k in range(first, per_epoch):
            glob = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            yield glob[rank::size].tolist()
            step += 1


class _Sampler(torch.utils.data.Sampler):
    def __init__(self, n: int, cfg: TrainConfig, start: int, rank: int, size: int):
        self.args = (n, cfg, start, rank, size)

    def __iter__(self) -> Iterator[list[int]]:
        return _batches(*self.args)


def _optimizer(model: nn.Module, cfg: TrainConfig, hooks: Hooks) -> torch.optim.Optimizer:
    special = hooks.param_groups(model) or []
    taken = {id(p) for g in special for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": rest}] + [{**g, "lr": g.get("lr_scale", 1.0) * cfg.lr} for g in special]
    for g in groups:
        g.pop("lr_scale", None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _amp(cfg: TrainConfig, dev: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    if not cfg.amp or dev.type != "cuda":
        return contextlib.nullcontext, None
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


def _progress(cfg: TrainConfig, total: int, start: int):
    if not cfg.progress or not is_main_process():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=Console(stderr=True),
                   transient=False)
    bar.add_task(cfg.label, total=total, completed=start, stats="")
    return bar


def _save(path: str, state: dict[str, Any]) -> None:
    """Write atomically: a kill while writing leaves the previous checkpoint intact."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


_RESUME_KEYS = ("steps", "lr", "batch_size", "seed", "schedule", "momentum", "weight_decay", "distill")


def _load_checkpoint(cfg: TrainConfig, size: int) -> dict[str, Any] | None:
    if not (cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists()):
        return None
    state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=False)
    saved, now = state.get("config", {}), asdict(cfg)
    differ = [k for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if differ or state.get("world_size") != size:
        what = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in differ) or "world size"
        raise CompileError(f"cannot resume from {cfg.checkpoint}: it was written with other settings ({what})",
                           hint="resume with the options of the interrupted run, or delete the checkpoint")
    return state


# ---------------------------------------------------------------------------------------------
# Distillation


def distill_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                            reduction="batchmean", log_target=True)


def _check_teacher(model: nn.Module, teacher: nn.Module | None, cfg: TrainConfig) -> None:
    if (teacher is None) != (cfg.distill is None):
        given, missing = ("a teacher", "TrainConfig.distill") if cfg.distill is None else ("distill", "teacher")
        raise CompileError(f"{cfg.label}: {given} is set but {missing} is not",
                           hint="pass both (teacher=the input model, distill=Distillation(...)), or neither")
    if teacher is None:
        return

    def storages(m: nn.Module) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in (*m.parameters(), *m.buffers())
                if t.device.type != "meta" and t.numel()}

    if storages(model) & storages(teacher):
        raise CompileError(f"{cfg.label}: the teacher shares weights with the model being trained",
                           hint="pass the input model (or a copy of it) as teacher, not the model being trained")


def _lend_teacher(teacher: nn.Module | None, dev: torch.device) -> Callable[[], None]:
    """Put the teacher in eval mode on `dev`; return what restores every module's mode and its device."""
    if teacher is None:
        return lambda: None
    modes, home = [m.training for m in teacher.modules()], device_of(teacher)
    teacher.to(dev).eval()

    def give_back() -> None:
        teacher.to(home)
        for m, mode in zip(teacher.modules(), modes, strict=True):
            m.training = mode

    return give_back


# ---------------------------------------------------------------------------------------------
# The loop


def train(model: nn.Module, data: DataSource, cfg: TrainConfig, hooks: Hooks | None = None,
          teacher: nn.Module | None = None) -> TrainResult:
    """Train `model` in place on `data.train` for `cfg.steps` steps (fewer if the hooks finish),
    distilling from `teacher` (which `cfg.distill` then configures) when one is given."""
    cfg.check()
    _check_teacher(model, teacher, cfg)
    hooks = hooks or Hooks()
    rank, size, _ = world()
    dev = init_distributed(cfg.device)
    was_training = model.training
    home = device_of(model)
    model.to(dev).train()
    opt = _optimizer(model, cfg, hooks)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.schedule, cfg.steps))
    autocast, scaler = _amp(cfg, dev)
    torch.manual_seed(cfg.seed + rank)
    if dev.type == "cuda":  # same seed, same result: cuDNN must not pick kernels by timing
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    result = TrainResult(steps=0, world_size=size)
    state = _load_checkpoint(cfg, size)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        hooks.load_state_dict(state["hooks"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng(state["rng"][rank], dev)
        result.steps, result.curve, result.resumed_from = state["step"], state["curve"], state["step"]
        log.info("%s: resumed from %s at step %d", cfg.label, cfg.checkpoint, state["step"])

    net = model
    if size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # Its own generator: creating the iterator must not draw from the global RNG (resume restores that).
    loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=_Sampler(len(data.train), cfg, result.steps, rank, size), num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed))
    def checkpoint(step: int) -> None:
        rng = _gather_rng(size, dev)  # every rank takes part in the gather
        if rank == 0:
            _save(cfg.checkpoint, {
                "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "hooks": hooks.state_dict(), "curve": result.curve,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng, "config": asdict(cfg), "world_size": size})

    window: dict[str, list[float] | Callable[[], float]] = {}
    bar = _progress(cfg, cfg.steps, result.steps)
    t0 = time.perf_counter()
    step = result.steps
    give_back_teacher = _lend_teacher(teacher, dev)
    try:
        if bar is not None:
            bar.start()
        # The penalties drive weights through float32's subnormals, slow on many CPUs: flushed to 0.
        with subnormals_flushed(dev):
            for x, y in loader:
                if step >= cfg.steps or hooks.finished(step):
                    break
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if data.augment is not None:
                    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
                    x = data.augment(x, g)
                with autocast():
                    out = net(x)
                    loss = F.cross_entropy(out.float(), y)
                    total, kd = loss, None
                    if teacher is not None:
                        with torch.no_grad():
                            z_t = teacher(x)
                        kd = distill_term(out.float(), z_t.float(), cfg.distill.temperature)
                        total = (1 - cfg.distill.alpha) * loss + cfg.distill.alpha * kd
                    extra = hooks.loss_term(model, step)
                    total = total if extra is None else total + extra
                opt.zero_grad(set_to_none=True)
                (scaler.scale(total) if scaler is not None else total).backward()
                if scaler is not None:
                    scaler.unscale_(opt)
                hooks.after_backward(model, step)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                step += 1
                logged = hooks.after_step(model, step)
                acc = (out.detach().argmax(1) == y).float().mean().item()
                terms = {"loss": loss.item()} if kd is None else {"loss": loss.item(), "distill": kd.item()}
                for k, v in {**terms, "acc": acc, **logged}.items():
                    if callable(v):
                        window[k] = v
                    else:
                        window.setdefault(k, []).append(float(v))
                if step % cfg.log_every == 0 or step == cfg.steps or hooks.finished(step):
                    point = {"step": step, "lr": sched.get_last_lr()[0], **{k: _logged(v) for k, v in window.items()}}
                    result.curve.append(point)
                    window.clear()
                    if bar is not None:
                        bar.update(0, completed=step, stats=f"loss {point['loss']:.3f} acc {point['acc']:.3f}")
                elif bar is not None:
                    bar.update(0, completed=step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every:
                checkpoint(step)  # the phase's end, so a resume after it skips straight past it
    finally:
        give_back_teacher()
        if bar is not None:
            bar.stop()
    result.steps = step
    result.seconds = time.perf_counter() - t0
    model.to(home).train(was_training)
    return result


def _logged(values: list[float] | Callable[[], float]) -> float:
    """A log point's value: the mean of a number's values since the last point, or a lazy one's value now."""
    return float(values()) if callable(values) else sum(values) / len(values)


def _gather_rng(size: int, dev: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (dropout draws from them), indexed by rank."""
    mine = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(dev)
    if size == 1:
        return [mine]
    states: list = [None] * size
    dist.all_gather_object(states, mine)
    return states


def _set_rng(state: dict[str, torch.Tensor], dev: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, *, device: str | torch.device = "cpu",
             batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on `dataset` (eval mode on `device`; mode and device are restored after)."""
    was_training = model.training
    home = device_of(model)
    model.eval()
    model.to(device)
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.to(home).train(was_training)
    return correct / max(total, 1)


RUNNING_STAT_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def norms_with_running_stats(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, RUNNING_STAT_NORMS) and m.track_running_stats
            and m.running_mean is not None]


@torch.no_grad()
def recalibrate_norms(model: nn.Module, dataset: torch.utils.data.Dataset, *, batches: int, batch_size: int = 64,
                      seed: int = 0, device: str | torch.device = "cpu") -> int:
    """Re-estimate the running statistics of every norm that keeps them, on `batches` batches of
    `dataset` (no augmentation, no gradients); returns the number of norms.

    The statistics are reset and then averaged over the batches with equal weight (momentum None),
    so the result does not depend on what they were. The batches are a seeded draw, the same in
    every process: under DDP every rank computes the same statistics without communicating.
    Parameters are untouched; mode and device are restored after."""
    norms = norms_with_running_stats(model)
    if not norms or batches <= 0:
        return len(norms)
    was_training, home = model.training, device_of(model)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.eval()
    for m in norms:
        m.train()
    model.to(device)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[:batches * batch_size].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size)
    try:
        for x, _ in loader:
            if len(x) > 1:  # a batch of one has no variance to estimate
                model(x.to(device))
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.to(home).train(was_training)
    return len(norms)
