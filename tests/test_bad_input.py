"""Bad input, end to end: each case is one `error: ...` line on stderr and exit code 2.

Corrupt and truncated model files, weights that hold NaN or inf, input shapes too large for
memory, and an output folder that holds another run's files. Models are a few lines, inline."""

import os

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pcompiler.cli import main

torch.set_num_threads(1)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _error_line(*args, code: int = 2) -> str:
    """Run pcompile; assert the exit code and one `error:` line on stderr; return that line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _compile(model_path, out, *more):
    return _error_line(model_path, "--method", "l1", "--ratio", "0.5", "-o", out, *more)


# ---------------------------------------------------------------------------------------------
# 1. corrupt and truncated model files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The bytes of one model as torch.save (.pt) and torch.export.save (.pt2) write them."""
    folder = tmp_path_factory.mktemp("saved")
    model = _cnn()
    torch.save(model, folder / "m.pt")
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), folder / "m.pt2")
    return {s: (folder / f"m{s}").read_bytes() for s in (".pt", ".pt2")}


def test_truncated_export_archive(saved, tmp_path):
    path = tmp_path / "half.pt2"
    path.write_bytes(saved[".pt2"][: len(saved[".pt2"]) // 2])
    line = _compile(path, tmp_path / "out")
    assert "'" + str(path) + "' is not a readable torch.export archive: truncated or corrupt" in line
    assert "export it again" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_random_bytes_named_pt2(tmp_path):
    path = tmp_path / "noise.pt2"
    path.write_bytes(os.urandom(4096).replace(b"PK", b"pk"))
    line = _compile(path, tmp_path / "out")
    assert "not a readable torch.export archive: not a zip archive" in line and "export it again" in line


def test_corrupt_entry_of_export_archive(saved, tmp_path):
    data = bytearray(saved[".pt2"])
    start = data.index(b"archive_format")  # the first entry's name; its bytes follow
    data[start + 40: start + 240] = bytes(b ^ 0xFF for b in data[start + 40: start + 240])
    path = tmp_path / "flipped.pt2"
    path.write_bytes(bytes(data))
    line = _compile(path, tmp_path / "out")
    assert f"'{path}' is a corrupt torch.export archive: its entry" in line and "export it again" in line


def test_truncated_and_random_torch_save_files(saved, tmp_path):
    half = tmp_path / "half.pt"
    half.write_bytes(saved[".pt"][: len(saved[".pt"]) // 2])
    line = _compile(half, tmp_path / "out")
    assert f"'{half}' is truncated or corrupt" in line and "torch.save(model, path)" in line
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x00" + os.urandom(4095))
    line = _compile(noise, tmp_path / "out")
    assert f"'{noise}' is not a torch.save file" in line and "torch.save(model, path)" in line


def test_torch_save_file_named_pt2_still_loads(saved, tmp_path):
    from pcompiler.loading import load_model

    path = tmp_path / "saved_as.pt2"
    path.write_bytes(saved[".pt"])
    assert isinstance(load_model(path), nn.Sequential)
