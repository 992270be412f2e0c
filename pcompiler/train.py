"""The one training loop: every regularizing method and fine-tuning run through `train`.

Methods do not write loops; they pass `Hooks`:
- `param_groups(model)`: optimizer groups of their own (e.g. 10x lr, no weight decay);
- `loss_term(model, step)`: added to the loss before backward;
- `after_backward(model, step)`: a gradient penalty (grad += lambda * w), after DDP's all-reduce
  and AMP's unscale, before the optimizer step;
- `after_step(model, step)`: the schedule update; returns numbers to log (the penalty's size),
  averaged over the steps between two log points. A value may be a tensor (on the training
  device: the loop reads it only at log points, so a step waits for no device) or a
  zero-argument callable, for a number that costs a pass over the weights: the loop calls it only
  on the steps it logs (every `log_every` steps and the last) and logs what it returns then;
- `finished(step)`: stop early (GReg stops when every group has grown and stabilized);
- `state_dict` / `load_state_dict`: what `--resume` must restore besides model and optimizer.

Where it runs is the `Runtime`'s to say (`pcompiler.runtime`): the model must already live on
`runtime.device` (a pass places its own copy there before it builds its hooks, so that the hooks'
index tensors live there too); under torchrun (`runtime.world_size` > 1) it trains as DDP.

What the loop guarantees:
- Data order: the global batch of step t is a slice of a permutation seeded by (seed, epoch);
  rank r takes every W-th sample of it, so the global batch is the same at any world size.
  Augmentation draws from a generator seeded by (seed, step, rank), never from the global RNG.
- Same seed, same device, same world size: the same weights (on CUDA with deterministic cuDNN,
  set for the run and restored after). A checkpoint (`pcompiler.checkpoint`: model, optimizer,
  scheduler, hooks, RNG states, curve) is written every `checkpoint_every` steps; `resume`
  continues from it and ends with the weights an uninterrupted run ends with.
- Precision: autocast to `runtime.amp` (float16 with a GradScaler whose gradients are unscaled
  before `after_backward`); on CPU subnormal floats are flushed to zero in every thread during
  the run (`pcompiler.precision`).
- No host sync per step: the loss and accuracy stay on the device until a log point.

The model is called, and its loss taken, by the data's task (`pcompiler.tasks`): cross-entropy
over classes for (x, class) pairs, next-token cross-entropy for a language model on text; the
curve's "acc" is the fraction predicted right (of next tokens, for text). With a teacher
(`train(..., teacher=...)`, settings in `TrainConfig.distill`) it is the distillation loss of
`pcompiler.distill` (per prediction: per token for text); the curve's "loss" stays the
cross-entropy (comparable with a run without teacher); "distill" is the T^2 * KL term.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import pcompiler.checkpoint as checkpoint
from pcompiler.data import DataSource
from pcompiler.distill import Distillation, check_teacher, distill_term, lent
from pcompiler.errors import CompileError
from pcompiler.precision import subnormals_flushed
from pcompiler.runtime import CPU, Runtime, lives_on

log = logging.getLogger("pcompiler")

SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class TrainConfig:
    """One training phase's settings. `steps` counts optimizer steps (global batches). Where it
    runs (device, processes, precision) is the Runtime's, not this."""

    steps: int = 1000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "constant"  # constant | cosine (to 0) | step (x0.1 at 50% and 75%)
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
        if self.distill is not None:
            self.distill.check(self.label)


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


def _progress(cfg: TrainConfig, total: int, start: int, main: bool):
    if not cfg.progress or not main:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=Console(stderr=True),
                   transient=False)
    bar.add_task(cfg.label, total=total, completed=start, stats="")
    return bar


Logged = list[float | torch.Tensor] | Callable[[], float]


