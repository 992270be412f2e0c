"""The --data sources (pcompiler.data): each on tiny files written to tmp_path, every user error,
the batch augmentation, and check_model."""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pcompiler.data import check_model, load_data, random_crop_flip
from pcompiler.errors import CompileError
from pcompiler.example_models import DigitsResNet

CIFAR = {  # kind: (subfolder, label key, classes, train files, val files, mean, std)
    "cifar10": ("cifar-10-batches-py", b"labels", 10, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", b"fine_labels", 100, ["train"], ["test"],
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def write_cifar(root: Path, kind: str, n: int = 3, label_key: bytes | None = None) -> Path:
    """A fake dataset: n random images per batch file, in root/<subfolder>/; returns that folder."""
    sub, key, classes, train, val, *_ = CIFAR[kind]
    folder = root / sub
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(kind))
    for name in train + val:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key or key: [int(v) for v in rng.integers(0, classes, n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def write_png(path: Path, pixels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def write_image_folder(root: Path) -> Path:
    """train: cat (2 red images), dog (1 blue); val: one of each. 4x4 images, or 8 wide for one cat."""
    red, blue = np.full((4, 4, 3), (255, 0, 0)), np.full((4, 4, 3), (0, 0, 255))
    wide = np.zeros((4, 8, 3))
    wide[:, 2:6] = (255, 0, 0)  # red in the middle, black margins that a center crop to 4x4 removes
    write_png(root / "train/cat/a.png", red)
    write_png(root / "train/cat/b.png", wide)
    write_png(root / "train/dog/c.png", blue)
    write_png(root / "val/cat/d.png", red)
    write_png(root / "val/dog/e.png", blue)
    (root / "train/dog/notes.txt").write_text("not an image")
    return root


def write_npz(path: Path, **overrides) -> str:
    arrays = {"x_train": np.zeros((4, 1, 2, 2), np.float32), "y_train": np.array([0, 1, 0, 1]),
              "x_val": np.zeros((2, 1, 2, 2), np.float32), "y_val": np.array([1, 0])}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return f"npz:{path}"


def write_module(tmp_path: Path, monkeypatch, body: str) -> str:
    """A module in tmp_path (the cwd) with a unique name; sys.path and sys.modules restored after."""
    name = "userdata_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_digits_split_shapes_range_and_labels(digits):
    (xtr, ytr), (xva, yva) = digits.train.tensors, digits.val.tensors
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    assert xtr.shape == (1437, 1, 8, 8) and xva.shape == (360, 1, 8, 8) and xtr.dtype == torch.float32
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert xtr.min() == 0 and xtr.max() == 1 and xva.min() >= 0 and xva.max() <= 1
    assert set(ytr.tolist()) == set(yva.tolist()) == set(range(10))
    info = json.loads(json.dumps(digits.info()))
    assert info["train_size"] == 1437 and info["input_shape"] == [1, 8, 8] and "1 px" in info["augment"]


def test_digits_split_is_fixed_and_the_one_the_example_was_trained_on(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    again = load_data("digits")
    for a, b in zip(digits.train.tensors + digits.val.tensors, again.train.tensors + again.val.tensors):
        assert torch.equal(a, b)
    # the split examples/train_digits.py made before it used load_data
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    assert torch.equal(digits.train.tensors[0], torch.from_numpy(xtr))
    assert torch.equal(digits.val.tensors[1], torch.from_numpy(yva).long())
    model = torch.load(Path(__file__).parents[1] / "examples/digits_resnet.pt", weights_only=False).eval()
    with torch.no_grad():
        correct = (model(digits.val.tensors[0]).argmax(1) == digits.val.tensors[1]).sum().item()
    assert correct == 358  # 99.4%, the accuracy the README reports


def test_digits_augment_is_a_one_pixel_translation(digits):
    x = digits.train.tensors[0][:32]
    out = digits.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(3), pad=1, flip=False))
    assert not torch.equal(out, x)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("give", ["parent", "batches folder"])
def test_cifar_loads_from_either_folder(tmp_path, kind, give):
    folder = write_cifar(tmp_path, kind)
    data = load_data(f"{kind}:{tmp_path if give == 'parent' else folder}")
    _, key, classes, train, _, mean, std = CIFAR[kind]
    assert (len(data.train), len(data.val)) == (3 * len(train), 3)
    assert data.num_classes == classes and data.input_shape == (3, 32, 32)
    batch = pickle.loads((folder / train[0]).read_bytes())
    x, y = data.train[1]
    expected = (torch.from_numpy(batch[b"data"][1]).float().view(3, 32, 32) / 255 - torch.tensor(mean).view(3, 1, 1))
    assert x.dtype == torch.float32 and torch.allclose(x, expected / torch.tensor(std).view(3, 1, 1))
    assert y == batch[key][1]
    assert "4 px" in data.info()["augment"] and "flip" in data.info()["augment"]


def test_image_folder_labels_shape_and_normalization(tmp_path):
    data = load_data(f"imagefolder:{write_image_folder(tmp_path)}", image_size=4)
    assert (len(data.train), len(data.val), data.num_classes, data.input_shape) == (3, 2, 2, (3, 4, 4))
    red = ((torch.tensor([1.0, 0, 0]) - IMAGENET_MEAN) / IMAGENET_STD).view(3, 1, 1).expand(3, 4, 4)
    blue = ((torch.tensor([0, 0, 1.0]) - IMAGENET_MEAN) / IMAGENET_STD).view(3, 1, 1).expand(3, 4, 4)
    items = [data.train[i] for i in range(3)] + [data.val[i] for i in range(2)]
    assert [y for _, y in items] == [0, 0, 1, 0, 1]  # cat, cat (the wide one), dog; cat, dog
    for (x, _), expected in zip(items, [red, red, blue, red, blue]):
        assert x.shape == (3, 4, 4) and torch.allclose(x, expected, atol=1e-5)
    assert data.augment.pad == 0 and data.augment.flip  # image_size // 8
    assert load_data(f"imagefolder:{tmp_path}", image_size=16).train[1][0].shape == (3, 16, 16)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_npz_uint8_is_scaled_and_float_used_as_is(tmp_path, dtype):
    x = np.arange(4 * 3 * 2 * 2).reshape(4, 3, 2, 2).astype(dtype)
    spec = write_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 2, 0]),
                     x_val=x[:2], y_val=np.array([4, 1], np.int32))
    data = load_data(spec)
    assert data.num_classes == 5 and data.input_shape == (3, 2, 2) and data.augment is None
    x0, y0 = data.train[3]
    expected = torch.from_numpy(x[3]).float() / (255 if dtype == np.uint8 else 1)
    assert x0.dtype == torch.float32 and torch.equal(x0, expected) and y0 == 0
    assert int(data.val[0][1]) == 4


