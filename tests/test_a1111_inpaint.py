"""AUTOMATIC1111's inpainting from the same seed: npsd's inpaint with ``schedule_type`` (npsd/a1111_inpaint.py)
against A1111 1.10's procedure written here step by step from modules/processing.py
(StableDiffusionProcessingImg2Img.init and .sample, create_binary_mask, apply_overlay), modules/masking.py
(fill, get_crop_region_v2, expand_crop_region), modules/images.py (resize_image) and
modules/sd_samplers_cfg_denoiser.py (the blend of the denoised latents), run with OpenCV's GaussianBlur
for the mask blur, PIL for the resizes and the paste-back, and the models and k-diffusion samplers of
tests/test_a1111_pipeline.py (diffusers' tiny UNet/VAE/CLIP; A1111's schedules, its img2img start, its
generator per image). Cases: the four "Masked content" choices, 4- and 9-channel UNets, binary, gray
and transparent masks, "Whole picture" and "Only masked" (crops scaled up and down, one moved inside
the image at its corner).

Two numbers per case: the final latents (relative to their largest value; TOL_LATENTS = 2e-5, as the
A1111 runs of tests/test_a1111_pipeline.py; measured 2.1e-6 to 3.5e-6, the test output prints each)
and the saved 8-bit image, which must equal A1111's in all but a few values (the float32 decode
can fall either side of an integer): measured 0 or 1 of 3072 values off, by 1 level (tolerance: 1
level, at most 1% of the values).

The mask blur alone (npsd's NumPy form of OpenCV's fixed-point Gaussian) equals cv2.GaussianBlur bit
for bit on 400 masks and sigmas 1 to 64 (test_mask_blur_equals_opencv).
"""

import importlib.util
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image, ImageFilter, ImageOps

from npsd import a1111_inpaint
from npsd.testing import assert_close
from tests.test_a1111_pipeline import ANCESTRAL, FUNCTIONS, GUIDANCE, NEGATIVE, PROMPT
from tests.test_kdiffusion import a1111_sampler_sigmas, kd  # noqa: F401 - the fixture
from tests.test_rng import a1111_slerp
from tests.test_pipelines import SCHED, SIZE, make_image, make_mask, models, npsd_pipe, reference  # noqa: F401

if importlib.util.find_spec("cv2") is None:
    pytest.skip("OpenCV (opencv-python-headless, the test extra) is needed", allow_module_level=True)


def opencv_blur(masks):
    """[(mask uint8 [H, W], sigma)] -> the masks blurred as A1111 calls cv2.GaussianBlur (across, then
    down, 2 int(2.5 sigma + 0.5) + 1 taps). Run in a child process: OpenCV's wheel brings its own
    OpenBLAS, a third one in this process beside numpy's and scipy's (tests/test_threads.py)."""
    buffer = io.BytesIO()
    np.savez(buffer, *[m for m, _ in masks], sigmas=np.array([s for _, s in masks], np.float64))
    child = ("import io, sys, numpy as np, cv2\n"
             "data = np.load(io.BytesIO(sys.stdin.buffer.read()))\n"
             "out = []\n"
             "for i, s in enumerate(data['sigmas']):\n"
             "    k = 2 * int(2.5 * s + 0.5) + 1\n"
             "    out.append(cv2.GaussianBlur(cv2.GaussianBlur(data[f'arr_{i}'], (k, 1), s), (1, k), s))\n"
             "buffer = io.BytesIO()\n"
             "np.savez(buffer, *out)\n"
             "sys.stdout.buffer.write(buffer.getvalue())\n")
    done = subprocess.run([sys.executable, "-c", child], input=buffer.getvalue(), capture_output=True, check=True)
    data = np.load(io.BytesIO(done.stdout))
    return [data[f"arr_{i}"] for i in range(len(masks))]

