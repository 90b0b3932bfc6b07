"""Random numbers: NumPy's generator, or torch's CPU generator rewritten in NumPy.

Every pipeline call draws all its noise from one generator object with a single method,
``standard_normal(shape, dtype=np.float32)``. Two kinds exist:

- ``rng="numpy"`` (the default): ``np.random.default_rng(seed)``, NumPy's PCG64 and ziggurat.
- ``rng="torch"``: ``TorchGenerator(seed)``, which returns, bit for bit, the float32 numbers of
  ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` on x86-64, so that a
  seed given to diffusers (or to A1111 with its "CPU" noise source) gives the same noise in npsd.
  torch is not needed: the generator is written here from the published algorithms.

torch's CPU generator, as ``aten`` implements it:

1. Mersenne Twister MT19937 (Matsumoto & Nishimura 1998), seeded with ``init_genrand(seed)``: the
   state word 0 is the seed's low 32 bits, word i is 1812433253 * (w ^ (w >> 30)) + i (mod 2^32).
2. A float32 uniform in [0, 1) from each 32-bit output: its low 24 bits times 2^-24.
3. Normal numbers by the Box-Muller transform. A float32 tensor of at least 16 elements first draws
   one uniform per element, then transforms them in blocks of 16: for j < 8,
   r = sqrt(-2 log(1 - u[j])), theta = 2 pi u[j + 8], out[j] = r cos(theta), out[j + 8] = r sin(theta),
   computed in float32 with the polynomial log and sincos of Pommier's "sse_mathfun" (as ported to
   AVX in ``avx_mathfun.h``). When the size is not a multiple of 16, the last 16 elements are drawn
   again (16 new uniforms) and transformed as one more block, overwriting the tail.
   A smaller tensor takes another path: one double-precision normal per element, each from two
   53-bit uniforms (r = sqrt(-2 log1p(-u2)), theta = 2 pi u1), the sine half cached for the next draw.

torch built for other processors (ARM) transforms with the C library's logf/sinf/cosf instead of
step 3's polynomials; its numbers can differ from these in the last bits (docs/reproducibility.md).
"""

import math

import numpy as np

from .errors import InputError

RNG_KINDS = ("numpy", "torch")

# Seeds are whole numbers in [0, SEED_LIMIT): torch's manual_seed takes 64-bit seeds (its MT19937
# reads their low 32 bits, step 1 above), and ComfyUI's seeds go up to 2**64 - 1. A seed npsd
# draws itself stays below 2**32, as A1111's do.
SEED_LIMIT = 2**64


def make_rng(kind, seed, variation=None):
    """The generator of one pipeline call: kind "numpy" or "torch", seed an integer in [0, SEED_LIMIT),
    or a tuple of them, one per image (PerImage). variation: (variation seed, strength, delta, resize)
    for A1111's seed options (Variation), image b of a tuple of seeds with variation seed + b."""
    if isinstance(seed, tuple):
        if kind not in RNG_KINDS:
            raise InputError(f"rng must be one of {', '.join(RNG_KINDS)}, got {kind!r}")
        if variation is not None:
            vseed, *rest = variation
            return PerImage([Variation(kind, s, vseed + b, *rest) for b, s in enumerate(seed)])
        return PerImage([make_rng(kind, s) for s in seed])
    if variation is not None:
        return Variation(kind, seed, *variation)
    if kind == "numpy":
        return np.random.default_rng(seed)
    if kind == "torch":
        return TorchGenerator(seed)
    raise InputError(f"rng must be one of {', '.join(RNG_KINDS)}, got {kind!r}")


class PerImage:
    """One generator per image of a batch, as diffusers' pipelines use a list of generators (and
    A1111 one generator per image): a draw for the whole batch [B, ...] takes image b's part from
    generator b; a draw for one image [1, ...] (an input image's VAE sample in inpainting) from the
    first, as diffusers does."""

    def __init__(self, generators):
        self.generators = generators

    def standard_normal(self, shape, dtype=np.float32):
        if shape[0] == len(self.generators):
            return np.concatenate([g.standard_normal((1,) + tuple(shape[1:]), dtype=dtype) for g in self.generators])
        if shape[0] == 1:
            return self.generators[0].standard_normal(shape, dtype=dtype)
        raise InputError(f"{len(self.generators)} seeds for a draw of {shape[0]} images; give one seed per image")


