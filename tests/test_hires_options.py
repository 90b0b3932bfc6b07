"""A1111's hires fix options "Hires resize", "Hires prompt", "Hires negative prompt", "Hires sampler"
and "Hires schedule type" against an A1111 run (npsd/hires.py, Pipeline._hires_pass).

The reference is tests/test_a1111_pipeline.py's A1111 run (diffusers' tiny random models, k-diffusion's
samplers on A1111's sigmas, the image's torch generator) with A1111's StableDiffusionProcessingTxt2Img
written out: calculate_target_resolution (the size that covers the resize size with the first pass's
aspect ratio, and truncate_x/y, what overhangs it in latents), sample_hr_pass (the latents
interpolated to that size // opt_f, or the 8-bit image resized to it with resize_image and encoded
again; then cut to [truncate // 2, side - (truncate + 1) // 2); the second pass with hr_sampler_name
or the first pass's sampler, on hr_scheduler, which init sets to the first pass's scheduler where it
is None, "Automatic" then resolved for the hires sampler) and calculate_hr_conds (the second pass
guided by the hires prompt and negative prompt). A1111's opt_f is the VAE's factor, 8 for SD; the
tiny VAE's is 2, which is what opt_f stands for here.

TOL_IMAGE = 2e-5 relative (images in [0, 1]), as tests/test_a1111_pipeline.py; measured 1.5e-6 to
3.5e-6 (the output prints each). With an image upscaler the first pass goes through A1111's 8-bit
image, where a value within rounding (about 1e-6) of a level's edge may land one level apart: here
in one case of the two (seed 21: 2.8e-5; seeds 22 and 23: 2.8e-6 and 2.7e-6, and 3.3e-5, 2.9e-6 for
the Lanczos case with the same three seeds), so those cases have TOL_8BIT = 1e-4. The same runs
with the crop one latent off the middle are 2.3e-2 (the image upscaler) to 6.1e-1 away, with the
first pass's prompts in the second pass 2.5e-3, with the first pass's sampler and schedule 2.2e-2
to 1.1e-1; npsd's crop moved by one where the cut is odd, its hires prompts ignored, its hires
sampler or its hires schedule type ignored fails the same cases.
"""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

from npsd.errors import InputError
from npsd.hires import Hires
from npsd.testing import assert_close
from tests.test_a1111_pipeline import (ANCESTRAL, FUNCTIONS, GUIDANCE, NEGATIVE, PROMPT, _LDM,
                                       a1111_resize_with_upscaler)
from tests.test_kdiffusion import a1111_sampler_sigmas, kd  # noqa: F401 - the fixture
from tests.test_pipelines import SCHED, models, npsd_pipe, reference  # noqa: F401

TOL_IMAGE = 2e-5
TOL_8BIT = 1e-4
OPT_F = 2                       # the tiny VAE's factor: A1111's opt_f for this model
INTERPOLATE = {"latent": ("bilinear", False), "latent_bicubic": ("bicubic", False)}
IMAGE_UPSCALERS = {"lanczos": "Lanczos", "none": "None"}


def a1111_target(width, height, hr_resize_x, hr_resize_y):
    """calculate_target_resolution, as A1111 writes it -> (hr_upscale_to_x, _y, truncate_x, _y)."""
    truncate_x = truncate_y = 0
    if hr_resize_y == 0:
        hr_upscale_to_x, hr_upscale_to_y = hr_resize_x, hr_resize_x * height // width
    elif hr_resize_x == 0:
        hr_upscale_to_x, hr_upscale_to_y = hr_resize_y * width // height, hr_resize_y
    else:
        src_ratio, dst_ratio = width / height, hr_resize_x / hr_resize_y
        if src_ratio < dst_ratio:
            hr_upscale_to_x, hr_upscale_to_y = hr_resize_x, hr_resize_x * height // width
        else:
            hr_upscale_to_x, hr_upscale_to_y = hr_resize_y * width // height, hr_resize_y
        truncate_x = (hr_upscale_to_x - hr_resize_x) // OPT_F
        truncate_y = (hr_upscale_to_y - hr_resize_y) // OPT_F
    return hr_upscale_to_x, hr_upscale_to_y, truncate_x, truncate_y


def a1111_sample(kd, guided, x, n, t_enc, sampler, schedule_type, seed):  # noqa: F811
    """A1111's sample (t_enc None: from the seed's noise times the first sigma) or sample_img2img (x
    noised to the sigma of step n - t_enc - 1, sampled from there) of k-diffusion's `sampler` on A1111's
    sigmas for n steps of schedule_type, the seed's torch generator drawing the start and each
    ancestral step's noise; guided(x, sigma) the denoiser."""
    sigmas = torch.from_numpy(a1111_sampler_sigmas(kd, sampler, schedule_type, n).astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g)
    x = noise * sigmas[0] if t_enc is None else x + noise * sigmas[n - t_enc - 1]
    kw = {"noise_sampler": lambda s, s_next: torch.randn(x.shape, generator=g)} if sampler in ANCESTRAL else {}
    start = 0 if t_enc is None else n - t_enc - 1
    return getattr(kd.sampling, FUNCTIONS[sampler])(guided, x, sigmas[start:], disable=True, **kw)


