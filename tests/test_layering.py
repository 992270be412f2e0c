"""Imports go one way (docs/design.md, "Import direction"): the core's leaf modules <- the rest of the core <-
passes and targets <- the pipeline builder and the CLI. Checked on the source, every import
statement including those inside functions; and the declared dependencies are the used ones."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"pcompiler": ROOT / "pcompiler", "pcompiler.passes": ROOT / "passes", "pcompiler.targets": ROOT / "targets"}
LEAVES = {"pcompiler.errors", "pcompiler.costs", "pcompiler.dtypes", "pcompiler.compare", "pcompiler.outdir", "pcompiler.input_checks",
          "pcompiler.tasks"}
TOP = {"pcompiler", "pcompiler.cli", "pcompiler.pipeline"}  # the package's facade, the builder, the CLI
TRAINING = {"pcompiler.train", "pcompiler.data"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if package == "pcompiler" and parts[0] in ("passes", "targets"):
                continue
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every pcompiler module `path` imports (`from pcompiler.x import y` counts as pcompiler.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m == "pcompiler" or m.startswith("pcompiler.")}


def layer(module: str) -> str:
    if module in TOP:
        return "top"
    if module.startswith("pcompiler.passes"):
        return "passes"
    if module.startswith("pcompiler.targets"):
        return "targets"
    return "leaf" if module in LEAVES else "core"


def test_imports_go_one_way():
    allowed = {
        "leaf": {"leaf"},
        "core": {"leaf", "core"},
        "passes": {"leaf", "core", "passes"},
        "targets": {"leaf", "core", "targets"},
        "top": {"leaf", "core", "passes", "targets", "top"},
    }
    # The registry finds the passes by importing their package; nothing else in the core may.
    registry = {("pcompiler.passmanager", "pcompiler.passes")}
    found = modules()
    assert {"pcompiler.errors", "pcompiler.passmanager", "pcompiler.passes.slim", "pcompiler.targets.bench"} <= set(found)
    wrong = []
    for name, path in sorted(found.items()):
        for target in sorted(imports(path)):
            if target not in found and target.rsplit(".", 1)[0] in found:
                target = target.rsplit(".", 1)[0]  # `import pcompiler.passes.rules.base as x` style
            if layer(target) not in allowed[layer(name)] and (name, target) not in registry:
                wrong.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    assert wrong == []


def test_leaves_import_only_errors_and_targets_do_not_train():
    found = modules()
    for name in LEAVES & set(found):
        assert imports(found[name]) <= {"pcompiler.errors"}, name
    for name, path in found.items():
        if layer(name) == "targets":
            assert not imports(path) & TRAINING, f"{name} imports the training loop or the data"


def test_dependencies_are_the_ones_the_code_uses():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    used = set()
    for path in (p for folder in FOLDERS.values() for p in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                used.add(node.module.split(".")[0])
    distribution = {"sklearn": "scikit-learn", "PIL": "pillow"}
    used = {distribution.get(m, m).lower() for m in used}
    needed_by_torch_onnx = {"onnx", "onnxscript"}  # torch.onnx.export imports them, we do not
    assert declared - used - needed_by_torch_onnx == set()
    assert {"torch", "numpy", "click", "rich", "scikit-learn"} <= declared
    assert "onnxruntime" in used  # optional: the cpu and gpu extras (tests/test_packaging.py)
