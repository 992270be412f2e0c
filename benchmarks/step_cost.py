"""Per-step cost of each regularizing method's hooks, against a plain training step.

What is timed: torchvision resnet18 (num_classes=10, random weights), traced with a 1x3x64x64
input and analyzed, trained by the one training loop (`pcompiler.train.train`: SGD, CPU) on a
synthetic in-memory dataset of 64x64 images, batch 32. "plain" trains with no hooks; every other
row trains its own copy of the model with the hooks the method's pass builds (`make_hooks` at
ratio 0.5 with the paper's step budget, as `RegMethod.run` calls it). A step is the time between
two consecutive `after_step` calls: the batch, forward, loss term, backward, `after_backward`,
the optimizer step, the schedule update and the loop's logging.

Phases, each its own row, reached through the hooks' own schedule or state:
- greg1: growing (the magnitude ratio every K_u = 10 steps);
- greg2 picking: one lambda on every channel; greg2 growing: after the pick (the hooks' schedule
  is stepped through the picking phase first, without training);
- tpp growing: lambda = 0.5, the Gram term on; tpp zeroing: stabilization with lambda = tau and
  every layer's pruned slices zeroed (set through the hooks' `load_state_dict`);
- slimming, receding.

How: one process. Each round trains every configuration for `--steps` steps, in an order rotated
from round to round, so changes in machine load hit all alike; the hooks see their step count
carry on from one round to the next. The first step of each round's run is not counted (it
builds the optimizer and the data iterator), nor is the first round (warm-up). The table gives
the median step time, the ratio of medians to plain, and the ratio of means (the mean shows
work done only every K_u steps, which the median hides). No timing is asserted.

    python benchmarks/step_cost.py                  # 4 timed rounds of 5 steps
    python benchmarks/step_cost.py --quick          # 1 timed round of 3 steps: a smoke test
    python benchmarks/step_cost.py --rounds 8 --threads 1

Writes docs/bench_step_cost.json and docs/bench_step_cost.md (with --quick: a temporary folder,
unless --out is given) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import torch
import torchvision

import pcompiler
from pcompiler.data import DataSource
from pcompiler.ir import Program
from pcompiler.passmanager import make_pass
from pcompiler.train import Hooks, TrainConfig, train

BATCH, SIZE, CLASSES, RATIO = 32, 64, 10, 0.5


class Timed(Hooks):
    """Delegates to `inner`, its step count carried on over several `train` calls from `start`;
    records the time between consecutive `after_step` calls (one per train call is not a step)."""

    def __init__(self, inner: Hooks | None, start: int = 0):
        self.inner, self.offset = inner or Hooks(), start
        self.times: list[float] = []
        self.last: float | None = None

    def param_groups(self, model):  # called once per train call, when the optimizer is built
        self.last = None
        return self.inner.param_groups(model)

    def loss_term(self, model, step):
        return self.inner.loss_term(model, step + self.offset)

    def after_backward(self, model, step):
        self.inner.after_backward(model, step + self.offset)

    def after_step(self, model, step):
        out = self.inner.after_step(model, step + self.offset)
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        return out

    def finished(self, step):
        return self.inner.finished(step + self.offset)


def synthetic_data(n: int = 8 * BATCH) -> DataSource:
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g),
                                        torch.randint(0, CLASSES, (n,), generator=g))
    return DataSource("synthetic", ds, ds, CLASSES, (3, SIZE, SIZE), None)


def base_program() -> Program:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    prog = pcompiler.trace(model, (torch.randn(1, 3, SIZE, SIZE),))
    return pcompiler.run(prog, [make_pass("analyze")])


def method_hooks(prog: Program, name: str, data: DataSource) -> tuple[Program, Hooks]:
    """A copy of `prog` and the hooks `RegMethod.run` would train it with (paper budget)."""
    method = make_pass(name, ratio=RATIO, data=data)
    prog = prog.replace(gm=copy.deepcopy(prog.gm), source=None)
    budget = method.paper_steps(prog)
    ratio = RATIO if method.selects_by_l1 else None
    return prog, method.make_hooks(prog, budget, ratio)


def past_picking(hooks) -> int:
    """Step GReg-2's schedule (no training) until it has picked; the step it picked at."""
    step = 0
    while hooks.picking:
        step += 1
        hooks.after_step(None, step)
    return step


