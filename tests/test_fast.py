"""The fast path (npsd/fast.py) against the plain reference path of npsd/nn.py and npsd/vae.py.

Both paths stay, selected by one setting, and the fast path is tested against the plain one, which
the docs explain. The parity tests against PyTorch run with the fast path (the default); this file
checks that every fast kernel computes what the plain one computes, on shapes that reach every
branch: Winograd and im2col convolutions, odd sizes, strides, asymmetric padding, bands forced by a
small chunk budget, causal and cross attention, several thread counts; then the VAE's fast blocks,
and whole generations with the built-in model on both paths.

Tolerance 1e-5 relative (max |fast - plain| / max |plain|), the per-layer float32 figure: the fast
kernels sum in a different order (Winograd's transforms, blocked reductions). Measured at SD shapes:
<= 2e-6 (attention over 1024 tokens 1.8e-6, 3x3 conv 7e-7); the fast GELU (erfc by Abramowitz &
Stegun 7.1.26) 3e-8.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

import npsd
from npsd import blas, fast, nn, settings, vae
from npsd.testing import assert_close

RTOL = 1e-5
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def both(f):
    """(plain result, fast result) of f()."""
    with nn.fast(False):
        plain = f()
    with nn.fast(True):
        quick = f()
    return plain, quick


def check(f, what, rtol=RTOL):
    plain, quick = both(f)
    assert quick.shape == plain.shape and quick.dtype == np.float32, what
    return assert_close(quick, plain, rtol, what)


CONV_ROUTES = ["winograd", "small map", "im2col"]


def route_every_conv(monkeypatch, route):
    """Every 3x3 stride-1 conv through Winograd in bands ("winograd": its lines at 1 position, 1
    channel), as a small map (fast.winograd_small_map; the VAE's row-source convs then take im2col),
    or through im2col."""
    monkeypatch.setattr(fast, "WINOGRAD", route != "im2col")
    monkeypatch.setattr(fast, "WINOGRAD_MIN_POSITIONS", 1 if route == "winograd" else np.inf)
    monkeypatch.setattr(fast, "WINOGRAD_SMALL_MAP_POSITIONS", 1)
    monkeypatch.setattr(fast, "WINOGRAD_MIN_CHANNELS", 1)


@pytest.fixture(params=CONV_ROUTES)
def conv_route(request, monkeypatch):
    route_every_conv(monkeypatch, request.param)
    return request.param


@pytest.fixture(params=["exp2", "exp"])
def exp_base(request, monkeypatch):
    """The fast kernels' exponentials as 2^x (the AVX-512 choice) or as e^x (elsewhere), whichever
    this machine's NumPy makes the default (fast.EXP2)."""
    monkeypatch.setattr(fast, "EXP2", request.param == "exp2")
    return request.param


CONV_CASES = [
    # x shape, out channels, kernel, stride, padding
    ((2, 8, 16, 16), 12, 3, 1, 1),
    ((1, 5, 9, 7), 6, 3, 1, 1),             # odd sizes: Winograd's last tile row/column is cropped
    ((2, 3, 1, 1), 4, 3, 1, 1),             # a single pixel
    ((1, 4, 10, 12), 4, 3, 1, 0),           # no padding
    ((1, 4, 10, 11), 4, 3, 1, (0, 1, 0, 1)),  # asymmetric padding, stride 1
    ((2, 6, 13, 11), 5, 3, 2, 1),           # stride 2 (im2col)
    ((1, 6, 12, 12), 5, 3, 2, (0, 1, 0, 1)),  # the VAE's downsampler
    ((2, 7, 5, 6), 3, 1, 1, 0),             # 1x1
    ((1, 2, 8, 8), 3, 5, 1, 2),             # another kernel size (im2col)
]


@pytest.mark.parametrize("xs, cout, k, stride, pad", CONV_CASES)
def test_conv2d(conv_route, xs, cout, k, stride, pad):
    x, w, b = randn(*xs), randn(cout, xs[1], k, k, scale=0.3), randn(cout)
    check(lambda: nn.conv2d(x, w, b, stride=stride, padding=pad), f"conv2d {xs} k{k} s{stride} p{pad} ({conv_route})")


@pytest.mark.parametrize("budget", [4096, 50_000])
def test_conv2d_in_bands(conv_route, budget):
    """A small chunk budget splits both the im2col matrix and Winograd's tile rows into bands."""
    x, w, b = randn(2, 16, 23, 19), randn(24, 16, 3, 3, scale=0.1), randn(24)
    with nn.chunk_bytes(budget):
        check(lambda: nn.conv2d(x, w, b, padding=1), f"conv2d in bands of {budget} bytes ({conv_route})")


def test_conv2d_several_images_per_band(monkeypatch):
    """Where whole images fit in the chunk budget and their columns are no larger than the weights,
    im2col builds several images' columns for one product: three 4x4 images of 16 channels (9,216
    bytes of columns each) and 96 output channels (55,296 bytes of weights), a budget of 20,000
    bytes that fits two, so bands of two images and one. A band that mixed up images or channels fails."""
    monkeypatch.setattr(fast, "WINOGRAD", False)
    x, w, b = randn(3, 16, 4, 4), randn(96, 16, 3, 3, scale=0.1), randn(96)
    with nn.chunk_bytes(20000):
        check(lambda: nn.conv2d(x, w, b, padding=1), "conv2d of 3 images, 2 per band")


@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_bands_of_one_image(monkeypatch, stride):
    """One image's im2col columns are built fast.IM2COL_BAND_BYTES at a time, however large the chunk
    budget: a 64x64 map of 16 channels, whose columns take 2.4 MB at stride 1, with bands of 64 KiB
    peaks at 0.46 MB of NumPy's memory (0.37 MB at stride 2; 2.9 and 0.94 MB with the columns whole),
    and a band that mixed up rows fails the comparison with the plain conv."""
    import tracemalloc
    monkeypatch.setattr(fast, "WINOGRAD", False)
    monkeypatch.setattr(fast, "IM2COL_BAND_BYTES", 2**16)
    x, w, b = randn(1, 16, 64, 64), randn(8, 16, 3, 3, scale=0.1), randn(8)
    check(lambda: nn.conv2d(x, w, b, stride=stride, padding=1), f"conv2d stride {stride} in bands of 64 KiB")
    tracemalloc.start()
    try:
        nn.conv2d(x, w, b, stride=stride, padding=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the padded input (0.28 MB), the output (<= 0.13 MB) and one band (<= 64 KiB) beside small ones
    assert peak < 1.3e6 / stride, f"peak {peak} bytes: the columns were not built in bands"


def test_choices_by_cpu_vendor(tmp_path):
    """Winograd in bands from 1024 output positions, as a small map from 512, and attention blocks of
    2^19 scores on AMD and Intel (where they were measured), 2048 (no small maps) and 2^18 elsewhere;
    the vendor is read from /proc/cpuinfo's vendor_id, and an unreadable file means 'elsewhere'."""
    assert fast.winograd_min_positions("AuthenticAMD") == fast.winograd_min_positions("GenuineIntel") == 1024
    assert fast.winograd_min_positions("CentaurHauls") == fast.winograd_min_positions(None) == 2048
    assert fast.winograd_small_map_positions("AuthenticAMD") == fast.winograd_small_map_positions("GenuineIntel") == 512
    assert fast.winograd_small_map_positions(None) == fast.winograd_min_positions(None)
    assert fast.attention_block_elements("AuthenticAMD") == fast.attention_block_elements("GenuineIntel") == 2**19
    assert fast.attention_block_elements("CentaurHauls") == fast.attention_block_elements(None) == 2**18
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert fast.cpu_vendor(info) == "AuthenticAMD"
    assert fast.cpu_vendor(tmp_path / "missing") is None
    assert fast.VENDOR == fast.cpu_vendor()
    assert fast.WINOGRAD_MIN_POSITIONS == fast.winograd_min_positions(fast.VENDOR)
    assert fast.WINOGRAD_SMALL_MAP_POSITIONS == fast.winograd_small_map_positions(fast.VENDOR)
    assert fast.BLOCK_ELEMENTS == fast.attention_block_elements(fast.VENDOR)


def test_exp2_where_numpy_vectorises_it():
    """The kernels take 2^x where NumPy's float32 exp2 loop is one dispatched for this CPU (its
    AVX-512 loop: 2^x 2-2.6x faster than e^x there), e^x where it is the baseline loop (with AVX2
    only, 2^x took twice e^x's time) or where NumPy cannot say. Then the same in a child process whose
    NumPy has AVX-512 turned off (NPY_DISABLE_CPU_FEATURES, under NumPy's names before and since 2.4)."""
    def info(current):
        return lambda func_name: {"exp2": {"ff": {"current": current, "available": "X86_V4 baseline(X86_V2)"}}}

    def no_introspect(func_name):
        raise ImportError("numpy.lib.introspect")
    assert fast.exp2_is_vectorised(info("X86_V4")) and fast.exp2_is_vectorised(info("AVX512_SKX"))
    assert not fast.exp2_is_vectorised(info("baseline(X86_V2)"))
    assert not fast.exp2_is_vectorised(lambda func_name: {}) and not fast.exp2_is_vectorised(no_introspect)
    try:
        from numpy.lib.introspect import opt_func_info
        expected = not opt_func_info(func_name="^exp2$")["exp2"]["ff"]["current"].startswith("baseline")
    except ImportError:                                          # NumPy before 2.0 cannot say
        expected = False
    assert fast.EXP2 == expected
    assert fast.exp_unit() == (np.log2(np.e) if fast.EXP2 else 1.0)
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512F AVX512CD AVX512_SKX AVX512_ICL AVX512_SPR")
    child = subprocess.run([sys.executable, "-c", "from npsd import fast; print(fast.EXP2)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.stdout.split() == ["False"], child.stderr
    print(f"this machine: EXP2 = {fast.EXP2}; without AVX-512: False")


@pytest.mark.parametrize("b, c, side", [(1, 64, 64), (1, 64, 32), (2, 64, 32), (2, 64, 16), (1, 64, 16), (2, 64, 8),
                                        (2, 4, 64), (1, 32, 64)])
def test_winograd_is_used_at_sd_sizes_and_matches(b, c, side, monkeypatch):
    """At the default lines the SD UNet's 64x64 maps and two images at 32x32 go through Winograd in
    bands, one image at 32x32 too on AMD and Intel (1024 positions); two images at 16x16 as a small
    map there (512), through im2col elsewhere; one image at 16x16 and 8x8 maps through im2col, and so do convs
    with fewer than 64 input channels (SD's conv_in, 4) at any size (checked by counting calls)."""
    positions = b * side * side
    bands = positions >= fast.WINOGRAD_MIN_POSITIONS and c >= 64
    small_map = not bands and positions >= fast.WINOGRAD_SMALL_MAP_POSITIONS and c >= 64
    assert small_map == (fast.VENDOR in fast.MEASURED_VENDORS and (b, c, side) == (2, 64, 16))
    calls = []
    for name in ("winograd_f2x2_3x3", "winograd_small_map"):
        original = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda *a, name=name, original=original: calls.append(name) or original(*a))
    x, w = randn(b, c, side, side), randn(16, c, 3, 3, scale=1 / (3 * c**0.5))
    check(lambda: nn.conv2d(x, w, None, padding=1), f"conv2d {b}x{c}x{side}x{side}")
    assert calls == (["winograd_f2x2_3x3"] if bands else ["winograd_small_map"] if small_map else [])


@pytest.mark.parametrize("xs, cout, pad", [((2, 2560, 16, 16), 1280, 1), ((2, 24, 7, 9), 10, (0, 1, 1, 0))])
def test_winograd_small_map(xs, cout, pad, monkeypatch):
    """fast.winograd_small_map against the plain conv: the SD UNet's largest 16x16 conv (2560 -> 1280
    channels, two images; measured 5.5e-7) in its slices of transformed weights, and odd sizes whose last
    tile row and column are cropped, with slices of 3 output channels (4 slices per thread; measured
    2.4e-7). Tolerance 5e-6."""
    route_every_conv(monkeypatch, "small map")
    if xs[1] < 100:
        monkeypatch.setattr(fast, "WINOGRAD_SLICE_BYTES", 16 * xs[1] * 4 * 3)
    x, w, b = randn(*xs), randn(cout, xs[1], 3, 3, scale=1 / (3 * xs[1] ** 0.5)), randn(cout)
    err = check(lambda: nn.conv2d(x, w, b, padding=pad), f"conv2d {xs} -> {cout} as a small map", 5e-6)
    print(f"{xs} -> {cout}: {err.max_rel:.1e} (tolerance 5e-6)")


@pytest.mark.parametrize("split", [False, True])
def test_winograd_weights_are_g_g_gt(monkeypatch, split):
    """U = G g G^T, computed by the elementwise formula, equals the matrix products, also when the
    output channels are split among threads."""
    if split:
        monkeypatch.setattr(fast, "MIN_PARALLEL_BLAS", 1)
    w = randn(5, 3, 3, 3)
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
    want = np.einsum("ik,ockl,jl->ijoc", g, w.astype(np.float64), g).reshape(16, 5, 3)
    np.testing.assert_allclose(fast.winograd_weights(w), want, rtol=0, atol=1e-6)



def test_split_maps_hold_the_map_and_its_upsampling():
    """A split map (channels-last, zero border, even and odd columns apart) gives back its map, and the
    split upsampling is the 2x nearest upsampling of it; exact."""
    x = randn(5, 6, 10)
    s = fast.split_map(x)
    assert s.shape == (8, 2, 6, 5)
    np.testing.assert_array_equal(fast.split_columns(s).transpose(2, 0, 1), x)
    border = np.ones(s.shape, bool)
    border[1:-1, 1, :-1] = border[1:-1, 0, 1:] = False
    assert not s[border].any()
    up = fast.upsample_split(s)
    np.testing.assert_array_equal(fast.split_columns(up).transpose(2, 0, 1), x.repeat(2, axis=1).repeat(2, axis=2))
    border = np.ones(up.shape, bool)
    border[1:-1, 1, :-1] = border[1:-1, 0, 1:] = False
    assert not up[border].any()


@pytest.mark.parametrize("c, h, w, o, residual, band_bytes", [
    (64, 128, 128, 64, False, None),    # TAESD's 64 -> 64 conv at 128x128 (measured 5.3e-7)
    (64, 128, 128, 64, True, None),     # the same adding into a residual, then ReLU (3.5e-7)
    (4, 16, 22, 64, False, None),       # its first conv, 4 channels (1.8e-7)
    (64, 32, 48, 3, False, None),       # its last, 3 channels (3.9e-7)
    (8, 10, 6, 16, True, 1)])           # bands of one tile row shared by the threads (1.0e-7)
def test_winograd_split(c, h, w, o, residual, band_bytes, monkeypatch):
    """fast.winograd_split against the plain conv (+ residual, then ReLU); tolerance 5e-6."""
    if band_bytes:
        monkeypatch.setattr(fast, "WINOGRAD_SPLIT_BAND_BYTES", band_bytes)
        monkeypatch.setattr(fast, "MIN_PARALLEL_BLAS", 1)
    x, r = randn(1, c, h, w), randn(1, o, h, w)
    weight, bias = randn(o, c, 3, 3, scale=1 / (3 * c ** 0.5)), randn(o)
    with nn.fast(False):
        want = nn.conv2d(x, weight, bias, padding=1)
    if residual:
        want = np.maximum(want + r, 0)
    out = fast.split_map(r[0]) if residual else None
    y = fast.winograd_split(fast.split_map(x[0]), weight, bias, out=out, relu=residual)
    assert out is None or y is out
    got = fast.split_columns(y).transpose(2, 0, 1)[None]
    err = assert_close(got, want, 5e-6, f"winograd_split {c} -> {o} at {h}x{w}")
    print(f"{c} -> {o} at {h}x{w}: {err.max_rel:.1e} (tolerance 5e-6)")

@pytest.mark.parametrize("b, n, m, c, heads, causal, group, keys_first", [
    (2, 77, 77, 64, 4, True, 4, False),      # CLIP's causal self-attention: one block of 4 heads per image, Q K^T
    (2, 300, 1000, 32, 4, False, 1, True),   # several query blocks (262 queries x 1000 keys), the last one short
    (1, 600, 600, 32, 4, True, 1, True),     # causal, keys first: 436 + 164 queries
    (1, 257, 77, 48, 8, False, 4, False),    # cross-attention, two blocks of 4 heads
    (1, 64, 64, 40, 5, False, 3, False),     # blocks of 3 and 2 heads
    (2, 30, 50, 24, 3, False, 3, True),      # 3 heads in a block, keys first
    (3, 5, 9, 6, 1, False, 1, True),         # one head
])
def test_attention(monkeypatch, exp_base, b, n, m, c, heads, causal, group, keys_first):
    """Blocks of one head and a range of queries, or of all queries and several heads of one image
    (as many as leave every one of the 2 threads a block), with blocks of 2^18 scores."""
    monkeypatch.setattr(settings, "THREADS", 2)
    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 2**18)
    assert fast.score_blocks(n, m, heads, b * heads)[1:] == (group, keys_first)
    q, k, v = randn(b, n, c), randn(b, m, c), randn(b, m, c)
    check(lambda: nn.attention(q, k, v, heads, causal), f"attention {b}x{n}x{m}x{c}/{heads} causal={causal}")


def attention_float64(q, k, v, heads, causal=False):
    """softmax(q k^T / sqrt(d)) v per head, in float64: the reference where the scores are so large
    that their float32 rounding alone exceeds the per-layer tolerance. -> [B, N, C]."""
    b, n, c = q.shape
    m, d = k.shape[1], c // heads
    q, k, v = (a.astype(np.float64).reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for a in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    if causal:
        s = np.where(np.arange(n)[:, None] < np.arange(m), -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(b, n, c)


# Large scores (tens to hundreds): the float32 path's own error against float64, measured over six
# inputs of each test below, is up to 2.7e-5 (scores of |q| x 300) for the plain path and 2.1e-5 for
# the fast one with 2^x; 1.3e-5 and 1.2e-5 for the causal ones (scale 50); 1.1e-5 and 0.9e-5 for the
# peaked ones. So these tests compare with float64, at 1e-4 and 5e-5. Against the plain path the fast
# one with 2^x differs by up to 4e-5: the same size, a different rounding of the scores.


def test_attention_small_blocks(monkeypatch, exp_base):
    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 7 * 300)               # 7 queries per block
    q, k, v = randn(2, 100, 32), randn(2, 300, 32), randn(2, 300, 32)
    check(lambda: nn.attention(q, k, v, 4), "attention in 7-query blocks")


def test_attention_skips_the_max_only_where_no_score_can_overflow(monkeypatch, exp_base):
    """Rows whose scores are bounded (|q.k| <= |q| max|k|) skip the softmax's max subtraction;
    others keep it. One batch holds a block of each kind (scores up to ~1 and up to ~300)."""
    q, k, v = randn(2, 128, 32), randn(2, 96, 32), randn(2, 96, 32)
    q[1] *= 300                                                          # e^300 overflows float32
    qh = (q * np.float32(fast.exp_unit() / 32 ** 0.5)).reshape(2, 128, 1, 32).transpose(0, 2, 1, 3)
    kh = k.reshape(2, 96, 1, 32).transpose(0, 2, 1, 3)
    vh = np.concatenate([v.reshape(2, 96, 1, 32).transpose(0, 2, 1, 3), np.ones((2, 1, 96, 1), np.float32)], -1)
    no_shift = fast._no_shift_rows(qh, kh, vh, 96)
    assert no_shift[0].all() and not no_shift[1].any()
    err = assert_close(nn.attention(q, k, v, 1), attention_float64(q, k, v, 1), 1e-4,
                       "attention, bounded and large scores")
    # without the bound, e^s overflows in the second image: the check must fail there
    monkeypatch.setattr(fast, "EXP_LIMIT", np.inf)
    monkeypatch.setattr(fast, "EXP_FLOOR", -np.inf)
    with pytest.raises(AssertionError, match="non-finite"), np.errstate(over="ignore", invalid="ignore"):
        check(lambda: nn.attention(q, k, v, 1), "attention without the bound")
    print(f"error {err.max_rel:.1e} against float64 (tolerance 1e-4)")


@pytest.mark.parametrize("n", [77, 600])
def test_causal_attention_with_large_scores(n, monkeypatch, exp_base):
    """The max subtraction (large scores) with CLIP's causal mask: the max is over the keys a query
    may see, and the masked ones stay at e^-inf = 0; with the scores stored as Q K^T (77 tokens)
    and as K Q^T (600, in blocks of 2^18 scores)."""
    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 2**18)
    assert fast.score_blocks(n, n, 4, 8)[2] == (n == 600)
    q, k, v = randn(2, n, 64, scale=50), randn(2, n, 64), randn(2, n, 64)
    err = assert_close(nn.attention(q, k, v, 4, causal=True), attention_float64(q, k, v, 4, causal=True),
                       5e-5, f"causal attention over {n} tokens, large scores")
    print(f"error {err.max_rel:.1e} against float64 (tolerance 5e-5)")


def test_attention_with_peaked_scores_is_not_slow(exp_base):
    """Scores spread over a hundred: e^(s - max) would be subnormal for many keys, and a product over
    subnormal numbers runs about 20x slower (6.9 s against 0.37 s over 4096 tokens); the fast path
    raises them to e^-60. Timed against the same call with ordinary scores: 1.2x (21x without the floor).
    Checked against float64 (see attention_float64)."""
    import time
    q, k, v = randn(1, 512, 64), randn(1, 1024, 64), randn(1, 1024, 64)

    def best(qq):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            nn.attention(qq, k, v, 1)
            times.append(time.perf_counter() - t0)
        return min(times)
    ordinary, peaked = best(q), best(q * 25)
    err = assert_close(nn.attention(q * 25, k, v, 1), attention_float64(q * 25, k, v, 1), 5e-5,
                       "attention, peaked scores")
    print(f"error {err.max_rel:.1e} against float64 (tolerance 5e-5)")
    assert peaked < 5 * ordinary, f"peaked scores {peaked * 1e3:.1f} ms against {ordinary * 1e3:.1f} ms"


@pytest.mark.parametrize("shape, groups", [((2, 64, 16, 16), 32), ((1, 6, 5, 7), 3), ((2, 8, 4), 2)])
def test_group_norm(shape, groups):
    x, w, b = randn(*shape) + 2, 1 + randn(shape[1], scale=0.1), randn(shape[1], scale=0.1)
    check(lambda: nn.group_norm(x, groups, w, b, 1e-6), f"group_norm {shape}")


def test_norms_of_views():
    """Inputs that are views (a transposed token layout, a channel slice) give the plain result."""
    x = randn(2, 16, 8, 8)
    tokens = x.reshape(2, 16, 64).transpose(0, 2, 1)                      # [B, HW, C], not contiguous
    w, b = 1 + randn(16, scale=0.1), randn(16, scale=0.1)
    check(lambda: nn.layer_norm(tokens, w, b), "layer_norm of a transposed view")
    check(lambda: nn.group_norm(x[:, 4:12], 4, w[:8], b[:8], 1e-6), "group_norm of a channel slice")
    lw, lb = randn(24, 16), randn(24)
    check(lambda: nn.linear(tokens, lw, lb), "linear of a transposed view")


@pytest.mark.parametrize("rows, cols, by", [(154, 1024, "columns"), (1024, 160, "rows")])
def test_linear_split_across_threads(rows, cols, by, monkeypatch):
    """Large enough to be split: by output columns when there are fewer rows than columns (CLIP's
    154 tokens), else by rows."""
    monkeypatch.setattr(settings, "THREADS", 2)
    x, w, b = randn(rows, 768), randn(cols, 768), randn(cols)
    assert rows * cols * 768 >= fast.MIN_PARALLEL_BLAS
    check(lambda: nn.linear(x, w, b), f"linear split by {by}")
    check(lambda: nn.linear(x, w), f"linear without bias split by {by}")


@pytest.mark.parametrize("rows, by", [(154, "columns"), (1024, "rows")])
def test_linear_of_weights_laid_out_transposed(rows, by, monkeypatch):
    """Weights [out, in] laid out [in, out] in memory (Fortran order), as npsd.clip.blas_layout
    stores the text encoder's, in float32 and float16, split across two threads either way."""
    monkeypatch.setattr(settings, "THREADS", 2)
    x, w, b = randn(2, rows // 2, 768), np.asfortranarray(randn(512, 768, scale=768 ** -0.5)), randn(512)
    assert rows * 512 * 768 >= fast.MIN_PARALLEL_BLAS and w.flags.f_contiguous and not w.flags.c_contiguous
    check(lambda: nn.linear(x, w, b), f"linear split by {by}, weight laid out [in, out]")
    check(lambda: nn.linear(x, w.astype(np.float16)), "the same in float16, without bias")


@pytest.mark.parametrize("rows", [154, 1024])
def test_linears_hand_all_products_to_the_threads_at_once(rows, monkeypatch):
    """nn.linears (attention's q, k and v from one input): each output equals nn.linear's on the
    plain path, for short products (split by columns) and long ones (by rows), weights of different
    widths, laid out either way, float16, with and without bias, and tokens seen through a
    transpose; the fast path hands the products to the threads in one call of fast.parallel (three
    calls would cost CLIP's text encoder 5% of its time)."""
    monkeypatch.setattr(settings, "THREADS", 2)
    x = randn(2, rows // 2, 768)
    layers = [dict(weight=randn(1024, 768, scale=0.04), bias=randn(1024)),
              dict(weight=np.asfortranarray(randn(640, 768, scale=0.04)).astype(np.float16)),
              dict(weight=randn(96, 768, scale=0.04), bias=randn(96))]
    for inp, what in ((x, "tokens"), (x.transpose(0, 2, 1).copy().transpose(0, 2, 1), "transposed tokens")):
        with nn.fast(False):
            plain = [nn.linear(inp, **p) for p in layers]
        calls = []
        monkeypatch.setattr(fast, "parallel", lambda *a, **k: calls.append(a[1]) or fast_parallel(*a, **k))
        with nn.fast(True):
            quick = nn.linears(inp, *layers)
        monkeypatch.setattr(fast, "parallel", fast_parallel)
        assert len(quick) == 3
        for p, q, layer in zip(plain, quick, layers):
            assert q.shape == p.shape == (2, rows // 2, layer["weight"].shape[0]) and q.dtype == np.float32
            assert_close(q, p, RTOL, f"linears, {what}, {rows} rows, {layer['weight'].shape[0]} outputs")
        products = [n for n in calls if n == settings.THREADS]
        assert len(products) == (1 if what == "tokens" else 2), f"{what}: fast.parallel calls {calls}"


fast_parallel = fast.parallel


def test_float16_weights_laid_out_transposed_stay_so():
    """fast.upcast converts a weight laid out [in, out] (Fortran order) into a float32 array laid out
    the same way, so the short products keep the layout that npsd.clip.blas_layout chose."""
    w = np.asfortranarray(randn(64, 48).astype(np.float16))
    up = fast.upcast(w)
    assert up.dtype == np.float32 and up.flags.f_contiguous and not up.flags.c_contiguous
    assert np.array_equal(up, w.astype(np.float32))


def test_linear_and_conv1x1_on_tokens_seen_through_a_transpose(monkeypatch):
    """The UNet's proj_in reads its tokens [B, H*W, C] as a transposed view of the GroupNorm's
    [B, C, H, W] output (the fast linear goes one image at a time then, without a copy), and proj_out
    writes the image back as a 1x1 conv on the tokens seen as [B, C, H, W], with its weight stored
    either way; each split across two threads."""
    monkeypatch.setattr(settings, "THREADS", 2)
    monkeypatch.setattr(fast, "MIN_PARALLEL_BLAS", 1)
    image, w, b = randn(3, 96, 12, 10), randn(80, 96, scale=0.1), randn(80)
    tokens = image.reshape(3, 96, 120).transpose(0, 2, 1)                # [3, 120, 96], a view
    assert not tokens.flags.c_contiguous
    check(lambda: nn.linear(tokens, w, b), "linear on transposed tokens")
    out_tokens = randn(3, 120, 96)
    as_image = out_tokens.transpose(0, 2, 1).reshape(3, 96, 12, 10)   # a view
    for weight in (w, w.reshape(80, 96, 1, 1)):
        check(lambda: nn.conv1x1(as_image, weight, b), f"conv1x1, weight {weight.shape}")


@pytest.mark.parametrize("shape", [(2, 77, 768), (5, 3), (7,)])
def test_layer_norm_and_linear(shape):
    x = randn(*shape)
    w, b = 1 + randn(shape[-1], scale=0.1), randn(shape[-1], scale=0.1)
    check(lambda: nn.layer_norm(x, w, b), f"layer_norm {shape}")
    lw, lb = randn(9, shape[-1]), randn(9)
    check(lambda: nn.linear(x, lw, lb), f"linear {shape}")
    check(lambda: nn.linear(x, lw), f"linear without bias {shape}")


def test_activations(exp_base):
    # GELU over its whole float32 range, where erf saturates, and around 0
    x = np.concatenate([np.linspace(-12, 12, 48_001, dtype=np.float32), randn(10_000, scale=3)]).reshape(-1, 31)
    check(lambda: nn.gelu(x), "gelu")
    check(lambda: nn.silu(x), "silu")
    check(lambda: nn.quick_gelu(x), "quick_gelu")
    check(lambda: nn.softmax(x * 5, axis=0), "softmax over axis 0")
    scores = randn(3, 4, 50, 60, scale=4)
    check(lambda: nn.softmax(scores), "softmax")
    big = randn(2, 3, 700, 500, scale=4)                         # 2 threads, several row blocks each
    check(lambda: nn.softmax(big), "softmax in row blocks")
    check(lambda: nn.softmax(big[..., ::2].astype(np.float64)), "softmax of a float64 view")
    h, gw, gb = randn(2, 40, 96), randn(2 * 80, 96, scale=0.1), randn(2 * 80)
    check(lambda: nn.geglu(h, gw, gb), "geglu")


def test_gelu_error_bound(exp_base):
    """The fast GELU, max(x, 0) - |x| erfc(|x| / sqrt 2) / 2, is within 3e-7 max(1, |x|) of the
    float64 value everywhere: A&S 7.1.26's bound on erfc gives 7.5e-8 |x|, float32 rounding of t,
    e^(-x^2/2) and the polynomial the rest (measured 1.5e-7), against the 1e-5 per-layer tolerance.
    With the sign applied as Phi(x) = 1/2 + sign(x) (1/2 - erfc/2), as first written, 1.8e-7."""
    from scipy.special import erf
    x = np.linspace(-10, 10, 200_001, dtype=np.float32)
    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))
    y = np.empty_like(x)
    fast._gelu_piece(x, y, *np.empty((3,) + x.shape, np.float32))
    err = (np.abs(y - exact) / np.maximum(1, np.abs(x64))).max()
    print(f"GELU error {err:.1e} x max(1, |x|) (bound 3e-7)")
    assert err < 3e-7


def test_exponentials_stay_in_the_range_numpy_vectorises(monkeypatch):
    """With exponentials as 2^x, every argument the kernels hand to np.exp2 lies in [-126, 126],
    where NumPy's AVX-512 loop stays vectorised (outside, about 150x slower a value): SiLU, quick
    GELU, GELU and softmax on values up to +-1000, and CLIP's causal attention, whose hidden keys
    once went in as -inf. The activations stay within 1e-6 max(1, |x|) of float64 and the softmax
    within 1e-6 (measured 1.3e-7 and 2.3e-7: 2^-126 standing for a smaller e^y changes nothing that
    float32 can show beside the other terms), the attention within the tolerances of the tests
    above. With the range opened the arguments leave it."""
    from scipy.special import erf
    monkeypatch.setattr(fast, "EXP2", True)
    seen = []

    def recording(y):
        seen.append((float(y.min()), float(y.max())))
        return np.exp2(y, out=y)
    monkeypatch.setattr(fast, "exp_in_place", recording)
    x = np.concatenate([randn(2000, scale=3), np.linspace(-1000, 1000, 2000, dtype=np.float32)]).reshape(-1, 25)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        exact = {nn.silu: x64 / (1 + np.exp(-x64)), nn.quick_gelu: x64 / (1 + np.exp(-1.702 * x64)),
                 nn.gelu: 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))}
    exact_softmax = {axis: np.exp(x64 - x64.max(axis, keepdims=True)) for axis in (0, 1)}  # 0: spans of 2000
    exact_softmax = {axis: e / e.sum(axis, keepdims=True) for axis, e in exact_softmax.items()}
    q, k, v = randn(2, 77, 64, scale=3), randn(2, 77, 64), randn(2, 77, 64)

    def run():
        seen.clear()
        errors = [(np.abs(f(x) - y) / np.maximum(1, np.abs(x64))).max() for f, y in exact.items()]
        errors.append(max(np.abs(nn.softmax(x, axis) - y).max() for axis, y in exact_softmax.items()))
        check(lambda: nn.attention(q, k, v, 4, causal=True), "causal attention")
        assert_close(nn.attention(q * 10, k, v, 4, causal=True), attention_float64(q * 10, k, v, 4, causal=True),
                     5e-5, "causal attention, max subtracted")
        return errors, min(lo for lo, _ in seen), max(hi for _, hi in seen)
    errors, lo, hi = run()
    print(f"2^x arguments in [{lo:.1f}, {hi:.1f}]; silu, quick_gelu, gelu {max(errors[:3]):.1e} x max(1, |x|) "
          f"(tolerance 1e-6), softmax {errors[3]:.1e} (1e-6)")
    assert -126 <= lo and hi <= 126
    assert max(errors[:3]) < 1e-6 and errors[3] < 1e-6
    monkeypatch.setattr(fast, "EXP2_RANGE", (np.float32(-np.inf), np.float32(np.inf)))
    with np.errstate(over="ignore"):
        _, lo, hi = run()
    assert lo < -126 and hi > 126


def test_silu_of_large_values_is_not_slow(monkeypatch):
    """SiLU of values beyond +-87 (e^-x then leaves float32's normal numbers) takes about the time
    of ordinary ones, with exponentials as 2^x: measured 0.9-1.1x on AVX-512, where 2^x without the
    clip took 12x."""
    import time
    monkeypatch.setattr(fast, "EXP2", True)
    ordinary, large = randn(1 << 20), randn(1 << 20, scale=1000)

    def best(a):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            nn.silu(a)
            times.append(time.perf_counter() - t0)
        return min(times)
    nn.silu(ordinary)
    t_ordinary, t_large = best(ordinary), best(large)
    print(f"silu: {t_large * 1e3:.2f} ms for values up to +-5000 against {t_ordinary * 1e3:.2f} ms")
    assert t_large < 3 * t_ordinary


def test_relu_is_the_maximum_with_zero():
    """fast.relu_into (np.clip, as NumPy's np.maximum against a scalar is slower) gives max(x, 0):
    the same values for ordinary numbers, infinities and NaN."""
    x = np.concatenate([randn(1000), np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45], np.float32)])
    y = fast.relu_into(x, np.empty_like(x))
    np.testing.assert_array_equal(y, np.maximum(x, np.float32(0)))
    assert y.dtype == np.float32


