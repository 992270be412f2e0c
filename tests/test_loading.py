"""Safe loading (pcompiler.loading): what loads without --trust, what is refused and how."""

import io
import sys
import types
import warnings
import zipfile

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pcompiler.errors import CompileError  # noqa: E402
from pcompiler.loading import allowlist, load_model, refresh_allowlist  # noqa: E402

torch.set_num_threads(1)


class UserNet(nn.Module):
    """A user-defined class: not on the allowlist."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).relu()


_RAN: list[str] = []


def _side_effect(tag):
    _RAN.append(tag)
    return tag


class Evil:
    """Unpickling this calls _side_effect: a stand-in for code a malicious file would run."""

    def __reduce__(self):
        return (_side_effect, ("evil ran",))


def _error(path, **kw) -> str:
    with pytest.raises(CompileError) as info:
        load_model(path, **kw)
    text = str(info.value)
    assert "\n" not in text and info.value.exit_code == 2
    return text


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5))


# ---------------------------------------------------------------------------------------------
# What loads without --trust


def test_torch_nn_pickle_loads_without_trust(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt").eval()
    assert isinstance(loaded, nn.Sequential) and len(loaded) == 6
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_partial_and_torchvision_ops_blocks_load(tmp_path):
    import functools

    from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

    norm = functools.partial(nn.BatchNorm2d, eps=1e-3)
    model = nn.Sequential(Conv2dNormActivation(3, 8, norm_layer=norm), SqueezeExcitation(8, 2)).eval()
    model.norm_factory = norm  # a partial kept as an attribute, as torchvision models do
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt").eval()
    assert isinstance(loaded.norm_factory, functools.partial)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_real_torchvision_model_loads_with_same_outputs(tmp_path):
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt").eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _meta_torchvision_model(name: str, monkeypatch) -> nn.Module:
    import torchvision
    from torchvision.models.regnet import BlockParams

    # RegNet computes its widths with tensors and .tolist(), which meta tensors cannot do.
    original = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name)


def test_every_torchvision_classification_model_loads_without_trust(tmp_path, monkeypatch):
    """Built on the meta device (no memory, no init time): the pickle names the same classes."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    assert len(names) >= 80
    failures = {}
    for name in names:
        model = _meta_torchvision_model(name, monkeypatch)
        path = tmp_path / f"{name}.pt"
        torch.save(model, path)
        try:
            loaded = load_model(path)
        except CompileError as e:
            failures[name] = str(e)
            continue
        assert type(loaded) is type(model), name
        assert [(k, v.shape) for k, v in loaded.state_dict().items()] == [
            (k, v.shape) for k, v in model.state_dict().items()
        ], name
        path.unlink()
    assert not failures, failures


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto",
                                  "mobilenetv3_small_050", "dm_nfnet_f0", "vit_small_resnet26d_224"])
