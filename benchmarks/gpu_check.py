"""One-shot GPU check (issue 21, item 4): run what needs CUDA once, on a lent GPU machine, and
write every result to ONE JSON file, `gpu_check.json` in the output folder.

    bash benchmarks/gpu_check.sh [--dry] [--dry-cpu] [--out DIR]     # the entry point (see there)
    python benchmarks/gpu_check.py [--dry] [--dry-cpu] [--out DIR]   # pcompiler already importable

Steps, each in its own process with its own time limit, inside one overall budget (`--budget`,
default 450 s from the start of gpu_check.sh, so the whole check ends within 8 minutes):

1. `pytest-gpu`: `pytest -m gpu -q` over the test files that hold GPU-marked tests.
2. `main-tpp-amp`: the README's main command with `--device cuda --amp --formats pt2,onnx` (TPP
   at 0.5 on examples/digits_resnet.pt, digits data); figures read from its report.json.
3. `distill-greg1-amp`: greg1 at 0.7 on examples/digits_vgg.pt with `--distill
   --distill-regularization --reg-steps 300 --device cuda --amp`.
4. `latency-cuda`: resnet50 (224x224) and a LLaMA-shaped decoder (benchmarks/latency.py's
   LlamaForCausalLM when transformers is installed, else benchmarks/llm_meta.py's plain-torch
   decoder with the same widths), pruned by l1 to 2x fewer FLOPs, timed original against slim on
   each CUDA backend (`torch-cuda-fp32`, `torch-cuda-bf16`, `onnxruntime-cuda`,
   `torch-cuda-compile`; eager backends first, torch.compile last since it compiles per model and
   batch size); results are written as they come, so a step stopped by its time limit keeps them.
5. `latency-model-cuda`: the kernel model of `--latency` on torch-cuda-fp32 (torch.profiler's GPU
   kernel times; targets/latency_model.py) for resnet50 at batch 8, against 10 random prunings
   timed original against slim: `benchmarks/latency_target.py --part fidelity`, whose JSON's
   figures (mean absolute % error and rank correlation of the model and of FLOPs) are kept.
6. `torchrun-ddp`: `python -m torch.distributed.run --standalone --nproc_per_node 2 -m
   pcompiler.cli ... --device cuda` when torch sees 2 or more GPUs, else skipped with that reason.

With `--dry`, or when `torch.cuda.is_available()` is False, every CUDA step is recorded as
skipped with the reason, and each gets a `dry_check` instead: the pytest step collects the GPU
tests (`--collect-only`), the command-line steps parse their exact arguments with the CLI's own
parser (click's `make_context`, and torchrun's argument parser), the latency step imports and
builds what it would time. `--dry-cpu` (implies `--dry`) also runs the command-line steps on the
CPU with `--reg-steps 20 --finetune-epochs 0.2` and a tiny latency run on `torch-cpu`, and reads
their results the way the GPU run would.

The JSON holds, per step: name, title, status (ok / failed / skipped), seconds, budget, the
reason when skipped or failed (the tail of the step's stderr, or stdout for pytest), the command,
the figures it measured, and the log files (`logs/` beside the JSON, full stdout and stderr);
and the environment: GPUs, driver, torch / CUDA / cuDNN versions, python, packages found and
missing, where `pcompiler.passes` was imported from, and how gpu_check.sh set things up.

Exit code: 0 when every step is ok or skipped (and in a dry run every dry check passed), 1 when
one failed, 2 when the checker itself broke (the JSON then says so under "error").

Internal modes (used by gpu_check.sh and by the steps): `--setup` (map the package folders into
a virtual environment and install missing packages from a wheelhouse), `--worker env|parse|latency`.
This file imports nothing outside the standard library at module level: the main process stays
light, and torch runs only in the step processes, one at a time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
DEFAULT_BUDGET = 450.0  # seconds from gpu_check.sh's start: the check must end within 8 minutes
RESERVE = 10.0  # kept at the end for the JSON and the summary
MIN_STEP = 20.0  # a step is not started with less time than this left
TAIL_CHARS = 2000

# import name -> distribution name, for the environment record and the step requirements
PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "numpy": "numpy", "PIL": "pillow",
    "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript", "click": "click",
    "rich": "rich", "scipy": "scipy", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
    "transformers": "transformers", "safetensors": "safetensors", "pytest": "pytest",
    "hypothesis": "hypothesis", "torch_pruning": "torch-pruning",
}
# what the wheelhouse may provide (gpu_check.sh's header says which step needs which)
WHEELHOUSE_WANTED = ("click", "rich", "scipy", "sklearn", "onnxscript", "pytest", "matplotlib", "transformers",
                     "safetensors", "hypothesis")
# installed versions the wheelhouse must never replace (the machine's CUDA build of torch above all)
PINNED = ("torch", "torchvision", "triton", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "timm")

CLI_NEEDS = ("torch", "numpy", "click", "rich", "scipy")  # any pcompile run (scipy: the analyze pass)
DIGITS_NEEDS = ("sklearn",)  # --data digits


def _python_cli(*args: str) -> list[str]:
    return ["-m", "pcompiler.cli", *args]


# The commands, without the interpreter; OUT is replaced by the step's output folder.
MAIN_ARGS = _python_cli("examples/digits_resnet.pt", "--method", "tpp", "--ratio", "0.5", "--data", "digits",
                        "-o", "OUT", "--device", "cuda", "--amp", "--formats", "pt2,onnx", "--no-progress")
DISTILL_ARGS = _python_cli("examples/digits_vgg.pt", "--method", "greg1", "--ratio", "0.7", "--data", "digits",
                           "--distill", "--distill-regularization", "--reg-steps", "300", "-o", "OUT",
                           "--device", "cuda", "--amp", "--formats", "pt2", "--no-progress")
TORCHRUN_ARGS = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 *_python_cli("examples/digits_resnet.pt", "--method", "tpp", "--ratio", "0.5", "--data", "digits",
                              "--reg-steps", "300", "--finetune-epochs", "2", "-o", "OUT", "--device", "cuda",
                              "--formats", "pt2", "--no-progress")]

# The latency model's fidelity on a CUDA backend (benchmarks/latency_target.py); FIDELITY_CPU: the
# CPU rehearsal's replacements (--dry-cpu, --rehearse-cpu)
FIDELITY_ARGS = ["benchmarks/latency_target.py", "--part", "fidelity", "--backend", "torch-cuda-fp32",
                 "--models", "resnet50", "--batches", "8", "--threads", "1", "--prunings", "10", "--out", "OUT"]
FIDELITY_CPU = {"--backend": "torch-cpu", "--models": "digits_resnet", "--prunings": "3"}

CUDA_BACKENDS = ("torch-cuda-fp32", "torch-cuda-bf16", "onnxruntime-cuda", "torch-cuda-compile")
LATENCY_SPEC: dict[str, Any] = {
    "models": ["cnn", "decoder"], "cnn": "resnet50", "size": 224, "tokens": 128, "decoder_layers": 4,
    "speedup": 2.0, "round_to": 8, "backends": list(CUDA_BACKENDS),
    "batches": {"cnn": [1, 8, 64], "decoder": [1, 8]},
    # torch.compile compiles each model at each batch size (tens of seconds each): one batch size
    "compile_batches": {"cnn": [64], "decoder": [8]},
    "warmup": 3, "min_reps": 10, "max_reps": 200, "min_seconds": 0.5,
}
TINY_LATENCY_SPEC: dict[str, Any] = {  # --dry-cpu: the same code path, small and on the CPU
    **LATENCY_SPEC, "cnn": "resnet18", "size": 32, "tokens": 16, "decoder_layers": 1, "decoder": "plain",
    "backends": ["torch-cpu"], "batches": {"cnn": [1], "decoder": [1]}, "compile_batches": {},
    "warmup": 1, "min_reps": 2, "max_reps": 3, "min_seconds": 0.0,
    "threads": 1,  # CPU backends: 2 threads on a shared 2-core machine measure the other load (50x slower)
}


@dataclass
class Step:
    name: str
    title: str
    needs: tuple[str, ...]  # import names
    budget: float  # seconds, at most
    min_gpus: int = 1


STEPS = (
    Step("pytest-gpu", "pytest -m gpu over the GPU-marked tests", ("torch", "pytest", "click", "rich", "scipy"), 90),
    Step("main-tpp-amp", "README main command: tpp 0.5 on digits_resnet, --device cuda --amp, pt2+onnx",
         CLI_NEEDS + DIGITS_NEEDS, 150),
    Step("distill-greg1-amp", "greg1 0.7 on digits_vgg with --distill --distill-regularization, --device cuda --amp",
         CLI_NEEDS + DIGITS_NEEDS, 100),
    Step("latency-cuda", "latency of resnet50 and a LLaMA-shaped decoder, original vs slim (l1, 2x fewer FLOPs), "
         "on every CUDA backend", ("torch", "torchvision", "numpy", "scipy"), 240),
    Step("latency-model-cuda", "the torch-cuda-fp32 latency model of resnet50 at batch 8 against 10 random "
         "prunings, predicted vs measured speedup", CLI_NEEDS + ("torchvision",), 120),
    Step("torchrun-ddp", "2-process torchrun (DDP over NCCL) of the tpp run, --device cuda",
         CLI_NEEDS + DIGITS_NEEDS, 100, min_gpus=2),
)


# ---------------------------------------------------------------------------------------------
# Small helpers


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def packages() -> dict[str, dict[str, Any]]:
    """Every package of PACKAGES: found (importable) and its distribution's version."""
    importlib.invalidate_caches()
    return {dist: {"import": mod, "found": have(mod), "version": dist_version(dist)} for mod, dist in PACKAGES.items()}


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    """The end of a log file: its last `chars` characters, from a line start where possible."""
    try:
        data = path.read_bytes()[-4 * chars:].decode("utf-8", "replace")
    except OSError:
        return ""
    data = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", data).replace("\r", "\n")
    lines = [ln.rstrip() for ln in data.splitlines() if ln.strip()]
    text = "\n".join(lines)
    if len(text) > chars:
        text = text[-chars:]
        text = text[text.find("\n") + 1:] if "\n" in text[:200] else text
    return text


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def kill_group(proc: subprocess.Popen) -> None:
    """End a step's process and everything it started (its own session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Ran:
    returncode: int | None
    timed_out: bool
    seconds: float
    stdout: Path
    stderr: Path
    command: str

    def reason(self, prefer_stdout: bool = False) -> str:
        first, second = (self.stdout, self.stderr) if prefer_stdout else (self.stderr, self.stdout)
        text = tail(first) or tail(second)
        head = (f"timed out after {self.seconds:.0f} s" if self.timed_out
                else f"exit code {self.returncode}")
        return f"{head}; last output:\n{text}" if text else head


@dataclass
class Context:
    out: Path
    logs: Path
    python: str
    deadline: float
    env: dict[str, str]
    dry: bool = False
    dry_cpu: bool = False
    dry_reason: str | None = None
    rehearse: bool = False  # --rehearse-cpu: the GPU path with the CPU variants
    environment: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE

    def run(self, args: list[str], log_name: str, timeout: float, cwd: Path = ROOT) -> Ran:
        """Run `python ARGS` (or ARGS when it starts with an absolute program path) in its own
        session, stdout and stderr to logs/LOG_NAME.{out,err}, killed with its children at `timeout`."""
        cmd = [self.python, *args]
        out, err = self.logs / f"{log_name}.out", self.logs / f"{log_name}.err"
        t0 = time.monotonic()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=max(1.0, timeout))
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
                rc = proc.returncode
        return Ran(rc, timed_out, time.monotonic() - t0, out, err, shlex.join(cmd))

    def worker(self, kind: str, spec: dict[str, Any] | None, log_name: str, timeout: float) -> tuple[Ran, dict]:
        """Run this file as `--worker KIND`; returns the run and the JSON it wrote (possibly partial)."""
        result = self.logs / f"{log_name}.json"
        result.unlink(missing_ok=True)
        args = [str(Path(__file__).resolve()), "--worker", kind, "--result", str(result)]
        if spec is not None:
            spec_path = self.logs / f"{log_name}.spec.json"
            write_json(spec_path, spec)
            args += ["--spec", str(spec_path)]
        ran = self.run(args, log_name, timeout)
        try:
            data = json.loads(result.read_text())
        except (OSError, ValueError):
            data = {}
        return ran, data


def with_out(args: list[str], out: Path) -> list[str]:
    return [str(out) if a == "OUT" else a for a in args]


def cpu_variant(args: list[str]) -> list[str]:
    """A command-line step's arguments for the CPU dry run: --device cpu, no --amp, 20
    regularization steps, a fifth of an epoch of fine-tuning."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--amp":
            i += 1
            continue
        if a in ("--device", "--reg-steps", "--finetune-epochs"):
            i += 2
            continue
        out.append(a)
        i += 1
    return [*out, "--device", "cpu", "--reg-steps", "20", "--finetune-epochs", "0.2"]


