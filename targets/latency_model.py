"""The latency model behind `--latency`: each kernel's time as a function of the channel groups'
widths, measured on this machine with the backend's profiler: onnxruntime's own on the
onnxruntime backends (a kernel: a node of the graph it optimized), torch.profiler on torch-cpu
and the eager CUDA backends (a kernel: an operator the model calls, timed on the CPU or by the GPU
kernels it launches; `profile_torch`). torch-cuda-compile has none: its generated kernels carry no
tensor shapes to tie to the groups.

Built by `measure_model` (passes/select.py's allocation and search read it through `predict` and
`saving`):

1. Probes. Besides the original, K pruned copies. Each candidate group gets a code: K kept
   widths on its lattice (multiples of its rounding unit) from its levels (the lattice widths
   nearest 3/4, 1/2 and 1/4 of it, never one head, or full), codes with more distinct levels first (a kernel is
   measured at several widths, not twice at one), none full in every probe, and no two groups
   whose widths could show as the same tensor size sharing one. K starts at 3 and grows until
   the codes are unique.
2. Profiles. Each model is run as the backend runs it (exported to ONNX for onnxruntime) under
   its profiler at the budget's batch, on the threads asked for (targets/latency.py's
   PROFILE_THREADS says which): per kernel, its median time and tensor shapes, and the median
   time of a whole call.
3. Identification. A tensor dimension whose size changes across the runs belongs to the group
   whose kept widths it follows in every run, times 1, the group's block (heads counted as
   channels), padded up to the CPU's channel block (onnxruntime's NCHWc) or, failing these, one
   constant factor (a flatten of C x H x W). A dimension that changes and follows no group, or
   several, stops the model (`ModelUnavailable` names the kernel), as does a set of kernels that
   changes with the widths (onnxruntime fused the pruned graph differently, or torch called
   other operators) beyond ODD_SHARE of a call: the search then predicts by FLOPs and the report
   says why. Kernels in some runs only, within it, join the constant rest (efficientnet_b0: 3
   NCHWc reorders of its 236 kernels, 0.2-0.3% of a call, come and go with the widths).
4. Fit. Per kernel, its time against x, the product of its groups' kept fractions (a convolution
   from group A to group B: x = kA kB; an elementwise op or a depthwise convolution in A: x = kA),
   at the K + 1 runs' x: made non-decreasing in x (pool-adjacent-violators: a narrower kernel is
   not slower), interpolated linearly between them and proportionally below the smallest. Not a
   straight line: a matrix product whose weights stop fitting in cache is faster than linear
   (vit_b_16's MLP at batch 1: 7.3 ms at full width, 2.3 ms at half). The rest of a call (whole
   call minus the kernels modelled, in the original) is a constant.

A kernel's widths move on the lattice only (the selection rounds kept widths to `round_to`, for
`--latency` the CPU's channel block by default), so the model never has to predict between
onnxruntime's NCHWc steps. The fitted model is cached as JSON under PCOMPILER_CACHE (default
~/.cache/pcompiler) per model graph and widths, backend, batch, threads, runtime version, CPU
and GPU; `fit_error` is the model's mean relative error on its own probes' whole calls.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pcompiler.costs import eval_mode
from pcompiler.errors import CompileError
from pcompiler.ir import Lattice
from pcompiler.outdir import atomic_write
from pcompiler.targets.backends import PROVIDERS, RUNNERS, cpu_threads, cuda_device, machine
from pcompiler.targets.onnx import import_onnxruntime, write_onnx

log = logging.getLogger("pcompiler")

ODD_SHARE = 0.02  # kernels not in every run (identify) may take up to this much of a call: then part of the constant
VERSION = 3  # of the cached model's format and how it is measured (3: kernels named by the optimized graph)


class ModelUnavailable(CompileError):
    """The kernels' times cannot be tied to the groups' widths (why is the message)."""


@dataclass
class Kernel:
    name: str
    op: str
    groups: tuple[int, ...]  # the groups whose kept fraction scales it
    points: tuple[tuple[float, float], ...]  # (x, seconds), x increasing, seconds non-decreasing

    def seconds(self, x: float) -> float:
        """Time at x: interpolated between the points, proportional below the first, flat above the last."""
        x0, t0 = self.points[0]
        if x <= x0:
            return t0 * x / x0
        for (xa, ta), (xb, tb) in zip(self.points, self.points[1:]):
            if x <= xb:
                return ta + (tb - ta) * (x - xa) / (xb - xa)
        return self.points[-1][1]


@dataclass
class KernelModel:
    """Seconds per call = rest + sum over kernels of a + b * prod(kept / size of its groups)."""

    key: str
    sizes: dict[int, int]
    kernels: list[Kernel]
    rest: float
    probes: int
    fit_error: float
    seconds: float  # to build
    source: str = "onnxruntime profile"  # the profiler it was measured with
    cached: bool = False
    by_group: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.by_group = {}
        for i, k in enumerate(self.kernels):
            for g in k.groups:
                self.by_group.setdefault(g, []).append(i)

    def _kernel(self, k: Kernel, kept: Mapping[int, int]) -> float:
        x = 1.0
        for g in k.groups:
            x *= kept.get(g, self.sizes[g]) / self.sizes[g]
        return k.seconds(x)

    def predict(self, kept: Mapping[int, int]) -> float:
        """Seconds per call with `kept` channels in the groups it names (the others full)."""
        return self.rest + sum(self._kernel(k, kept) for k in self.kernels)

    def saving(self, kept: Mapping[int, int], gid: int, width: int) -> float:
        """Seconds saved by setting group `gid` to `width` kept (from `kept`)."""
        after = {**kept, gid: width}
        return sum(self._kernel(self.kernels[i], kept) - self._kernel(self.kernels[i], after)
                   for i in self.by_group.get(gid, ()))

    def neighbours(self, gid: int) -> set[int]:
        """Groups sharing a kernel with `gid` (their savings change when its width does)."""
        return {g for i in self.by_group.get(gid, ()) for g in self.kernels[i].groups}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.source, "kernels": len(self.kernels), "probes": self.probes,
                "fit_error": self.fit_error, "seconds": self.seconds, "cached": self.cached,
                "grouped_kernels": sum(1 for k in self.kernels if k.groups)}


# ---------------------------------------------------------------------------------------------
# Probes


def probe_codes(lattices: Sequence[Lattice], pad: int = 1, start: int = 3, most: int = 8) -> list[dict[int, int]]:
    """K probes (group id -> kept width) in which no two groups that could show as the same tensor
    sizes (`shown`) follow the same widths; a group with one width stays full."""
    for k in range(start, most + 1):
        probes = _assign(lattices, k, pad)
        if probes is not None:
            return probes
    raise ModelUnavailable(f"no {most} probes tell the {len(lattices)} groups apart")


def levels(lat: Lattice) -> list[int]:
    """The widths a probe gives `lat`: full, then the lattice widths nearest 3/4, 1/2 and 1/4 of it;
    never one head (a single head is a graph the exporter specializes, with other kernels than
    every other width's: the digits ViT's probes failed on it)."""
    widths = [w for w in lat.widths() if lat.block == 1 or w >= 2] or lat.widths()
    out = [lat.size]
    for f in (0.75, 0.5, 0.25):
        w = min(widths[1:], key=lambda w: abs(w - f * lat.size), default=None)
        if w is not None and w not in out:
            out.append(w)
    return out


def shown(widths: Sequence[int], block: int, pad: int) -> set[tuple[int, ...]]:
    """The sequences of tensor sizes a group kept at `widths` shows in its kernels: its channels
    (or heads), its channels counting a head as its block, and these padded up to a multiple of
    `pad` (onnxruntime's NCHWc convolutions pad channels to the CPU's block: efficientnet_b0's
    squeeze-excite widths 28 and 20 show as 32; regnet_y_400mf's 13 groups of 8 channels as 112)."""
    return {tuple(m * w for w in widths) for m in {1, block}} | {tuple(-(-block * w // pad) * pad for w in widths)}


def _assign(lattices: Sequence[Lattice], k: int, pad: int) -> list[dict[int, int]] | None:
    used: set[tuple[int, ...]] = set()  # the sequences of sizes some tensor would show
    probes: list[dict[int, int]] = [{} for _ in range(k)]
    for lat in lattices:
        ws = levels(lat)
        if len(ws) < 2:
            continue
        codes = sorted((c for c in itertools.product(range(len(ws)), repeat=k) if any(c)),
                       key=lambda c: (-len(set(c) - {0}), c.count(0), c))
        for code in codes:
            seqs = shown([ws[i] for i in (0, *code)], lat.block, pad)
            if not seqs & used:
                break
        else:
            return None
        used |= seqs
        for p, i in zip(probes, code):
            p[lat.gid] = ws[i]
    return probes


# ---------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True)
class Profile:
    call: float  # median seconds of a whole call
    kernels: dict[str, tuple[str, float, tuple[tuple[int, ...], ...]]]  # name -> (op, seconds, shapes)


def profile(model: torch.nn.Module, inputs: Sequence[torch.Tensor], threads: int, provider: str, workdir: Path,
            min_seconds: float = 0.5, reps: tuple[int, int] = (5, 50)) -> Profile:
    """Run `model` exported to ONNX under onnxruntime's profiler (see the module docstring)."""
    ort = import_onnxruntime()
    path = workdir / "model.onnx"
    names = [f"input_{i}" for i in range(len(inputs))]
    with eval_mode(model):
        write_onnx(model, inputs, path, names=names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the bench runs it
    sess = ort.InferenceSession(str(path), options, providers=[provider])
    wanted = {i.name for i in sess.get_inputs()}
    feed = {n: t.numpy() for n, t in zip(names, inputs) if n in wanted}
    for _ in range(3):
        sess.run(None, feed)
    t0 = time.perf_counter()
    sess.run(None, feed)
    n = max(reps[0], min(reps[1], math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6))))
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "profile")
    options.optimized_model_filepath = str(workdir / "optimized.onnx")  # the graph as run: stable_names reads it
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    sess = ort.InferenceSession(str(path), options, providers=[provider])
    for _ in range(2 + n):  # the first two calls (warm-up) are dropped below
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    calls = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][2:]
    per: dict[str, list[float]] = {}
    info: dict[str, tuple[str, tuple[tuple[int, ...], ...]]] = {}
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    names = stable_names(graph_nodes(workdir / "optimized.onnx"))
    for e in nodes:
        raw = e["name"].removesuffix("_kernel_time")
        name = names.get(raw, raw)
        per.setdefault(name, []).append(e["dur"])
        if name not in info:
            args = e.get("args", {})
            shapes = tuple(tuple(next(iter(d.values()))) for d in
                           (*args.get("input_type_shape", []), *args.get("output_type_shape", [])))
            info[name] = (args.get("op_name", "?"), shapes)
    kernels = {name: (info[name][0], statistics.median(ts[2:] if len(ts) > 2 else ts) * 1e-6, info[name][1])
               for name, ts in per.items()}
    return Profile(call=statistics.median(calls) * 1e-6, kernels=kernels)


# The backends whose kernels a profiler ties to tensor shapes: onnxruntime's (its own profiler) and
# eager torch's (torch.profiler). torch.compile runs generated kernels that carry no shapes.
PROFILED = (*PROVIDERS, "torch-cpu", "torch-cuda-fp32", "torch-cuda-bf16")
CALL = "pcompiler::call"  # the record_function around one call under torch.profiler


def profile_torch(model: torch.nn.Module, inputs: Sequence[torch.Tensor], threads: int, backend: str,
                  device: str, workdir: Path, min_seconds: float = 0.5, reps: tuple[int, int] = (5, 50)) -> Profile:
    """Run `model` as `backend` runs it (targets/backends.py's runner: eager, on the CPU or a copy on
    `device` in the backend's dtype) under torch.profiler. A kernel is an operator called by the
    model itself (an aten op directly under the call, its nested ops inside it), named by its kind
    and its place among the call's operators of that kind (`aten::conv2d#3`), with its input
    tensors' shapes; its time is its CPU time with what it calls (torch-cpu) or the time of the GPU
    kernels it launched (CUDA); a call's time is its wall time, synchronized."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    kind = RUNNERS[backend][0]
    on = cuda_device(device) if kind == "cuda" else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if kind == "cuda" else [])
    with eval_mode(model), cpu_threads(threads):
        call = RUNNERS[backend][2](model, tuple(inputs), threads, workdir, on)
        for _ in range(3):
            call()
        t0 = time.perf_counter()
        call()
        n = max(reps[0], min(reps[1], math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6))))
        with torch_profile(activities=activities, record_shapes=True) as prof:
            for _ in range(2 + n):  # the first two calls (warm-up) are dropped below
                with record_function(CALL):
                    call()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == cpu]
    calls = sorted((e for e in events if e.name == CALL), key=lambda e: e.time_range.start)[2:]
    index = {c.id: i for i, c in enumerate(calls)}
    ops: list[list[Any]] = [[] for _ in calls]
    for e in events:
        if e.cpu_parent is not None and e.cpu_parent.id in index:
            ops[index[e.cpu_parent.id]].append(e)
    per: dict[str, list[float]] = {}
    info: dict[str, tuple[str, tuple[tuple[int, ...], ...]]] = {}
    for call_ops in ops:
        seen: dict[str, int] = {}
        for e in sorted(call_ops, key=lambda e: e.time_range.start):
            name = f"{e.name}#{seen.get(e.name, 0)}"
            seen[e.name] = seen.get(e.name, 0) + 1
            per.setdefault(name, []).append(e.device_time_total if kind == "cuda" else e.cpu_time_total)
            info.setdefault(name, (e.name, tuple(_tensor_shapes(e.input_shapes))))
    kernels = {name: (info[name][0], statistics.median(ts) * 1e-6, info[name][1]) for name, ts in per.items()}
    return Profile(call=statistics.median(c.cpu_time_total for c in calls) * 1e-6, kernels=kernels)


def _tensor_shapes(shapes: Any) -> list[tuple[int, ...]]:
    """The shapes torch.profiler records for an op's arguments, flattened (a tensor list's
    tensors in order), without the scalars' and non-tensors' empty ones."""
    out: list[tuple[int, ...]] = []
    for s in shapes or ():
        if isinstance(s, (list, tuple)) and s and all(isinstance(d, int) for d in s):
            out.append(tuple(s))
        elif isinstance(s, (list, tuple)):
            out.extend(_tensor_shapes(s))
    return out


GENERATED = re.compile(r"_token_\d+$")  # a node or tensor onnxruntime's optimizer inserted, named by a global counter


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def stable_names(nodes: Sequence[Node]) -> dict[str, str]:
    """Node name -> a name that is the same in every probe. onnxruntime names the nodes (and
    tensors) its optimizer inserts by a global counter (`ReorderOutput_token_310`) or by their
    kind alone (`ReorderOutput`), and inserts them in an order that depends on the widths
    (efficientnet_b0's probes put a different reorder at the same place among its kind). Such a
    node is named by its kind and the tensor of the exported graph it writes or, failing that,
    reads (`ReorderOutput>/blocks.0/bn1/act/Mul_output_0`), or else by the node that writes its
    first input; a name two nodes share gets `#k` in graph order."""
    writer = {t: n for n in nodes for t in n.outputs}
    out: dict[str, str] = {}

    def anchor(n: Node, depth: int = 0) -> str:
        if n.name and n.name != n.op and not GENERATED.search(n.name):
            return n.name
        if (t := next((t for t in n.outputs if t and not GENERATED.search(t)), None)) is not None:
            return f"{n.op}>{t}"
        if (t := next((t for t in n.inputs if t and not GENERATED.search(t)), None)) is not None:
            return f"{n.op}<{t}"
        up = next((writer[t] for t in n.inputs if t in writer), None)
        return f"{n.op}<{anchor(up, depth + 1)}" if up is not None and depth < 8 else n.op

    seen: dict[str, int] = {}
    for n in nodes:
        a = anchor(n)
        out[n.name] = a if a not in seen else f"{a}#{seen[a]}"
        seen[a] = seen.get(a, 0) + 1
    return out


def graph_nodes(path: Path) -> list[Node]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [Node(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node]


# ---------------------------------------------------------------------------------------------
# Identification and fit


def identify(runs: Sequence[Profile], widths: Sequence[Mapping[int, int]], lattices: Sequence[Lattice],
             pad: int = 1) -> dict[str, tuple[int, ...]]:
    """Per kernel in every run, the groups whose widths its tensors follow (see the module docstring)."""
    names = [n for n in runs[0].kernels if all(n in run.kernels for run in runs[1:])]
    for i, run in enumerate(runs):
        odd = sorted(set(run.kernels) - set(names))
        if sum(run.kernels[n][1] for n in odd) > ODD_SHARE * run.call:
            raise ModelUnavailable(f"onnxruntime's kernels change with the widths ({'probe ' + str(i) if i else 'the original'}: "
                                   f"{', '.join(odd[:3])} ... take more than {ODD_SHARE:.0%} of a call)")
    seq = {lat.gid: tuple(w.get(lat.gid, lat.size) for w in widths) for lat in lattices}
    block = {lat.gid: lat.block for lat in lattices}
    out = {}
    for name in names:
        shapes = [run.kernels[name][2] for run in runs]
        if len({len(s) for s in shapes}) != 1 or any(len(a) != len(b) for s in shapes[1:] for a, b in zip(s, shapes[0])):
            raise ModelUnavailable(f"kernel {name}: its tensors change rank with the widths")
        groups: list[int] = []
        for t, dims in enumerate(shapes[0]):
            for d in range(len(dims)):
                sizes = tuple(s[t][d] for s in shapes)
                if len(set(sizes)) == 1:
                    continue
                g = _follows(sizes, seq, block, pad)
                if g is None:
                    raise ModelUnavailable(f"kernel {name} ({runs[0].kernels[name][0]}): a dimension of sizes "
                                           f"{sizes} follows no channel group, or several")
                if g not in groups:
                    groups.append(g)
        out[name] = tuple(groups)
    return out


def _follows(sizes: tuple[int, ...], seq: Mapping[int, tuple[int, ...]], block: Mapping[int, int],
             pad: int) -> int | None:
    exact = [g for g, ws in seq.items() if sizes in shown(ws, block[g], pad)]
    if exact:
        return exact[0] if len(exact) == 1 else None
    scaled = [g for g, ws in seq.items() if sizes[0] % ws[0] == 0 and sizes == tuple(sizes[0] // ws[0] * w for w in ws)]
    return scaled[0] if len(scaled) == 1 else None


def monotone(xs: Sequence[float], ts: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """The points (x, t) sorted by x, with t made non-decreasing in x by pool-adjacent-violators
    (the least-squares fit): a pooled block is flat from its narrowest x to its widest."""
    merged: dict[float, list[float]] = {}
    for x, t in zip(xs, ts):
        merged.setdefault(round(x, 9), []).append(t)
    blocks: list[tuple[float, float, float, int]] = []  # (first x, last x, t sum, count)
    for x in sorted(merged):
        blocks.append((x, x, sum(merged[x]), len(merged[x])))
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][3] > blocks[-1][2] / blocks[-1][3]:
            last, prev = blocks.pop(), blocks.pop()
            blocks.append((prev[0], last[1], prev[2] + last[2], prev[3] + last[3]))
    return tuple(p for lo, hi, total, n in blocks for p in ((lo, total / n),) + (((hi, total / n),) if hi > lo else ()))


# ---------------------------------------------------------------------------------------------
# Build, with the cache


def cache_dir() -> Path:
    return Path(os.environ.get("PCOMPILER_CACHE") or Path.home() / ".cache" / "pcompiler") / "latency"


def model_key(gm: torch.nn.Module, inputs: Sequence[torch.Tensor], lattices: Sequence[Lattice],
              backend: str, batch: int, threads: int, device: str = "cuda") -> str:
    """What the model depends on: the graph's code and parameter shapes, the inputs' shapes, the
    lattices, the backend and its settings, the runtime's version (onnxruntime's or torch's), the
    CPU and, on a CUDA backend, the GPU."""
    where = machine(device)
    gpu = where["gpu"] if RUNNERS[backend][0] == "cuda" else None
    runtime = import_onnxruntime().__version__ if backend in PROVIDERS else torch.__version__
    h = hashlib.sha256()
    code = getattr(gm, "code", type(gm).__qualname__)
    shapes = [(n, tuple(p.shape)) for n, p in itertools.chain(gm.named_parameters(), gm.named_buffers())]
    parts = (code, shapes, [tuple(t.shape) for t in inputs], [asdict(lat) for lat in lattices], backend, batch,
             threads, runtime, where["cpu"], gpu, VERSION)
    h.update(repr(parts).encode())
    return h.hexdigest()[:24]


def measure_model(gm: torch.nn.Module, inputs: Sequence[torch.Tensor], lattices: Sequence[Lattice],
                  slim: Callable[[Mapping[int, int]], torch.nn.Module], backend: str, batch: int,
                  threads: int, device: str = "cuda") -> KernelModel:
    """The kernel model of `gm` on `backend` (one of PROFILED; a CUDA one on `device`) at `batch` and
    `threads`, from the cache or measured. `slim(widths)`: a copy of the model with those groups cut
    to those widths."""
    if backend not in PROFILED:
        raise ModelUnavailable(f"the latency model reads a profiler that ties kernels to tensor shapes; {backend} "
                               f"has none (torch.compile's generated kernels carry no shapes)")
    key = model_key(gm, inputs, lattices, backend, batch, threads, device)
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            model = KernelModel(key=key, sizes={int(g): s for g, s in data["sizes"].items()},
                                kernels=[Kernel(**{**k, "groups": tuple(k["groups"]),
                                                   "points": tuple(map(tuple, k["points"]))}) for k in data["kernels"]], rest=data["rest"],
                                probes=data["probes"], fit_error=data["fit_error"], seconds=data["seconds"],
                                source=data.get("source", "onnxruntime profile"), cached=True)
            log.info("latency model: from the cache (%s)", path)
            return model
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("latency model cache %s unreadable (%s): measuring again", path, e)
    start = time.perf_counter()
    from pcompiler.targets.bench import backend_round_to, make_inputs

    xs = make_inputs(inputs, batch)
    onnx = backend in PROVIDERS
    # onnxruntime pads a convolution's channels to the NCHWc block; torch.profiler shows the shapes as given
    pad = backend_round_to(backend) if onnx else 1
    probes = probe_codes(lattices, pad)
    runs = []
    with tempfile.TemporaryDirectory(prefix="pcompiler-latency-model-") as tmp:
        for i, widths in enumerate([{}, *probes]):
            work = Path(tmp) / str(i)
            work.mkdir()
            model = gm if not widths else slim(widths)
            runs.append(profile(model, xs, threads, PROVIDERS[backend], work) if onnx
                        else profile_torch(model, xs, threads, backend, device, work))
            log.info("latency model: profiled %s (%.3g ms a call)", "the original" if not widths else f"probe {i}",
                     runs[-1].call * 1e3)
    widths = [{}, *probes]
    groups = identify(runs, widths, lattices, pad)
    sizes = {lat.gid: lat.size for lat in lattices}
    kernels = []
    for name, gs in groups.items():
        ts = [run.kernels[name][1] for run in runs]
        xs_ = [math.prod(w.get(g, sizes[g]) / sizes[g] for g in gs) for w in widths]
        points = monotone(xs_, ts) if gs else ((1.0, statistics.median(ts)),)
        kernels.append(Kernel(name=name, op=runs[0].kernels[name][0], groups=gs, points=points))
    rest = max(0.0, runs[0].call - sum(runs[0].kernels[name][1] for name in groups))
    model = KernelModel(key=key, sizes=sizes, kernels=kernels, rest=rest, probes=len(probes), fit_error=0.0,
                        seconds=0.0, source="onnxruntime profile" if onnx else "torch profile")
    model.fit_error = statistics.fmean(abs(model.predict(w) / run.call - 1) for w, run in zip(widths, runs))
    model.seconds = time.perf_counter() - start
    log.info("latency model: %d kernels (%d scale with a group), %d probes, %.1f%% error on its probes, %.0f s",
             len(kernels), sum(1 for k in kernels if k.groups), len(probes), 100 * model.fit_error, model.seconds)
    try:
        data = {"sizes": sizes, "kernels": [asdict(k) for k in kernels], "rest": rest, "probes": len(probes),
                "fit_error": model.fit_error, "seconds": model.seconds, "source": model.source}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(data))
    except OSError as e:
        log.warning("latency model not cached (%s): %s", path, e)
    return model
