"""The `pcompile` command: options in, the pipeline (pcompiler.pipeline) run, results out.

    pcompile MODEL --method tpp --ratio 0.5 --data digits -o out/     (the `compile` command)
    pcompile MODEL --method l1 --ratio 0.5 -o out/      no data: one-shot, no accuracy
    pcompile MODEL --analyze                             print the channel groups and stop
    pcompile MODEL ... --bench                           also measure latency, original vs slim
    pcompile bench MODEL [SLIM]                          measure costs and latency only

`compile` is the default command: `pcompile MODEL ...` is `pcompile compile MODEL ...` (a model
file named like a command: ./bench). Under torchrun every process runs the pipeline and trains
its share of each batch (DDP); only rank 0 writes OUT.

Exit codes (pcompiler.errors): 0 done; 2 a user error (bad file, bad option, a pass that cannot
handle the model), one `error: ...` line on stderr; 3 the slim model failed `verify`; 1 a bug
in pcompiler (`internal error ...`, naming the pass). A traceback is printed only with -v.
Messages go to stderr through one rich Console; the --analyze table and the bench table, which
are the commands' results, go to stdout.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from pcompiler.console import error_line, generation_table, groups_table, latency_table, summary
from pcompiler.data import is_text
from pcompiler.distill import Distillation
from pcompiler.errors import EXIT_BUG, EXIT_EXPORT, EXIT_OK, CompileError, InternalError, first_line, one_line
from pcompiler.input_checks import check_input_memory
from pcompiler.inputs import default_seq_len, parse_inputs, specs_text
from pcompiler.loading import load_model
from pcompiler.outdir import claim_out_dir
from pcompiler.passes.analyze import ATTENTION
from pcompiler.passes.recalibrate import DEFAULT_BATCHES
from pcompiler.passes.trace import FRONTENDS
from pcompiler.pipeline import (
    FORMATS,
    Settings,
    compile_model,
    methods,
    trace_model,
    trains,
)
from pcompiler.report_md import count_text
from pcompiler.runtime import Runtime
from pcompiler.targets.bench import BACKENDS
from pcompiler.targets.onnx import ONNX_DTYPES
from pcompiler.train import TrainConfig

__all__ = ["main"]

log = logging.getLogger("pcompiler")
_CONTEXT = {"help_option_names": ["-h", "--help"]}


class _Pcompile(click.Group):
    """`pcompile [compile] MODEL ...` and `pcompile bench ...`; click's own usage errors become
    one `error: ...` line too (exit 2). Errors of the pipeline are handled in `_guarded`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:  # `pcompile --help` too: the main command's help
            args = ["compile", *args]
        return super().parse_args(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name or "pcompile", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            error_line(Console(stderr=True), "aborted")
            sys.exit(EXIT_BUG)
        except click.ClickException as e:
            error_line(Console(stderr=True), f"{e.format_message()} (see pcompile --help)")
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


@click.group(cls=_Pcompile, context_settings=_CONTEXT)
def pcompile() -> None:
    """Prune the channels of a PyTorch model, verify and export it (`pcompile MODEL ...`, the
    `compile` command), or measure models (`pcompile bench`)."""


main = pcompile  # the console script's entry point


def _guarded(console: Console, verbose: bool, body: Callable[[], int]) -> int:
    """Run body(); a CompileError is one `error:` line and its exit code, anything else a bug (1).
    Under torchrun a rank that fails leaves its process group at once, so its peers stop too."""
    from pcompiler import distributed

    try:
        code = body()
        distributed.finish()
        return code
    except (CompileError, InternalError) as e:
        distributed.abort()
        if verbose:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        more = " (run with -v for the traceback)" if isinstance(e, InternalError) and not verbose else ""
        error_line(console, f"{first_line(str(e))}{more}")
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a bug outside any pass: say so in one line
        distributed.abort()
        if verbose:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        error_line(console, f"internal error: {one_line(e)} (run with -v for the traceback)")
        return EXIT_BUG


# ---------------------------------------------------------------------------------------------
# pcompile [compile]


@pcompile.command("compile", context_settings=_CONTEXT)
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(list(methods())), help="How channels are chosen.")
@click.option("--ratio", type=float, help="Fraction of each group's channels to remove, in [0, 1).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="S[:DTYPE]",
              help="Shape of one positional example input, e.g. 1,3,32,32, or 1,128:int64 for token ids "
                   "(drawn below the vocabulary of the embedding they feed); repeat for several inputs.")
