"""Same seed, same image as diffusers: with rng="torch", npsd draws torch's CPU-generator numbers in
diffusers' order and shapes, so a pipeline given only a seed equals diffusers' pipeline given
``generator=torch.Generator("cpu").manual_seed(seed)``: no noise is handed over.

Every sampler (Karras sigmas on and off where the sampler has them) x txt2img, img2img, inpainting
with a 4- and a 9-channel UNet, with guidance; guidance off and 3 images per prompt on each
sampler's txt2img and on img2img/inpaint with a stochastic sampler. Tiny random models (as in
tests/test_pipelines.py), images in [0, 1].

TOL_IMAGE = 2e-5 relative (of images whose max is about 1). Measured: at most 6.9e-6 over the cases
below (img2img with Euler a and Karras sigmas), most between 6e-7 and 4e-6: float32 rounding through
a few steps of the tiny models; a list of seeds against diffusers' list of generators at most 9.0e-6
(inpainting with DPM2 a). One exception, TOL_ZERO_SNR_FIRST_STEP = 6e-5: Euler and Euler a
starting from zero terminal SNR's sigma_max = 4096 (test_same_seed_v_prediction_zero_snr_guidance_rescale). A draw out of order, a draw of the
wrong shape or a skipped posterior sample changes the image by 1e-1 or more (the sensitivity tests
at the end).
"""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, UniPCMultistepScheduler)

from npsd import schedulers as S
from npsd.testing import assert_close
from tests.test_pipelines import SCHED, SIZE, make_image, make_mask, models, npsd_pipe, reference  # noqa: F401

TOL_IMAGE = 2e-5
TOL_ZERO_SNR_FIRST_STEP = 6e-5         # Euler and Euler a from sigma_max 4096 (the test's docstring)
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
# the samplers npsd runs as diffusers' schedulers do; DPM++ 2S a (which diffusers lacks), DPM++ SDE
# (whose DPMSolverSDEScheduler draws one Brownian tree for the whole batch) and DPM++ 3M SDE follow
# k-diffusion, and
# tests/test_kdiffusion.py and tests/test_brownian.py compare them with it
WITH_DIFFUSERS = [s for s in S.SAMPLERS if s not in ("dpmpp_2s_a", "dpmpp_sde", "dpmpp_3m_sde")]
SAMPLERS = [(s, False) for s in WITH_DIFFUSERS]
KARRAS = [(s, True) for s in S.SIGMA_SAMPLERS if s in WITH_DIFFUSERS]

# diffusers' schedulers call np.array(tensor) in a way NumPy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _EulerAncestralKarras(EulerAncestralDiscreteScheduler):
    """diffusers' Euler ancestral has no Karras option: its step with the Euler scheduler's Karras
    sigmas and timesteps (what npsd's euler_a with Karras sigmas does)."""

    def set_timesteps(self, n, device=None):
        super().set_timesteps(n, device)
        e = EulerDiscreteScheduler(**SCHED, use_karras_sigmas=True)
        e.set_timesteps(n, device)
        self.sigmas, self.timesteps = e.sigmas.clone(), e.timesteps.clone()


def scheduler(name, karras, **extra):
    """The diffusers scheduler that npsd's sampler `name` follows (docs/samplers.md), SD v1.5's config
    (extra: other scheduler settings, e.g. prediction_type)."""
    kw = dict(SCHED, **extra)
    if name in S.SIGMA_SAMPLERS and name != "euler_a":
        kw["use_karras_sigmas"] = karras
    make = {
        "ddpm": lambda: DDPMScheduler(**kw, clip_sample=False, variance_type="fixed_small"),
        "ddim": lambda: DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False),
        "euler": lambda: EulerDiscreteScheduler(**kw),
        "euler_a": lambda: (_EulerAncestralKarras if karras else EulerAncestralDiscreteScheduler)(**kw),
        "heun": lambda: HeunDiscreteScheduler(**kw),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2),
        "pndm": lambda: PNDMScheduler(**kw, skip_prk_steps=True, set_alpha_to_one=False),
        "lms": lambda: LMSDiscreteScheduler(**kw),
        "dpmpp_2m_sde": lambda: DPMSolverMultistepScheduler(**kw, algorithm_type="sde-dpmsolver++", solver_order=2),
        "unipc": lambda: UniPCMultistepScheduler(**kw, solver_order=2, solver_type="bh2"),
        "dpm2": lambda: KDPM2DiscreteScheduler(**kw),
        "dpm2_a": lambda: KDPM2AncestralDiscreteScheduler(**kw),
        "lcm": lambda: LCMScheduler(**kw),
        "deis": lambda: DEISMultistepScheduler(**kw, solver_order=2),
    }
    return make[name]()


def generator(seed):
    return torch.Generator("cpu").manual_seed(seed)