def test_thread_counts_agree(monkeypatch):
    """One thread and three give the same results (the pieces only change who computes what)."""
    x, w = randn(2, 8, 33, 31), randn(8, 8, 3, 3, scale=0.3)
    q, k = randn(2, 200, 32), randn(2, 150, 32)
    monkeypatch.setattr(fast, "MIN_PARALLEL", 1)                        # split even small jobs
    monkeypatch.setattr(fast, "MIN_PARALLEL_BLAS", 1)
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(settings, "THREADS", threads)
        results[threads] = [nn.conv2d(x, w, None, padding=1), nn.attention(q, k, k, 4),
                            nn.group_norm(x, 4, np.ones(8, np.float32), np.zeros(8, np.float32), 1e-5),
                            nn.gelu(x), nn.linear(q, w.reshape(8, -1)[:, :32])]
    for a, b in zip(results[1], results[3]):
        assert_close(b, a, 1e-6, "3 threads vs 1")


def test_blas_threads_restored():
    """A fast kernel holds BLAS to one thread while it runs and restores the count afterwards."""
    if not blas.available():
        pytest.skip("NumPy's BLAS here is not an OpenBLAS that npsd.blas can find")
    before = blas.get_threads()
    seen = []
    with blas.single_threaded():
        seen.append(blas.get_threads())
    nn.conv2d(randn(1, 4, 8, 8), randn(4, 4, 3, 3), None, padding=1)
    assert seen == [1] and blas.get_threads() == before


