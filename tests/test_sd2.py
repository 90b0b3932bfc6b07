"""SD 2.x and LCM UNets: a diffusers folder in SD 2.x's layout (linear proj_in/proj_out, one head
count per level, a GELU text encoder, padding with "!" = id 0, v-prediction) loads with npsd.load and
gives diffusers' image from the same seed; an LCM UNet's guidance-scale embedding (time_cond_proj_dim)
matches diffusers'. Tiny random configs here; tests/test_sd2_full.py checks SD 2.1's full size.

Tolerances (max |npsd - diffusers| / max |diffusers|; images in [0, 1]): TOL_IMAGE 2e-5, the same
as tests/test_same_seed.py for the SD v1.x layout of these tiny models, measured here at most 2.6e-6.
A wrong padding token, heads or prediction type moves the image by 1e-2 or more (asserted below).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import npsd
from npsd.testing import assert_close
from npsd.unet import guidance_embedding, unet as run_unet
from npsd.weights import path as weights_path
from tests.helpers import n2t, perturb_, t2n, to_numpy_params

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL_IMAGE = 2e-5
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 32
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
             timestep_spacing="leading", num_train_timesteps=1000, prediction_type="v_prediction")


def tiny_sd2_unet(seed=1, time_cond_proj_dim=None):
    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                             up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
                             attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=8,
                             time_cond_proj_dim=time_cond_proj_dim)
    return perturb_(m.eval(), seed=seed)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """A tiny SD 2.x-layout diffusers folder written by diffusers' save_pretrained."""
    torch.manual_seed(0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=77, hidden_act="gelu")).eval(), 2)
    vae = perturb_(AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                 layers_per_block=1, sample_size=SIZE).eval(), 3)
    tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77,
                        pad_token="!")                                 # SD 2.x's tokenizer pads with id 0
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_sd2_unet(),
                                   scheduler=DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd2") / "tiny-sd2"
    pipe.save_pretrained(folder)
    return folder


def reference(folder, scheduler):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe


def test_folder_reads_sd2_settings(sd2_folder):
    pipe = npsd.load(sd2_folder)
    assert pipe.config["unet"]["num_heads"] == [2, 4]                   # one per level, from attention_head_dim
    assert pipe.config["scheduler"]["prediction_type"] == "v_prediction"
    assert pipe.config["text_encoder"]["hidden_act"] == "gelu"
    ids = pipe.tokenize(PROMPT)[0]
    ref = reference(sd2_folder, None).tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
    assert ids.tolist() == ref and ids[-1] == 0                       # padded with "!" = 0, as transformers does


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sd2_folder_same_seed_same_image(sd2_folder, sampler):
    sched = (DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False) if sampler == "ddim"
             else EulerDiscreteScheduler(**SCHED))
    ref = reference(sd2_folder, sched)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
                                      height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(5),
                                      output_type="np").images
    ours = npsd.load(sd2_folder).txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
                                         height=SIZE, width=SIZE, sampler=sampler, seed=5, rng="torch",
                                         output_type="np")
    # measured 2.6e-6 (ddim) and 2.4e-6 (euler)
    print(assert_close(ours, ref, TOL_IMAGE, f"SD 2.x folder, {sampler}, same seed"))


def test_sd2_wrong_settings_fail(sd2_folder):
    """Padding with the end token (SD v1.x's), one head count for all levels, or epsilon instead of v
    moves the image far beyond TOL_IMAGE."""
    def image(pipe, **kw):
        return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=SIZE,
                            width=SIZE, sampler="ddim", seed=5, rng="torch", output_type="np", **kw)
    good = image(npsd.load(sd2_folder))
    eos_padded = npsd.load(sd2_folder)
    eos_padded.tokenizer.pad_id = eos_padded.tokenizer.eos_id
    one_heads = npsd.load(sd2_folder)
    one_heads.config["unet"]["num_heads"] = 4
    for name, bad in (("end-token padding", image(eos_padded)), ("4 heads everywhere", image(one_heads)),
                      ("epsilon read as v", image(npsd.load(sd2_folder), prediction_type="epsilon"))):
        err = np.abs(bad - good).max()
        assert err > 100 * TOL_IMAGE, (name, err)


