"""What the benchmark scripts share: the torchvision import workaround, the environment record,
medians, markdown tables and JSON output, and the accuracy benchmarks' fine-tune-and-score step
and Torch-Pruning training hooks.

Import this module before torchvision: it puts .venv/test-only (where .ci/setup installs
torchvision, off pcompiler's own path) on the path, and on CPU-only torch builds, where `import
torchvision` fails while registering fake kernels for torchvision::nms (pytorch/vision#9085),
replaces the module that registers them by an empty one (the benchmarks do not need them).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
_TEST_ONLY = Path(sys.prefix) / "test-only"  # where .ci/setup installs torchvision (see there)
if _TEST_ONLY.is_dir() and str(_TEST_ONLY) not in sys.path:
    sys.path.append(str(_TEST_ONLY))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(_TEST_ONLY)) if p)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# `python -c PEAK_CLI ARGS...` runs `pcompile ARGS...` in a process that writes its peak resident
# memory (VmHWM, kB) to the file named by the PCOMPILER_PEAK environment variable as it exits
# (Linux carries ru_maxrss across fork and exec; VmHWM is the process's own).
PEAK_CLI = """
import atexit, os, sys, types
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["PCOMPILER_PEAK"], "w").write(line.split()[1])
atexit.register(_peak)
from pcompiler.cli import main
main()
"""
DOCS = ROOT / "docs"


def version_of(dist: str) -> str | None:
    """The installed version of a distribution (its metadata, not its `__version__`: Torch-Pruning
    1.6.1's `torch_pruning.__version__` still says "1.6.0")."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What a timing depends on: versions, threads, cores, the load when it was taken."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version_of("torchvision"),
        "torch_pruning": version_of("torch-pruning"),
        "onnxruntime": version_of("onnxruntime"),
        "pcompiler": version_of("pcompiler"),
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    `resource.getrusage(RUSAGE_SELF).ru_maxrss`, except where /proc/self/status has VmHWM (Linux):
    Linux carries ru_maxrss across fork + exec, so a child process started by `subprocess`
    reports at least its parent's peak, while VmHWM belongs to the child's own address space. In
    a process that has not been exec'd from a larger one the two agree."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20  # KiB on Linux, bytes on macOS


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def torchvision_classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The final classification Linear of a torchvision model (what Torch-Pruning must not prune:
    its output width is the number of classes)."""
    for attr in ("fc", "head", "heads", "classifier"):
        m = getattr(model, attr, None)
        if m is None:
            continue
        if isinstance(m, torch.nn.Linear):
            return m
        linears = [x for x in m.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))]
        if linears:
            return linears[-1]
    linears = [x for x in model.modules() if isinstance(x, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"no classifier found in {type(model).__name__}")
    return linears[-1]


def prune_only(method: str, ratio: float, seed: int, steps: int) -> Any:
    """The CLI's pipeline up to verify: no compensation (the methods are compared as they select),
    no rounding of widths; recalibration and fine-tuning are the benchmark's own, below."""
    from pcompiler.pipeline import Settings
    from pcompiler.train import TrainConfig

    return Settings(method=method, ratio=ratio, seed=seed, reg_steps=steps, round_to=1, compensate=False,
                    recalibrate_batches=0, finetune_epochs=0, train=TrainConfig(progress=False))


def finetune_and_score(model: torch.nn.Module, data: Any, seed: int, steps: int, lr: float = 1e-3) -> dict:
    """Accuracy right after pruning (recalibrated), then after `steps` fine-tuning steps (SGD,
    cosine from `lr`)."""
    from pcompiler.inference import evaluate, recalibrate_norms
    from pcompiler.passes.recalibrate import DEFAULT_BATCHES
    from pcompiler.train import TrainConfig, train

    raw = evaluate(model, data.val)
    recalibrate_norms(model, data.train, batches=DEFAULT_BATCHES, seed=seed)
    pruned = evaluate(model, data.val)
    train(model, data, TrainConfig(steps=steps, lr=lr, schedule="cosine", seed=seed, progress=False))
    return {"acc_uncalibrated": raw, "acc_pruned": pruned, "acc_final": evaluate(model, data.val),
            "params": sum(p.numel() for p in model.parameters()), "finetune_steps": steps}


def tp_hooks(pruner: Any, grow_every: int | None) -> Any:
    """Training hooks that run a Torch-Pruning pruner's regularizer after each backward (and its
    `update_reg` every `grow_every` steps, as GReg's K_u)."""
    from pcompiler.train import Hooks

    class TPHooks(Hooks):
        def after_backward(self, model, step):
            pruner.regularize(model)

        def after_step(self, model, step):
            if grow_every and step % grow_every == 0:
                pruner.update_reg()
            return {}

    return TPHooks()