# ---------------------------------------------------------------------------------------------
# Reading results


def report_figures(path: Path) -> dict[str, Any]:
    """What a compile run's report.json says, for the check: accuracies, training, verify,
    exports, runtime."""
    r = json.loads(path.read_text())
    reg, ft, v = r.get("regularization") or {}, r.get("finetune") or {}, r.get("verify") or {}
    fb, fa = r.get("flops_before"), r.get("flops_after")
    return {
        "acc_before": r.get("acc_before"),
        "acc_before_recalibration": r.get("acc_before_recalibration"),
        "acc_after_slim": r.get("acc_pruned"),
        "acc_finetuned": r.get("acc_final"),
        "params_before": r.get("params_before"), "params_after": r.get("params_after"),
        "flops_reduction": (fb / fa) if fb and fa else None,
        "regularization_steps": reg.get("steps"), "regularization_seconds": reg.get("seconds"),
        "finetune_steps": ft.get("steps"), "finetune_seconds": ft.get("seconds"),
        "finetune_distill": ft.get("distill"),
        "verify_ok": v.get("ok"), "verify_max_error": v.get("max_error"),
        "exports": [{k: e.get(k) for k in ("format", "ok", "max_error", "seconds", "error", "note")}
                    for e in r.get("exports") or []],
        "runtime": r.get("runtime"),
        "pass_seconds": {p.get("name"): p.get("seconds") for p in r.get("passes") or []},
        "warnings": r.get("warnings"),
    }


def report_problems(fig: dict[str, Any], device: str, amp: bool, world_size: int = 1) -> list[str]:
    """What in a finished run's report contradicts the check's expectations."""
    problems = []
    rt = fig.get("runtime") or {}
    if not str(rt.get("device", "")).startswith(device):
        problems.append(f"ran on {rt.get('device')!r}, expected {device}")
    if amp and not rt.get("amp"):
        problems.append("--amp given but report.json's runtime has no amp dtype")
    if world_size > 1 and rt.get("world_size") != world_size:
        problems.append(f"world_size {rt.get('world_size')}, expected {world_size}")
    if fig.get("verify_ok") is not True:
        problems.append(f"verify not ok (max error {fig.get('verify_max_error')})")
    for e in fig.get("exports") or []:
        if not e.get("ok"):
            problems.append(f"{e.get('format')} export failed: {e.get('error')}")
    return problems


