"""The `pcompile` command: the pass pipeline assembled from options.

    pcompile MODEL --method l1 --ratio 0.5 -o out/      load, trace, analyze, l1, slim, verify,
                                                         export (pt, pt2, onnx), report.json
    pcompile MODEL --analyze                             print the channel groups and stop

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
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from torch import nn

from pcompiler.loading import load_model, parse_input_shapes
from pcompiler.passmanager import CompileError

log = logging.getLogger("pcompiler")

METHODS = ("l1", "random")
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
        try:
            rv = super().main(args, prog_name or "pcompile", complete_var, standalone_mode=False, **extra)
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


def _device_of(model: nn.Module) -> torch.device:
    t = next(iter((*model.parameters(), *model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def _parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CompileError(f"--formats: unknown format(s) {', '.join(unknown)}", hint=f"choose from {','.join(FORMATS)}")
    return formats


def _trace(model: nn.Module, shapes: list[tuple[int, ...]], given: bool):
    import pcompiler

    device = _device_of(model)
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


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _summary(console: Console, report: dict[str, Any], report_path: Path) -> None:
    rows: list[tuple[str, str]] = []

    def ratio(key: str) -> str:
        r = report.get(key)
        return f" ({r:.2f}x)" if isinstance(r, float) else ""

    rows.append(("params", f"{_count(report.get('params_before'))} -> {_count(report.get('params_after'))}{ratio('param_ratio')}"))
    rows.append(("FLOPs", f"{_count(report.get('flops_before'))} -> {_count(report.get('flops_after'))}{ratio('flops_ratio')}"))
    groups = report.get("groups") or {}
    if groups:
        rows.append(("channels", f"{groups.get('channels_removed')} removed in {groups.get('pruned')} of {groups.get('total')} groups"))
    verify = report.get("verify") or {}
    if verify:
        if verify.get("ok") is None:
            rows.append(("verify", f"[yellow]skipped[/] {escape(str(verify.get('skipped', '')))}"))
        else:
            state = "[green]ok[/]" if verify.get("ok") else "[red]FAILED[/]"
            rows.append(("verify", f"{state}, max error {_num(verify.get('max_error'))}"))
    for e in report.get("exports") or []:
        state = "[green]ok[/]" if e.get("ok") else f"[red]FAILED[/] {escape(str(e.get('error')))}"
        err = f", max error {_num(e.get('max_error'))}" if e.get("ok") and e.get("max_error") is not None else ""
        rows.append((f"{e.get('format')}", f"{escape(str(e.get('path')))} {state}{err}"))
    rows.append(("report", escape(str(report_path))))
    # Plain soft-wrapped lines, not a table: paths stay whole for scripts that read them.
    for label, text in rows:
        console.print(f"[bold]{label:<10}[/]  {text}", soft_wrap=True, highlight=False)


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
@click.option("--global", "global_ranking", is_flag=True, help="Rank channels across groups, not per group.")
@click.option("--round-to", type=int, default=1, show_default=True, help="Keep a multiple of K channels per group.")
@click.option("--min-keep", type=int, default=1, show_default=True, help="Keep at least N channels per group.")
@click.option("--skip", multiple=True, metavar="GLOB", help="Leave groups touching modules that match GLOB alone.")
@click.option("--speedup", type=float, help="Search the ratio that divides FLOPs by X (instead of --ratio).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for example inputs and --method random.")
@click.option("--analyze", is_flag=True, help="Print the channel groups and stop.")
@click.option("--formats", default=",".join(FORMATS), show_default=True, help="Exports to write, comma-separated.")
@click.option("--dump-ir", type=click.Path(path_type=Path), metavar="DIR", help="Write the graph after each pass to DIR.")
@click.option("-v", "--verbose", is_flag=True, help="Log each pass; print tracebacks on errors.")
def main(model_path: Path, verbose: bool, **options: Any) -> int:
    """Prune the channels of MODEL (a file written by torch.save), verify and export it."""
    console = Console(stderr=True)
    _setup_logging(console, verbose)
    try:
        return _compile(console, model_path, **options)
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


def _compile(console: Console, model_path: Path, *, method: str | None, ratio: float | None,
             input_shapes: tuple[str, ...], trust: bool, arch: str | None, out_dir: Path | None,
             global_ranking: bool, round_to: int, min_keep: int, skip: tuple[str, ...],
             speedup: float | None, seed: int, analyze: bool, formats: str, dump_ir: Path | None) -> int:
    from pcompiler.passmanager import dump_instrument, make_pass, run

    # Check every option before the (slow) load.
    shapes = parse_input_shapes(input_shapes)
    if not analyze:
        if method is None:
            raise CompileError("--method is required (l1 or random), unless --analyze")
        if ratio is None and speedup is None:
            raise CompileError("--ratio is required (the fraction of channels to remove, e.g. 0.5)")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise CompileError(f"--ratio must be in [0, 1), got {ratio}", hint="0.5 removes half of each group's channels")
        if out_dir is None:
            raise CompileError("-o/--out is required: the folder for the exports and report.json")
    if speedup is not None and speedup < 1.0:
        raise CompileError(f"--speedup must be at least 1, got {speedup}", hint="2 halves the FLOPs")
    if round_to < 1 or min_keep < 1:
        raise CompileError("--round-to and --min-keep must be at least 1")
    export_formats = _parse_formats(formats)

    torch.manual_seed(seed)
    model = load_model(model_path, trust=trust, arch=arch)
    if not shapes:
        shapes = [default_input_shape(model)]
        log.info("example input shape %s (default; --input-shape changes it)", _shape_text(shapes))
    prog = _trace(model, shapes, given=bool(input_shapes))
    instruments = [dump_instrument(dump_ir)] if dump_ir is not None else []

    if analyze:
        prog = run(prog, [make_pass("analyze")], instruments=instruments)
        Console().print(_groups_table(prog))
        for node, why in prog.analysis.notes:
            console.print(f"note: {node}: {why}", markup=False, highlight=False)
        return EXIT_OK

    settings: dict[str, Any] = {
        "ratio": ratio if ratio is not None else 0.5,
        "global_ranking": global_ranking,
        "round_to": round_to,
        "min_keep": min_keep,
        "skip": tuple(skip),
        "speedup": speedup,
    }
    if method == "random":
        settings["seed"] = seed
    passes = [make_pass("analyze"), make_pass(method, **settings), make_pass("slim"), make_pass("verify")]
    prog = run(prog, passes, instruments=instruments)

    from pcompiler.report import build_report, write_report
    from pcompiler.targets.pytorch import export_all

    export_all(prog, out_dir, formats=export_formats)
    report_settings = {**settings, "skip": list(skip), "input_shapes": [list(s) for s in shapes],
                       "formats": list(export_formats), "seed": seed}
    report = build_report(prog, model_path=model_path, method=method, settings=report_settings)
    report_path = write_report(report, Path(out_dir) / "report.json")
    _summary(console, report, report_path)
    return EXIT_OK


if __name__ == "__main__":  # python -m pcompiler.cli
    main()
