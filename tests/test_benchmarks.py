"""benchmarks/bench.py in quick mode: it runs every case, and a case whose npsd output disagrees with
the torch reference makes it fail (a benchmark of two different computations would mean nothing).
And benchmarks/float64_reference.py on the tiny models."""

import contextlib
import math
import os
import re
import sys

import numpy as np
import pytest

from benchmarks import bench
from npsd import blas, nn, settings


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
                 "CLIP", "txt2img", "image: 64x64, DPM++ 2M Karras", "image: 64x64, LCM-LoRA",
                 "image: 64x64, SD-Turbo"):
        assert word in names, (word, names)
    # 2 convs, 2 attentions, GroupNorm, softmax, 2 UNet, 2 VAE, CLIP, txt2img, and 5 time-to-image rows:
    # DPM++ 2M Karras, LCM-LoRA and SD-Turbo, the last two also with TAESD
    assert len(table) == 17
    assert sorted(name for name in table if name.endswith(", TAESD")) == [
        "image: 64x64, LCM-LoRA, 4 steps, guidance 1, TAESD", "image: 64x64, SD-Turbo, 1 step, no guidance, TAESD"]
    for name, (ratio, diff) in table.items():
        assert math.isfinite(ratio) and ratio > 0, name
    assert re.search(r"sgemm rate used for the FLOP bound: \d+ GFLOP/s", md.read_text())
    assert re.search(r"sgemm 4096\^3: numpy \d+ GFLOP/s \(\d+ threads busy\), torch \d+ GFLOP/s \(\d+ threads "
                     r"busy\)", capsys.readouterr().out)


def test_only_selects_the_image_rows_by_their_word(monkeypatch, capsys):
    """--only image selects exactly the five time-to-image rows; the older model words select none of
    them (each case is recorded instead of run)."""
    skip_sgemm_rate(monkeypatch)

    def selected(word):
        ran = []

        def record(case, repeat):
            ran.append(case.name)
            return bench.Result(case, [1.0], [1.0], rel_err=0.0)
        monkeypatch.setattr(bench, "run_case", record)
        assert bench.main(["--quick", "--only", word]) == 0
        return ran

    image = selected("image")
    assert len(image) == 5 and all(name.startswith("image: ") for name in image), image
    for word in ("unet", "vae", "clip", "txt2img", "encode", "decode", "text"):
        ran = selected(word)
        assert ran and not any(name.startswith("image: ") for name in ran), (word, ran)
    assert selected("turbo") == [name for name in image if "SD-Turbo" in name]


def test_only_words_select_model_rows_by_any_part_of_their_names(monkeypatch, capsys):
    """A word that is part of a model row's name but names no model ("8x8 latents") selects that row
    (the models are built for it); a word that matches no row is refused before anything runs."""
    skip_sgemm_rate(monkeypatch)
    ran = []

    def record(case, repeat):
        ran.append(case.name)
        return bench.Result(case, [1.0], [1.0], rel_err=0.0)
    monkeypatch.setattr(bench, "run_case", record)
    assert bench.main(["--quick", "--only", "8x8 latents", "softmax"]) == 0
    assert len(ran) == 2 and ran[0].startswith("softmax") and ran[1] == "UNet step, batch 2, 8x8 latents", ran
    ran.clear()
    assert bench.main(["--quick", "--only", "softmax", "no such case"]) == 2
    assert ran == []
    err = capsys.readouterr().err
    assert "no case's name contains 'no such case'" in err and "UNet step, batch 2, 8x8 latents" in err


def skip_sgemm_rate(monkeypatch):
    """The 4096^3 products that measure the sgemm rate take 6-15 s; test_quick_mode checks that line."""
    monkeypatch.setattr(bench, "sgemm_rate", lambda torch: {"numpy": (1e11, None), "torch": (1e11, None)})


