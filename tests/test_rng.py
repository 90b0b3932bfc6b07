"""npsd.rng.TorchGenerator against torch.randn with torch.Generator("cpu").manual_seed(seed): the
same float32 numbers, bit for bit (compared as int32 bit patterns, tolerance 0), for the shapes npsd
draws, for torch's two code paths (tensors of fewer than 16 elements take a double-precision path;
larger ones are filled in blocks of 16, with a redrawn tail when the size is not a multiple of 16),
and for several draws in a row from one generator.
"""

import math
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from npsd.rng import MT19937, TorchGenerator, fma, log_ps, make_rng, sincos_ps

SEEDS = (0, 1, 42, 123456789, 2**31, 2**32 - 1)
SHAPES = [
    (1, 4, 64, 64), (2, 4, 64, 64), (3, 4, 16, 16), (1, 4, 96, 96),      # latents and per-step noise
    (1, 4, 9, 9), (2, 4, 5, 7), (33,), (17,), (16,), (48,),              # tails and exact multiples of 16
    (1,), (3,), (15,), (2, 7), (1, 4, 1, 3),                             # fewer than 16: the scalar path
]


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


@pytest.mark.parametrize("seed", SEEDS)
def test_bit_exact_sequence_of_draws(seed):
    """All shapes above, drawn one after another from one generator (the stream continues), equal
    torch's draws from one torch generator."""
    g, ours = torch.Generator("cpu").manual_seed(seed), TorchGenerator(seed)
    for shape in SHAPES:
        ref = torch.randn(shape, generator=g).numpy()
        got = ours.standard_normal(shape, dtype=np.float32)
        assert got.shape == ref.shape and got.dtype == np.float32
        same = bits(got) == bits(ref)
        assert same.all(), f"seed {seed}, shape {shape}: {int((~same).sum())} of {same.size} values differ"


@pytest.mark.parametrize("seed", [2**32, 2**32 + 5, 2**63 + 12345, 2**64 - 1])
def test_64_bit_seeds_as_torch_reads_them(seed):
    """torch.Generator.manual_seed takes any seed below 2**64 (ComfyUI's go that high); its MT19937
    reads the low 32 bits. The same numbers, bit for bit."""
    ref = torch.randn((1, 4, 9, 9), generator=torch.Generator("cpu").manual_seed(seed)).numpy()
    assert np.array_equal(bits(TorchGenerator(seed).standard_normal((1, 4, 9, 9))), bits(ref))


def test_a_million_numbers_bit_exact():
    ref = torch.randn(2**20, generator=torch.Generator("cpu").manual_seed(20261201)).numpy()
    got = TorchGenerator(20261201).standard_normal(2**20)
    assert np.array_equal(bits(got), bits(ref))


def test_mersenne_twister_is_mt19937_as_numpy_seeds_it():
    """init_genrand + MT19937: the raw 32-bit outputs equal NumPy's legacy RandomState (the same
    published algorithm and seeding), across several twists."""
    for seed in (0, 5489, 2**32 - 1):
        ours = MT19937(seed).random_raw(3 * 624 + 5)
        ref = np.random.RandomState(seed).randint(0, 2**32, size=3 * 624 + 5, dtype=np.uint32)
        assert np.array_equal(ours, ref)
    assert MT19937(5489).random_raw(1)[0] == 3499211612            # the reference implementation's first output


