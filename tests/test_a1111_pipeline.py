"""AUTOMATIC1111's image from the same seed: npsd's txt2img and img2img with ``schedule_type`` (A1111's
schedules), ``rng="torch"`` (A1111's "CPU" random numbers) and, for its SDE samplers,
``sde_noise="brownian"``, against an A1111 run assembled from independent parts:

- the models: diffusers' tiny random UNet, VAE and CLIP text encoder of tests/test_pipelines.py
  (npsd's pipeline is built from the same weights), the text encoded by diffusers' ``encode_prompt``
  (A1111's own prompt handling gives the same numbers for a prompt without brackets);
- the sampling: k-diffusion's ``CompVisDenoiser`` around the UNet and its sampler functions, on the
  sigmas A1111's ``KDiffusionSampler.get_sigmas`` makes (tests/test_kdiffusion.py builds them from
  k-diffusion and diffusers), guided as A1111's ``CFGDenoiser`` guides: the batch [cond, uncond], then
  uncond + scale (cond - uncond) of the denoised latents;
- A1111's random numbers: the image's torch generator from its seed gives the start N(0, I) sigma_0
  and, continuing, each ancestral step's noise; the SDE samplers get k-diffusion's
  ``BrownianTreeNoiseSampler`` of the seed (over the whole schedule's sigmas, in img2img too);
  img2img noises the image's latents (the posterior mean,
  ``sample_posterior=False``: A1111 samples it from torch's global generator, not the image's) to
  sigmas[n - t_enc - 1], t_enc = int(min(strength, 0.999) n), and runs the rest.

TOL_IMAGE = 2e-5 relative (images in [0, 1]), as tests/test_same_seed.py for diffusers; measured
1.2e-6 to 3.2e-6, the hires fix 1.4e-6 to 4.9e-6, runs with A1111's schedule options 1.2e-6 to
3.0e-6 (the test output prints each; without the options they are 6.3e-2 to 1.1e-1 away). npsd's default
(diffusers') schedule against the same A1111 run is 1.2e-1 away, img2img with diffusers' start 8.3e-2
(test_diffusers_schedule_is_not_a1111s), and a hires pass that goes on with the first pass's
generator 3.2e-1.

TOL_BROWNIAN = 1e-3 for DPM++ 2M SDE and 3M SDE on A1111's Brownian noise: measured 2.2e-5
(txt2img) and 1.5e-4 (img2img). npsd computes A1111's sigmas in float64 and rounds them to float32;
A1111 computes them in float32 with torch's log, exp and pow, and the two differ in the last bit for
about half of the sigmas. The Brownian tree (torchsde's, a grid of 1e-6) answers a query that moved
by one bit now and then from another leaf, i.e. with other noise. Given npsd's float32 sigmas, A1111's
run is within TOL_IMAGE of npsd's (measured 2.0e-6 and 3.2e-6), so the sigmas' last bits are the
whole difference.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

from npsd import schedulers as S
from npsd.hires import Hires
from npsd.testing import assert_close
from tests.test_kdiffusion import CONFIG, a1111_sampler_sigmas, kd  # noqa: F401 - the fixture
from tests.test_rng import a1111_image_rng_first
from tests.test_pipelines import SCHED, SIZE, make_image, models, npsd_pipe, reference  # noqa: F401

TOL_IMAGE = 2e-5
TOL_BROWNIAN = 1e-3
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
GUIDANCE = 7.5
FUNCTIONS = {"euler": "sample_euler", "euler_a": "sample_euler_ancestral", "heun": "sample_heun", "lms": "sample_lms",
             "dpm2": "sample_dpm_2", "dpm2_a": "sample_dpm_2_ancestral", "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
             "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde", "dpmpp_3m_sde": "sample_dpmpp_3m_sde"}
ANCESTRAL = ("euler_a", "dpm2_a", "dpmpp_2s_a")
BROWNIAN = ("dpmpp_2m_sde", "dpmpp_3m_sde")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _LDM:
    """What CompVisDenoiser needs of A1111's model: alphas_cumprod and apply_model(x, t, cond). vae,
    scaling: a 9-channel inpainting UNet, given what A1111's txt2img_image_conditioning gives it (and
    its img2img without a mask, the same): an all-ones mask and the latents of a 0.5-gray image
    (0 in [-1, 1]; the posterior's mean where A1111 samples it unseeded) of the pass's size."""

    def __init__(self, unet, alphas_cumprod, vae=None, scaling=None, mask_weight=None):
        self.unet, self.alphas_cumprod, self.vae, self.scaling = unet, alphas_cumprod, vae, scaling
        self.mask_weight = mask_weight

    def apply_model(self, x, t, cond):
        if self.vae is not None:
            b, _, h, w = x.shape                                               # (the tiny VAE's factor is 2)
            source = torch.ones(1, 3, 2 * h, 2 * w) * 0.5 * 2 - 1
            if self.mask_weight is not None:      # img2img: inpainting_image_conditioning(image * 2 - 1, ...)
                image = torch.from_numpy(np.moveaxis(np.asarray(make_image(), np.float32) / 255.0, 2, 0))[None]
                source = image * 2 - 1
                source = torch.lerp(source, source * (1.0 - torch.ones(1, 1, 2 * h, 2 * w)), self.mask_weight)
            gray = self.vae.encode(source).latent_dist.mean * self.scaling
            x = torch.cat([x, torch.ones(b, 1, h, w), gray.expand(b, -1, -1, -1)], dim=1)
        return self.unet(x, t, encoder_hidden_states=cond).sample


def a1111_first_noise(shape, seed, variation):
    """ImageRNG.first (tests/test_rng.py's a1111_image_rng_first, as A1111 writes it, with the tiny
    VAE's factor 2 for A1111's 8): the seed's noise, mixed with the variation seed's (subseed,
    subseed_strength), with "Seed resize from" (a fourth item (h, w) in pixels); -> (noise, the
    generator of the later draws: the seed's, or seed + ENSD's)."""
    subseed, strength, ensd, *resize = variation or (None, 0.0, 0)
    (rh, rw), = resize or [(0, 0)]
    noise, (g,) = a1111_image_rng_first(shape[1:], [seed], [subseed], strength, rh, rw, f=2)
    return torch.from_numpy(noise), (torch.Generator().manual_seed(seed + ensd) if ensd else g)


def a1111_run(kd, models, sampler, schedule_type, seed, steps, strength=None, sigmas=None, hires=None,  # noqa: F811
              variation=None, unet_key="unet4", noise_multiplier=1.0, mask_weight=1.0, opts=None):
    """The A1111 run (module docstring) -> images [1, H, W, 3] in [0, 1]. sigmas: instead of A1111's
    (tests/test_kdiffusion.py's a1111_sampler_sigmas), these [steps + 1]. hires: (scale, torch's
    interpolate mode, antialias, steps, strength) for A1111's hires fix with a latent upscaler.
    variation: (variation seed, strength, ENSD[, seed resize from (h, w)]), A1111's seed options.
    noise_multiplier: img2img's initial_noise_multiplier (StableDiffusionProcessingImg2Img.sample:
    x *= it, before the sampler's xi = x0 + x sigma). mask_weight: A1111's inpainting_mask_weight, for
    a 9-channel UNet in img2img (inpainting_image_conditioning without a mask). opts: A1111's options
    that change the schedule (tests/test_kdiffusion.py's a1111_reference_sigmas), in both passes."""
    ref = reference(StableDiffusionPipeline, models, EulerDiscreteScheduler(**SCHED))
    vae, scaling = models["vae"], ref.vae.config.scaling_factor
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        nine = (vae, scaling) if unet_key == "unet9" else ()
        if unet_key == "unet9" and strength is not None:
            nine = (vae, scaling, mask_weight)
        den = kd.external.CompVisDenoiser(_LDM(models[unet_key], ref.scheduler.alphas_cumprod.float(), *nine))

        def guided(x, sigma, **_):
            out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
            d_cond, d_uncond = out.chunk(2)
            return d_uncond + (d_cond - d_uncond) * GUIDANCE

        if sigmas is None:
            sigmas = a1111_sampler_sigmas(kd, sampler, schedule_type, steps, opts)
        sigmas = torch.from_numpy(np.asarray(sigmas, np.float32))
        shape = (1, 4, SIZE // 2, SIZE // 2)
        noise, g = a1111_first_noise(shape, seed, variation)
        if strength is None:
            x = noise * sigmas[0]
        else:
            pixels = torch.from_numpy(np.asarray(make_image(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            x0 = vae.encode(pixels).latent_dist.mean * scaling
            t_enc = int(min(strength, 0.999) * steps)
            if noise_multiplier != 1.0:
                noise *= noise_multiplier
            x = x0 + noise * sigmas[steps - t_enc - 1]
        kw = {}
        if sampler in ANCESTRAL:
            kw["noise_sampler"] = lambda sigma, sigma_next: torch.randn(shape, generator=g)
        elif sampler in BROWNIAN:        # (img2img too: over the whole schedule's sigmas, as A1111)
            kw["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                        seed=[seed])
        if strength is not None:
            sigmas = sigmas[steps - t_enc - 1:]
        x = getattr(kd.sampling, FUNCTIONS[sampler])(guided, x, sigmas, disable=True, **kw)
        if hires is not None:
            x = a1111_hires_pass(kd, sampler, schedule_type, seed, steps, guided, x, *hires, variation=variation,
                                 vae=vae, scaling=scaling, opts=opts)
        image = vae.decode(x / scaling).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def a1111_resize_with_upscaler(im, w, h, upscaler_name):
    """modules/images.py's resize_image(0, ...)'s resize with A1111's upscalers without a network
    (modules/upscaler.py: Upscaler.upscale and the do_upscale of UpscalerLanczos and UpscalerNearest),
    as A1111 writes them."""
    LANCZOS, NEAREST = Image.LANCZOS, Image.NEAREST
    if upscaler_name is None or upscaler_name == "None" or im.mode == 'L':
        return im.resize((w, h), resample=LANCZOS)
    scale = max(w / im.width, h / im.height)
    if scale > 1.0:
        img = im
        dest_w = int(img.width * scale) // 8 * 8
        dest_h = int(img.height * scale) // 8 * 8
        for i in range(3):
            if img.width >= dest_w and img.height >= dest_h and (i > 0 or scale != 1):
                break
            shape = (img.width, img.height)
            img = img.resize((int(img.width * scale), int(img.height * scale)),
                             resample=LANCZOS if upscaler_name == "Lanczos" else NEAREST)
            if shape == (img.width, img.height):
                break
        if img.width != dest_w or img.height != dest_h:
            img = img.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
        im = img
    if im.width != w or im.height != h:
        im = im.resize((w, h), resample=LANCZOS)
    return im


def a1111_hires_pass(kd, sampler, schedule_type, seed, steps, guided, x, scale, mode, antialias, hr_steps,
                     strength, variation=None, vae=None, scaling=None, opts=None):  # noqa: F811
    """A1111's sample_hr_pass: interpolate the latents to int(scale * side) // 8 (a latent upscaler,
    mode: torch's interpolate mode), or (mode "Lanczos", "Nearest", "None": an image upscaler) decode
    them to the 8-bit image, enlarge it to int(scale * side) and encode it again (vae, scaling; the
    posterior's mean); a fresh generator of the seed (its first draw the noise, then the step noise),
    img2img with the same sampler and schedule type for hr_steps (0: steps), t_enc = int(min(strength, 0.999) n)."""
    size = (int(SIZE * scale) // 8 * 8) // 2                                   # the tiny VAE's factor is 2
    if mode in ("Lanczos", "Nearest", "None"):
        lowres = torch.clamp((vae.decode(x / scaling).sample + 1.0) / 2.0, min=0.0, max=1.0)
        x_sample = (255. * np.moveaxis(lowres[0].numpy(), 0, 2)).astype(np.uint8)
        image = a1111_resize_with_upscaler(Image.fromarray(x_sample), size * 2, size * 2, mode)
        image = torch.from_numpy(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))[None]
        x = vae.encode(image * 2 - 1).latent_dist.mean * scaling              # (A1111: a sample, unseeded)
    else:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, antialias=antialias)
    n = hr_steps or steps
    sigmas = torch.from_numpy(a1111_sampler_sigmas(kd, sampler, schedule_type, n, opts).astype(np.float32))
    noise, g = a1111_first_noise(x.shape, seed, variation)
    t_enc = int(min(strength, 0.999) * n)
    xi = x + noise * sigmas[n - t_enc - 1]
    kw = {}
    if sampler in ANCESTRAL:
        kw["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x.shape, generator=g)
    elif sampler in BROWNIAN:
        kw["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
    return getattr(kd.sampling, FUNCTIONS[sampler])(guided, xi, sigmas[n - t_enc - 1:], disable=True, **kw)


def npsd_run(models, sampler, schedule_type, seed, steps, strength=None, hires=None, variation=None,  # noqa: F811
             unet_key="unet4", **options):
    pipe = npsd_pipe(models, unet_key)
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
              seed=seed, rng="torch", sampler=sampler, schedule_type=schedule_type, output_type="np",
              sde_noise="brownian" if sampler in BROWNIAN else "generator")
    if variation is not None:
        kw.update(variation_seed=variation[0], variation_strength=variation[1], eta_noise_seed_delta=variation[2])
        if len(variation) > 3:
            kw.update(seed_resize_from_h=variation[3][0], seed_resize_from_w=variation[3][1])
    kw.update(options)
    if hires is not None:
        kw["hires"] = hires
    if strength is None:
        return pipe.txt2img(PROMPT, **kw)
    return pipe.img2img(PROMPT, make_image(), strength=strength, **kw)      # (the mean, A1111's first draw)


CASES = [("euler", "automatic"), ("euler_a", "automatic"), ("heun", "kl_optimal"), ("lms", "karras"),
         ("dpm2", "automatic"), ("dpm2_a", "sgm_uniform"), ("dpmpp_2s_a", "automatic"), ("dpmpp_2m", "automatic"),
         ("dpmpp_2m", "align_your_steps"), ("dpmpp_2m_sde", "automatic"), ("dpmpp_3m_sde", "automatic"),
         ("euler_a", "beta")]


def check_against_a1111(kd, models, sampler, schedule_type, seed, steps, strength=None):  # noqa: F811
    what = f"{'txt2img' if strength is None else f'img2img strength {strength}'} {sampler} {schedule_type}"
    ours = npsd_run(models, sampler, schedule_type, seed, steps, strength)
    ref = a1111_run(kd, models, sampler, schedule_type, seed, steps, strength)
    if sampler not in BROWNIAN:
        print(assert_close(ours, ref, TOL_IMAGE, f"{what} vs A1111"))
        return
    # the Brownian tree turns a last-bit difference of a sigma into other noise (module docstring):
    # A1111's run on npsd's float32 sigmas is within TOL_IMAGE, on its own within TOL_BROWNIAN
    own = S.make_schedule(sampler, steps, CONFIG, schedule_type=schedule_type).sigmas
    print(assert_close(ours, a1111_run(kd, models, sampler, schedule_type, seed, steps, strength, sigmas=own),
                       TOL_IMAGE, f"{what} vs A1111 on npsd's sigmas"))
    print(assert_close(ours, ref, TOL_BROWNIAN, f"{what} vs A1111"))


@pytest.mark.parametrize("sampler, schedule_type", CASES)
def test_txt2img_equals_an_a1111_run(kd, models, sampler, schedule_type):  # noqa: F811
    check_against_a1111(kd, models, sampler, schedule_type, seed=42, steps=5)


@pytest.mark.parametrize("sampler, schedule_type, strength", [("euler_a", "automatic", 0.75),
                                                              ("dpmpp_2m", "automatic", 0.6),
                                                              ("dpmpp_2m_sde", "exponential", 0.5)])
def test_img2img_equals_an_a1111_run(kd, models, sampler, schedule_type, strength):  # noqa: F811
    check_against_a1111(kd, models, sampler, schedule_type, seed=7, steps=8, strength=strength)


@pytest.mark.parametrize("strength", [None, 0.5])
def test_ddim_schedule_type_with_another_step_count(kd, models, strength):  # noqa: F811
    """A1111's "DDIM" schedule type makes 8 steps of 7 asked (stride 142 from t = 1); its img2img start
    counts with the 7 asked: t_enc = 3, the run starts at sigmas[3] and does 5 steps."""
    assert S.make_schedule("euler_a", 7, CONFIG, schedule_type="ddim").num_inference_steps == 8
    check_against_a1111(kd, models, "euler_a", "ddim", seed=5, steps=7, strength=strength)


def test_diffusers_schedule_is_not_a1111s(kd, models, monkeypatch):  # noqa: F811
    """The same run on npsd's default (diffusers') schedule, or img2img with diffusers' start, fails
    the tolerance by far: the A1111 comparison can tell them apart."""
    from npsd import schedulers
    ref = a1111_run(kd, models, "euler_a", "automatic", seed=42, steps=5)
    pipe = npsd_pipe(models)
    ours = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=GUIDANCE,
                        height=SIZE, width=SIZE, seed=42, rng="torch", sampler="euler_a", output_type="np")
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"diffusers' schedule vs A1111's run: {err:.3g} (tolerance {TOL_IMAGE})")
    assert err > 1e3 * TOL_IMAGE
    ref = a1111_run(kd, models, "euler_a", "automatic", seed=7, steps=8, strength=0.75)
    monkeypatch.setattr(schedulers, "start_index",
                        lambda schedule, strength: schedulers.img2img_start_index(schedule.num_inference_steps, strength))
    ours = npsd_run(models, "euler_a", "automatic", seed=7, steps=8, strength=0.75)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"img2img with diffusers' start vs A1111's run: {err:.3g}")
    assert err > 1e3 * TOL_IMAGE


# (sampler, schedule type, npsd's Hires, torch's interpolate mode and antialias as A1111 names them)
HIRES_CASES = [("euler_a", "automatic", Hires(2.0, "latent", 4, 0.55), "bilinear", False),
               ("dpmpp_2m", "automatic", Hires(1.5, "latent_bicubic", 0, 0.7), "bicubic", False),
               ("heun", "karras", Hires(2.0, "latent_antialiased", 3, 0.5), "bilinear", True),
               ("dpmpp_2m_sde", "automatic", Hires(2.0, "latent_nearest_exact", 3, 0.6), "nearest-exact", False),
               ("dpm2_a", "automatic", Hires(1.75, "latent_nearest", 4, 0.45), "nearest", False),
               ("euler", "uniform", Hires(1.5, "latent_bicubic_antialiased", 3, 0.6), "bicubic", True),
               ("euler_a", "automatic", Hires(2.0, "lanczos", 3, 0.5), "Lanczos", False),
               ("dpmpp_2m", "karras", Hires(1.5, "nearest", 3, 0.6), "Nearest", False),
               ("euler", "automatic", Hires(2.0, "none", 3, 0.55), "None", False)]


@pytest.mark.parametrize("sampler, schedule_type, hires, mode, antialias", HIRES_CASES,
                         ids=[c[2].upscaler for c in HIRES_CASES])
def test_hires_fix_equals_an_a1111_run(kd, models, sampler, schedule_type, hires, mode, antialias):  # noqa: F811
    """txt2img(hires=...) against A1111's hires fix: the first pass, torch's interpolate of the latents,
    and A1111's second img2img pass from a fresh generator of the seed."""
    ours = npsd_run(models, sampler, schedule_type, 11, 5, hires=hires)
    spec = (hires.scale, mode, antialias, hires.steps, hires.strength)
    ref = a1111_run(kd, models, sampler, schedule_type, 11, 5, hires=spec)
    assert ours.shape == ref.shape == (1, int(SIZE * hires.scale) // 2 * 2, int(SIZE * hires.scale) // 2 * 2, 3)
    what = f"hires {sampler} {schedule_type} {hires.upscaler} x{hires.scale}"
    print(assert_close(ours, ref, TOL_BROWNIAN if sampler in BROWNIAN else TOL_IMAGE, f"{what} vs A1111"))


def test_hires_fix_with_the_first_pass_generator_fails(kd, models, monkeypatch):  # noqa: F811
    """A1111 draws the second pass's noise from a fresh generator of the seed; going on with the first
    pass's generator instead is far outside the tolerance."""
    from npsd import pipeline
    ref = a1111_run(kd, models, "euler_a", "automatic", 11, 5, hires=(2.0, "bilinear", False, 4, 0.55))
    fresh = pipeline.make_rng
    kept = []

    def make_rng(name, seed, variation=None):      # the second call returns the first call's generator
        kept.append(kept[0] if kept else fresh(name, seed, variation))
        return kept[-1]

    monkeypatch.setattr(pipeline, "make_rng", make_rng)
    ours = npsd_run(models, "euler_a", "automatic", 11, 5, hires=Hires(2.0, "latent", 4, 0.55))
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"hires with the first pass's generator: {err:.3g} (tolerance {TOL_IMAGE})")
    assert len(kept) == 2 and err > 1e3 * TOL_IMAGE


def test_the_saved_image_is_a1111s_8_bits(kd, models):  # noqa: F811
    """A1111 saves floor(255 x) (modules/processing.py: astype(np.uint8)); npsd's PIL output with an
    A1111 schedule type is A1111's run so made 8-bit: measured 0 of 3072 values off. Rounding to
    the nearest instead (diffusers') puts about half of them one level off (asserted)."""
    ref = a1111_run(kd, models, "euler_a", "automatic", seed=42, steps=5)[0]
    saved = (255. * ref).astype(np.uint8)
    pipe = npsd_pipe(models)
    image = np.asarray(pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=GUIDANCE,
                                    height=SIZE, width=SIZE, seed=42, rng="torch", sampler="euler_a",
                                    schedule_type="automatic"))
    off = np.abs(image.astype(int) - saved)
    print(f"8-bit image vs A1111's: {int((off > 0).sum())} of {off.size} values off")
    assert off.max() <= 1 and (off > 0).mean() <= 0.01
    rounded = (ref * 255).round().astype(int)
    assert (rounded != saved).mean() > 0.3


@pytest.mark.parametrize("sampler, schedule_type, strength, variation, hires", [
    ("euler_a", "automatic", None, (77, 0.3, 0), None),          # a variation seed
    ("euler_a", "automatic", None, (None, 0.0, 31337), None),     # ENSD: the ancestral noise from seed + 31337
    ("dpmpp_2m", "karras", None, (78, 1.0, 0), None),             # strength 1: the variation seed's noise
    ("dpmpp_2s_a", "automatic", 0.7, (79, 0.5, 4), None),         # img2img, both
    ("euler_a", "automatic", None, (80, 0.2, 9), Hires(2.0, "latent", 3, 0.6)),   # the hires pass's too
    ("euler_a", "automatic", None, (21, 0.3, 0), None),           # the variation seed is the seed: no angle
])
def test_variation_seed_and_ensd_equal_a1111s(kd, models, sampler, schedule_type, strength, variation, hires):  # noqa: F811
    """A1111's seed options (ImageRNG.first and its slerp, the ENSD generators), written above as A1111
    writes them, against npsd's variation_seed, variation_strength and eta_noise_seed_delta. Without
    them the same run is far (asserted), so the options are what is compared."""
    vseed = 21 if variation[0] is None else variation[0]
    spec = None if hires is None else (hires.scale, "bilinear", False, hires.steps, hires.strength)
    ref = a1111_run(kd, models, sampler, schedule_type, 21, 6, strength, hires=spec, variation=(vseed, *variation[1:]))
    ours = npsd_run(models, sampler, schedule_type, 21, 6, strength, hires=hires, variation=variation)
    what = f"{sampler} {schedule_type} strength {strength} variation {variation} hires {hires is not None}"
    print(assert_close(ours, ref, TOL_IMAGE, f"{what} vs A1111"))
    plain = npsd_run(models, sampler, schedule_type, 21, 6, strength, hires=hires)
    if variation[0] != 21:                  # (mixing the seed's noise with itself changes nothing)
        assert np.abs(plain - ref).max() > 1e3 * TOL_IMAGE


def test_image_upscalers_equal_a1111s():
    """npsd.hires.upscale_image against A1111's resize with its Lanczos, Nearest and None upscalers
    (above, as A1111 writes them) on 200 random sizes, enlarging and not: equal pixels."""
    from npsd.hires import upscale_image
    rng = np.random.default_rng(4)
    for trial in range(200):
        w, h, W, H = (int(v) for v in rng.integers(8, 120, 4))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
        for name, label in (("lanczos", "Lanczos"), ("nearest", "Nearest"), ("none", "None")):
            assert np.array_equal(np.asarray(upscale_image(im, W, H, name)),
                                  np.asarray(a1111_resize_with_upscaler(im, W, H, label))), (trial, name, w, h, W, H)


@pytest.mark.parametrize("strength, hires", [(None, None), (0.7, None), (None, Hires(2.0, "latent", 3, 0.6))])
def test_an_inpainting_unet_in_txt2img_and_img2img(kd, models, strength, hires):  # noqa: F811
    """A 9-channel inpainting UNet runs txt2img, img2img and the hires fix as A1111 runs it there: with
    an all-ones mask and a gray image's latents (_LDM above); measured 1.9e-6 to 2.3e-6. An all-zeros
    mask instead is 9.4e-2 away (measured)."""
    spec = None if hires is None else (hires.scale, "bilinear", False, hires.steps, hires.strength)
    ref = a1111_run(kd, models, "euler_a", "automatic", 13, 5, strength, hires=spec, unet_key="unet9")
    ours = npsd_run(models, "euler_a", "automatic", 13, 5, strength, hires=hires, unet_key="unet9")
    print(assert_close(ours, ref, TOL_IMAGE, f"9-channel UNet, strength {strength}, hires {hires is not None} vs A1111"))


@pytest.mark.parametrize("sampler, schedule_type, strength, variation, hires", [
    ("euler_a", "automatic", None, (21, 0.0, 0, (26, 42)), None),      # 13x21 latents into 16x16: cropped across
    ("dpmpp_2m", "karras", 0.7, (79, 0.5, 4, (20, 12)), None),          # img2img, with a variation seed and ENSD
    ("euler_a", "automatic", None, (80, 0.2, 0, (40, 22)), Hires(2.0, "latent", 3, 0.6)),   # both passes
])
def test_seed_resize_from_equals_a1111s(kd, models, sampler, schedule_type, strength, variation, hires):  # noqa: F811
    """A1111's "Seed resize from" (ImageRNG.first's draw at the other size and its centred paste,
    a1111_first_noise above, as A1111 writes it; the hires pass's generator resizes too) against npsd's
    seed_resize_from_h and _w: measured 1.5e-6 to 2.3e-6, TOL_IMAGE. Without the resize the same run
    is far (asserted), and so is a paste one latent off-centre (checked by hand: 7.7e-1, first case)."""
    spec = None if hires is None else (hires.scale, "bilinear", False, hires.steps, hires.strength)
    ref = a1111_run(kd, models, sampler, schedule_type, 21, 6, strength, hires=spec, variation=variation)
    ours = npsd_run(models, sampler, schedule_type, 21, 6, strength, hires=hires, variation=variation)
    print(assert_close(ours, ref, TOL_IMAGE, f"{sampler} seed resize from {variation[3]}, hires {hires is not None}"))
    plain = npsd_run(models, sampler, schedule_type, 21, 6, strength, hires=hires, variation=variation[:3])
    assert np.abs(plain - ref).max() > 1e3 * TOL_IMAGE


@pytest.mark.parametrize("sampler, multiplier", [("euler_a", 0.9), ("dpmpp_2m", 1.2)])
def test_noise_multiplier_equals_a1111s(kd, models, sampler, multiplier):  # noqa: F811
    """A1111's "Noise multiplier for img2img" (StableDiffusionProcessingImg2Img.sample multiplies the
    start noise x before the sampler noises the image with it, xi = x0 + x sigma; its DDIM, PLMS and
    UniPC the same x) against npsd's initial_noise_multiplier: measured 1.7e-6 and 1.1e-6, TOL_IMAGE.
    The run without it is far (asserted); the image's latents multiplied instead, 4.2e-2 (by hand)."""
    ref = a1111_run(kd, models, sampler, "automatic", 9, 6, 0.7, noise_multiplier=multiplier)
    ours = npsd_run(models, sampler, "automatic", 9, 6, 0.7, initial_noise_multiplier=multiplier)
    print(assert_close(ours, ref, TOL_IMAGE, f"img2img {sampler} noise multiplier {multiplier} vs A1111"))
    plain = npsd_run(models, sampler, "automatic", 9, 6, 0.7)
    assert np.abs(plain - ref).max() > 1e3 * TOL_IMAGE


@pytest.mark.parametrize("weight", [0.0, 0.4])
def test_mask_weight_of_an_inpainting_unet_in_img2img_equals_a1111s(kd, models, weight):  # noqa: F811
    """img2img with a 9-channel UNet conditions it, in A1111, on lerp(image, image * (1 - ones),
    inpainting_mask_weight) (inpainting_image_conditioning without a mask; _LDM above): npsd's
    inpainting_mask_weight, measured 1.9e-6 and 2.0e-6, TOL_IMAGE; the default weight 1 (a gray image)
    is far (asserted), and so is the weight reversed (by hand: 6.7e-3 and 1.6e-3)."""
    ref = a1111_run(kd, models, "euler_a", "automatic", 13, 5, 0.7, unet_key="unet9", mask_weight=weight)
    ours = npsd_run(models, "euler_a", "automatic", 13, 5, 0.7, unet_key="unet9", inpainting_mask_weight=weight)
    print(assert_close(ours, ref, TOL_IMAGE, f"9-channel UNet img2img, mask weight {weight} vs A1111"))
    plain = npsd_run(models, "euler_a", "automatic", 13, 5, 0.7, unet_key="unet9")
    assert np.abs(plain - ref).max() > 1e2 * TOL_IMAGE


@pytest.mark.parametrize("sampler, schedule_type, strength, opts, hires", [
    ("euler_a", "automatic", None, {"always_discard_next_to_last_sigma": True}, Hires(2.0, "latent", 3, 0.6)),
    ("dpmpp_2m", "karras", None, {"sigma_min": 0.1, "sigma_max": 10.0, "rho": 5.0}, Hires(1.5, "latent", 4, 0.55)),
    ("heun", "beta", 0.7, {"beta_dist_alpha": 0.5, "beta_dist_beta": 0.8, "sigma_max": 9.0}, None)])
def test_schedule_options_equal_a1111s(kd, models, sampler, schedule_type, strength, opts, hires):  # noqa: F811
    """A1111's options sigma_min, sigma_max, rho, always_discard_next_to_last_sigma and Beta's alpha
    and beta, in both passes of the hires fix and in img2img, against npsd's schedule_options; without
    them the same run is far (asserted), so the options are what is compared."""
    from tests.test_kdiffusion import npsd_options
    spec = None if hires is None else (hires.scale, "bilinear", False, hires.steps, hires.strength)
    ref = a1111_run(kd, models, sampler, schedule_type, 23, 5, strength, hires=spec, opts=opts)
    ours = npsd_run(models, sampler, schedule_type, 23, 5, strength, hires=hires, schedule_options=npsd_options(opts))
    print(assert_close(ours, ref, TOL_IMAGE, f"{sampler} {schedule_type} {opts} hires {hires is not None} vs A1111"))
    plain = npsd_run(models, sampler, schedule_type, 23, 5, strength, hires=hires)
    err = float(np.abs(plain - ref).max() / np.abs(ref).max())
    print(f"the same without the options: {err:.3g}")
    assert err > 1e2 * TOL_IMAGE


def test_schedule_options_need_a_schedule_type(models):  # noqa: F811
    """schedule_options without an A1111 schedule_type (diffusers' schedule, which has none of these
    settings) is one line, as negative_guidance_min_sigma."""
    from npsd.errors import InputError
    pipe = npsd_pipe(models)
    with pytest.raises(InputError, match="schedule_options are A1111's settings of its schedule types: give a "
                                         "schedule_type"):
        pipe.txt2img(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, sampler="euler",
                     schedule_options=S.ScheduleOptions(sigma_min=0.1))