@click.option("--input", "named_inputs", multiple=True, metavar="NAME=S[:DTYPE]",
              help="A keyword example input, e.g. attention_mask=1,128:int64 (0/1 where no embedding reads it); "
                   "repeat for several. A Hugging Face model's config gives the default.")
@click.option("--trust", is_flag=True, help="Load MODEL with full pickle (runs code from the file).")
@click.option("--arch", metavar="M:F", help="MODEL is a state dict; build the model by calling F from module M.")
@click.option("--frontend", type=click.Choice(FRONTENDS), default="auto", show_default=True,
              help="How the model is read: fx (symbolic tracing), export (torch.export), auto (fx where it reads "
              "the whole model, else export; keyword inputs always export).")
@click.option("--attention", type=click.Choice(ATTENTION), default="heads", show_default=True,
              help="How attention shrinks: heads (whole heads; with grouped-query attention whole key/value heads "
              "with their query heads) or head_dim (every head narrower).")
@click.option("--prune-normalized", is_flag=True,
              help="Also prune channels a LayerNorm normalizes (a transformer's residual stream). Not exact: the slim "
              "LayerNorm's statistics cover the kept channels only; verify proves the rest and reports the deviation "
              "under 'approximate', and fine-tuning recovers it.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Folder for the exports and report.json.")
@click.option("--global/--layerwise", "global_ranking", default=None,
              help="Rank channels across groups, or remove --ratio from each group (default: the method's; "
                   "receding is global, the others layer-wise).")
@click.option("--round-to", type=int, help="Keep a multiple of K channels per group (default: what suits --device's "
              "kernels, 8 on cpu and cuda; with --latency, the backend's: the CPU's channel block, 16 with AVX-512; 1: no "
              "rounding).")
@click.option("--min-keep", type=int, help="Keep at least N channels per group (default: 3 for receding, else 1).")
@click.option("--skip", multiple=True, metavar="GLOB", help="Leave groups touching modules that match GLOB alone.")
@click.option("--speedup", type=float, help="Search the ratio that divides FLOPs by X (instead of --ratio).")
@click.option("--latency", type=float, help="Prune until the exported model runs X times faster than the original, "
              "measured on --backend (instead of --ratio).")
@click.option("--latency-predictor", type=click.Choice(["profile", "flops"]), default="profile", show_default=True,
              help="What predicts --latency's steps: a per-kernel model measured with onnxruntime's profiler "
                   "(onnxruntime backends), or FLOPs.")
@click.option("--latency-allocation", type=click.Choice(["uniform", "knapsack"]), default="uniform", show_default=True,
              help="How --latency's predicted budget is spent: one ratio for every group, or a knapsack of score "
                   "against the kernel model's seconds, uneven across groups.")
@click.option("--backend", "latency_backend", default="onnxruntime-cpu", show_default=True,
              help=f"Where --latency is measured: one of {', '.join(BACKENDS)}.")
@click.option("--latency-batch", type=int, default=1, show_default=True, help="Batch size --latency is measured at.")
@click.option("--threads", type=int, help="CPU threads of the latency measurements (--latency, --bench; default: "
              "torch's setting).")
@click.option("--params-removed", type=float, help="Search the ratio that removes this fraction of the parameters "
              "(instead of --ratio), e.g. 0.2.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for example inputs, --method random, and the data order of training.")
@click.option("--data", "data_spec", metavar="SPEC",
              help="digits | imagefolder:DIR | cifar10:DIR | cifar100:DIR | npz:FILE | py:module:function | "
              "text:FILE | tokens:FILE[,VAL] (the last two for language models).")
