"""The layer library: every operation Stable Diffusion needs, as an explicit NumPy forward pass.

Conventions (the same as PyTorch, so weights load without transposes):
- images and feature maps are NCHW: x[batch, channels, height, width];
- token sequences are [batch, tokens, width];
- a linear weight is [out, in]; a conv weight is [out, in, kh, kw];
- everything is computed in float32. Weights may be stored in float16 (``npsd.load(path,
  weights_dtype="float16")``, half the memory): each layer converts its own weight and bias with
  ``upcast`` when it runs, so at most one layer's float32 copy exists at a time, and the model
  code does not change. A float32 weight is used as it is, without a copy.

Memory is bounded by one setting, ``settings.CHUNK_BYTES``: conv2d builds its im2col matrix a band
of output rows at a time, and attention scores a block of queries at a time, so that neither
temporary exceeds the budget. Chunking changes only the order of work, not the arithmetic of any
single output value, so results are identical whatever the budget (tests/test_nn.py checks it).

Fast path: with ``settings.FAST`` on (the default), linear, conv2d, attention, softmax,
group_norm, layer_norm, silu, gelu and geglu hand their work to npsd/fast.py, which computes the
same formulas with fewer passes over memory, on several threads, and 3x3 convolutions on large maps
by Winograd's F(2x2, 3x3). The code below is the plain reference that docs/ explains; to step
through it, run with ``nn.set_fast(False)``, ``with nn.fast(False):`` or the environment variable
NPSD_FAST=0. The settings live in npsd/settings.py; nn offers their functions under the same names.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import fast as _fast
from . import settings
from .settings import chunk_bytes, fast, padding_mode, set_chunk_bytes, set_fast, set_threads  # noqa: F401  (nn.set_fast, ...)


def upcast(a):
    """A weight or bias as float32: the array itself when it is float32 (no copy), else a float32
    copy of this one layer's array (weights stored in float16); None stays None."""
    return None if a is None else a.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Elementwise activations
# ---------------------------------------------------------------------------------------------

def silu(x):
    if settings.FAST:
        return _fast.silu(x)
    # silu(x) = x * sigmoid(x) = x / (1 + e^-x)
    return x / (1.0 + np.exp(-x))


def gelu(x):
    if settings.FAST:
        return _fast.gelu(x)
    # exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
    from scipy.special import erf      # imported here: SciPy takes 0.2 s to import, and the fast path needs none
    return (0.5 * x * (1.0 + erf(x * np.float32(1 / np.sqrt(2))))).astype(np.float32, copy=False)


def quick_gelu(x):
    if settings.FAST:
        return _fast.quick_gelu(x)
    # CLIP's approximation: x * sigmoid(1.702 x)
    return x / (1.0 + np.exp(np.float32(-1.702) * x))


def softmax(x, axis=-1):
    if settings.FAST:
        return _fast.softmax(x, axis)
    # softmax(x)_i = e^(x_i - max x) / sum_j e^(x_j - max x); subtracting the max avoids overflow
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Linear layers and normalisation
# ---------------------------------------------------------------------------------------------

def linear(x, weight, bias=None):
    # [..., in] @ [in, out] -> [..., out]   (weight is stored [out, in], as in PyTorch)
    if settings.FAST:
        return _fast.linear(x, weight, bias)
    weight, bias = upcast(weight), upcast(bias)       # float16 weights: this layer's float32 copy
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linears(x, *layers):
    # the same x through several linear layers (attention's q, k and v), each a dict of weight and
    # bias: the fast path hands all the products to its threads at once
    if settings.FAST:
        return _fast.linears(x, [(p["weight"], p.get("bias")) for p in layers])
    return [linear(x, **p) for p in layers]


def linear_or_conv1x1(x, weight, bias=None):
    # a linear layer whose weight is [out, in] or stored as a 1x1 conv [out, in, 1, 1] (SD v1's UNet
    # proj_in, legacy VAE attention): on tokens [..., in] both are the same map [out, in]
    return linear(x, weight.reshape(weight.shape[0], -1), bias)


