"""report.md and its plots: the view of report.json a person reads.

`write_markdown(report, out_dir)` writes OUT/report.md and PNGs under OUT/plots/ from the dict
`build_report` made (it reads nothing else): first one paragraph saying what was removed and
what it bought, then the numbers before and after, the widths per layer, the importance
distribution at selection time, the regularization curve, the measured latency (with --bench),
what stayed pinned and why, the exports and the settings. A section whose data the run did not produce (no --data: no
accuracy, no curve) is left out. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pcompiler.outdir import atomic_write

log = logging.getLogger("pcompiler")


def count_text(n: Any) -> str:
    """1234567 -> '1.23M' (also for the CLI's summary); '?' when unknown."""
    if not isinstance(n, (int, float)):
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def seconds_text(t: Any) -> str:
    """0.01234 -> '12.3 ms'; '-' when unknown."""
    if not isinstance(t, (int, float)):
        return "-"
    for unit, size in (("s", 1.0), ("ms", 1e-3)):
        if t >= size:
            return f"{t / size:.3g} {unit}"
    return f"{t / 1e-6:.3g} µs"


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "-"


def _fewer(ratio: Any) -> str:
    return f"{1 / ratio:.2f}x fewer" if isinstance(ratio, (int, float)) and ratio > 0 else "?"


def headline(bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per backend, the measured row (original vs slim) at the largest batch size."""
    best: dict[str, dict[str, Any]] = {}
    for row in (bench or {}).get("latency") or []:
        if "speedup" in row and row["batch"] >= best.get(row["backend"], {}).get("batch", 0):
            best[row["backend"]] = row
    return list(best.values())


def summary_sentence(r: dict[str, Any]) -> str:
    groups = r.get("groups") or {}
    parts = [f"`{r.get('method')}`" + (f" at ratio {r['settings']['ratio']}" if "ratio" in (r.get("settings") or {}) else "")
             + f" removed {groups.get('channels_removed', '?')} channels in {groups.get('pruned', '?')} of "
             f"{groups.get('total', '?')} channel groups",
             f"parameters {count_text(r.get('params_before'))} -> {count_text(r.get('params_after'))} ({_fewer(r.get('param_ratio'))})",
             f"FLOPs {count_text(r.get('flops_before'))} -> {count_text(r.get('flops_after'))} ({_fewer(r.get('flops_ratio'))})"]
    rows = headline(r.get("bench"))
    if rows:
        parts.append("measured " + ", ".join(
            f"{row['speedup']:.2f}x faster on {row['backend']} at batch {row['batch']} "
            f"({seconds_text(row['original']['p50'])} -> {seconds_text(row['slim']['p50'])}"
            + (f", efficiency {row['efficiency']:.2f}" if "efficiency" in row else "") + ")" for row in rows))
    if r.get("acc_before") is not None:
        acc = f"accuracy {_pct(r.get('acc_before'))} before, {_pct(r.get('acc_pruned'))} right after slim"
        if r.get("acc_final") is not None:
            acc += f", {_pct(r.get('acc_final'))} after fine-tuning"
        parts.append(acc)
    if r.get("ppl_before") is not None:
        ppl = f"validation perplexity {_ppl(r.get('ppl_before'))} before, {_ppl(r.get('ppl_pruned'))} right after slim"
        if r.get("ppl_final") is not None:
            ppl += f", {_ppl(r.get('ppl_final'))} after fine-tuning"
        parts.append(ppl)
    verify = r.get("verify") or {}
    if verify.get("ok") is not None:
        parts.append(("the rewrite is verified" if verify["ok"] else "**verification FAILED**")
                     + f" (max error {verify.get('max_error', 0):.2g})" + approximate_text(verify.get("approximate")))
    return "; ".join(parts) + "."


def quality_stages(r: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """("acc" or "ppl", {stage: value}) of the stages measured (before, right after slim,
    fine-tuned); None without data."""
    for prefix in ("ppl", "acc"):
        values = {label: r[f"{prefix}_{key}"] for key, label in (("before", "before"), ("pruned", "after slim"),
                                                                   ("final", "fine-tuned"))
                  if isinstance(r.get(f"{prefix}_{key}"), (int, float))}
        if values:
            return prefix, values
    return None


def _ppl(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def approximate_text(approx: dict[str, Any] | None) -> str:
    """What verify's "approximate" says, in one clause ('' without one): where removal is not
    exact (approximate folds, LayerNorms that lost channels) and how far off the zeroed original."""
    if not approx:
        return ""
    where = approx["where"]
    named = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    return (f"; approximate at {named}: off the zeroed original by up to {approx['max_error']:.2g} "
            f"({approx['max_relative_error']:.1%} relative)")


def before_after_rows(r: dict[str, Any]) -> list[list[str]]:
    """[what, before, after, change] rows: parameters, FLOPs, accuracy, latency at the largest
    batch per backend, and a causal LM's decode and prefill speed (for report.md and the CLI's
    closing table)."""
    rows = [["parameters", count_text(r.get("params_before")), count_text(r.get("params_after")), _fewer(r.get("param_ratio"))],
            ["FLOPs", count_text(r.get("flops_before")), count_text(r.get("flops_after")), _fewer(r.get("flops_ratio"))]]
    before = r.get("acc_before")
    for key, label in (("acc_pruned", "accuracy, right after slim"), ("acc_final", "accuracy, fine-tuned")):
        if before is not None and r.get(key) is not None:
            rows.append([label, _pct(before), _pct(r[key]), f"{100 * (r[key] - before):+.2f} points"])
    before = r.get("ppl_before")
    for key, label in (("ppl_pruned", "perplexity, right after slim"), ("ppl_final", "perplexity, fine-tuned")):
        if before is not None and r.get(key) is not None:
            rows.append([label, _ppl(before), _ppl(r[key]), f"{r[key] / before:.2f}x"])
    for row in headline(r.get("bench")):
        rows.append([f"latency p50, {row['backend']}, batch {row['batch']}", seconds_text(row["original"]["p50"]),
                     seconds_text(row["slim"]["p50"]), f"{row['speedup']:.2f}x faster"])
    for row in ((r.get("bench") or {}).get("generation") or {}).get("rows", []):
        if "speedup" in row:
            rows.append([f"decode, {row['backend']}, batch {row['batch']}",
                         f"{row['original']['decode_tokens_per_s']:.3g} tokens/s",
                         f"{row['slim']['decode_tokens_per_s']:.3g} tokens/s", f"{row['speedup']:.2f}x faster"])
            rows.append([f"prefill p50, {row['backend']}, batch {row['batch']}",
                         seconds_text(row["original"]["prefill"]["p50"]), seconds_text(row["slim"]["prefill"]["p50"]),
                         f"{row['prefill_speedup']:.2f}x faster"])
    return rows


def search_text(s: dict[str, Any]) -> str:
    """One line for a measured budget's search (report.json `budget_search`)."""
    p = s.get("predictor") or {}
    if p.get("kind") == "flops":
        how = f"FLOPs, one ratio for every group ({p.get('why')})"
    else:
        how = (f"{p.get('kind')} model, {p.get('kernels')} kernels from {p.get('probes')} probes, "
               + ("cached" if p.get("cached") else f"built in {p.get('seconds', 0):.0f} s"))
    return (f"{s.get('target'):g}x lower {s.get('what')} on {s.get('backend')} at batch {s.get('batch')}, "
            f"{s.get('threads')} threads: measured {s.get('measured', 0):.2f}x (predicted {s.get('predicted', 0):.2f}x, "
            f"FLOPs / {s.get('flops_reduction', 0):.2f}) after {len(s.get('steps') or [])} steps; predictor: {how}")


def latency_rows(bench: dict[str, Any]) -> list[list[str]]:
    """The latency table of a bench result, header first: p50 and p90 of each model, and the
    speedup and efficiency when an original and a slim model were compared."""
    rows = bench.get("latency") or []
    names = [k for k in ("original", "slim") if any(k in row for row in rows)]
    header = ["backend", "batch", *(f"{n} p50 / p90" for n in names)]
    if names == ["original", "slim"]:
        header += ["speedup", "efficiency"]
    out = [header]
    for row in rows:
        cells = [row["backend"], str(row["batch"])]
        if "error" in row:
            out.append(cells + [f"failed: {row['error']}"] + [""] * (len(header) - 3))
            continue
        cells += [f"{seconds_text(row[n]['p50'])} / {seconds_text(row[n]['p90'])}" for n in names]
        if len(header) > len(cells):
            cells += [f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}" if "efficiency" in row else "-"]
        out.append(cells)
    return out


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _plots(r: dict[str, Any], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    layers = {k: v["out"] for k, v in (r.get("layers") or {}).items() if "out" in v}
    if layers:
        names = list(layers)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
        ax.bar(range(len(names)), [v[0] for v in layers.values()], color="#c8c8c8", label="before")
        ax.bar(range(len(names)), [v[1] for v in layers.values()], color="#3b75af", label="after")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylabel("output channels")
        ax.set_title("widths per layer")
        ax.legend()
        made["widths"] = _save(fig, folder / "widths.png")
    importance = r.get("importance") or {}
    if importance:
        kept, removed = [], []
        for item in importance.values():
            gone = set(item["removed"])
            for i, s in enumerate(item["scores"]):
                (removed if i in gone else kept).append(s)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist([kept, removed], bins=40, stacked=True, color=["#3b75af", "#e07b39"], label=["kept", "removed"])
        ax.set_xlabel(f"importance ({r.get('method')}'s score after it ran)")
        ax.set_ylabel("channels")
        modes = (r.get("method_settings") or {}).get("bimodality")
        ax.set_title("importance distribution" + (f": {100 * modes['receded']:.0f}% below 0.05, "
                                                   f"{100 * modes['stayed']:.0f}% above 0.5" if modes else ""))
        ax.legend()
        made["importance"] = _save(fig, folder / "importance.png")
    curve = (r.get("regularization") or {}).get("curve") or []
    if curve:
        steps = [p["step"] for p in curve]
        keys = [k for k in ("loss", "distill", "acc", "penalty", "lambda", "gram", "mag_ratio", "receded") if k in curve[0]]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
        for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
            ax.plot(steps, [p.get(k, float("nan")) for p in curve])
            ax.set_title(k)
            ax.set_xlabel("step")
            if k in ("penalty", "gram", "mag_ratio") and all(p.get(k, 0) > 0 for p in curve):
                ax.set_yscale("log")
        fig.suptitle("regularization phase")
        made["curve"] = _save(fig, folder / "curve.png")
    stages = quality_stages(r)
    if stages:
        prefix, values = stages
        tuning = ((r.get("finetune") or {}).get("curve")) or []
        fig, axes = plt.subplots(1, 2 if tuning else 1, figsize=(9 if tuning else 4.5, 3.4), squeeze=False)
        ax = axes[0][0]
        ax.bar(range(len(values)), list(values.values()), color="#3b75af")
        ax.set_xticks(range(len(values)), list(values), fontsize=8)
        ax.set_title("validation " + ("perplexity" if prefix == "ppl" else "accuracy"))
        if prefix == "ppl" and max(values.values()) > 10 * min(values.values()):
            ax.set_yscale("log")
        if tuning:
            ax = axes[0][1]
            ax.plot([p["step"] for p in tuning], [p["loss"] for p in tuning])
            ax.set_title("fine-tuning loss" + (" (next token)" if prefix == "ppl" else ""))
            ax.set_xlabel("step")
        made["quality"] = _save(fig, folder / "quality.png")
    timed = [row for row in ((r.get("bench") or {}).get("latency") or []) if "speedup" in row]
    if timed:
        backends = list(dict.fromkeys(row["backend"] for row in timed))
        fig, axes = plt.subplots(1, len(backends), figsize=(3.6 * len(backends), 3.4), squeeze=False)
        for ax, backend in zip(axes[0], backends):
            rows = [row for row in timed if row["backend"] == backend]
            x = range(len(rows))
            for shift, name, color in ((-0.2, "original", "#c8c8c8"), (0.2, "slim", "#3b75af")):
                p50 = [1e3 * row[name]["p50"] for row in rows]
                p90 = [1e3 * row[name]["p90"] for row in rows]
                ax.bar([i + shift for i in x], p50, width=0.4, color=color, label=name,
                       yerr=[[0] * len(rows), [b - a for a, b in zip(p50, p90)]], capsize=2)
            for i, row in zip(x, rows):
                top = 1e3 * max(row["original"]["p90"], row["slim"]["p90"])
                ax.annotate(f"{row['speedup']:.2f}x", (i, top), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)
            ax.set_xticks(list(x), [f"batch {row['batch']}" for row in rows])
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.margins(y=0.15)
            ax.set_ylabel("ms (p50, whisker to p90)")
            ax.set_title(backend, fontsize=9)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("latency, original vs slim (speedup above)")
        made["latency"] = _save(fig, folder / "latency.png")
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"{path.parent.name}/{path.name}"


def render(r: dict[str, Any], plots: dict[str, str]) -> str:
    lines = [f"# Pruning report: {Path(str(r.get('model') or 'model')).name}", "", summary_sentence(r), ""]
    lines += ["## Before and after", "", _table(["", "before", "after", "change"], before_after_rows(r)), ""]
    if "quality" in plots:
        lines += [f"![validation metric by stage]({plots['quality']})", ""]
    bench = r.get("bench")
    if bench and bench.get("latency"):
        m, st = bench.get("machine") or {}, bench.get("settings") or {}
        lines += ["## Latency", "",
                  f"Measured on {m.get('cpu')} ({m.get('cpu_count')} cores, {st.get('threads')} threads)"
                  + (f" and {m['gpu']}" if m.get("gpu") else "") + f", torch {m.get('torch')}, onnxruntime "
                  f"{m.get('onnxruntime')}. Original and slim ran alternately: {st.get('warmup')} warm-up calls each, "
                  f"then at least {st.get('min_reps')} timed calls and {st.get('min_seconds')} s each. Speedup is the "
                  "median of the per-round ratios; efficiency is speedup / FLOPs reduction.", ""]
        if "latency" in plots:
            lines += [f"![latency]({plots['latency']})", ""]
        header, *rows = latency_rows(bench)
        lines += [_table(header, rows), ""]
    search = r.get("budget_search")
    if search:
        lines += ["## Latency target", "", search_text(search) + ".", "",
                  _table(["step", "channels removed", "predicted", "FLOPs /", "measured"],
                         [[str(i + 1), _pct(st.get("removed")), f"{st.get('predicted', 0):.2f}x",
                           f"{st.get('flops_reduction', 0):.2f}", f"{st.get('measured', 0):.2f}x"]
                          for i, st in enumerate(search.get("steps") or [])]), ""]
    layers = r.get("layers") or {}
    if layers:
        lines += ["## Widths per layer", ""]
        if "widths" in plots:
            lines += [f"![widths per layer]({plots['widths']})", ""]
        lines += [_table(["layer", "out channels", "in channels"],
                         [[f"`{k}`", " -> ".join(map(str, v.get("out", []))) or "=",
                           " -> ".join(map(str, v.get("in", []))) or "="] for k, v in layers.items()]), ""]
    if "importance" in plots:
        modes = (r.get("method_settings") or {}).get("bimodality")
        split = "" if not modes else (f" {100 * modes['receded']:.1f}% of the channels receded below 0.05 and "
                                      f"{100 * modes['stayed']:.1f}% stayed above 0.5 ({100 * modes['between']:.1f}% "
                                      "in between).")
        lines += ["## Importance", "",
                  "Each channel's score as the method left it (higher is kept); removed channels in orange." + split,
                  "", f"![importance distribution]({plots['importance']})", ""]
    if "curve" in plots:
        reg = r.get("regularization") or {}
        lines += ["## Regularization", "", f"{reg.get('steps')} steps in {reg.get('seconds', 0):.1f} s"
                  + (f", resumed at step {reg['resumed_from']}" if reg.get("resumed_from") else "") + ".", "",
                  f"![regularization curve]({plots['curve']})", ""]
    groups = r.get("groups") or {}
    if groups.get("pinned_reasons"):
        lines += ["## What stayed and why", "", _table(["reason", "groups"],
                  [[k, v] for k, v in groups["pinned_reasons"].items()]), ""]
    if r.get("exports"):
        lines += ["## Exports", "", _table(["format", "file", "result"],
                  [[e.get("format"), f"`{e.get('path')}`", "ok" if e.get("ok") else f"failed: {e.get('error')}"]
                   for e in r["exports"]]), ""]
    settings = {k: v for k, v in (r.get("method_settings") or {}).items() if not isinstance(v, dict)}
    if settings:
        lines += ["## Method settings", "", _table(["setting", "value"], [[k, f"`{v}`"] for k, v in settings.items()]), ""]
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Write OUT/report.md and OUT/plots/*.png; return the markdown's path."""
    out = Path(out_dir)
    try:
        plots = _plots(report, out / "plots")
    except Exception as e:  # noqa: BLE001 - a report without plots beats none
        log.warning("report plots not drawn: %s: %s", type(e).__name__, e)
        plots = {}
    path = out / "report.md"
    text = render(report, plots)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path
