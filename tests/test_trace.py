"""Tests of the trace pass: leaves, opaque submodules, shapes, meta models, errors."""

from __future__ import annotations

import logging
from collections import namedtuple

import pytest
import torch
from torch import nn

from pcompiler.errors import CompileError
from pcompiler.ir import TensorInfo, node_value
from pcompiler.passes.trace import check_reproduces, trace
from pcompiler.passes.verify import verify_program


def nodes(prog, op=None):
    return {n.name: n for n in prog.gm.graph.nodes if op is None or n.op == op}


def module_targets(prog) -> list[str]:
    return [n.target for n in prog.gm.graph.nodes if n.op == "call_module"]


def assert_reproduces(prog, model, *inputs):
    with torch.no_grad():
        torch.testing.assert_close(prog.gm(*inputs), model(*inputs))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.sub = Block(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.sub(self.bn(self.conv(x))))


class DataDependent(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -x


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.odd = DataDependent(8)
        self.tail = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.tail(torch.relu(self.odd(self.stem(x))))


def test_cnn_leaves_and_shapes():
    model, x = CNN(), torch.randn(1, 3, 8, 8)
    prog = trace(model, x)
    calls = nodes(prog, "call_module")
    assert module_targets(prog) == ["conv", "bn", "sub.conv", "head.0", "head.1", "head.2"]
    assert node_value(calls["conv"]) == TensorInfo((1, 8, 8, 8), torch.float32)
    assert node_value(calls["sub_conv"]) == TensorInfo((1, 8, 8, 8), torch.float32)
    assert node_value(calls["head_2"]) == TensorInfo((1, 4), torch.float32)
    assert node_value(nodes(prog, "placeholder")["x"]) == TensorInfo((1, 3, 8, 8), torch.float32)
    # every node, including the functions inside the user submodule, has a value
    assert all(node_value(n) is not None for n in prog.gm.graph.nodes)
    assert any(n.op == "call_function" and n.target is torch.relu for n in prog.gm.graph.nodes)
    assert prog.opaque == {}
    assert type(prog.gm).__name__ == "CNN"
    assert not prog.gm.training and not model.training
    assert prog.example_inputs[0] is x
    assert_reproduces(prog, model, x)


def test_untraceable_submodule_becomes_opaque(caplog):
    model, x = WithOpaque(), torch.randn(2, 3, 5, 5)
    with caplog.at_level(logging.WARNING, logger="pcompiler"):
        prog = trace(model, x)
    assert set(prog.opaque) == {"odd"}
    assert "TraceError" in prog.opaque["odd"] and "\n" not in prog.opaque["odd"]
    assert "odd" in caplog.text
    assert module_targets(prog) == ["stem", "odd", "tail"]  # nothing left of odd's inside
    assert not any("odd" in str(n.target) and n.op != "call_module" for n in prog.gm.graph.nodes)
    assert node_value(nodes(prog, "call_module")["odd"]) == TensorInfo((2, 8, 5, 5), torch.float32)
    assert isinstance(prog.gm.get_submodule("odd"), DataDependent)
    # the tracer's module scope was unwound: odd's node is in odd, the relu after it is not
    assert list(nodes(prog)["odd"].meta["nn_module_stack"]) == ["odd"]
    assert not nodes(prog)["relu"].meta.get("nn_module_stack")
    prog.gm.graph.lint()
    assert_reproduces(prog, model, x)
    assert_reproduces(prog, model, -x.abs())  # the opaque module keeps its own control flow


def test_opaque_module_drops_its_partial_trace_and_param_proxies():
    class UsesWeightThenBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            y = x * self.w  # a get_attr node for w is created, then erased
            if y.mean() > 0:
                return y
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = UsesWeightThenBranches()

        def forward(self, x):
            return self.a(x) + x * self.a.w  # w again, after its first proxy was erased

    model, x = Model(), torch.randn(3, 4)
    prog = trace(model, x)
    assert set(prog.opaque) == {"a"}
    assert [n.op for n in prog.gm.graph.nodes] == [
        "placeholder",
        "call_module",
        "get_attr",
        "call_function",
        "call_function",
        "output",
    ]
    prog.gm.graph.lint()
    assert_reproduces(prog, model, x)


def test_nested_innermost_failure_is_opaque():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(6, 6)
            self.inner = DataDependent(6)

        def forward(self, x):
            return self.inner(self.pre(x).unsqueeze(-1).unsqueeze(-1)).flatten(1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.outer = Outer()
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.outer(x))

    model, x = Model(), torch.randn(2, 6)
    prog = trace(model, x)
    assert set(prog.opaque) == {"outer.inner"}
    assert module_targets(prog) == ["outer.pre", "outer.inner", "out"]
    assert node_value(nodes(prog)["flatten"]) == TensorInfo((2, 6), torch.float32)
    assert_reproduces(prog, model, x)


def test_outer_failure_after_inner_failure_keeps_only_outer():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent(3)

        def forward(self, x):
            y = self.inner(x)
            return y if y.max() > 0 else x  # fails after inner was already made opaque

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.outer = Outer()

        def forward(self, x):
            return self.outer(x) * 2

    model, x = Model(), torch.randn(1, 3, 2, 2)
    prog = trace(model, x)
    assert set(prog.opaque) == {"outer"}
    assert module_targets(prog) == ["outer"]
    assert_reproduces(prog, model, x)


def test_multiple_inputs_and_tuple_outputs():
    Pair = namedtuple("Pair", "left right")

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = nn.Linear(3, 5)

        def forward(self, x, y):
            h = self.a(x) + self.b(y)
            first, second = h.split([2, 3], dim=1)
            return h, Pair(first, second)

    model, x, y = TwoHeads(), torch.randn(2, 4), torch.randn(2, 3)
    prog = trace(model, (x, y))
    assert [n.name for n in nodes(prog, "placeholder").values()] == ["x", "y"]
    out = nodes(prog, "output")["output"]
    f32 = torch.float32
    assert node_value(out) == (TensorInfo((2, 5), f32), (TensorInfo((2, 2), f32), TensorInfo((2, 3), f32)))
    assert node_value(nodes(prog)["split"]) == (TensorInfo((2, 2), f32), TensorInfo((2, 3), f32))
    assert len(prog.example_inputs) == 2
    assert_reproduces(prog, model, x, y)


def test_leaf_modules_option():
    prog = trace(CNN(), torch.randn(1, 3, 8, 8), leaf_modules=(Block,))
    assert "sub" in module_targets(prog) and "sub.conv" not in module_targets(prog)
    assert prog.opaque == {}


def test_meta_model_traces_without_memory():
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Embedding(50000, 1024),
            nn.TransformerEncoder(nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True), 24),
            nn.Linear(1024, 50000),
        )
    assert next(model.parameters()).is_meta
    prog = trace(model, torch.zeros(2, 128, dtype=torch.long, device="meta"))
    assert prog.on_meta
    assert node_value(nodes(prog, "output")["output"]) == TensorInfo((2, 128, 50000), torch.float32)
    assert node_value(nodes(prog, "call_module")["_1"]) == TensorInfo((2, 128, 1024), torch.float32)