def pytest_counts(xml_path: Path) -> dict[str, Any]:
    """Counts and skip reasons from pytest's JUnit XML."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = sum(float(s.get("time", 0)) for s in suites)
    counts["cases"] = []
    for case in root.iter("testcase"):
        outcome = "passed"
        detail = None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, detail = tag, (el.get("message") or "")[:300]
                break
        counts["cases"].append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                                "seconds": float(case.get("time", 0)), "detail": detail})
    return counts


def gpu_test_files() -> list[str]:
    """The test files that hold GPU-marked tests: passing only those keeps a missing test-only
    dependency of another file (hypothesis, transformers) from failing the collection."""
    files = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        with contextlib.suppress(OSError):
            if re.search(r"pytest\.mark\.gpu\b", path.read_text(errors="replace")):
                files.append(str(path.relative_to(ROOT)))
    return files


def cpu_pinned_ops(module: Any) -> list[str]:
    """The ops of an fx graph that name device=cpu (factory ops, `to`), which `Module.to` does not move."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    return [f"{n.name}={n.target}" for n in graph.nodes
            if n.op == "call_function" and str(n.kwargs.get("device", "")).startswith("cpu")]


def latency_summary(data: dict[str, Any]) -> list[str]:
    lines = [f"{name}: {m['warning']}" for name, m in (data.get("models") or {}).items() if m.get("warning")]
    for row in data.get("rows") or []:
        head = f"{row.get('model')} {row.get('backend')} b{row.get('batch', '-')}"
        if "speedup" in row:
            o, s = row["original"]["p50"] * 1e3, row["slim"]["p50"] * 1e3
            eff = f", efficiency {row['efficiency']:.2f}" if "efficiency" in row else ""
            lines.append(f"{head}: {o:.3g} ms -> {s:.3g} ms, {row['speedup']:.2f}x{eff}")
        elif row.get("error"):
            lines.append(f"{head}: error: {row['error'][:160]}")
        elif row.get("unavailable"):
            lines.append(f"{head}: unavailable: {row['unavailable'][:160]}")
    return lines


# ---------------------------------------------------------------------------------------------
# The steps


def missing(step: Step) -> list[str]:
    return [PACKAGES.get(m, m) for m in step.needs if not have(m)]


def run_step(step: Step, ctx: Context, selected: set[str] | None, parsed: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": step.name, "title": step.title, "status": "skipped", "seconds": 0.0,
                           "budget_s": step.budget, "reason": None, "command": None, "figures": {}}
    t0 = time.monotonic()
    try:
        _run_step(step, ctx, rec, selected, parsed)
    except Exception as e:  # noqa: BLE001 - one step breaking is a result, not the end of the check
        rec["status"], rec["reason"] = "failed", f"the checker broke in this step: {type(e).__name__}: {e}\n" + \
            traceback.format_exc()[-TAIL_CHARS:]
    rec["seconds"] = round(time.monotonic() - t0, 2)
    return rec


def _run_step(step: Step, ctx: Context, rec: dict[str, Any], selected: set[str] | None,
              parsed: dict[str, Any]) -> None:
    if selected is not None and step.name not in selected:
        rec["reason"] = "not selected (--steps)"
        return
    lacking = missing(step)
    if ctx.dry:
        rec["reason"] = ctx.dry_reason
        rec["dry_check"] = dry_check(step, ctx, lacking, parsed)
        return
    if lacking:
        rec["reason"] = f"missing packages: {', '.join(lacking)} (install them, or put their wheels in .whl/)"
        return
    count = ctx.environment.get("device_count") or 0
    if count < step.min_gpus and not (ctx.rehearse and step.min_gpus == 1):
        rec["reason"] = f"needs {step.min_gpus} CUDA devices: torch.cuda.device_count() is {count}"
        return
    left = ctx.left()
    if left < MIN_STEP:
        rec["reason"] = (f"time budget exhausted: {max(0.0, left):.1f} s left of --budget after the {RESERVE:.0f} s "
                         f"reserve, a step needs {MIN_STEP:.0f} s")
        return
    timeout = min(step.budget, left)
    rec["timeout_s"] = round(timeout, 1)
    {"pytest-gpu": step_pytest, "main-tpp-amp": step_cli, "distill-greg1-amp": step_cli,
     "latency-cuda": step_latency, "latency-model-cuda": step_latency_model,
     "torchrun-ddp": step_cli}[step.name](step, ctx, rec, timeout)


def _finish(rec: dict[str, Any], ran: Ran, prefer_stdout: bool = False) -> None:
    rec["command"] = ran.command
    rec["returncode"] = ran.returncode
    rec["logs"] = [str(ran.stdout), str(ran.stderr)]
    if ran.timed_out or ran.returncode != 0:
        rec["status"], rec["reason"] = "failed", ran.reason(prefer_stdout)
    else:
        rec["status"] = "ok"


def step_pytest(step: Step, ctx: Context, rec: dict[str, Any], timeout: float) -> None:
    files = gpu_test_files()
    if not files:
        rec["reason"] = "no test file holds a pytest.mark.gpu test"
        return
    xml = ctx.logs / "pytest-gpu.xml"
    ran = ctx.run(["-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml", str(xml),
                   *files], step.name, timeout)
    _finish(rec, ran, prefer_stdout=True)
    if xml.exists():
        counts = pytest_counts(xml)
        rec["figures"] = counts
        if ran.returncode == 0 and counts["tests"] == 0:
            rec["status"], rec["reason"] = "failed", "no GPU test ran"
        elif ran.returncode == 0 and counts["skipped"]:
            rec["note"] = f"{counts['skipped']} GPU test(s) skipped on a machine with CUDA: see figures.cases"
    elif ran.returncode == 5:
        rec["status"], rec["reason"] = "failed", "pytest collected no GPU test\n" + ran.reason(True)


CLI_STEP_ARGS = {"main-tpp-amp": MAIN_ARGS, "distill-greg1-amp": DISTILL_ARGS, "torchrun-ddp": TORCHRUN_ARGS}


def step_cli(step: Step, ctx: Context, rec: dict[str, Any], timeout: float) -> None:
    out = ctx.out / step.name
    shutil.rmtree(out, ignore_errors=True)  # ours: a fresh folder for each run
    args = with_out(CLI_STEP_ARGS[step.name], out)
    if ctx.rehearse:
        args = cpu_variant(args)
    ran = ctx.run(args, step.name, timeout)
    _finish(rec, ran)
    report = out / "report.json"
    if report.exists():
        fig = report_figures(report)
        rec["figures"] = {"wall_seconds": round(ran.seconds, 2), **fig}
        problems = report_problems(fig, "cpu" if ctx.rehearse else "cuda", amp="--amp" in args,
                                   world_size=2 if step.name == "torchrun-ddp" else 1)
        if problems and rec["status"] == "ok":
            rec["status"], rec["reason"] = "failed", "; ".join(problems)
        rec["figures"]["problems"] = problems
    elif rec["status"] == "ok":
        rec["status"], rec["reason"] = "failed", f"exit code 0 but no {report}"