def test_setting_selects_the_path(monkeypatch):
    """settings.FAST really switches: with a broken fast kernel only the fast setting sees it."""
    monkeypatch.setattr(fast, "silu", lambda x: x)
    x = randn(10)
    with nn.fast(False):
        assert not np.allclose(nn.silu(x), x)
    with nn.fast(True):
        assert np.array_equal(nn.silu(x), x)
    with pytest.raises(ValueError, match="threads"):
        nn.set_threads(0)


def test_group_norm_of_long_groups_is_accurate():
    """GroupNorm over groups of 10^6 values (the VAE at 512x512) against a float64 evaluation. Summing
    the squares in running float32 accumulators (einsum over the whole group) was 5e-5 off in the
    VAE; pairwise sums of pieces keep it at float32 rounding."""
    x = randn(1, 4, 512, 512, scale=3) + 5
    w, b = 1 + randn(4, scale=0.1), randn(4, scale=0.1)
    g = x.astype(np.float64).reshape(1, 2, -1)
    exact = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    exact = exact * w.reshape(1, 4, 1, 1) + b.reshape(1, 4, 1, 1)
    assert_close(nn.group_norm(x, 2, w, b, 1e-6), exact, 1e-6, "fast group_norm, 2 groups of 524288")


def test_threads_work_in_a_forked_child(monkeypatch):
    """After the pool has run, a fork()ed child (multiprocessing's default on Linux) still computes:
    it starts a pool of its own instead of waiting on the parent's threads, which it does not have."""
    import multiprocessing
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork() on this platform")
    monkeypatch.setattr(settings, "THREADS", 2)
    x = randn(1 << 20)
    nn.silu(x)                                                     # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_child_silu_sum, (x,))
        assert np.isclose(result.get(timeout=60), nn.silu(x).sum(dtype=np.float64), rtol=1e-6)


