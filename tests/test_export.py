"""The torch.export frontend (passes/exported.py) and the models only it can read.

What the exported graph holds (flat named inputs, torch.nn layers as module leaves with the
user's parameter names, ATen ops elsewhere), when `trace(frontend="auto")` picks it, and the
whole pipeline on the models symbolic tracing refuses: five Hugging Face transformers built
from tiny configs, Ultralytics YOLOv8n and YOLO11n from their packaged yaml, timm's vgg11_bn.
Each is pruned with l1 at 0.5, slimmed and verified; the slim program is exported to .pt2 and
ONNX, and checked against the user's model with the removed channels zeroed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same, check_modules, group_with, zero_removed
from torch import nn

import pcompiler
from pcompiler.compare import flatten_tensors
from pcompiler.errors import CompileError
from pcompiler.inputs import dynamic_dims
from pcompiler.ir import call_with
from pcompiler.passes.analyze import OUTPUT_REASON
from pcompiler.passmanager import make_pass
from pcompiler.targets.onnx import export_onnx
from pcompiler.targets.pytorch import export_program

aten = torch.ops.aten


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, scale=None):
        y = torch.relu(self.bn(self.conv(x)))
        if y.shape[-1] > 4:  # a branch on a shape: symbolic tracing cannot take it
            y = y[..., :4]
        y = self.drop(y.mean((2, 3)))
        out = self.fc(y)
        return {"logits": out * scale if scale is not None else out, "features": y}


def test_exported_graph_has_flat_named_inputs_and_module_leaves():
    x, scale = torch.randn(2, 3, 6, 6), torch.tensor(2.0)
    prog = pcompiler.trace(Block(), (x,), kwargs={"scale": scale}, frontend="export", check=True)
    graph = prog.gm.graph
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x", "scale"]
    assert prog.keywords == ("scale",) and prog.frontend == "export"
    leaves = {n.target: type(prog.gm.get_submodule(n.target)) for n in graph.nodes if n.op == "call_module"}
    assert leaves == {"conv": nn.Conv2d, "bn": nn.BatchNorm2d, "drop": nn.Dropout, "fc": nn.Linear}
    functions = {n.target for n in graph.nodes if n.op == "call_function"}
    assert {aten.relu.default, aten.slice.Tensor, aten.mean.dim, aten.mul.Tensor} <= functions
    assert not any(n.op == "get_attr" for n in graph.nodes)  # every parameter lives in its module
    # Flat outputs: the dict's tensors in order.
    logits, features = prog.gm(x, scale)
    assert_same(logits, Block.forward(prog.source, x, scale)["logits"])
    assert features.shape == (2, 8)
    # In eval mode throughout, like the model: restoring the mode (gm.train(gm.training)) leaves
    # the BatchNorm in eval mode.
    assert not any(m.training for m in prog.gm.modules())
    prog.gm.train(prog.gm.training)
    assert not prog.gm.bn.training
    # The modules train as modules: the BatchNorm uses batch statistics in train mode.
    prog.gm.train()
    before = prog.gm.bn.running_mean.clone()
    prog.gm(x, scale)
    assert not torch.equal(before, prog.gm.bn.running_mean)


def _scaled_gelu(x: torch.Tensor) -> torch.Tensor:  # kept whole by symbolic tracing (fx.wrap below)
    return torch.nn.functional.gelu(x) * 2.0


torch.fx.wrap("_scaled_gelu")


def test_auto_frontend_uses_export_where_symbolic_tracing_keeps_a_function_no_rule_reads():
    """torchvision's Swin attention is such a function: 1.2x fewer FLOPs through fx, 1.9x through export."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(_scaled_gelu(self.a(x)))

    x = torch.randn(3, 4)
    fx_prog = pcompiler.run(pcompiler.trace(Net(), (x,), frontend="fx"), [make_pass("analyze")])
    assert not group_with(fx_prog, "a.weight", 0).prunable  # no rule for the wrapped function
    prog = pcompiler.run(pcompiler.trace(Net(), (x,)), [make_pass("analyze")])
    assert prog.frontend == "export" and group_with(prog, "a.weight", 0).prunable


def test_auto_frontend_uses_export_where_symbolic_tracing_leaves_modules_opaque():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3)
            self.body = Block()
            self.body.conv = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return self.body(self.stem(x))["logits"]

    x = torch.randn(1, 3, 8, 8)
    fx_prog = pcompiler.trace(Net(), (x,), frontend="fx")
    assert set(fx_prog.opaque) == {"body"}
    prog = pcompiler.trace(Net(), (x,))
    assert prog.frontend == "export" and not prog.opaque
    prog = pcompiler.run(prog, [make_pass("analyze")])
    assert [g.label() for g in prog.analysis.prunable] == ["stem", "body.conv,body.bn"]