def test_npz_feature_vectors(tmp_path):
    data = load_data(write_npz(tmp_path / "f.npz", x_train=np.ones((4, 7), np.float64), x_val=np.ones((2, 7))))
    assert data.input_shape == (7,) and data.train[0][0].dtype == torch.float32 and data.num_classes == 2


def test_py_source(tmp_path, monkeypatch):
    name = write_module(tmp_path, monkeypatch, (
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    x = torch.arange(24, dtype=torch.float64).reshape(6, 4)\n"
        "    return TensorDataset(x[:4], torch.tensor([0, 1, 2, 0])), [(x[4].numpy(), 3), (x[5].numpy(), 1)]\n"))
    data = load_data(f"py:{name}:make")
    assert (len(data.train), len(data.val), data.num_classes, data.input_shape) == (4, 2, 4, (4,))
    x, y = data.val[0]
    assert x.dtype == torch.float32 and x.tolist() == [16, 17, 18, 19] and y == 3
    assert data.train[1][1] == 1 and data.augment is None


def _cifar_without(tmp_path, name):
    (write_cifar(tmp_path, "cifar10") / name).unlink()
    return f"cifar10:{tmp_path}"


def _cifar_batch(tmp_path, batch: dict, kind="cifar10"):
    folder = write_cifar(tmp_path, kind)
    (folder / CIFAR[kind][3][0]).write_bytes(pickle.dumps(batch))
    return f"{kind}:{folder}"