def _child_silu_sum(x):
    settings.set_threads(2)
    return nn.silu(x).sum(dtype=np.float64)


def test_settings_are_reached_from_nn_and_the_environment():
    """nn offers the settings' functions under their old names, and NPSD_FAST=0 starts on the plain path."""
    assert (nn.set_fast, nn.fast, nn.set_threads, nn.set_chunk_bytes, nn.chunk_bytes) == (
        settings.set_fast, settings.fast, settings.set_threads, settings.set_chunk_bytes, settings.chunk_bytes)
    with nn.fast(False):
        assert settings.FAST is False
    code = "from npsd import nn, settings; print(settings.FAST)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NPSD_FAST": "0"}, cwd=root).stdout.strip()
    assert out == "False"


# ---------------------------------------------------------------------------------------------
# The VAE's fast blocks (GroupNorm + SiLU and upsampling into padded buffers, in-place residuals)
# ---------------------------------------------------------------------------------------------

VAE_CONFIG = {"norm_groups": 4, "eps": 1e-6}


def conv_params(o, i, k):
    return {"weight": randn(o, i, k, k, scale=(i * k * k) ** -0.5), "bias": randn(o, scale=0.1)}


def norm_params(c):
    return {"weight": 1 + randn(c, scale=0.1), "bias": randn(c, scale=0.1)}