@click.option("--image-size", type=int, default=224, show_default=True, help="Side of imagefolder images.")
@click.option("--seq-len", type=int, help="Tokens per window of text data (default: min(512, the model's maximum)).")
@click.option("--reg-steps", type=int, help="Step budget of the regularization phase; the method's schedule is "
              "scaled to it (default: the paper's schedule, or 100 epochs if shorter).")
@click.option("--calibration-samples", type=int, help="Samples (windows of text) of the training data that "
              "--method calib measures activations on (default 128).")
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
@click.option("--amp", is_flag=True, help="Mixed-precision training on CUDA: bfloat16 on Ampere and later, float16 with "
              "loss scaling before (T4, V100).")
@click.option("--workers", type=int, default=0, show_default=True, help="Data loader worker processes.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Write OUT/checkpoints/<phase>.pt every N steps (0: never).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT/checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace another run's files in OUT (other files there are kept).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--bench", "run_bench", is_flag=True, help="Measure latency of the original and slim models, alternately.")
@click.option("--bench-batches", default="1,8,64", show_default=True, help="Batch sizes --bench measures.")
@click.option("--bench-backends", help=f"Backends --bench uses, from {','.join(BACKENDS)} (default: all this machine has).")
@click.option("--recalibrate-batches", type=int, default=DEFAULT_BATCHES, show_default=True,
              help="Training batches on which the norms' running statistics are re-estimated after slim "
                   "(with --data; 0: no recalibration).")
@click.option("--no-recalibrate", is_flag=True, help="Do not recalibrate (same as --recalibrate-batches 0).")
@click.option("--no-compensate", is_flag=True, help="Do not fold the constant values of removed channels into "
              "the consumers' biases (default: fold them; with --data, near-constant ones too).")
@click.option("--compensate", "compensate", type=click.Choice(["constant", "mean", "lstsq"]),
              help="With --data, what is folded for removed channels that are not near-constant: nothing "
              "(constant; default for images), their mean input (mean), or their least-squares prediction from "
              "the kept inputs, which changes the kept weights too (lstsq; default for text data).")
@click.option("--analyze", is_flag=True, help="Print the channel groups and stop.")
@click.option("--formats", help=f"Exports to write, comma-separated (default: {','.join(FORMATS)}, of which eager and hf "
              "only where they apply). eager: your model's class with the slim layers in place; hf: a save_pretrained "
              "folder OUT/hf, for Hugging Face models. Named here, each must be written (else exit 4), and hf "
              "prunes only the widths its config holds (feed-forward widths, and for RMSNorm'd models hidden size and "
              "heads).")
@click.option("--onnx-dtype", type=click.Choice(ONNX_DTYPES), default="auto", show_default=True,
              help="The dtype of model.onnx. auto: the model's, but a bfloat16 or float16 model is written in float32 "
              "for onnxruntime's CPU provider, in float16 where its CUDA provider runs.")
@click.option("--dump-ir", type=click.Path(path_type=Path), metavar="DIR", help="Write the graph after each pass to DIR.")
@click.option("-v", "--verbose", is_flag=True, help="Log each pass; print tracebacks on errors.")
def compile_command(model_path: Path, verbose: bool, **options: Any) -> int:
    """Prune the channels of MODEL (a file written by torch.save), verify and export it.

    Commands: `pcompile [compile] MODEL ...` (this one) and `pcompile bench MODEL [SLIM]`
    (measure latency on its own; `pcompile bench --help`)."""
    console = Console(stderr=True)
    _setup_logging(console, verbose)
    return _guarded(console, verbose, lambda: _compile(console, model_path, **options))