def conv1x1(x, weight, bias=None):
    # the same map on an image [B, in, H, W], a 1x1 conv whose weight is [out, in, 1, 1] or stored as a
    # linear layer's [out, in] (proj_out, the VAE attention's to_out: the tokens seen as an image)
    return conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)


def geglu(x, weight, bias):
    # GEGLU (Shazeer 2020): project to 2*inner, split into (value, gate), value * gelu(gate)
    h = linear(x, weight, bias)                       # [..., in] -> [..., 2*inner]
    value, gate = np.split(h, 2, axis=-1)             # 2 x [..., inner]
    if settings.FAST:
        return _fast.geglu_product(value, gate)
    return value * gelu(gate)


def layer_norm(x, weight, bias, eps=1e-5):
    if settings.FAST:
        return _fast.layer_norm(x, weight, bias, eps)
    # normalise over the last axis: (x - mean) / sqrt(var + eps) * weight + bias
    weight, bias = upcast(weight), upcast(bias)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * weight + bias


def group_norm(x, num_groups, weight, bias, eps):
    # x [B, C, ...]: channels split into num_groups groups; each group normalised over its channels
    # and all positions, then a per-channel affine transform. eps differs between models (UNet
    # resnets 1e-5, transformer blocks and the VAE 1e-6), so it has no default.
    if settings.FAST:
        return _fast.group_norm(x, num_groups, weight, bias, eps)
    weight, bias = upcast(weight), upcast(bias)
    b, c = x.shape[:2]
    g = x.reshape(b, num_groups, -1)                  # [B, G, C/G * positions]
    mean = g.mean(axis=-1, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=-1, keepdims=True)
    g = (g - mean) / np.sqrt(var + np.float32(eps))
    shape = (1, c) + (1,) * (x.ndim - 2)
    return g.reshape(x.shape) * weight.reshape(shape) + bias.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Convolution: im2col + one GEMM per band of output rows
# ---------------------------------------------------------------------------------------------

