"""benchmarks/bench.py in quick mode: it runs every case, and a case whose npsd output disagrees with
the torch reference makes it fail (a benchmark of two different computations would mean nothing)."""

import math
import re

from benchmarks import bench
from npsd import nn


def rows(text):
    """{case: (ratio, output diff)} from the markdown table."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[3].startswith("**"):
            out[cells[0]] = (float(cells[3].strip("*")), float(cells[7].split()[0]))
    return out


def test_quick_mode(tmp_path, capsys):
    md = tmp_path / "table.md"
    assert bench.main(["--quick", "--repeat", "1", "--markdown", str(md)]) == 0
    table = rows(md.read_text())
    names = " ".join(table)
    for word in ("conv2d 3x3", "self-attention", "group_norm", "softmax", "UNet step", "VAE decode", "VAE encode",
                 "CLIP", "txt2img"):
        assert word in names, (word, names)
    assert len(table) == 12                       # 2 convs, 2 attentions, GroupNorm, softmax, 2 UNet, 2 VAE, CLIP, txt2img
    for name, (ratio, diff) in table.items():
        assert math.isfinite(ratio) and ratio > 0, name
    assert re.search(r"sgemm rate used for the FLOP bound: \d+ GFLOP/s", md.read_text())


def test_disagreeing_output_fails(monkeypatch, capsys):
    monkeypatch.setattr(nn, "group_norm", lambda x, *a, **k: x)          # a broken kernel
    assert bench.main(["--quick", "--repeat", "1", "--only", "group_norm"]) == 1
    assert "group_norm" in capsys.readouterr().err


def test_header_names_the_libraries_and_threads(capsys, monkeypatch):
    """The header says what each side computes with, and --threads sets both sides' threads."""
    import torch
    from npsd import blas, settings
    monkeypatch.setattr(settings, "THREADS", settings.THREADS)              # restored after the test
    before = (torch.get_num_threads(), blas.get_threads())
    try:
        assert bench.main(["--quick", "--repeat", "1", "--only", "softmax", "--threads", "1"]) == 0
        header = capsys.readouterr().out.splitlines()[:2]                 # printed first
        assert "(1 threads), npsd kernels: fast (1 threads)" in header[0], header
        assert re.match(r"numpy BLAS: \S+ [\d.]+, kernel \S+; torch BLAS: \w+.*, CPU capability \w+", header[1]), header
    finally:
        torch.set_num_threads(before[0])
        if before[1]:
            blas.set_threads(before[1])
    assert bench.main(["--quick", "--threads", "0"]) == 2