def run_both(models, mode, sampler, karras, seed, guidance=7.5, num_images=1, unet_key="unet4", strength=None,
             eta=0.0, steps=4, npsd_kw=None, sched_kw=None, ref_kw=None):
    """diffusers' pipeline from the seed vs npsd's with rng="torch"; images [B, H, W, 3].
    sched_kw: scheduler settings given to both (npsd: in the model's config); ref_kw: call arguments
    given to both."""
    cls = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
           "inpaint": StableDiffusionInpaintPipeline}[mode]
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                  height=SIZE, width=SIZE, output_type="np")
    inputs = {"txt2img": {}, "img2img": {"image": make_image()},
              "inpaint": {"image": make_image(), "mask_image": make_mask()}}[mode]
    extra = {} if strength is None else {"strength": strength}
    both = dict(ref_kw or {})
    eta_kw = {"eta": eta} if sampler == "ddim" else {}
    gen = [generator(s) for s in seed] if isinstance(seed, list) else generator(seed)   # a list: one per image
    with torch.no_grad():
        ref = reference(cls, models, scheduler(sampler, karras, **(sched_kw or {})), unet_key)(
            PROMPT, generator=gen, num_images_per_prompt=num_images, **inputs, **extra, **common,
            **eta_kw, **both).images
    pipe = npsd_pipe(models, unet_key)
    pipe.config["scheduler"].update(sched_kw or {})
    ours = getattr(pipe, mode)(PROMPT, *inputs.values(), seed=seed, rng="torch", sampler=sampler,
                               use_karras_sigmas=karras, num_images=num_images, eta=eta, **extra, **common,
                               **{**both, **(npsd_kw or {})})
    return ours, ref


MODES = [("txt2img", "unet4", None), ("img2img", "unet4", 0.6), ("inpaint", "unet4", 1.0), ("inpaint", "unet9", 0.75)]


@pytest.mark.parametrize("sampler, karras", SAMPLERS)
@pytest.mark.parametrize("mode, unet_key, strength", MODES)
def test_same_seed_same_image(models, mode, unet_key, strength, sampler, karras):
    eta = 0.5 if sampler == "ddim" else 0.0                   # DDIM's noise draws too
    ours, ref = run_both(models, mode, sampler, karras, seed=42, unet_key=unet_key, strength=strength, eta=eta)
    print(assert_close(ours, ref, TOL_IMAGE, f"{mode} {unet_key} {sampler} karras={karras}"))


@pytest.mark.parametrize("sampler, karras", KARRAS)
@pytest.mark.parametrize("mode, unet_key, strength", MODES[:3])
def test_same_seed_same_image_karras(models, mode, unet_key, strength, sampler, karras):
    ours, ref = run_both(models, mode, sampler, karras, seed=43, unet_key=unet_key, strength=strength)
    print(assert_close(ours, ref, TOL_IMAGE, f"{mode} {unet_key} {sampler} karras={karras}"))


@pytest.mark.parametrize("sampler, karras", SAMPLERS)
def test_same_seed_without_guidance_three_images(models, sampler, karras):
    ours, ref = run_both(models, "txt2img", sampler, karras, seed=7, guidance=1.0, num_images=3)
    assert ours.shape[0] == 3
    print(assert_close(ours, ref, TOL_IMAGE, f"txt2img {sampler} karras={karras} cfg off, 3 images"))


@pytest.mark.parametrize("mode, unet_key, strength", [("img2img", "unet4", 0.8), ("inpaint", "unet4", 0.7),
                                                      ("inpaint", "unet9", 1.0)])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_same_seed_three_images_img2img_inpaint(models, mode, unet_key, strength, guidance):
    ours, ref = run_both(models, mode, "euler_a", False, seed=2024, guidance=guidance, num_images=3,
                         unet_key=unet_key, strength=strength)
    print(assert_close(ours, ref, TOL_IMAGE, f"{mode} {unet_key} euler_a cfg {guidance}, 3 images"))