def test_export_refusal_is_one_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() if x.sum() > 0 else x  # a branch on a tensor's value

    with pytest.raises(CompileError, match="cannot export DataDependent with torch.export: .*") as e:
        pcompiler.trace(DataDependent(), (torch.randn(3),), frontend="export")
    assert "torch.cond" in e.value.hint


def test_export_keeps_the_model_as_it_was():
    """Export runs the forward on fake tensors; what it assigns to the modules is undone."""

    class Caches(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.cache = None

        def forward(self, x):
            self.cache = torch.arange(x.shape[-1], dtype=x.dtype)
            return self.fc(x) + self.cache

    model = Caches()
    pcompiler.trace(model, (torch.randn(2, 4),), frontend="export")
    assert model.cache is None


def test_export_leaves_the_model_caches_empty():
    """What the forward puts into a dict attribute (timm's LeViT caches its attention biases by
    device) is taken out again: a fake tensor left there fails the model's next run (verify)."""

    class CachesInDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bias = nn.Parameter(torch.randn(4))
            self.cache: dict[str, torch.Tensor] = {}

        def forward(self, x):
            key = str(x.device)
            if key not in self.cache:
                self.cache[key] = self.bias * 2
            return self.fc(x) + self.cache[key]

    model, x = CachesInDict().eval(), torch.randn(2, 4)
    cache = model.cache
    prog = pcompiler.trace(model, (x,), frontend="export")
    assert model.cache is cache and cache == {}
    prog = pcompiler.run(prog, [make_pass("analyze"), make_pass("l1", ratio=0.5), make_pass("slim"),
                                make_pass("verify")])
    assert prog.info["verify"]["ok"] is True


# --- op rules on ATen overloads: what the fx frontend prunes, the export frontend prunes too ------


def _analyzed(model: nn.Module, x: torch.Tensor, frontend: str) -> pcompiler.Program:
    return pcompiler.run(pcompiler.trace(model, (x,), frontend=frontend), [make_pass("analyze")])


def _pruned(model: nn.Module, x: torch.Tensor) -> pcompiler.Program:
    original = copy.deepcopy(model).eval()
    prog = pcompiler.run(pcompiler.trace(model, (x,), frontend="export"),
                         [make_pass("analyze"), make_pass("l1", ratio=0.5), make_pass("slim"), make_pass("verify")])
    assert prog.info["verify"]["ok"] is True
    with torch.no_grad():
        assert_same(prog.gm(x), zero_removed(original, prog)(x))
    return prog


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: y * sigmoid(...) gates y, so sigmoid(0) = 0.5 stays inside
    removed channels (the gate's user is aten.mul.Tensor in the exported graph)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc1, self.fc2, self.gate = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Sigmoid()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head(y * self.gate(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True))))))


class Bilinear(nn.Module):
    """einsum over the query/key width (maxvit's relative attention): aten.einsum.default takes
    its equation first."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.einsum("bid,bjd->bij", self.q(x), self.k(x)))


class ReshapeAs(nn.Module):
    """x.reshape_as(other) (LeViT): only other's shape is read."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.a(x).reshape_as(self.b(x).transpose(0, 1)))


@pytest.mark.parametrize("make, x, param, modules, op", [
    (SqueezeExcite, torch.randn(2, 3, 5, 5), "conv.weight", ("conv", "fc2"), aten.mul.Tensor),
    (Bilinear, torch.randn(2, 5, 4), "q.weight", ("q", "k"), aten.einsum.default),
    (ReshapeAs, torch.randn(2, 5, 4), "a.weight", ("a",), aten.reshape_as.default),
], ids=["gate", "einsum", "reshape_as"])
def test_export_prunes_what_fx_prunes(make, x, param, modules, op):
    torch.manual_seed(0)
    prog = _analyzed(make(), x, "export")
    assert op in {n.target for n in prog.gm.graph.nodes}
    assert prog.analysis.notes == ()
    g = group_with(prog, param, 0)
    assert g.prunable and g.size == 8 and {m for m in g.modules if m in modules} == set(modules), g.pinned
    fx_prog = _analyzed(make(), x, "fx")
    assert sorted(g.label() for g in prog.analysis.prunable) == sorted(g.label() for g in fx_prog.analysis.prunable)
    slim = _pruned(make(), x)
    widths = [getattr(slim.gm.get_submodule(m), "out_channels", None) or slim.gm.get_submodule(m).out_features
              for m in modules]
    assert widths == [4] * len(modules)


# --- the models symbolic tracing refuses ------------------------------------------------------

def _transformers():
    return pytest.importorskip("transformers")


def _text_inputs(vocab: int = 96, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, seq), generator=g),
            "attention_mask": torch.ones(2, seq, dtype=torch.long)}