# Options that do something only with another one: given without it, they are refused, not ignored.
# (option, what it needs, whether the options given have it)
_NEEDS: tuple[tuple[str, str, Callable[[dict[str, Any]], bool]], ...] = (
    ("distill_temperature", "--distill", lambda o: o["distill"]),
    ("distill_alpha", "--distill", lambda o: o["distill"]),
    ("bench_batches", "--bench", lambda o: o["run_bench"]),
    ("bench_backends", "--bench", lambda o: o["run_bench"]),
    ("latency_backend", "--latency", lambda o: o["latency"] is not None),
    ("latency_batch", "--latency", lambda o: o["latency"] is not None),
    ("latency_predictor", "--latency", lambda o: o["latency"] is not None),
    ("latency_allocation", "--latency", lambda o: o["latency"] is not None),
    ("threads", "--latency or --bench", lambda o: o["latency"] is not None or o["run_bench"]),
    ("image_size", "--data imagefolder:DIR", lambda o: (o["data_spec"] or "").startswith("imagefolder:")),
    ("seq_len", "--data text:FILE, tokens:FILE or kjv", lambda o: is_text(o["data_spec"])),
    ("finetune_epochs", "--data", lambda o: o["data_spec"] is not None),
    ("finetune_lr", "--data", lambda o: o["data_spec"] is not None),
    ("recalibrate_batches", "--data", lambda o: o["data_spec"] is not None),
    ("workers", "--data", lambda o: o["data_spec"] is not None),
    ("checkpoint_every", "--data", lambda o: o["data_spec"] is not None),
    ("compensate", "--data", lambda o: o["data_spec"] is not None),
    ("compensate", "compensation (leave out --no-compensate)", lambda o: not o["no_compensate"]),
    ("reg_steps", "a method that trains (--method tpp, greg1, ...)", lambda o: trains(o["method"])),
    ("calibration_samples", "--method calib", lambda o: o["method"] == "calib"),
)


def _refuse_orphans(o: dict[str, Any]) -> None:
    ctx = click.get_current_context()
    for name, needs, has in _NEEDS:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE and not has(o):
            flag = "--" + name.replace("_", "-")
            raise CompileError(f"{flag} does nothing without {needs}", hint=f"add {needs}, or leave out {flag}")


def _settings(o: dict[str, Any]) -> Settings:
    """The Settings the options say (parsed, not yet checked against the data)."""
    distill = Distillation(o["distill_temperature"], o["distill_alpha"]) if o["distill"] else None
    train = TrainConfig(lr=o["lr"], schedule=o["lr_schedule"], batch_size=o["batch_size"], momentum=o["momentum"],
                        weight_decay=o["weight_decay"], workers=o["workers"], checkpoint_every=o["checkpoint_every"],
                        resume=o["resume"], progress=not o["no_progress"])
    return Settings(
        method=o["method"], ratio=o["ratio"], speedup=o["speedup"], params_removed=o["params_removed"],
        latency=o["latency"], latency_backend=o["latency_backend"], latency_batch=o["latency_batch"],
        latency_predictor=o["latency_predictor"], latency_allocation=o["latency_allocation"], threads=o["threads"],
        global_ranking=o["global_ranking"],
        round_to=o["round_to"], min_keep=o["min_keep"], skip=tuple(o["skip"]), seed=o["seed"],
        method_options=_parse_method_options(o["method_options"]), reg_steps=o["reg_steps"], train=train,
        calibration_samples=o["calibration_samples"],
        finetune_epochs=o["finetune_epochs"], finetune_lr=o["finetune_lr"], distill=distill,
        distill_regularization=o["distill_regularization"],
        recalibrate_batches=0 if o["no_recalibrate"] else o["recalibrate_batches"], compensate=not o["no_compensate"],
        compensate_fit=o["compensate"],
        checkpoints=None if o["out_dir"] is None else str(Path(o["out_dir"]) / "checkpoints"), frontend=o["frontend"],
        attention=o["attention"], prune_normalized=o["prune_normalized"], device=o["device"], amp=o["amp"])


