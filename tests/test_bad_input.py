"""Bad input, end to end: each case is one `error: ...` line on stderr and exit code 2.

Corrupt and truncated model files, weights that hold NaN or inf, input shapes too large for
memory, and an output folder that holds another run's files. Models are a few lines, inline."""

import os

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pcompiler.cli import main
from pcompiler.outdir import run_files

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
    assert run_files(tmp_path / "out") == []  # nothing written but the claim's run record


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


def test_a_damaged_zip_directory_is_a_user_error(saved, tmp_path):
    data = bytearray(saved[".pt"])
    at = data.find(b"PK\x01\x02")  # the first entry of the central directory: zipfile reads it as BadZipFile
    data[at:at + 2] = b"XX"
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    line = _compile(path, tmp_path / "out")  # exit 2 (asserted by _compile), not an internal error
    assert f"'{path}' is truncated or corrupt" in line and "central directory" in line


def test_torch_save_file_named_pt2_still_loads(saved, tmp_path):
    from pcompiler.loading import load_model

    path = tmp_path / "saved_as.pt2"
    path.write_bytes(saved[".pt"])
    assert isinstance(load_model(path), nn.Sequential)


# ---------------------------------------------------------------------------------------------
# 2. weights that hold NaN or inf


def test_nan_and_inf_weights_are_refused_at_load(tmp_path):
    model = _cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, :3] = float("nan")
        model[5].bias[1] = float("-inf")
    torch.save(model, tmp_path / "m.pt")
    line = _compile(tmp_path / "m.pt", tmp_path / "out")
    assert f"'{tmp_path / 'm.pt'}': 2 tensors hold non-finite values: 0.weight (3 NaN), 5.bias (1 inf)" in line
    assert "earlier checkpoint" in line
    assert run_files(tmp_path / "out") == []  # nothing written but the claim's run record


def test_batchnorm_running_stats_count_too(tmp_path):
    model = _cnn()
    model[1].running_var[2] = float("nan")
    torch.save(model, tmp_path / "m.pt")
    line = _compile(tmp_path / "m.pt", tmp_path / "out")
    assert "1 tensor holds non-finite values: 1.running_var (1 NaN)" in line


def test_non_finite_export_archive_and_bench_are_refused(tmp_path):
    model = _cnn()
    model[5].weight.data.fill_(float("inf"))
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), tmp_path / "m.pt2")
    assert "5.weight (32 inf)" in _compile(tmp_path / "m.pt2", tmp_path / "out")
    assert "5.weight (32 inf)" in _error_line("bench", tmp_path / "m.pt2")


def test_check_finite_names_the_first_few_and_counts_the_rest():
    from pcompiler.errors import CompileError
    from pcompiler.input_checks import check_finite

    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(6)))
    check_finite(model, "fine.pt")  # finite: no error
    for layer in model:
        layer.weight.data[0, 0] = float("nan")
    with pytest.raises(CompileError, match=r"6 tensors hold .*: 0.weight \(1 NaN\), .*3.weight \(1 NaN\) and 2 more"):
        check_finite(model, "m.pt")


# ---------------------------------------------------------------------------------------------
# 3. input shapes too large for memory


def test_input_shape_too_large_is_refused_before_loading(tmp_path):
    missing = tmp_path / "never_read.pt"  # the shape is refused before the model file is read
    line = _compile(missing, tmp_path / "out", "--input-shape", "1000000,3,1024,1024")
    assert "--input-shape 1000000,3,1024,1024: the example inputs would take 11718.8 GiB" in line
    assert "of memory available" in line and "e.g. 1,3,1024,1024" in line
    line = _error_line("bench", missing, "--input-shape", "1000000,3,1024,1024")
    assert "would take 11718.8 GiB" in line


def test_memory_share_and_largest_batch(monkeypatch):
    from pcompiler import input_checks
    from pcompiler.errors import CompileError

    monkeypatch.setattr(input_checks, "available_memory", lambda: 8 * 1024**3)  # 8 GiB: inputs may take 4
    input_checks.check_input_memory([(256, 3, 224, 224)])  # 147 MiB
    input_checks.check_input_memory([(1, 3, 1024, 1024)], largest_batch=256)  # 3 GiB
    with pytest.raises(CompileError, match=r"--batches batch 512 of inputs 1,3,1024,1024 would take 6.0 GiB, "
                                           r"more than 50% of the 8.0 GiB .*at most 341"):
        input_checks.check_input_memory([(1, 3, 1024, 1024)], largest_batch=512, option="--batches")
    with pytest.raises(CompileError, match="even one sample does not fit"):
        input_checks.check_input_memory([(1, 3, 40000, 40000)])
    monkeypatch.setattr(input_checks, "available_memory", lambda: None)  # unknown: no refusal
    input_checks.check_input_memory([(10**9, 3, 1024, 1024)])


def test_available_memory_reads_meminfo(tmp_path):
    from pcompiler.input_checks import _meminfo_available, available_memory

    (tmp_path / "meminfo").write_text("MemTotal:  16000000 kB\nMemFree: 100 kB\nMemAvailable:  2000000 kB\n")
    assert _meminfo_available(tmp_path / "meminfo") == 2_000_000 * 1024
    assert _meminfo_available(tmp_path / "missing") is None
    assert available_memory() > 0


def test_bench_batches_too_large_fail_their_row_before_allocating(monkeypatch):
    from pcompiler import input_checks
    from pcompiler.errors import CompileError
    from pcompiler.targets.bench import make_inputs

    monkeypatch.setattr(input_checks, "available_memory", lambda: 1024**3)
    assert make_inputs([torch.zeros(1, 3, 32, 32)], 8)[0].shape == (8, 3, 32, 32)
    with pytest.raises(CompileError, match="bench: batch 100000 of inputs 1,3,256,256"):
        make_inputs([torch.zeros(1, 3, 256, 256)], 100000)


# ---------------------------------------------------------------------------------------------
# 4. an output folder that holds another run's files


def test_second_run_into_the_same_folder_is_refused_then_overwrites(tmp_path):
    torch.save(_cnn(), tmp_path / "m.pt")
    out = tmp_path / "out"
    args = (tmp_path / "m.pt", "--method", "l1", "--ratio", "0.5", "--formats", "pt2", "--input-shape", "1,3,8,8",
            "-o", out)
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "report.json").read_text()
    line = _error_line(*args)
    assert line.startswith(f"error: output folder '{out}' holds another run's files (report.json, report.md, model.pt2")
    assert "choose an empty folder, or pass --overwrite to replace them" in line
    assert (out / "report.json").read_text() == before
    result = CliRunner().invoke(main, [str(a) for a in (*args[:-4], "--formats", "pt", "-o", out, "--overwrite")])
    assert result.exit_code == 0, result.output
    assert not (out / "model.pt2").exists() and (out / "model.pt").exists()  # the old run's export is gone
    assert (out / "notes.txt").read_text() == "mine"


def test_an_export_that_dies_while_writing_leaves_no_half_file(tmp_path, monkeypatch):
    torch.save(_cnn(), tmp_path / "m.pt")
    out = tmp_path / "out"

    def write_half_then_die(exported, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half an archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.export, "save", write_half_then_die)
    result = CliRunner().invoke(main, [str(a) for a in (tmp_path / "m.pt", "--method", "l1", "--ratio", "0.5",
                                                        "--formats", "pt2", "--input-shape", "1,3,8,8", "-o", out)])
    assert result.exit_code == 4, result.output  # a failed export is a row of the report, and exit 4
    assert "No space left on device" in (out / "report.json").read_text()
    assert not (out / "model.pt2").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
