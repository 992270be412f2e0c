"""The pipeline builder: one settings object, one function that turns it into passes, and the run
around them. The CLI, examples/prune_api.py and the benchmarks all build their pipelines here.

    settings = Settings(method="tpp", ratio=0.5)
    build(settings, data)      # [analyze, evaluate, tpp, slim, compensate, verify, evaluate,
                               #  recalibrate, evaluate, finetune, evaluate]
    compile_model(model, settings, data=data, out_dir="out")   # trace, the passes, exports, report

The methods are the registered passes that ensure a selection; a method needs data when it
requires it (`methods()`), so a new method pass shows up in the CLI without an edit here.
This module sits above the passes and targets: nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcompiler import distributed
from pcompiler.data import DataSource
from pcompiler.distill import Distillation
from pcompiler.errors import CompileError, first_line
from pcompiler.hf import bias_holders, folder_fits, is_model, width_fields
from pcompiler.inputs import InputSpec, default_inputs, draw_integers, example_values, specs_text
from pcompiler.ir import Program
from pcompiler.passes.analyze import ATTENTION
from pcompiler.passes.recalibrate import DEFAULT_BATCHES
from pcompiler.passes.select import SelectOptions
from pcompiler.passes.trace import FRONTENDS
from pcompiler.passmanager import (
    DATA,
    SELECTION,
    Instrument,
    Pass,
    check_options,
    make_pass,
    registered_passes,
    run,
)
from pcompiler.runtime import Runtime
from pcompiler.tasks import CAUSAL_LM, CLASSIFICATION
from pcompiler.train import TrainConfig

log = logging.getLogger("pcompiler")

# hf: a save_pretrained folder, for Hugging Face models; eager: the user's class slimmed in place.
FORMATS = ("pt", "pt2", "onnx", "eager", "hf")
# Of the default formats, those written where they apply: the model's code (eager) or its config
# (hf) may not hold the slim widths; they are skipped then, with the reason, not a failure.
OPTIONAL_FORMATS = ("eager", "hf")


def methods() -> dict[str, bool]:
    """Every method pass by name -> whether it needs data (one-shot methods first)."""
    found = {n: DATA in c.requires for n, c in registered_passes().items() if SELECTION in c.ensures}
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def trains(method: str) -> bool:
    """Whether the method trains the model (it has a step budget: --reg-steps); calib only measures."""
    cls = registered_passes().get(method)
    return cls is not None and methods().get(method, False) and "steps" in {f.name for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Settings:
    """Everything a compilation is told. `train` holds the SGD settings of both training phases
    (its lr and schedule are the regularization's; fine-tuning is cosine from `finetune_lr`, or
    from `train.lr`); its seed is replaced by `seed`. `device` and `amp` are what the runtime is
    resolved from (`Runtime.resolve`). `round_to` None: what suits `device`."""

    method: str = "l1"
    ratio: float | None = None  # None: 0.5, or searched for `speedup` or `params_removed`
    speedup: float | None = None
    params_removed: float | None = None  # fraction of the parameters to remove
    latency: float | None = None  # measured latency reduction wanted on `latency_backend` (targets/latency.py)
    latency_backend: str = "onnxruntime-cpu"
    latency_batch: int = 1
    latency_predictor: str = "profile"  # targets/latency.py's PREDICTORS
    latency_allocation: str = "uniform"  # targets/latency.py's ALLOCATIONS
    threads: int | None = None  # CPU threads of the latency measurements (None: torch's setting)
    global_ranking: bool | None = None  # None: the method's default
    round_to: int | None = None
    min_keep: int | None = None  # None: the method's default
    skip: tuple[str, ...] = ()
    seed: int = 0
    method_options: Mapping[str, Any] = field(default_factory=dict)  # -p KEY=VALUE
    reg_steps: int | None = None
    calibration_samples: int | None = None  # calib's windows (samples) of calibration data (its default: 128)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune_epochs: float = 10.0
    finetune_lr: float | None = None
    distill: Distillation | None = None
    distill_regularization: bool = False
    recalibrate_batches: int = DEFAULT_BATCHES
    compensate: bool = True
    compensate_fit: str | None = None  # compensate's fit (None: lstsq with text data, constant for images)
    checkpoints: str | None = None  # folder of the phases' checkpoints (OUT/checkpoints)
    frontend: str = "auto"  # how the model is read: passes/trace.py's FRONTENDS
    attention: str = "heads"  # how attention shrinks: passes/analyze.py's ATTENTION
    prune_normalized: bool = False  # channels a LayerNorm normalizes may go, approximately
    device: str = "cpu"  # cpu, cuda or cuda:N
    amp: bool = False  # mixed-precision training (CUDA)

    def check(self, has_data: bool) -> None:
        """Refuse what cannot run, before anything slow starts."""
        if self.frontend not in FRONTENDS:
            raise CompileError(f"unknown frontend {self.frontend!r}", hint=f"choose from {', '.join(FRONTENDS)}")
        if self.attention not in ATTENTION:
            raise CompileError(f"unknown attention mode {self.attention!r}", hint=f"choose from {', '.join(ATTENTION)}")
        known = methods()
        if self.method not in known:
            raise CompileError(f"unknown method '{self.method}'", hint=f"choose from {', '.join(known)}")
        if known[self.method] and not has_data:
            raise CompileError(f"--method {self.method} {'trains the model' if trains(self.method) else 'measures activations'}"
                               " and needs --data", hint="e.g. --data digits, --data cifar10:DIR, --data imagefolder:DIR, "
                               "--data text:FILE")
        if self.calibration_samples is not None and (known[self.method] and trains(self.method) or not known[self.method]):
            raise CompileError(f"--calibration-samples is for --method calib, not {self.method}")
        budgets = [flag for flag, v in (("--ratio", self.ratio), ("--speedup", self.speedup),
                                        ("--params-removed", self.params_removed),
                                        ("--latency", self.latency)) if v is not None]
        if len(budgets) > 1:
            raise CompileError(f"{' and '.join(budgets)} each set how much is removed: give one")
        given = {"ratio": self.ratio, "round_to": self.round_to, "min_keep": self.min_keep}
        SelectOptions(speedup=self.speedup, params=self.params_removed,
                      **{k: v for k, v in given.items() if v is not None}).check()
        if (self.reg_steps is not None and self.reg_steps < 0) or self.finetune_epochs < 0 or self.train.checkpoint_every < 0:
            raise CompileError("--reg-steps, --finetune-epochs and --checkpoint-every must be >= 0")
        if self.recalibrate_batches < 0:
            raise CompileError(f"--recalibrate-batches must be >= 0, got {self.recalibrate_batches}",
                               hint="0 (or --no-recalibrate) turns recalibration off")
        unknown = set(self.method_options) & ({f.name for f in dataclasses.fields(SelectOptions)} | {"data", "steps", "train", "teacher", "seed", "runtime"})
        if unknown:
            raise CompileError(f"-p {', '.join(sorted(unknown))}: set that with its own option", hint="see pcompile --help")
        check_options(self.method, dict(self.method_options))
        self._check_distill(has_data, known[self.method])

    def _check_distill(self, has_data: bool, trained: bool) -> None:
        if self.distill is None:
            if self.distill_regularization:
                raise CompileError("--distill-regularization needs --distill", hint="add --distill, or leave it out")
            return
        if not has_data:
            raise CompileError("--distill trains with the input model as teacher and needs --data", hint="e.g. --data digits")
        if self.distill_regularization and not trained:
            raise CompileError(f"--distill-regularization: --method {self.method} has no regularization phase",
                               hint=f"use it with {', '.join(n for n, d in methods().items() if d)}, or leave it out")
        if self.finetune_epochs == 0 and not self.distill_regularization:
            raise CompileError("--distill with --finetune-epochs 0: there is no training to distill into",
                               hint="fine-tune (--finetune-epochs N), or add --distill-regularization")
        self.distill.check("--distill")

    def resolved(self) -> Settings:
        """The defaults that depend on other settings made explicit: the ratio (0.5 unless a
        speedup is searched) and the channel multiple that suits the training device."""
        from pcompiler.targets.bench import backend_round_to, default_round_to

        searched = (self.speedup, self.params_removed, self.latency)
        ratio = 0.5 if self.ratio is None and all(v is None for v in searched) else self.ratio
        round_to = self.round_to
        if round_to is None:
            round_to = backend_round_to(self.latency_backend) if self.latency is not None else default_round_to(self.device)
        return dataclasses.replace(self, ratio=ratio, round_to=round_to)

    def train_config(self, phase: str, **changes: Any) -> TrainConfig:
        checkpoint = None if self.checkpoints is None else str(Path(self.checkpoints) / f"{phase}.pt")
        return dataclasses.replace(self.train, seed=self.seed, checkpoint=checkpoint, **changes)

    def as_report(self, data: DataSource | None) -> dict[str, Any]:
        """The settings as report.json records them."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("train", "distill", "checkpoints")}
        out.update(skip=list(self.skip), method_options=dict(self.method_options),
                   train={k: v for k, v in dataclasses.asdict(self.train).items() if k not in ("steps", "label", "distill")},
                   finetune_epochs=self.finetune_epochs if data is not None else 0,
                   finetune_lr=self.finetune_lr if self.finetune_lr is not None else self.train.lr,
                   recalibrate_batches=self.recalibrate_batches if data is not None else 0,
                   distill=None if self.distill is None else {**dataclasses.asdict(self.distill),
                                                              "finetune": self.finetune_epochs > 0,
                                                              "regularization": self.distill_regularization})
        return out


