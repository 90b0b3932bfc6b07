"""npsd/hires.py: the latent upscalers against torch.nn.functional.interpolate (what A1111's hires fix
calls), and the Hires settings' checks. The whole hires fix against an A1111 run is in
tests/test_a1111_pipeline.py.

TOL = 1e-5 relative (of latents of max |x| about 4): measured at most 5.0e-6 (antialiased bicubic;
bilinear 2.1e-6, bicubic 1.5e-6, antialiased bilinear 1.1e-7, nearest and nearest-exact exact):
float32 rounding of the source coordinates and weights. Reading the source pixel of "nearest" at the centre ((i + 0.5) scale,
nearest-exact's rule) is 1.2 off.
"""

import numpy as np
import pytest
import torch

import npsd
from npsd.errors import InputError
from npsd.hires import LATENT_UPSCALERS, UPSCALERS, Hires, upscale_latents
from npsd.testing import assert_close

TOL = 1e-5
SIZES = [(14, 10), (15, 11), (16, 8), (7, 5), (21, 13), (96, 64)]


def latents(shape=(2, 4, 7, 5), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", LATENT_UPSCALERS)
def test_upscalers_equal_torch_interpolate(name):
    label, mode = UPSCALERS[name]
    worst = 0.0
    for size in SIZES:
        x = latents((2, 4, size[0] // 2 + 1, size[1] // 2 + 1)) * 1.3
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode.replace("-aa", ""),
                                              antialias="antialiased" in label).numpy()
        worst = max(worst, assert_close(upscale_latents(x, *size, name), ref, TOL, f"{label} to {size}").max_rel)
    print(f"{label} ({mode}): {worst:.3g}")


def test_nearest_at_the_centre_fails():
    """torch's "nearest" reads floor(i * in / out), "nearest-exact" floor((i + 0.5) * in / out): swapping
    them is a real difference."""
    x = latents()
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(15, 11), mode="nearest").numpy()
    wrong = upscale_latents(x, 15, 11, "latent_nearest_exact")
    err = float(np.abs(wrong - ref).max() / np.abs(ref).max())
    print(f"nearest-exact for nearest: {err:.3g} (tolerance {TOL})")
    assert err > 100 * TOL


def test_antialiased_bicubic_is_its_own_kernel():
    """A1111's "Latent (bicubic antialiased)" is torch's antialiased bicubic, which differs from the
    plain one even when enlarging (PIL's kernel, a = -0.5): passing one for the other fails far."""
    x = latents()
    smooth = torch.nn.functional.interpolate(torch.from_numpy(x), size=(14, 10), mode="bicubic",
                                             antialias=True).numpy()
    plain = upscale_latents(x, 14, 10, "latent_bicubic")
    err = float(np.abs(plain - smooth).max() / np.abs(smooth).max())
    print(f"plain bicubic for the antialiased one: {err:.3g} (tolerance {TOL})")
    assert err > 100 * TOL


def test_size_is_a1111s():
    """int(scale * side), rounded down to the VAE's factor (A1111 interpolates to side // 8)."""
    assert Hires(scale=1.5).size(512, 768, 8) == (768, 1152)
    assert Hires(scale=1.3).size(512, 512, 8) == (664, 664)            # int(665.6) = 665 -> 664
    assert Hires(scale=2.0).size(32, 32, 2) == (64, 64)


@pytest.mark.parametrize("kw, message", [
    ({"scale": 0.5}, "hires scale must be a number from 1 to 8, got 0.5"),
    ({"scale": "2"}, "hires scale must be a number from 1 to 8, got '2'"),
    ({"upscaler": "R-ESRGAN 4x+"}, "unknown hires upscaler 'R-ESRGAN 4x+'; use one of latent, latent_antialiased"),
    ({"steps": -1}, "hires steps must be a whole number >= 0"),
    ({"strength": 1.5}, "hires strength must be between 0 and 1, got 1.5"),
])
def test_bad_settings_are_one_line(kw, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        Hires(**kw)


def refuse_steps(*step):
    raise AssertionError("a step ran before the hires settings were checked")


def test_pipeline_checks():
    pipe = npsd.load()
    with pytest.raises(InputError, match="hires must be an npsd.hires.Hires"):
        pipe.txt2img("a red circle", num_inference_steps=2, hires={"scale": 2})
    from npsd.attention_maps import AttentionMaps
    with pytest.raises(InputError, match="attention maps and traces record one pass; give them without hires"):
        pipe.txt2img("a red circle", num_inference_steps=2, hires=Hires(), attention_maps=AttentionMaps())
    with pytest.raises(InputError, match=r"the hires pass's strength 0.2 with 4 steps runs no step \(int\(steps "
                                         r"\* strength\) = 0\); raise the hires strength or steps"):
        pipe.txt2img("a red circle", num_inference_steps=4, hires=Hires(strength=0.2), callback=refuse_steps)
    pipe.txt2img("a red circle", num_inference_steps=4, hires=Hires(strength=0.0, steps=2), schedule_type="uniform",
                 sampler="euler")                           # A1111's img2img runs one step even at strength 0
    image = pipe.txt2img("a red circle", num_inference_steps=2, seed=1, hires=Hires(scale=1.5, steps=2))
    assert image.size == (96, 96)
