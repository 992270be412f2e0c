"""Test setup shared by every test file: one CPU thread, torchvision where the tests find it, and
a cache folder of the run's own (latency models are not read from, or left in, the user's)."""

import os
import sys
import tempfile
import types
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ["PCOMPILER_CACHE"] = tempfile.mkdtemp(prefix="pcompiler-test-cache-")

# .ci/setup installs torchvision into .venv/test-only, on the tests' path only (and their child
# processes'): beside pcompiler it would stop transformers from importing (see .ci/setup).
TEST_ONLY = Path(sys.prefix) / "test-only"
if TEST_ONLY.is_dir() and str(TEST_ONLY) not in sys.path:
    sys.path.append(str(TEST_ONLY))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(TEST_ONLY)) if p)

# `import torchvision` fails on CPU-only torch builds while registering fake kernels for
# torchvision::nms (pytorch/vision#9085); the tests do not need those, so skip that module.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


# ---------------------------------------------------------------------------------------------
# Module moves as a GPU makes them


import pytest  # noqa: E402
from torch import nn  # noqa: E402


@pytest.fixture
def moves_allocate():
    """Every `Module.to/cpu/cuda` gives each parameter and buffer new storage, as a move to a
    CUDA device and back does (on CPU a move to "cpu" keeps the storage, which hides passes that
    move a model they were given). Returns the count of moves seen."""
    moves = {"count": 0}
    originals = {name: getattr(nn.Module, name) for name in ("to", "cpu", "cuda")}

    def fresh(name):
        def move(self, *args, **kwargs):
            moves["count"] += 1
            self._apply(lambda t: t.clone())  # Parameters keep their identity, their data is new
            return self if name == "cuda" else originals[name](self, *args, **kwargs)
        return move

    mp = pytest.MonkeyPatch()
    for name in originals:
        mp.setattr(nn.Module, name, fresh(name))
    try:
        yield moves
    finally:
        mp.undo()
