"""Cost of each regularizing method's steps over its whole schedule, against a plain training step.

Every method trains its full default budget (`RegMethod.budget`: the paper's schedule fitted to
at most 100 epochs of the data, as the CLI runs it) in the one training loop, with the hooks its
pass builds at ratio 0.5; "plain" trains the same number of steps with no hooks. A step is the
time between two consecutive `after_step` calls: the batch, forward, loss term, backward,
`after_backward`, the optimizer step, the schedule update and the loop's logging. The table gives
the median step of the first, middle and last tenth of the steps done, each against plain's
median in the same tenth, and late / early: a step that costs more as the schedule goes on (the
penalties drive weights into float32's subnormal range, slow on many CPUs; a history that grows)
shows there. The last column counts the subnormal values left in the trained model's parameters
and buffers.

Networks: the bundled digits examples (`examples/digits_resnet.pt`, `digits_vgg.pt`,
`digits_vit.pt`) on scikit-learn's digits, and torchvision's resnet18 (random weights, 10
classes) on a synthetic set of 256 images of 32x32, batch 32. `--kept` repeats the methods it
names with subnormals not flushed (the loop's `subnormals_flushed` replaced by a block that does
nothing), to show on the machine at hand what the flush saves.

    python benchmarks/step_cost.py                        # every network and method (~35 min on 2 cores)
    python benchmarks/step_cost.py --quick                # digits_resnet, tpp, 200 steps: a smoke test
    python benchmarks/step_cost.py --networks digits_resnet --kept tpp,receding

Writes docs/bench_step_cost.json and docs/bench_step_cost.md (with --quick: a temporary folder,
unless --out is given) and prints the table. No timing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common
import torch
import torchvision

import pcompiler
import pcompiler.train
from pcompiler.data import DataSource, load_data
from pcompiler.errors import CompileError
from pcompiler.ir import Program
from pcompiler.loading import load_model
from pcompiler.passmanager import make_pass
from pcompiler.precision import FLOAT32_TINY
from pcompiler.train import Hooks, TrainConfig, train

METHODS = ("slimming", "greg1", "greg2", "tpp", "receding")
NETWORKS = ("digits_resnet", "digits_vgg", "digits_vit", "resnet18")
RATIO = 0.5
SYNTHETIC = {"n": 256, "size": 32, "classes": 10, "batch": 32}


class Timed(Hooks):
    """Delegates to `inner`; records the time between consecutive `after_step` calls."""

    def __init__(self, inner: Hooks | None):
        self.inner = inner or Hooks()
        self.times: list[float] = []
        self.last: float | None = None

    def param_groups(self, model):
        return self.inner.param_groups(model)

    def loss_term(self, model, step):
        return self.inner.loss_term(model, step)

    def after_backward(self, model, step):
        self.inner.after_backward(model, step)

    def after_step(self, model, step):
        out = self.inner.after_step(model, step)
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        return out

    def finished(self, step):
        return self.inner.finished(step)


def synthetic_data() -> DataSource:
    n, size, classes = SYNTHETIC["n"], SYNTHETIC["size"], SYNTHETIC["classes"]
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g),
                                        torch.randint(0, classes, (n,), generator=g))
    return DataSource("synthetic", ds, ds, classes, (3, size, size), None)


def network(name: str) -> tuple[Program, DataSource, TrainConfig]:
    """The analyzed program, its data and the training settings of a run on it."""
    if name == "resnet18":
        torch.manual_seed(0)
        model, data = torchvision.models.resnet18(num_classes=SYNTHETIC["classes"]), synthetic_data()
        cfg = TrainConfig(batch_size=SYNTHETIC["batch"], progress=False)
    else:
        model, data = load_model(_common.ROOT / "examples" / f"{name}.pt"), load_data("digits")
        cfg = TrainConfig(progress=False)
    prog = pcompiler.trace(model, (torch.randn(1, *data.input_shape),))
    return pcompiler.run(prog, [make_pass("analyze")]), data, cfg


@contextlib.contextmanager
def subnormals_kept() -> Iterator[None]:
    """The loop without its flush (what every step cost before it)."""
    flushed = pcompiler.train.subnormals_flushed
    pcompiler.train.subnormals_flushed = lambda device: contextlib.nullcontext(False)
    try:
        yield
    finally:
        pcompiler.train.subnormals_flushed = flushed


def subnormal_count(model: torch.nn.Module) -> int:
    return sum(int(((t != 0) & (t.abs() < FLOAT32_TINY)).sum())
               for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def budget(prog: Program, data: DataSource, cfg: TrainConfig, method: str) -> int:
    """The method's default step budget on this network, as the CLI computes it."""
    return make_pass(method, ratio=RATIO, data=data, train=cfg).budget(prog)


def run_one(prog: Program, data: DataSource, cfg: TrainConfig, method: str | None, steps: int) -> dict[str, Any]:
    """Train a copy of `prog` for `steps` with `method`'s hooks (None: plain): the step times and
    the subnormals left."""
    gm = copy.deepcopy(prog.gm)
    hooks: Hooks | None = None
    if method is not None:
        opts = make_pass(method, ratio=RATIO, data=data, train=cfg)
        hooks = opts.make_hooks(prog.replace(gm=gm, source=None), steps, RATIO if opts.selects_by_l1 else None)
    timed = Timed(hooks)
    t0 = time.perf_counter()
    done = train(gm, data, TrainConfig(**{**cfg.__dict__, "steps": steps}), timed).steps
    return {"steps": done, "seconds": time.perf_counter() - t0, "times": timed.times,
            "subnormals": subnormal_count(gm)}