class Variation:
    """AUTOMATIC1111's seed options around an image's generator (its modules/rng.py, ImageRNG): the
    first draw, the start noise, is slerp(strength, that draw, the variation seed's first draw)
    ("Variation seed" and "Variation strength"); with delta > 0 ("Eta noise seed delta", ENSD),
    every later draw (the samplers' noise) comes from a fresh generator of seed + delta instead.
    resize: (h, w) latents of "Seed resize from" (None: off): the seed's (and the variation seed's)
    noise is drawn at that size by fresh generators of those seeds, mixed, and pasted centred into
    the generator's own full-size first draw (paste_centred)."""

    def __init__(self, kind, seed, variation_seed, strength, delta, resize=None):
        self.kind, self.seed, self.variation_seed, self.strength, self.delta = kind, seed, variation_seed, strength, delta
        self.resize = resize
        self.generator, self.first = make_rng(kind, seed), True

    def standard_normal(self, shape, dtype=np.float32):
        if not self.first:
            return self.generator.standard_normal(shape, dtype=dtype)
        self.first = False
        shape = tuple(shape)
        small = shape if self.resize is None else shape[:2] + tuple(self.resize)      # [B, C, h', w']
        x = self.own = self.generator.standard_normal(shape, dtype=dtype)       # the seed's own first draw
        noise = x if small == shape else make_rng(self.kind, self.seed).standard_normal(small, dtype=dtype)
        if self.strength:
            noise = slerp(self.strength, noise, make_rng(self.kind, self.variation_seed).standard_normal(small, dtype=dtype))
        if small != shape:
            noise = paste_centred(x, noise)
        if self.delta:
            self.generator = make_rng(self.kind, self.seed + self.delta)
        return noise


def seed_noise(rng, noise):
    """The seeds' own first draw, without A1111's variation seed and seed resize: what its "latent
    noise" inpainting fill takes (create_random_tensors of the seeds alone). rng: the generator (a
    Variation, or PerImage of them) whose first draw was noise, which it is without those options."""
    generators = rng.generators if isinstance(rng, PerImage) else [rng]
    if not all(isinstance(g, Variation) and not g.first for g in generators):
        return noise
    return np.concatenate([g.own for g in generators])


def paste_centred(x, noise):
    """noise [B, C, h', w'] pasted into x [B, C, h, w] (a copy) centred as A1111's ImageRNG.first
    places it: offsets d = (h - h') // 2 (floored); a smaller noise goes in whole at d, a larger one
    loses -d rows at its start and h' + 2d in all (so an odd excess leaves x's last row)."""
    x = x.copy()
    (h, w), (hs, ws) = x.shape[2:], noise.shape[2:]
    dy, dx = (h - hs) // 2, (w - ws) // 2
    rows, cols = hs + 2 * min(dy, 0), ws + 2 * min(dx, 0)                        # what is pasted
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)           # where to, where from
    x[:, :, ty:ty + rows, tx:tx + cols] = noise[:, :, sy:sy + rows, sx:sx + cols]
    return x


def slerp(t, a, b):
    """A1111's spherical interpolation of two noises a, b [B, C, h, w] (modules/rng.py): per image,
    channel and column, the angle between the columns a and b normalised over their h values, and
    sin((1 - t) w) / sin(w) a + sin(t w) / sin(w) b; where an image's cosines average over 0.9995,
    the straight mix t a + (1 - t) b (A1111's order)."""
    an = a / np.linalg.norm(a, axis=2, keepdims=True)
    bn = b / np.linalg.norm(b, axis=2, keepdims=True)
    cos = (an * bn).sum(axis=2)                                            # [B, C, w]
    with np.errstate(invalid="ignore", divide="ignore"):                   # (the straight case's angles)
        omega = np.arccos(cos)
        s = np.sin(omega)
        curved = (np.sin((1.0 - t) * omega) / s)[:, :, None] * a + (np.sin(t * omega) / s)[:, :, None] * b
    straight = cos.mean(axis=(1, 2)) > 0.9995                              # [B]
    return np.where(straight[:, None, None, None], a * t + b * (1 - t), curved).astype(a.dtype)


