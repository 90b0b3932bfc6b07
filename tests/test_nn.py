"""Each primitive of npsd.nn against its torch counterpart, at SD v1.5 shapes and odd ones.

Tolerance: relative error (max abs difference / max |reference|) <= 1e-5 for float32. Both sides
accumulate sums in float32 in a different order; measured errors are 1e-7 .. 2e-6, so 1e-5
leaves a margin without hiding a real bug: every real bug tried (wrong eps, wrong padding side,
missing scale) gives errors of 1e-3 or more.

Every test runs twice: with the plain reference kernels of npsd/nn.py and with the fast path
(npsd/fast.py, the default), so both are checked against torch.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from npsd import nn
from npsd.testing import assert_close
from tests.helpers import n2t, t2n

RTOL = 1e-5
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(autouse=True, params=["fast", "plain"])
def kernels(request):
    with nn.fast(request.param == "fast"):
        yield request.param


@pytest.mark.parametrize("shape, cin, cout", [((2, 4096, 320), 320, 1280), ((3, 77, 768), 768, 768), ((5, 7), 7, 3)])
def test_linear(shape, cin, cout):
    x, w, b = randn(*shape), randn(cout, cin, scale=cin ** -0.5), randn(cout)
    assert_close(nn.linear(x, w, b), t2n(F.linear(n2t(x), n2t(w), n2t(b))), RTOL, "linear")
    assert_close(nn.linear(x, w), t2n(F.linear(n2t(x), n2t(w))), RTOL, "linear without bias")


CONV_CASES = [
    # (x shape, out channels, kernel, stride, npsd padding, torch padding)
    ((2, 320, 64, 64), 320, 3, 1, 1, 1),              # UNet level 1 resnet conv
    ((2, 4, 64, 64), 320, 3, 1, 1, 1),                # UNet conv_in
    ((2, 640, 32, 32), 640, 3, 2, 1, 1),              # UNet downsampler (stride 2, symmetric pad)
    ((2, 1280, 8, 8), 1280, 3, 1, 1, 1),              # UNet deepest level
    ((1, 128, 64, 64), 128, 3, 2, (0, 1, 0, 1), 0),   # VAE downsampler: asymmetric pad, then stride 2
    ((2, 640, 32, 32), 320, 1, 1, 0, 0),              # 1x1 skip connection
    ((3, 13, 5, 7), 6, 3, 1, 1, 1),                   # odd: batch 3, non-square, 13 channels
    ((3, 13, 9, 6), 5, 3, 2, (0, 1, 0, 1), 0),        # odd, asymmetric pad, odd size
    ((1, 3, 11, 10), 4, 5, 2, 2, 2),                  # 5x5 kernel
]


@pytest.mark.parametrize("xs, cout, k, stride, pad, tpad", CONV_CASES)
def test_conv2d(xs, cout, k, stride, pad, tpad):
    cin = xs[1]
    x, w, b = randn(*xs), randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5), randn(cout)
    tx = n2t(x)
    if isinstance(pad, tuple):                        # F.pad order is (left, right, top, bottom)
        tx = F.pad(tx, (pad[2], pad[3], pad[0], pad[1]))
    ref = t2n(F.conv2d(tx, n2t(w), n2t(b), stride=stride, padding=tpad))
    assert_close(nn.conv2d(x, w, b, stride=stride, padding=pad), ref, RTOL, "conv2d")


def test_conv2d_asymmetric_pad_side_matters():
    """The VAE pads right and bottom only; padding the other sides must fail the check."""
    x, w = randn(1, 8, 8, 8), randn(8, 8, 3, 3)
    ref = t2n(F.conv2d(F.pad(n2t(x), (0, 1, 0, 1)), n2t(w), stride=2))
    assert_close(nn.conv2d(x, w, stride=2, padding=(0, 1, 0, 1)), ref, RTOL)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(nn.conv2d(x, w, stride=2, padding=(1, 0, 1, 0)), ref, RTOL)


def test_conv2d_chunked_equals_unchunked():
    x, w, b = randn(2, 64, 33, 20), randn(32, 64, 3, 3), randn(32)
    full = nn.conv2d(x, w, b, padding=1)
    with nn.chunk_bytes(1):                                          # one output row per band
        one_row = nn.conv2d(x, w, b, padding=1)
    with nn.chunk_bytes(2 * 20 * 64 * 9 * 4 * 5):                    # bands of 5 rows, the last one shorter
        five_rows = nn.conv2d(x, w, b, padding=1)
    # Bands change only which rows one GEMM call computes; each value's dot product is the same,
    # but BLAS may block differently for a different M, so allow float rounding (measured 0).
    assert_close(one_row, full, 1e-6, "conv2d one row per chunk")
    assert_close(five_rows, full, 1e-6, "conv2d five rows per chunk")


@pytest.mark.parametrize("shape, groups, eps", [
    ((2, 320, 64, 64), 32, 1e-5),     # UNet resnet
    ((2, 1280, 8, 8), 32, 1e-6),      # UNet transformer input
    ((1, 512, 64, 64), 32, 1e-6),     # VAE
    ((3, 12, 5, 7), 4, 1e-5),         # odd: 12 channels in 4 groups, non-square
])
def test_group_norm(shape, groups, eps):
    c = shape[1]
    x, w, b = randn(*shape, scale=3.0) + 1.0, 1 + 0.1 * randn(c), 0.1 * randn(c)
    ref = t2n(F.group_norm(n2t(x), groups, n2t(w), n2t(b), eps=eps))
    assert_close(nn.group_norm(x, groups, w, b, eps), ref, RTOL, "group_norm")


def test_group_norm_wrong_eps_fails():
    """Sensitivity: eps 1e-5 where the model uses 1e-6 must fail on low-variance input."""
    x = randn(1, 64, 8, 8, scale=1e-3)
    w, b = np.ones(64, np.float32), np.zeros(64, np.float32)
    ref = t2n(F.group_norm(n2t(x), 32, n2t(w), n2t(b), eps=1e-6))
    assert_close(nn.group_norm(x, 32, w, b, 1e-6), ref, RTOL)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(nn.group_norm(x, 32, w, b, 1e-5), ref, RTOL)


@pytest.mark.parametrize("shape", [(2, 4096, 320), (2, 77, 768), (3, 5, 7)])
def test_layer_norm(shape):
    c = shape[-1]
    x, w, b = randn(*shape, scale=2.0) + 0.5, 1 + 0.1 * randn(c), 0.1 * randn(c)
    ref = t2n(F.layer_norm(n2t(x), (c,), n2t(w), n2t(b), eps=1e-5))
    assert_close(nn.layer_norm(x, w, b, 1e-5), ref, RTOL, "layer_norm")


def test_activations():
    x = randn(2, 320, 64, 64, scale=4.0)
    tx = n2t(x)
    assert_close(nn.silu(x), t2n(F.silu(tx)), RTOL, "silu")
    assert_close(nn.gelu(x), t2n(F.gelu(tx)), RTOL, "gelu")                         # exact (erf) form
    assert_close(nn.quick_gelu(x), t2n(tx * torch.sigmoid(1.702 * tx)), RTOL, "quick_gelu")
    with pytest.raises(AssertionError, match="exceeds the tolerance"):             # the tanh form differs
        assert_close(nn.gelu(x), t2n(F.gelu(tx, approximate="tanh")), 1e-6, "gelu vs tanh")


def test_geglu():
    x, w, b = randn(2, 4096, 320), randn(2 * 1280, 320, scale=320 ** -0.5), randn(2 * 1280)
    h, gate = F.linear(n2t(x), n2t(w), n2t(b)).chunk(2, dim=-1)
    assert_close(nn.geglu(x, w, b), t2n(h * F.gelu(gate)), RTOL, "geglu")


@pytest.mark.parametrize("shape", [(2, 8, 1024, 1024), (3, 12, 77, 77), (4, 5)])
def test_softmax(shape):
    x = randn(*shape, scale=10.0)
    assert_close(nn.softmax(x), t2n(torch.softmax(n2t(x), -1)), RTOL, "softmax")
    big = x + 1000.0                                                                   # stable for large logits
    assert_close(nn.softmax(big), t2n(torch.softmax(n2t(big), -1)), RTOL, "softmax of large logits")


def _sdpa(q, k, v, heads, causal=False):
    b, n, c = q.shape
    split = lambda a: n2t(a).reshape(b, a.shape[1], heads, c // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return t2n(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("b, n, m, c, heads, causal", [
    (2, 4096, 4096, 320, 8, False),    # UNet level 1 self-attention
    (2, 4096, 77, 320, 8, False),      # UNet level 1 cross-attention (k, v projected from 77x768)
    (2, 256, 77, 1280, 8, False),      # UNet deep cross-attention
    (2, 77, 77, 768, 12, True),        # CLIP causal self-attention
    (1, 4096, 4096, 512, 1, False),    # VAE mid-block single-head attention
    (3, 35, 11, 24, 3, False),         # odd
])
def test_attention(b, n, m, c, heads, causal):
    q, k, v = randn(b, n, c), randn(b, m, c), randn(b, m, c)
    assert_close(nn.attention(q, k, v, heads, causal=causal), _sdpa(q, k, v, heads, causal), RTOL, "attention")


def test_attention_chunked_equals_unchunked():
    q, k, v = randn(2, 300, 64), randn(2, 300, 64), randn(2, 300, 64)
    for causal in (False, True):
        with nn.chunk_bytes(2**40):
            full = nn.attention(q, k, v, 4, causal=causal)
        with nn.chunk_bytes(1):                                   # one query per block
            one = nn.attention(q, k, v, 4, causal=causal)
        with nn.chunk_bytes(2 * 4 * 300 * 4 * 7):                 # blocks of 7 queries
            seven = nn.attention(q, k, v, 4, causal=causal)
        assert_close(one, full, 1e-6, "attention, one query per block")
        assert_close(seven, full, 1e-6, "attention, 7 queries per block")
        assert_close(full, _sdpa(q, k, v, 4, causal), RTOL, "attention vs torch")


def test_attention_causal_mask_matters():
    q, k, v = randn(1, 20, 16), randn(1, 20, 16), randn(1, 20, 16)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(nn.attention(q, k, v, 2, causal=False), _sdpa(q, k, v, 2, causal=True), RTOL)


@pytest.mark.parametrize("shape, size", [((2, 1280, 8, 8), None), ((1, 3, 5, 4), (9, 7)), ((2, 4, 5, 7), (10, 14))])
def test_upsample_nearest(shape, size):
    x = randn(*shape)
    if size is None:
        ref = F.interpolate(n2t(x), scale_factor=2.0, mode="nearest")
    else:
        ref = F.interpolate(n2t(x), size=size, mode="nearest")
    np.testing.assert_array_equal(nn.upsample_nearest(x, size), t2n(ref))           # a copy: exact


@pytest.mark.parametrize("dim", [320, 64, 33])
def test_timestep_embedding(dim):
    t = np.array([0, 1, 250, 500, 999, 981.5], dtype=np.float32)
    ref = get_timestep_embedding(n2t(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    # The argument t * freq reaches 1000, so one float32 ulp of freq (6e-8 relative) moves
    # sin(t * freq) by up to 6e-5. torch's float32 exp is one ulp off the correctly rounded value
    # on 3 of the 160 frequencies (measured), which gives a measured max abs error of 6.1e-5:
    # tolerance 1e-4 against torch. npsd rounds exp once from float64, and matches a float64
    # evaluation of the same float32 inputs to 1e-6 (the second check).
    assert_close(nn.timestep_embedding(t, dim), t2n(ref), 1e-4, "timestep embedding vs diffusers")
    half = dim // 2
    freqs = np.exp((np.float32(-np.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)).astype(np.float64))
    args = (t[:, None] * freqs.astype(np.float32)[None, :]).astype(np.float64)   # float32 product, as torch
    exact = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    exact = np.pad(exact, ((0, 0), (0, dim % 2)))
    assert_close(nn.timestep_embedding(t, dim), exact, 1e-6, "timestep embedding vs float64")
    unflipped = get_timestep_embedding(n2t(t), dim, flip_sin_to_cos=False, downscale_freq_shift=0)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):             # order matters
        assert_close(nn.timestep_embedding(t, dim), t2n(unflipped), RTOL)


def test_timestep_embedding_scalar():
    assert nn.timestep_embedding(10).shape == (1, 320)


def test_linear_or_conv1x1_is_a_1x1_conv_on_tokens():
    """nn.linear_or_conv1x1 takes a [O, C] or [O, C, 1, 1] weight: on tokens [B, N, C] it is the 1x1 conv."""
    x, w, b = randn(2, 16, 6, 5), randn(8, 16, 1, 1), randn(8)
    ref = t2n(F.conv2d(n2t(x), n2t(w), n2t(b)))                                    # [2, 8, 6, 5]
    tokens = x.reshape(2, 16, 30).transpose(0, 2, 1)                                 # [2, 30, 16]
    for weight in (w, w.reshape(8, 16)):
        out = nn.linear_or_conv1x1(tokens, weight, b).transpose(0, 2, 1).reshape(2, 8, 6, 5)
        assert_close(out, ref, RTOL, "linear_or_conv1x1")
