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

Weights stored in float16 (``npsd.load(path, weights_dtype="float16")``) are converted to float32
by each kernel that takes a weight, for that one call (``upcast``, the conversion split across
threads), as nn.py's plain layers do; float32 weights are used as they are.
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


def cpu_vendor(cpuinfo="/proc/cpuinfo"):
    """The CPU's vendor ("AuthenticAMD", "GenuineIntel", ...) as /proc/cpuinfo names it, or None."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except (OSError, UnicodeDecodeError):
        return None


VENDOR = cpu_vendor()      # read once; the attention blocks and the Winograd line depend on it
MEASURED_VENDORS = ("AuthenticAMD", "GenuineIntel")    # where those were measured (docs/speed.md)


def exp2_is_vectorised(opt_func_info=None):
    """Whether NumPy computes float32 2^x with a SIMD loop chosen for this CPU, as
    numpy.lib.introspect.opt_func_info (NumPy >= 2.0) reports it: not its baseline loop. NumPy has
    one for AVX-512 (x86-64-v4), where 2^x ran 2-2.6x faster than e^x; with AVX2 only e^x has one
    and 2^x took twice its time (docs/speed.md section 5). Older NumPy: False."""
    try:
        if opt_func_info is None:
            from numpy.lib.introspect import opt_func_info
        loop = opt_func_info(func_name="^exp2$")["exp2"]["ff"]                  # float32 -> float32
        return not loop["current"].startswith("baseline")
    except Exception:                  # no introspect, or another layout of its answer
        return False


# The kernels' exponentials: e^y = 2^(y log2 e), computed as 2^x where NumPy's float32 2^x is the
# faster (EXP2), else as e^x. The factor log2 e is folded into a multiplication the kernel makes
# anyway (the attention's 1/sqrt(d), SiLU's -1), so 2^x costs no extra pass there.
EXP2 = exp2_is_vectorised()


def exp_unit():
    """u with e^y = EXP(y u): log2 e where the kernels take 2^x (EXP2), else 1."""
    return np.log2(np.e) if EXP2 else 1.0


def exp_in_place(y):
    """y = EXP(y): 2^y where EXP2, else e^y; y already in the unit of exp_unit() and, where EXP2,
    within EXP2_RANGE (below): exp_times clips, the attention's scores are bounded."""
    return (np.exp2 if EXP2 else np.exp)(y, out=y)


# NumPy's vector loop for float32 2^x covers the arguments in [-126, 126], whose results are normal
# numbers; for any other (a result that is subnormal, zero or infinite) it falls back to a path
# that took about 30 ns a value against 0.2 (docs/speed.md section 5), so a pass with 1% of its
# values out of range took 3x the time. exp_times clips its arguments into the range: 2^-126
# (1.2e-38) stands for a smaller value and 2^126 (8.5e37) for a larger one.
EXP2_RANGE = (np.float32(-126), np.float32(126))


def exp_times(x, c, out):
    """out = e^(c x) for a constant c (out may be x): EXP(x c u), one multiplication and EXP; where
    EXP is 2^x, the arguments clipped to EXP2_RANGE first."""
    factor = np.float32(c * exp_unit())
    if factor != 1 or out is not x:
        np.multiply(x, factor, out=out)
    if EXP2:
        np.clip(out, *EXP2_RANGE, out=out)
    return exp_in_place(out)


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


def upcast(a):
    """nn.upcast, converting in parallel pieces: a weight or bias as float32, the array itself when it
    is float32 (no copy), else a float32 copy of this one layer's array; None stays None."""
    return None if a is None else astype(a, np.float32)


def astype(a, dtype):
    """a.astype(dtype), converted in parallel pieces; a itself when it has that dtype. Float16 to
    float32 goes by half_to_single; that conversion is most of the time of reading a float16
    checkpoint as float32 (npsd/loading.py) and of running with float16 weights. Float32 to float16
    (a float32 file read as float16, a LoRA merged into float16 weights) goes by single_to_half. A
    value beyond the new type's range becomes inf without a warning, as under
    np.errstate(over="ignore"): the loader checks for them."""
    if a.dtype == dtype:
        return a
    if a.flags.f_contiguous and not a.flags.c_contiguous:               # a weight laid out transposed
        return astype(a.T, dtype).T                                       # (npsd.clip.blas_layout) stays so

    def convert(src, dst):
        f = _ON_THE_BITS.get((src.dtype.type, dst.dtype.type))
        if f is not None:
            for i in range(0, src.size, HALF_BLOCK):      # its passes read a block from the core's cache
                f(src[i:i + HALF_BLOCK], dst[i:i + HALF_BLOCK])
            return
        with np.errstate(over="ignore"):
            np.copyto(dst, src)
    return _flat_pieces(np.ascontiguousarray(a), np.empty(a.shape, dtype), convert)


# half_to_single's and single_to_half's block: 2^18 values (1 MiB of float32). A UNet conv's 29.5M
# float16 weights, converted in two threads' halves at once, took 0.84 ns a value; in blocks of
# 2^14 / 2^16 / 2^18 values, 1.34 / 0.54 / 0.46 ns (Zen 4 EPYC, medians of 15).
HALF_BLOCK = 1 << 18


def half_to_single(src, dst):
    """dst[:] = src, float16 [n] -> float32 [n] (both contiguous), exactly, on the bits. NumPy casts
    float16 one value at a time (1.65 ns a value on one Zen 4 core); these three passes and two
    read-only checks take 0.56. A float16 is sign (1 bit), exponent (5, bias 15) and mantissa (10);
    moved 13 bits up into a float32's places (the sign by the int16 -> int32 extension) they read as
    the value times 2^-112 (float32's bias is 127), for zero and the subnormal values too (read as
    float32 subnormals: the CPU's denormals-are-zero mode must be off, as NumPy leaves it), and
    times 2^112 is exact. The exponent 31 (infinity, NaN) reads as 2^16 or more, above float16's
    largest finite value (65504): those few are cast by NumPy."""
    bits = dst.view(np.int32)
    np.left_shift(src.view(np.int16), 13, out=bits, dtype=np.int32)   # bit 31 = the sign, bits 13-27 the rest
    np.bitwise_and(bits, np.int32(-0x70002000), out=bits)             # 0x8FFFE000: keep those bits
    dst *= np.float32(2.0 ** 112)
    if dst.max(initial=0) >= 2 ** 16 or dst.min(initial=0) <= -2 ** 16:
        special = np.abs(dst) >= 2 ** 16
        dst[special] = src[special]
    return dst


def single_to_half(src, dst):
    """dst[:] = src, float32 [n] -> float16 [n] (both contiguous), rounded to the nearest float16 (ties
    to even) as NumPy's cast, on the bits: 1.25 against NumPy's 2.6 ns a value (one Zen 4 core). For
    |x| in float16's normal range, dropping float32's 13 lowest mantissa bits after adding 0xFFF plus
    the lowest bit kept rounds to nearest even (a carry moves into the exponent), and subtracting
    112 from the exponent moves its bias from 127 to 15; sums at 65520 and above carry into the
    infinity's bits. Below 2^-14 (float16's subnormal numbers and zero), |x| + 0.5 in float32 leaves
    the float16 mantissa in its lowest bits, rounded by the addition itself. |x| >= 65520 (infinity)
    and NaN are few: cast by NumPy."""
    bits = src.view(np.uint32)
    a = bits & np.uint32(0x7FFFFFFF)                                   # |x|
    h = (a >> np.uint32(13)) & np.uint32(1)                            # the lowest bit kept: ties to even
    h += a
    h += np.uint32((0xFFF - (112 << 23)) % 2**32)                      # round; exponent bias 127 -> 15
    h >>= np.uint32(13)
    small = a < np.uint32(113 << 23)                                   # |x| < 2^-14
    if small.any():
        with np.errstate(invalid="ignore"):                            # (a signalling NaN, cast below)
            tiny = (a.view(np.float32) + np.float32(0.5)).view(np.uint32)  # 0.5 + float16 mantissa * 2^-24
        tiny -= np.uint32(0x3F000000)                                  # minus 0.5's bits
        np.copyto(h, tiny, where=small)
    h |= (bits >> np.uint32(16)) & np.uint32(0x8000)                   # the sign
    np.copyto(dst.view(np.uint16), h, casting="unsafe")
    if a.max(initial=0) >= 0x477FF000:                                 # |x| >= 65520, or NaN
        big = a >= np.uint32(0x477FF000)
        with np.errstate(over="ignore"):
            dst[big] = src[big]
    return dst