def test_padded_buffers_hold_exactly_the_formula():
    """The buffers the fast VAE blocks hand to a 3x3 conv are pad(silu(GroupNorm(x))) and
    pad(upsample(x)), bit for bit, whether GroupNorm takes all groups at once or a slice at a time."""
    x, norm = randn(2, 12, 9, 7) + 1, norm_params(12)
    border = ((0, 0), (0, 0), (1, 1), (1, 1))
    want = np.pad(fast.silu(fast.group_norm(x, 4, norm["weight"], norm["bias"], 1e-6)), border)
    for budget in (2**27, 1):                                          # one slice; one group per slice
        with nn.chunk_bytes(budget):
            assert np.array_equal(fast.norm_silu_padded(x, norm["weight"], norm["bias"], 4, 1e-6), want)
    want = np.pad(nn.upsample_nearest(x), border)
    assert np.array_equal(fast.upsample_padded(x), want)


@pytest.mark.parametrize("cin, cout", [(8, 8), (8, 12)])           # identity skip; 1x1 conv_shortcut
def test_vae_resnet_block(conv_route, cin, cout):
    p = {"norm1": norm_params(cin), "conv1": conv_params(cout, cin, 3),
         "norm2": norm_params(cout), "conv2": conv_params(cout, cout, 3)}
    if cin != cout:
        p["conv_shortcut"] = conv_params(cout, cin, 1)
    x = randn(2, cin, 10, 9)
    check(lambda: vae.resnet_block(p, x, VAE_CONFIG), f"VAE resnet block {cin}->{cout} ({conv_route})")