def test_timm_models_load_without_trust(tmp_path, name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert type(loaded) is type(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_timm_bound_method_pickle_needs_trust(tmp_path):
    """fasternet keeps a bound method, pickled through builtins.getattr, which is never allowlisted."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model("fasternet_t0", pretrained=False)
    torch.save(model, tmp_path / "m.pt")
    assert "builtins.getattr" in _error(tmp_path / "m.pt")
    assert type(load_model(tmp_path / "m.pt", trust=True)) is type(model)


def test_allowlist_covers_the_libraries():
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowlist()}
    for expected in ("torch.nn.modules.conv.Conv2d", "torch.nn.modules.container.Sequential",
                     "torchvision.models.resnet.ResNet", "torchvision.ops.misc.Conv2dNormActivation",
                     "torchvision.ops.misc.Permute", "torchvision.ops.misc.MLP",
                     "torchvision.ops.stochastic_depth.StochasticDepth", "functools.partial"):
        assert expected in names
    assert not any(n.startswith(("builtins.", "os.", "posix.", "subprocess.")) for n in names)


# ---------------------------------------------------------------------------------------------
# What is refused, and --trust


def test_user_class_is_refused_by_name_and_trust_loads_it(tmp_path):
    model = UserNet().eval()
    torch.save(model, tmp_path / "user.pt")
    text = _error(tmp_path / "user.pt")
    assert f"{UserNet.__module__}.UserNet" in text and "--trust" in text
    loaded = load_model(tmp_path / "user.pt", trust=True).eval()
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_malicious_pickle_never_runs(tmp_path, legacy):
    _RAN.clear()
    torch.save({"weights": torch.zeros(2), "payload": Evil()}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=not legacy)
    text = _error(tmp_path / "evil.pt")
    assert "_side_effect" in text and "--trust" in text
    assert _RAN == []
    with pytest.raises(CompileError):
        load_model(tmp_path / "evil.pt", arch="torch.nn:Identity")
    assert _RAN == []


def test_torchvision_import_failure_is_survived_and_named(tmp_path, monkeypatch):
    import torchvision

    torch.save(torchvision.models.squeezenet1_1(num_classes=3), tmp_path / "sq.pt")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails
    refresh_allowlist()
    try:
        assert not any(c.__module__.startswith("torchvision.") for c in allowlist())
        text = _error(tmp_path / "sq.pt")
        assert "torchvision.models.squeezenet.SqueezeNet" in text
        assert "torchvision is not allowlisted because it failed to import" in text
    finally:
        monkeypatch.undo()
        refresh_allowlist()
    assert isinstance(load_model(tmp_path / "sq.pt"), torchvision.models.SqueezeNet)


# ---------------------------------------------------------------------------------------------
# --arch: a state dict and the code that builds the model


@pytest.fixture
def arch_module(tmp_path, monkeypatch):
    (tmp_path / "pc_arch_fixture.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))\n"
        "def wider():\n"
        "    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))\n"
        "def other():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3))\n"
    )
    monkeypatch.chdir(tmp_path)  # --arch finds modules in the current folder
    yield "pc_arch_fixture"
    sys.modules.pop("pc_arch_fixture", None)


def test_arch_builds_the_model_and_loads_the_state_dict(tmp_path, arch_module):
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    model = load_model(tmp_path / "sd.pt", arch=f"{arch_module}:build")
    for (k, a), (_, b) in zip(model.state_dict().items(), source.state_dict().items()):
        assert torch.equal(a, b), k


def test_arch_mismatches_are_named(tmp_path, arch_module):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).state_dict(), tmp_path / "sd.pt")
    text = _error(tmp_path / "sd.pt", arch=f"{arch_module}:other")
    assert "unexpected keys 2.weight, 2.bias" in text
    text = _error(tmp_path / "sd.pt", arch=f"{arch_module}:wider")
    assert "size mismatch for 0.weight" in text
    torch.save({"0.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "part.pt")
    assert "missing keys 0.bias" in _error(tmp_path / "part.pt", arch=f"{arch_module}:other")


def test_arch_errors(tmp_path, arch_module):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path / "whole.pt")
    assert "whole model" in _error(tmp_path / "whole.pt", arch=f"{arch_module}:other")
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict(), tmp_path / "sd.pt")
    assert "not of the form module:callable" in _error(tmp_path / "sd.pt", arch="no_colon")
    assert "cannot import module 'no_such_module_xyz'" in _error(tmp_path / "sd.pt", arch="no_such_module_xyz:f")
    assert "has no attribute 'nope'" in _error(tmp_path / "sd.pt", arch=f"{arch_module}:nope")


# ---------------------------------------------------------------------------------------------
# Files that are not models


def test_missing_directory_and_empty_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "missing.pt")
    assert "is a directory" in _error(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is empty" in _error(tmp_path / "empty.pt")


def test_truncated_and_corrupt_files(tmp_path):
    buf = io.BytesIO()
    torch.save(_sequential(), buf)
    data = buf.getvalue()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _error(tmp_path / "truncated.pt")
    (tmp_path / "text.pt").write_text("this is not a model\n" * 10)
    assert "not a torch.save file" in _error(tmp_path / "text.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("hello.txt", "hi")
    assert "not a torch.save file" in _error(tmp_path / "other.zip")


def test_files_that_hold_no_model(tmp_path):
    torch.save(torch.randn(3, 4), tmp_path / "tensor.pt")
    assert "holds a tensor of shape (3, 4), not an nn.Module" in _error(tmp_path / "tensor.pt")
    torch.save(nn.Linear(2, 3).state_dict(), tmp_path / "sd.pt")
    text = _error(tmp_path / "sd.pt")
    assert "holds a state dict (2 tensors), not a model" in text and "--arch" in text
    torch.save({"epoch": 3}, tmp_path / "dict.pt")
    assert "not an nn.Module" in _error(tmp_path / "dict.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_named(tmp_path):
    torch.jit.save(torch.jit.script(nn.Linear(2, 3)), tmp_path / "ts.pt")
    assert "TorchScript" in _error(tmp_path / "ts.pt")