_ON_THE_BITS = {(np.float16, np.float32): half_to_single, (np.float32, np.float16): single_to_half}   # astype's


# ---------------------------------------------------------------------------------------------
# Elementwise
# ---------------------------------------------------------------------------------------------

def _times_sigmoid(x, c, y):
    """y = x sigmoid(c x) = x / (1 + e^(-c x)), in y's memory: SiLU (c = 1), quick GELU (c = 1.702)."""
    exp_times(x, -c, out=y)
    y += 1
    return np.divide(x, y, out=y)


def relu_into(x, out):
    """out = max(x, 0), as np.clip(x, 0, inf): NumPy's np.maximum against a scalar has no vector
    loop and took 2.5-3.3x the time of the clip (the same values, but -0.0 stays -0.0)."""
    return np.clip(x, np.float32(0), np.float32(np.inf), out=out)


@single_threaded_blas
def silu(x):
    f = lambda x, y: _times_sigmoid(x, 1, y)
    return _flat_pieces(np.ascontiguousarray(x), np.empty(x.shape, np.float32), f)


@single_threaded_blas
def quick_gelu(x):
    f = lambda x, y: _times_sigmoid(x, 1.702, y)
    return _flat_pieces(np.ascontiguousarray(x), np.empty(x.shape, np.float32), f)


# GELU(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2. scipy's erf runs in float64, one value at a
# time; here erfc(z) for z = |x| / sqrt 2 >= 0 follows Abramowitz & Stegun 7.1.26,
#     erfc(z) = (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) e^(-z^2),  t = 1 / (1 + p z),
# absolute error <= 1.5e-7. Phi(x) is 1 - erfc(z)/2 for x >= 0 and erfc(z)/2 for x < 0, so in both
#     GELU(x) = max(x, 0) - |x| erfc(z) / 2
# with no sign to apply. About twenty vectorised passes over pieces that stay in cache.
_AS_P = np.float32(0.3275911 / np.sqrt(2))                               # p / sqrt 2: t from |x|
_AS_A = [np.float32(-a / 2) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)]
_PIECE = 1 << 17                                                          # a5 ... a1, times -1/2


def _gelu_piece(x, out, a, t, e):
    """out = GELU(x) for a piece (a block of rows); a, t, e: scratch of the same shape."""
    np.abs(x, out=a)
    np.multiply(a, _AS_P, out=t)
    t += 1
    np.reciprocal(t, out=t)                            # t = 1 / (1 + p z)
    np.square(x, out=e)
    exp_times(e, -0.5, out=e)                          # e^(-z^2) = e^(-x^2/2)
    np.multiply(t, _AS_A[0], out=out)                  # Horner: -(((((a5 t + a4) t + a3) t + a2) t + a1) t) / 2
    for c in _AS_A[1:]:
        out += c
        out *= t
    e *= a
    out *= e                                           # -|x| erfc(z) / 2
    relu_into(x, out=a)
    out += a                                           # + max(x, 0)


def _gelu_pieces(x, out, value=None):
    """out = GELU(x) (times value when given) for 2-D arrays, in blocks of rows that fit in cache,
    the blocks split across threads."""
    rows = max(1, _PIECE // x.shape[1])

    def f(r0, r1):
        scratch = np.empty((3, rows, x.shape[1]), np.float32)
        for i in range(r0, r1, rows):
            j = min(r1, i + rows)
            _gelu_piece(x[i:j], out[i:j], *scratch[:, :j - i])
            if value is not None:
                out[i:j] *= value[i:j]
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


def _softmax_rows(x, out):
    """out = softmax of each row of x [R, n] (out may be x: in place); rows split across threads,
    and each thread's rows taken a block of about 1 MiB at a time, so that the passes after the
    first read the block from the core's cache."""
    step = max(1, (1 << 18) // x.shape[1])                              # rows per block

    def f(a, b):
        for i in range(a, b, step):
            r, o = x[i:min(b, i + step)], out[i:min(b, i + step)]
            np.subtract(r, r.max(axis=-1, keepdims=True), out=o)          # e^(x - max): no overflow
            exp_times(o, 1, out=o)
            o /= o.sum(axis=-1, keepdims=True)
    parallel(f, x.shape[0], x.size)
    return out


@single_threaded_blas
def softmax(x, axis=-1):
    x = np.moveaxis(x, axis, -1)
    if x.dtype == np.float32 and x.flags.c_contiguous:
        out = np.empty(x.shape, np.float32)
    else:
        x = out = np.array(x, dtype=np.float32, order="C")                # a copy, then in place
    _softmax_rows(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]))
    return np.moveaxis(out, -1, axis)


# ---------------------------------------------------------------------------------------------
# Linear: rows of x split across threads
# ---------------------------------------------------------------------------------------------

@single_threaded_blas
def linear(x, weight, bias=None):
    """nn.linear: x [..., in] @ weight.T [in, out] (+ bias)."""
    return linears(x, [(weight, bias)])[0]


@single_threaded_blas
def linears(x, layers):
    """nn.linears: x [..., in] through each (weight, bias) of `layers`, in one hand-off to the
    threads. A 3-D x that is not contiguous, such as the tokens [B, H*W, C] that are a transposed
    view of a [B, C, H, W] map, goes one image at a time: each image's [H*W, C] is then a transposed
    matrix that BLAS reads in place, where flattening the batch would copy it (a third of the time
    of a 320-channel projection over 4096 tokens)."""
    layers = [(upcast(weight), upcast(bias)) for weight, bias in layers]
    outs = [np.empty(x.shape[:-1] + (weight.shape[0],), np.float32) for weight, _ in layers]
    if x.ndim == 3 and not x.flags.c_contiguous:
        for i, xi in enumerate(x):
            _products(xi, layers, [out[i] for out in outs])
    else:
        _products(x.reshape(-1, x.shape[-1]), layers, [out.reshape(-1, out.shape[-1]) for out in outs])
    return outs