def _folder(tmp_path, change):
    root = write_image_folder(tmp_path / "imgs")
    change(root)
    return f"imagefolder:{root}"


def _py(body):
    return lambda tmp_path, mp: f"py:{write_module(tmp_path, mp, body)}:make"


DS = "from torch.utils.data import TensorDataset\nimport torch\n"
ERRORS = {  # case: (spec builder(tmp_path, monkeypatch), fragment of the message)
    "unknown scheme": (lambda t, mp: "mnist", "unknown data source 'mnist'"),
    "missing argument": (lambda t, mp: "cifar10", "write it as cifar10:DIR"),
    "digits with argument": (lambda t, mp: "digits:3", "malformed"),
    "missing path": (lambda t, mp: f"cifar10:{t}/nowhere", "nowhere not found"),
    "no train folder": (lambda t, mp: _folder(t, lambda r: (r / "train").rename(r / "training")), "train not found"),
    "no val folder": (lambda t, mp: _folder(t, lambda r: (r / "val").rename(r / "valid")), "val not found"),
    "empty class": (lambda t, mp: _folder(t, lambda r: (r / "train/bird").mkdir()), "bird has no images"),
    "val class not in train": (lambda t, mp: _folder(t, lambda r: write_png(r / "val/fox/f.png", np.zeros((4, 4)))),
                               "missing from"),
    "missing batch file": (lambda t, mp: _cifar_without(t, "data_batch_3"), "data_batch_3 not found"),
    "label out of range": (lambda t, mp: _cifar_batch(t, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}),
                           "label 10, outside 0..9"),
    "labels length": (lambda t, mp: _cifar_batch(t, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}),
                      "2 samples but 1 labels"),
    "wrong label key": (lambda t, mp: _cifar_batch(t, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, "cifar100"), "not a cifar100 python batch"),
    "wrong image size": (lambda t, mp: _cifar_batch(t, {b"data": np.zeros((1, 1024), np.uint8), b"labels": [0]}),
                         "expected uint8 (N, 3072)"),
    "npz missing key": (lambda t, mp: write_npz(t / "a.npz", y_val=None), "lacks y_val"),
    "npz negative label": (lambda t, mp: write_npz(t / "a.npz", y_train=np.array([0, -1, 0, 1])), "label -1, negative"),
    "npz float labels": (lambda t, mp: write_npz(t / "a.npz", y_val=np.array([0.0, 1.0])), "not integers"),
    "npz length mismatch": (lambda t, mp: write_npz(t / "a.npz", y_train=np.array([0, 1])), "4 samples but 2 labels"),
    "npz empty": (lambda t, mp: write_npz(t / "a.npz", x_val=np.zeros((0, 1, 2, 2)), y_val=np.zeros(0, int)), "is empty"),
    "npz int x": (lambda t, mp: write_npz(t / "a.npz", x_val=np.zeros((2, 1, 2, 2), np.int32)), "dtype int32"),
    "npz 1-D x": (lambda t, mp: write_npz(t / "a.npz", x_val=np.zeros(2, np.float32)), "x_val has shape (2,)"),
    "npz shapes differ": (lambda t, mp: write_npz(t / "a.npz", x_val=np.zeros((2, 1, 3, 3))), "x_val samples are"),
    "not an npz": (lambda t, mp: (t / "a.npz").write_text("hello") and f"npz:{t}/a.npz", "cannot read"),
    "py no function part": (lambda t, mp: "py:somemodule", "write it as py:module:function"),
    "py import error": (_py("import no_such_module_here\n"), "No module named 'no_such_module_here'"),
    "py missing function": (_py("def other():\n    pass\n"), "has no function 'make'"),
    "py raises": (_py("def make():\n    raise ValueError('no data here')\n"), "raised ValueError: no data here"),
    "py not a pair": (_py(DS + "def make():\n    return TensorDataset(torch.zeros(2, 3))\n"), "not a (train, val) pair"),
    "py empty": (_py(DS + "def make():\n    return [(torch.zeros(3), 0)], []\n"), "val is empty"),
    "py float labels": (_py(DS + "def make():\n    return [(torch.zeros(3), 0.5)], [(torch.zeros(3), 0)]\n"),
                        "not integers"),
    "py items not pairs": (_py(DS + "def make():\n    return [torch.zeros(3)], [torch.zeros(3)]\n"),
                           "not an (x, y) pair"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_say_what_and_how_to_fix(tmp_path, monkeypatch, case):
    build, fragment = ERRORS[case]
    spec = build(tmp_path, monkeypatch)
    with pytest.raises(CompileError) as err:
        load_data(spec)
    assert fragment in str(err.value) and err.value.hint
    assert "\n" not in str(err.value)


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(CompileError, match="imagefolder:DIR, cifar10:DIR, cifar100:DIR, npz:FILE, py:module:function"):
        load_data("mnist")


def test_random_crop_flip_reproducible_and_shape_preserving():
    x = torch.rand(64, 3, 6, 5)
    state = torch.get_rng_state()
    a = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2, flip=True)
    b = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2, flip=True)
    c = random_crop_flip(x, torch.Generator().manual_seed(1), pad=2, flip=True)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert random_crop_flip(x, torch.Generator(), pad=0, flip=False) is x


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img moved down by dy and right by dx, zero filled."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[..., max(-dy, 0):h - max(dy, 0),
                                                                          max(-dx, 0):w - max(dx, 0)]
    return out