def test_meta_model_with_cpu_inputs_moves_inputs_to_meta():
    with torch.device("meta"):
        model = CNN()
    prog = trace(model, torch.randn(1, 3, 8, 8))
    assert prog.on_meta
    assert node_value(nodes(prog, "call_module")["conv"]) == TensorInfo((1, 8, 8, 8), torch.float32)


def test_opaque_module_on_meta_says_why_it_cannot_run():
    with torch.device("meta"):
        model = WithOpaque()
    with pytest.raises(CompileError) as err:
        trace(model, torch.zeros(1, 3, 4, 4, device="meta"))
    assert err.value.node == "odd" and "'odd' is opaque" in str(err.value)


def test_shared_opaque_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = DataDependent(2)
            self.mid = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.odd(self.mid(self.odd(x)))

    model, x = Twice(), torch.randn(1, 2, 3, 3)
    prog = trace(model, x)
    assert set(prog.opaque) == {"odd"}
    assert module_targets(prog) == ["odd", "mid", "odd"]
    assert_reproduces(prog, model, x)


def test_top_level_control_flow_is_a_compile_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(CompileError) as err:
        trace(Branchy(), torch.randn(2, 4))
    msg = str(err.value)
    assert "Branchy" in msg and "TraceError" in msg and "leaf module" in msg