# --- Mersenne Twister MT19937 ------------------------------------------------------------------

_N, _M = 624, 397


class MT19937:
    """The 32-bit Mersenne Twister, vectorised: ``random_raw(n)`` -> uint32 [n]."""

    def __init__(self, seed):
        mt = [int(seed) & 0xFFFFFFFF]
        for i in range(1, _N):                                              # init_genrand
            w = mt[-1]
            mt.append((1812433253 * (w ^ (w >> 30)) + i) & 0xFFFFFFFF)
        self.state = np.array(mt, dtype=np.uint32)
        self.pos = _N                                                       # twist before the first output

    def _twist(self):
        """The recurrence x[k+N] = x[k+M] ^ ((upper(x[k]) | lower(x[k+1])) A), in four vectorised
        slices: each slice reads only words that are final by then (old ones ahead, new ones behind)."""
        mt = self.state
        for lo, hi in ((0, _N - _M), (_N - _M, 2 * (_N - _M)), (2 * (_N - _M), _N - 1), (_N - 1, _N)):
            k = np.arange(lo, hi)
            y = (mt[k] & np.uint32(0x80000000)) | (mt[(k + 1) % _N] & np.uint32(0x7FFFFFFF))
            mag = np.where(y & np.uint32(1), np.uint32(0x9908B0DF), np.uint32(0))
            mt[k] = mt[(k + _M) % _N] ^ (y >> np.uint32(1)) ^ mag
        self.pos = 0

    def random_raw(self, n):
        out = np.empty(n, dtype=np.uint32)
        filled = 0
        while filled < n:
            if self.pos == _N:
                self._twist()
            take = min(n - filled, _N - self.pos)
            y = self.state[self.pos:self.pos + take].copy()                  # tempering
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            out[filled:filled + take] = y
            filled += take
            self.pos += take
        return out


# --- float32 log and sincos of sse_mathfun / avx_mathfun ----------------------------------------
# Cephes' single-precision polynomials, each operation rounded to float32 as the SIMD code does. The
# compiler (GCC, -ffp-contract=fast) fuses each multiply feeding an add into one FMA instruction
# (a single rounding); ``fma`` marks those places. Verified bit for bit against torch.randn.

F = np.float32
_LOG_P = [F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                         1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                         3.3333331174e-1)]
_SQRTHF, _LOG_Q1, _LOG_Q2 = F(0.707106781186547524), F(-2.12194440e-4), F(0.693359375)
_DP1, _DP2, _DP3 = F(-0.78515625), F(-2.4187564849853515625e-4), F(-3.77489497744594108e-8)
_SIN_P = [F(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COS_P = [F(c) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)]
_FOPI = F(1.27323954473516)                                                  # 4 / pi


def fma(a, b, c):
    """float32 a * b + c with one rounding (an FMA instruction), for normal float32 arrays.

    The product of two float32 is exact in float64; the float64 sum is rounded once more when cast
    to float32, which differs from one rounding only when that sum is exactly halfway between two
    float32 values: there the exact sum's error (Knuth's TwoSum) says which way to round."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    v = s - p
    err = (p - (s - v)) + (c - v)                                           # exact: p + c = s + err
    r = s.astype(F)
    toward = np.where(s > r, np.inf, -np.inf).astype(F)
    halfway = (r.astype(np.float64) + np.nextafter(r, toward).astype(np.float64)) / 2 == s
    fix = halfway & (err != 0)
    if fix.any():
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        r = s.astype(F)
    return r


def log_ps(x):
    """Natural log of float32 x > 0 (normal numbers), as ``log256_ps``."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(F) + F(1)                               # exponent + 1
    x = ((bits & ~0x7F800000) | 0x3F000000).view(F)                         # mantissa in [0.5, 1)
    small = x < _SQRTHF                                                     # then use 2x - 1, e - 1
    tmp = np.where(small, x, F(0))
    x = x - F(1)
    e = e - np.where(small, F(1), F(0))
    x = x + tmp
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:                                                    # Horner: y = y x + p
        y = fma(y, x, p)
    y = fma(y * x, z, e * _LOG_Q1)                                          # y x^3 z + e q1
    y = fma(-z, F(0.5), y)                                                  # - z / 2
    return fma(e, _LOG_Q2, x + y)                                           # + e log(2)


def sincos_ps(x):
    """(sin x, cos x) of float32 x >= 0, as ``sincos256_ps`` (Cephes' sinf/cosf reduction)."""
    j = (x * _FOPI).astype(np.int32)                                        # octant, truncated
    j = (j + 1) & ~1
    y = j.astype(F)
    x = fma(y, _DP3, fma(y, _DP2, fma(y, _DP1, x)))                         # x - j pi/4 in three parts
    sin_neg = (j & 4) != 0
    cos_neg = ((j - 2) & 4) == 0
    sin_poly_for_sin = (j & 2) == 0                                         # else the cosine polynomial
    z = x * x
    yc = fma(fma(fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2]) * z, z, -(z * F(0.5))) + F(1)
    ys = fma(fma(fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2]) * z, x, x)
    s = np.where(sin_poly_for_sin, ys, yc)
    c = np.where(sin_poly_for_sin, yc, ys)
    return np.where(sin_neg, -s, s), np.where(cos_neg, -c, c)