def step_latency(step: Step, ctx: Context, rec: dict[str, Any], timeout: float) -> None:
    ran, data = ctx.worker("latency", TINY_LATENCY_SPEC if ctx.rehearse else LATENCY_SPEC, step.name, timeout)
    _finish(rec, ran)
    rec["figures"] = data
    rec["figures"]["summary"] = latency_summary(data)
    timed = [r for r in data.get("rows") or [] if "speedup" in r]
    if rec["status"] == "ok" and not timed:
        rec["status"], rec["reason"] = "failed", "no backend produced a timing: " + "; ".join(
            latency_summary(data)[:6])
    elif rec["status"] == "failed" and timed:
        rec["reason"] = f"{len(timed)} timings kept; " + rec["reason"]


def fidelity_args(out: Path, cpu: bool) -> list[str]:
    """The latency model step's arguments, writing to `out`; on the CPU (`cpu`) FIDELITY_CPU's."""
    args = with_out(FIDELITY_ARGS, out)
    return [FIDELITY_CPU.get(args[i - 1], a) if cpu and i else a for i, a in enumerate(args)]


def fidelity_figures(out: Path) -> dict[str, Any]:
    """Per model and batch of the fidelity JSON in `out`: the backend, the model's size and build
    time, mean absolute % error and rank correlation of each predictor, and every pruning's
    (measured, predicted, FLOPs) speedups."""
    paths = sorted(out.glob("bench_latency_fidelity*.json"))
    if not paths:
        return {"rows": []}
    data = json.loads(paths[0].read_text())
    rows = [{"model": r["model"], "backend": r.get("backend"), "batch": r["batch"], "kernels": r["kernels"],
             "build_seconds": r["build_seconds"], "summary": r["summary"],
             "samples": [{k: round(v, 4) for k, v in x.items()} for x in r["samples"]]} for r in data["rows"]]
    return {"file": str(paths[0]), "rows": rows, "gpu": data["environment"].get("gpu")}


def fidelity_line(figures: dict[str, Any]) -> str:
    """One line per fidelity row: the model's and FLOPs' mean absolute % error and rank correlation."""
    parts = []
    for r in figures.get("rows") or []:
        model = next((v for k, v in r["summary"].items() if k.startswith("model_")), {})
        parts.append(f"{r['model']} {r['backend']} b{r['batch']}: model {_pct(model.get('mape'))} error, rho "
                     f"{model.get('spearman', float('nan')):.2f}; FLOPs {_pct(r['summary']['flops']['mape'])} error, rho "
                     f"{r['summary']['flops']['spearman']:.2f}")
    return "; ".join(parts) or "no rows"


def step_latency_model(step: Step, ctx: Context, rec: dict[str, Any], timeout: float) -> None:
    out = ctx.out / step.name
    shutil.rmtree(out, ignore_errors=True)  # ours: a fresh folder for each run
    ran = ctx.run(fidelity_args(out, ctx.rehearse), step.name, timeout)
    _finish(rec, ran)
    rec["figures"] = fidelity_figures(out)
    if rec["status"] == "ok" and not rec["figures"]["rows"]:
        rec["status"], rec["reason"] = "failed", f"exit code 0 but no fidelity JSON in {out}"


# ---------------------------------------------------------------------------------------------
# Dry checks (no CUDA, or --dry)