V_ZERO_SNR = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "lcm", "ddpm"])
@pytest.mark.parametrize("mode, unet_key, strength", MODES[:2])
def test_same_seed_v_prediction_zero_snr_guidance_rescale(models, mode, unet_key, strength, sampler):
    """A v-prediction model with zero terminal SNR, trailing spacing and rescaled guidance (Lin et al.
    2024's recipe), as diffusers runs it: the same image. (diffusers' img2img pipeline has no
    guidance_rescale argument; it swallows it unused, so img2img runs without it.)

    Euler and Euler a, txt2img: TOL_ZERO_SNR_FIRST_STEP. Their first step from sigma_max = 4096 cancels
    two terms of ~4096 |noise| down to the state, whose float32 rounding (1 ulp of 4096 |noise|) no
    implementation controls: npsd run with sigma_max one ulp apart (4095.9998, correctly rounded, and
    the 4096.0 that torch's float32 sqrt gives on an AMD EPYC) differs from itself by 2.9e-5 (Euler)
    and 1.3e-5 (Euler a); against diffusers, measured 3.0e-5 and 1.5e-5 (AMD EPYC)."""
    sched = V_ZERO_SNR if sampler != "lcm" else dict(V_ZERO_SNR, timestep_spacing="leading")
    rescale = {"guidance_rescale": 0.7} if mode == "txt2img" else {}
    ours, ref = run_both(models, mode, sampler, False, seed=11, unet_key=unet_key, strength=strength,
                         sched_kw=sched, ref_kw=rescale)
    tol = TOL_ZERO_SNR_FIRST_STEP if (mode, sampler) in (("txt2img", "euler"), ("txt2img", "euler_a")) else TOL_IMAGE
    print(assert_close(ours, ref, tol, f"{mode} {sampler} v-prediction, zero SNR, {rescale}"))


LIST_CASES = [("txt2img", "unet4", None, "euler_a"), ("txt2img", "unet4", None, "ddim"),
              ("txt2img", "unet4", None, "dpmpp_2m_sde"), ("img2img", "unet4", 0.6, "euler_a"),
              ("img2img", "unet4", 0.6, "ddpm"), ("inpaint", "unet4", 1.0, "euler_a"),
              ("inpaint", "unet4", 0.75, "dpm2_a"), ("inpaint", "unet9", 0.75, "euler_a"),
              ("inpaint", "unet9", 1.0, "ddpm")]


@pytest.mark.parametrize("mode, unet_key, strength, sampler", LIST_CASES)
def test_a_list_of_seeds_is_diffusers_list_of_generators(models, mode, unet_key, strength, sampler):
    """seed=[s0, s1, s2]: diffusers' generator=[torch.Generator().manual_seed(s) for s in seeds], one per
    image: each image's start, step noise and (img2img) VAE sample from its own generator; a batch-1
    draw (inpainting's VAE samples of the input) from the first, as diffusers draws it."""
    seeds = [3, 11, 2**32 + 7]
    eta = 0.5 if sampler == "ddim" else 0.0
    ours, ref = run_both(models, mode, sampler, False, seed=seeds, num_images=3, unet_key=unet_key,
                         strength=strength, eta=eta)
    print(assert_close(ours, ref, TOL_IMAGE, f"{mode} {unet_key} {sampler} seeds {seeds}"))
    alike, _ = run_both(models, mode, sampler, False, seed=3, num_images=3, unet_key=unet_key, strength=strength,
                        eta=eta)
    assert np.abs(alike[1:] - ours[1:]).max() > 1e-2            # one generator for the batch is another image


def test_epsilon_read_as_v_or_no_rescale_fails(models):
    for npsd_kw in ({"prediction_type": "epsilon"}, {"guidance_rescale": 0.0}):
        ours, ref = run_both(models, "txt2img", "euler", False, seed=11, sched_kw=V_ZERO_SNR,
                             ref_kw={"guidance_rescale": 0.7}, npsd_kw=npsd_kw)
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            assert_close(ours, ref, TOL_ZERO_SNR_FIRST_STEP)


# --- sensitivity: the draws must be these draws, in this order -------------------------------------

def test_another_seed_fails(models):
    ours, _ = run_both(models, "txt2img", "euler_a", False, seed=1)
    _, ref = run_both(models, "txt2img", "euler_a", False, seed=2)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(ours, ref, TOL_IMAGE)


def test_posterior_mean_instead_of_sample_fails(models):
    """diffusers samples the VAE posterior from the generator; encoding to the mean shifts every
    later draw and the image."""
    ours, ref = run_both(models, "img2img", "ddpm", False, seed=3, strength=0.6,
                         npsd_kw={"sample_posterior": False})
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(ours, ref, TOL_IMAGE)


def test_numpy_rng_differs_and_stays_the_default(models):
    """rng="numpy" (the default) keeps npsd's own images: equal to an explicit "numpy", not to torch's."""
    pipe = npsd_pipe(models)
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, sampler="euler_a", seed=5, output_type="np")
    default, numpy_, torch_ = pipe.txt2img(PROMPT, **kw), pipe.txt2img(PROMPT, rng="numpy", **kw), \
        pipe.txt2img(PROMPT, rng="torch", **kw)
    assert np.array_equal(default, numpy_)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(torch_, default, TOL_IMAGE)


def test_bad_rng_is_one_clear_error(models):
    from npsd.errors import InputError
    with pytest.raises(InputError, match="rng must be one of numpy, torch, got 'cuda'"):
        npsd_pipe(models).txt2img(PROMPT, rng="cuda", height=SIZE, width=SIZE, num_inference_steps=1)