def test_vae_upsample_and_output_layers(conv_route):
    x = randn(1, 8, 6, 5)
    up = {"conv": conv_params(8, 8, 3)}
    check(lambda: vae.upsample(up, x), f"VAE upsampler ({conv_route})")
    out = {"conv_norm_out": norm_params(8), "conv_out": conv_params(3, 8, 3)}
    check(lambda: vae.output_layers(out, x, VAE_CONFIG), f"VAE output layers ({conv_route})")


def test_vae_fast_blocks_check_the_groups():
    """Both paths refuse a GroupNorm whose channels do not split into the config's groups."""
    from npsd.errors import CheckpointError
    p = {"norm1": norm_params(6), "conv1": conv_params(6, 6, 3), "norm2": norm_params(6), "conv2": conv_params(6, 6, 3)}
    for on in (True, False):
        with nn.fast(on), pytest.raises(CheckpointError, match="6 channels cannot be split into 4 groups"):
            vae.resnet_block(p, randn(1, 6, 4, 4), VAE_CONFIG)


# ---------------------------------------------------------------------------------------------
# Whole generations: the built-in model on the plain path and on the fast path
# ---------------------------------------------------------------------------------------------

# Max |plain - fast| over the [0, 1] images, measured: txt2img 7.7e-6, img2img 2.7e-6 (float32
# rounding; an image's 8-bit step is 3.9e-3; the previous built-in model on an Intel Xeon: 4.6e-6 and
# 6.0e-6). The tolerance is 3.3x and 9.3x those.
GENERATION_TOL = 2.5e-5