def dry_check(step: Step, ctx: Context, lacking: list[str], parsed: dict[str, Any]) -> dict[str, Any]:
    """Validate what the step would run without CUDA; {"status": ok|failed|skipped, ...}."""
    t0 = time.monotonic()
    if lacking:
        return {"status": "skipped", "reason": f"missing packages: {', '.join(lacking)}"}
    try:
        if step.name == "pytest-gpu":
            out = _dry_pytest(ctx)
        elif step.name == "latency-cuda":
            out = _dry_latency(ctx)
        elif step.name == "latency-model-cuda":
            out = _dry_latency_model(ctx)
        else:
            out = _dry_cli(step, ctx, parsed)
    except Exception as e:  # noqa: BLE001
        out = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def _dry_pytest(ctx: Context) -> dict[str, Any]:
    files = gpu_test_files()
    if not files:
        return {"status": "failed", "reason": "no test file holds a pytest.mark.gpu test"}
    ran = ctx.run(["-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                  "dry-pytest-gpu", min(120.0, max(MIN_STEP, ctx.left())))
    text = tail(ran.stdout, 4000)
    m = re.search(r"(\d+)(?:/(\d+))? tests? collected", text)
    collected = int(m.group(1)) if m else None
    ok = ran.returncode == 0 and bool(collected)
    out = {"status": "ok" if ok else "failed", "command": ran.command, "test_files": files,
           "gpu_tests_collected": collected,
           "gpu_tests": [ln.strip() for ln in text.splitlines() if "::" in ln]}
    if not ok:
        out["reason"] = ran.reason(prefer_stdout=True)
    return out


def _dry_cli(step: Step, ctx: Context, parsed: dict[str, Any]) -> dict[str, Any]:
    check = parsed.get(step.name) or {"status": "failed", "reason": parsed.get("error", "the parse check did not run")}
    out = {"status": check.get("status", "failed"), "parse": check,
           "command": shlex.join([ctx.python, *with_out(CLI_STEP_ARGS[step.name], ctx.out / step.name)])}
    if out["status"] != "ok":
        out["reason"] = check.get("reason")
        return out
    if ctx.dry_cpu and step.name != "torchrun-ddp":  # torchrun: two torch processes; parsed only
        dest = ctx.out / "dry-cpu" / step.name
        shutil.rmtree(dest, ignore_errors=True)
        args = cpu_variant(with_out(CLI_STEP_ARGS[step.name], dest))
        ran = ctx.run(args, f"dry-cpu-{step.name}", min(300.0, max(MIN_STEP, ctx.left())))
        cpu: dict[str, Any] = {"command": ran.command, "returncode": ran.returncode, "seconds": round(ran.seconds, 2)}
        if ran.returncode == 0 and (dest / "report.json").exists():
            cpu["figures"] = report_figures(dest / "report.json")
            cpu["problems"] = report_problems(cpu["figures"], "cpu", amp=False)
            cpu["status"] = "ok" if not cpu["problems"] else "failed"
        else:
            cpu["status"], cpu["reason"] = "failed", ran.reason()
        out["cpu_run"] = cpu
        if cpu["status"] != "ok":
            out["status"], out["reason"] = "failed", "CPU run: " + (cpu.get("reason") or "; ".join(cpu["problems"]))
    return out


def _dry_latency_model(ctx: Context) -> dict[str, Any]:
    """The script's options parsed (its imports done: `--help`); with --dry-cpu, the CPU rehearsal."""
    args = fidelity_args(ctx.out / "latency-model-cuda", cpu=False)
    ran = ctx.run([args[0], "--help"], "dry-latency-model-help", min(120.0, max(MIN_STEP, ctx.left())))
    out: dict[str, Any] = {"status": "ok" if ran.returncode == 0 else "failed", "command": shlex.join(args)}
    if out["status"] != "ok":
        out["reason"] = ran.reason()
        return out
    if ctx.dry_cpu:
        dest = ctx.out / "dry-cpu" / "latency-model-cuda"
        shutil.rmtree(dest, ignore_errors=True)
        ran = ctx.run(fidelity_args(dest, cpu=True), "dry-cpu-latency-model", min(300.0, max(MIN_STEP, ctx.left())))
        figures = fidelity_figures(dest)
        out["cpu_run"] = {"status": "ok" if ran.returncode == 0 and figures["rows"] else "failed",
                          "command": ran.command, "seconds": round(ran.seconds, 2), "figures": figures}
        if out["cpu_run"]["status"] != "ok":
            out["status"] = "failed"
            out["reason"] = out["cpu_run"]["reason"] = ran.reason()
    return out


def _dry_latency(ctx: Context) -> dict[str, Any]:
    spec = {**LATENCY_SPEC, "check": True}
    ran, data = ctx.worker("latency", spec, "dry-latency-check", min(120.0, max(MIN_STEP, ctx.left())))
    out: dict[str, Any] = {"status": "ok" if ran.returncode == 0 and data.get("checked") else "failed",
                           "command": ran.command, "check": data}
    if out["status"] != "ok":
        out["reason"] = ran.reason()
        return out
    if ctx.dry_cpu:
        ran, tiny = ctx.worker("latency", TINY_LATENCY_SPEC, "dry-cpu-latency", min(300.0, max(MIN_STEP, ctx.left())))
        timed = [r for r in tiny.get("rows") or [] if "speedup" in r]
        out["cpu_run"] = {"status": "ok" if ran.returncode == 0 and timed else "failed", "command": ran.command,
                          "seconds": round(ran.seconds, 2), "summary": latency_summary(tiny),
                          "models": tiny.get("models")}
        if out["cpu_run"]["status"] != "ok":
            out["status"] = "failed"
            out["reason"] = out["cpu_run"]["reason"] = ran.reason()
    return out


# ---------------------------------------------------------------------------------------------
# Workers (run as `python gpu_check.py --worker KIND`, one torch process at a time)


def worker_env(result: Path) -> None:
    """torch, CUDA and the GPUs as torch sees them; where pcompiler is imported from."""
    info: dict[str, Any] = {}
    write_json(result, info)
    import torch

    info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, git_version=torch.version.git_version,
                cuda_available=torch.cuda.is_available(), device_count=0, gpus=[])
    with contextlib.suppress(Exception):
        info["cudnn"] = torch.backends.cudnn.version()
    info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    if info["cuda_available"]:
        info["device_count"] = torch.cuda.device_count()
        for i in range(info["device_count"]):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gib": round(p.total_memory / 2**30, 1),
                                 "multiprocessors": p.multi_processor_count})
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    write_json(result, info)
    try:
        import onnxruntime as ort

        info["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except Exception as e:  # noqa: BLE001
        info["onnxruntime"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import pcompiler
        import pcompiler.passes
        import pcompiler.targets

        info["pcompiler"] = {"pcompiler": pcompiler.__file__, "passes": pcompiler.passes.__file__,
                             "targets": pcompiler.targets.__file__,
                             "from_this_repo": all(str(Path(m.__file__).resolve()).startswith(str(ROOT))
                                                   for m in (pcompiler, pcompiler.passes, pcompiler.targets))}
    except Exception as e:  # noqa: BLE001
        info["pcompiler"] = {"error": f"{type(e).__name__}: {e}"}
    write_json(result, info)


def worker_parse(result: Path, spec: dict[str, Any]) -> None:
    """Parse each command-line step's arguments with the CLI's own parser (click's make_context:
    option names, types, choices, that MODEL exists) and torchrun's, without running them."""
    out: dict[str, Any] = {}
    write_json(result, out)
    import click

    from pcompiler.cli import main as cli

    def parse_cli(args: list[str]) -> dict[str, Any]:
        name = args[0] if args and args[0] in cli.commands else "compile"
        rest = args[1:] if args and args[0] in cli.commands else args
        command = cli.commands[name]
        try:
            ctx = command.make_context(f"pcompile {name}", list(rest))
        except click.exceptions.Exit as e:
            return {"status": "failed", "reason": f"the parser exited ({e.exit_code}) instead of parsing"}
        except click.ClickException as e:
            return {"status": "failed", "reason": f"{type(e).__name__}: {e.format_message()}"}
        given = {k: str(v) for k, v in ctx.params.items() if v not in (None, False, (), [])}
        return {"status": "ok", "command": name, "params": given}

    for step, args in spec["commands"].items():
        try:
            if args[:2] == ["-m", "torch.distributed.run"]:
                from torch.distributed.run import get_args_parser

                try:
                    ns = get_args_parser().parse_args(args[2:])
                except SystemExit as e:
                    out[step] = {"status": "failed", "reason": f"torchrun's parser rejected the arguments ({e.code})"}
                    continue
                if not ns.module or ns.training_script != "pcompiler.cli":
                    out[step] = {"status": "failed", "reason": f"torchrun would run {ns.training_script!r}"}
                    continue
                res = parse_cli(list(ns.training_script_args))
                res["torchrun"] = {"nproc_per_node": ns.nproc_per_node, "standalone": ns.standalone}
                out[step] = res
            elif args[:2] == ["-m", "pcompiler.cli"]:
                out[step] = parse_cli(args[2:])
            else:
                out[step] = {"status": "failed", "reason": f"not a pcompiler command: {shlex.join(args)}"}
        except Exception as e:  # noqa: BLE001
            out[step] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        write_json(result, out)
    write_json(result, out)


def worker_latency(result: Path, spec: dict[str, Any]) -> None:
    """Prune resnet50 and a decoder by l1 to `speedup` fewer FLOPs and time original against
    slim on each backend of `spec` (benchmarks/latency.py's models and pcompiler's bench code).
    With spec["check"]: only import, build and validate the backends. The result file is
    rewritten after each measurement, so a run stopped by its time limit keeps what it measured."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    data: dict[str, Any] = {"spec": spec, "models": {}, "rows": [], "backend_seconds": {}}
    save = lambda: write_json(result, data)  # noqa: E731
    save()
    import _common  # noqa: F401 - the torchvision import workaround, before torchvision
    import latency
    import llm_meta
    import torch

    from pcompiler.costs import static_costs
    from pcompiler.inputs import InputSpec
    from pcompiler.targets.bench import BACKENDS, LatencySettings, machine, measure_latency

    data["machine"] = machine()
    unknown = [b for b in spec["backends"] if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; pcompiler's are {list(BACKENDS)}")
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        data["onnxruntime"] = {"version": ort.__version__, "providers": providers}
    except ImportError:
        providers = []
        data["onnxruntime"] = None

    def unavailable(backend: str) -> str | None:
        if backend.startswith("torch-cuda") and not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        if backend == "onnxruntime-cuda" and "CUDAExecutionProvider" not in providers:
            ver = data["onnxruntime"]["version"] if data["onnxruntime"] else None
            return (f"onnxruntime {ver} has no CUDAExecutionProvider (providers: {', '.join(providers) or 'none'}): "
                    "the CPU build is installed, so this backend is not timed (pcompiler's bench leaves it out of "
                    "its defaults too); install onnxruntime-gpu (pip install 'pcompiler[gpu]') to time it")
        if backend == "onnxruntime-cpu" and not providers:
            return "onnxruntime is not installed"
        return None

    def build(which: str) -> tuple[str, torch.nn.Module, torch.Tensor, Any, str]:
        """(label, model, example input, its InputSpec, description) of "cnn" or "decoder"."""
        torch.manual_seed(0)
        if which == "cnn":
            model, x, inspec = latency.build(spec["cnn"], spec["size"])
            return spec["cnn"], model, x, inspec, f"torchvision {spec['cnn']}, random weights, input {tuple(x.shape)}"
        if spec.get("decoder") != "plain" and have("transformers") and spec["tokens"] == 128:
            model, x, inspec = latency.build("llama", spec["size"])
            return "llama-hf", model, x, inspec, (
                "transformers LlamaForCausalLM (benchmarks/latency.py): hidden 512, 4 layers, 8 query heads over "
                "4 key/value heads, MLP 1408, vocabulary 8000, 128 tokens, random weights")
        model = llm_meta.Llama(vocab=8000, hidden=512, layers=spec["decoder_layers"], heads=8, intermediate=1408,
                               positions=spec["tokens"]).eval()
        x = torch.randint(0, 8000, (1, spec["tokens"]))
        return "llama-plain", model, x, InputSpec(tuple(x.shape), torch.int64), (
            f"plain-torch LLaMA-shaped decoder (benchmarks/llm_meta.py; transformers "
            f"{'not installed' if not have('transformers') else 'not used'}): hidden 512, {spec['decoder_layers']} "
            f"layers, 8 heads (no grouped-query attention), MLP 1408, vocabulary 8000, {spec['tokens']} tokens, "
            "random weights")

    data["backends_unavailable"] = {b: r for b in spec["backends"] if (r := unavailable(b))}
    if spec.get("check"):
        for which in spec["models"]:
            name, _, x, _, kind = build(which)
            data["models"][name] = {"kind": kind, "input": list(x.shape)}
        data["checked"] = True
        save()
        return

    pairs: dict[str, tuple[str, torch.nn.Module, torch.nn.Module, torch.Tensor]] = {}
    for which in spec["models"]:
        t0 = time.perf_counter()
        name, model, x, inspec, kind = build(which)
        original, slim, ratio = latency.prune_ours(model, inspec, spec["speedup"], spec["round_to"], False)
        costs = {k: static_costs(m, (x,)) for k, m in (("original", original), ("slim", slim))}
        reduction = costs["original"]["flops"] / costs["slim"]["flops"] if costs["slim"]["flops"] else None
        data["models"][name] = {"kind": kind, "input": list(x.shape), "ratio": ratio, "flops_reduction": reduction,
                                "params": {k: c.get("params") for k, c in costs.items()},
                                "flops": {k: c.get("flops") for k, c in costs.items()},
                                "prune_seconds": round(time.perf_counter() - t0, 2)}
        pinned = {k: cpu_pinned_ops(m) for k, m in (("original", original), ("slim", slim)) if cpu_pinned_ops(m)}
        if pinned:  # what Module.to does not move (graphs read by torch.export); see the report
            data["models"][name]["cpu_pinned_ops"] = pinned
            data["models"][name]["warning"] = (
                f"the {' and '.join(pinned)} graphs have ops with device=cpu ("
                + ", ".join(f"{op} x{n}" for op, n in collections.Counter(
                    op.split("=", 1)[1] for op in pinned.get("slim") or next(iter(pinned.values()))).items())
                + "): targets/bench.py's torch-cuda runners move models with deepcopy + Module.to, which leaves them "
                "on the CPU, so expect device-mismatch errors on the torch-cuda backends (pcompiler.runtime.copy_to "
                "moves them)")
        pairs[which] = (name, original, slim, x)
        save()

    # eager backends for every model first; torch.compile (slow to compile) last
    eager = [b for b in spec["backends"] if b != "torch-cuda-compile"]
    jobs = [(w, b) for w in pairs for b in eager]
    if "torch-cuda-compile" in spec["backends"]:
        jobs += [(w, "torch-cuda-compile") for w in pairs]
    for which, backend in jobs:
        name, original, slim, x = pairs[which]
        reason = unavailable(backend)
        if reason:
            data["rows"].append({"model": name, "backend": backend, "unavailable": reason})
            save()
            continue
        batches = (spec["compile_batches"] if backend == "torch-cuda-compile" else spec["batches"]).get(which, [1])
        settings = LatencySettings(batch_sizes=tuple(batches), backends=(backend,), warmup=spec["warmup"],
                                   min_reps=spec["min_reps"], max_reps=spec["max_reps"],
                                   min_seconds=spec["min_seconds"], threads=spec.get("threads"))
        t0 = time.perf_counter()
        rows = measure_latency({"original": original, "slim": slim}, (x,), settings)
        data["backend_seconds"][f"{name}/{backend}"] = round(time.perf_counter() - t0, 2)
        reduction = data["models"][name]["flops_reduction"]
        for row in rows:
            row["model"] = name
            if "speedup" in row and reduction:
                row["flops_reduction"] = reduction
                row["efficiency"] = row["speedup"] / reduction
            data["rows"].append(row)
        save()
    data["finished"] = True
    save()


# ---------------------------------------------------------------------------------------------
# Setup (called by gpu_check.sh, running in the virtual environment it made)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def setup(args: argparse.Namespace) -> int:
    """In the virtual environment gpu_check.sh made (--system-site-packages, no pip of its own):
    1. make the parent interpreter's site folders visible (when it is itself a venv, or has a user
       site), with their .pth files;
    2. map the package folders as pyproject.toml's [tool.setuptools.package-dir] says (an import
       hook loaded by a .pth file: `import pcompiler.passes` finds passes/), so every process of
       this interpreter, torchrun's workers and test subprocesses included, imports this checkout;
    3. install what is missing from the wheelhouse, offline, the installed torch (and numpy,
       onnx, ...) pinned so that nothing replaces them.
    Writes OUT/logs/setup.json. Without a venv (gpu_check.sh could not make one) the hook goes to
    the user site, and pip installs with --user."""
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / "setup.log", "a")  # noqa: SIM115 - closed at the end
    record: dict[str, Any] = {"python": sys.executable, "parent_python": args.parent_python,
                              "venv": sys.prefix if sys.prefix != sys.base_prefix else None, "steps": []}

    def note(text: str) -> None:
        print(f"[gpu_check setup] {text}", flush=True)
        log.write(text + "\n")
        log.flush()
        record["steps"].append(text)

    in_our_venv = bool(args.venv) and Path(sys.prefix).resolve() == Path(args.venv).resolve()
    if in_our_venv:
        target = Path(sysconfig.get_paths()["purelib"])
    elif site.ENABLE_USER_SITE:
        target = Path(site.getusersitepackages())
    else:
        target = None
    record["site_dir"] = str(target) if target else None

    # 1. the parent's site folders
    if in_our_venv and args.parent_python:
        try:
            parent = json.loads(subprocess.run([args.parent_python, "-c", "import json, sys; print(json.dumps(sys.path))"],
                                               capture_output=True, text=True, timeout=60, check=True).stdout)
        except Exception as e:  # noqa: BLE001
            parent = []
            note(f"could not read the parent interpreter's sys.path: {e}")
        mine = {os.path.realpath(p) for p in sys.path}
        extra = [p for p in parent if p and p.rstrip("/").endswith(("site-packages", "dist-packages"))
                 and os.path.isdir(p) and os.path.realpath(p) not in mine]
        if extra:
            # one exec'd line each (.pth import lines run in a function: no comprehension sees `site`)
            (target / "_gpu_check_parent.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n"
                                                                  for p in extra))
            for p in extra:
                site.addsitedir(p)
            note(f"parent site folders made visible: {', '.join(extra)}")
        record["parent_site_dirs"] = extra

    # 2. the package folders
    mapping = package_dirs()
    record["package_dirs"] = mapping
    if target is None:
        note("no venv and no user site: the package folders cannot be mapped; pcompiler.passes will not import")
    else:
        target.mkdir(parents=True, exist_ok=True)
        (target / "_gpu_check_pcompiler.py").write_text(FINDER.format(mapping=mapping))
        (target / "_gpu_check_pcompiler.pth").write_text("import _gpu_check_pcompiler\n")
        note(f"package folders mapped by an import hook in {target}: "
             + ", ".join(f"{k} -> {os.path.relpath(v, ROOT)}/" for k, v in mapping.items()))

    # 3. the wheelhouse
    importlib.invalidate_caches()
    wh = Path(args.wheelhouse) if args.wheelhouse else None
    record["missing_before"] = [PACKAGES[m] for m in WHEELHOUSE_WANTED if not have(m)]
    wheels = sorted(wh.glob("*.whl")) if wh and wh.is_dir() else []
    if not wheels:
        note(f"no wheelhouse ({wh or 'none given'}): nothing installed; missing: "
             f"{', '.join(record['missing_before']) or 'nothing'}")
    else:
        have_dists = {_normalize(w.name.split("-")[0]) for w in wheels}
        record["wheelhouse"] = {"path": str(wh), "wheels": len(wheels),
                                "mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 1)}
        wanted = [PACKAGES[m] for m in WHEELHOUSE_WANTED if not have(m)]
        absent = [d for d in wanted if _normalize(d) not in have_dists]
        todo = [d for d in wanted if _normalize(d) in have_dists]
        if absent:
            note(f"missing and not in the wheelhouse: {', '.join(absent)}")
        if todo:
            install(todo, wh, wheels, logs, in_our_venv, note)
    importlib.invalidate_caches()
    record["missing_after"] = [PACKAGES[m] for m in WHEELHOUSE_WANTED if not have(m)]
    record["installed"] = sorted(set(record["missing_before"]) - set(record["missing_after"]))
    write_json(logs / "setup.json", record)
    log.close()
    return 0


def install(dists: list[str], wh: Path, wheels: list[Path], logs: Path, in_venv: bool, note) -> None:
    constraints = logs / "constraints.txt"
    pins = [f"{d}=={v}" for d in PINNED if (v := dist_version(d))]
    constraints.write_text("".join(p + "\n" for p in pins))
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        # --isolated: no pip.conf or PIP_* variable of the machine adds an index or other links
        base = [sys.executable, "-m", "pip", "install", "--isolated", "--no-index", "--find-links", str(wh),
                "--disable-pip-version-check", "--no-warn-script-location", "--progress-bar", "off",
                "-c", str(constraints)]
        if not in_venv:
            base += ["--user", "--break-system-packages"]

        def pip(names: list[str]) -> bool:
            with open(logs / "setup.log", "a") as f:
                f.write(f"$ {shlex.join(base + names)}\n")
                f.flush()
                rc = subprocess.run(base + names, stdout=f, stderr=subprocess.STDOUT, timeout=300).returncode
            return rc == 0

        if pip(dists):
            note(f"installed from the wheelhouse: {', '.join(dists)} (pinned: {', '.join(pins) or 'nothing'})")
            return
        for d in dists:  # one at a time: a wheel that cannot install does not stop the others
            note(f"{'installed' if pip([d]) else 'could NOT install (see setup.log)'} from the wheelhouse: {d}")
        return
    # No pip: unpack the wheels of every distribution not installed (a wheel is a zip of files
    # that go to site-packages; scripts and data files are not needed here).
    target = Path(sysconfig.get_paths()["purelib"]) if in_venv else Path(site.getusersitepackages())
    done = []
    for w in wheels:
        dist = w.name.split("-")[0]
        if dist_version(dist) is None and _normalize(dist) not in {_normalize(p) for p in PINNED}:
            with zipfile.ZipFile(w) as z:
                z.extractall(target)
            done.append(dist)
    note(f"no pip: unpacked {len(done)} wheels into {target}: {', '.join(done)}")


FINDER = '''"""Written by benchmarks/gpu_check.py --setup: map pcompiler's packages to this checkout's
folders as pyproject.toml's [tool.setuptools.package-dir] does (what an editable install does)."""
import importlib.abc
import importlib.util
import os
import sys

