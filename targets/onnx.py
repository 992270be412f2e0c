"""ONNX target: `torch.onnx.export`, then onnxruntime runs the file and is compared with torch.

Exporter: the torch.export-based ("dynamo") exporter, torch's default since 2.9, is tried first;
if it raises, the legacy TorchScript exporter (`dynamo=False`) is tried, and `note` says which
one wrote the file and why. On fx-traced convnets and attention blocks both give outputs that
match torch to float32 rounding; the dynamo exporter is slower but was not fragile on any of
them, while the legacy one warns that it "will be removed" and fails on nn.TransformerEncoder's
fused fast path (taken under no_grad; the export therefore runs with grad on). Hence dynamo
first, legacy as the fallback (`exporter=` forces one). When the legacy exporter fails, torch
itself writes the TorchScript graph to stderr (its ONNX log cannot be switched off in 2.13).

Files: the weights are stored inside the .onnx file (`external_data=False`) unless they exceed
ONNX's 2 GB protobuf limit, when they go to `<path>.data` beside it. Both are written in a
temporary folder and moved in complete, so a failed or killed export leaves no half file. Inputs are named after the
GraphModule's placeholders; outputs that are tuples/lists/dicts are flattened in order. The
export runs in eval mode. Assumes real weights (not the meta device) and tensor inputs that
numpy can hold (no bfloat16).

onnxruntime is an optional dependency with two alternative packages that install the same
`onnxruntime` module: `onnxruntime` (CPU; `pip install 'pcompiler[cpu]'`) and `onnxruntime-gpu`
(the CUDA provider too; `pip install 'pcompiler[gpu]'`). Without either, running a file is a
CompileError that says how to install one. A session asked for a provider that onnxruntime
does not give it (onnxruntime falls back to the CPU with only a warning when the provider is
missing or fails to load) is refused with `ProviderFallback`, which names the provider used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pcompiler.costs import eval_mode
from pcompiler.dtypes import cast_copy, dtype_name, dtype_of
from pcompiler.errors import CompileError, first_line, one_line
from pcompiler.inputs import dynamic_dims, widened
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
                       dynamo: bool, names: Sequence[str] | None, dynamic: Sequence[int] = ()) -> None:
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    kwargs = {"dynamo": dynamo, "opset_version": opset, "input_names": list(names) if names else None, "verbose": False}
    if dynamic:  # traced on a batch of 2 (export specializes size-1 dimensions)
        inputs = widened(inputs)
    if dynamo:
        kwargs["external_data"] = size > _EXTERNAL_DATA_BYTES
        if dynamic:
            kwargs["dynamic_shapes"] = tuple(dict.fromkeys(dynamic, torch.export.Dim.AUTO) for _ in inputs)
    elif dynamic and names:
        kwargs["dynamic_axes"] = {n: {d: ("batch", "sequence")[d] for d in dynamic} for n in names}
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
               names: Sequence[str] | None = None, opset: int | None = None, exporter: str = "auto",
               dynamic: Sequence[int] = ()) -> str:
    """Write `module` (any nn.Module, in eval mode) traced on `inputs` to `path`; return a note
    saying which exporter wrote it. exporter: "auto" (dynamo, then legacy if dynamo fails),
    "dynamo" or "legacy". dynamic: the input dimensions left dynamic (0: batch, 1: sequence;
    `inputs.dynamic_dims`). Raises when the export fails, leaving what `path` held before.

    The exporter writes into a temporary folder beside `path` (`outdir.atomic_files`), which is
    moved in whole: the .onnx file and its external data file, if any, arrive complete."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    with atomic_files(path) as tmp:
        if not dynamic:
            return _export_with_fallback(module, inputs, tmp, names, opset, exporter, ())
        try:
            note = _export_with_fallback(module, inputs, tmp, names, opset, exporter, dynamic)
            return note + "; dynamic " + " and ".join(("batch", "sequence length")[d] for d in dynamic)
        except Exception as e:  # noqa: BLE001 - the static export below may still work
            log.info("dynamic ONNX export failed (%s); exporting with the example's shapes", one_line(e))
            _clear(tmp)
            why = one_line(e, 120)
        return _export_with_fallback(module, inputs, tmp, names, opset, exporter, ()) + f"; static shapes ({why})"