def test_fma_rounds_once():
    """a * b + c rounded once, against exact rational arithmetic; the second case is a sum that lands
    exactly halfway between two float32 values in float64, where rounding twice goes the wrong way."""
    a = np.float32(1 + 2**-12)
    c_cases = [np.float32(2.0**-80), np.float32(-(2.0**-80)), np.float32(0.1), np.float32(-1)]
    rng = np.random.default_rng(0)
    xs = rng.standard_normal(1000).astype(np.float32)
    ys = rng.standard_normal(1000).astype(np.float32)
    zs = rng.standard_normal(1000).astype(np.float32)
    for x, y, z in [(a, a, c) for c in c_cases] + list(zip(xs, ys, zs)):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        got = fma(np.array([x]), np.array([y]), np.array([z]))[0]
        lo = np.float32(float(exact))                              # a neighbour of the exact value
        cands = [lo, np.nextafter(lo, np.float32(np.inf)), np.nextafter(lo, np.float32(-np.inf))]
        best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(bits(np.array([v]))[0]) & 1))
        assert got == best, (x, y, z, got, best)
    naive = np.float32(np.float64(a) * np.float64(a) + np.float64(2.0**-80))
    assert fma(np.array([a]), np.array([a]), np.array([np.float32(2.0**-80)]))[0] != naive


def test_polynomial_log_and_sincos_are_accurate():
    """The float32 polynomials are a few ulp from the true functions (their purpose is exactness with
    torch, but a wrong constant would show here as a large error)."""
    u = np.linspace(2**-24, 1, 100001, dtype=np.float32)
    assert np.abs(log_ps(u) - np.log(u.astype(np.float64))).max() < 1e-6 * 20
    x = np.linspace(0, 2 * math.pi, 100001, dtype=np.float32)
    s, c = sincos_ps(x)
    assert np.abs(s - np.sin(x.astype(np.float64))).max() < 1e-6
    assert np.abs(c - np.cos(x.astype(np.float64))).max() < 1e-6


def test_sensitivity_a_wrong_transform_fails():
    """One rounding step done differently (a separate multiply and add instead of the fused one)
    already changes about 1% of the numbers by one ulp: bit-exactness is a real constraint."""
    ref = torch.randn(2**16, generator=torch.Generator("cpu").manual_seed(3)).numpy()
    u = TorchGenerator(3).uniform24(2**16).reshape(-1, 16)
    theta = np.float32(2 * math.pi) * u[:, 8:]
    s, c = np.sin(theta), np.cos(theta)                             # libm's instead of torch's polynomial
    r = np.sqrt(np.float32(-2) * log_ps(np.float32(1) - u[:, :8]))
    other = np.concatenate([r * c, r * s], axis=1).ravel()
    assert not np.array_equal(bits(other), bits(ref))
    assert np.abs(other - ref).max() < 1e-5                          # close, but not the same numbers


def test_only_float32_and_known_kinds():
    from npsd.errors import InputError
    with pytest.raises(InputError, match="float32 only"):
        TorchGenerator(0).standard_normal((4,), dtype=np.float64)
    with pytest.raises(InputError, match="rng must be one of numpy, torch"):
        make_rng("philox", 0)
    assert isinstance(make_rng("numpy", 0), np.random.Generator)


def test_speed_is_not_a_visible_part_of_a_generation():
    """A 512x512 batch of 2's latents (32,768 numbers) in well under a UNet step (seconds)."""
    g = TorchGenerator(0)
    g.standard_normal((2, 4, 64, 64))                               # warm up
    t0 = time.perf_counter()
    g.standard_normal((2, 4, 64, 64))
    took = time.perf_counter() - t0
    print(f"TorchGenerator: 2x4x64x64 in {took * 1e3:.1f} ms")
    assert took < 0.25


def test_generation_with_torch_rng_never_imports_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, npsd\n"
            "pipe = npsd.load()\n"
            "img = pipe.txt2img('a red circle on a blue background', seed=1, rng='torch', sampler='euler_a',\n"
            "                   num_inference_steps=2, output_type='np')\n"
            "print('ok', img.shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_a_list_of_seeds_is_checked_before_any_step():
    """seed=[...] takes one whole number in [0, 2**64) per image (prompts x num_images), checked before
    anything runs; one seed in a list is the plain seed."""
    import npsd
    from npsd.errors import InputError
    pipe = npsd.load()

    def refuse(*step):
        raise AssertionError("a step ran")

    for seed, message in (([], "seed must be a whole number in \\[0, 2\\*\\*64\\) or a list of them"),
                          ([1, -1], "or a list of them, one per image, got \\[1, -1\\]"),
                          ([1, 2, 3], "3 seeds for 2 images; give one seed, or one per image")):
        with pytest.raises(InputError, match=message):
            pipe.txt2img("a red circle", num_images=2, seed=seed, num_inference_steps=2, callback=refuse)
    one = pipe.txt2img("a red circle", seed=[9], num_inference_steps=2, rng="torch", output_type="np")
    assert np.array_equal(one, pipe.txt2img("a red circle", seed=9, num_inference_steps=2, rng="torch",
                                            output_type="np"))


