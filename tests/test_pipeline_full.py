"""One full-size text-to-image run against diffusers' StableDiffusionPipeline: the real SD v1.5
shapes (ViT-L/14 text encoder, the 860M-parameter UNet, the full VAE) with perturbed random weights,
at a reduced image size (256x256, latents 32x32) and 2 DDIM steps, with guidance (scale 7.5) and
without (scale 1).

Tolerances: at most ~10x the errors measured (max |npsd - diffusers| / max |diffusers|), quoted
beside them as "fast / plain" (npsd/fast.py and the plain npsd/nn.py, `nn.set_fast`); with the
initial noise of seeds 12 and 13 instead of 11 they stayed within 1.1x. Guidance multiplies the
float32 rounding of the UNet's two branches by about the guidance scale, so the guided run
measures ~7x more than the unguided one. test_full_size_pipeline_sensitivity shows that each
small real bug of tests.helpers.BUGS fails these checks.
"""

import gc

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import npsd
from npsd.config import sd15_config
from npsd.testing import assert_close
from npsd.weights import path as weights_path
from tests.helpers import BUGS, assert_caught, n2t, perturb_, to_numpy_params

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 256
# Measured on the AMD EPYC without AVX-512 of README.md's speed tables, where PyTorch's float32
# rounding is most of the difference (tests/test_unet.py, above RTOL_FULL)
RTOL_LATENTS = 2e-5             # guided, the final latents: measured 6.5e-6 / 6.6e-6
RTOL_IMAGES = 3e-5              # guided, the decoded images in [0, 1]: 8.8e-6 / 1.0e-5
RTOL_UNGUIDED = 3e-6            # unguided, the final latents: 9.8e-7 / 8.6e-7
RTOL_SEED = 4e-5                # from the seed alone (rng="torch"): txt2img Euler a images 9.4e-6 / 8.8e-6,
                                # img2img DDPM latents 9.3e-6 / 8.8e-6
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
             timestep_spacing="leading")


def input_image():
    """A smooth 256x256 test image (the img2img input)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    return Image.fromarray((np.stack([yy, xx, 1 - xx * yy], -1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def full_run():
    """Build the full-size reference once, run it, convert its weights, then free it."""
    torch.manual_seed(0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                                                 num_attention_heads=12, intermediate_size=3072,
                                                 max_position_embeddings=77, hidden_act="quick_gelu")).eval(), 1)
    unet = perturb_(UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32).eval(), 2)
    vae = perturb_(AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                                 layers_per_block=2, sample_size=512).eval(), 3)
    tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    ref_pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    latents = np.random.default_rng(11).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    kw = dict(negative_prompt="blurry", num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE)
    with torch.no_grad():
        ref_latents = ref_pipe(PROMPT, latents=n2t(latents), output_type="latent", **kw).images
        # the images as the pipeline makes them with output_type="np", from the same run's latents
        decoded = vae.decode(ref_latents / vae.config.scaling_factor, return_dict=False)[0]
        ref_images = ref_pipe.image_processor.postprocess(decoded, output_type="np")
        ref_latents = ref_latents.numpy()
        ref_unguided = ref_pipe(PROMPT, latents=n2t(latents), output_type="latent",
                                **dict(kw, guidance_scale=1.0)).images.numpy()
        # from the seed alone: Euler a (txt2img) and DDPM (img2img, which samples the VAE posterior)
        ref_pipe.scheduler = EulerAncestralDiscreteScheduler(**SCHED)
        seeded = ref_pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(21), output_type="np", **kw).images
        img2img = StableDiffusionImg2ImgPipeline(**ref_pipe.components)
        img2img.scheduler = DDPMScheduler(**SCHED, clip_sample=False, variance_type="fixed_small")
        seeded_img2img = img2img(PROMPT, image=input_image(), strength=0.5, generator=torch.Generator("cpu").manual_seed(22),
                                 output_type="latent", **dict(kw, num_inference_steps=4, height=None,
                                                             width=None)).images.numpy()
        del img2img
    sd = text.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    params = {"text_encoder": to_numpy_params(sd, prefix, drop=("position_ids",)),
              "unet": to_numpy_params(unet.state_dict()), "vae": to_numpy_params(vae.state_dict())}
    del ref_pipe, text, unet, vae, sd
    gc.collect()
    return dict(params=params, latents=latents, kw=kw, ref_latents=ref_latents, ref_images=ref_images,
                ref_unguided=ref_unguided, seeded=seeded, seeded_img2img=seeded_img2img)


def txt2img(run, guidance_scale, config=None):
    """npsd's final latents for the fixture's prompt and noise; returns (pipeline, latents)."""
    pipe = npsd.Pipeline(run["params"], config or sd15_config())
    latents = pipe.txt2img(PROMPT, sampler="ddim", latents=run["latents"], output_type="latent",
                           **dict(run["kw"], guidance_scale=guidance_scale))
    return pipe, latents


def test_full_size_txt2img_matches_diffusers(full_run):
    pipe, ours = txt2img(full_run, 7.5)
    print(assert_close(ours, full_run["ref_latents"], RTOL_LATENTS, "full-size txt2img latents, 2 DDIM steps"))
    images = pipe.vae_decode(ours / np.float32(pipe.scaling_factor))
    images = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    print(assert_close(images, full_run["ref_images"], RTOL_IMAGES, "full-size txt2img images"))


def test_full_size_txt2img_without_guidance_matches_diffusers(full_run):
    _, ours = txt2img(full_run, 1.0)
    print(assert_close(ours, full_run["ref_unguided"], RTOL_UNGUIDED, "full-size txt2img latents, no guidance"))


def test_full_size_same_seed_txt2img_euler_a(full_run):
    """rng="torch": the seed alone gives diffusers' image (Euler a draws noise at every step)."""
    pipe = npsd.Pipeline(full_run["params"], sd15_config())
    ours = pipe.txt2img(PROMPT, sampler="euler_a", seed=21, rng="torch", output_type="np", **full_run["kw"])
    print(assert_close(ours, full_run["seeded"], RTOL_SEED, "full-size txt2img from the seed, Euler a"))