def _hf(name: str) -> tuple[nn.Module, tuple, dict]:
    T = _transformers()
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(vocab_size=96, max_position_embeddings=32, **small)), (), _text_inputs()
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, use_cache=False)
        return T.GPT2LMHeadModel(cfg), (), _text_inputs()
    if name == "llama":
        cfg = T.LlamaConfig(vocab_size=96, num_key_value_heads=2, use_cache=False, **small)
        return T.LlamaForCausalLM(cfg), (), _text_inputs()
    if name == "qwen2":
        cfg = T.Qwen2Config(vocab_size=96, num_key_value_heads=2, use_cache=False, **small)
        return T.Qwen2ForCausalLM(cfg), (), _text_inputs()
    if name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, **small)
        return T.ViTForImageClassification(cfg), (), {"pixel_values": torch.randn(2, 3, 32, 32)}
    raise KeyError(name)


def _yolo(name: str) -> tuple[nn.Module, tuple, dict]:
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    return tasks.DetectionModel(f"{name}.yaml", verbose=False), (torch.randn(1, 3, 64, 64),), {}


def _vgg11_bn() -> tuple[nn.Module, tuple, dict]:
    timm = pytest.importorskip("timm")
    return timm.create_model("vgg11_bn", num_classes=10), (torch.randn(1, 3, 64, 64),), {}


MODELS = {
    **{name: (lambda n=name: _hf(n)) for name in ("bert", "gpt2", "llama", "qwen2", "vit")},
    "yolov8n": lambda: _yolo("yolov8n"),
    "yolo11n": lambda: _yolo("yolo11n"),
    "vgg11_bn": _vgg11_bn,
}
# The share of parameters l1 at 0.5 must remove, measured less a margin. The transformers keep
# their residual stream (pinned under LayerNorm/RMSNorm) and their embeddings.
MIN_REMOVED = {"bert": 0.3, "gpt2": 0.25, "llama": 0.25, "qwen2": 0.25, "vit": 0.3, "yolov8n": 0.5, "yolo11n": 0.5,
               "vgg11_bn": 0.5}