def compensate_fit(s: Settings, data: DataSource | None) -> str:
    """What compensate folds for removed channels that are not constant: the settings' choice, or
    least squares for text data and nothing for images ("constant"; also without compensation)."""
    if not s.compensate:
        return "constant"
    return s.compensate_fit or ("lstsq" if data is not None and data.task is CAUSAL_LM else "constant")


def _method_pass(settings: Settings, data: DataSource | None, teacher: nn.Module | None, runtime: Runtime,
                 legal: Callable[[Program], Program] | None = None) -> Pass:
    """The method's pass; `legal`: the hf_config pass's give-back, which a budget search applies
    to its trials (SelectOptions.legal)."""
    s = settings.resolved()
    options: dict[str, Any] = {"ratio": s.ratio if s.ratio is not None else 0.5, "skip": tuple(s.skip),
                               "speedup": s.speedup, "params": s.params_removed, "round_to": s.round_to}
    if legal is not None:
        options["legal"] = legal
    if s.latency is not None:
        from pcompiler.targets.latency import LatencyBudget

        options["target"] = LatencyBudget(s.latency, s.latency_backend, s.latency_batch, s.threads,
                                          predictor=s.latency_predictor, allocation=s.latency_allocation,
                                          device=s.device if s.device.startswith("cuda") else "cuda")
    if s.global_ranking is not None:
        options["global_ranking"] = s.global_ranking
    if s.min_keep is not None:
        options["min_keep"] = s.min_keep
    if s.method == "random":
        options["seed"] = s.seed
    if methods()[s.method] and not trains(s.method):
        options.update(data=data, runtime=runtime, seed=s.seed, fit=compensate_fit(s, data))  # measures, trains nothing
        if s.calibration_samples is not None:
            options["samples"] = s.calibration_samples
    elif methods()[s.method]:
        options.update(data=data, steps=s.reg_steps, train=s.train_config("regularization"), runtime=runtime)
        if s.distill_regularization:  # the teacher: the input model, not the copy trained
            options.update(teacher=teacher, train=s.train_config("regularization", distill=s.distill))
    return make_pass(s.method, **options, **s.method_options)