def test_generation_plain_against_fast():
    """txt2img and img2img (rng="numpy", 3 and 2 DDIM steps with guidance) give the same images on
    both paths, up to float32 rounding compounded through CLIP, the UNet's steps and the VAE."""
    from PIL import Image
    pipe = npsd.load()
    h, w = pipe.config["defaults"]["height"], pipe.config["defaults"]["width"]
    yy, xx = np.mgrid[0:h, 0:w]                                       # an image: two ramps and a checkerboard
    image = Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, (xx // 8 + yy // 8) % 2 * 255], -1)
                            .astype(np.uint8))
    kw = dict(seed=1, rng="numpy", sampler="ddim", output_type="np")

    def generate():
        a = pipe.txt2img("a red circle on a blue background", num_inference_steps=3, **kw)
        b = pipe.img2img("a green square", image, strength=0.5, num_inference_steps=4, **kw)
        return a, b
    (plain_a, plain_b), (fast_a, fast_b) = both(generate)
    for what, plain, quick in (("txt2img", plain_a, fast_a), ("img2img", plain_b, fast_b)):
        diff = float(np.abs(quick - plain).max())
        print(f"{what}: max |plain - fast| = {diff:.3g} (tolerance {GENERATION_TOL})")
        assert plain.shape == quick.shape == (1, h, w, 3)
        assert 0 < diff <= GENERATION_TOL, (what, diff)     # > 0: the two paths really ran


