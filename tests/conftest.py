"""Test setup shared by every test file: one CPU thread, and a torchvision import workaround."""

import sys
import types

import torch

torch.set_num_threads(1)

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