# --- torch's CPU generator ------------------------------------------------------------------------

_TWO_PI = F(2.0 * math.pi)


def _box_muller_16(u):
    """Blocks of 16 uniforms [k, 16] -> 16 normals each (float32, torch's ``normal_fill_16``)."""
    u1 = F(1) - u[:, :8]                                                    # (0, 1] for the log
    r = np.sqrt(F(-2) * log_ps(u1))
    s, c = sincos_ps(_TWO_PI * u[:, 8:])
    return np.concatenate([r * c, r * s], axis=1)


class TorchGenerator:
    """torch.Generator("cpu").manual_seed(seed) in NumPy; ``standard_normal`` as torch.randn.

    Successive calls continue the same stream, as successive torch.randn calls with one generator do.
    """

    def __init__(self, seed):
        self.seed = int(seed)
        self.engine = MT19937(seed)
        self._next_normal = None                                            # the cached sine half

    def uniform24(self, n):
        """n float32 uniforms in [0, 1): the low 24 bits of each output, times 2^-24."""
        return (self.engine.random_raw(n) & np.uint32(0xFFFFFF)).astype(F) * F(2.0 ** -24)

    def _normal_double(self):
        if self._next_normal is not None:
            z, self._next_normal = self._next_normal, None
            return z
        w = [int(v) for v in self.engine.random_raw(4)]                     # two random64(): hi, lo
        a, b = (w[0] << 32) | w[1], (w[2] << 32) | w[3]
        u1, u2 = (a & (2 ** 53 - 1)) * 2.0 ** -53, (b & (2 ** 53 - 1)) * 2.0 ** -53
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = r * math.sin(theta)
        return r * math.cos(theta)

    def standard_normal(self, shape, dtype=np.float32):
        if np.dtype(dtype) != np.float32:
            raise InputError(f"the torch-compatible generator draws float32 only, not {np.dtype(dtype)}")
        shape = tuple(int(d) for d in np.atleast_1d(shape)) if not isinstance(shape, int) else (shape,)
        n = math.prod(shape)
        if n < 16:                                                          # torch's scalar path
            return np.array([self._normal_double() for _ in range(n)], dtype=F).reshape(shape)
        u = self.uniform24(n)
        full = n // 16 * 16
        out = np.empty(n, dtype=F)
        out[:full] = _box_muller_16(u[:full].reshape(-1, 16)).ravel()
        if n != full:                                                       # redraw the last 16
            out[n - 16:] = _box_muller_16(self.uniform24(16)[None])[0]
        return out.reshape(shape)