TOL_LATENTS = 2e-5
FILLS = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def a1111_fill(image, mask):
    """modules/masking.py's fill, as A1111 writes it."""
    image_mod = Image.new('RGBA', (image.width, image.height))
    image_masked = Image.new('RGBa', (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert('L')))
    image_masked = image_masked.convert('RGBa')
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert('RGBA')
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def resize_image(resize_mode, im, width, height):
    """modules/images.py's resize_image with no upscaler for img2img (A1111's default), as A1111 writes it."""
    LANCZOS = Image.LANCZOS
    if resize_mode == 0:
        return im.resize((width, height), resample=LANCZOS)
    ratio = width / height
    src_ratio = im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = im.resize((src_w, src_h), resample=LANCZOS)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):
    """modules/masking.py's expand_crop_region, as A1111 writes it."""
    x1, y1, x2, y2 = crop_region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height = (x2 - x1) / ratio_processing
        desired_height_diff = int(desired_height - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= image_height:
            diff = y2 - image_height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= image_height:
            y2 = image_height
    else:
        desired_width = (y2 - y1) * ratio_processing
        desired_width_diff = int(desired_width - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= image_width:
            diff = x2 - image_width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= image_width:
            x2 = image_width
    return x1, y1, x2, y2


def a1111_inpaint_run(kd, models, sampler, schedule_type, seed, steps, strength, mask_blur, fill,  # noqa: F811
                      unet_key="unet4", image=None, image_mask=None, full_res=False, padding=0,
                      initial_noise_multiplier=1.0, inpainting_mask_weight=1.0, variation_seed=None,
                      variation_strength=0.0):
    """A1111's inpainting (module docstring) at SIZE x SIZE -> (final latents [1, 4, h, w], the saved
    image uint8 [H, W, 3]). image, image_mask: PIL images (default make_image(), make_mask());
    full_res: "Only masked" with that padding. initial_noise_multiplier, inpainting_mask_weight:
    A1111's options; variation_seed, variation_strength: its subseed and subseed_strength, which mix
    the start noise (p.rng, ImageRNG.first) and not the "latent noise" fill's (create_random_tensors
    of the seeds alone)."""
    ref = reference(StableDiffusionPipeline, models, EulerDiscreteScheduler(**SCHED))
    vae, scaling = models["vae"], ref.vae.config.scaling_factor
    image = make_image() if image is None else image
    image_mask = make_mask() if image_mask is None else image_mask
    # init: create_binary_mask, the blur, the crop or the resize, the overlay
    if image_mask.mode == 'RGBA' and image_mask.getextrema()[-1] != (255, 255):
        image_mask = image_mask.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    else:
        image_mask = image_mask.convert('L')
    if mask_blur > 0:                          # cv2.GaussianBlur across, then down (opencv_blur)
        image_mask = Image.fromarray(opencv_blur([(np.array(image_mask), mask_blur)])[0])
    crop_region = paste_to = None
    if full_res:
        mask_for_overlay = image_mask
        mask = image_mask.convert('L')
        box = mask.getbbox()
        crop_region = (max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, mask.size[0]),
                       min(box[3] + padding, mask.size[1])) if padding else box
        crop_region = expand_crop_region(crop_region, SIZE, SIZE, mask.width, mask.height)
        x1, y1, x2, y2 = crop_region
        image_mask = resize_image(2, mask.crop(crop_region), SIZE, SIZE)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        image_mask = resize_image(0, image_mask, SIZE, SIZE)
        np_mask = np.clip(np.array(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        mask_for_overlay = Image.fromarray(np_mask)
    if crop_region is None:
        image = resize_image(0, image, SIZE, SIZE)
    image_masked = Image.new('RGBa', (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert('L')))
    overlay = image_masked.convert('RGBA')
    if crop_region is not None:
        image = resize_image(2, image.crop(crop_region), SIZE, SIZE)
    if fill != 1:
        image = a1111_fill(image, image_mask)
    source = torch.from_numpy(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))[None]
    with torch.no_grad():
        init_latent = vae.encode(source * 2 - 1).latent_dist.mean * scaling     # (A1111: a sample, unseeded)
        latmask = image_mask.convert('RGB').resize((init_latent.shape[3], init_latent.shape[2]))
        latmask = np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0) / 255
        latmask = np.tile(np.around(latmask[0])[None], (init_latent.shape[1], 1, 1))
        mask, nmask = torch.asarray(1.0 - latmask), torch.asarray(latmask)
        if fill == 2:
            noise = torch.randn(init_latent.shape, generator=torch.Generator().manual_seed(seed))
            init_latent = init_latent * mask + noise * nmask
        elif fill == 3:
            init_latent = init_latent * mask
        c_concat = None
        if unet_key == "unet9":            # img2img_image_conditioning: the rounded mask, the masked image
            cmask = torch.round(torch.from_numpy(np.array(image_mask.convert("L")).astype(np.float32) / 255.0)[None, None])
            cimage = torch.lerp(source * 2 - 1, (source * 2 - 1) * (1.0 - cmask), inpainting_mask_weight)
            cimage = vae.encode(cimage).latent_dist.mean * scaling
            c_concat = torch.cat([torch.nn.functional.interpolate(cmask, size=init_latent.shape[-2:]), cimage], 1)
        unet = models[unet_key]

        def apply(x, t, cond):
            if c_concat is not None:
                x = torch.cat([x, c_concat.expand(x.shape[0], -1, -1, -1)], 1)
            return unet(x, t, encoder_hidden_states=cond).sample

        cond, uncond = ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        ldm = type("LDM", (), {"apply_model": staticmethod(apply), "alphas_cumprod": ref.scheduler.alphas_cumprod.float()})
        den = kd.external.CompVisDenoiser(ldm)

        def guided(x, sigma, **_):                                   # CFGDenoiser, the blend after denoising
            out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
            d_cond, d_uncond = out.chunk(2)
            denoised = d_uncond + (d_cond - d_uncond) * GUIDANCE
            return init_latent * mask + nmask * denoised

        sigmas = torch.from_numpy(np.asarray(a1111_sampler_sigmas(kd, sampler, schedule_type, steps), np.float32))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(init_latent.shape, generator=g)
        if variation_strength:
            subnoise = torch.randn(init_latent.shape, generator=torch.Generator().manual_seed(variation_seed))
            x = a1111_slerp(variation_strength, x[0], subnoise[0])[None]
        if initial_noise_multiplier != 1.0:                          # StableDiffusionProcessingImg2Img.sample
            x *= initial_noise_multiplier
        t_enc = int(min(strength, 0.999) * steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = init_latent + x * sigma_sched[0]
        kw = {}
        if sampler in ANCESTRAL:
            kw["noise_sampler"] = lambda sigma, sigma_next: torch.randn(init_latent.shape, generator=g)
        samples = getattr(kd.sampling, FUNCTIONS[sampler])(guided, xi, sigma_sched, disable=True, **kw)
        samples = samples * nmask + init_latent * mask
        x_samples = torch.clamp((vae.decode(samples / scaling).sample + 1.0) / 2.0, min=0.0, max=1.0)
    x_sample = (255. * np.moveaxis(x_samples[0].numpy(), 0, 2)).astype(np.uint8)
    saved = Image.fromarray(x_sample)                                   # apply_overlay
    if paste_to is not None:
        x, y, w, h = paste_to
        base_image = Image.new('RGBA', (overlay.width, overlay.height))
        base_image.paste(resize_image(1, saved, w, h), (x, y))
        saved = base_image
    saved = saved.convert('RGBA')
    saved.alpha_composite(overlay)
    return samples.numpy(), np.array(saved.convert('RGB'))


def npsd_inpaint(models, sampler, schedule_type, seed, steps, strength, mask_blur, masked_content, output_type,  # noqa: F811
                 unet_key="unet4", image=None, image_mask=None, full_res=False, padding=0, **options):
    pipe = npsd_pipe(models, unet_key)
    return pipe.inpaint(PROMPT, make_image() if image is None else image, make_mask() if image_mask is None else image_mask,
                        strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        height=SIZE, width=SIZE, seed=seed, rng="torch", sampler=sampler, schedule_type=schedule_type,
                        mask_blur=mask_blur, masked_content=masked_content, output_type=output_type,
                        inpaint_area="only masked" if full_res else "whole picture", masked_area_padding=padding,
                        **options)


def check_inpaint(kd, models, sampler, schedule_type, strength, mask_blur, masked_content, unet_key="unet4",  # noqa: F811
                  **inputs):
    shown = {k: f"{v.mode} {v.width}x{v.height}" if isinstance(v, Image.Image) else v for k, v in inputs.items()}
    what = f"{unet_key} {sampler} {schedule_type} strength {strength} blur {mask_blur} {masked_content} {shown}"
    latents, saved = a1111_inpaint_run(kd, models, sampler, schedule_type, 3, 6, strength, mask_blur,
                                       FILLS[masked_content], unet_key, **inputs)
    ours = npsd_inpaint(models, sampler, schedule_type, 3, 6, strength, mask_blur, masked_content, "latent", unet_key,
                        **inputs)
    print(assert_close(ours, latents, TOL_LATENTS, f"{what}: latents vs A1111"))
    image = np.asarray(npsd_inpaint(models, sampler, schedule_type, 3, 6, strength, mask_blur, masked_content, "pil",
                                    unet_key, **inputs))
    assert image.shape == saved.shape
    off = np.abs(image.astype(int) - saved)
    print(f"{what}: 8-bit image vs A1111's: {int((off > 0).sum())} of {off.size} values off, by at most {off.max()}")
    assert off.max() <= 1 and (off > 0).mean() <= 0.01, (off.max(), (off > 0).mean())
    return image, saved


def picture(width, height, seed=5):
    """A smooth picture with noise, as make_image, of another size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([yy / height, xx / width, 1 - xx * yy / (width * height)], -1) + 0.1 * rng.standard_normal((height, width, 3))
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))


def gray_mask():
    """A mask of gray levels (A1111 keeps them: only an alpha mask is made binary)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return Image.fromarray(np.clip(255 * (1.5 - np.hypot(yy - 14, xx - 12) / 8), 0, 255).astype(np.uint8), "L")


def alpha_mask():
    """A transparent mask with an opaque square and a half-opaque rim: A1111 repaints where alpha > 128."""
    a = np.zeros((SIZE, SIZE), np.uint8)
    a[6:22, 10:26], a[22:24, 10:26] = 255, 100
    rgb = np.full((SIZE, SIZE, 3), 0, np.uint8)                       # black: as a gray mask it would keep all
    return Image.fromarray(np.dstack([rgb, a]), "RGBA")


def corner_mask(width, height, box):
    m = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m, "L")


@pytest.mark.parametrize("sampler, schedule_type, strength, mask_blur, masked_content, unet_key", [
    ("euler_a", "automatic", 0.75, 0, "original", "unet4"),
    ("dpmpp_2m", "karras", 1.0, 2, "original", "unet4"),
    ("euler", "automatic", 0.8, 4, "fill", "unet4"),
    ("dpmpp_2m", "automatic", 1.0, 1, "latent noise", "unet4"),
    ("euler_a", "uniform", 0.9, 3, "latent nothing", "unet4"),
    ("euler_a", "automatic", 1.0, 2, "original", "unet9"),
    ("dpmpp_2m", "automatic", 0.75, 4, "fill", "unet9"),
])
def test_inpaint_equals_a1111s(kd, models, sampler, schedule_type, strength, mask_blur, masked_content,  # noqa: F811
                               unet_key):
    check_inpaint(kd, models, sampler, schedule_type, strength, mask_blur, masked_content, unet_key)


@pytest.mark.parametrize("image_mask", [gray_mask(), alpha_mask()], ids=["gray mask", "alpha mask"])
def test_masks_of_gray_levels_and_transparency(kd, models, image_mask):  # noqa: F811
    check_inpaint(kd, models, "euler_a", "automatic", 0.8, 1, "original", image_mask=image_mask)


@pytest.mark.parametrize("width, height, box, padding, blur, content, unet_key", [
    (56, 44, (30, 8, 44, 20), 4, 2, "original", "unet4"),       # a crop smaller than 32x32: scaled up
    (56, 44, (6, 4, 50, 18), 0, 1, "fill", "unet4"),           # wider than tall: rows added, then scaled down
    (40, 60, (2, 40, 12, 58), 6, 3, "latent noise", "unet9"),  # at the image's corner: the box moved inside
])
def test_only_masked(kd, models, width, height, box, padding, blur, content, unet_key):  # noqa: F811
    """"Only masked": the box around the mask cut out, scaled to 32x32, repainted and put back into the
    whole image, which keeps its own size."""
    check_inpaint(kd, models, "dpmpp_2m", "automatic", 0.75, blur, content, unet_key, image=picture(width, height),
                  image_mask=corner_mask(width, height, box), full_res=True, padding=padding)


def test_the_kept_region_is_the_input_exactly(kd, models):  # noqa: F811
    """Where the blurred mask is 0, the saved image is the input's pixels (the paste-back)."""
    image = np.asarray(npsd_inpaint(models, "euler_a", "automatic", 3, 6, 0.75, 2, "original", "pil"))
    soft = a1111_inpaint.soft_mask(make_mask(), 2)
    kept = soft == 0
    assert kept.sum() > 300 and np.array_equal(image[kept], np.asarray(make_image())[kept])


def test_mask_blur_equals_opencv():
    rng = np.random.default_rng(1)
    cases = []
    for trial in range(400):
        h, w = rng.integers(1, 150, 2)
        m = np.zeros((h, w), np.uint8)
        m[rng.integers(0, h):, rng.integers(0, w):] = 255
        if trial % 3 == 0:
            m = rng.integers(0, 256, (h, w)).astype(np.uint8)
        cases.append((m, int(rng.integers(1, 65))))
    for (m, sigma), expected in zip(cases, opencv_blur(cases)):
        assert np.array_equal(a1111_inpaint.blur_mask(m, sigma), expected), (m.shape, sigma)


def test_each_step_of_a1111s_inpainting_is_needed(kd, models, monkeypatch):  # noqa: F811
    """Three small departures from A1111's procedure, each caught by the tolerance that fails
    (measured): no blend of the denoised latents (only the final one) puts the latents 0.19 away
    (TOL_LATENTS 2e-5); rounding to the nearest 8-bit value instead of truncating moves 16% of the
    image's values (the rest is the input pasted back; tolerance 1%); "latent noise" without the fill
    before encoding moves the kept latents next to the mask by 3.1e-4; a gray mask made black and
    white (A1111 makes only an alpha mask so) moves 53% of the image's values."""
    from npsd import schedulers
    latents, saved = a1111_inpaint_run(kd, models, "euler_a", "automatic", 3, 6, 0.75, 2, 1)
    sample = schedulers.sample
    monkeypatch.setattr(schedulers, "sample", lambda *a, edit_x0=None, **kw: sample(*a, **kw))
    ours = npsd_inpaint(models, "euler_a", "automatic", 3, 6, 0.75, 2, "original", "latent")
    err = float(np.abs(ours - latents).max() / np.abs(latents).max())
    print(f"without the blend of the denoised latents: {err:.3g} (tolerance {TOL_LATENTS})")
    assert err > 10 * TOL_LATENTS
    monkeypatch.undo()
    from npsd import images
    to_uint8 = images.to_uint8
    monkeypatch.setattr(images, "to_uint8", lambda x, truncate=False: to_uint8(x, False))
    monkeypatch.setattr("npsd.pipeline.to_uint8", images.to_uint8)
    image = np.asarray(npsd_inpaint(models, "euler_a", "automatic", 3, 6, 0.75, 2, "original", "pil"))
    off = (image != saved).mean()
    print(f"rounded instead of truncated: {off:.0%} of the values off (tolerance 1%)")
    assert off > 0.1
    monkeypatch.undo()
    latents, _ = a1111_inpaint_run(kd, models, "euler", "automatic", 3, 6, 0.9, 0, 2)
    monkeypatch.setattr(a1111_inpaint, "fill", lambda image, m: image)
    ours = npsd_inpaint(models, "euler", "automatic", 3, 6, 0.9, 0, "latent noise", "latent")
    err = float(np.abs(ours - latents).max() / np.abs(latents).max())
    print(f"latent noise without the fill: {err:.3g} (tolerance {TOL_LATENTS})")
    assert err > 5 * TOL_LATENTS
    _, saved = a1111_inpaint_run(kd, models, "euler_a", "automatic", 3, 6, 0.8, 1, 1, image_mask=gray_mask())
    soft_mask = a1111_inpaint.soft_mask
    monkeypatch.setattr(a1111_inpaint, "soft_mask", lambda m, blur: soft_mask(m.point(lambda v: 255 * (v > 128)), blur))
    image = np.asarray(npsd_inpaint(models, "euler_a", "automatic", 3, 6, 0.8, 1, "original", "pil", image_mask=gray_mask()))
    off = (image != saved).mean()
    print(f"a gray mask made black and white: {off:.0%} of the values off (tolerance 1%)")
    assert off > 0.05


def test_bad_arguments_are_one_line_before_any_step():
    """A1111's inpainting arguments are checked before anything runs, each with a one-line error."""
    import npsd
    from npsd.errors import InputError
    pipe = npsd.load()
    image, black = Image.new("RGB", (64, 64), "gray"), Image.new("L", (64, 64), 0)
    white = Image.new("L", (64, 64), 255)

    def refuse(*step):
        raise AssertionError("a step ran")

    a1111 = dict(sampler="euler_a", schedule_type="automatic")
    for kw, mask, message in (
            (dict(masked_content="latent"), white, "masked_content must be one of 'fill', 'original'"),
            (dict(inpaint_area="only_masked"), white, "inpaint_area must be one of 'whole picture', 'only masked'"),
            (dict(masked_area_padding=-1), white, "masked_area_padding must be a whole number"),
            (dict(mask_blur=257), white, "mask_blur 257 is more than"),
            (dict(inpaint_area="only masked"), black, "the mask is all black"),
            (dict(masked_content="fill", schedule_type=None), white, "are A1111's inpainting: give a schedule_type")):
        with pytest.raises(InputError, match=message) as e:
            pipe.inpaint("a red circle", image, mask, num_inference_steps=2, callback=refuse, **{**a1111, **kw})
        assert "\n" not in str(e.value)


def test_resize_modes_equal_a1111s_and_diffusers():
    """npsd.images.resize_to against A1111's resize_image (above, as A1111 writes it) and diffusers'
    VaeImageProcessor.resize ("default", "crop", "fill"), on 200 random sizes: equal pixels."""
    from diffusers.image_processor import VaeImageProcessor
    from npsd.images import resize_to
    processor = VaeImageProcessor()
    rng = np.random.default_rng(3)
    for trial in range(200):
        w, h, W, H = (int(v) for v in rng.integers(4, 90, 4))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
        for number, mode, theirs in ((0, "just resize", "default"), (1, "crop and resize", "crop"),
                                     (2, "resize and fill", "fill")):
            ours = np.asarray(resize_to(im, W, H, mode))
            assert np.array_equal(ours, np.asarray(resize_image(number, im, W, H))), (trial, mode)
            assert np.array_equal(ours, np.asarray(processor.resize(im, H, W, resize_mode=theirs))), (trial, mode)
    # where a side would round to 0 pixels (A1111 and diffusers fail there), npsd keeps 1
    for size in ((1, 300), (300, 1)):
        for mode in ("crop and resize", "resize and fill"):
            assert resize_to(Image.new("RGB", size, "red"), 64, 64, mode).size == (64, 64)


@pytest.mark.parametrize("sampler, unet_key, content, multiplier, weight", [
    ("euler_a", "unet4", "original", 0.8, 1.0),
    ("dpmpp_2m", "unet9", "latent noise", 1.3, 0.5),     # the fill's own noise is not multiplied
    ("euler", "unet9", "fill", 1.0, 0.0),                 # weight 0: the UNet reads the whole image
])
def test_noise_multiplier_and_mask_weight_equal_a1111s(kd, models, sampler, unet_key, content, multiplier, weight):  # noqa: F811
    """A1111's initial_noise_multiplier (StableDiffusionProcessingImg2Img.sample: the start noise times
    it; the "latent noise" fill draws its own) and inpainting_mask_weight (inpainting_image_conditioning:
    the 9-channel UNet reads lerp(image, image * (1 - mask), weight)), written in a1111_inpaint_run as
    A1111 does, against npsd's: latents measured 2.3e-6 to 3.6e-6, TOL_LATENTS. Without the options
    the same run is far (asserted); the multiplier applied to the image's latents instead, or the
    weight reversed, fail (checked by hand: 2.4e-1 and 1.7e-1; 7.6e-3 at weight 0)."""
    options = dict(initial_noise_multiplier=multiplier, inpainting_mask_weight=weight)
    check_inpaint(kd, models, sampler, "automatic", 0.8, 2, content, unet_key, **options)
    ref, _ = a1111_inpaint_run(kd, models, sampler, "automatic", 3, 6, 0.8, 2, FILLS[content], unet_key, **options)
    plain = npsd_inpaint(models, sampler, "automatic", 3, 6, 0.8, 2, content, "latent", unet_key)
    assert np.abs(plain - ref).max() > 1e2 * TOL_LATENTS * np.abs(ref).max()


@pytest.mark.parametrize("unet_key", ["unet4", "unet9"])
def test_latent_noise_fill_is_the_seeds_own_noise(kd, models, unet_key):  # noqa: F811
    """With a variation seed, A1111's "latent noise" fill is still the seed's own noise
    (create_random_tensors of the seeds alone) while the start noise is mixed (ImageRNG.first):
    latents against a1111_inpaint_run within TOL_LATENTS (measured 2.8e-6 and 4.0e-6); the fill taken
    from the mixed start noise instead is 5.2e-2 and 7.3e-2 away."""
    check_inpaint(kd, models, "euler_a", "automatic", 0.9, 2, "latent noise", unet_key, variation_seed=77,
                  variation_strength=0.6)
