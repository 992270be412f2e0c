"""Test setup shared by every test file: one CPU thread, and a torchvision import workaround."""

import sys
import types

import torch

torch.set_num_threads(1)

# `import torchvision` fails on CPU-only torch builds while registering fake kernels for
# torchvision::nms (pytorch/vision#9085); the tests do not need those, so skip that module.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