def _compile(console: Console, model_path: Path, **o: Any) -> int:
    from pcompiler.passmanager import dump_instrument

    specs = parse_inputs(o["input_shapes"], o["named_inputs"])
    instruments = [dump_instrument(o["dump_ir"])] if o["dump_ir"] is not None else []
    if o["analyze"]:
        prog = trace_model(load_model(model_path, trust=o["trust"], arch=o["arch"]), specs, seed=o["seed"],
                           frontend=o["frontend"])
        from pcompiler.passmanager import make_pass, run

        prog = run(prog, [make_pass("analyze", attention=o["attention"],
                                                prune_normalized=o["prune_normalized"])], instruments=instruments)
        Console().print(groups_table(prog))
        for node, why in prog.analysis.notes:
            console.print(f"note: {node}: {why}", markup=False, highlight=False)
        return EXIT_OK
    # Check every option before the (slow) loads.
    if o["method"] is None:
        raise CompileError(f"--method is required ({', '.join(methods())}), unless --analyze")
    if all(o[k] is None for k in ("ratio", "speedup", "params_removed", "latency")):
        raise CompileError("--ratio is required (the fraction of channels to remove, e.g. 0.5; or --speedup, "
                           "--params-removed, --latency)")
    if o["out_dir"] is None:
        raise CompileError("-o/--out is required: the folder for the exports and report.json")
    _refuse_orphans(o)
    settings = _settings(o)
    settings.check(has_data=o["data_spec"] is not None)
    runtime = Runtime.resolve(settings.device, settings.amp)  # the process group joined before any pass
    formats = None if o["formats"] is None else _parse_list("--formats", o["formats"], FORMATS)
    bench = (_bench_settings(o["bench_batches"], o["bench_backends"], device=_cuda_bench_device(runtime),
                             threads=o["threads"])
             if o["run_bench"] else None)
    if bench is not None and specs:
        check_input_memory([s.shape for s in specs], largest_batch=max(bench.batch_sizes), option="--bench-batches",
                           element_bytes=[s.dtype.itemsize for s in specs])
    claim_out_dir(o["out_dir"], overwrite=o["overwrite"], resume=o["resume"], model=model_path,
                  settings={"method": settings.method, "ratio": settings.ratio, "speedup": settings.speedup,
                            "params_removed": settings.params_removed, "latency": settings.latency,
                            "data": o["data_spec"], "seed": settings.seed, "frontend": settings.frontend,
                            "attention": settings.attention, "prune_normalized": settings.prune_normalized})
    model = load_model(model_path, trust=o["trust"], arch=o["arch"])
    data = None
    if o["data_spec"] is not None:
        from pcompiler.data import check_model, load_data

        data = load_data(o["data_spec"], image_size=o["image_size"], seq_len=o["seq_len"] or default_seq_len(model),
                         tokenizer=model_path if model_path.is_dir() else None, seed=o["seed"])
        check_model(data, model)
    prog, report = compile_model(model, settings, data=data, inputs=specs, out_dir=o["out_dir"], formats=formats,
                                 bench=bench, model_path=model_path, instruments=instruments, runtime=runtime,
                                 onnx_dtype=o["onnx_dtype"])
    if report is None:
        return EXIT_OK
    summary(console, report, Path(o["out_dir"]) / "report.json")
    failed = [e["format"] for e in report.get("exports") or [] if not e["ok"] and not e.get("skipped")]
    if failed:
        error_line(console, f"the {', '.join(failed)} export{'s' if len(failed) > 1 else ''} asked for failed (see the "
                   f"lines above; what was written stays, marked in report.json)")
        return EXIT_EXPORT
    return EXIT_OK


@pcompile.command("bench", context_settings=_CONTEXT)
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
@click.option("--device", default="cuda", show_default=True,
              help="The GPU of the CUDA backends, cuda or cuda:N (the CPU backends need none).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed calls per model before timing.")
@click.option("--min-reps", type=int, default=10, show_default=True, help="Timed calls per model, at least.")
@click.option("--min-time", type=float, default=1.0, show_default=True,
              help="Seconds each model is timed at least, per backend and batch size.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON here.")
@click.option("-v", "--verbose", is_flag=True, help="Log each measurement; print tracebacks on errors.")
def bench_command(model_path: Path, verbose: bool, **options: Any) -> int:
    """Measure parameters, FLOPs and latency of MODEL, or of MODEL against SLIM, timed alternately.

    SLIM is a model file (torch.save, or a torch.export .pt2) or the folder `pcompile -o` wrote,
    whose model.pt2 is then used. The speedup is the median of the per-round ratios
    MODEL / SLIM; efficiency is the speedup divided by the FLOPs reduction."""
    console = Console(stderr=True)
    _setup_logging(console, verbose)
    return _guarded(console, verbose, lambda: _bench(console, model_path, **options))