def tenths(times: list[float]) -> dict[str, float]:
    """Median step time (ms) of the first, middle and last tenth of `times`."""
    n = len(times)
    k = max(1, n // 10)
    mid = max(0, n // 2 - k // 2)
    return {"early": 1000 * statistics.median(times[:k]), "middle": 1000 * statistics.median(times[mid:mid + k]),
            "late": 1000 * statistics.median(times[-k:])}


def measure(name: str, methods: list[str], kept: list[str], steps: int | None) -> list[dict[str, Any]]:
    """Plain first, then each method, then those in `kept` with subnormals kept."""
    prog, data, cfg = network(name)
    rows: list[dict[str, Any]] = []
    budgets = {}
    for m in dict.fromkeys([*methods, *kept]):
        try:
            make_pass(m, ratio=RATIO, data=data, train=cfg).make_hooks(prog.replace(gm=copy.deepcopy(prog.gm)), 1, RATIO)
            budgets[m] = steps or budget(prog, data, cfg, m)
        except CompileError as e:  # a method that does not apply to this network (receding without BatchNorm)
            rows.append({"network": name, "config": m, "skipped": str(e)})
            print(f"  {name} {m}: skipped ({e})", flush=True)
    methods, kept = [m for m in methods if m in budgets], [m for m in kept if m in budgets]
    runs = [("plain", None, max(budgets.values(), default=steps or 100), False)]
    runs += [(m, m, budgets[m], False) for m in methods] + [(f"{m}, subnormals kept", m, budgets[m], True) for m in kept]
    timed: list[dict[str, Any]] = []
    for label, method, n, keep in runs:
        with subnormals_kept() if keep else contextlib.nullcontext():
            r = run_one(prog, data, cfg, method, n)
        timed.append({"network": name, "config": label, "budget": n, **r})
        print(f"  {name} {label}: {r['steps']} steps in {r['seconds']:.0f} s", flush=True)
    base = tenths(timed[0]["times"])
    for r in timed:
        t = tenths(r["times"])
        r.update({f"{k}_ms": v for k, v in t.items()})
        r.update({f"{k}_vs_plain": v / base[k] for k, v in t.items()})
        r["late_over_early"] = t["late"] / t["early"]
    return timed + rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [[r["network"], r["config"], f"skipped: {r['skipped']}", "", "", "", "", ""] if "skipped" in r else [r["network"], r["config"], r["steps"], f"{r['early_ms']:.1f} ({r['early_vs_plain']:.2f})",
            f"{r['middle_ms']:.1f} ({r['middle_vs_plain']:.2f})", f"{r['late_ms']:.1f} ({r['late_vs_plain']:.2f})",
            f"{r['late_over_early']:.2f}", r["subnormals"]] for r in rows]
    return _common.markdown_table(
        ["network", "method", "steps", "first tenth, ms (x plain)", "middle tenth", "last tenth",
         "late / early", "subnormals left"], out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated, of {', '.join(NETWORKS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated regularizing methods")
    ap.add_argument("--kept", default="tpp", help="methods also run with subnormals not flushed ('' for none)")
    ap.add_argument("--steps", type=int, help="steps per run (default: each method's default budget)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="digits_resnet, tpp, 200 steps: a smoke test")
    ap.add_argument("--out", type=Path, help="output folder (default docs/; --quick: a temporary folder)")
    args = ap.parse_args(argv)

    logging.getLogger("pcompiler").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    _common.set_threads(args.threads)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    networks, methods, kept = split(args.networks), split(args.methods), split(args.kept)
    steps = args.steps
    if args.quick:
        networks, methods, kept, steps = ["digits_resnet"], ["tpp"], [], steps or 200
    out = args.out or (Path(tempfile.gettempdir()) / "pcompiler_bench" if args.quick else _common.DOCS)

    env = _common.environment()
    t0 = time.perf_counter()
    rows = [r for name in networks for r in measure(name, methods, kept, steps)]
    md = table(rows)
    worst = max((r["late_over_early"] for r in rows if "times" in r and "kept" not in r["config"]), default=float("nan"))
    header = (
        f"Step cost over each method's whole schedule (ratio {RATIO}, default budget"
        f"{'' if steps is None else f' replaced by {steps} steps'}): median step of the first, middle and "
        f"last tenth, in brackets against a plain step in the same tenth; worst late / early with the "
        f"flush {worst:.2f}. torch {env['torch']} ({env['torch_num_threads']} threads, {env['cpu_count']} "
        f"cores, {env['machine']}, load {env['loadavg_at_start'][0]:.1f}); {time.perf_counter() - t0:.0f} s in all."
    )
    slim = [{k: v for k, v in r.items() if k != "times"} | {"step_ms": [round(1000 * t, 2) for t in r.get("times", [])]}
            for r in rows]
    _common.write_json(out / "bench_step_cost.json", {"environment": env, "ratio": RATIO, "steps": steps,
                                                      "synthetic": SYNTHETIC, "results": slim})
    _common.write_text(out / "bench_step_cost.md", header + "\n\n" + md)
    print(header + "\n\n" + md)
    print(f"\nwrote {out / 'bench_step_cost.json'} and {out / 'bench_step_cost.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