@pytest.mark.parametrize("w", [1.0, 4.0, 8.5])
def test_guidance_embedding_matches_diffusers(w):
    ref = t2n(StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1.0]), 256))
    # diffusers takes the frequencies from torch's float32 exp, whose last bit depends on the CPU (one
    # frequency of the 128 is 1 ulp off the correctly rounded value on an AMD EPYC); at arguments up
    # to 7500, 1 ulp (2^-23 relative at most) moves sin and cos by up to |argument| 2^-23. Per element:
    # |error| <= |argument| 2^-22 + 1e-6; measured 0.91 of the 1-ulp term (2.4e-4 at w = 4, AMD EPYC).
    out = guidance_embedding(w, 256)
    args = np.abs((w - 1) * 1000 * np.exp(-np.arange(128) * np.log(10000) / 127))
    bound = np.concatenate([args, args]) * 2.0**-22 + 1e-6
    err = np.abs(out - ref)[0]
    assert (err <= bound).all(), (w, err.max(), float((err / bound).max()))


def test_lcm_unet_matches_diffusers():
    ref_model = tiny_sd2_unet(seed=7, time_cond_proj_dim=16)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    w_emb = guidance_embedding([8.0, 8.0], 16)
    with torch.no_grad():
        ref = t2n(ref_model(n2t(x), 499, n2t(ctx), timestep_cond=n2t(w_emb)).sample)
    config = {"num_heads": [2, 4], "norm_groups": 8}
    params = to_numpy_params(ref_model.state_dict())
    ours = run_unet(params, x, 499, ctx, config, w_emb=w_emb)
    # measured 9.7e-7 relative
    print(assert_close(ours, ref, 1e-5, "LCM UNet (time_cond_proj_dim 16)"))
    other_w = run_unet(params, x, 499, ctx, config, w_emb=guidance_embedding([2.0, 2.0], 16))
    assert np.abs(other_w - ref).max() > 1e-3 * np.abs(ref).max()      # the embedding matters


def test_lcm_unet_needs_its_embedding():
    params = to_numpy_params(tiny_sd2_unet(seed=7, time_cond_proj_dim=16).state_dict())
    x, ctx = np.zeros((1, 4, 8, 8), np.float32), np.zeros((1, 77, 32), np.float32)
    with pytest.raises(npsd.errors.InputError, match="LCM UNet"):
        run_unet(params, x, 10, ctx, {"num_heads": [2, 4], "norm_groups": 8})


