"""Fast kernels: the arithmetic of nn.py's plain forward passes, reorganised for speed.

nn.py is the reference that docs/ explains; with ``settings.FAST`` on (the default) its linear,
conv2d, attention, softmax, group_norm, layer_norm, silu, gelu and geglu hand their work to the
functions here, which compute the same formulas with fewer passes over memory, fewer temporaries,
work split across threads, and (for 3x3 convolutions on large maps) fewer multiplications; so do
the VAE's resnet blocks, upsamplers and output layers (npsd/vae.py), whose fast versions at the end
of this file keep a 512x512 decode's full-size maps few. ``nn.set_fast(False)`` or
``with nn.fast(False):`` runs the plain path instead; tests/test_fast.py checks every function
here against its plain counterpart, and the parity tests against PyTorch run with the fast path.

Threads: NumPy's ufuncs (exp, add, ...) and BLAS release the GIL, so the functions here split
their work (elementwise passes, and matrix products into independent pieces) into
``settings.THREADS`` contiguous pieces that run at once in a thread pool. Each kernel runs with
BLAS set to one thread (``@single_threaded_blas``; npsd/blas.py says why), so there is one thread
per core and no BLAS pool competing with them.
"""

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import blas, settings

_POOL = {}
_IN_WORKER = threading.local()     # set in a piece's thread: a piece that splits again runs inline
# Work below which splitting does not pay (handing a piece to another thread costs about 0.1 ms):
MIN_PARALLEL = 1 << 18        # elements, for elementwise work
MIN_PARALLEL_BLAS = 1 << 24   # multiply-adds, for work that calls BLAS


def _forget_pool():
    _POOL.clear()             # a forked child has none of the parent's threads: start a new pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool(n):
    if n not in _POOL:
        _POOL.clear()
        _POOL[n] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="npsd")
    return _POOL[n]