def _bench(console: Console, model_path: Path, *, slim_path: Path | None, input_shapes: tuple[str, ...], trust: bool,
           arch: str | None, batches: str, backends: str | None, threads: int | None, device: str, warmup: int,
           min_reps: int, min_time: float, json_path: Path | None) -> int:
    from pcompiler.hf import is_folder
    from pcompiler.inputs import InputSpec, default_inputs
    from pcompiler.pipeline import measure
    from pcompiler.report import write_report
    from pcompiler.targets.generation import is_causal_lm, measure_generation

    if (threads is not None and threads < 1) or warmup < 0 or min_reps < 1 or min_time < 0:
        raise CompileError("--threads and --min-reps must be at least 1, --warmup and --min-time at least 0")
    specs = parse_inputs(input_shapes)
    settings = _bench_settings(batches, backends, device=device, threads=threads, warmup=warmup, min_reps=min_reps,
                               min_seconds=min_time)
    if specs:
        check_input_memory([s.shape for s in specs], largest_batch=max(settings.batch_sizes), option="--batches",
                           element_bytes=[s.dtype.itemsize for s in specs])
    models = {"original": load_model(model_path, trust=trust, arch=arch)}
    generation = is_causal_lm(models["original"])
    if slim_path is not None:
        folder = slim_path / "hf" if generation and is_folder(slim_path / "hf") else slim_path
        models["slim"] = load_model(folder / "model.pt2" if folder.is_dir() and not is_folder(folder) else folder, trust=trust)
        generation = generation and is_causal_lm(models["slim"])
    if generation and not specs:  # the forward on token ids alone, positionally
        specs = [InputSpec(s.shape, s.dtype) for s in default_inputs(models["original"])[:1]]
    result, specs = measure(models, specs, settings)
    if generation:
        result["generation"] = measure_generation(models, settings)
    for name, c in result["costs"].items():
        console.print(f"[bold]{name:<10}[/]  {count_text(c['params'])} params, {count_text(c['flops'])} FLOPs "
                      f"at input {specs_text(specs)}", highlight=False)
    Console(width=None if sys.stdout.isatty() else 160).print(latency_table(result))
    if result.get("generation"):
        Console(width=None if sys.stdout.isatty() else 160).print(generation_table(result["generation"]))
    if json_path is not None:
        write_report(result, json_path)
        console.print(f"[bold]{'json':<10}[/]  {escape(str(json_path))}", soft_wrap=True, highlight=False)
    return EXIT_OK  # a backend that failed is a row of the table, and a warning


def _bench_settings(batches: str, backends: str | None, device: str, **more: Any):
    from pcompiler.targets.backends import unavailable_backends
    from pcompiler.targets.bench import LatencySettings

    chosen = None if backends is None else _parse_list("--backends", backends, BACKENDS)
    settings = LatencySettings(batch_sizes=_parse_batches("--batches", batches), backends=chosen, device=device,
                               **more)  # checks the device before unavailable_backends reads it
    lacking = unavailable_backends(device)
    missing = [b for b in chosen or () if b in lacking]
    if missing:
        raise CompileError(f"backend {missing[0]} is not available on this machine: {lacking[missing[0]]}",
                           hint=f"this machine has {','.join(b for b in BACKENDS if b not in lacking)}")
    return settings


def _cuda_bench_device(runtime: Runtime) -> str:
    """The GPU the bench's CUDA backends use: the training device where it is one (cuda:LOCAL_RANK
    under torchrun), else the current CUDA device."""
    return str(runtime.device) if runtime.device.type == "cuda" else "cuda"


# ---------------------------------------------------------------------------------------------
# Output and parsing


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




if __name__ == "__main__":  # python -m pcompiler.cli
    main()