def test_sdxl_folder_still_refused(sd2_folder, tmp_path):
    import shutil
    folder = tmp_path / "xl"
    shutil.copytree(sd2_folder, folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["addition_embed_type"] = "text_time"
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(npsd.errors.CheckpointError, match="SDXL"):
        npsd.load(folder)


# --- SD 2.x original single files: OpenCLIP names, fused q/k/v, v or epsilon ---------------------

def tiny_sd2_original(tmp_path, conv_out_bias=None, yaml=None):
    """A tiny SD 2.x-layout original single file: the UNet and VAE under the original names (routed
    by diffusers' converters, tests/test_loading.py), the text encoder as OpenCLIP names it (fused
    in_proj, resblocks, ln_final, text_projection) with 24 resblocks, of which SD 2.x uses 23.
    conv_out_bias: set the UNet's output to this constant (weights 0), for the v/epsilon test."""
    from diffusers import AutoencoderKL
    from tests.test_loading import TINY_VAE, diffusers_routing, write_safetensors
    route = diffusers_routing()
    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 64, 128, 128),
        cross_attention_dim=64, attention_head_dim=[1, 1, 2, 2], use_linear_projection=True, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval(), seed=1)
    vae = perturb_(AutoencoderKL(**TINY_VAE).eval(), seed=2)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=24, num_attention_heads=1,
                                                 max_position_embeddings=77, hidden_act="gelu")).eval(), 3)
    sd = {}
    for comp, model in (("unet", unet), ("vae", vae)):
        for d, t in model.state_dict().items():
            name, shape = route[comp][d]
            t = t.numpy().copy()
            sd[name] = t.reshape(t.shape + (1, 1)) if comp == "vae" and len(shape) == 4 and t.ndim == 2 else t
    if conv_out_bias is not None:
        sd["model.diffusion_model.out.2.weight"][:] = 0
        sd["model.diffusion_model.out.2.bias"][:] = conv_out_bias
    oc = "cond_stage_model.model."
    tsd = {k.removeprefix("text_model."): v.numpy().copy() for k, v in text.state_dict().items()}
    sd[oc + "token_embedding.weight"] = tsd["embeddings.token_embedding.weight"]
    sd[oc + "positional_embedding"] = tsd["embeddings.position_embedding.weight"]
    sd[oc + "ln_final.weight"], sd[oc + "ln_final.bias"] = tsd["final_layer_norm.weight"], tsd["final_layer_norm.bias"]
    for i in range(24):
        p, r = f"encoder.layers.{i}.", f"{oc}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            sd[r + "attn.in_proj_" + w] = np.concatenate([tsd[p + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                sd[f"{r}{theirs}.{w}"] = tsd[f"{p}{ours}.{w}"]
    sd[oc + "text_projection"] = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    sd[oc + "logit_scale"] = np.array(4.6, np.float32)
    path = tmp_path / "tiny-sd2.safetensors"
    write_safetensors(path, sd, metadata={"format": "pt"})
    if yaml is not None:
        (tmp_path / "tiny-sd2.yaml").write_text(yaml)
    return sd, path, unet.config


def test_sd2_original_file_converts_like_diffusers(tmp_path):
    """Every tensor equal to diffusers' single-file converters (convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint, convert_open_clip_checkpoint, which drops the 24th resblock)."""
    from diffusers.loaders import single_file_utils as sfu
    from tests.test_loading import V1_INFERENCE, assert_same_tensors
    sd, path, unet_config = tiny_sd2_original(tmp_path)
    ckpt = {k: torch.from_numpy(v) for k, v in sd.items()}
    ref = {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet_config)),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, sfu.create_vae_diffusers_config_from_ldm(V1_INFERENCE, ckpt)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_open_clip_checkpoint(None, ckpt).items()
                         if k != "text_projection.weight"},
    }
    pipe = npsd.load(path)
    assert_same_tensors(pipe.params, ref)
    assert len(pipe.params["text_encoder"]["encoder"]["layers"]) == 23
    assert pipe.config["text_encoder"]["hidden_act"] == "gelu" and pipe.tokenize("a")[0, -1] == 0
    assert pipe.config["unet"]["num_heads"] == [1, 1, 2, 2]                 # 64-wide heads
    assert pipe.txt2img(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np").shape == (1, 64, 64, 3)


@pytest.mark.parametrize("bias, yaml, expected, reason", [
    (-2.0, None, "v_prediction", "AUTOMATIC1111's test: mean(unet(x) - x) at t = 999 is -2.50 (< -1)"),
    (0.0, None, "epsilon", "AUTOMATIC1111's test: mean(unet(x) - x) at t = 999 is -0.50 (>= -1)"),
    (0.0, 'model:\n  params:\n    parameterization: "v"\n', "v_prediction", "tiny-sd2.yaml says parameterization v"),
    (-2.0, "model:\n  params:\n    linear_start: 0.00085\n", "epsilon", "tiny-sd2.yaml says parameterization eps"),
])
def test_sd2_prediction_type_rule(tmp_path, bias, yaml, expected, reason):
    """A UNet whose output is the constant `bias` (conv_out weights 0): A1111's test reads v when
    mean(bias - 0.5) < -1; a .yaml beside the file decides before it."""
    _, path, _ = tiny_sd2_original(tmp_path, conv_out_bias=bias, yaml=yaml)
    pipe = npsd.load(path)
    assert pipe.info["prediction_type"] == (expected, reason)
    assert pipe.config["scheduler"]["prediction_type"] == expected
    assert pipe.config["defaults"]["height"] == (768 if expected == "v_prediction" else 512)


# --- an LCM-distilled SD v1.x folder: w enters the UNet, no unconditional pass --------------------

@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    from diffusers import LCMScheduler
    from tests.test_pipelines import models as tiny_models_fixture
    parts = tiny_models_fixture.__wrapped__()
    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=16).eval(), seed=9)
    sched = LCMScheduler(**{k: v for k, v in SCHED.items() if k != "prediction_type"})
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text"], tokenizer=parts["tok"], unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("lcm") / "tiny-lcm"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("guidance", [8.5, 1.0])
def test_lcm_folder_same_seed_same_image(lcm_folder, guidance):
    ref = reference(lcm_folder, None)(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=SIZE, width=SIZE,
                                     generator=torch.Generator("cpu").manual_seed(11), output_type="np").images
    pipe = npsd.load(lcm_folder)
    assert pipe.config["defaults"]["sampler"] == "lcm" and pipe.guidance_embedding_dim == 16
    ours = pipe.txt2img(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=SIZE, width=SIZE, seed=11,
                        rng="torch", output_type="np")
    # measured 5.1e-7 (w 8.5) and 6.0e-7 (w 1): one UNet pass per step, no guidance to amplify rounding
    print(assert_close(ours, ref, 5e-6, f"LCM folder, 4 steps, w {guidance}"))


