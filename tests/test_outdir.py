"""pcompiler.outdir: claiming OUT for one run, and writing files into it whole or not at all."""

import json

import pytest
import torch

from pcompiler.errors import CompileError
from pcompiler.outdir import RUN_RECORD, atomic_files, atomic_write, claim_out_dir, run_files


def _run_leftovers(out):
    """What a finished run leaves, plus a file of the user's."""
    (out / "plots").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    for name in ("report.json", "report.md", "model.pt2", "plots/widths.png", "checkpoints/finetune.pt"):
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    (out / "plots" / "my_figure.png").write_text("mine")


def test_claim_creates_a_missing_folder_and_records_the_run(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"weights")
    out = claim_out_dir(tmp_path / "a" / "out", model=tmp_path / "m.pt", settings={"ratio": 0.5})
    record = json.loads((out / RUN_RECORD).read_text())
    assert out.is_dir() and record["model_bytes"] == 7 and record["ratio"] == 0.5
    assert run_files(out) == []  # the record alone is no reason to refuse the next run
    claim_out_dir(out, settings={"ratio": 0.3})


def test_unrelated_files_are_no_reason_to_refuse(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "my_figure.png").write_text("mine")
    claim_out_dir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_another_runs_files_are_refused_by_name(tmp_path):
    _run_leftovers(tmp_path)
    with pytest.raises(CompileError) as info:
        claim_out_dir(tmp_path)
    text = str(info.value)
    assert f"output folder '{tmp_path}' holds another run's files (report.json, report.md, model.pt2, " in text
    assert "--overwrite" in text and "--resume" in text and info.value.exit_code == 2
    assert (tmp_path / "report.json").read_text() == "old"  # nothing removed


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    _run_leftovers(tmp_path)
    (tmp_path / ".model.pt.0123abcd.tmp.pt").write_text("half")  # a killed write's temporary file
    claim_out_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [RUN_RECORD, "my_figure.png", "notes.txt", "plots"]


def test_resume_continues_the_same_run_and_refuses_another(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"weights")
    (tmp_path / "other.pt").write_bytes(b"other weights")
    out = tmp_path / "out"
    claim_out_dir(out, model=tmp_path / "m.pt", settings={"ratio": 0.5, "shapes": (1, 3)})
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "regularization.pt").write_text("step 10")
    (out / "checkpoints" / ".regularization.pt.0123abcd.tmp.pt").write_text("half")
    claim_out_dir(out, resume=True, model=tmp_path / "m.pt", settings={"ratio": 0.5, "shapes": (1, 3)})
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["regularization.pt"]
    with pytest.raises(CompileError, match=r"another model or settings \(ratio 0.5 -> 0.3\)"):
        claim_out_dir(out, resume=True, model=tmp_path / "m.pt", settings={"ratio": 0.3, "shapes": (1, 3)})
    with pytest.raises(CompileError, match=r"model .*m.pt -> .*other.pt \(another file\)"):
        claim_out_dir(out, resume=True, model=tmp_path / "other.pt", settings={"ratio": 0.5})
    with pytest.raises(CompileError, match="--overwrite deletes it"):
        claim_out_dir(out, resume=True, overwrite=True)


def test_claim_refuses_a_file_and_skips_other_ranks(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CompileError, match="is a file"):
        claim_out_dir(tmp_path / "f")
    _run_leftovers(tmp_path / "out")
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 writes (and claims) OUT
    claim_out_dir(tmp_path / "out")


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    with atomic_write(path) as tmp:
        torch.save({"w": torch.ones(3)}, tmp)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))

    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):  # a run killed half way through the write
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as tmp:
        torch.save({"w": torch.zeros(3)}, tmp)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))  # the old file, intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_atomic_files_moves_companions_in_and_cleans_up(tmp_path):
    path = tmp_path / "model.onnx"
    with atomic_files(path) as tmp:
        tmp.write_text("graph")
        tmp.with_name("model.onnx.data").write_text("weights")
    assert path.read_text() == "graph" and (tmp_path / "model.onnx.data").read_text() == "weights"
    with pytest.raises(RuntimeError), atomic_files(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("exporter failed")
    assert path.read_text() == "graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