def _products(x2, layers, outs):
    """outs[i] [R, out_i] = x2 [R, in] @ weight_i.T (+ bias_i), every product split across the
    threads: by rows of x2, or by output columns when there are fewer rows than columns, as each
    thread's BLAS call packs its own copy of the weight part it reads, which costs most in short
    products (CLIP's 154 rows: 0.5-0.9x the time). The thread's pieces of all the products are one
    piece of work: CLIP's q, k and v then cost one hand-off, not three."""
    pieces = settings.THREADS

    def work(a, b):
        for (weight, bias), out in zip(layers, outs):
            by_columns = x2.shape[0] < out.shape[1]
            n = out.shape[1] if by_columns else x2.shape[0]
            s = slice(n * a // pieces, n * b // pieces)
            if by_columns:
                np.matmul(x2, weight.T[:, s], out=out[:, s])
                if bias is not None:
                    out[:, s] += bias[s]
            else:
                np.matmul(x2[s], weight.T, out=out[s])
                if bias is not None:
                    out[s] += bias
    parallel(work, pieces, sum(out.size for out in outs) * x2.shape[1], uses_blas=True)


# ---------------------------------------------------------------------------------------------
# Normalisation: statistics, then one fused scale-and-shift
# ---------------------------------------------------------------------------------------------

# einsum sums a row in a few running float32 accumulators: fine for LayerNorm's 320-768 values, but
# over GroupNorm's 10^4-10^6 its error reached 5e-5 (VAE at 512x512). So rows are summed in pieces
# of at most LONG_ROW values, and the pieces' sums added by NumPy's pairwise summation.
LONG_ROW = 4096


def _sum_squares(y, mean=None, step=None):
    """Row sums of (y - mean)^2 for y [R, n] (mean [R, 1], or None: of y^2). With step (a multiple of
    LONG_ROW), y - mean is formed step values at a time, so the temporaries stay small."""
    full = y.shape[1] // LONG_ROW * LONG_ROW
    centred = (lambda a: a) if mean is None else (lambda a: a - mean)
    pieces = []                                                           # [R, k] sums of k pieces of LONG_ROW
    for i in range(0, full, step or max(full, 1)):
        part = centred(y[:, i:min(full, i + (step or full))]).reshape(y.shape[0], -1, LONG_ROW)
        pieces.append(np.einsum("ijk,ijk->ij", part, part))
    total = np.concatenate(pieces, axis=1).sum(axis=1) if pieces else np.zeros(y.shape[0], np.float32)
    if full < y.shape[1]:
        tail = centred(y[:, full:])
        total += np.einsum("ij,ij->i", tail, tail)
    return total


def _centred_stats(x, y, eps):
    """y = x - mean, in y's memory, for rows x [R, n] -> (mean, 1 / sqrt(var + eps)), each [R, 1]."""
    mean = x.mean(axis=1, keepdims=True)                                 # pairwise sums, as the plain path
    np.subtract(x, mean, out=y)
    var = _sum_squares(y)[:, None] / np.float32(x.shape[1])               # mean of squared deviations
    return mean, 1 / np.sqrt(var + np.float32(eps))


def _normalise_rows(rows, eps, scale_shift):
    """rows [R, n] -> (rows - mean) / sqrt(var + eps), then scale_shift(out_rows, r0, r1) applies
    the affine part; returns a new array. Rows are split across threads."""
    out = np.empty(rows.shape, np.float32)

    def f(a, b):
        y = out[a:b]
        _, inv = _centred_stats(rows[a:b], y, eps)                         # y = x - mean
        y *= inv                                                           # (x - mean) / sqrt(var + eps)
        scale_shift(y, a, b)
    parallel(f, rows.shape[0], rows.size)
    return out


@single_threaded_blas
def group_norm(x, num_groups, weight, bias, eps):
    weight, bias = upcast(weight), upcast(bias)
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
    weight, bias = upcast(weight), upcast(bias)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])

    def affine(y, r0, r1):
        y *= weight
        y += bias
    return _normalise_rows(rows, eps, affine).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Attention: scores a block at a time, softmax in place, normalised after the P V product
# ---------------------------------------------------------------------------------------------

def attention_block_elements(vendor):
    """The scores (queries x keys) in one attention block. 2^18 (1 MiB: 64 queries x 4096 keys, a
    core's L2 cache), as first chosen; on AMD and Intel 2^19, twice the queries sharing each packing
    of K and V that BLAS makes per block: a 4096-token layer took 5-7% less time on both AMD machines
    of the README, the same on the Intel one, where the VAE's 512-wide head took 11% less
    (docs/speed.md section 4)."""
    return 2**19 if vendor in MEASURED_VENDORS else 2**18


BLOCK_ELEMENTS = attention_block_elements(VENDOR)

# The exponentials of the softmax are kept within [e^EXP_FLOOR, e^EXP_LIMIT]: below, float32's
# subnormal numbers (< 1.2e-38, which e^s times a small V value soon reaches), where a matrix product
# runs about 20x slower; above, room below float32's largest value (3.4e38) for the sums over M keys.
EXP_FLOOR = -60.0            # e^-60 = 8.8e-27
EXP_LIMIT = 80.0             # e^80 = 5.5e34


def _no_shift_rows(qh, kh, v1, m):
    """Which query rows may skip the softmax's max subtraction: those whose scores all lie in
    [-L, L], L = min(-EXP_FLOOR, EXP_LIMIT - ln(M max(1, |v|))), by Cauchy-Schwarz
    (|q.k| <= |q| max_j |k_j|); e^s then stays in the range above. qh: the queries as the kernel
    scales them, so that q.k is the score in exp_unit() (the bound is L times that unit). v1: [V 1]
    per head, [M, d+1] or transposed. -> bool [B, h, N]."""
    q_norm = np.sqrt(np.einsum("bhnd,bhnd->bhn", qh, qh))                  # [B, h, N]
    k_norm = np.sqrt(np.einsum("bhmd,bhmd->bhm", kh, kh).max(axis=-1))      # [B, h]
    v_max = np.abs(v1).max(axis=(2, 3))                                     # [B, h] (>= 1: the ones column)
    limit = np.minimum(np.float32(-EXP_FLOOR), np.float32(EXP_LIMIT) - np.log(np.float32(m) * v_max))
    return q_norm * k_norm[..., None] <= limit[..., None] * np.float32(exp_unit())