@contextlib.contextmanager
def threads_restored():
    """torch's, numpy's BLAS and npsd's thread counts as they were before the block, after it."""
    import torch
    before = (torch.get_num_threads(), blas.get_threads(), settings.THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if before[1]:
            blas.set_threads(before[1])
        settings.set_threads(before[2])


def test_a_short_case_gets_calls_for_its_minimum_time():
    """--repeat is the least count of timed calls: a case whose first calls were short gets as many as
    make bench.MIN_SECONDS a side (at most MAX_CALLS), a case run once stays at one, and run_case makes
    that many calls of each side after the first."""
    assert bench.timed_calls(3, 0.2) == math.ceil(bench.MIN_SECONDS / 0.2)
    assert bench.timed_calls(3, 60.0) == 3 and bench.timed_calls(7, 0.9 * bench.MIN_SECONDS / 5) == 7
    assert bench.timed_calls(3, 1e-5) == bench.MAX_CALLS and bench.timed_calls(1, 1e-5) == 1
    calls = {"npsd": 0, "torch": 0}

    def side(name):
        def call():
            calls[name] += 1
            return np.ones(4, np.float32)
        return call
    r = bench.run_case(bench.Case("ones", side("npsd"), side("torch"), 1e-6), 3)
    assert calls == {"npsd": 1 + bench.MAX_CALLS, "torch": 1 + bench.MAX_CALLS}
    assert len(r.npsd_times) == len(r.torch_times) == bench.MAX_CALLS and r.rel_err == 0


def test_disagreeing_output_fails(monkeypatch, capsys):
    skip_sgemm_rate(monkeypatch)
    monkeypatch.setattr(nn, "group_norm", lambda x, *a, **k: x)          # a broken kernel
    assert bench.main(["--quick", "--repeat", "1", "--only", "group_norm"]) == 1
    assert "group_norm" in capsys.readouterr().err


def test_header_names_the_libraries_and_threads(capsys, monkeypatch):
    """The header says what each side computes with (BLAS, CPU capability, malloc's settings), and
    --threads sets both sides' threads."""
    skip_sgemm_rate(monkeypatch)
    with threads_restored():
        assert bench.main(["--quick", "--repeat", "1", "--only", "softmax", "--threads", "1"]) == 0
        header = capsys.readouterr().out.splitlines()[:2]                 # printed first
        assert "(1 threads), npsd kernels: fast (1 threads)" in header[0], header
        assert re.match(r"numpy BLAS: \S+ [\d.]+, kernel \S+; torch BLAS: \w+.*, CPU capability \w+; malloc \(both "
                        r"sides\): (npsd/malloc.py settings, npsd.Pipeline holding the heap in its model calls and "
                        r"generations|as the system has it)$", header[1]), header
    assert bench.main(["--quick", "--threads", "0"]) == 2


def test_several_thread_counts_run_every_case_at_each(capsys, monkeypatch):
    """--threads 1 2 runs each case at 1 and then 2 threads, both sides set before each case's calls,
    and the table gets a threads column and each side's speed-up over its first count."""
    import torch
    skip_sgemm_rate(monkeypatch)
    seen, run_case = [], bench.run_case

    def recorded(case, repeat):
        seen.append((case.name.split(",")[0], torch.get_num_threads(), settings.THREADS, blas.get_threads()))
        return run_case(case, repeat)
    monkeypatch.setattr(bench, "run_case", recorded)
    with threads_restored():
        assert bench.main(["--quick", "--repeat", "1", "--only", "softmax", "group_norm", "--threads", "1", "2"]) == 0
    blas_ok = blas.available()
    assert [(name, t, n) + ((b,) if blas_ok else ()) for name, t, n, b in seen] == [
        (name, k, k) + ((k,) if blas_ok else ()) for name in ("group_norm", "softmax") for k in (1, 2)]
    out = capsys.readouterr().out
    assert "threads 1, 2 on both sides" in out.splitlines()[0]
    assert "| case | threads | npsd | torch | npsd / torch | npsd speed-up | torch speed-up |" in out
    rows = [line for line in out.splitlines() if line.startswith("| softmax")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "2"] and "| 1.00x | 1.00x |" in rows[0], rows


@pytest.mark.skipif(not sys.platform.startswith("linux") or not blas.available() or settings.usable_cpus() < 2,
                    reason="counts threads in Linux's /proc; needs OpenBLAS and 2 cores")
def test_sgemm_rate_counts_the_threads_that_computed():
    """The count comes from the kernel's per-thread CPU times, not from what the library was told."""
    import torch
    with threads_restored():
        for n in (1, 2):
            torch.set_num_threads(n)
            blas.set_threads(n)
            rates = bench.sgemm_rate(torch, 2048)
            assert {name: busy for name, (_, busy) in rates.items()} == {"numpy": n, "torch": n}, (n, rates)


def test_a_thread_count_that_did_not_take_is_reported(capsys, monkeypatch, tmp_path):
    """A library that computed on other threads than it was given (as when npsd limited SciPy's copy of
    OpenBLAS instead of numpy's) is named on stderr and in the saved table."""
    monkeypatch.setattr(bench, "sgemm_rate", lambda torch: {"numpy": (1e11, 16), "torch": (1e11, 1)})
    with threads_restored():
        assert bench.main(["--quick", "--repeat", "1", "--only", "softmax", "--threads", "1",
                           "--markdown", str(tmp_path / "t.md")]) == 0
    message = "numpy's 4096^3 product computed on 16 threads where 1 were set"
    assert message in capsys.readouterr().err
    assert message in (tmp_path / "t.md").read_text()
    assert "torch's" not in (tmp_path / "t.md").read_text()


def test_flop_count_is_the_same_on_both_paths():
    """The FLOP column counts a VAE decode and encode whole on the fast path, whose blocks call the fast
    convolutions directly, as on the plain path, where every layer goes through nn (counted before:
    43 of 2,514 GFLOP for the 512x512 decode)."""
    import numpy as np
    from npsd import architecture, vae
    from npsd.config import sd15_config
    from npsd.params import unflatten
    config = sd15_config()
    design = architecture.VAEDesign(block_out_channels=(32, 64), layers_per_block=1)
    config["vae"].update(norm_groups=8)
    params = unflatten(architecture.random_params(architecture.vae_shapes(design), np.random.default_rng(0)))
    z = np.random.default_rng(1).standard_normal((1, 4, 16, 16), dtype=np.float32)
    img = np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    counts = {}
    for path in (True, False):
        with nn.fast(path):
            with bench.FlopCounter() as decode:
                vae.decode(params, z, config["vae"])
            with bench.FlopCounter() as encode:
                vae.encode(params, img, config["vae"])
        counts[path] = (decode.flops, encode.flops)
    assert counts[True] == counts[False]
    assert min(counts[True]) > 1e8                               # 32x32 maps, 32-64 channels: ~0.1-1 GFLOP



def test_flop_count_of_the_text_encoder():
    """The FLOP column counts every product of CLIP's layers, the q, k and v that nn.linears computes
    together included: bench.CLIP_QUICK on 2x77 tokens counts 2 x (per layer: four W x W products and
    two W x 4W on 154 rows, and attention's Q K^T and P V) exactly; without the three projections
    it would count 2 x 3 x 154 x W^2 per layer fewer."""
    import torch
    import npsd
    models, params, config = bench.build_models(torch, quick=True)
    pipe = npsd.Pipeline(params, config)
    ids = np.array(pipe.tokenize(["a photograph of an astronaut riding a horse", ""]))
    with bench.FlopCounter() as count:
        pipe.encode_text(ids)
    w, layers, rows = bench.CLIP_QUICK["hidden_size"], bench.CLIP_QUICK["num_hidden_layers"], 2 * 77
    per_layer = rows * w * w * 4 + rows * w * 4 * w * 2 + 2 * 2 * 77 * 77 * w
    assert count.flops == 2 * layers * per_layer, (count.flops, 2 * layers * per_layer)


def test_float64_reference_on_the_tiny_models(monkeypatch):
    """benchmarks/float64_reference.py, on the tiny models: every UNet block but the time embedding and
    both VAE outputs are listed, and npsd and PyTorch are each within 5e-6 of the float64 run
    (measured: npsd at most 1.0e-6, PyTorch 1.6e-6). The ResBlocks' GroupNorm eps at 1e-4 instead of
    1e-5 in npsd (a small real bug) measured 6.5e-4 against float64 and fails that bound."""
    from benchmarks import float64_reference
    from tests import test_unet
    rows = {name: errors for name, *errors in float64_reference.measure(tiny=True)}
    unet_blocks = ["conv_in", *(f"down_blocks.{i}" for i in range(4)), "mid_block",
                   *(f"up_blocks.{i}" for i in range(4)), "eps"]
    assert list(rows) == [f"UNet {b}" for b in unet_blocks] + ["VAE posterior mean", "VAE decode"]
    for name, (torch_err, npsd_err, _) in rows.items():
        assert 0 < npsd_err < 5e-6 and 0 < torch_err < 5e-6, (name, torch_err, npsd_err)
    monkeypatch.setattr(test_unet, "TINY_SD_CONFIG", {**test_unet.TINY_SD_CONFIG, "resnet_eps": 1e-4})
    worst = max(float64_reference.relative(ours, t64) for _, _, ours, t64 in float64_reference.unet_rows(tiny=True))
    assert worst > 5e-6, worst                                            # measured 6.5e-4


# --- benchmarks/profile.py ---------------------------------------------------------------------

def profile_tables(text):
    """{case: {side: {row: (calls or None, seconds, share)}}} from benchmarks/profile.py's tables."""
    unit = {"ms": 1e-3, "s": 1.0}
    out, case, side = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            case = line[4:]
            out[case] = {}
        elif line.startswith("| npsd:") or line.startswith("| torch:"):
            side = line[2:line.index(":")]
            out[case][side] = {}
        elif line.startswith("| ") and case and side and not line.startswith("|---"):
            name, calls, t, share = (c.strip() for c in line.strip("|").split("|"))
            value, u = t.split()
            out[case][side][name] = (float(calls) if calls else None, float(value) * unit[u], float(share[:-1]))
    return out


def test_profile_charges_each_call_once(tmp_path):
    """Every layer function's call is charged once, to the outermost call: the linear row counts the
    UNet's own linear layers, not GEGLU's projection or proj_in's inside other rows."""
    from benchmarks import profile
    md = tmp_path / "profile.md"
    assert profile.main(["--quick", "--only", "8x8 latents", "CLIP", "--markdown", str(md)]) == 0
    tables = profile_tables(md.read_text())
    assert sorted(tables) == ["CLIP text encoder, 2x77 tokens", "UNet step, batch 2, 8x8 latents"]
    unet = tables["UNet step, batch 2, 8x8 latents"]
    rows = unet["npsd"]
    print({row: v[:2] for row, v in rows.items()})
    # bench.UNET_QUICK: 4 transformer blocks (its cross-attention down block's 1 layer and up block's
    # 2 at 8x8, the mid block's at 4x4), each with a GEGLU, 4 linear layers (attn2's q, out twice,
    # ff.net.2) and 2 nn.linears calls (attn1's q, k, v; attn2's k, v); 8 resnets (1 + 1 down, 2 in
    # the mid block, 2 + 2 up) with a time_emb_proj; and the time embedding's 2: 26 linear layers.
    # Charging GEGLU's projection or proj_in's would give 30 or 34.
    assert rows["linear"][0] == 4 * 4 + 8 + 2 and rows["linears (attention's q, k, v)"][0] == 4 * 2
    assert rows["geglu"][0] == 4 and rows["linear_or_conv1x1"][0] == 4
    assert rows["attention, 64 queries x 77 keys"][0] == 3 and rows["attention, 16 queries x 77 keys"][0] == 1
    assert {"conv2d 3x3, 8x8 input", "conv2d 3x3, 4x4 input", "conv2d 3x3, stride 2, 8x8 input"} <= set(rows)
    assert rows["outside these functions"][1] >= 0
    assert any(row.startswith("aten::") for row in unet["torch"]) and "outside the operators" in unet["torch"]
    assert "quick_gelu" in tables["CLIP text encoder, 2x77 tokens"]["npsd"]       # CLIP's ACTIVATIONS table


def test_profile_finds_a_slow_layer(monkeypatch, tmp_path):
    """A GroupNorm made 5 ms slower per call tops npsd's table with at least that time per call."""
    import time
    from benchmarks import profile
    norm = nn.group_norm

    def slow_group_norm(*args, **kwargs):
        time.sleep(0.005)
        return norm(*args, **kwargs)
    monkeypatch.setattr(nn, "group_norm", slow_group_norm)
    md = tmp_path / "profile.md"
    assert profile.main(["--quick", "--only", "8x8 latents", "--markdown", str(md)]) == 0
    rows = profile_tables(md.read_text())["UNet step, batch 2, 8x8 latents"]["npsd"]
    first, (calls, seconds, _) = next(iter(rows.items()))
    assert first == "group_norm" and seconds >= calls * 0.005, rows


def test_the_header_counts_cpus_and_threads_per_core():
    """npsd's default thread count counts logical CPUs and PyTorch's counts cores, so the header says
    both how many CPUs there are and how many hardware threads share a core."""
    assert [bench.cpu_list_size(t) for t in ("0", "0,8", "0-3,8-11\n", "5-5")] == [1, 2, 8, 1]
    assert re.search(rf", {os.cpu_count()} CPUs( \(\d+ per core\))?", bench.machine())