def build(settings: Settings, data: DataSource | None = None, teacher: nn.Module | None = None,
          hf_model: nn.Module | None = None, runtime: Runtime | None = None, hf_exact: bool = True) -> list[Pass]:
    """The passes of a compilation: analyze, the method, slim, compensate, verify, and with data
    the accuracy checks, recalibration and fine-tuning. `teacher`: the input model, for --distill.
    `hf_model`: a Hugging Face model whose hf/ folder is wanted. With `hf_exact` (the folder asked
    for) the method then prunes only the widths its config holds (passes/hf_widths.py), and ones
    its config class accepts (passes/hf_config.py); without, the fields are only recorded, and the
    folder is written where the widths chosen fit. `runtime`: where the passes that run the model
    run it (default: resolved from the settings' device and amp)."""
    s = settings
    s.check(data is not None)
    if s.distill is not None and teacher is None:
        raise CompileError("distillation needs the input model as teacher", hint="pass teacher=model")
    runtime = runtime if runtime is not None else Runtime.resolve(s.device, s.amp)

    def metric(stage: str) -> list[Pass]:  # acc_<stage>, or a language model's ppl_<stage>
        return [make_pass("evaluate", data=data, key=f"{data.task.prefix}_{stage}", runtime=runtime)] if data is not None else []

    hf = hf_model is not None
    legal = [make_pass("hf_config", model=hf_model, round_to=s.resolved().round_to)] if hf and hf_exact else []
    passes = [make_pass("analyze", attention=s.attention, prune_normalized=s.prune_normalized),
              *([make_pass("hf_widths", fields=tuple(width_fields(hf_model, s.prune_normalized).items()), pin=hf_exact)] if hf else []),
              *metric("before"), _method_pass(s, data, teacher, runtime, legal[0].legalize if legal else None),
              *legal, make_pass("slim")]
    if s.compensate:
        holders = bias_holders(hf_model) if hf_model is not None else None
        applies = None if hf_exact or hf_model is None else functools.partial(folder_fits, hf_model)  # hf/ where it fits
        passes.append(make_pass("compensate", data=data, runtime=runtime, fit=compensate_fit(s, data), bias_holders=holders,
                                holders_apply=applies))
    passes.append(make_pass("verify", runtime=runtime))
    if data is not None and s.recalibrate_batches > 0:
        passes += [*metric("before_recalibration"),
                   make_pass("recalibrate", data=data, batches=s.recalibrate_batches, batch_size=s.train.batch_size,
                             seed=s.seed, runtime=runtime)]
    passes += metric("pruned")
    if data is not None and s.finetune_epochs > 0:
        ft = s.train_config("finetune", lr=s.finetune_lr if s.finetune_lr is not None else s.train.lr,
                            schedule="cosine", distill=s.distill)
        passes += [make_pass("finetune", data=data, epochs=s.finetune_epochs, train=ft,
                             teacher=teacher if s.distill is not None else None, runtime=runtime), *metric("final")]
    return passes