def test_random_crop_flip_pad_1_moves_content_by_at_most_one_pixel():
    x = torch.zeros(200, 1, 5, 5)
    x[:, 0, 2, 2] = 1
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=1, flip=False)
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 5, where % 5
    assert (out.flatten(1).sum(1) == 1).all() and (abs(rows - 2) <= 1).all() and (abs(cols - 2) <= 1).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 9  # every offset of the 3x3 neighborhood occurs
    x = torch.rand(50, 2, 4, 4)  # arbitrary content: each sample is a zero-filled shift of itself
    out = random_crop_flip(x, torch.Generator().manual_seed(1), pad=1, flip=False)
    for xi, oi in zip(x, out):
        assert any(torch.equal(oi, shifted(xi, dy, dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_random_crop_flip_flips_some_samples_left_right():
    x = torch.rand(64, 2, 3, 4)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_check_model_accepts_the_right_model_and_restores_its_modes(digits):
    model = DigitsResNet()
    model.stem.eval()  # a frozen part stays frozen; the rest stays in training mode
    check_model(digits, model)
    assert model.training and not model.stem.training and model.layer1[0].bn1.training


def test_check_model_rejects_wrong_input_channels(digits):
    with pytest.raises(CompileError, match=r"samples of shape \(1, 8, 8\).*do not fit the model: RuntimeError") as err:
        check_model(digits, DigitsResNet(in_channels=3))
    assert "--data" in err.value.hint


def test_check_model_rejects_too_few_outputs_and_non_logits(digits):
    with pytest.raises(CompileError, match=r"model predicts 5 classes but data 'digits' has labels 0\.\.9"):
        check_model(digits, DigitsResNet(num_classes=5))
    with pytest.raises(CompileError, match=r"model output is \(2, 10, 6, 6\).*expected \(batch, classes\)"):
        check_model(digits, nn.Conv2d(1, 10, 3))