_MAP = {mapping!r}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _MAP.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


if not any(type(f).__name__ == "_Finder" and getattr(f, "_gpu_check", False) for f in sys.meta_path):
    _finder = _Finder()
    _finder._gpu_check = True
    sys.meta_path.insert(0, _finder)
'''


def package_dirs() -> dict[str, str]:
    """pyproject.toml's [tool.setuptools.package-dir] as absolute folders."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        table = tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    except (ImportError, KeyError):  # Python 3.10, or no table: read the lines
        section = re.search(r"\[tool\.setuptools\.package-dir\]\n(.*?)(?:\n\[|\Z)", text, re.S)
        table = dict(re.findall(r'^"?([\w.]+)"?\s*=\s*"([^"]+)"', section.group(1), re.M)) if section else {}
    mapping = {pkg: str((ROOT / folder).resolve()) for pkg, folder in table.items()}
    mapping.setdefault("pcompiler", str((ROOT / "pcompiler").resolve()))
    return mapping


# ---------------------------------------------------------------------------------------------
# The environment record


def environment(ctx: Context, setup_record: dict[str, Any]) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "hostname": platform.node()}
    ran, info = ctx.worker("env", None, "env", min(180.0, max(MIN_STEP, ctx.left())))
    env.update(info)
    if ran.returncode != 0:
        env["torch_error"] = ran.reason()
    env["driver"] = nvidia_driver()
    pk = packages()
    env["packages"] = {d: p["version"] if p["found"] else None for d, p in pk.items()}
    env["packages_missing"] = [d for d, p in pk.items() if not p["found"]]
    env["setup"] = setup_record
    return env


def nvidia_driver() -> dict[str, Any]:
    """The driver as nvidia-smi (or /proc/driver/nvidia/version) reports it."""
    out: dict[str, Any] = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "--query-gpu=index,name,driver_version,memory.total,memory.used,"
                                  "utilization.gpu,temperature.gpu,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            out["nvidia_smi"] = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()] or res.stderr.strip()
            versions = {ln.split(",")[2].strip() for ln in res.stdout.splitlines() if ln.count(",") >= 2}
            if versions:
                out["version"] = ", ".join(sorted(versions))
        except Exception as e:  # noqa: BLE001
            out["nvidia_smi"] = f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        out["proc"] = Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    return out


# ---------------------------------------------------------------------------------------------
# Main


def summary_lines(report: dict[str, Any]) -> list[str]:
    env = report.get("environment") or {}
    gpus = ", ".join(g["name"] for g in env.get("gpus") or []) or "none"
    lines = [f"gpu_check: mode {report['mode']}"
             + (f" ({report['dry_reason']})" if report.get("dry_reason") else "")
             + f"; torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, GPUs: {gpus}"
             + (f", driver {env['driver']['version']}" if (env.get("driver") or {}).get("version") else ""),
             f"missing packages: {', '.join(env.get('packages_missing') or []) or 'none'}"]
    rows = []
    for s in report["steps"]:
        if s["status"] == "ok":
            detail = _ok_detail(s)
        else:
            detail = (s.get("reason") or "").splitlines()[0] if s.get("reason") else ""
            if s["status"] == "failed" and s.get("reason") and "\n" in s["reason"]:
                detail += " | " + s["reason"].strip().splitlines()[-1]
        dc = s.get("dry_check")
        if dc:
            detail += f" | dry check {dc['status']}" + _dry_detail(s["name"], dc)
        rows.append((s["name"], s["status"], f"{s['seconds']:.1f}", detail))
    w = [max(len(r[i]) for r in rows + [("step", "status", "seconds", "")]) for i in range(3)]
    lines.append(f"{'step':<{w[0]}}  {'status':<{w[1]}}  {'seconds':>{w[2]}}  result")
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d[:200]}" for a, b, c, d in rows]
    for s in report["steps"]:
        if s["name"] == "latency-cuda" and s["status"] in ("ok", "failed"):
            lines += ["latency:"] + [f"  {ln}" for ln in (s.get("figures") or {}).get("summary", [])]
    lines.append(f"JSON: {report['json']}  ({report['summary']}, {report['total_seconds']:.0f} s)")
    return lines


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def _ok_detail(s: dict[str, Any]) -> str:
    f = s.get("figures") or {}
    if s["name"] == "pytest-gpu":
        return f"{f.get('passed')} passed, {f.get('skipped')} skipped, {f.get('failures')} failed"
    if s["name"] == "latency-cuda":
        return f"{sum('speedup' in r for r in f.get('rows') or [])} timings"
    if s["name"] == "latency-model-cuda":
        return fidelity_line(f)
    rt = f.get("runtime") or {}
    text = f"acc {_pct(f.get('acc_before'))} -> {_pct(f.get('acc_after_slim'))} -> {_pct(f.get('acc_finetuned'))}"
    reg = f.get("regularization_seconds")
    if isinstance(reg, (int, float)):
        text += f", reg {f.get('regularization_steps')} steps in {reg:.1f} s"
    return text + f", verify {f.get('verify_max_error')}, {rt.get('device')} {rt.get('amp') or ''}".rstrip()


def _dry_detail(name: str, dc: dict[str, Any]) -> str:
    if dc["status"] != "ok":
        return ": " + (dc.get("reason") or "").splitlines()[0][:150] if dc.get("reason") else ""
    if name == "pytest-gpu":
        return f": {dc.get('gpu_tests_collected')} GPU tests collected"
    if name == "latency-cuda":
        extra = f"; CPU run {len(dc['cpu_run']['summary'])} rows" if dc.get("cpu_run") else ""
        return ": models build, backends known" + extra
    if name == "latency-model-cuda":
        return ": the script loads" + (f"; CPU run {fidelity_line(dc['cpu_run']['figures'])}" if dc.get("cpu_run") else "")
    cpu = dc.get("cpu_run")
    if cpu and cpu.get("figures"):
        f = cpu["figures"]
        return (f": arguments parse; CPU run acc {_pct(f.get('acc_before'))} -> {_pct(f.get('acc_after_slim'))} -> "
                f"{_pct(f.get('acc_finetuned'))}, verify {f.get('verify_max_error')}")
    return ": arguments parse"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json and logs/ (default: $OUT, else a temporary one)")
    ap.add_argument("--dry", action="store_true", help="run no CUDA step; validate instead")
    ap.add_argument("--dry-cpu", action="store_true", help="--dry, and run the command-line steps and a tiny latency "
                    "run on the CPU")
    ap.add_argument("--rehearse-cpu", action="store_true",
                    help="to test this checker without a GPU: run the GPU path (not the dry checks) with the CPU "
                    "variants (--device cpu, 20 regularization steps, the tiny latency run on torch-cpu)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole check, from --t0")
    ap.add_argument("--t0", type=float, help="epoch seconds the check started at (gpu_check.sh's start)")
    ap.add_argument("--steps", help="comma-separated step names to run (default: all): "
                    + ",".join(s.name for s in STEPS))
    # internal
    ap.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--wheelhouse", help=argparse.SUPPRESS)
    ap.add_argument("--parent-python", help=argparse.SUPPRESS)
    ap.add_argument("--venv", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=("env", "parse", "latency"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec.read_text()) if args.spec else {}
        {"env": lambda: worker_env(args.result), "parse": lambda: worker_parse(args.result, spec),
         "latency": lambda: worker_latency(args.result, spec)}[args.worker]()
        return 0
    if not args.out:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="gpu_check."))
    args.out = args.out.resolve()
    if args.setup:
        return setup(args)
    if args.steps:
        unknown = set(args.steps.split(",")) - {s.name for s in STEPS}
        if unknown:
            print(f"unknown steps: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
    return check(args)


def check(args: argparse.Namespace) -> int:
    t_start = time.time()
    t0 = args.t0 or t_start
    out = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu_check.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ctx = Context(out=out, logs=logs, python=sys.executable, deadline=t0 + args.budget, env=env,
                  dry=args.dry or args.dry_cpu, dry_cpu=args.dry_cpu, rehearse=args.rehearse_cpu)
    try:
        setup_record = json.loads((logs / "setup.json").read_text())
    except (OSError, ValueError):
        setup_record = {"note": "no logs/setup.json: gpu_check.py was run without gpu_check.sh"}
    report: dict[str, Any] = {"schema": SCHEMA, "created": now_iso(), "repo": str(ROOT), "json": str(json_path),
                              "budget_s": args.budget, "started_before_s": round(t_start - t0, 1),
                              "mode": None, "dry_reason": None, "environment": {}, "steps": []}
    code = 0
    try:
        ctx.environment = environment(ctx, setup_record)
        report["environment"] = ctx.environment
        reasons = []
        if ctx.environment.get("cuda_available") is not True and not (ctx.rehearse and "cuda_available" in ctx.environment):
            last = ((ctx.environment.get("torch_error") or "?").strip().splitlines() or ["?"])[-1]
            why = ("torch.cuda.is_available() is False" if "cuda_available" in ctx.environment
                   else f"torch did not import ({last.strip()})")
            reasons.append(f"no CUDA device: {why}")
            ctx.dry = True
        if args.dry or args.dry_cpu:
            reasons.append("--dry-cpu given" if args.dry_cpu else "--dry given")
        ctx.dry_reason = "; ".join(reasons) or None
        report["mode"] = ("dry-cpu" if ctx.dry_cpu else "dry") if ctx.dry else ("rehearse-cpu" if ctx.rehearse else "gpu")
        report["dry_reason"] = ctx.dry_reason
        write_json(json_path, report)
        selected = set(args.steps.split(",")) if args.steps else None
        parsed: dict[str, Any] = {}
        if ctx.dry:
            cli_steps = [s for s in STEPS if s.name in CLI_STEP_ARGS and (selected is None or s.name in selected)]
            if cli_steps and not any(missing(s) for s in cli_steps):
                commands = {s.name: with_out(CLI_STEP_ARGS[s.name], out / s.name) for s in cli_steps}
                ran, parsed = ctx.worker("parse", {"commands": commands}, "dry-parse",
                                         min(120.0, max(MIN_STEP, ctx.left())))
                if ran.returncode != 0:
                    parsed = {**parsed, "error": ran.reason()}
        for step in STEPS:
            print(f"[gpu_check] {step.name} ...", file=sys.stderr, flush=True)
            rec = run_step(step, ctx, selected, parsed)
            report["steps"].append(rec)
            print(f"[gpu_check] {step.name}: {rec['status']} in {rec['seconds']:.1f} s", file=sys.stderr, flush=True)
            write_json(json_path, report)
        bad = [s for s in report["steps"] if s["status"] == "failed"
               or (s.get("dry_check") or {}).get("status") == "failed"]
        code = 1 if bad else 0
    except Exception as e:  # noqa: BLE001 - the JSON must say what broke
        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-TAIL_CHARS:]}"
        code = 2
    counts = {k: sum(s["status"] == k for s in report["steps"]) for k in ("ok", "failed", "skipped")}
    report["summary"] = ", ".join(f"{v} {k}" for k, v in counts.items())
    report["counts"] = counts
    report["exit_code"] = code
    report["total_seconds"] = round(time.time() - t0, 1)
    write_json(json_path, report)
    try:
        print("\n".join(summary_lines(report)), flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"gpu_check: summary failed ({e}); JSON: {json_path}", flush=True)
    if report.get("error"):
        print(report["error"], file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