def test_vae_fast_blocks_are_the_formulas_bit_for_bit(conv_route, exp_base, monkeypatch):
    """With the fast kernels under both, the fast VAE blocks give exactly what vae.py's formulas give:
    the padded buffers, the slices of groups and the in-place residual change no value."""
    p = {"norm1": norm_params(8), "conv1": conv_params(12, 8, 3), "norm2": norm_params(12),
         "conv2": conv_params(12, 12, 3), "conv_shortcut": conv_params(12, 8, 1)}
    up, out = {"conv": conv_params(8, 8, 3)}, {"conv_norm_out": norm_params(8), "conv_out": conv_params(3, 8, 3)}
    x = randn(1, 8, 9, 7)

    def blocks():
        return [vae.resnet_block(p, x, VAE_CONFIG), vae.upsample(up, x), vae.output_layers(out, x, VAE_CONFIG)]
    with nn.fast(True), nn.chunk_bytes(8 * 4 * 2 * 63):               # GroupNorm + SiLU one group at a time
        quick = blocks()
        monkeypatch.setattr(vae, "settings", types.SimpleNamespace(FAST=False))   # vae's formulas, nn's fast kernels
        formulas = blocks()
    for a, b in zip(quick, formulas):
        assert np.array_equal(a, b)


def test_vae_fast_encoder_and_decoder_are_the_blocks_bit_for_bit(monkeypatch):
    """fast.vae_encoder and fast.vae_decoder (a call without a trace), which let resnet blocks
    overwrite maps they own, give exactly what the block-by-block path gives (the one a trace takes),
    and leave their input as it was. A tiny VAE: 3 levels of 8, 16, 16 channels, so the encoder
    widens (8 -> 16, not in place), keeps width in place, and the decoder narrows (16 -> 8)."""
    from npsd import architecture, trace as tracing
    shapes = architecture.vae_shapes(architecture.VAEDesign(block_out_channels=(8, 16, 16), layers_per_block=1))
    p = architecture.random_params(shapes, np.random.default_rng(0))
    img, z = randn(1, 3, 12, 8), randn(1, 4, 3, 2)
    kept, calls = (img.copy(), z.copy()), []
    for name in ("vae_encoder", "vae_decoder"):                  # the fast functions really run
        real = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    for part, x in (("encoder", img), ("decoder", z)):
        f = getattr(vae, part)
        quick = f(p[part], x, VAE_CONFIG)
        blocks = f(p[part], x, VAE_CONFIG, trace=tracing.Trace().scope(f"vae.{part}"))
        print(f"{part}: output {quick.shape}, max |fast - blocks| = {np.abs(quick - blocks).max()}")
        assert np.array_equal(quick, blocks), part
    assert calls == ["vae_encoder", "vae_decoder"]
    assert np.array_equal(img, kept[0]) and np.array_equal(z, kept[1])
