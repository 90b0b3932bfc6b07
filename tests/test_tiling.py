"""Tiling (AUTOMATIC1111's "Tiling", seamless images): every padded convolution of the UNet and the
VAE wraps around the map instead of reading zeros, as A1111 does by setting padding_mode="circular"
on every torch.nn.Conv2d of its model (modules/sd_hijack.py, apply_circular).

The layer, against torch's circular padding (F.pad(mode="circular") then the conv), on both the
plain and the fast path: measured 9.3e-8 .. 6.0e-7, tolerance RTOL_LAYER = 1e-5 (as tests/test_nn.py).
Whole runs, against diffusers' pipelines whose UNet and VAE have every Conv2d set to circular (A1111's
procedure on diffusers' models; the VAE's downsampler pads with F.pad zeros before a conv of padding
0, so it stays zeros on both sides), from the seed alone (rng="torch"): txt2img, img2img and
inpainting measured 1.3e-6 .. 2.2e-6, tolerance TOL_IMAGE = 2e-5 (tests/test_same_seed.py's); the
hires fix against tests/test_hires_options.py's A1111 run with circular convs, 2.0e-6 and 2.9e-6. The
full-size UNet and VAE are checked in tests/test_unet.py and tests/test_vae.py.
"""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import npsd
import npsd.pipeline
from npsd import nn, settings
from npsd import vae as vae_model
from npsd.errors import InputError
from npsd.testing import assert_close
from tests.helpers import TILING_BUGS, circular, n2t, t2n
from npsd.hires import Hires
from tests.test_a1111_pipeline import GUIDANCE, NEGATIVE, PROMPT
from tests.test_hires_options import TOL_8BIT, a1111_hires_run
from tests.test_kdiffusion import kd  # noqa: F401 - the fixture
from tests.test_pipelines import make_image, models, npsd_pipe  # noqa: F401
from tests.test_same_seed import run_both

RTOL_LAYER = 1e-5
TOL_IMAGE = 2e-5
rng = np.random.default_rng(0)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")    # diffusers' schedulers, NumPy 2


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def torch_circular_conv(x, w, b, stride, pad):
    t = F.pad(n2t(x), (pad, pad, pad, pad), mode="circular")              # F.pad: (left, right, top, bottom)
    return t2n(F.conv2d(t, n2t(w), None if b is None else n2t(b), stride=stride))


CASES = [
    # (x shape, out channels, kernel, stride, padding)
    ((2, 320, 64, 64), 320, 3, 1, 1),              # UNet level 1 (the fast path's Winograd)
    ((2, 4, 64, 64), 320, 3, 1, 1),                # UNet conv_in
    ((2, 640, 32, 32), 640, 3, 2, 1),              # UNet downsampler (stride 2)
    ((3, 13, 5, 7), 6, 3, 1, 1),                   # odd: batch 3, non-square
    ((1, 8, 5, 3), 4, 3, 2, 1),                    # stride 2 on odd sides (5 -> 3, 3 -> 2)
    ((2, 8, 1, 3), 4, 3, 1, 1),                    # one row: it wraps onto itself
    ((1, 3, 11, 10), 4, 5, 2, 2),                  # 5x5 kernel, padding 2
]


@pytest.fixture(params=["fast", "plain"])
def kernels(request):
    with nn.fast(request.param == "fast"):
        yield request.param


@pytest.mark.parametrize("xs, cout, k, stride, pad", CASES)
def test_circular_conv2d_equals_torch(kernels, xs, cout, k, stride, pad):
    cin = xs[1]
    x, w, b = randn(*xs), randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5), randn(cout)
    ref = torch_circular_conv(x, w, b, stride, pad)
    c = assert_close(nn.conv2d(x, w, b, stride=stride, padding=pad, padding_mode="circular"), ref, RTOL_LAYER)
    print(f"{kernels}: {c}, tolerance {RTOL_LAYER:g}")
    with settings.padding_mode("circular"):                            # the setting a generation sets
        assert_close(nn.conv2d(x, w, b, stride=stride, padding=pad), ref, RTOL_LAYER)


