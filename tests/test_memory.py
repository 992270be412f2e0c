"""Memory that scales (pcompiler/memory.py and the places that keep weights in memory once): a
memory-mapped checkpoint's pages are given back and read again when touched, written pages are
kept; slim's copy and verify's reference share the weights they do not change; and a 200M
parameter bfloat16 folder pruned through the CLI peaks at less than a second copy of it above a
tiny folder's run (in subprocesses: peak resident memory is per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcompiler
from pcompiler.memory import page_out
from pcompiler.passes.verify import zeroed_reference
from pcompiler.passmanager import make_pass

linux = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")


def resident(kind: str) -> int:
    """This process's RssFile / RssAnon / VmHWM in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(kind)


@linux
def test_pages_of_a_mapped_file_are_given_back_and_written_ones_kept(tmp_path):
    path = tmp_path / "weights.bin"
    n = 64 * 2**20
    path.write_bytes(os.urandom(1024) * (n // 1024))
    want = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    t = torch.from_file(str(path), shared=False, size=n, dtype=torch.uint8)  # a private mapping of the file
    assert torch.equal(t, want)  # every page read
    t[:4096] = 7  # one page written (copy-on-write: no longer the file's)
    before = resident("RssFile")
    assert page_out(t) >= n - 2 * 4096
    assert before - resident("RssFile") > n // 2  # the clean pages went back
    assert torch.equal(t[4096:], want[4096:])  # and are read from the file again
    assert bool((t[:4096] == 7).all())  # the written page is kept
    assert page_out(torch.ones(1000)) == 0  # anonymous memory: nothing to give back


def test_slim_and_verify_keep_the_weights_once():
    """The slim copy holds the reference's tensors wherever slim did not cut them, and verify's
    zeroed reference holds them all (it zeroes copies as it reads them)."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (2, 8))
    prog = pcompiler.run(pcompiler.trace(model, (), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
                         [make_pass("analyze"), make_pass("l1", ratio=0.5, round_to=1, skip=("model.layers.0.mlp.*",)),
                          make_pass("slim")])  # the skip keeps the stream (and so layer 0's MLP) whole
    ref = dict(prog.reference.named_parameters())
    slim = dict(prog.gm.named_parameters())
    cut = {name for name, _ in prog.removal.params}
    assert cut and set(ref) - cut  # some cut, some kept
    assert all(slim[n] is ref[n] for n in set(ref) - cut)
    assert all(slim[n] is not ref[n] and slim[n].numel() < ref[n].numel() for n in cut)
    reference = zeroed_reference(prog)
    assert all(t is ref[n] for n, t in reference.gm.named_parameters())
    assert {id(t) for t, _ in reference.zeros.values()} <= {id(t) for t in ref.values()}


# The CLI in a process that prints its peak resident memory (VmHWM) as it exits.
_RUN = """
import atexit, sys, types
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
atexit.register(lambda: print("PEAK", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]))
from pcompiler.cli import main
main()
"""


def _folder(path: Path, hidden: int, layers: int, ffn: int, vocab: int) -> int:
    """A LLaMA folder of random bfloat16 weights written by save_pretrained; its size in bytes."""
    T = pytest.importorskip("transformers")
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16,
                           num_key_value_heads=4, intermediate_size=ffn, max_position_embeddings=128)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _peak(folder: Path, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", _RUN, str(folder), "--method", "l1", "--ratio", "0.2", "--formats", "hf",
                           "-o", str(out), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["exports"][0]["ok"]
    return int(proc.stdout.split("PEAK")[-1].split()[0]) * 1024


@linux
def test_a_200m_parameter_folder_prunes_without_a_second_copy(tmp_path):
    size = _folder(tmp_path / "big", hidden=1024, layers=12, ffn=2816, vocab=32000)  # 200M parameters, 0.4 GB
    _folder(tmp_path / "tiny", hidden=64, layers=2, ffn=128, vocab=512)
    big, tiny = _peak(tmp_path / "big", tmp_path / "o_big"), _peak(tmp_path / "tiny", tmp_path / "o_tiny")
    # What the model's size adds, measured 2.07x: its pages as they are read (1x), the slim model
    # (0.7x at ratio 0.2), verify's float32 copy of one module, where the embeddings and lm_head
    # are 65% of this model. A full copy of the weights anywhere adds 1x more: 3.07x.
    assert big - tiny < 2.6 * size, f"peak {big / 2**30:.2f} GiB, tiny {tiny / 2**30:.2f} GiB, checkpoint {size / 2**30:.2f} GiB"