# ---------------------------------------------------------------------------------------------
# The run around the passes


def trace_model(model: nn.Module, specs: Sequence[InputSpec] | None = None,
                data: DataSource | None = None, seed: int = 0, frontend: str = "auto") -> Program:
    """Trace `model` on example inputs of `specs` (default: the data's shape, else what the model
    implies: `inputs.default_inputs`) with `frontend` (passes/trace.py); integer inputs are drawn
    where they go (`draw_integers`)."""
    import pcompiler
    from pcompiler.costs import device_of

    given = bool(specs)
    if not specs:
        specs = [InputSpec((1, *data.input_shape))] if data is not None and data.task is CLASSIFICATION else \
            _token_inputs(model, data) if data is not None else default_inputs(model)
        log.info("example inputs %s (from %s; --input-shape and --input change them)", specs_text(specs),
                 "the data" if data is not None else "the model")
    args, kwargs = example_values(specs, device_of(model), seed)
    try:
        prog = pcompiler.trace(model, args, kwargs=kwargs, frontend=frontend)
    except CompileError as e:
        where = "" if given else "the default "
        hint = "" if "input-shape" in str(e) else " (pass --input-shape with the shape the model expects)"
        raise CompileError(f"tracing the model with {where}example inputs {specs_text(specs)} failed: "
                           f"{first_line(str(e))}{hint}") from e
    return draw_integers(prog, seed)


def _token_inputs(model: nn.Module, data: DataSource) -> list[InputSpec]:
    """Example inputs of a language model on text: what a Hugging Face model implies (its ids and
    attention mask, by keyword), else one batch of a short window of ids."""
    specs = default_inputs(model)
    if specs and specs[0].is_integer:
        return specs
    return [InputSpec((1, min(64, data.input_shape[0])), torch.int64)]


