"""ONNX target: `torch.onnx.export`, then onnxruntime runs the file and is compared with torch.

Exporter: the torch.export-based ("dynamo") exporter, torch's default since 2.9, is tried first;
if it raises, the legacy TorchScript exporter (`dynamo=False`) is tried, and `note` says which
one wrote the file and why. Measured on torch 2.13 CPU (1 thread, no network) on fx-traced
models: both give outputs within 3e-7 of torch on a ResNet-18-shaped convnet (11.7M params), a
hand-written attention block and nn.TransformerEncoder. The dynamo exporter is slower (ResNet-18:
4.0-4.5 s in a fresh process, 1.6-2.0 s after; small transformers 0.7-1.4 s) than the legacy
one (0.6-0.9 s; 0.02-0.13 s) but was not fragile on any of them, while the legacy one warns that
it "will be removed" and fails on nn.TransformerEncoder's fused fast path (taken under no_grad;
the export therefore runs with grad on). Hence dynamo first,
legacy as the fallback (`exporter=` forces one). When the legacy exporter fails, torch itself
writes the TorchScript graph to stderr (its ONNX log cannot be switched off in 2.13).

Files: the weights are stored inside the .onnx file (`external_data=False`) unless they exceed
ONNX's 2 GB protobuf limit, when they go to `<path>.data` beside it. Both are written in a
temporary folder and moved in complete, so a failed or killed export leaves no half file. Inputs are named after the
GraphModule's placeholders; outputs that are tuples/lists/dicts are flattened in order. The
export runs in eval mode. Assumes real weights (not the meta device) and tensor inputs that
numpy can hold (no bfloat16).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pcompiler.costs import eval_mode
from pcompiler.errors import one_line
from pcompiler.ir import Program
from pcompiler.outdir import atomic_files
from pcompiler.targets import ExportResult, compare_outputs, guarded, reference_outputs, require_weights

log = logging.getLogger("pcompiler")

EXPORTERS = ("auto", "dynamo", "legacy")
_EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GiB message limit, with room for the graph


def input_names(prog: Program) -> list[str]:
    """Names of the graph inputs that receive the example inputs (the first placeholders)."""
    names = [n.name for n in prog.gm.graph.nodes if n.op == "placeholder"]
    return names[: len(prog.example_inputs)]


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for the block (onnxscript logs each optimizer step at
    INFO, which floods a CLI run at -v)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torch_onnx_export(module: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path, opset: int | None,
                       dynamo: bool, names: Sequence[str] | None) -> None:
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    kwargs = {"dynamo": dynamo, "opset_version": opset, "input_names": list(names) if names else None, "verbose": False}
    if dynamo:
        kwargs["external_data"] = size > _EXTERNAL_DATA_BYTES
    # Not under no_grad: with grad off, nn.TransformerEncoder(Layer) in eval mode takes its fused
    # fast path (aten::_transformer_encoder_layer_fwd), which the legacy exporter cannot convert.
    # The exporters chatter (progress lines on stdout, deprecation warnings); keep it in the log.
    chatter = io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(chatter),
        _quiet_loggers("onnxscript", "onnx_ir"),
        eval_mode(module),
    ):
        warnings.simplefilter("always")
        torch.onnx.export(module, tuple(inputs), str(path), **kwargs)
    for w in caught:
        log.debug("torch.onnx.export warning: %s", w.message)
    if chatter.getvalue().strip():
        log.debug("torch.onnx.export output:\n%s", chatter.getvalue().rstrip())


def write_onnx(module: torch.nn.Module, inputs: Sequence[torch.Tensor], path: str | Path, *,
               names: Sequence[str] | None = None, opset: int | None = None, exporter: str = "auto") -> str:
    """Write `module` (any nn.Module, in eval mode) traced on `inputs` to `path`; return a note
    saying which exporter wrote it. exporter: "auto" (dynamo, then legacy if dynamo fails),
    "dynamo" or "legacy". Raises when the export fails, leaving what `path` held before.

    The exporter writes into a temporary folder beside `path` (`outdir.atomic_files`), which is
    moved in whole: the .onnx file and its external data file, if any, arrive complete."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    with atomic_files(path) as tmp:
        return _export_with_fallback(module, inputs, tmp, names, opset, exporter)


def _export_with_fallback(module: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path,
                          names: Sequence[str] | None, opset: int | None, exporter: str) -> str:
    if exporter == "legacy":
        _torch_onnx_export(module, inputs, path, opset, False, names)
        return "exporter: legacy (TorchScript)"
    try:
        _torch_onnx_export(module, inputs, path, opset, True, names)
        return "exporter: dynamo (torch.export)"
    except Exception as e:
        if exporter == "dynamo":
            raise
        log.info("dynamo ONNX exporter failed (%s); trying the legacy exporter", one_line(e))
        for partial in path.parent.iterdir():  # what the failed exporter left in the temporary folder
            if partial.is_file():
                partial.unlink()
        try:
            _torch_onnx_export(module, inputs, path, opset, False, names)
        except Exception as legacy_error:
            raise RuntimeError(
                f"both ONNX exporters failed: dynamo: {one_line(e, 140)}; legacy: {one_line(legacy_error, 140)}"
            ) from legacy_error
        return f"exporter: legacy (TorchScript), because dynamo failed: {one_line(e, 160)}"


def session(path: str | Path, threads: int | None = None, provider: str = "CPUExecutionProvider",
            spinning: bool = True):
    """An onnxruntime InferenceSession on `provider` (`threads`: intra-op threads, default
    torch's current setting, so tests that set one thread get one). spinning=False: idle pool
    threads sleep instead of spinning after a call (the bench times two sessions in turn, and a
    spinning one takes the cores from the other's call)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=[provider])


def run_onnx(sess, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run `sess` with `inputs` bound by name; inputs the graph dropped (unused) are skipped."""
    wanted = {i.name for i in sess.get_inputs()}
    missing = wanted - set(names)
    if missing:
        raise ValueError(
            f"the ONNX graph expects inputs {sorted(missing)} that the example inputs do not "
            f"provide (given: {list(names)})"
        )
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs) if n in wanted}
    return sess.run(None, feed)


def export_onnx(
    prog: Program, path: str | Path, opset: int | None = None, exporter: str = "auto"
) -> ExportResult:
    """Export the Program's model to ONNX at `path`, run it with onnxruntime on the example
    inputs and compare with torch (max abs error; ok within 1e-4 + 1e-3 * max|output|).

    opset: ONNX opset version (None: the exporter's default). exporter: "auto" (dynamo, then
    legacy if dynamo fails), "dynamo" or "legacy". Never raises for a failed export."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    path = Path(path)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"ONNX to {path}")
        note = write_onnx(prog.gm, prog.example_inputs, path, names=input_names(prog), opset=opset, exporter=exporter)
        want = reference_outputs(prog)
        got = run_onnx(session(path), input_names(prog), prog.example_inputs)
        return compare_outputs([torch.from_numpy(np.asarray(g)) for g in got], want, f"onnxruntime on {path.name}"), note

    return guarded("onnx", path, body)


# The name the design's API sketch uses: `pcompiler.targets.onnx.export(prog, "model.onnx")`.
export = export_onnx
