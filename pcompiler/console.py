"""What the `pcompile` command prints: the one-line error, the channel groups of --analyze, the
closing table of a compilation and the latency table of `pcompile bench` (rich, on the console
the CLI hands in; the tables that are a command's result go to stdout, the rest to stderr)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pcompiler.errors import first_line
from pcompiler.report_md import approximate_text


def error_line(console: Console, text: str) -> None:
    """One line on stderr, never wrapped and never read as markup."""
    console.print(f"error: {first_line(text)}", style="red", markup=False, highlight=False, soft_wrap=True)


def _first(names: Sequence[str], k: int) -> str:
    """The first k names, and how many more: 'a, b (+3 more)'."""
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def groups_table(prog) -> Table:
    table = Table(title=f"{len(prog.analysis.groups)} channel groups ({len(prog.analysis.prunable)} prunable)")
    table.add_column("id", justify="right")
    table.add_column("size", justify="right")
    table.add_column("members")
    table.add_column("prunable / pinned because")
    for g in prog.analysis.groups:
        members = _first(g.modules, 4)
        status = "[green]prunable[/]" if g.prunable else escape("; ".join(g.pinned) or "no producer to remove")
        if g.prunable and g.approximate:
            status = f"[yellow]prunable, approximately[/] ({escape(_first(g.approximate, 2))})"
        table.add_row(str(g.id), str(g.size), escape(members), status)
    return table


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def summary(console: Console, report: dict[str, Any], report_path: Path) -> None:
    """The numbers before and after as a table, then one line per check and file."""
    from pcompiler.report_md import before_after_rows, search_text

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
    if report.get("budget_search"):
        rows.append(("latency", escape(search_text(report["budget_search"]))))
    groups = report.get("groups") or {}
    if groups:
        rows.append(("channels", f"{groups.get('channels_removed')} removed in {groups.get('pruned')} of {groups.get('total')} groups"))
    verify = report.get("verify") or {}
    if verify:
        if verify.get("ok") is None:
            rows.append(("verify", f"[yellow]skipped[/] {escape(str(verify.get('skipped', '')))}"))
        else:
            state = "[green]ok[/]" if verify.get("ok") else "[red]FAILED[/]"
            near = escape(approximate_text(verify.get("approximate")))
            rows.append(("verify", f"{state}, max error {_num(verify.get('max_error'))}{near}"))
    comp = report.get("compensation") or {}
    if comp.get("folded"):
        consumers = (comp.get("consumers") or {}).values()
        means, fitted = (sum(c.get(k, 0) for c in consumers) for k in ("mean_folded", "fitted"))
        what = ", ".join([f"{comp['folded'] - means - fitted} constant inputs"] + ([f"{means} mean inputs"] if means else [])
                         + ([f"{fitted} least-squares predicted inputs"] if fitted else []))
        rows.append(("compensate", f"{what} of removed channels folded into their consumers"))
    for e in report.get("exports") or []:
        state = ("[green]ok[/]" if e.get("ok") else f"[yellow]skipped[/] {escape(str(e.get('error')))}"
                 if e.get("skipped") else f"[red]FAILED[/] {escape(str(e.get('error')))}")
        err = f", max error {_num(e.get('max_error'))}" if e.get("ok") and e.get("max_error") is not None else ""
        if e.get("ok") and "trust_remote_code=True" in str(e.get("note")):  # targets/hf.py: layers that differ in width
            err += "; its layers differ in width: load with trust_remote_code=True (report.json says how to get one width)"
        rows.append((f"{e.get('format')}", f"{escape(str(e.get('path')))} {state}{err}"))
    rows.append(("report", f"{escape(str(report_path))}, {escape(str(report_path.with_suffix('.md')))}"))
    # Plain soft-wrapped lines, not a table: paths stay whole for scripts that read them.
    for label, text in rows:
        console.print(f"[bold]{label:<10}[/]  {text}", soft_wrap=True, highlight=False)


def latency_table(result: dict[str, Any]) -> Table:
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


def generation_table(result: dict[str, Any]) -> Table:
    """Prefill latency and decode speed, original against slim (targets/generation.py)."""
    rows = result.get("rows") or []
    names = [n for n in ("original", "slim") if any(n in r for r in rows)]
    table = Table(title="generation, KV cache on (prefill p50; decode tokens/s)", box=box.SIMPLE_HEAD)
    for col in ("backend", "batch", *(f"{n} prefill" for n in names), *(f"{n} decode" for n in names), "decode speedup"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["backend"], str(r["batch"]), escape(f"error: {r['error']}"), *[""] * (2 * len(names)))
            continue
        table.add_row(r["backend"], str(r["batch"]), *(f"{r[n]['prefill']['p50'] * 1e3:.3g} ms" for n in names),
                      *(f"{r[n]['decode_tokens_per_s']:.3g}" for n in names),
                      f"{r['speedup']:.2f}x" if "speedup" in r else "")
    return table