def test_circular_setting_leaves_explicit_zeros_and_unpadded_convs(kernels):
    """padding_mode="zeros" (the VAE's downsampler, TAESD) and a 1x1 conv are as before under the setting."""
    x, w3, w1 = randn(1, 8, 9, 8), randn(8, 8, 3, 3, scale=0.1), randn(4, 8, 1, 1)
    zero_pad = t2n(F.conv2d(F.pad(n2t(x), (0, 1, 0, 1)), n2t(w3), stride=2))
    with settings.padding_mode("circular"):
        assert_close(nn.conv2d(x, w3, stride=2, padding=(0, 1, 0, 1), padding_mode="zeros"), zero_pad, RTOL_LAYER)
        assert_close(nn.conv2d(x, w1), t2n(F.conv2d(n2t(x), n2t(w1))), RTOL_LAYER)
    assert settings.PADDING_MODE == "zeros"                          # restored after the block


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_wrong_border_fails(mode):
    """Mutants of the layer: the border reflected, or left zero, instead of wrapped; each fails the
    layer check on its tolerance."""
    x, w = randn(1, 16, 12, 12), randn(16, 16, 3, 3, scale=1 / 12)
    ref = torch_circular_conv(x, w, None, 1, 1)
    wrong = (nn.conv2d(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect"), w) if mode == "reflect"
             else nn.conv2d(x, w, padding=1))
    with pytest.raises(AssertionError, match="exceeds the tolerance") as failure:
        assert_close(wrong, ref, RTOL_LAYER, f"border {mode}")
    print(f"\n  {str(failure.value).split('; ')[0]}")


# ---------------------------------------------------------------------------------------------
# Whole runs against diffusers' pipelines with circular convolutions (A1111's Tiling)
# ---------------------------------------------------------------------------------------------

RUNS = [("txt2img", "unet4", None, "euler_a"), ("txt2img", "unet4", None, "dpmpp_2m"),
        ("img2img", "unet4", 0.6, "euler"), ("inpaint", "unet9", 0.75, "ddim")]


def tiled_runs(models, mode, unet_key, strength, sampler):
    with circular(models[unet_key], models["vae"]):
        return run_both(models, mode, sampler, False, 21, unet_key=unet_key, strength=strength,
                        npsd_kw={"tiling": True})


@pytest.mark.parametrize("mode, unet_key, strength, sampler", RUNS)
def test_tiled_run_equals_diffusers_with_circular_convs(models, mode, unet_key, strength, sampler):
    ours, ref = tiled_runs(models, mode, unet_key, strength, sampler)
    print(f"{assert_close(ours, ref, TOL_IMAGE, f'{mode} {sampler} tiled')}, tolerance {TOL_IMAGE:g}")


def _zeros_in(function):
    """function run with zero padding whatever the setting."""
    def run(*args, **kwargs):
        with settings.padding_mode("zeros"):
            return function(*args, **kwargs)
    return run


@pytest.mark.parametrize("bug", ["tiling ignored", "VAE decoder zero-padded", "tiling_downsamplers_zeros"])
def test_tiling_bugs_fail(models, monkeypatch, bug):
    """npsd mutants: tiling not applied at all, not in the VAE's decoder, not in the UNet's
    stride-2 downsamplers; each fails the txt2img check on its tolerance."""
    if bug == "tiling ignored":
        monkeypatch.setattr(npsd.pipeline, "padding_mode", lambda mode: contextlib.nullcontext())
    elif bug == "VAE decoder zero-padded":
        monkeypatch.setattr(vae_model, "decoder", _zeros_in(vae_model.decoder))
    else:
        bug = TILING_BUGS[bug]
        bug.inject(monkeypatch)
    ours, ref = tiled_runs(models, "txt2img", "unet4", None, "euler")
    with pytest.raises(AssertionError, match="exceeds the tolerance") as failure:
        assert_close(ours, ref, TOL_IMAGE, str(bug))
    print(f"\n  {str(failure.value).split('; ')[0]}")


def test_tiled_image_wraps_and_untiled_is_unchanged():
    """On the built-in model (trained, so its images are smooth), the opposite edges of a tiled image
    continue each other: the mean jump across the wrap (last row to first, last column to first) is
    like the jumps between neighbours inside (ratio 0.58 .. 1.04 over seeds 0-5 and two prompts),
    while without tiling it is larger (1.58 .. 2.56); tiling=False gives the numbers of no argument."""
    pipe = npsd.load()

    def jumps(img):
        img = img[0]
        inside = np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean()
        across = np.abs(img[0] - img[-1]).mean() + np.abs(img[:, 0] - img[:, -1]).mean()
        return across / inside

    for seed in (0, 1):
        kw = dict(seed=seed, output_type="np")
        plain, off = pipe.txt2img(PROMPT, **kw), pipe.txt2img(PROMPT, tiling=False, **kw)
        tiled = pipe.txt2img(PROMPT, tiling=True, **kw)
        assert np.array_equal(plain, off)
        print(f"seed {seed}: jump across the edges / inside, untiled {jumps(plain):.2f}, tiled {jumps(tiled):.2f}")
        assert jumps(tiled) < 1.25 and jumps(plain) > 1.4


def test_bad_tiling_and_tiled_vae_decode_are_one_line_errors(models):
    pipe = npsd_pipe(models)
    with pytest.raises(InputError, match="tiling must be True or False"):
        pipe.txt2img("x", tiling="yes", num_inference_steps=1)
    assert settings.PADDING_MODE == "zeros"
    with settings.padding_mode("circular"), pytest.raises(InputError, match="decode in one piece"):
        pipe.vae_decode(np.zeros((1, 4, 8, 8), np.float32), tile_size=4)
    with pytest.raises(ValueError, match="padding mode must be one of zeros, circular"):
        with settings.padding_mode("reflect"):
            pass


HIRES_CASES = {  # name: (sampler, schedule type, Hires, tolerance)
    "latent upscaler": ("euler_a", "automatic", Hires(scale=1.5, upscaler="latent", steps=3, strength=0.6), TOL_IMAGE),
    "image upscaler (8-bit image)": ("dpmpp_2m", "karras", Hires(scale=1.5, upscaler="none", steps=3, strength=0.5),
                                     TOL_8BIT),
}


@pytest.mark.parametrize("case", HIRES_CASES)
def test_tiled_hires_fix_equals_an_a1111_run(kd, models, case):  # noqa: F811
    """The hires fix with tiling against tests/test_hires_options.py's A1111 run with every Conv2d of
    the UNet and the VAE circular: both passes, and with an image upscaler the decode and encode
    between them, wrap around (measured 2.0e-6 and 2.9e-6). Tiling left out of the second pass
    (its UNet zero-padded) fails the check."""
    sampler, schedule_type, hires, tol = HIRES_CASES[case]
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=GUIDANCE, height=32, width=32, seed=21,
              rng="torch", sampler=sampler, schedule_type=schedule_type, output_type="np", hires=hires)
    pipe = npsd_pipe(models)
    ours = pipe.txt2img(PROMPT, tiling=True, **kw)
    with circular(models["unet4"], models["vae"]):
        ref = a1111_hires_run(kd, models, sampler, schedule_type, 21, 4, 32, 32, hires)
    print(f"{assert_close(ours, ref, tol, f'tiled hires, {case}')}, tolerance {tol:g}")
    second = pipe._hires_pass
    pipe._hires_pass = lambda *a, **k: _zeros_in(second)(*a, **k)                # the second pass untiled
    with pytest.raises(AssertionError, match="exceeds the tolerance") as failure:
        assert_close(pipe.txt2img(PROMPT, tiling=True, **kw), ref, tol, f"tiled hires, {case}, second pass untiled")
    print(f"  {str(failure.value).split('; ')[0]}")