def test_full_size_same_seed_img2img_ddpm(full_run):
    """rng="torch": posterior sample, forward noise and DDPM's noise all drawn as diffusers draws them."""
    pipe = npsd.Pipeline(full_run["params"], sd15_config())
    ours = pipe.img2img(PROMPT, input_image(), strength=0.5, sampler="ddpm", seed=22, rng="torch",
                        output_type="latent", **dict(full_run["kw"], num_inference_steps=4, height=None, width=None))
    print(assert_close(ours, full_run["seeded_img2img"], RTOL_SEED, "full-size img2img from the seed, DDPM"))


@pytest.mark.parametrize("bug", [b for b in BUGS if b != "vae_group_norm_eps"])
def test_full_size_pipeline_sensitivity(full_run, monkeypatch, bug):
    """Each small real bug fails a full-size txt2img check on its tolerance. All but the guidance bug
    are shown without guidance: most of a bug's effect is common to the two branches of guidance,
    while their float32 rounding is not, so guidance multiplies the check's noise (and its
    tolerance) by ~7 but a bug's error by ~2 (measured, GELU's tanh form in GEGLU: 7.6e-6 unguided,
    1.5e-5 guided; the GroupNorm eps: 8.1e-6 and 1.4e-5). The VAE's GroupNorm eps is shown on the
    full VAE (tests/test_vae.py, test_sd15_sensitivity)."""
    bug = BUGS[bug]
    bug.inject(monkeypatch)
    config = bug.model_config(sd15_config())
    if bug is BUGS["cfg_swapped"]:
        _, ours = txt2img(full_run, 7.5, config)
        assert_caught(bug, lambda: assert_close(ours, full_run["ref_latents"], RTOL_LATENTS, "txt2img latents"))
    else:
        _, ours = txt2img(full_run, 1.0, config)
        assert_caught(bug, lambda: assert_close(ours, full_run["ref_unguided"], RTOL_UNGUIDED,
                                                "txt2img latents, no guidance"))