def configurations(prog: Program, data: DataSource) -> dict[str, tuple[torch.nn.Module, Timed]]:
    """name -> (model, timed hooks), each on its own copy of the model, each in its phase."""
    out: dict[str, tuple[torch.nn.Module, Timed]] = {"plain": (copy.deepcopy(prog.gm), Timed(None))}

    def add(label: str, name: str, prepare: Callable[[Any], int] = lambda h: 0) -> None:
        p, hooks = method_hooks(prog, name, data)
        out[label] = (p.gm, Timed(hooks, prepare(hooks)))

    def tpp_at(lam: float, zeroing: bool) -> Callable[[Any], int]:
        def prepare(hooks) -> int:
            hooks.load_state_dict({"lam": lam, "stabilize_from": 0 if zeroing else None})
            return len(hooks.layers) * hooks.zero_interval if zeroing else 1  # every layer zeroed
        return prepare

    add("greg1 growing", "greg1")
    add("greg2 picking", "greg2")
    add("greg2 growing", "greg2", past_picking)
    add("tpp growing", "tpp", tpp_at(0.5, zeroing=False))
    add("tpp zeroing", "tpp", tpp_at(1.0, zeroing=True))
    add("slimming", "slimming")
    add("receding", "receding")
    return out


def measure(configs: dict[str, tuple[torch.nn.Module, Timed]], data: DataSource, rounds: int,
            steps: int) -> dict[str, list[list[float]]]:
    """Per configuration, per timed round, its step times (seconds); round 0 is a warm-up."""
    names = list(configs)
    per_round: dict[str, list[list[float]]] = {n: [] for n in names}
    cfg = TrainConfig(steps=steps, batch_size=BATCH, progress=False)
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, timed = configs[name]
            timed.times = []
            done = train(model, data, cfg, timed).steps
            timed.offset += done
            if r > 0:
                per_round[name].append(timed.times)
    return per_round


def summarize(per_round: dict[str, list[list[float]]]) -> list[dict[str, Any]]:
    flat = {n: [t for r in rs for t in r] for n, rs in per_round.items()}
    plain_median, plain_mean = statistics.median(flat["plain"]), statistics.fmean(flat["plain"])
    return [{"config": n, "steps_timed": len(ts), "median_ms": 1000 * statistics.median(ts),
             "ratio_median": statistics.median(ts) / plain_median,
             "ratio_mean": statistics.fmean(ts) / plain_mean,
             "step_ms": [round(1000 * t, 2) for t in ts]} for n, ts in flat.items()]


def table(results: list[dict[str, Any]]) -> str:
    rows = [[r["config"], f"{r['median_ms']:.0f}", f"{r['ratio_median']:.2f}", f"{r['ratio_mean']:.2f}",
             r["steps_timed"]] for r in results]
    return _common.markdown_table(["method (phase)", "median step (ms)", "ratio to plain (median)",
                                   "ratio to plain (mean)", "steps timed"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, help="timed rounds after one warm-up round (default 4; --quick 1)")
    ap.add_argument("--steps", type=int, help="steps per configuration and round, the first not timed "
                                              "(default 5; --quick 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="1 timed round of 3 steps: a smoke test")
    ap.add_argument("--out", type=Path, help="output folder (default docs/; --quick: a temporary folder)")
    args = ap.parse_args(argv)

    logging.getLogger("pcompiler").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    _common.set_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 4)
    steps = args.steps or (3 if args.quick else 5)
    out = args.out or (Path(tempfile.gettempdir()) / "pcompiler_bench" if args.quick else _common.DOCS)

    env = _common.environment()
    data = synthetic_data()
    t0 = time.perf_counter()
    per_round = measure(configurations(base_program(), data), data, rounds, steps)
    results = summarize(per_round)
    md = table(results)
    header = (
        f"resnet18 (64x64, batch {BATCH}, ratio {RATIO}), one training step per method and phase: "
        f"medians of {rounds} rounds x {steps - 1} steps after a warm-up round, configurations "
        f"interleaved; torch {env['torch']} ({env['torch_num_threads']} threads, {env['cpu_count']} "
        f"cores, load {env['loadavg_at_start'][0]:.1f}); {time.perf_counter() - t0:.0f} s in all."
    )
    _common.write_json(out / "bench_step_cost.json", {"environment": env, "rounds": rounds, "steps": steps,
                                                      "batch": BATCH, "size": SIZE, "ratio": RATIO,
                                                      "results": results})
    _common.write_text(out / "bench_step_cost.md", header + "\n\n" + md)
    print(header + "\n\n" + md)
    print(f"\nwrote {out / 'bench_step_cost.json'} and {out / 'bench_step_cost.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