def _flat(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(MODELS))
def test_models_symbolic_tracing_refuses(name, tmp_path):
    torch.manual_seed(0)
    model, args, kwargs = MODELS[name]()
    model.eval()
    if not kwargs:  # (keyword inputs: only export takes them)
        try:
            assert pcompiler.trace(model, args, frontend="fx").opaque, "symbolic tracing reads it whole"
        except CompileError:
            pass
    original = copy.deepcopy(model)
    prog = pcompiler.trace(model, args, kwargs=kwargs)
    assert prog.frontend == "export" and not prog.opaque
    prog = pcompiler.run(prog, [make_pass("analyze"), make_pass("l1", ratio=0.5), make_pass("slim"),
                                make_pass("verify")])
    assert prog.info["verify"]["ok"] is True
    check_modules(prog.gm)
    before = sum(p.numel() for p in original.parameters())
    after = sum(p.numel() for p in prog.gm.parameters())
    assert 1 - after / before >= MIN_REMOVED[name], f"{name}: {after}/{before} parameters left"
    # Independently of verify: the user's model with the removed producer slices zeroed.
    with torch.no_grad():
        want = _flat(zero_removed(original, prog)(*args, **kwargs))
        got = flatten_tensors(prog.gm(*prog.example_inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_same(g, w)
    if name.startswith("yolo"):  # the head's fixed widths (box distribution, classes) reach the outputs
        head = [g for g in prog.analysis.groups if any(".cv2." in p.param or ".cv3." in p.param for p in g.params)]
        assert any(OUTPUT_REASON in g.pinned for g in head)
    pt2 = export_program(prog, tmp_path / "model.pt2")
    for result in (pt2, export_onnx(prog, tmp_path / "model.onnx")):
        assert result.ok, result.error
        assert result.max_error is not None and result.max_error < 1e-3
    tokens = dynamic_dims(prog.example_inputs) == (0, 1)
    # Exported on a batch of 2, the graph reads the batch size (and a token model's length).
    assert pt2.note == "dynamic batch dimension" + (" and sequence length" if tokens else "")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for g, w in zip(flatten_tensors(call_with(loaded, prog.example_inputs, prog.keywords)), got, strict=True):
        assert_same(g, w)
    batch3 = [t[:1].expand(3, *t.shape[1:]) for t in prog.example_inputs]
    if tokens:  # and 5 positions
        batch3 = [t[..., :5] for t in batch3]
    with torch.no_grad():
        out = flatten_tensors(call_with(loaded, tuple(batch3), prog.keywords))
        want = flatten_tensors(prog.gm(*batch3))  # the slim graph reads them too
    assert out[0].shape[0] == 3
    for g, w in zip(out, want, strict=True):
        assert_same(g, w)


def test_a_meta_device_llama_is_analyzed_without_memory():
    """A LlamaForCausalLM built on the meta device (no weights): export records `.to(x.device)`
    as the meta device, which the f(0) probes must not inherit (they run on the CPU)."""
    T = _transformers()
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, use_cache=False)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    inputs = {k: v.to("meta") for k, v in _text_inputs().items()}
    prog = pcompiler.run(pcompiler.trace(model, (), kwargs=inputs), [make_pass("analyze")])
    assert prog.on_meta
    labels = [g.label() for g in prog.analysis.prunable]
    assert "model.layers.0.mlp.gate_proj,model.layers.0.mlp.up_proj" in labels
    assert "model.layers.1.mlp.gate_proj,model.layers.1.mlp.up_proj" in labels


def test_multi_query_attention_keeps_its_query_heads_and_says_why():
    """7 query heads over one key/value head: the key and value are copied to every query head by
    an expand, and a query head zeroed still reads the copied values (softmax of zero logits
    averages them), so removing it is not zeroing it: the query heads stay, pinned as copies of
    one value (before, they went and verify failed). The value's 16 dims are plain channels of
    every head's output and go."""
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=112, num_hidden_layers=1, num_attention_heads=7,
                        num_key_value_heads=1, intermediate_size=64, use_cache=False)
    model = T.LlamaForCausalLM(cfg)
    prog = pcompiler.run(pcompiler.trace(model, (), kwargs=_text_inputs()), [make_pass("analyze")])
    attn = "model.layers.0.self_attn"
    assert not any(g.prunable for g in prog.analysis.groups
                   if any(p.param == f"{attn}.q_proj.weight" and p.dim == 0 for p in g.params))
    values = group_with(prog, f"{attn}.v_proj.weight", 0)
    assert values.prunable and values.size == 16
    prog = pcompiler.run(prog, [make_pass("l1", ratio=0.5), make_pass("slim"), make_pass("verify")])
    assert prog.info["verify"]["ok"] and prog.info["verify"]["max_error"] < 1e-5
    shapes = {n: tuple(prog.gm.get_parameter(f"{attn}.{n}_proj.weight").shape) for n in "qkvo"}
    assert shapes["q"] == (112, 56) and shapes["v"] == (8, 56) and shapes["o"] == (56, 56)


@pytest.mark.parametrize("kv_heads", [2, 8], ids=["gqa", "mha"])
def test_attention_loses_whole_key_value_heads_with_their_query_heads(kv_heads):
    """8 query heads of 8 over `kv_heads` key/value heads (repeated for grouped-query attention):
    a channel is one key/value head with the query heads that read it, so what is left is again
    a valid layer (4 query heads per key/value head for GQA)."""
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=8,
                        num_key_value_heads=kv_heads, intermediate_size=64, use_cache=False)
    model = T.LlamaForCausalLM(cfg)
    prog = pcompiler.run(pcompiler.trace(model, (), kwargs=_text_inputs()), [make_pass("analyze")])
    attn = "model.layers.0.self_attn"
    g = group_with(prog, f"{attn}.k_proj.weight", 0)
    per = 8 // kv_heads  # query heads per key/value head
    assert g.prunable and g.size == kv_heads and g.block == 8
    assert {p.param for p in g.params} >= {f"{attn}.{n}_proj.weight" for n in "qkvo"}
    q = next(p.index for p in g.params if p.param == f"{attn}.q_proj.weight")
    assert q.shape == (kv_heads, 8 * per) and q[1].tolist() == list(range(8 * per, 16 * per))
    prog = pcompiler.run(prog, [make_pass("l1", ratio=0.5), make_pass("slim"), make_pass("verify")])
    assert prog.info["verify"]["ok"] and prog.info["verify"]["max_error"] < 1e-5
    shapes = {n: tuple(prog.gm.get_parameter(f"{attn}.{n}_proj.weight").shape) for n in "qkvo"}
    assert shapes == {"q": (32, 32), "k": (4 * kv_heads, 32), "v": (4 * kv_heads, 32), "o": (32, 32)}