def test_variation_seeds_per_image_and_their_checks():
    """A1111's seed options (npsd.rng.Variation): image b of a list of seeds has the variation seed
    + b, so it is the image made alone from seed b and variation seed + b; after the first draw ENSD's
    generator gives the rest. Bad values are one line each, before any step."""
    import npsd
    from npsd.errors import InputError
    many = make_rng("torch", (3, 4), (10, 0.4, 5))
    one = make_rng("torch", 4, (11, 0.4, 5))
    assert np.array_equal(many.standard_normal((2, 4, 8, 8))[1:], one.standard_normal((1, 4, 8, 8)))
    later = one.standard_normal((1, 4, 8, 8))
    assert np.array_equal(later, TorchGenerator(4 + 5).standard_normal((1, 4, 8, 8)))
    pipe = npsd.load()

    def refuse(*step):
        raise AssertionError("a step ran")

    for kw, message in (({"variation_strength": 0.5}, "variation_strength needs a variation_seed"),
                        ({"variation_seed": 3, "variation_strength": 1.5}, "variation_strength must be a number in"),
                        ({"variation_seed": -3, "variation_strength": 0.5}, "variation_seed must be a whole number"),
                        ({"eta_noise_seed_delta": 2**64 - 5}, "eta_noise_seed_delta must be a whole number")):
        with pytest.raises(InputError, match=message):
            pipe.txt2img("a red circle", seed=9, num_inference_steps=2, callback=refuse, **kw)
    # the variation mixes the first draw, so no posterior sample may come before it
    from PIL import Image
    with pytest.raises(InputError, match="sample_posterior=True would draw before it"):
        pipe.img2img("a red circle", Image.new("RGB", (64, 64)), seed=9, num_inference_steps=2, callback=refuse,
                     rng="torch", variation_seed=3, variation_strength=0.5, sample_posterior=True)