def parallel(work, n, size=None, uses_blas=False):
    """Call work(i0, i1) on settings.THREADS contiguous pieces of range(n) at once (the calling thread
    takes the first piece). `size`: the elements the whole job touches; small jobs run inline.
    uses_blas: the work calls BLAS, so it is split only where BLAS can be held to one thread."""
    parts = min(settings.THREADS, n)
    small = size is not None and size < (MIN_PARALLEL_BLAS if uses_blas else MIN_PARALLEL)
    if (parts <= 1 or small or (uses_blas and not blas.available())
            or getattr(_IN_WORKER, "on", False)):
        work(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool(parts).submit(_as_piece, work, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    try:
        _as_piece(work, bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


def _as_piece(work, a, b):
    _IN_WORKER.on = True
    try:
        work(a, b)
    finally:
        _IN_WORKER.on = False


def single_threaded_blas(f):
    """Decorator: f runs with BLAS held to one thread (f's own pieces are the threads)."""
    @functools.wraps(f)
    def run(*args, **kwargs):
        with blas.single_threaded():
            return f(*args, **kwargs)
    return run


def _flat_pieces(x, out, fn):
    """out.ravel()[i] = fn(x.ravel()[i]) in parallel pieces (x and out C-contiguous)."""
    xf, of = x.reshape(-1), out.reshape(-1)
    parallel(lambda a, b: fn(xf[a:b], of[a:b]), xf.size, xf.size)
    return out


# ---------------------------------------------------------------------------------------------
# Elementwise
# ---------------------------------------------------------------------------------------------

@single_threaded_blas
def silu(x):
    def f(x, y):                     # y = x / (1 + e^-x), in y's memory
        np.negative(x, out=y)
        np.exp(y, out=y)
        y += 1
        np.divide(x, y, out=y)
    return _flat_pieces(np.ascontiguousarray(x), np.empty(x.shape, np.float32), f)


# GELU(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2. scipy's erf runs in float64, one value at a
# time; here erfc(z) for z = |x| / sqrt 2 >= 0 follows Abramowitz & Stegun 7.1.26,
#     erfc(z) = (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) e^(-z^2),  t = 1 / (1 + p z),
# absolute error <= 1.5e-7, so Phi(x) = 1 - erfc(z)/2 for x >= 0 and erfc(z)/2 for x < 0 to 7.5e-8
# (a float32 ulp of 1 is 6e-8). A few dozen vectorised passes over pieces that stay in cache.
_AS_P = np.float32(0.3275911)
_AS_A = [np.float32(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)]
_PIECE = 1 << 15


def _phi(x, out, tmp):
    """out = Phi(x) for a piece (a block of rows); tmp: scratch of the same shape."""
    np.abs(x, out=tmp)
    tmp *= np.float32(1 / np.sqrt(2))                  # z
    np.multiply(tmp, _AS_P, out=out)
    out += 1
    np.reciprocal(out, out=out)                        # t
    np.square(tmp, out=tmp)
    np.negative(tmp, out=tmp)
    np.exp(tmp, out=tmp)                               # e^(-z^2)
    t = out.copy()                                     # (a piece-sized copy)
    out *= _AS_A[0]                                    # Horner: ((((a5 t + a4) t + a3) t + a2) t + a1) t
    for a in _AS_A[1:]:
        out += a
        out *= t
    out *= tmp
    out *= np.float32(0.5)                             # erfc(z) / 2
    np.subtract(1, out, out=out, where=x >= 0)         # Phi(x)


def _gelu_pieces(x, out, value=None):
    """out = x Phi(x) (times value when given) for 2-D arrays, in blocks of rows that fit in cache,
    the blocks split across threads."""
    rows = max(1, _PIECE // x.shape[1])

    def f(r0, r1):
        tmp = np.empty((rows, x.shape[1]), np.float32)
        for i in range(r0, r1, rows):
            j = min(r1, i + rows)
            xs, os_ = x[i:j], out[i:j]
            _phi(xs, os_, tmp[:j - i])
            os_ *= xs
            if value is not None:
                os_ *= value[i:j]
    parallel(f, x.shape[0], x.size)
    return out


@single_threaded_blas
def gelu(x):
    x2 = np.ascontiguousarray(np.atleast_1d(x))
    x2 = x2.reshape(-1, max(1, x2.shape[-1]))                             # rows; blocked into pieces below
    return _gelu_pieces(x2, np.empty(x2.shape, np.float32)).reshape(x.shape)


@single_threaded_blas
def geglu_product(value, gate):
    """value * gelu(gate) for the GEGLU halves (strided views of one projection), one output."""
    v, g = (a.reshape(-1, a.shape[-1]) for a in (value, gate))
    out = np.empty(v.shape, np.float32)
    return _gelu_pieces(g, out, v).reshape(value.shape)


def softmax_(s):
    """Softmax over the last axis of a 2-D array, in place; rows split across threads."""
    def f(a, b):
        r = s[a:b]
        r -= r.max(axis=-1, keepdims=True)
        np.exp(r, out=r)
        r /= r.sum(axis=-1, keepdims=True)
    parallel(f, s.shape[0], s.size)
    return s


@single_threaded_blas
def softmax(x, axis=-1):
    x = np.moveaxis(x, axis, -1)
    s = np.array(x, dtype=np.float32, order="C")            # the one copy; then in place
    softmax_(s.reshape(-1, s.shape[-1]))
    return np.moveaxis(s, -1, axis)


# ---------------------------------------------------------------------------------------------
# Linear: rows of x split across threads
# ---------------------------------------------------------------------------------------------

@single_threaded_blas
def linear(x, weight, bias=None):
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], weight.shape[0]), np.float32)
    wt = weight.T

    def f(a, b):
        np.matmul(x2[a:b], wt, out=out[a:b])
        if bias is not None:
            out[a:b] += bias
    parallel(f, x2.shape[0], out.size * x2.shape[1], uses_blas=True)
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


# ---------------------------------------------------------------------------------------------
# Normalisation: statistics, then one fused scale-and-shift
# ---------------------------------------------------------------------------------------------

# einsum sums a row in a few running float32 accumulators: fine for LayerNorm's 320-768 values, but
# over GroupNorm's 10^4-10^6 its error reached 5e-5 (VAE at 512x512). So rows are summed in pieces
# of at most LONG_ROW values, and the pieces' sums added by NumPy's pairwise summation.
LONG_ROW = 4096


def _sum_squares(y):
    """Row sums of y^2 for y [R, n]."""
    full = y.shape[1] // LONG_ROW * LONG_ROW
    if full == 0:
        return np.einsum("ij,ij->i", y, y)
    head = y[:, :full].reshape(y.shape[0], -1, LONG_ROW)
    total = np.einsum("ijk,ijk->ij", head, head).sum(axis=1)
    if full < y.shape[1]:
        total += np.einsum("ij,ij->i", y[:, full:], y[:, full:])
    return total


def _normalise_rows(rows, eps, scale_shift):
    """rows [R, n] -> (rows - mean) / sqrt(var + eps), then scale_shift(out_rows, r0, r1) applies
    the affine part; returns a new array. Rows are split across threads."""
    out = np.empty(rows.shape, np.float32)
    n = rows.shape[1]

    def f(a, b):
        x, y = rows[a:b], out[a:b]
        mean = x.mean(axis=1, keepdims=True)                             # pairwise sums, as the plain path
        np.subtract(x, mean, out=y)
        var = _sum_squares(y)[:, None] / np.float32(n)                    # mean of squared deviations
        y *= 1 / np.sqrt(var + np.float32(eps))
        scale_shift(y, a, b)
    parallel(f, rows.shape[0], rows.size)
    return out


@single_threaded_blas
def group_norm(x, num_groups, weight, bias, eps):
    b, c = x.shape[:2]
    cg = c // num_groups
    rows = np.ascontiguousarray(x).reshape(b * num_groups, -1)            # [B*G, C/G * positions]

    w = weight.reshape(num_groups, cg, 1)                                 # per group: its channels' scale
    bb = bias.reshape(num_groups, cg, 1)

    def affine(y, r0, r1):                                                 # rows r0..r1 are groups r % G
        g = np.arange(r0, r1) % num_groups
        yr = y.reshape(r1 - r0, cg, -1)                                    # [rows, C/G, positions]
        yr *= w[g]
        yr += bb[g]
    return _normalise_rows(rows, eps, affine).reshape(x.shape)


@single_threaded_blas
def layer_norm(x, weight, bias, eps=1e-5):
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])

    def affine(y, r0, r1):
        y *= weight
        y += bias
    return _normalise_rows(rows, eps, affine).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Attention: scores a block at a time, softmax in place, normalised after the P V product