def _logged(values: Logged) -> float:
    """A log point's value: the mean of a number's values since the last point (one host sync for
    the tensors among them), or a lazy one's value now."""
    if callable(values):
        return float(values())
    tensors = [v.detach().float().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    total = sum(float(v) for v in values if not isinstance(v, torch.Tensor))
    if tensors:
        total += float(torch.stack(tensors).sum())
    return total / len(values)


# ---------------------------------------------------------------------------------------------
# The loop


def train(model: nn.Module, data: DataSource, cfg: TrainConfig, hooks: Hooks | None = None,
          teacher: nn.Module | None = None, runtime: Runtime = CPU) -> TrainResult:
    """Train `model` in place on `data.train` for `cfg.steps` steps (fewer if the hooks finish),
    on `runtime`, where `model` must already live; with `teacher` (which `cfg.distill` then
    configures) it distills. The model's training flag is restored after."""
    cfg.check()
    check_teacher(model, teacher, cfg)
    if not lives_on(model, runtime.device):
        raise ValueError(f"{cfg.label}: the model to train must live on {runtime.device} "
                         "(place a copy there first: pcompiler.runtime.copy_to)")
    hooks = hooks or Hooks()
    task = data.task
    rank, size, dev = runtime.rank, runtime.world_size, runtime.device
    was_training = model.training
    model.train()
    opt = _optimizer(model, cfg, hooks)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.schedule, cfg.steps))
    scaler = runtime.grad_scaler()
    torch.manual_seed(cfg.seed + rank)

    result = TrainResult(steps=0, world_size=size)
    state = checkpoint.load(cfg, size)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        hooks.load_state_dict(state["hooks"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng(state["rng"][rank], dev)
        result.steps, result.curve, result.resumed_from = state["step"], state["curve"], state["step"]
        log.info("%s: resumed from %s at step %d", cfg.label, cfg.checkpoint, state["step"])

    net = model
    if size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # Its own generator: creating the iterator must not draw from the global RNG (resume restores that).
    loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=_Sampler(len(data.train), cfg, result.steps, rank, size), num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed), pin_memory=dev.type == "cuda")

    def write_checkpoint(step: int) -> None:
        rng = checkpoint.gather_rng(size, dev)  # every rank takes part in the gather
        if rank == 0:
            checkpoint.save(cfg.checkpoint, {
                "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "hooks": hooks.state_dict(), "curve": result.curve,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng, "config": asdict(cfg), "world_size": size})

    window: dict[str, Logged] = {}
    bar = _progress(cfg, cfg.steps, result.steps, runtime.is_main)
    t0 = time.perf_counter()
    step = result.steps
    try:
        if bar is not None:
            bar.start()
        # The penalties drive weights through float32's subnormals, slow on many CPUs: flushed to 0.
        with runtime.training_flags(), subnormals_flushed(dev), lent(teacher, dev) as tutor:
            for x, y in loader:
                if step >= cfg.steps or hooks.finished(step):
                    break
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if data.augment is not None:
                    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
                    x = data.augment(x, g)
                with runtime.autocast():
                    out = task.call(net, x)
                    loss = task.loss(out, y)
                    total, kd = loss, None
                    if tutor is not None:
                        with torch.no_grad():
                            z_t = task.call(tutor, x)
                        kd = distill_term(task.per_sample(out).float(), task.per_sample(z_t).float(),
                                          cfg.distill.temperature)
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
                acc = task.hits(out, y)
                terms = {"loss": loss.detach()} if kd is None else {"loss": loss.detach(), "distill": kd.detach()}
                for k, v in {**terms, "acc": acc, **logged}.items():
                    if callable(v):
                        window[k] = v
                    else:
                        window.setdefault(k, []).append(v)
                if step % cfg.log_every == 0 or step == cfg.steps or hooks.finished(step):
                    point = {"step": step, "lr": sched.get_last_lr()[0], **{k: _logged(v) for k, v in window.items()}}
                    result.curve.append(point)
                    window.clear()
                    if bar is not None:
                        bar.update(0, completed=step, stats=f"loss {point['loss']:.3f} acc {point['acc']:.3f}")
                elif bar is not None:
                    bar.update(0, completed=step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    write_checkpoint(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every:
                write_checkpoint(step)  # the phase's end, so a resume after it skips straight past it
    finally:
        if bar is not None:
            bar.stop()
    result.steps = step
    result.seconds = time.perf_counter() - t0
    model.train(was_training)
    return result