def _clear(path: Path) -> None:
    """Remove what a failed exporter left in the temporary folder of `path` (`atomic_files`)."""
    for partial in path.parent.iterdir():
        if partial.is_file():
            partial.unlink()


def _export_with_fallback(module: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path,
                          names: Sequence[str] | None, opset: int | None, exporter: str, dynamic: Sequence[int]) -> str:
    if exporter == "legacy":
        _torch_onnx_export(module, inputs, path, opset, False, names, dynamic)
        return "exporter: legacy (TorchScript)"
    try:
        _torch_onnx_export(module, inputs, path, opset, True, names, dynamic)
        return "exporter: dynamo (torch.export)"
    except Exception as e:
        if exporter == "dynamo":
            raise
        log.info("dynamo ONNX exporter failed (%s); trying the legacy exporter", one_line(e))
        _clear(path)
        try:
            _torch_onnx_export(module, inputs, path, opset, False, names, dynamic)
        except Exception as legacy_error:
            raise RuntimeError(
                f"both ONNX exporters failed: dynamo: {one_line(e, 140)}; legacy: {one_line(legacy_error, 140)}"
            ) from legacy_error
        return f"exporter: legacy (TorchScript), because dynamo failed: {one_line(e, 160)}"


INSTALL_HINT = "pip install 'pcompiler[cpu]', or 'pcompiler[gpu]' for the CUDA provider"
CPU_PROVIDER = "CPUExecutionProvider"


def import_onnxruntime():
    """The onnxruntime module; a CompileError saying how to install it when it is missing."""
    try:
        import onnxruntime
    except ImportError as e:
        raise CompileError(f"onnxruntime, which runs ONNX files, is not installed ({first_line(str(e))})",
                           hint=INSTALL_HINT) from e
    return onnxruntime


class ProviderFallback(CompileError):
    """onnxruntime made a session on another provider than the one asked for. `asked` and `used`
    name the providers; the message says why (the reason) and the hint how to fix it."""

    def __init__(self, asked: str, used: str, reason: str, hint: str):
        self.asked, self.used = asked, used
        super().__init__(f"asked for {asked}, onnxruntime ran {used} ({reason})", hint=hint)