# ---------------------------------------------------------------------------------------------

BLOCK_ELEMENTS = 2**18       # one score block (queries x keys) of 1 MiB, kept in a core's L2 cache


@single_threaded_blas
def attention(q, k, v, num_heads, causal=False):
    """nn.attention, whose checks the arguments have passed."""
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    scale = np.float32(1.0 / np.sqrt(d))
    qh = np.ascontiguousarray((q * scale).reshape(b, n, num_heads, d).transpose(0, 2, 1, 3))   # [B, h, N, d]
    kt = np.ascontiguousarray(k.reshape(b, m, num_heads, d).transpose(0, 2, 3, 1))             # [B, h, d, M]
    vh = np.ascontiguousarray(v.reshape(b, m, num_heads, d).transpose(0, 2, 1, 3))             # [B, h, M, d]
    out = np.empty((b, n, num_heads, d), dtype=np.float32)
    rows = max(1, min(n, BLOCK_ELEMENTS // m, settings.CHUNK_BYTES // (m * 4 * settings.THREADS)))
    blocks = [(bi, hi, i0) for bi in range(b) for hi in range(num_heads) for i0 in range(0, n, rows)]

    def work(j0, j1):
        s_buf = np.empty((rows, m), np.float32)
        for bi, hi, i0 in blocks[j0:j1]:
            i1 = min(n, i0 + rows)
            s = np.matmul(qh[bi, hi, i0:i1], kt[bi, hi], out=s_buf[:i1 - i0])          # [n, M] scores
            if causal:
                s[np.arange(i0, i1)[:, None] < np.arange(m)[None, :]] = -np.inf
            # unnormalised softmax e^(s - max) in place; the row sums divide the [n, d] product
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            total = s.sum(axis=-1, keepdims=True)                                      # [n, 1]
            o = s @ vh[bi, hi]                                                         # [n, d]
            o /= total
            out[bi, i0:i1, hi] = o
    parallel(work, len(blocks), b * num_heads * n * m, uses_blas=True)
    return out.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------

WINOGRAD = True                     # False: every 3x3 conv by im2col (to measure what Winograd gives)
WINOGRAD_MIN_POSITIONS = 2048      # Winograd for 3x3 stride-1 convs with at least this many outputs
                                    # (batch x height x width; below, transforming the weights on every call costs
                                    # more than the multiplications it saves)


@single_threaded_blas
def conv2d(x, weight, bias, stride, pad):
    """nn.conv2d, whose checks the arguments have passed; pad = (top, bottom, left, right)."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    top, bottom, left, right = pad
    ho = (h + top + bottom - kh) // stride + 1
    wo = (w + left + right - kw) // stride + 1
    if kh == kw == 1 and stride == 1 and not any(pad):
        y = np.empty((b, o, h, w), np.float32)
        w2, x3, y3 = weight.reshape(o, c), x.reshape(b, c, h * w), y.reshape(b, o, h * w)
        for bi in range(b):
            parallel(lambda o0, o1: np.matmul(w2[o0:o1], x3[bi], out=y3[bi, o0:o1]), o, o * h * w * c, uses_blas=True)
    elif kh == kw == 3 and stride == 1 and b * ho * wo >= WINOGRAD_MIN_POSITIONS and WINOGRAD:
        y = winograd_f2x2_3x3(x, weight, pad, ho, wo)
    else:
        y = _im2col_conv(x, weight, pad, stride, ho, wo)
    if bias is not None:
        _add_bias(y, bias)
    return y


def _add_bias(y, bias):
    b, o = y.shape[:2]
    yf, per_row = y.reshape(b * o, -1), np.tile(bias, b)[:, None]         # [B*O, positions], [B*O, 1]

    def f(r0, r1):
        yf[r0:r1] += per_row[r0:r1]
    parallel(f, b * o, y.size)


def _im2col_conv(x, weight, pad, stride, ho, wo):
    """im2col with the patch axis first: cols[(c, i, j), (r, x)] = xp[c, r*s + i, x*s + j], built by
    kh*kw slice copies of whole rows (contiguous runs), then y[b, :, band] = W [O, C*kh*kw] @ cols,
    written straight into the NCHW output."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    top, bottom, left, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) if any(pad) else x
    w2 = weight.reshape(o, c * kh * kw)
    y = np.empty((b, o, ho, wo), dtype=np.float32)
    rows = max(1, min(ho, settings.CHUNK_BYTES // (wo * c * kh * kw * 4)))
    cols_buf = np.empty((c, kh, kw, rows, wo), np.float32)
    for bi in range(b):
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            cols = cols_buf[:, :, :, :r1 - r0]

            def fill(c0, c1, bi=bi, r0=r0, r1=r1, cols=cols):
                for i in range(kh):
                    for j in range(kw):
                        cols[c0:c1, i, j] = xp[bi, c0:c1, r0 * stride + i:(r1 - 1) * stride + i + 1:stride,
                                               j:j + (wo - 1) * stride + 1:stride]
            parallel(fill, c, cols.size)
            cols2 = cols.reshape(c * kh * kw, -1)                           # [C*kh*kw, rows*Wo]
            yb = y[bi, :, r0:r1].reshape(o, -1)                             # [O, rows*Wo] (a view)

            def gemm(o0, o1, cols2=cols2, yb=yb):
                yb[o0:o1] = w2[o0:o1] @ cols2
            parallel(gemm, o, o * cols2.size, uses_blas=True)
    return y


# Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"):
# each 2x2 output tile is Y = A^T [ (G g G^T) * (B^T d B) ] A, d the 4x4 input tile it reads,
# g the 3x3 kernel; 16 multiplications per tile and channel pair instead of 36.


def winograd_weights(weight):
    """U = G g G^T for every (out, in) kernel g [3, 3]: [O, C, 3, 3] -> 16 matrices [O, C];
    G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]."""
    o, c = weight.shape[:2]
    u = np.empty((4, 4, o, c), np.float32)
    half = np.float32(0.5)

    def f(o0, o1):
        g = np.ascontiguousarray(weight[o0:o1].transpose(2, 3, 0, 1))      # [3, 3, o, C]
        for i, r in enumerate((g[0], (g[0] + g[1] + g[2]) * half, (g[0] - g[1] + g[2]) * half, g[2])):
            u[i, 0, o0:o1] = r[0]                                          # G g, then (G g) G^T
            np.multiply(r[0] + r[1] + r[2], half, out=u[i, 1, o0:o1])
            np.multiply(r[0] - r[1] + r[2], half, out=u[i, 2, o0:o1])
            u[i, 3, o0:o1] = r[2]
    parallel(f, o, weight.size)
    return u.reshape(16, o, c)


def winograd_f2x2_3x3(x, weight, pad, ho, wo):
    b, c, h, w = x.shape
    o = weight.shape[0]
    top, bottom, left, right = pad
    th, tw = -(-ho // 2), -(-wo // 2)                                     # output tiles
    # pad so that tile (ty, tx) reads rows 2ty .. 2ty+3 and columns 2tx .. 2tx+3
    widths = ((0, 0), (0, 0), (top, 2 * th + 2 - h - top), (left, 2 * tw + 2 - w - left))
    xp = np.pad(x, widths) if any(a or b for a, b in widths) else x       # (np.pad always copies)
    u = winograd_weights(weight)                                          # [16, O, C]
    y = np.empty((b, o, 2 * th, 2 * tw), dtype=np.float32)
    tr = max(1, min(th, settings.CHUNK_BYTES // (16 * max(c, o) * tw * 4 * 2)))   # tile rows per band
    v_buf = np.empty((16, c, tr * tw), np.float32)
    m_buf = np.empty((16, o, tr * tw), np.float32)
    for bi in range(b):
        for t0 in range(0, th, tr):
            t1 = min(th, t0 + tr)
            n = t1 - t0
            v = v_buf[:, :, :n * tw].reshape(4, 4, c, n, tw)
            xb = xp[bi, :, 2 * t0:2 * t1 + 2]                              # [C, 2n+2, Wp]
            parallel(lambda c0, c1: _input_transform(xb[c0:c1], v[:, :, c0:c1], n, tw), c, 16 * c * n * tw)
            vb, mb = v_buf[:, :, :n * tw], m_buf[:, :, :n * tw]
            # the 16 products M_ij = U_ij V_ij, [O, C] @ [C, n*tw], shared among the threads
            parallel(lambda i0, i1: np.matmul(u[i0:i1], vb[i0:i1], out=mb[i0:i1]), 16, mb.size * c, uses_blas=True)
            m = mb.reshape(4, 4, o, n, tw)
            yb = y[bi, :, 2 * t0:2 * t1].reshape(o, n, 2, tw, 2)
            parallel(lambda o0, o1: _output_transform(m[:, :, o0:o1], yb[o0:o1]), o, 16 * o * n * tw)
    if y.shape[2:] != (ho, wo):
        y = np.ascontiguousarray(y[:, :, :ho, :wo])
    return y


def _input_transform(xb, v, n, tw):
    """v[i, j] = (B^T d B)[i, j] for every tile; B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]."""
    d = [xb[:, k:k + 2 * n:2] for k in range(4)]                          # 4 x [C, n, Wp]: tile row k
    rows = (d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3])            # B^T d, along rows
    for i, r in enumerate(rows):
        e = [r[:, :, k:k + 2 * tw:2] for k in range(4)]                    # 4 x [C, n, tw]: tile column k
        np.subtract(e[0], e[2], out=v[i, 0])                               # (B^T d) B, along columns
        np.add(e[1], e[2], out=v[i, 1])
        np.subtract(e[2], e[1], out=v[i, 2])
        np.subtract(e[1], e[3], out=v[i, 3])


def _output_transform(m, yb):
    """yb[:, :, a, :, b] = (A^T M A)[a, b] for every tile; A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    s0 = [m[0, j] + m[1, j] + m[2, j] for j in range(4)]                   # A^T M, row 0
    s1 = [m[1, j] - m[2, j] - m[3, j] for j in range(4)]                   # A^T M, row 1
    for a, s in enumerate((s0, s1)):
        np.add(s[0], s[1], out=yb[:, :, a, :, 0])
        yb[:, :, a, :, 0] += s[2]
        np.subtract(s[1], s[2], out=yb[:, :, a, :, 1])
        yb[:, :, a, :, 1] -= s[3]


# ---------------------------------------------------------------------------------------------
# VAE blocks (npsd/vae.py): the same formulas with fewer full-size maps
# ---------------------------------------------------------------------------------------------
# A 512x512 decode's largest activation is 256 channels at 512x512 (256 MiB). vae.py's plain blocks
# hold several maps of that size at once: GroupNorm's and SiLU's temporaries, the zero-padded copy a
# 3x3 conv makes of its input, the upsampled map and its padded copy, the residual sum. The versions
# here write GroupNorm + SiLU, and the 2x upsampling, straight into a zero-bordered buffer that the
# next 3x3 conv reads without padding it again; normalise a few groups at a time (GroupNorm's
# statistics are per group, so this changes no value); and add residuals in place.

# GroupNorm + SiLU process whole channel groups in slices of about settings.CHUNK_BYTES / 8 bytes,
# so that their temporaries (the normalised slice, exp(-x), ...) stay small.
NORM_SLICE_FRACTION = 8


def norm_silu_padded(x, weight, bias, groups, eps):
    """silu(GroupNorm(x)) of x [B, C, H, W], written into a zero-bordered buffer [B, C, H+2, W+2]:
    the input of a 3x3 conv with padding 1, which then needs no padded copy."""
    b, c, h, w = x.shape
    cg = c // groups                                                       # channels per group
    out = np.zeros((b, c, h + 2, w + 2), dtype=np.float32)                # [B, C, H+2, W+2]
    inner = out[:, :, 1:h + 1, 1:w + 1]                                    # view [B, C, H, W]
    group_bytes = b * cg * h * w * 4
    step = max(1, settings.CHUNK_BYTES // NORM_SLICE_FRACTION // group_bytes) * cg   # channels per slice
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        y = group_norm(x[:, c0:c1], (c1 - c0) // cg, weight[c0:c1], bias[c0:c1], eps)   # [B, slice, H, W]
        inner[:, c0:c1] = silu(y)
    return out


def upsample_padded(x):
    """Nearest-neighbour 2x upsampling of x [B, C, H, W] into a zero-bordered [B, C, 2H+2, 2W+2]: the
    input of the 3x3 conv (padding 1) that follows. out[2i+dy+1, 2j+dx+1] = x[i, j], dy, dx in {0, 1}."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, 2 * h + 2, 2 * w + 2), dtype=np.float32)       # [B, C, 2H+2, 2W+2]
    for dy in (0, 1):
        for dx in (0, 1):
            out[:, :, 1 + dy:1 + dy + 2 * h:2, 1 + dx:1 + dx + 2 * w:2] = x
    return out


def _conv_of_padded(xp, conv):
    """A 3x3 conv (padding 1) of a map already zero-bordered: [B, C, H+2, W+2] -> [B, O, H, W]."""
    return conv2d(xp, conv["weight"], conv.get("bias"), 1, (0, 0, 0, 0))


def vae_norm_silu_conv(x, norm, conv, groups, eps):
    """vae.py's conv(silu(GroupNorm(x))), a 3x3 conv with padding 1: [B, C, H, W] -> [B, O, H, W]."""
    return _conv_of_padded(norm_silu_padded(x, norm["weight"], norm["bias"], groups, eps), conv)


def vae_resnet_block(p, x, groups, eps):
    """vae.resnet_block: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the residual added in place.
    Each step rebinds h, so that no map outlives the step that reads it."""
    h = norm_silu_padded(x, p["norm1"]["weight"], p["norm1"]["bias"], groups, eps)   # [B, C, H+2, W+2]
    h = _conv_of_padded(h, p["conv1"])                                    # [B, O, H, W]
    h = norm_silu_padded(h, p["norm2"]["weight"], p["norm2"]["bias"], groups, eps)   # [B, O, H+2, W+2]
    h = _conv_of_padded(h, p["conv2"])                                    # [B, O, H, W]
    if "conv_shortcut" in p:
        s = p["conv_shortcut"]
        h += conv2d(x, s["weight"], s.get("bias"), 1, (0, 0, 0, 0))       # 1x1: [B, C, H, W] -> [B, O, H, W]
    else:
        h += x
    return h


def vae_upsample(p, x):
    """vae.upsample: conv(upsample_nearest(x)), a 3x3 conv with padding 1: [B, C, h, w] -> [B, O, 2h, 2w]."""
    return _conv_of_padded(upsample_padded(x), p["conv"])
