"""Whole pipelines against diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline with the same random
weights (tiny configs), the same initial noise and deterministic samplers (DDIM eta 0, Euler).

Tolerances: each comparison has its own, at most ~10x the error measured for it (max |npsd - diffusers|
/ max |diffusers|; images lie in [0, 1] with a maximum of 1, so this is also the absolute error in
pixels). The measured errors, quoted beside each tolerance as "fast / plain" (npsd/fast.py and the
plain npsd/nn.py, `nn.set_fast`), are those of the test's own inputs; with eight other noise seeds
they stayed within 1.5x of them. Guidance multiplies the UNet's float32 rounding by about the
guidance scale, so the guided cases measure ~2x more than the unguided ones. A bug of any
consequence moves pixels by 1e-2 or more (test_swapped_guidance_halves_fail); the small real bugs
of tests.helpers.BUGS are shown on the full-size pipeline (tests/test_pipeline_full.py), whose
float32 noise is smaller against the bugs' effect than the tiny models'.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import npsd
from npsd.config import sd15_config
from npsd.errors import InputError
from npsd.testing import assert_close
from npsd.weights import path as weights_path
from tests.helpers import assert_caught, n2t, perturb_, to_numpy_params

SIZE = 32                        # image side; the tiny VAE has 2 levels, so latents are 16x16
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
             timestep_spacing="leading", num_train_timesteps=1000)


def tiny_unet(in_channels=4, seed=1):
    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                             attention_head_dim=4, norm_num_groups=8)
    return perturb_(m.eval(), seed=seed)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=77, hidden_act="quick_gelu")).eval(), 2)
    vae = perturb_(AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                 layers_per_block=1, sample_size=SIZE).eval(), 3)
    tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77)
    return {"text": text, "vae": vae, "unet4": tiny_unet(4), "unet9": tiny_unet(9, seed=4), "tok": tok}


def npsd_pipe(models, unet_key="unet4"):
    sd = models["text"].state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    params = {"text_encoder": to_numpy_params(sd, prefix, drop=("position_ids",)),
              "unet": to_numpy_params(models[unet_key].state_dict()),
              "vae": to_numpy_params(models["vae"].state_dict())}
    config = sd15_config()
    config["text_encoder"]["num_heads"] = 4
    config["unet"].update(num_heads=4, norm_groups=8)
    config["vae"].update(norm_groups=8)
    return npsd.Pipeline(params, config)


def reference(cls, models, scheduler, unet_key="unet4"):
    return cls(vae=models["vae"], text_encoder=models["text"], tokenizer=models["tok"], unet=models[unet_key],
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def scheduler_for(name):
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SCHED)
    return EulerDiscreteScheduler(**SCHED)


def make_image():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = np.stack([yy, xx, 1 - xx * yy], -1) + 0.1 * rng.standard_normal((SIZE, SIZE, 3))
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))


def make_mask():
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:24, 4:20] = 255                                       # white = repaint
    return Image.fromarray(m, "L")


@pytest.mark.parametrize("sampler, guidance, tol", [
    ("ddim", 7.5, 1e-5),     # measured 1.7e-6 / 1.4e-6
    ("euler", 7.5, 1e-5),    # 1.9e-6 / 1.7e-6
    ("ddim", 1.0, 5e-6),     # 6.6e-7 / 7.2e-7
    ("euler", 1.0, 5e-6),    # 6.6e-7 / 6.0e-7
])
def test_txt2img_matches_diffusers(models, sampler, guidance, tol):
    latents = np.random.default_rng(7).standard_normal((2, 4, 16, 16)).astype(np.float32)
    ref = reference(StableDiffusionPipeline, models, scheduler_for(sampler))(
        [PROMPT, "a green square"], negative_prompt=[NEGATIVE, ""], num_inference_steps=4,
        guidance_scale=guidance, height=SIZE, width=SIZE, latents=n2t(latents), output_type="np").images
    ours = npsd_pipe(models).txt2img([PROMPT, "a green square"], negative_prompt=[NEGATIVE, ""],
                                     num_inference_steps=4, guidance_scale=guidance, height=SIZE, width=SIZE,
                                     sampler=sampler, latents=latents, output_type="np")
    print(assert_close(ours, ref, tol, f"txt2img {sampler} cfg {guidance}"))


def test_txt2img_num_images_and_latent_output(models):
    latents = np.random.default_rng(8).standard_normal((2, 4, 16, 16)).astype(np.float32)
    ref = reference(StableDiffusionPipeline, models, scheduler_for("ddim"))(
        PROMPT, num_inference_steps=3, num_images_per_prompt=2, height=SIZE, width=SIZE,
        latents=n2t(latents), output_type="latent").images
    ours = npsd_pipe(models).txt2img(PROMPT, num_inference_steps=3, num_images=2, height=SIZE, width=SIZE,
                                     sampler="ddim", latents=latents, output_type="latent")
    # measured 2.2e-6 / 3.3e-6 (relative to the latents' max |x| of 12.5)
    print(assert_close(ours, ref.numpy(), 2e-5, "txt2img latents, 2 images per prompt"))


def test_swapped_guidance_halves_fail(models):
    """Sensitivity: swapping the prompt and the negative prompt (the [uncond, cond] halves) must
    fail the same comparison that passes above."""
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16)).astype(np.float32)
    ref = reference(StableDiffusionPipeline, models, scheduler_for("ddim"))(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, height=SIZE, width=SIZE,
        latents=n2t(latents), output_type="np").images
    pipe = npsd_pipe(models)
    ok = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, height=SIZE, width=SIZE,
                      sampler="ddim", latents=latents, output_type="np")
    tol = 1e-5                                                # measured 1.7e-6 / 1.4e-6
    print(assert_close(ok, ref, tol, "txt2img"))
    swapped = pipe.txt2img(NEGATIVE, negative_prompt=PROMPT, num_inference_steps=4, height=SIZE, width=SIZE,
                           sampler="ddim", latents=latents, output_type="np")
    assert_caught("prompt and negative prompt swapped", lambda: assert_close(swapped, ref, tol, "txt2img swapped"))


def _mean_latents(monkeypatch, module):
    """Make diffusers encode images to the posterior mean, as npsd does by default."""
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


def _inject_noise(monkeypatch, module, noise):
    """diffusers draws its forward noise with randn_tensor: hand it npsd's array instead."""
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: n2t(noise).reshape(shape))