def compile_model(model: nn.Module, settings: Settings, *, data: DataSource | None = None,
                  inputs: Sequence[InputSpec] | None = None, out_dir: str | Path | None = None,
                  formats: Sequence[str] | None = None, bench: Any = None, model_path: str | Path | None = None,
                  instruments: Iterable[Instrument] = (), runtime: Runtime | None = None, onnx_dtype: str = "auto",
                  ) -> tuple[Program, dict[str, Any] | None]:
    """Trace `model`, run `build(settings, ...)` on `runtime` (default: resolved from the settings),
    then (on rank 0, with `out_dir`) export, time with `bench` (a targets.bench.LatencySettings)
    and write report.json and report.md. Returns the final Program and the report (None without
    `out_dir`, and on the other ranks, which leave the process group once the passes are done).

    `formats` None: the defaults (`FORMATS`), of which eager and hf are written where they apply
    (`OPTIONAL_FORMATS`) and never cost pruning; named, each must be written, and hf keeps the
    pruning to the widths the model's config holds. `onnx_dtype`: targets/onnx.py's `onnx_dtype`."""
    settings = settings.resolved()
    runtime = runtime if runtime is not None else Runtime.resolve(settings.device, settings.amp)
    optional = OPTIONAL_FORMATS if formats is None else ()
    formats = [f for f in (FORMATS if formats is None else formats) if f != "hf" or is_model(model)]  # hf: HF models
    passes = build(settings, data, teacher=model.eval() if settings.distill is not None else None,
                   hf_model=model if "hf" in formats else None, hf_exact="hf" not in optional, runtime=runtime)
    prog = trace_model(model, inputs, data, settings.seed, settings.frontend)
    if bench is not None and prog.on_meta:
        raise CompileError("--bench needs real weights, and the model is on the meta device",
                           hint="load a checkpoint with weights, or leave out --bench")
    prog = run(prog, passes, instruments=instruments)
    prog.info["runtime"] = runtime.describe()
    if data is not None:
        prog.info["data"] = data.info()
    distributed.release()  # the collective work is done: no rank waits for rank 0's exports
    if out_dir is None or not runtime.is_main:
        return prog, None  # under torchrun, rank 0 writes the results
    from pcompiler.report import build_report, write_report
    from pcompiler.report_md import write_markdown
    from pcompiler.targets.pytorch import export_all

    export_all(prog, out_dir, formats=formats, model=model, optional=optional, onnx_dtype=onnx_dtype)
    if bench is not None:
        from pcompiler.targets.bench import bench as measure

        before = prog.reference if prog.reference is not None else prog.gm
        prog.info["bench"] = measure({"original": before, "slim": prog.gm}, prog.example_inputs, bench)
        prog.info["bench"]["generation"] = _generation(model, prog, Path(out_dir), bench)
    recorded = {**settings.as_report(data), "data": None if data is None else data.spec, "formats": list(formats),
                "input_shapes": [list(t.shape) for t in prog.example_inputs]}
    report = build_report(prog, model_path=model_path, method=settings.method, settings=recorded)
    write_report(report, Path(out_dir) / "report.json")
    write_markdown(report, out_dir)
    return prog, report


def _generation(model: nn.Module, prog: Program, out_dir: Path, bench: Any) -> dict[str, Any] | None:
    """For a causal language model whose hf/ folder was written: decode and prefill speed of the
    model against the folder's (targets/generation.py), else None (the reason in the log)."""
    from pcompiler.targets.generation import is_causal_lm, measure_generation
    from pcompiler.targets.hf import load_hf

    if not is_causal_lm(model):
        return None
    if not any(e["format"] == "hf" and e["ok"] for e in prog.info.get("exports", [])):
        log.info("generation speed not measured: it runs the slim model from hf/, which was not written")
        return None
    return measure_generation({"original": model, "slim": load_hf(model, out_dir / "hf")}, bench)


def measure(models: Mapping[str, nn.Module], specs: Sequence[InputSpec] | None,
            settings: Any) -> tuple[dict[str, Any], list[InputSpec]]:
    """`pcompile bench`: costs and latency of `models` ("original", and "slim" if given) on random
    inputs of `specs` (default: what the original implies), with `settings` (a
    targets.bench.LatencySettings). Returns the result and the inputs used."""
    from pcompiler.costs import eval_mode
    from pcompiler.targets.bench import bench

    if not specs:
        specs = default_inputs(models["original"])
        log.warning("example inputs %s (from the model; --input-shape sets them)", specs_text(specs))
    if any(s.name for s in specs):
        raise CompileError("pcompile bench times positional inputs only", hint="use --input-shape")
    if any(p.is_meta for m in models.values() for p in m.parameters()):
        raise CompileError("a model is on the meta device and has no weights to time", hint="load one with weights")
    inputs, _ = example_values(specs)
    for name, m in models.items():
        try:
            with torch.no_grad(), eval_mode(m):
                m(*inputs)
        except Exception as e:  # noqa: BLE001 - the user's model or shape: say which
            raise CompileError(f"the {'slim ' if name == 'slim' else ''}model does not run on example inputs "
                               f"{specs_text(specs)}: {first_line(str(e))}", hint="pass --input-shape") from e
    return bench(models, list(inputs), settings), list(specs)