def a1111_hires_run(kd, models, sampler, schedule_type, seed, steps, height, width, hires,  # noqa: F811
                    shift=0, same_prompts=False, first_sampler=False):
    """A1111's txt2img with the hires fix -> images [1, H, W, 3] in [0, 1]. shift moves the crop by
    that many latents, same_prompts keeps the first pass's prompts, first_sampler its sampler and
    schedule: the wrong runs of the docstring."""
    if first_sampler:
        hires = dataclasses.replace(hires, sampler=None, schedule_type=None)
    ref = reference(StableDiffusionPipeline, models, EulerDiscreteScheduler(**SCHED))
    vae, scaling = models["vae"], ref.vae.config.scaling_factor
    den = kd.external.CompVisDenoiser(_LDM(models["unet4"], ref.scheduler.alphas_cumprod.float()))

    def guided_by(prompt, negative):
        cond, uncond = ref.encode_prompt(prompt, "cpu", 1, True, negative)

        def guided(x, sigma, **_):
            out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
            d_cond, d_uncond = out.chunk(2)
            return d_uncond + (d_cond - d_uncond) * GUIDANCE
        return guided

    with torch.no_grad():
        x = a1111_sample(kd, guided_by(PROMPT, NEGATIVE), torch.zeros(1, 4, height // OPT_F, width // OPT_F), steps,
                         None, sampler, schedule_type, seed)
        rx, ry = hires.resize or (0, 0)
        if hires.resize is None:
            to_x, to_y, tx, ty = int(width * hires.scale), int(height * hires.scale), 0, 0
        else:
            to_x, to_y, tx, ty = a1111_target(width, height, rx, ry)
        if hires.upscaler in INTERPOLATE:
            mode, antialias = INTERPOLATE[hires.upscaler]
            x = torch.nn.functional.interpolate(x, size=(to_y // OPT_F, to_x // OPT_F), mode=mode, antialias=antialias)
        else:
            lowres = torch.clamp((vae.decode(x / scaling).sample + 1.0) / 2.0, min=0.0, max=1.0)
            x_sample = (255. * np.moveaxis(lowres[0].numpy(), 0, 2)).astype(np.uint8)
            image = a1111_resize_with_upscaler(Image.fromarray(x_sample), to_x, to_y, IMAGE_UPSCALERS[hires.upscaler])
            image = torch.from_numpy(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))[None]
            x = vae.encode(image * 2 - 1).latent_dist.mean * scaling
        y0, x0 = ty // 2 + (shift if ty else 0), tx // 2 + (shift if tx else 0)   # (shift: only what is cut)
        x = x[:, :, y0:x.shape[2] - ty + y0, x0:x.shape[3] - tx + x0]
        prompt = PROMPT if same_prompts or hires.prompt is None else hires.prompt
        negative = NEGATIVE if same_prompts or hires.negative_prompt is None else hires.negative_prompt
        n = hires.steps or steps
        # the hires sampler (hr_sampler_name or sampler_name) on hr_scheduler, which is the first pass's
        # scheduler where it is None ("Automatic" resolved for the hires sampler)
        x = a1111_sample(kd, guided_by(prompt, negative), x, n, int(min(hires.strength, 0.999) * n),
                         hires.sampler or sampler, hires.schedule_type or schedule_type, seed)
        image = vae.decode(x / scaling).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


CASES = {  # name: (sampler, schedule type, first pass height, width, Hires)
    "resize, the width overhangs": ("euler_a", "automatic", 32, 48, Hires(upscaler="latent", steps=3, strength=0.6,
                                                                           resize=(40, 40))),
    "resize, the height overhangs": ("dpmpp_2m", "karras", 48, 32, Hires(upscaler="latent_bicubic", steps=3,
                                                                         strength=0.55, resize=(44, 36))),
    "resize by height only, Lanczos": ("euler", "automatic", 32, 32, Hires(upscaler="lanczos", steps=3, strength=0.5,
                                                                           resize=(0, 44))),
    "resize with an image upscaler": ("euler_a", "automatic", 32, 48, Hires(upscaler="none", steps=3, strength=0.5,
                                                                            resize=(40, 40))),
    "hires prompt and negative": ("euler_a", "automatic", 32, 32, Hires(scale=1.5, steps=3, strength=0.6,
                                                                        prompt="a green field under a grey sky",
                                                                        negative_prompt="dark")),
    "all three": ("dpmpp_2m", "automatic", 32, 48, Hires(upscaler="latent", steps=3, strength=0.6, resize=(36, 40),
                                                         prompt="a green field", negative_prompt="")),
    "hires sampler, automatic for it": ("euler_a", "automatic", 32, 32, Hires(scale=1.5, steps=3, strength=0.6,
                                                                              sampler="dpmpp_2m")),
    "hires sampler and schedule type": ("dpmpp_2m", "karras", 32, 32, Hires(scale=1.5, steps=4, strength=0.6,
                                                                            sampler="euler_a", schedule_type="exponential")),
    "hires schedule type only": ("euler", "automatic", 32, 32, Hires(scale=1.5, steps=3, strength=0.6,
                                                                     schedule_type="karras")),
    "hires sampler that drops a sigma": ("euler", "automatic", 32, 32, Hires(scale=1.5, steps=3, strength=0.6,
                                                                             sampler="dpm2_a")),
}


@pytest.mark.parametrize("case", CASES)
def test_hires_options_equal_an_a1111_run(kd, models, case):  # noqa: F811
    sampler, schedule_type, height, width, hires = CASES[case]
    pipe = npsd_pipe(models)
    ours = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=GUIDANCE,
                        height=height, width=width, seed=21, rng="torch", sampler=sampler, schedule_type=schedule_type,
                        output_type="np", hires=hires)
    ref = a1111_hires_run(kd, models, sampler, schedule_type, 21, 4, height, width, hires)
    if hires.resize is not None and 0 not in hires.resize:
        assert ours.shape[1:3] == (hires.resize[1], hires.resize[0])
    tol = TOL_8BIT if hires.upscaler in IMAGE_UPSCALERS else TOL_IMAGE
    print(assert_close(ours, ref, tol, f"{case} vs A1111"))
    if hires.resize is not None and 0 not in hires.resize:
        wrong = dict(shift=1)
    elif hires.prompt is not None:
        wrong = dict(same_prompts=True)
    elif hires.sampler is not None or hires.schedule_type is not None:
        wrong = dict(first_sampler=True)
    else:
        return                                      # (resize by one side: nothing cropped)
    with pytest.raises(AssertionError, match="exceeds the tolerance") as caught:
        assert_close(ours, a1111_hires_run(kd, models, sampler, schedule_type, 21, 4, height, width, hires, **wrong),
                     tol, f"{case}, {next(iter(wrong))}")
    print(str(caught.value)[:90])


def test_hires_options_errors_are_one_line(models):  # noqa: F811
    pipe = npsd_pipe(models)
    kw = dict(num_inference_steps=2, height=32, width=32, seed=1, output_type="latent")
    cases = [(dict(resize=(0, 0)), r"hires resize must be \(width, height\), whole numbers from 0 to 16384"),
             (dict(resize=(40,)), r"hires resize must be \(width, height\)"),
             (dict(resize=(-8, 40)), r"hires resize must be"),
             (dict(prompt=3), "hires prompt must be a str, a list of str or None, got int"),
             (dict(negative_prompt=[]), "hires negative_prompt must be a str, a list of str or None, got list")]
    for bad, message in cases:
        with pytest.raises(InputError, match=message) as caught:
            Hires(**bad)
        assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="the hires pass would be 2x2 pixels, below this model's smallest side 4; "
                                         "give a larger hires scale or resize"):
        pipe.txt2img(PROMPT, hires=Hires(resize=(2, 2)), **kw)
    with pytest.raises(InputError, match=r"the hires prompt's <lora:\.\.\.> tags differ from the prompt's"):
        pipe.txt2img(PROMPT + " <lora:ink:0.5>", hires=Hires(prompt=PROMPT), prompt_syntax="a1111", **kw)
    for bad, message in ((dict(sampler="k_euler"), "unknown hires sampler 'k_euler'; use one of ddpm, ddim"),
                         (dict(schedule_type="Karras"), "unknown hires schedule_type 'Karras'; use one of automatic")):
        with pytest.raises(InputError, match=message):
            Hires(**bad)
    with pytest.raises(InputError, match=r"hires schedule_type is one of A1111's schedules; give the first pass one "
                                         r"too \(schedule_type=...\)"):
        pipe.txt2img(PROMPT, hires=Hires(schedule_type="karras"), **kw)
    with pytest.raises(InputError, match="the hires sampler 'ddim' has no A1111 schedule type; with schedule_type use "
                                         "one of euler, euler_a"):
        pipe.txt2img(PROMPT, sampler="euler", schedule_type="automatic", hires=Hires(sampler="ddim"), **kw)
    # sde_noise may be for the hires sampler alone (A1111 draws its SDE samplers' noise from a Brownian tree)
    with pytest.raises(InputError, match="sde_noise='brownian' applies to"):
        pipe.txt2img(PROMPT, sampler="euler", sde_noise="brownian", hires=Hires(scale=1.5, steps=2), **kw)
    sde = dict(sampler="euler", schedule_type="automatic", rng="torch", hires=Hires(scale=1.5, steps=2,
                                                                                   sampler="dpmpp_2m_sde"), **kw)
    assert np.abs(pipe.txt2img(PROMPT, sde_noise="brownian", **sde) - pipe.txt2img(PROMPT, **sde)).max() > 1e-3
    # a list of prompts takes one hires prompt for all, or one each
    two = pipe.txt2img([PROMPT, "a blue square"], hires=Hires(scale=1.5, steps=2, prompt="a green field"), **kw)
    each = pipe.txt2img([PROMPT, "a blue square"], hires=Hires(scale=1.5, steps=2, prompt=["a green field"] * 2), **kw)
    assert np.array_equal(two, each)
