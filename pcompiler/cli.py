"""The `pcompile` command: the pass pipeline assembled from options.

    pcompile MODEL --method tpp --ratio 0.5 --data digits -o out/
        load, trace, analyze, evaluate, tpp (regularization training, then selection), slim,
        compensate, verify, evaluate, fine-tune, evaluate, export (pt, pt2, onnx), report.json
    pcompile MODEL --method l1 --ratio 0.5 -o out/      no data: one-shot, no accuracy
    pcompile MODEL --analyze                             print the channel groups and stop
    pcompile MODEL ... --bench                           also measure latency, original vs slim
    pcompile bench MODEL [SLIM]                          measure costs and latency only

Under torchrun every process runs the pipeline and trains its share of each batch (DDP);
only rank 0 writes OUT.

Exit codes: 0 done; 2 a user error (bad file, bad option, any CompileError), reported as one
`error: ...` line on stderr; 3 the slim model failed `verify`; 1 a bug in pcompiler. A traceback
is printed only with -v. Messages go to stderr through one rich Console; the --analyze table,
which is the command's result, goes to stdout.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import torch
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from torch import nn

from pcompiler.errors import CompileError
from pcompiler.loading import load_model, parse_input_shapes
from pcompiler.outdir import claim_out_dir  # badinput
from pcompiler.passes.recalibrate import DEFAULT_BATCHES as DEFAULT_RECALIBRATION_BATCHES
from pcompiler.report_md import count_text as _count
from pcompiler.targets.bench import BACKENDS
from pcompiler.train import Distillation

log = logging.getLogger("pcompiler")

ONE_SHOT = ("l1", "random")
TRAINED = ("slimming", "greg1", "greg2", "tpp", "receding")
METHODS = ONE_SHOT + TRAINED
FORMATS = ("pt", "pt2", "onnx")
EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_VERIFY = 0, 1, 2, 3


def _first_line(text: str) -> str:
    """The first non-empty line (some torch errors append notes on later lines)."""
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _error_line(console: Console, text: str) -> None:
    """One line on stderr, never wrapped and never read as markup."""
    line = _first_line(text)
    console.print(f"error: {line}", style="red", markup=False, highlight=False, soft_wrap=True)


class _OneLineErrors(click.Command):
    """A click command whose own usage errors are one `error: ...` line too (exit 2).

    Errors raised by the pipeline are handled in the callback, which knows about -v."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if self is main and argv[:1] == ["bench"]:  # `pcompile bench ...` (a model named bench: ./bench)
            return bench_main.main(argv[1:], "pcompile bench", complete_var, standalone_mode, **extra)
        try:
            rv = super().main(argv, prog_name or "pcompile", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _error_line(Console(stderr=True), "aborted")
            sys.exit(EXIT_BUG)
        except click.ClickException as e:
            _error_line(Console(stderr=True), f"{e.format_message()} (see pcompile --help)")
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


# ---------------------------------------------------------------------------------------------
# Pieces of the pipeline


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The model's own `example_input_shape` if it has one, else a shape that fits its first
    layer (1,3,32,32 when nothing says otherwise)."""
    own = getattr(model, "example_input_shape", None)
    if isinstance(own, tuple) and all(isinstance(d, int) and d > 0 for d in own):
        return own
    for m in model.modules():
        if isinstance(m, nn.Conv1d) and m.in_channels:
            return (1, m.in_channels, 64)
        if isinstance(m, nn.Conv2d) and m.in_channels:
            return (1, m.in_channels, 32, 32)
        if isinstance(m, nn.Conv3d) and m.in_channels:
            return (1, m.in_channels, 8, 32, 32)
        if isinstance(m, nn.Linear) and m.in_features:
            return (1, m.in_features)
        if next(m.parameters(recurse=False), None) is not None:
            break  # the first layer with weights is something else: keep the default
    return (1, 3, 32, 32)


def _shape_text(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join(",".join(str(d) for d in s) for s in shapes)


def _trace(model: nn.Module, shapes: list[tuple[int, ...]], given: bool):
    import pcompiler
    from pcompiler.costs import device_of

    device = device_of(model)
    inputs = tuple(torch.randn(s, device=device) for s in shapes)
    try:
        return pcompiler.trace(model, inputs)
    except CompileError as e:
        where = "" if given else "the default "
        hint = "" if "input-shape" in str(e) else " (pass --input-shape with the shape the model expects)"
        detail = _first_line(str(e))
        raise CompileError(f"tracing the model with {where}input shape {_shape_text(shapes)} failed: {detail}{hint}") from e


def _groups_table(prog) -> Table:
    table = Table(title=f"{len(prog.analysis.groups)} channel groups ({len(prog.analysis.prunable)} prunable)")
    table.add_column("id", justify="right")
    table.add_column("size", justify="right")
    table.add_column("members")
    table.add_column("prunable / pinned because")
    for g in prog.analysis.groups:
        names = list(g.modules)
        members = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        status = "[green]prunable[/]" if g.prunable else escape("; ".join(g.pinned) or "no producer to remove")
        table.add_row(str(g.id), str(g.size), escape(members), status)
    return table


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _summary(console: Console, report: dict[str, Any], report_path: Path) -> None:
    """The numbers before and after as a table, then one line per check and file."""
    from pcompiler.report_md import before_after_rows

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in before_after_rows(report):
        table.add_row(*(escape(c) for c in row))
    console.print(table)

    rows: list[tuple[str, str]] = []
    reg = report.get("regularization") or {}
    if reg:
        rows.append(("training", f"{reg.get('steps')} regularization steps in {reg.get('seconds', 0):.1f}s"))
    groups = report.get("groups") or {}
    if groups:
        rows.append(("channels", f"{groups.get('channels_removed')} removed in {groups.get('pruned')} of {groups.get('total')} groups"))
    verify = report.get("verify") or {}
    if verify:
        if verify.get("ok") is None:
            rows.append(("verify", f"[yellow]skipped[/] {escape(str(verify.get('skipped', '')))}"))
        else:
            state = "[green]ok[/]" if verify.get("ok") else "[red]FAILED[/]"
            approx = verify.get("approximate")
            near = f"; approximate folds at {escape(', '.join(approx['where']))} deviate by up to " \
                   f"{_num(approx['max_error'])}" if approx else ""
            rows.append(("verify", f"{state}, max error {_num(verify.get('max_error'))}{near}"))
    folded = (report.get("compensation") or {}).get("folded")
    if folded:
        rows.append(("compensate", f"{folded} constant inputs of removed channels folded into biases"))
    for e in report.get("exports") or []:
        state = "[green]ok[/]" if e.get("ok") else f"[red]FAILED[/] {escape(str(e.get('error')))}"
        err = f", max error {_num(e.get('max_error'))}" if e.get("ok") and e.get("max_error") is not None else ""
        rows.append((f"{e.get('format')}", f"{escape(str(e.get('path')))} {state}{err}"))
    rows.append(("report", f"{escape(str(report_path))}, {escape(str(report_path.with_suffix('.md')))}"))
    # Plain soft-wrapped lines, not a table: paths stay whole for scripts that read them.
    for label, text in rows:
        console.print(f"[bold]{label:<10}[/]  {text}", soft_wrap=True, highlight=False)


def _latency_table(result: dict[str, Any]) -> Table:
    from pcompiler.report_md import latency_rows

    header, *rows = latency_rows(result)
    m = result.get("machine") or {}
    where = f"{m.get('cpu')}, {result['settings']['threads']} threads" + (f"; {m['gpu']}" if m.get("gpu") else "")
    table = Table(title=f"latency, p50 / p90 ({escape(where)})", box=box.SIMPLE_HEAD)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    return table


def _parse_list(option: str, text: str, choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    if not items:
        raise CompileError(f"{option}: empty list")
    unknown = [f for f in items if choices is not None and f not in choices]
    if unknown:
        raise CompileError(f"{option}: unknown {', '.join(unknown)}", hint=f"choose from {','.join(choices or ())}")
    return items


def _parse_batches(option: str, text: str) -> tuple[int, ...]:
    items = _parse_list(option, text)
    if not all(i.isdigit() and int(i) > 0 for i in items):
        raise CompileError(f"{option} '{text}' is not a comma-separated list of positive integers (e.g. 1,8,64)")
    return tuple(int(i) for i in items)


def _guarded(console: Console, verbose: bool, body: Any) -> int:
    """Run body(); a CompileError or a bug becomes one `error:` line and its exit code."""
    from pcompiler.train import finish_distributed

    try:
        code = body()
        finish_distributed()
        return code
    except CompileError as e:
        if verbose:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        _error_line(console, str(e))
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, traceback with -v
        if verbose:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        _error_line(console, f"internal error: {type(e).__name__}: {_first_line(str(e))} (run with -v for the traceback)")
        return EXIT_BUG


# ---------------------------------------------------------------------------------------------
# The command


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(METHODS), help="How channels are chosen.")
@click.option("--ratio", type=float, help="Fraction of each group's channels to remove, in [0, 1).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="S",
              help="Shape of one example input, e.g. 1,3,32,32 (repeat for several inputs).")
@click.option("--trust", is_flag=True, help="Load MODEL with full pickle (runs code from the file).")
@click.option("--arch", metavar="M:F", help="MODEL is a state dict; build the model by calling F from module M.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Folder for the exports and report.json.")
@click.option("--global/--layerwise", "global_ranking", default=None,
              help="Rank channels across groups, or remove --ratio from each group (default: the method's; "
                   "receding is global, the others layer-wise).")
@click.option("--round-to", type=int, help="Keep a multiple of K channels per group (default: what suits --device's "
              "kernels, 8 on cpu and cuda; 1: no rounding).")
@click.option("--min-keep", type=int, help="Keep at least N channels per group (default: 3 for receding, else 1).")
@click.option("--skip", multiple=True, metavar="GLOB", help="Leave groups touching modules that match GLOB alone.")
@click.option("--speedup", type=float, help="Search the ratio that divides FLOPs by X (instead of --ratio).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for example inputs, --method random, and the data order of training.")
@click.option("--data", "data_spec", metavar="SPEC",
              help="digits | imagefolder:DIR | cifar10:DIR | cifar100:DIR | npz:FILE | py:module:function.")
@click.option("--image-size", type=int, default=224, show_default=True, help="Side of imagefolder images.")
@click.option("--reg-steps", type=int, help="Step budget of the regularization phase; the method's schedule is "
              "scaled to it (default: the paper's schedule, or 100 epochs if shorter).")
@click.option("-p", "--method-option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="A hyperparameter of the method, e.g. -p delta=1e-4 -p lw=1000 (see README).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate of the regularization phase.")
@click.option("--lr-schedule", type=click.Choice(("constant", "cosine", "step")), default="constant", show_default=True,
              help="lr schedule of the regularization phase (step: x0.1 at 50% and 75%).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--finetune-epochs", type=float, default=10, show_default=True,
              help="Epochs of fine-tuning after slim (0: none). Needs --data.")
@click.option("--finetune-lr", type=float, help="Fine-tuning lr, cosine to 0 (default: --lr).")
@click.option("--distill", is_flag=True, help="Fine-tune with the input model as teacher: (1 - alpha) * CE + "
              "alpha * T^2 * KL(teacher || student). Needs --data.")
@click.option("--distill-temperature", type=float, default=Distillation.temperature, show_default=True,
              help="Temperature T of --distill (> 0; 1: the plain probabilities).")
@click.option("--distill-alpha", type=float, default=Distillation.alpha, show_default=True,
              help="Weight alpha of the teacher's term in --distill, in [0, 1] (0: cross-entropy only).")
@click.option("--distill-regularization", is_flag=True, help="With --distill, also distill during the regularization "
              "phase of a trained method.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] for training and evaluation.")
@click.option("--amp", is_flag=True, help="Mixed precision (bfloat16, or float16 with loss scaling) on CUDA.")
@click.option("--workers", type=int, default=0, show_default=True, help="Data loader worker processes.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Write OUT/checkpoints/<phase>.pt every N steps (0: never).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT/checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace another run's files in OUT (others are kept).")  # badinput
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--bench", "run_bench", is_flag=True, help="Measure latency of the original and slim models, alternately.")
@click.option("--bench-batches", default="1,8,64", show_default=True, help="Batch sizes --bench measures.")
@click.option("--bench-backends", help=f"Backends --bench uses, from {','.join(BACKENDS)} (default: all this machine has).")
@click.option("--recalibrate-batches", type=int, default=DEFAULT_RECALIBRATION_BATCHES, show_default=True,
              help="Training batches on which the norms' running statistics are re-estimated after slim "
                   "(with --data; 0: no recalibration).")
@click.option("--no-recalibrate", is_flag=True, help="Do not recalibrate (same as --recalibrate-batches 0).")
@click.option("--no-compensate", is_flag=True, help="Do not fold the constant values of removed channels into "
              "the consumers' biases (default: fold them; with --data, near-constant ones too).")
@click.option("--analyze", is_flag=True, help="Print the channel groups and stop.")
@click.option("--formats", default=",".join(FORMATS), show_default=True, help="Exports to write, comma-separated.")
@click.option("--dump-ir", type=click.Path(path_type=Path), metavar="DIR", help="Write the graph after each pass to DIR.")
@click.option("-v", "--verbose", is_flag=True, help="Log each pass; print tracebacks on errors.")
def main(model_path: Path, verbose: bool, **options: Any) -> int:
    """Prune the channels of MODEL (a file written by torch.save), verify and export it.

    `pcompile bench --help`: measuring latency on its own."""
    console = Console(stderr=True)
    _setup_logging(console, verbose)
    return _guarded(console, verbose, lambda: _compile(console, model_path, **options))


_handler: logging.Handler | None = None


def _setup_logging(console: Console, verbose: bool) -> None:
    global _handler
    if _handler is not None:  # a second run in one process (tests) replaces the first's handler
        log.removeHandler(_handler)
    _handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    level = logging.INFO if verbose else logging.WARNING
    _handler.setLevel(level)
    log.addHandler(_handler)
    log.setLevel(level)


def _parse_method_options(items: tuple[str, ...]) -> dict[str, Any]:
    """-p KEY=VALUE pairs; values are Python literals (1e-4, 10, true, none) or else strings."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CompileError(f"-p {item}: expected KEY=VALUE", hint="e.g. -p delta=1e-4")
        word = {"true": "True", "false": "False", "none": "None"}.get(text.strip().lower(), text.strip())
        try:
            out[key.strip()] = ast.literal_eval(word)
        except (ValueError, SyntaxError):
            out[key.strip()] = text.strip()
    return out


def _check_options(method: str | None, ratio: float | None, speedup: float | None, out_dir: Path | None,
                   analyze: bool, data_spec: str | None, round_to: int | None, min_keep: int | None,
                   reg_steps: int | None, finetune_epochs: float, checkpoint_every: int) -> None:
    if not analyze:
        if method is None:
            raise CompileError(f"--method is required ({', '.join(METHODS)}), unless --analyze")
        if ratio is None and speedup is None:
            raise CompileError("--ratio is required (the fraction of channels to remove, e.g. 0.5)")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise CompileError(f"--ratio must be in [0, 1), got {ratio}", hint="0.5 removes half of each group's channels")
        if out_dir is None:
            raise CompileError("-o/--out is required: the folder for the exports and report.json")
        if method in TRAINED and data_spec is None:
            raise CompileError(f"--method {method} trains the model and needs --data",
                               hint="e.g. --data digits, --data cifar10:DIR, --data imagefolder:DIR")
    if speedup is not None and speedup < 1.0:
        raise CompileError(f"--speedup must be at least 1, got {speedup}", hint="2 halves the FLOPs")
    if (round_to is not None and round_to < 1) or (min_keep is not None and min_keep < 1):
        raise CompileError("--round-to and --min-keep must be at least 1")
    if (reg_steps is not None and reg_steps < 0) or finetune_epochs < 0 or checkpoint_every < 0:
        raise CompileError("--reg-steps, --finetune-epochs and --checkpoint-every must be >= 0")


def _distillation(distill: bool, temperature: float, alpha: float, regularization: bool, method: str | None,
                  data_spec: str | None, finetune_epochs: float) -> Distillation | None:
    """The --distill settings, checked (None without --distill)."""
    if not distill:
        if regularization:
            raise CompileError("--distill-regularization needs --distill", hint="add --distill, or leave it out")
        return None
    if data_spec is None:
        raise CompileError("--distill trains with the input model as teacher and needs --data", hint="e.g. --data digits")
    if regularization and method not in TRAINED:
        raise CompileError(f"--distill-regularization: --method {method} has no regularization phase",
                           hint=f"use it with {', '.join(TRAINED)}, or leave it out")
    if finetune_epochs == 0 and not regularization:
        raise CompileError("--distill with --finetune-epochs 0: there is no training to distill into",
                           hint="fine-tune (--finetune-epochs N), or add --distill-regularization")
    settings = Distillation(temperature=temperature, alpha=alpha)
    settings.check("--distill")
    return settings


def _bench_settings(batches: str, backends: str | None, **more: Any):
    from pcompiler.targets.bench import LatencySettings, available_backends

    chosen = None if backends is None else _parse_list("--backends", backends, BACKENDS)
    have = available_backends()
    missing = [b for b in chosen or () if b not in have]
    if missing:
        raise CompileError(f"backend {', '.join(missing)} is not available on this machine",
                           hint=f"this machine has {','.join(have)}")
    return LatencySettings(batch_sizes=_parse_batches("--batches", batches), backends=chosen, **more)


def _compile(console: Console, model_path: Path, *, method: str | None, ratio: float | None,
             input_shapes: tuple[str, ...], trust: bool, arch: str | None, out_dir: Path | None,
             global_ranking: bool | None, round_to: int | None, min_keep: int | None, skip: tuple[str, ...],
             speedup: float | None, seed: int, analyze: bool, formats: str, dump_ir: Path | None,
             data_spec: str | None, image_size: int, reg_steps: int | None, method_options: tuple[str, ...],
             lr: float, lr_schedule: str, batch_size: int, momentum: float, weight_decay: float, finetune_epochs: float,
             distill: bool, distill_temperature: float, distill_alpha: float, distill_regularization: bool,
             finetune_lr: float | None, device: str, amp: bool, workers: int, checkpoint_every: int,
             resume: bool, overwrite: bool, no_progress: bool, run_bench: bool, bench_batches: str,
             bench_backends: str | None, no_compensate: bool, recalibrate_batches: int, no_recalibrate: bool) -> int:
    import dataclasses

    from pcompiler.passmanager import dump_instrument, make_pass, run
    from pcompiler.targets.bench import default_round_to
    from pcompiler.train import TrainConfig, is_main_process

    # Check every option before the (slow) loads.
    shapes = parse_input_shapes(input_shapes)
    _check_options(method, ratio, speedup, out_dir, analyze, data_spec, round_to, min_keep, reg_steps,
                   finetune_epochs, checkpoint_every)
    if recalibrate_batches < 0:
        raise CompileError(f"--recalibrate-batches must be >= 0, got {recalibrate_batches}",
                           hint="0 (or --no-recalibrate) turns recalibration off")
    if no_recalibrate:
        recalibrate_batches = 0
    distillation = _distillation(distill, distill_temperature, distill_alpha, distill_regularization, method,
                                 data_spec, finetune_epochs)
    export_formats = _parse_list("--formats", formats, FORMATS)
    extra = _parse_method_options(method_options)
    bench_settings = _bench_settings(bench_batches, bench_backends) if run_bench else None
    if round_to is None:
        round_to = default_round_to(device)
    if out_dir is not None and not analyze:  # badinput: claim OUT before the slow work (pcompiler/outdir.py)
        claim_out_dir(out_dir, overwrite=overwrite, resume=resume, model=model_path,
                      settings=dict(method=method, ratio=ratio, speedup=speedup, data=data_spec, seed=seed))

    torch.manual_seed(seed)
    data = None
    if data_spec is not None:
        from pcompiler.data import check_model, load_data

        data = load_data(data_spec, image_size=image_size)
    model = load_model(model_path, trust=trust, arch=arch)
    if data is not None:
        check_model(data, model)
    if not shapes:
        shapes = [(1, *data.input_shape)] if data is not None else [default_input_shape(model)]
        log.info("example input shape %s (from %s; --input-shape changes it)", _shape_text(shapes),
                 "the data" if data is not None else "the model")
    prog = _trace(model, shapes, given=bool(input_shapes))
    if bench_settings is not None and prog.on_meta:
        raise CompileError("--bench needs real weights, and the model is on the meta device",
                           hint="load a checkpoint with weights, or leave out --bench")
    instruments = [dump_instrument(dump_ir)] if dump_ir is not None else []

    if analyze:
        prog = run(prog, [make_pass("analyze")], instruments=instruments)
        Console().print(_groups_table(prog))
        for node, why in prog.analysis.notes:
            console.print(f"note: {node}: {why}", markup=False, highlight=False)
        return EXIT_OK

    settings: dict[str, Any] = {"ratio": ratio if ratio is not None else 0.5, "round_to": round_to,
                                "skip": tuple(skip), "speedup": speedup}
    if global_ranking is not None:
        settings["global_ranking"] = global_ranking
    if min_keep is not None:
        settings["min_keep"] = min_keep
    if method == "random":
        settings["seed"] = seed
    ckpt = Path(out_dir) / "checkpoints"
    common = dict(momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, device=device, amp=amp,
                  seed=seed, workers=workers, checkpoint_every=checkpoint_every, resume=resume,
                  progress=not no_progress)
    if method in TRAINED:
        settings.update(data=data, steps=reg_steps,
                        train=TrainConfig(lr=lr, schedule=lr_schedule, checkpoint=str(ckpt / "regularization.pt"),
                                          **common))
    if method in TRAINED and distill_regularization:  # the teacher: the input model, not the copy trained
        settings.update(teacher=model.eval(), train=dataclasses.replace(settings["train"], distill=distillation))
    unknown = set(extra) & (set(settings) | {"teacher"})
    if unknown:
        raise CompileError(f"-p {', '.join(sorted(unknown))}: set that with its own option", hint="see pcompile --help")
    method_pass = make_pass(method, **settings, **extra)

    passes = [make_pass("analyze")]
    if data is not None:
        passes.append(make_pass("evaluate", data=data, key="acc_before", device=device))
    passes += [method_pass, make_pass("slim")]
    if not no_compensate:
        passes.append(make_pass("compensate", data=data))
    passes.append(make_pass("verify"))
    if data is not None:
        if recalibrate_batches > 0:
            passes += [make_pass("evaluate", data=data, key="acc_before_recalibration", device=device),
                       make_pass("recalibrate", data=data, batches=recalibrate_batches, batch_size=batch_size,
                                 seed=seed, device=device)]
        passes.append(make_pass("evaluate", data=data, key="acc_pruned", device=device))
        if finetune_epochs > 0:
            ft = TrainConfig(lr=finetune_lr if finetune_lr is not None else lr, schedule="cosine",
                             checkpoint=str(ckpt / "finetune.pt"), distill=distillation, **common)
            teacher = model.eval() if distillation is not None else None
            passes += [make_pass("finetune", data=data, epochs=finetune_epochs, train=ft, teacher=teacher),
                       make_pass("evaluate", data=data, key="acc_final", device=device)]
    prog = run(prog, passes, instruments=instruments)
    if data is not None:
        prog.info["data"] = data.info()
    if not is_main_process():
        return EXIT_OK  # under torchrun, rank 0 writes the results

    from pcompiler.report import build_report, write_report
    from pcompiler.targets.pytorch import export_all

    export_all(prog, out_dir, formats=export_formats)
    if bench_settings is not None:
        from pcompiler.targets.bench import bench

        before = prog.reference if prog.reference is not None else prog.gm
        prog.info["bench"] = bench({"original": before, "slim": prog.gm}, prog.example_inputs, bench_settings)
    report_settings = {k: v for k, v in settings.items() if k not in ("data", "train", "teacher")}
    report_settings["distill"] = None if distillation is None else {
        **dataclasses.asdict(distillation), "finetune": finetune_epochs > 0, "regularization": distill_regularization}
    report_settings.update(skip=list(skip), input_shapes=[list(s) for s in shapes], formats=list(export_formats),
                           data=data_spec, reg_steps=reg_steps, method_options=extra, lr=lr, lr_schedule=lr_schedule,
                           finetune_epochs=finetune_epochs if data is not None else 0,
                           finetune_lr=finetune_lr if finetune_lr is not None else lr,
                           recalibrate_batches=recalibrate_batches if data is not None else 0,
                           compensate=not no_compensate, **common)
    report = build_report(prog, model_path=model_path, method=method, settings=report_settings)
    report_path = write_report(report, Path(out_dir) / "report.json")
    from pcompiler.report_md import write_markdown

    write_markdown(report, out_dir)
    _summary(console, report, report_path)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# pcompile bench


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("slim_path", metavar="[SLIM]", required=False, type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="S",
              help="Shape of one example input, e.g. 1,3,224,224 (repeat for several inputs); the batch "
                   "dimension is replaced by each of --batches.")
@click.option("--trust", is_flag=True, help="Load the files with full pickle (runs code from them).")
@click.option("--arch", metavar="M:F", help="MODEL is a state dict; build the model by calling F from module M.")
@click.option("--batches", default="1,8,64", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--backends", help=f"Comma-separated, from {','.join(BACKENDS)} (default: all this machine has).")
@click.option("--threads", type=int, help="CPU threads for torch and onnxruntime (default: torch's setting).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed calls per model before timing.")
@click.option("--min-reps", type=int, default=10, show_default=True, help="Timed calls per model, at least.")
@click.option("--min-time", type=float, default=1.0, show_default=True,
              help="Seconds each model is timed at least, per backend and batch size.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON here.")
@click.option("-v", "--verbose", is_flag=True, help="Log each measurement; print tracebacks on errors.")
def bench_main(model_path: Path, verbose: bool, **options: Any) -> int:
    """Measure parameters, FLOPs and latency of MODEL, or of MODEL against SLIM, timed alternately.

    SLIM is a model file (torch.save, or a torch.export .pt2) or the folder `pcompile -o` wrote,
    whose model.pt2 is then used. The speedup is the median of the per-round ratios
    MODEL / SLIM; efficiency is the speedup divided by the FLOPs reduction."""
    console = Console(stderr=True)
    _setup_logging(console, verbose)
    return _guarded(console, verbose, lambda: _bench(console, model_path, **options))


def _bench(console: Console, model_path: Path, *, slim_path: Path | None, input_shapes: tuple[str, ...], trust: bool,
           arch: str | None, batches: str, backends: str | None, threads: int | None, warmup: int, min_reps: int,
           min_time: float, json_path: Path | None) -> int:
    from pcompiler.costs import eval_mode
    from pcompiler.report import write_report
    from pcompiler.targets.bench import bench

    if (threads is not None and threads < 1) or warmup < 0 or min_reps < 1 or min_time < 0:
        raise CompileError("--threads and --min-reps must be at least 1, --warmup and --min-time at least 0")
    shapes = parse_input_shapes(input_shapes)
    settings = _bench_settings(batches, backends, threads=threads, warmup=warmup, min_reps=min_reps,
                               min_seconds=min_time)
    models = {"original": load_model(model_path, trust=trust, arch=arch)}
    if slim_path is not None:
        if slim_path.is_dir():
            slim_path = slim_path / "model.pt2"
        models["slim"] = load_model(slim_path, trust=trust)
    if not shapes:
        shapes = [default_input_shape(models["original"])]
        log.warning("example input shape %s (from the model's first layer; --input-shape sets it)", _shape_text(shapes))
    if any(p.is_meta for m in models.values() for p in m.parameters()):
        raise CompileError("a model is on the meta device and has no weights to time", hint="load one with weights")
    inputs = [torch.randn(s) for s in shapes]
    for name, m in models.items():
        try:
            with torch.no_grad(), eval_mode(m):
                m(*inputs)
        except Exception as e:
            raise CompileError(f"the {'slim ' if name == 'slim' else ''}model does not run on input shape "
                               f"{_shape_text(shapes)}: {_first_line(str(e))}", hint="pass --input-shape") from e
    result = bench(models, inputs, settings)
    costs = result["costs"]
    for name, c in costs.items():
        console.print(f"[bold]{name:<10}[/]  {_count(c['params'])} params, {_count(c['flops'])} FLOPs "
                      f"at input {_shape_text(shapes)}", highlight=False)
    Console(width=None if sys.stdout.isatty() else 160).print(_latency_table(result))
    if json_path is not None:
        write_report(result, json_path)
        console.print(f"[bold]{'json':<10}[/]  {escape(str(json_path))}", soft_wrap=True, highlight=False)
    return EXIT_OK  # a backend that failed is a row of the table, and a warning


if __name__ == "__main__":  # python -m pcompiler.cli
    main()