def test_lcm_guidance_is_an_input_not_two_passes(lcm_folder):
    """w changes the image through the embedding alone (one UNet pass per step either way)."""
    pipe = npsd.load(lcm_folder)
    calls = []
    unet = pipe.unet
    pipe.unet = lambda x, t, c, w_emb=None: calls.append(x.shape[0]) or unet(x, t, c, w_emb=w_emb)
    a = pipe.txt2img(PROMPT, num_inference_steps=2, guidance_scale=8.5, height=SIZE, width=SIZE, seed=1, output_type="np")
    b = pipe.txt2img(PROMPT, num_inference_steps=2, guidance_scale=2.0, height=SIZE, width=SIZE, seed=1, output_type="np")
    assert calls == [1] * 4 and np.abs(a - b).max() > 1e-3
    # A1111's AND weighs its parts against an unconditional pass, which such a UNet does not make
    with pytest.raises(npsd.errors.InputError, match="LCM-distilled UNet .* AND") as caught:
        pipe.txt2img("a cat AND a dog", num_inference_steps=2, height=SIZE, width=SIZE, prompt_syntax="a1111")
    assert "\n" not in str(caught.value) and calls == [1] * 4


def test_cli_says_which_prediction_type_it_chose(tmp_path, capsys):
    from npsd import cli
    _, path, _ = tiny_sd2_original(tmp_path, conv_out_bias=-2.0)
    rc = cli.main(["txt2img", PROMPT, "--model", str(path), "--steps", "1", "--width", "64", "--height", "64",
                   "-o", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 0 and "npsd: the UNet predicts v_prediction (AUTOMATIC1111's test: mean(unet(x) - x) at t = 999 " \
                       "is -2.50 (< -1)); --prediction-type overrides it" in err, err


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_settings_same_seed_same_image(sd2_folder, steps):
    """SD-Turbo's recipe (an SD 2.1 UNet distilled for it): Euler a, trailing spacing, no guidance."""
    from diffusers import EulerAncestralDiscreteScheduler
    turbo = dict(SCHED, timestep_spacing="trailing", prediction_type="epsilon")
    ref = reference(sd2_folder, EulerAncestralDiscreteScheduler(**turbo))(
        PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    ours = npsd.load(sd2_folder).txt2img(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE,
                                         sampler="euler_a", timestep_spacing="trailing", prediction_type="epsilon",
                                         seed=3, rng="torch", output_type="np")
    # measured 6.0e-7 (1 step) and 5.4e-7 (4 steps): no guidance to amplify rounding
    print(assert_close(ours, ref, 5e-6, f"SD-Turbo settings, {steps} steps"))