def session(model: str | Path | bytes, threads: int | None = None, provider: str = CPU_PROVIDER,
            spinning: bool = True, device_id: int = 0):
    """An onnxruntime InferenceSession of `model` (a file, or the model's bytes) on `provider`
    (`threads`: intra-op threads, default torch's current setting, so tests that set one thread
    get one; `device_id`: the GPU of a CUDA provider). spinning=False: idle pool threads sleep
    instead of spinning after a call (the bench times two sessions in turn, and a spinning one
    takes the cores from the other's call). Raises ProviderFallback when onnxruntime put the
    session on another provider than `provider`."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [provider if provider == CPU_PROVIDER else (provider, {"device_id": device_id})]
    with warnings.catch_warnings():  # the fallback is refused below, with the reason
        warnings.filterwarnings("ignore", message="Specified provider .* is not in available provider names")
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    used = sess.get_providers()[0]
    if used != provider:
        raise ProviderFallback(provider, used, *_why_not(ort, provider))
    return sess


def _why_not(ort, provider: str) -> tuple[str, str]:
    """(reason, hint) for a session that did not get `provider`."""
    name = provider.removesuffix("ExecutionProvider")
    if provider in ort.get_available_providers():
        return (f"the {name} provider did not load",
                f"onnxruntime's log names the library it could not load; onnxruntime-gpu {ort.__version__} "
                "needs the CUDA and cuDNN versions it was built for ('pcompiler[gpu]' installs them)")
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        return ("onnxruntime and onnxruntime-gpu are both installed and share one module; the CPU one's files won",
                "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'pcompiler[gpu]'")
    return (f"this onnxruntime {ort.__version__} has no {name} provider",
            "pip uninstall -y onnxruntime, then pip install 'pcompiler[gpu]'")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def provider_problem(provider: str, device_id: int = 0) -> str | None:
    """None when a session on `provider` (device `device_id`) really runs there, tried on a
    one-node model; else one line saying why not."""
    try:
        ort = import_onnxruntime()
        if provider not in ort.get_available_providers():
            raise ProviderFallback(provider, CPU_PROVIDER, *_why_not(ort, provider))
        session(_identity_model(), 1, provider, device_id=device_id)
    except Exception as e:  # noqa: BLE001 - any failure means the provider cannot be used
        return one_line(e)
    return None


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y"))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


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


ONNX_DTYPES = ("auto", "float32", "float16", "bfloat16")
CUDA_PROVIDER = "CUDAExecutionProvider"


def onnx_dtype(model_dtype: torch.dtype, asked: str = "auto") -> tuple[torch.dtype, str]:
    """The dtype model.onnx is written in, and the provider its check runs on. auto: the
    model's own, except that a half-precision model is written in float32 for the CPU provider,
    which has no bfloat16 kernels and few float16 ones, and in float16 where onnxruntime's CUDA
    provider runs (a float16 model: as it is; a bfloat16 one: cast, as that provider has few
    bfloat16 kernels). A dtype named is written as named, checked on the CUDA provider where it
    is half precision and that provider runs, else on the CPU."""
    if asked not in ONNX_DTYPES:
        raise ValueError(f"the ONNX dtype must be one of {ONNX_DTYPES}, not {asked!r}")
    half = (torch.float16, torch.bfloat16)
    cuda = provider_problem(CUDA_PROVIDER) is None if (model_dtype in half or asked in ("float16", "bfloat16")) else False
    if asked == "auto":
        dtype = model_dtype if model_dtype not in half else torch.float16 if cuda else torch.float32
    else:
        dtype = getattr(torch, asked)
    return dtype, CUDA_PROVIDER if cuda and dtype in half else CPU_PROVIDER


def export_onnx(
    prog: Program, path: str | Path, opset: int | None = None, exporter: str = "auto", dtype: str = "auto",
) -> ExportResult:
    """Export the Program's model to ONNX at `path`, run it with onnxruntime on the example
    inputs and compare with torch (max abs error; ok within `export_tolerance` of the dtype).

    opset: ONNX opset version (None: the exporter's default). exporter: "auto" (dynamo, then
    legacy if dynamo fails), "dynamo" or "legacy". dtype: "auto" or a dtype name
    (`onnx_dtype`); written in another dtype than the model's, the file is a cast copy and is
    compared with that copy in torch. For token ids the batch and sequence dimensions are dynamic
    where the exporter can make them; other inputs keep the traced shapes. Never raises for a
    failed export."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    path = Path(path)
    own = dtype_of(prog.gm)
    written, provider = onnx_dtype(own, dtype)

    def body() -> tuple[float | None, str | None]:
        require_weights(prog, f"ONNX to {path}")
        import_onnxruntime()  # before writing: a file that cannot be checked is not written
        cast = prog if written == own else prog.replace(gm=cast_copy(prog.gm, written),
                                                        example_inputs=_cast_inputs(prog.example_inputs, written))
        dims = dynamic_dims(list(cast.example_inputs))  # token ids: any batch and length; other inputs as traced
        note = write_onnx(cast.gm, cast.example_inputs, path, names=input_names(cast), opset=opset, exporter=exporter,
                          dynamic=dims if 1 in dims else ())
        want = reference_outputs(cast)
        got = run_onnx(session(path, provider=provider), input_names(cast), cast.example_inputs)
        err = compare_outputs([torch.from_numpy(np.asarray(g)) for g in got], want, f"onnxruntime on {path.name}")
        if written != own:
            note += f"; {dtype_name(written)}, cast from the model's {dtype_name(own)}, for onnxruntime's {provider}"
        return err, note

    return guarded("onnx", path, body, dtype=dtype_name(written))


def _cast_inputs(inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


# The name the design's API sketch uses: `pcompiler.targets.onnx.export(prog, "model.onnx")`.
export = export_onnx
