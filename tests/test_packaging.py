"""What pyproject.toml and .ci/setup promise about onnxruntime: the CPU package (`onnxruntime`) and
the GPU one (`onnxruntime-gpu`) install the same `onnxruntime` module, so they are alternatives,
never both: neither is a base dependency, the `cpu` and `gpu` extras each bring exactly one, the
`test` extra neither (a test machine picks its runtime), and CI installs `.[test,cpu]`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def _names(requirements: list[str]) -> set[str]:
    """The distribution names of PEP 508 requirement strings, lower case."""
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_onnxruntime_is_an_extra_never_a_base_dependency(project):
    base = _names(project["dependencies"])
    assert not {n for n in base if n.startswith("onnxruntime")}, base
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert extras["cpu"] & RUNTIMES == {"onnxruntime"}
    assert extras["gpu"] & RUNTIMES == {"onnxruntime-gpu"}
    for name, names in extras.items():
        assert len(names & RUNTIMES) <= 1, f"extra {name} installs both onnxruntime packages"
    assert not extras["test"] & RUNTIMES, "the test extra must leave the choice of onnxruntime to the machine"


def test_ci_installs_the_cpu_runtime_with_the_tests():
    setup = (ROOT / ".ci" / "setup").read_text()
    installs = re.findall(r'^"\$\{pip\[@\]\}" (.+)$', setup, flags=re.M)
    assert installs[0] == "torch==2.13.0"  # torch first, held by the constraints file
    assert '-e ".[test,cpu]"' in installs
    assert not any("gpu" in line for line in installs)


def test_names_of_requirements():
    assert _names(["onnxruntime-gpu[cuda,cudnn]>=1.28", "onnxruntime; python_version >= '3.11'", "torch>=2.4"]) == {
        "onnxruntime-gpu", "onnxruntime", "torch"}