def score_blocks(n, m, heads=1, pairs=1):
    """(queries, heads, keys_first) of one score block, for N queries and M keys in `pairs` (image,
    head) pairs of which `heads` share an image.

    A block of scores is at most BLOCK_ELEMENTS, and its threads' blocks at most CHUNK_BYTES. When
    all N queries fit in one block, a block takes several heads of one image (a stacked product:
    CLIP's 77x77 scores of 12 heads, the UNet's scores at 16x16 and 8x8), as long as every thread
    still gets a block. It is stored keys first, as K Q^T, when there are more keys than queries in it
    (self-attention over 1024 and 4096 tokens): with the long side as the product's rows OpenBLAS's
    sgemm ran 1.2-1.6x faster on AMD (docs/speed.md, section 4); otherwise as Q K^T."""
    rows = max(1, min(n, BLOCK_ELEMENTS // m, settings.CHUNK_BYTES // (m * 4 * settings.THREADS)))
    group = 1
    if rows == n:
        group = max(1, min(heads, BLOCK_ELEMENTS // (n * m), -(-pairs // settings.THREADS)))
    return rows, group, m > rows


@single_threaded_blas
def attention(q, k, v, num_heads, causal=False):
    """nn.attention, whose checks the arguments have passed."""
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    qh = np.empty((b, num_heads, n, d), np.float32)                                            # [B, h, N, d]
    unit = exp_unit()                                                                          # scores in EXP's unit
    np.multiply(q.reshape(b, n, num_heads, d).transpose(0, 2, 1, 3), np.float32(unit / np.sqrt(d)), out=qh)
    kh = k.reshape(b, m, num_heads, d).transpose(0, 2, 1, 3)                                   # [B, h, M, d] (a view)
    rows, group, keys_first = score_blocks(n, m, num_heads, b * num_heads)
    # V with a column of ones: the P V product then also gives each row's sum of P (column d),
    # which saves a pass over the score block. Keys-first blocks take the whole block transposed,
    # S^T = K Q^T and then (P V)^T = [V 1]^T P^T, so V is stored transposed for them
    vh = v.reshape(b, m, num_heads, d).transpose(0, 2, 1, 3)                                   # [B, h, M, d]
    if keys_first:
        v1 = np.ones((b, num_heads, d + 1, m), np.float32)                                     # [B, h, d+1, M]
        v1[:, :, :d] = vh.transpose(0, 1, 3, 2)
    else:
        v1 = np.ones((b, num_heads, m, d + 1), np.float32)                                     # [B, h, M, d+1]
        v1[..., :d] = vh
    no_shift = _no_shift_rows(qh, kh, v1, m)                                                   # [B, h, N]
    out = np.empty((b, n, num_heads, d), dtype=np.float32)
    # K, copied once for the many query blocks that read it; or K^T, a view that BLAS reads in place
    keys = np.ascontiguousarray(kh) if keys_first else kh.transpose(0, 1, 3, 2)
    blocks = [(bi, h0, i0) for bi in range(b) for h0 in range(0, num_heads, group) for i0 in range(0, n, rows)]

    def work(j0, j1):
        s_buf = np.empty((group, m, rows) if keys_first else (group, rows, m), np.float32)
        for bi, h0, i0 in blocks[j0:j1]:
            h1, i1 = min(num_heads, h0 + group), min(n, i0 + rows)
            hs, qs = slice(h0, h1), qh[bi, h0:h1, i0:i1]                                # qs [g, n, d]
            if keys_first:                                                          # [g, n, M] scores,
                s_t = np.matmul(keys[bi, hs], qs.transpose(0, 2, 1), out=s_buf[:h1 - h0, :, :i1 - i0])
                s = s_t.transpose(0, 2, 1)                                          # stored as K Q^T
            else:
                s = np.matmul(qs, keys[bi, hs], out=s_buf[:h1 - h0, :i1 - i0])      # or as Q K^T
            if causal:                                                              # query i sees keys j <= i
                keep = (np.arange(i0, i1)[:, None] >= np.arange(m)).astype(np.float32)
            # unnormalised softmax in place: e^s where no score can leave the range, else
            # e^(s - max) (softmax is the same for any shift) with s - max raised to EXP_FLOOR:
            # beside the row's e^0 = 1, 4096 keys of e^-60 add 4e-23. The row sums divide the
            # [n, d] product. The scores are in exp_unit() (qh carries it), and so is the floor.
            if not no_shift[bi, hs, i0:i1].all():
                if causal:
                    s[:, keep == 0] = -np.inf                                       # maxima over the keys seen
                s -= s.max(axis=-1, keepdims=True)
                np.clip(s, np.float32(EXP_FLOOR * unit), np.float32(0), out=s)
            exp_in_place(s)
            if causal:                                  # hidden keys weigh 0 (as a product: 2^x of -inf
                s *= keep                               # leaves NumPy's vector loop, see EXP2_RANGE)
            if keys_first:                                                          # [g, d+1, n]
                o = np.matmul(v1[bi, hs], s_t)
                np.divide(o[:, :d], o[:, d:], out=out[bi, i0:i1, hs].transpose(1, 2, 0))   # / row sums
            else:                                                                   # [g, n, d+1]
                o = np.matmul(s, v1[bi, hs])
                np.divide(o[..., :d], o[..., d:], out=out[bi, i0:i1, hs].transpose(1, 0, 2))
    parallel(work, len(blocks), b * num_heads * n * m * (2 * d + 1), uses_blas=True)
    return out.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------

WINOGRAD = True                     # False: every 3x3 conv by im2col (to measure what Winograd gives)


def winograd_min_positions(vendor):
    """The fewest output positions (batch x height x width) of a 3x3 stride-1 conv that Winograd
    takes; below, transforming the weights on every call costs more than the multiplications save.
    Measured on AMD and Intel (1024: one image at 32x32); elsewhere 2048, as first chosen
    (docs/speed.md section 3)."""
    return 1024 if vendor in MEASURED_VENDORS else 2048


WINOGRAD_MIN_POSITIONS = winograd_min_positions(VENDOR)


def winograd_small_map_positions(vendor):
    """The fewest output positions of a 3x3 stride-1 conv below WINOGRAD_MIN_POSITIONS that still
    takes Winograd, as a small map (winograd_small_map). Measured on AMD and Intel: 512 (two images
    at 16x16, 0.78-0.95 of im2col's time; one image at 16x16 took 0.96 on AMD and 1.19 on Intel, so
    the line is not lower); elsewhere not measured, so no small maps there (docs/speed.md section 3)."""
    return 512 if vendor in MEASURED_VENDORS else winograd_min_positions(vendor)


WINOGRAD_SMALL_MAP_POSITIONS = winograd_small_map_positions(VENDOR)
# The fewest input channels C that Winograd takes. Its 16 products [O, C] @ [C, tiles] write 16 maps
# of O x tiles whatever C is, so with few channels they are all memory traffic: a conv_in with 3 or
# 4 channels took 3.6-5x im2col's time, 32 channels 1.3-1.6x, 64 about the same (0.9-1.1x; TAESD's
# 64-channel convs keep Winograd's row-by-row input, section 6 of docs/speed.md), 128 0.6-0.9x.
WINOGRAD_MIN_CHANNELS = 64


def uses_winograd(positions, channels, small_map=False):
    """Whether a 3x3 stride-1 conv with this many output positions (batch x height x width) and input
    channels goes through Winograd in bands rather than im2col; small_map=True: as a small map."""
    line = WINOGRAD_SMALL_MAP_POSITIONS if small_map else WINOGRAD_MIN_POSITIONS
    return WINOGRAD and positions >= line and channels >= WINOGRAD_MIN_CHANNELS


@single_threaded_blas
def conv2d(x, weight, bias, stride, pad):
    """nn.conv2d, whose checks the arguments have passed; pad = (top, bottom, left, right)."""
    weight, bias = upcast(weight), upcast(bias)
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
    elif kh == kw == 3 and stride == 1 and uses_winograd(b * ho * wo, c):
        y = winograd_f2x2_3x3(x, weight, pad, ho, wo)
    elif kh == kw == 3 and stride == 1 and uses_winograd(b * ho * wo, c, small_map=True):
        y = winograd_small_map(x, weight, pad, ho, wo)
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


# One band of im2col's columns for a conv of one image at a time. 16 MiB: the VAE encoder's stride-2
# conv at 512x512 (128 channels) took 178 ms against 320 ms with bands of CHUNK_BYTES (128 MiB) on a
# heap that had not held that much yet, as in a generation's one encode (173 against 190 ms on a heap
# that had; docs/speed.md section 2).
IM2COL_BAND_BYTES = 16 * 2**20


def _im2col_conv(x, weight, pad, stride, ho, wo):
    """im2col with the patch axis first: cols[(c, i, j), (n, r, x)] = xp[n, c, r*s + i, x*s + j], built
    by kh*kw slice copies of whole rows (contiguous runs), then W [O, C*kh*kw] @ cols. A band is some
    rows of one image, or, where whole images fit in one, several whole images: on small maps with
    large weights (the SD UNet's 16x16 and 8x8) one product reads the weights once for all of them."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    top, bottom, left, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) if any(pad) else x
    w2 = weight.reshape(o, c * kh * kw)
    y = np.empty((b, o, ho, wo), dtype=np.float32)
    row_bytes = wo * c * kh * kw * 4                                        # cols bytes per output row
    image_bytes = row_bytes * ho                                            # and per image
    rows = max(1, min(ho, settings.CHUNK_BYTES // row_bytes))
    # whole images per band, while their columns are no larger than the weights: each image added
    # then moves fewer bytes than reading the weights again would
    images = max(1, min(b, settings.CHUNK_BYTES // image_bytes, w2.nbytes // image_bytes)) if rows == ho else 1
    if images == 1:                       # else bands of rows, at most IM2COL_BAND_BYTES of columns
        rows = max(1, min(rows, IM2COL_BAND_BYTES // row_bytes))
    cols_buf = np.empty((c, kh, kw, images, rows, wo), np.float32)
    for b0 in range(0, b, images):
        b1 = min(b, b0 + images)
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            cols = cols_buf[:, :, :, :b1 - b0, :r1 - r0]

            def fill(c0, c1, b0=b0, b1=b1, r0=r0, r1=r1, cols=cols):
                for i in range(kh):
                    for j in range(kw):
                        cols[c0:c1, i, j] = xp[b0:b1, c0:c1, r0 * stride + i:(r1 - 1) * stride + i + 1:stride,
                                               j:j + (wo - 1) * stride + 1:stride].transpose(1, 0, 2, 3)
            parallel(fill, c, cols.size)
            cols2 = cols.reshape(c * kh * kw, -1)                           # [C*kh*kw, images*rows*Wo]
            yb = y[b0:b1, :, r0:r1].transpose(1, 0, 2, 3)                   # [O, images, rows, Wo] (a view)

            def gemm(o0, o1, cols2=cols2, yb=yb):
                yb[o0:o1] = (w2[o0:o1] @ cols2).reshape(yb[o0:o1].shape)
            parallel(gemm, o, o * cols2.size, uses_blas=True)
    return y


# Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"):
# each 2x2 output tile is Y = A^T [ (G g G^T) * (B^T d B) ] A, d the 4x4 input tile it reads,
# g the 3x3 kernel; 16 multiplications per tile and channel pair instead of 36.


WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
# U = G g G^T for a kernel g [3, 3], row by row: U.ravel() = kron(G, G) g.ravel() (kron(G, G)[(i, j),
# (k, l)] = G[i, k] G[j, l]); its entries are 0, 1, ±1/2 and ±1/4, so each U value is a sum of exact products
WINOGRAD_GG = np.kron(WINOGRAD_G, WINOGRAD_G)                              # [16, 9]


def winograd_weights(weight):
    """U = G g G^T for every (out, in) kernel g [3, 3]: [O, C, 3, 3] -> 16 matrices [O, C], as matrix
    products kron(G, G) [16, 9] @ [9, C], one per output channel; G = [[1, 0, 0], [1/2, 1/2, 1/2],
    [1/2, -1/2, 1/2], [0, 0, 1]]. U is stored [O, 16, C] (each matrix a view whose rows are 16 C
    apart), which these products write 1.3-1.9x faster than [16, O, C], and BLAS reads as fast."""
    o, c = weight.shape[:2]
    g = weight.reshape(o, c, 9).transpose(0, 2, 1)                        # [O, 9, C]
    u = np.empty((o, 16, c), np.float32)
    parallel(lambda a, b: np.matmul(WINOGRAD_GG, g[a:b], out=u[a:b]), o, 16 * o * c, uses_blas=True)
    return u.transpose(1, 0, 2)                                           # [16, O, C]


def _tile_padded(x, pad, ho, wo):
    """x [B, C, H, W] padded so that output tile (ty, tx) reads rows 2ty .. 2ty+3 and columns
    2tx .. 2tx+3 -> (padded x, tile rows, tile columns)."""
    h, w = x.shape[2:]
    top, bottom, left, right = pad
    th, tw = -(-ho // 2), -(-wo // 2)                                     # output tiles
    widths = ((0, 0), (0, 0), (top, 2 * th + 2 - h - top), (left, 2 * tw + 2 - w - left))
    return (np.pad(x, widths) if any(a or b for a, b in widths) else x), th, tw   # (np.pad always copies)


def winograd_f2x2_3x3(x, weight, pad, ho, wo):
    """A 3x3 stride-1 conv of x [B, C, H, W] (no bias) by Winograd -> [B, O, ho, wo]."""
    b, c = x.shape[:2]
    xp, _, _ = _tile_padded(x, pad, ho, wo)
    y = np.empty((b, weight.shape[0], ho, wo), dtype=np.float32)
    return winograd_rows(lambda bi, r0, r1: xp[bi, :, r0:r1], b, c, ho, wo, weight, None, y)


WINOGRAD_SLICE_BYTES = 16 * 2**20    # a thread's slice of transformed weights in winograd_small_map


def winograd_small_map(x, weight, pad, ho, wo):
    """winograd_f2x2_3x3 for small maps (the SD UNet's 16x16 level): the tiles of every image go into
    one V [16, C, tiles], and each thread transforms the weights of a slice of its output channels
    (WINOGRAD_SLICE_BYTES of U) just before its 16 products read them, so the whole layer's U
    (16/9 of its weights) never exists, and each slice is read from the cache. -> [B, O, ho, wo]."""
    b, c = x.shape[:2]
    o = weight.shape[0]
    xp, th, tw = _tile_padded(x, pad, ho, wo)
    v = np.empty((4, 4, c, b, th, tw), np.float32)

    def transform(c0, c1):
        for bi in range(b):
            _input_transform(xp[bi, c0:c1], v[:, :, c0:c1, bi], th, tw)
    parallel(transform, c, 16 * c * b * th * tw)
    vt = v.reshape(16, c, b * th * tw)
    y = np.empty((b, o, ho, wo), np.float32)
    step = max(1, WINOGRAD_SLICE_BYTES // (16 * c * 4))                   # output channels per slice

    def work(o0, o1):
        y_tile = np.empty((min(step, o1 - o0), 2 * th, 2 * tw), np.float32) if ho % 2 or wo % 2 else None
        for s0 in range(o0, o1, step):
            s1 = min(o1, s0 + step)
            u = winograd_weights(weight[s0:s1])                           # [16, s1 - s0, C], in this thread
            m = np.matmul(u, vt).reshape(4, 4, s1 - s0, b, th, tw)
            for bi in range(b):
                if y_tile is None:
                    _output_transform(m[:, :, :, bi], y[bi, s0:s1].reshape(s1 - s0, th, 2, tw, 2))
                else:                                                      # crop odd sizes
                    _output_transform(m[:, :, :, bi], y_tile[:s1 - s0].reshape(s1 - s0, th, 2, tw, 2))
                    y[bi, s0:s1] = y_tile[:s1 - s0, :ho, :wo]
    parallel(work, o, 16 * o * c * b * th * tw, uses_blas=True)
    return y


WINOGRAD_BAND_FRACTION = 8   # a band's transformed tiles (input and products) take CHUNK_BYTES / 8,
WINOGRAD_MIN_COLUMNS = 512    # or more, up to CHUNK_BYTES, to give the products at least this many columns


def winograd_rows(rows, b, c, ho, wo, weight, bias, out, add=False):
    """Winograd F(2x2, 3x3) of an input that `rows` hands over a band at a time: rows(bi, r0, r1) ->
    rows r0 .. r1-1 of image bi's input, zero-padded so that output tile (ty, tx) reads rows
    2ty .. 2ty+3 and columns 2tx .. 2tx+3: [C, r1 - r0, >= 2 tw + 2]. Writes conv + bias into
    out [B, O, ho, wo], or adds it there (add=True: a residual). Returns out."""
    o = weight.shape[0]
    th, tw = -(-ho // 2), -(-wo // 2)                                     # output tiles
    u = winograd_weights(weight)                                          # [16, O, C]
    row_bytes = 16 * max(c, o) * tw * 4 * 2                              # one tile row's V and M
    wide = min(-(-WINOGRAD_MIN_COLUMNS // tw), settings.CHUNK_BYTES // row_bytes)
    tr = max(1, min(th, max(settings.CHUNK_BYTES // WINOGRAD_BAND_FRACTION // row_bytes, wide)))  # tile rows per band
    v_buf = np.empty((16, c, tr * tw), np.float32)
    m_buf = np.empty((16, o, tr * tw), np.float32)
    y_buf = np.empty((o, 2 * tr, 2 * tw), np.float32) if add or ho % 2 or wo % 2 else None
    for bi in range(b):
        for t0 in range(0, th, tr):
            t1 = min(th, t0 + tr)
            n = t1 - t0
            v = v_buf[:, :, :n * tw].reshape(4, 4, c, n, tw)
            xb = rows(bi, 2 * t0, 2 * t1 + 2)                              # [C, 2n+2, Wp]
            parallel(lambda c0, c1: _input_transform(xb[c0:c1], v[:, :, c0:c1], n, tw), c, 16 * c * n * tw)
            vb, mb = v_buf[:, :, :n * tw], m_buf[:, :, :n * tw]
            # the 16 products M_ij = U_ij V_ij, [O, C] @ [C, n*tw], shared among the threads
            parallel(lambda i0, i1: np.matmul(u[i0:i1], vb[i0:i1], out=mb[i0:i1]), 16, mb.size * c, uses_blas=True)
            m = mb.reshape(4, 4, o, n, tw)
            r1 = min(ho, 2 * t1)                                           # this band's output rows: 2 t0 .. r1-1
            yb = out[bi, :, 2 * t0:2 * t1] if y_buf is None else y_buf[:, :2 * n]   # [O, 2n, 2tw]

            def finish(o0, o1, yb=yb, m=m, n=n, r0=2 * t0, r1=r1):
                _output_transform(m[:, :, o0:o1], yb[o0:o1].reshape(o1 - o0, n, 2, tw, 2))
                if bias is not None:
                    yb[o0:o1] += bias[o0:o1, None, None]
                if y_buf is not None:                                      # crop odd sizes; add a residual
                    target, tile = out[bi, o0:o1, r0:r1], yb[o0:o1, :r1 - r0, :wo]
                    if add:
                        target += tile
                    else:
                        target[...] = tile
            parallel(finish, o, 16 * o * n * tw)
    return out


def _bt_into(d, out):
    """out[i] = (B^T d)[i] for the four rows (or columns) d[0..3] of every tile at once;
    B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]."""
    np.subtract(d[0], d[2], out=out[0])
    np.add(d[1], d[2], out=out[1])
    np.subtract(d[2], d[1], out=out[2])
    np.subtract(d[1], d[3], out=out[3])


def _input_transform(xb, v, n, tw):
    """v[i, j] = (B^T d B)[i, j] for every tile (_bt_into)."""
    d = [xb[:, k:k + 2 * n:2] for k in range(4)]                          # 4 x [C, n, Wp]: tile row k
    rows = (d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3])            # B^T d, along rows
    for i, r in enumerate(rows):
        _bt_into([r[:, :, k:k + 2 * tw:2] for k in range(4)], v[i])       # (B^T d) B, along columns k


def _at_into(m, out):
    """out[a] = (A^T m)[a] for the four rows (or columns) m[0..3] of every tile's products at once;
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    np.add(m[0], m[1], out=out[0])
    np.add(out[0], m[2], out=out[0])
    np.subtract(m[1], m[2], out=out[1])
    np.subtract(out[1], m[3], out=out[1])


def _output_transform(m, yb):
    """yb[:, :, a, :, b] = (A^T M A)[a, b] for every tile (_at_into)."""
    s0 = [m[0, j] + m[1, j] + m[2, j] for j in range(4)]                   # A^T M, row 0
    s1 = [m[1, j] - m[2, j] - m[3, j] for j in range(4)]                   # A^T M, row 1
    for a, s in enumerate((s0, s1)):
        _at_into(s, (yb[:, :, a, :, 0], yb[:, :, a, :, 1]))               # (A^T M) A, along columns


# ---------------------------------------------------------------------------------------------
# VAE blocks (npsd/vae.py): the same formulas with fewer full-size maps
# ---------------------------------------------------------------------------------------------
# A 512x512 decode's largest activation is 256 channels at 512x512 (256 MiB). vae.py's plain blocks
# hold several maps of that size at once: GroupNorm's and SiLU's temporaries, the zero-padded copy a
# 3x3 conv makes of its input, the upsampled map and its padded copy, the residual sum. Here a 3x3
# conv (padding 1) reads its input from a row source: a function that hands over the rows of the
# zero-bordered input that one band of the conv needs, computed when asked for: silu(GroupNorm(x))
# (the statistics of each group computed first, as group_norm computes them) or the 2x upsampled
# map. So neither the normalised map nor the upsampled one ever exists in full. conv2 adds its result
# into the residual; and vae_decoder, which owns every map it makes, lets each resnet block overwrite
# its input: the skip (x, or its 1x1 conv written over x's first channels) then lives in x's memory.


def _row_source(b, c, h, w, fill):
    """rows(bi, r0, r1) for winograd_rows: rows r0 .. r1-1 [C, r1 - r0, 2 ceil(w/2) + 2] of image bi of
    a map [B, C, h, w] with a zero border (padded row r, column j is the map's row r - 1, column j - 1).
    fill(bi, lo, hi, dst) writes the map's rows lo .. hi-1 into dst [C, hi - lo, w]. One band buffer,
    reused: its columns outside the map stay zero."""
    wp = 2 * -(-w // 2) + 2
    buf = [np.zeros((c, 0, wp), np.float32)]

    def rows(bi, r0, r1):
        if buf[0].shape[1] < r1 - r0:
            buf[0] = np.zeros((c, r1 - r0, wp), np.float32)
        band = buf[0][:, :r1 - r0]
        lo, hi = max(r0 - 1, 0), min(r1 - 1, h)                            # the map's rows in this band
        band[:, :lo + 1 - r0] = 0                                          # the border above the map
        band[:, max(hi + 1 - r0, 0):] = 0                                  # and below it
        if hi > lo:
            fill(bi, lo, hi, band[:, lo + 1 - r0:hi + 1 - r0, 1:w + 1])
        return band
    return rows


def _group_stats(rows, eps):
    """Mean and 1 / sqrt(var + eps) of each row of rows [R, n] (one image's group each), as
    _centred_stats computes them, forming x - mean in steps of 64 pieces -> two [R, 1]."""
    mean, inv = np.empty((rows.shape[0], 1), np.float32), np.empty((rows.shape[0], 1), np.float32)

    def f(a, b):
        mean[a:b] = rows[a:b].mean(axis=1, keepdims=True)
        var = _sum_squares(rows[a:b], mean[a:b], step=64 * LONG_ROW)[:, None] / np.float32(rows.shape[1])
        inv[a:b] = 1 / np.sqrt(var + np.float32(eps))
    parallel(f, rows.shape[0], rows.size)
    return mean, inv


def norm_silu_rows(x, weight, bias, groups, eps):
    """The row source of silu(GroupNorm(x)), x [B, C, h, w]: each band's rows normalised when asked for,
    with the same operations as group_norm and silu (so the same values, bit for bit)."""
    b, c, h, w = x.shape
    weight, bias = upcast(weight)[:, None, None], upcast(bias)[:, None, None]   # [C, 1, 1]
    x = np.ascontiguousarray(x)
    mean, inv = _group_stats(x.reshape(b * groups, -1), eps)                 # [B*G, 1]
    per_channel = lambda a, bi: np.repeat(a[bi * groups:(bi + 1) * groups], c // groups)[:, None, None]

    def fill(bi, lo, hi, dst):
        m, s = per_channel(mean, bi), per_channel(inv, bi)                     # [C, 1, 1]

        def f(c0, c1):
            t = x[bi, c0:c1, lo:hi] - m[c0:c1]                                 # (x - mean) / std * weight + bias
            t *= s[c0:c1]
            t *= weight[c0:c1]
            t += bias[c0:c1]
            dst[c0:c1] = _times_sigmoid(t, 1, np.empty_like(t))                # silu(t), as silu computes it
        parallel(f, c, c * (hi - lo) * w)
    return _row_source(b, c, h, w, fill)


def upsample_rows(x):
    """The row source of nearest-neighbour 2x upsampling of x [B, C, h, w]: map row r, column j is
    x's row r // 2, column j // 2."""
    b, c, h, w = x.shape

    def fill(bi, lo, hi, dst):                                                 # dst [C, hi - lo, 2w]
        src = x[bi][:, np.arange(lo, hi) // 2]                                 # [C, hi - lo, w]
        dst[:, :, 0::2] = src
        dst[:, :, 1::2] = src
    return _row_source(b, c, 2 * h, 2 * w, fill)


def padded(rows, shape):
    """The whole zero-bordered map [B, C, h+2, w+2] of a row source of a map of `shape` [B, C, h, w]."""
    b, c, h, w = shape
    out = np.empty((b, c, h + 2, w + 2), np.float32)
    for bi in range(b):
        out[bi] = rows(bi, 0, h + 2)[:, :, :w + 2]                       # (the band buffer is reused)
    return out


def norm_silu_padded(x, weight, bias, groups, eps):
    """pad(silu(GroupNorm(x))) of x [B, C, H, W], whole: [B, C, H+2, W+2]."""
    return padded(norm_silu_rows(x, weight, bias, groups, eps), x.shape)


def upsample_padded(x):
    """pad(upsample_nearest(x)) of x [B, C, H, W], whole: [B, C, 2H+2, 2W+2]."""
    b, c, h, w = x.shape
    return padded(upsample_rows(x), (b, c, 2 * h, 2 * w))


@single_threaded_blas
def conv3x3_rows(rows, shape, conv, out=None):
    """conv(m) + bias, a 3x3 conv with padding 1 of the map m of `shape` [B, C, h, w] that `rows` hands
    over, by Winograd a band at a time (or im2col of the whole padded map, where conv2d would use
    it) -> [B, O, h, w]; out: add the conv into this array instead (a residual) and return it."""
    b, c, h, w = shape
    weight, bias = upcast(conv["weight"]), upcast(conv.get("bias"))
    if uses_winograd(b * h * w, c):
        y = np.empty((b, weight.shape[0], h, w), np.float32) if out is None else out
        return winograd_rows(rows, b, c, h, w, weight, bias, y, add=out is not None)
    y = conv2d(padded(rows, shape), weight, bias, 1, (0, 0, 0, 0))
    if out is None:
        return y
    out += y
    return out


@single_threaded_blas
def conv1x1_over_input(x, conv):
    """A 1x1 conv of one image x [1, C, H, W] to O <= C channels, written over x's first O channels a
    band of rows at a time (a band's result replaces input rows that no later band reads) -> x[:, :O]."""
    weight, bias = upcast(conv["weight"]), upcast(conv.get("bias"))
    o, c = weight.shape[:2]
    h, w = x.shape[2:]
    w2 = weight.reshape(o, c)
    rows = max(1, min(h, settings.CHUNK_BYTES // WINOGRAD_BAND_FRACTION // (o * w * 4)))
    y = np.empty((o, rows * w), np.float32)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        xb, yb = x[0, :, r0:r1].reshape(c, -1), y[:, :(r1 - r0) * w]         # [C, rows*W], [O, rows*W]
        parallel(lambda o0, o1: np.matmul(w2[o0:o1], xb, out=yb[o0:o1]), o, o * xb.size, uses_blas=True)
        if bias is not None:
            yb += bias[:, None]
        x[0, :o, r0:r1] = yb.reshape(o, r1 - r0, w)
    return x[:, :o]


def vae_norm_silu_conv(x, norm, conv, groups, eps):
    """vae.py's conv(silu(GroupNorm(x))), a 3x3 conv with padding 1: [B, C, H, W] -> [B, O, H, W]."""
    return conv3x3_rows(norm_silu_rows(x, norm["weight"], norm["bias"], groups, eps), x.shape, conv)


def vae_resnet_block(p, x, groups, eps, inplace=False):
    """vae.resnet_block: skip(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), [B, C, H, W] -> [B, O, H, W].
    inplace: x may be overwritten: the skip (x, or its 1x1 conv written over x's first O channels)
    takes no new map, conv2 adds into it, and the result is (a view of) x."""
    b, c = x.shape[:2]
    o = p["conv1"]["weight"].shape[0]
    h = vae_norm_silu_conv(x, p["norm1"], p["conv1"], groups, eps)            # [B, O, H, W]
    rows = norm_silu_rows(h, p["norm2"]["weight"], p["norm2"]["bias"], groups, eps)
    if inplace and ("conv_shortcut" not in p or (b == 1 and o <= c)):
        skip = conv1x1_over_input(x, p["conv_shortcut"]) if "conv_shortcut" in p else x   # in x's memory
        return conv3x3_rows(rows, h.shape, p["conv2"], out=skip)                # skip += conv2(...)
    h = conv3x3_rows(rows, h.shape, p["conv2"])                                 # [B, O, H, W]
    if "conv_shortcut" in p:
        s = p["conv_shortcut"]
        h += conv2d(x, s["weight"], s.get("bias"), 1, (0, 0, 0, 0))           # 1x1: [B, C, H, W] -> [B, O, H, W]
    else:
        h += x
    return h


def vae_upsample(p, x):
    """vae.upsample: conv(upsample_nearest(x)), a 3x3 conv with padding 1: [B, C, h, w] -> [B, O, 2h, 2w]."""
    b, c, h, w = x.shape
    return conv3x3_rows(upsample_rows(x), (b, c, 2 * h, 2 * w), p["conv"])


def vae_encoder(p, x, groups, eps, attention):
    """vae.encoder (without a trace): the same blocks in the same order, but every map after conv_in
    is this function's own, so a resnet block overwrites its input (inplace=True) wherever its output
    has no more channels than its input. groups, attention: as for vae_decoder."""
    resnet = _inplace_resnet(groups, eps)
    x = conv2d(x, p["conv_in"]["weight"], p["conv_in"].get("bias"), 1, (1, 1, 1, 1))   # [B, 128, H, W]
    for block in p["down_blocks"]:                                             # 128@H -> ... -> 512@H/8
        for res in block["resnets"]:
            x = resnet(res, x)
        if block.get("downsamplers"):                                          # pad right and bottom, stride 2
            conv = block["downsamplers"][0]["conv"]
            x = conv2d(x, conv["weight"], conv.get("bias"), 2, (0, 1, 0, 1))
    x = _vae_mid_block(p["mid_block"], x, resnet, attention)
    return vae_norm_silu_conv(x, p["conv_norm_out"], p["conv_out"], groups(p["conv_norm_out"]), eps)


def vae_decoder(p, z, groups, eps, attention):
    """vae.decoder (without a trace): the same blocks in the same order, but every map is this
    function's own, so each resnet block overwrites its input (inplace=True). groups(*norms): the
    config's groups, checked against those GroupNorms; attention(p, x): vae.attention_block."""
    resnet = _inplace_resnet(groups, eps)
    x = conv2d(z, p["conv_in"]["weight"], p["conv_in"].get("bias"), 1, (1, 1, 1, 1))   # [B, 512, h, w]
    x = _vae_mid_block(p["mid_block"], x, resnet, attention)
    for block in p["up_blocks"]:                                               # 512@2h -> ... -> 128@8h
        for res in block["resnets"]:
            x = resnet(res, x)
        if block.get("upsamplers"):
            x = vae_upsample(block["upsamplers"][0], x)
    return vae_norm_silu_conv(x, p["conv_norm_out"], p["conv_out"], groups(p["conv_norm_out"]), eps)


def _inplace_resnet(groups, eps):
    """resnet(p, x) for vae_encoder and vae_decoder: vae_resnet_block, overwriting x where it can."""
    return lambda res, x: vae_resnet_block(res, x, groups(res["norm1"], res["norm2"]), eps, inplace=True)


def _vae_mid_block(mid, x, resnet, attention):
    """vae.mid_block: resnet, then (attention, resnet) pairs; attention may be absent."""
    x = resnet(mid["resnets"][0], x)
    for attn, res in zip(mid.get("attentions") or [None] * (len(mid["resnets"]) - 1), mid["resnets"][1:]):
        if attn is not None:
            x = attention(attn, x)
        x = resnet(res, x)
    return x


# ---------------------------------------------------------------------------------------------
# TAESD blocks (npsd/taesd.py): each ReLU and 2x upsampling applied as the next conv reads its rows
# ---------------------------------------------------------------------------------------------
# TAESD's 64-channel 3x3 convs at up to 512x512 spend more time moving data than multiplying: the
# zero-padded copy conv2d makes of each input, and a new map for every ReLU and upsampling. Here a
# conv reads relu(x) or upsample(x) band by band (as the VAE's convs read silu(GroupNorm(x))), and
# a block's last conv adds into its input, which the decoder owns.


def map_rows(x, relu=False):
    """The row source of x [B, C, h, w], or of max(x, 0) (relu=True)."""
    b, c, h, w = x.shape

    def fill(bi, lo, hi, dst):
        def f(c0, c1):
            if relu:
                relu_into(x[bi, c0:c1, lo:hi], out=dst[c0:c1])
            else:
                dst[c0:c1] = x[bi, c0:c1, lo:hi]
        parallel(f, c, c * (hi - lo) * w)
    return _row_source(b, c, h, w, fill)


def taesd_block(p, x, inplace=False):
    """taesd.block: relu(conv(relu(conv(relu(conv(x))))) + skip(x)), [B, C, H, W] -> [B, O, H, W].
    inplace: x may be overwritten; without a 1x1 skip the result is then x itself."""
    conv = p["conv"]
    h = conv3x3_rows(map_rows(x), x.shape, conv[0])                             # [B, O, H, W]
    h = conv3x3_rows(map_rows(h, relu=True), h.shape, conv[2])
    if "skip" in p:
        skip = conv2d(x, p["skip"]["weight"], None, 1, (0, 0, 0, 0))            # 1x1: [B, O, H, W]
    else:
        skip = x if inplace else x.copy()
    y = conv3x3_rows(map_rows(h, relu=True), h.shape, conv[4], out=skip)       # skip += conv(relu(h))
    return relu_into(y, out=y)


def taesd_decoder(layers, x):
    """taesd.decoder after its clamp: layers [(kind, params)] as taesd._kind names them, x [B, C, h, w]
    (this function's own). The same layers in the same order; the 2x upsampling is left to the conv
    that reads it, the ReLU after a conv is done in place. Maps of even height and width go through
    taesd_decoder_split instead."""
    if WINOGRAD and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0:
        return taesd_decoder_split(layers, x)
    upsample, previous = False, None
    for kind, layer in layers:
        if kind is None:                              # after a conv the ReLU, after a block the upsampling
            if previous == "conv":
                relu_into(x, out=x)
            else:
                upsample = True
        elif upsample and kind == "conv":
            b, c, h, w = x.shape
            x = conv3x3_rows(upsample_rows(x), (b, c, 2 * h, 2 * w), layer)
            upsample = False
        else:
            if upsample:                              # (not in SD's TAESD: an upsampling before a block)
                x, upsample = x.repeat(2, axis=2).repeat(2, axis=3), False
            x = conv3x3_rows(map_rows(x), x.shape, layer) if kind == "conv" else taesd_block(layer, x, inplace=True)
        previous = kind
    return x.repeat(2, axis=2).repeat(2, axis=3) if upsample else x


# ---------------------------------------------------------------------------------------------
# TAESD's decoder channels-last, with even and odd columns apart
# ---------------------------------------------------------------------------------------------
# With 64 channels, Winograd's transforms above run along rows of single values (a tile's columns
# are 2 apart) and its 16 products [64, 64] @ [64, tiles] are a shape OpenBLAS runs slowly. Here a
# map [C, H, W] of one image is kept channels-last and zero-bordered, its even and odd columns
# apart: [H + 2, 2, W/2 + 1, C], padded column j at [:, j % 2, j // 2] ("split"). Tile tx reads the
# padded columns 2tx .. 2tx+3, that is [:, 0, tx], [:, 1, tx], [:, 0, tx+1], [:, 1, tx+1]: for all
# tiles at once, four slices whose rows of tw * C values are contiguous. The products become
# V_ij [tiles, C] @ U_ij [C, O], and the output transform writes a tile's two columns, 2tx and 2tx+1
# (padded 2tx+1 and 2tx+2), into [:, 1, tx] and [:, 0, tx+1]: the next conv's input, already split.


WINOGRAD_SPLIT_BAND_BYTES = 2**21    # a band's V in winograd_split (tile rows x tw x 16 x C floats)


def split_empty(h, w, c):
    """An uninitialised split map of a [c, h, w] map (h, w even), its zero border written."""
    s = np.empty((h + 2, 2, w // 2 + 1, c), np.float32)
    s[0], s[-1], s[:, 0, 0], s[:, 1, -1] = 0, 0, 0, 0                      # padded rows 0, h+1; cols 0, w+1
    return s


def split_map(x):
    """x [C, H, W] (H, W even) -> its split map [H + 2, 2, W/2 + 1, C]."""
    c, h, w = x.shape
    s = split_empty(h, w, c)
    xt = x.transpose(1, 2, 0)                                               # [H, W, C] (a view)
    s[1:-1, 1, :-1] = xt[:, 0::2]                                           # column 2i: padded 2i+1
    s[1:-1, 0, 1:] = xt[:, 1::2]                                            # column 2i+1: padded 2i+2
    return s


def split_columns(s):
    """A split map's [H, W, C] in column order (a new array)."""
    h, wh, c = s.shape[0] - 2, s.shape[2] - 1, s.shape[3]
    x = np.empty((h, 2 * wh, c), np.float32)
    x[:, 0::2], x[:, 1::2] = s[1:-1, 1, :-1], s[1:-1, 0, 1:]
    return x


def upsample_split(s):
    """The 2x nearest upsampling of a split map, split: upsampled column J is column J // 2, so
    padded column 2i (parity 0) holds column i - 1 and 2i + 1 (parity 1) column i."""
    x = split_columns(s)                                                    # [H, W, C]
    h, w, c = x.shape
    up = split_empty(2 * h, 2 * w, c)
    for a in (0, 1):                                                       # upsampled rows 2r + a: row r
        up[1 + a:-1:2, 0, 1:] = x
        up[1 + a:-1:2, 1, :-1] = x
    return up


@single_threaded_blas
def winograd_split(s, weight, bias, out=None, relu=False):
    """conv(x) + bias for a 3x3 conv with padding 1 of the split map s -> a split map [.., O]; out:
    add the conv into this split map instead (a residual). relu: max(., 0) of the result."""
    h, tw, c = s.shape[0] - 2, s.shape[2] - 1, s.shape[3]
    th, o = h // 2, weight.shape[0]
    u = np.ascontiguousarray(winograd_weights(weight).transpose(0, 2, 1))   # [16, C, O]
    y = split_empty(h, 2 * tw, o) if out is None else out
    band = max(1, min(th, WINOGRAD_SPLIT_BAND_BYTES // (16 * tw * max(c, o) * 4)))   # tile rows a band

    def work(b0, b1):
        cc = np.empty((4, 2 * band + 2, tw, c), np.float32)
        v = np.empty((16, band * tw, c), np.float32)
        m = np.empty((16, band * tw, o), np.float32)
        r = np.empty((2, 4, band, tw, o), np.float32)
        for t0 in range(b0 * band, min(th, b1 * band), band):
            n = min(th, t0 + band) - t0
            x = s[2 * t0:2 * t0 + 2 * n + 2]                                 # [2n+2, 2, tw+1, C]
            d = cc[:, :2 * n + 2]                                             # d B, along columns k:
            _bt_into((x[:, 0, :-1], x[:, 1, :-1], x[:, 0, 1:], x[:, 1, 1:]), d)   # [2n+2, tw, C] each
            vb = v[:, :n * tw].reshape(4, 4, n, tw, c)
            for j in range(4):                                               # B^T (d B), along rows i
                _bt_into([d[j, i:i + 2 * n:2] for i in range(4)], vb[:, j])    # [n, tw, C] each
            mb = np.matmul(v[:, :n * tw], u, out=m[:, :n * tw]).reshape(4, 4, n, tw, o)   # M_ij = V_ij U_ij
            rb = r[:, :, :n]
            for j in range(4):                                              # A^T M, rows 0 and 1
                _at_into(mb[:, j], rb[:, j])
            for a in (0, 1):                                                # (A^T M) A: columns 2tx, 2tx+1
                rows = y[1 + a + 2 * t0:1 + a + 2 * (t0 + n):2]               # output rows 2ty + a
                even, odd = rows[:, 1, :-1], rows[:, 0, 1:]                   # padded columns 2tx+1, 2tx+2
                if out is None:
                    _at_into(rb[a], (even, odd))
                else:                                                       # a residual: add both into it
                    even += rb[a, 0]
                    even += rb[a, 1]
                    even += rb[a, 2]
                    odd += rb[a, 1]
                    odd -= rb[a, 2]
                    odd -= rb[a, 3]
                for col in (even, odd):
                    if bias is not None:
                        col += bias
                    if relu:
                        relu_into(col, out=col)
    parallel(work, -(-th // band), 16 * th * tw * c, uses_blas=True)
    return y


def conv_split(s, conv, out=None, relu=False):
    """winograd_split with a conv's params {"weight", "bias"?}."""
    return winograd_split(s, upcast(conv["weight"]), upcast(conv.get("bias")), out, relu)


def taesd_block_split(p, s):
    """taesd_block of a split map that may be overwritten: relu(conv(relu(conv(relu(conv(x))))) +
    skip(x)); without a 1x1 skip the result is s itself."""
    conv = p["conv"]
    h = conv_split(conv_split(s, conv[0], relu=True), conv[2], relu=True)
    if "skip" in p:                               # 1x1, no bias: the border stays 0
        c = s.shape[-1]
        skip = np.matmul(s.reshape(-1, c), upcast(p["skip"]["weight"]).reshape(-1, c).T)
        s = skip.reshape(s.shape[:-1] + (skip.shape[-1],))
    return conv_split(h, conv[4], out=s, relu=True)                       # s += conv(h), then relu


def taesd_decoder_split(layers, x):
    """taesd_decoder for maps of even height and width, each image as a split map throughout."""
    images = []
    for xi in x:
        s, previous = split_map(xi), None
        for kind, layer in layers:
            if kind is None:                          # after a conv the ReLU, after a block the upsampling
                s = relu_into(s, out=s) if previous == "conv" else upsample_split(s)
            elif kind == "conv":
                s = conv_split(s, layer)
            else:
                s = taesd_block_split(layer, s)
            previous = kind
        images.append(split_columns(s).transpose(2, 0, 1))
    return np.stack(images)
