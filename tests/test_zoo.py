"""The model zoo: the whole pipeline on real architectures with random weights.

Every torchvision classification model (`torchvision.models.list_models(module=torchvision.models)`)
and a handful of timm models go through trace -> analyze -> l1 at ratios 0.3 and 0.6 -> slim ->
verify, and the slim model at 0.3 is exported to ONNX and run with onnxruntime. Per model and
ratio the invariant holds (verify ok, relative error below 1e-4) and FLOPs strictly fall; per
model the ONNX file gives the slim torch model's outputs (one ratio: the export is most of the
time, and what it can fail on is the ops, which both ratios share).

Inputs are as small as each architecture allows (64x64; ViTs are built for a smaller image size,
MaxViT needs 224, Inception-v3 75 or more), so the cost is mostly in the weights and the graph
size. Most of the time goes to the ONNX export (torch.export and its decompositions, in Python).
The default suite runs one cheap model per family of ops (`QUICK`); the others are marked `slow`:
CI runs them, `-m "not slow"` leaves them out locally. The whole file (86 models, 173 tests) took
30 minutes on an otherwise idle 2-core machine with one thread, 10 GiB of memory at its peak
(vit_h_14); a model takes 4 s (squeezenet) to 70 s (vit_h_14), 20 s on average.

The analyzed program is a module-scoped fixture parametrized by model name, so both ratios of a
model share one trace and analysis, and only one model is held in memory at a time.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import pcompiler
from pcompiler.costs import count_flops
from pcompiler.ir import Program
from pcompiler.passmanager import make_pass
from pcompiler.targets.onnx import export_onnx

torchvision = pytest.importorskip("torchvision")  # tests/conftest.py makes it importable on CPU torch

RATIOS = (0.3, 0.6)
DEFAULT_SIZE = 64

# Constructor arguments: no auxiliary heads, no init_weights (default None warns; the weights
# stay random); ViTs are built for a small image (fewer tokens, same layers).
KWARGS: dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 64},
    "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 56},
}
SIZE: dict[str, int] = {
    "inception_v3": 96,  # its stem needs at least 75 pixels
    "maxvit_t": 224,  # partition size 7 at every stage of 32x downsampling: 224 is the smallest
    **{name: kw["image_size"] for name, kw in KWARGS.items() if "image_size" in kw},
}

# The default suite runs one cheap model per family of ops (about a minute); everything else is
# marked slow (CI runs it; `-m "not slow"` leaves it out). Seconds per model: both ratios with
# ONNX, one thread of an idle 2-core machine (ONNX export is about 70% of it).
QUICK = {
    "squeezenet1_1",  # fire modules: concat of 1x1 and 3x3 branches (4 s)
    "resnet18",  # residual adds (6 s)
    "alexnet",  # conv channels flattened into a Linear's input blocks (6 s)
    "shufflenet_v2_x0_5",  # chunk, channel shuffle by view/transpose/view (13 s)
    "convnext_tiny",  # permute, LayerNorm over channels, layer scale (8 s)
    "efficientnet_b0",  # depthwise convs, squeeze-excite, stochastic depth (14 s)
    "mobilenet_v3_small",  # hardswish, squeeze-excite with hardsigmoid (9 s)
    "vit_b_32",  # attention heads, class token, position embedding (16 s)
    "regnet_y_400mf",  # grouped convs with squeeze-excite (13 s)
}

# Peak resident memory (GiB) of a model's tests, both ratios and ONNX included, for the ones
# above 4 GiB (measured): on a smaller machine they are skipped with the reason, not OOM-killed.
PEAK_MEMORY_GIB = {"vit_h_14": 10, "regnet_y_128gf": 8.5, "vit_l_16": 5, "vit_l_32": 5}

TORCHVISION = torchvision.models.list_models(module=torchvision.models)


def total_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # not a POSIX system: assume enough
        return math.inf


def build_torchvision(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    need, have = PEAK_MEMORY_GIB.get(name, 0), total_memory_gib()
    if need > have:
        pytest.skip(f"{name} needs about {need} GiB of memory at its peak; this machine has {have:.1f} GiB")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {}))
    size = SIZE.get(name, DEFAULT_SIZE)
    return model, torch.randn(1, 3, size, size)


def analyzed(model: torch.nn.Module, x: torch.Tensor) -> tuple[Program, int]:
    """The analyzed Program of `model` and the FLOPs of the original."""
    prog = pcompiler.run(pcompiler.trace(model, (x,)), [make_pass("analyze")])
    assert prog.analysis.prunable, f"no prunable group; notes: {prog.analysis.notes[:5]}"
    return prog, count_flops(prog.gm, prog.example_inputs)


def check_pipeline(prog: Program, flops_before: int, ratio: float, tmp_path) -> None:
    """l1 at `ratio`, slim, verify; then FLOPs and, at the first ratio, the ONNX export of the
    slim model (the export takes most of the time and depends on the ops, not the widths)."""
    slim = pcompiler.run(prog, [make_pass("l1", ratio=ratio), make_pass("slim"), make_pass("verify")])
    result = slim.info["verify"]
    assert result["ok"] is True, result
    assert result["max_relative_error"] < 1e-4, result

    flops_after = count_flops(slim.gm, slim.example_inputs)
    assert flops_after < flops_before, f"FLOPs {flops_before} -> {flops_after}"
    if ratio != RATIOS[0]:
        return
    try:
        exported = export_onnx(slim, tmp_path / "model.onnx")
    finally:  # pytest keeps tmp_path after the run: the zoo's files would take gigabytes
        for f in tmp_path.glob("model.onnx*"):
            f.unlink()
    assert exported.ok, exported.error
    assert exported.max_error is not None


def _params(names: list[str], quick: set[str]) -> list:
    return [pytest.param(n, id=n, marks=[] if n in quick else [pytest.mark.slow]) for n in names]


@pytest.fixture(scope="module", params=_params(TORCHVISION, QUICK))
def torchvision_program(request) -> tuple[Program, int]:
    return analyzed(*build_torchvision(request.param))


@pytest.mark.parametrize("ratio", RATIOS)
def test_torchvision(torchvision_program, ratio, tmp_path) -> None:
    check_pipeline(*torchvision_program, ratio, tmp_path)


def test_zoo_covers_every_torchvision_classifier() -> None:
    """The list is torchvision's own, so a new model is tested without editing this file; the
    special cases must still name real models."""
    assert len(TORCHVISION) >= 80
    assert set(KWARGS) | set(SIZE) | QUICK | set(PEAK_MEMORY_GIB) <= set(TORCHVISION)


# ---------------------------------------------------------------------------------------------
# timm: a few architectures torchvision does not have (or builds differently).

# name -> (constructor arguments, input size)
TIMM: dict[str, tuple[dict, int]] = {
    "resnet18d": ({}, 64),  # deep stem, avg-pool downsample in the shortcut
    "convnext_atto": ({}, 64),
    "vit_tiny_patch16_224": ({"img_size": 64}, 64),
    "efficientnet_b0": ({}, 64),
    "mobilevit_xxs": ({}, 64),
    "regnetx_002": ({}, 64),
    "res2net50_14w_8s": ({}, 64),  # torch.split into 8 pieces, spx[-1] through an avg-pool, cat
}


@pytest.fixture(scope="module", params=_params(list(TIMM), {"resnet18d"}))
def timm_program(request) -> tuple[Program, int]:
    timm = pytest.importorskip("timm")
    kwargs, size = TIMM[request.param]
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, **kwargs)
    return analyzed(model, torch.randn(1, 3, size, size))


@pytest.mark.parametrize("ratio", RATIOS)
def test_timm(timm_program, ratio, tmp_path) -> None:
    check_pipeline(*timm_program, ratio, tmp_path)