def test_wrong_input_shape_names_the_node():
    with pytest.raises(CompileError) as err:
        trace(CNN(), torch.randn(1, 5, 8, 8))
    assert err.value.node == "conv"
    assert "call_module conv" in str(err.value) and "--input-shape" in str(err.value)


def test_trace_that_does_not_reproduce_is_a_compile_error():
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1  # Python state is frozen into the graph at trace time
            return x * self.calls

    with pytest.raises(CompileError, match=r"does not reproduce.*output differs"):
        trace(Stateful(), torch.randn(3), check=True)
    # Tracing alone runs nothing; the pipeline's verify pass makes the same check.
    prog = trace(Stateful(), torch.randn(3))
    prog = prog.replace(reference=prog.gm)
    with pytest.raises(CompileError, match=r"does not reproduce.*output differs"):
        verify_program(prog)


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64)
    prog = trace(model, x)
    assert prog.opaque == {}
    targets = module_targets(prog)
    assert "layer1.0.conv1" in targets and "fc" in targets
    assert node_value(nodes(prog, "call_module")["layer4_1_conv2"]) == TensorInfo(
        (1, 512, 2, 2), torch.float32
    )
    assert node_value(nodes(prog, "output")["output"]) == TensorInfo((1, 1000), torch.float32)
    assert_reproduces(prog, model, x)


def test_traced_model_with_string_annotations_pickles(tmp_path):
    # Under `from __future__ import annotations` (this file, and the bundled example model) fx
    # records `x: torch.Tensor` as a string; the GraphModule must still save and reload.
    class Annotated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    x = torch.randn(1, 3, 4, 4)
    prog = trace(Annotated(), (x,))
    torch.save(prog.gm, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), prog.gm(x))


class Log(nn.Module):
    """log of a signed input: NaN where it is negative, -inf where it is zero."""

    def forward(self, x):
        return torch.log(x), x


def test_reproduction_check_compares_nan_and_infinities_exactly():
    x = torch.tensor([-1.0, 0.0, 2.0])
    prog = trace(Log(), x, check=True)  # the same NaN and -inf on both sides: equal
    assert torch.isnan(prog.gm(x)[0][0]) and prog.gm(x)[0][1] == float("-inf")

    class NanInSource(Log):
        def forward(self, x):
            y, x = super().forward(x)
            return y.nan_to_num(nan=0.0) if self.checked else y, x

    source = NanInSource()
    source.checked = False
    gm = trace(source, x).gm
    source.checked = True  # now the model gives 0 where the graph gives NaN
    with pytest.raises(CompileError, match=r"does not reproduce.*output\[0\] differs"):
        check_reproduces(source, gm, (x,))

    class SignFlip(Log):
        def forward(self, x):
            y, x = super().forward(x)
            return (-y if self.flip else y), x

    source = SignFlip()
    source.flip = False
    gm = trace(source, torch.tensor([0.0, 1.0])).gm
    source.flip = True  # -inf becomes +inf; the finite values (0) are unchanged
    with pytest.raises(CompileError, match=r"output\[0\] differs"):
        check_reproduces(source, gm, (torch.tensor([0.0, 1.0]),))


def test_reproduction_check_does_not_take_what_it_cannot_compare_as_equal():
    class Opaque:
        def __eq__(self, other):
            raise TypeError("no comparison")

    class Returns(nn.Module):
        def forward(self, x):
            return x + 1, Opaque()

    with pytest.raises(CompileError, match=r"output\[1\] \(a Opaque, which cannot be compared\) differs"):
        check_reproduces(Returns(), Returns(), (torch.zeros(2),))
