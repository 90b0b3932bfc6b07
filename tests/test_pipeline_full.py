"""One full-size text-to-image run against diffusers' StableDiffusionPipeline: the real SD v1.5
shapes (ViT-L/14 text encoder, the 860M-parameter UNet, the full VAE) with perturbed random weights,
at a reduced image size (256x256, latents 32x32) and 2 DDIM steps with guidance.

Tolerance: images in [0, 1] agree to 1e-3 absolute, latents to 1e-4 relative. The full-size UNet's
own output differs from diffusers' by up to ~1e-5 relative in float32 (tests/test_unet.py), and a
step of DDIM and the VAE decoder carry that through; measured differences are printed with -s and
listed in the closing note of the sampling issue.
"""

import gc

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import npsd
from npsd.config import sd15_config
from npsd.testing import assert_close
from npsd.weights import path as weights_path
from tests.helpers import n2t, perturb_, to_numpy_params

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 256


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
        ref_latents = ref_pipe(PROMPT, latents=n2t(latents), output_type="latent", **kw).images.numpy()
        ref_images = ref_pipe(PROMPT, latents=n2t(latents), output_type="np", **kw).images
    sd = text.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    params = {"text_encoder": to_numpy_params(sd, prefix, drop=("position_ids",)),
              "unet": to_numpy_params(unet.state_dict()), "vae": to_numpy_params(vae.state_dict())}
    del ref_pipe, text, unet, vae, sd
    gc.collect()
    return params, latents, kw, ref_latents, ref_images


def test_full_size_txt2img_matches_diffusers(full_run):
    params, latents, kw, ref_latents, ref_images = full_run
    pipe = npsd.Pipeline(params, sd15_config())
    ours = pipe.txt2img(PROMPT, sampler="ddim", latents=latents, output_type="latent", **kw)
    print(assert_close(ours, ref_latents, 1e-4, "full-size txt2img latents, 2 DDIM steps"))
    images = pipe.vae_decode(ours / np.float32(pipe.scaling_factor))
    images = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    c = assert_close(images, ref_images, 1e-3, "full-size txt2img images")
    print(c)
    assert c.max_abs <= 1e-3