def conv2d(x, weight, bias=None, stride=1, padding=0, padding_mode=None):
    """2-D convolution (cross-correlation, as in PyTorch).

    x [B, C, H, W], weight [O, C, kh, kw], bias [O] -> [B, O, Ho, Wo].
    padding: an int (all sides) or (top, bottom, left, right), e.g. (0, 1, 0, 1) for the VAE's
    asymmetric downsampling pad.
    padding_mode: "zeros" (a border of zeros) or "circular" (the map wraps around: the row above
    the first is the last, the column left of the first the last, as torch's padding_mode="circular";
    images made so tile seamlessly); None: settings.PADDING_MODE, "zeros" unless a generation asked for
    tiling.
    """
    pad = (padding,) * 4 if np.isscalar(padding) else tuple(padding)
    if (padding_mode or settings.PADDING_MODE) == "circular" and any(pad):
        top, bottom, left, right = pad
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), mode="wrap")   # [B, C, H + t + b, W + l + r]
        pad = (0, 0, 0, 0)
    b, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c:
        raise ValueError(f"conv2d: input has {c} channels but the weight expects {c_w}")
    if settings.FAST:
        return _fast.conv2d(x, weight, bias, stride, pad)
    weight, bias = upcast(weight), upcast(bias)                  # float16 weights: this layer's float32 copy

    if kh == kw == 1 and stride == 1 and not any(pad):
        # 1x1 fast path: a single GEMM over all positions, no im2col needed
        y = weight.reshape(o, c) @ x.reshape(b, c, h * w)                  # [B, O, H*W]
        y = y.reshape(b, o, h, w)
    else:
        top, bottom, left, right = pad
        xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) if any(pad) else x
        ho = (h + top + bottom - kh) // stride + 1
        wo = (w + left + right - kw) // stride + 1
        w2 = weight.reshape(o, c * kh * kw).T                                # [C*kh*kw, O]
        y = np.empty((b, o, ho, wo), dtype=np.float32)
        row_bytes = b * wo * c * kh * kw * 4                                 # im2col bytes per output row
        rows = max(1, min(ho, settings.CHUNK_BYTES // row_bytes))
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            band = xp[:, :, r0 * stride:(r1 - 1) * stride + kh]            # input rows this band reads
            win = sliding_window_view(band, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
            # win [B, C, rows, Wo, kh, kw] -> cols [B*rows*Wo, C*kh*kw] (a copy: the im2col matrix)
            cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(b * (r1 - r0) * wo, c * kh * kw)
            out = cols @ w2                                                  # [B*rows*Wo, O]
            y[:, :, r0:r1] = out.reshape(b, r1 - r0, wo, o).transpose(0, 3, 1, 2)
    if bias is not None:
        y += bias.reshape(1, o, 1, 1)
    return y


def upsample_nearest(x, size=None):
    """Nearest-neighbour upsampling of x [B, C, H, W]: 2x, or to `size` = (H', W').

    With an explicit size the source index is floor(i * H / H') in float32, as F.interpolate does;
    the UNet uses this when a latent side is not a multiple of 8 (the skip decides the size).
    """
    b, c, h, w = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        return x.repeat(2, axis=2).repeat(2, axis=3)
    ho, wo = size
    rows = np.minimum(np.floor(np.arange(ho, dtype=np.float32) * np.float32(h / ho)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(wo, dtype=np.float32) * np.float32(w / wo)).astype(int), w - 1)
    return x[:, :, rows][:, :, :, cols]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attention(q, k, v, num_heads, causal=False):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1).

    q [B, N, C], k and v [B, M, C] -> [B, N, C]; C is split into num_heads heads of d = C / heads.
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V, per head. With causal=True, query i sees only
    keys j <= i (CLIP's text transformer). Queries are processed in blocks so that the score
    block [B, heads, n, M] stays within settings.CHUNK_BYTES.
    """
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    if d * num_heads != c:
        raise ValueError(f"attention: width {c} is not divisible by {num_heads} heads")
    if settings.FAST:
        return _fast.attention(q, k, v, num_heads, causal)
    qh = q.reshape(b, n, num_heads, d).transpose(0, 2, 1, 3)               # [B, h, N, d]
    kh = k.reshape(b, m, num_heads, d).transpose(0, 2, 3, 1)               # [B, h, d, M]
    vh = v.reshape(b, m, num_heads, d).transpose(0, 2, 1, 3)               # [B, h, M, d]
    scale = np.float32(1.0 / np.sqrt(d))
    out = np.empty((b, n, num_heads, d), dtype=np.float32)
    rows = max(1, min(n, settings.CHUNK_BYTES // (b * num_heads * m * 4)))
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        s = (qh[:, :, i0:i1] * scale) @ kh                                  # [B, h, n, M]
        if causal:
            s[..., np.arange(i0, i1)[:, None] < np.arange(m)[None, :]] = -np.inf
        p = softmax(s, axis=-1)
        out[:, i0:i1] = (p @ vh).transpose(0, 2, 1, 3)                     # [B, n, h, d]
    return out.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------

def timestep_embedding(t, dim=320, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding of timesteps (DDPM, after Vaswani et al.).

    t: scalar or [B] (may be fractional) -> [B, dim].
    freq_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)), i = 0 .. dim/2 - 1;
    emb = [sin(t * freq), cos(t * freq)], and SD uses the cos half first (flip_sin_to_cos).
    """
    t = np.atleast_1d(np.asarray(t, dtype=np.float32))
    half = dim // 2
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32)
    # exp, sin and cos are evaluated in float64 and rounded once: the float32 arguments reach
    # 1000, where one ulp of a float32 exp moves sin(t * freq) by 6e-5.
    freqs = np.exp((exponent / np.float32(half - freq_shift)).astype(np.float64)).astype(np.float32)
    args = (t[:, None] * freqs[None, :]).astype(np.float64)                  # [B, dim/2], float32 product
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)             # [B, dim]
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