@pytest.mark.parametrize("sampler, tol", [
    ("ddim", 1e-5),          # measured 1.4e-6 / 1.3e-6
    ("euler", 1e-5),         # 1.5e-6 / 1.7e-6
])
def test_img2img_matches_diffusers(models, monkeypatch, sampler, tol):
    mod = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img
    noise = np.random.default_rng(9).standard_normal((1, 4, 16, 16)).astype(np.float32)
    _mean_latents(monkeypatch, mod)
    _inject_noise(monkeypatch, mod, noise)
    ref = reference(StableDiffusionImg2ImgPipeline, models, scheduler_for(sampler))(
        PROMPT, image=make_image(), strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=5,
        guidance_scale=6.0, output_type="np").images
    ours = npsd_pipe(models).img2img(PROMPT, make_image(), strength=0.6, negative_prompt=NEGATIVE,
                                     num_inference_steps=5, guidance_scale=6.0, sampler=sampler, noise=noise,
                                     output_type="np")
    print(assert_close(ours, ref, tol, f"img2img {sampler}"))


@pytest.mark.parametrize("unet_key, strength, sampler, tol", [
    ("unet4", 1.0, "ddim", 2e-5),     # measured 3.3e-6 / 3.2e-6
    ("unet4", 0.7, "euler", 3e-5),    # 4.4e-6 / 3.8e-6
    ("unet9", 1.0, "ddim", 1e-5),     # 1.7e-6 / 1.4e-6
    ("unet9", 0.75, "euler", 1e-5),   # 1.8e-6 / 1.8e-6
])
def test_inpaint_matches_diffusers(models, monkeypatch, unet_key, strength, sampler, tol):
    mod = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint
    noise = np.random.default_rng(10).standard_normal((1, 4, 16, 16)).astype(np.float32)
    _mean_latents(monkeypatch, mod)
    _inject_noise(monkeypatch, mod, noise)
    ref = reference(StableDiffusionInpaintPipeline, models, scheduler_for(sampler), unet_key)(
        PROMPT, image=make_image(), mask_image=make_mask(), strength=strength, negative_prompt=NEGATIVE,
        num_inference_steps=5, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np").images
    kw = {"latents": noise} if strength == 1.0 else {"noise": noise}
    ours = npsd_pipe(models, unet_key).inpaint(PROMPT, make_image(), make_mask(), strength=strength,
                                               negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5,
                                               sampler=sampler, output_type="np", **kw)
    print(assert_close(ours, ref, tol, f"inpaint {unet_key} strength {strength} {sampler}"))


def test_inpaint_keeps_the_unmasked_region(models):
    """With a 4-channel model, the kept region's latents end as the image's own latents."""
    pipe = npsd_pipe(models)
    lat = pipe.inpaint(PROMPT, make_image(), make_mask(), num_inference_steps=3, sampler="ddim", seed=3,
                       output_type="latent")
    mean, _ = pipe.vae_encode(npsd.images.to_array(make_image()))
    keep = np.asarray(make_mask())[::2, ::2] < 128
    np.testing.assert_allclose(lat[0][:, keep], (mean[0] * pipe.scaling_factor)[:, keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "ddim"])
def test_seed_reproducible(models, sampler):
    pipe = npsd_pipe(models)
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, sampler=sampler, eta=0.5 if sampler == "ddim" else 0.0)
    a = pipe.txt2img(PROMPT, seed=123, **kw)
    b = pipe.txt2img(PROMPT, seed=123, **kw)
    c = pipe.txt2img(PROMPT, seed=124, **kw)
    assert isinstance(a, Image.Image) and a.size == (SIZE, SIZE)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_bad_arguments(models):
    pipe = npsd_pipe(models)
    for kw, msg in [({"height": 31}, "height must be a multiple of 2"), ({"width": 2}, "width must be a multiple of 2 and at least 4"), ({"num_inference_steps": 0}, "num_inference_steps"),
                    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"guidance_scale": -1}, "guidance_scale"),
                    ({"sampler": "plms"}, "ddpm, ddim, euler, euler_a, heun, dpmpp_2m"), ({"seed": 2**64}, "seed"),
                    ({"seed": -1}, "seed"), ({"output_type": "pt"}, "output_type"),
                    ({"latents": np.zeros((1, 4, 8, 8))}, "latents must have shape")]:
        with pytest.raises(InputError, match=msg):
            pipe.txt2img(PROMPT, **{"height": SIZE, "width": SIZE, "num_inference_steps": 1, **kw})
    with pytest.raises(InputError, match="prompt must be a string"):
        pipe.txt2img(3, height=SIZE, width=SIZE)
    for strength in (0, 1.5, -0.1):
        with pytest.raises(InputError, match="strength"):
            pipe.img2img(PROMPT, make_image(), strength=strength)


def test_long_prompt_chunk_mode(models):
    """long_prompt="chunk": a 100-token prompt gives a [B, 154, D] context (two 77-token windows),
    the negative prompt is padded to the same number of windows, and the result differs from
    truncation (the words after token 75 count)."""
    pipe = npsd_pipe(models)
    long_prompt = " ".join(["red circle"] * 40 + ["on a green background"])   # about 85 tokens
    cond, uncond, batch, _ = pipe._contexts(long_prompt, "blurry", 2, 7.5, None, "chunk")
    assert cond.shape == uncond.shape == (2, 154, 32) and batch == 2
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, sampler="ddim", seed=1, output_type="latent")
    chunked = pipe.txt2img(long_prompt, long_prompt="chunk", **kw)
    with pytest.warns(UserWarning, match="dropped"):
        truncated = pipe.txt2img(long_prompt, **kw)
    assert np.abs(chunked - truncated).max() > 1e-4