def a1111_slerp(val, low, high):
    """A1111's modules/rng.py slerp, as A1111 writes it (one image's noise [C, h, w])."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def a1111_image_rng_first(shape, seeds, subseeds, subseed_strength, seed_resize_from_h, seed_resize_from_w, f=8):
    """A1111's modules/rng.py ImageRNG.first with its "CPU" noise, as A1111 writes it (randn(seed, shape):
    torch's global generator seeded with seed; its h // 8 with the VAE factor f) -> (noise [B, C, h, w],
    the images' generators after it)."""
    def randn(seed, shape, generator=None):
        return torch.randn(shape, generator=generator if generator is not None else torch.Generator().manual_seed(seed))

    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    noise_shape = shape if seed_resize_from_h <= 0 or seed_resize_from_w <= 0 else (
        shape[0], seed_resize_from_h // f, seed_resize_from_w // f)
    xs = []
    for i, (seed, generator) in enumerate(zip(seeds, generators)):
        subnoise = None
        if subseeds is not None and subseed_strength != 0:
            subseed = 0 if i >= len(subseeds) else subseeds[i]
            subnoise = randn(subseed, noise_shape)
        if noise_shape != shape:
            noise = randn(seed, noise_shape)
        else:
            noise = randn(seed, shape, generator=generator)
        if subnoise is not None:
            noise = a1111_slerp(subseed_strength, noise, subnoise)
        if noise_shape != shape:
            x = randn(seed, shape, generator=generator)
            dx = (shape[2] - noise_shape[2]) // 2
            dy = (shape[1] - noise_shape[1]) // 2
            w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
            h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
            tx = 0 if dx < 0 else dx
            ty = 0 if dy < 0 else dy
            dx = max(-dx, 0)
            dy = max(-dy, 0)
            x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
            noise = x
        xs.append(noise)
    return torch.stack(xs).numpy(), generators


# (latent h, w of the image, pixels h, w of "Seed resize from"): smaller, larger (cropped), odd
# excesses both ways, one side each way, and the image's own size (no paste)
RESIZES = [((12, 16), (64, 96)), ((12, 16), (160, 200)), ((13, 16), (88, 152)), ((12, 15), (120, 64)),
           ((12, 16), (96, 128)), ((10, 10), (80, 84))]


@pytest.mark.parametrize("size, resize", RESIZES)
@pytest.mark.parametrize("strength", [0.0, 0.35])
def test_seed_resize_equals_a1111s_image_rng(size, resize, strength):
    """npsd.rng.Variation with "Seed resize from" against A1111's ImageRNG.first (above, as A1111 writes
    it): the seeds' noise drawn at the other size, mixed with the variation seeds', pasted centred into
    each image's full-size first draw; each generator then goes on after that one full draw. Two
    seeds per batch (A1111's seed + i, variation seed + i). The paste and draws are bit for bit; the
    slerp's float32 arithmetic differs by at most 1.8e-7 (relative, measured), tolerance 2e-6. The same draw
    without the resize is far off (asserted)."""
    from npsd.testing import assert_close
    shape, (rh, rw) = (4, *size), resize
    ref, generators = a1111_image_rng_first(shape, [7, 8], [30, 31], strength, rh, rw)
    g = make_rng("torch", (7, 8), (30, strength, 0, (rh // 8, rw // 8)))
    ours = g.standard_normal((2, *shape))
    print(assert_close(ours, ref, 2e-6, f"seed resize {resize} to {size}, strength {strength}"))
    after = g.standard_normal((2, *shape))
    assert np.array_equal(after, np.stack([torch.randn(shape, generator=q).numpy() for q in generators]))
    plain = make_rng("torch", (7, 8), (30, strength, 0, None)).standard_normal((2, *shape))
    if (rh // 8, rw // 8) != size:
        assert np.abs(plain - ref).max() > 1.0
    else:
        assert np.array_equal(plain, ours)


def test_seed_resize_noise_multiplier_and_mask_weight_checks():
    """seed_resize_from_h/_w, initial_noise_multiplier and inpainting_mask_weight: bad values are one
    line each, before any step; A1111's inpainting options need a schedule_type in inpaint."""
    import npsd
    from PIL import Image
    from npsd.errors import InputError
    pipe = npsd.load()
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)

    def refuse(*step):
        raise AssertionError("a step ran")

    cases = [("txt2img", {"seed_resize_from_h": -8, "seed_resize_from_w": 64}, "seed_resize_from_h must be 0 \\(off\\) or"),
             ("txt2img", {"seed_resize_from_h": 64}, "seed_resize_from_h and seed_resize_from_w go together"),
             ("txt2img", {"seed_resize_from_h": 2, "seed_resize_from_w": 64}, "a whole number of pixels >= 4, got 2"),
             ("img2img", {"initial_noise_multiplier": -0.5}, "initial_noise_multiplier must be a finite number >= 0"),
             ("img2img", {"initial_noise_multiplier": float("nan")}, "initial_noise_multiplier must be a finite"),
             ("img2img", {"inpainting_mask_weight": 1.5}, "inpainting_mask_weight must be a number in \\[0, 1\\]"),
             ("inpaint", {"initial_noise_multiplier": 0.9}, "are A1111's inpainting's: give a schedule_type")]
    for mode, kw, message in cases:
        args = {"txt2img": (), "img2img": (image,), "inpaint": (image, mask)}[mode]
        with pytest.raises(InputError, match=message) as e:
            getattr(pipe, mode)("a red circle", *args, seed=9, num_inference_steps=2, callback=refuse, **kw)
        assert "\n" not in str(e.value)
