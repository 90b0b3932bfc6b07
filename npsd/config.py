"""Settings that the weights do not determine: attention heads, norm groups and eps, the VAE's
latent scaling factor, the scheduler, and the defaults of a generation.

A model's config is a plain dict with one section per component. Tensor shapes decide everything
else (channels, depths, input channels), so these few numbers are all a config holds. SD15 below is
the one place where SD v1.x's values are written: npsd.load starts every model's config from it
(docs/checkpoints.md says what overrides it), and `with_fallbacks` / `generation_defaults` fill a
config that lacks a key with it, for the pipeline (npsd/pipeline.py), the UNet, CLIP and the
command line (npsd/cli.py).
"""

import copy

SD15 = {
    "text_encoder": {
        "num_heads": 12,            # CLIP ViT-L/14 text tower: width 768 / 64
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
        "pad_token": "<|endoftext|>",   # fills the 77 positions after the prompt; SD 2.x: "!" (id 0)
    },
    "unet": {
        "num_heads": 8,             # SD v1.x: 8 heads at every level (diffusers' "attention_head_dim": 8)
        "norm_groups": 32,
        "resnet_eps": 1e-5,         # GroupNorm eps in ResBlocks, conv_norm_out
        "transformer_eps": 1e-6,    # GroupNorm eps before proj_in of each spatial transformer
        "layer_norm_eps": 1e-5,     # LayerNorms (norm1/2/3) inside each transformer block
    },
    "vae": {
        "scaling_factor": 0.18215,  # latents are multiplied by this before diffusion (LDM paper, sec. 4.3.2)
        "norm_groups": 32,
        "eps": 1e-6,
    },
    "defaults": {                   # what txt2img & co. use when an argument is None
        "height": 512,
        "width": 512,
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "sampler": "ddpm",            # DDPM (Ho et al. 2020), the sampler of the course npsd grew from
                                      # (hkproj/pytorch-stable-diffusion); the built-in model's file
                                      # names its own ("ddim", npsd/train/builtin.py's DEFAULTS)
    },
    "scheduler": {                  # SD v1.5's published scheduler configuration
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",  # "leading" | "trailing" | "linspace" (docs/samplers.md, sec. 3)
        "steps_offset": 1,              # leading: t = i * (N // n) + 1 -> 981..1; 0 gives the course's 980..0
        "set_alpha_to_one": False,      # DDIM's last step goes to alpha_bar_0 (not 1), as SD's config says
        "skip_prk_steps": True,         # PNDM starts PLMS with an improved-Euler step (docs/samplers.md, 13.1)
        "prediction_type": "epsilon",   # the UNet predicts the noise; SD 2.x 768 models: "v_prediction"
        "rescale_betas_zero_snr": False,  # True: zero SNR at t = N - 1 (Lin et al. 2024), for v-models trained so
        "original_inference_steps": 50,   # LCM: the distillation grid (k - 1, 2k - 1, .., N - 1, k = N // 50)
    },
}


# What SD 2.x changes (Stability AI's v2-inference.yaml / v2-inference-v.yaml and diffusers'
# stable-diffusion-2-1 configs), for original single files, which carry no config: the text
# encoder is OpenCLIP ViT-H/14's (GELU; its tokenizer pads with "!" = id 0), the UNet's heads are
# 64 channels wide (num_head_channels: 64, so 5, 10, 20, 20 per level), and the 768-v models
# predict v at 768x768.
SD2_HEAD_WIDTH = 64
SD2_TEXT_ENCODER = {"hidden_act": "gelu", "pad_token": "!"}
SD2_V_SIZE = 768


# An LCM-distilled UNet (time_cond_proj_dim: it reads the guidance scale as an input) is made for
# its own sampler and a few steps: diffusers' LatentConsistencyModelPipeline's defaults.
LCM_DEFAULTS = {"sampler": "lcm", "num_inference_steps": 4, "guidance_scale": 8.5}


def sd2_config(unet_channels, prediction_type):
    """The config of an SD 2.x single file: SD v1.x's, changed as above. unet_channels: the UNet's
    channels per level (block_out_channels); prediction_type: "epsilon" or "v_prediction"."""
    config = sd15_config()
    config["text_encoder"].update(SD2_TEXT_ENCODER)
    config["unet"]["num_heads"] = [c // SD2_HEAD_WIDTH for c in unet_channels]
    config["scheduler"]["prediction_type"] = prediction_type
    if prediction_type == "v_prediction":
        config["defaults"]["height"] = config["defaults"]["width"] = SD2_V_SIZE
    return config


def sd15_config():
    """A fresh copy of the SD v1.x config (safe to modify)."""
    return copy.deepcopy(SD15)


def with_fallbacks(name, section=None):
    """One section of a config ("text_encoder", "unet", "vae", "scheduler" or "defaults"), with SD
    v1.x's value (SD15[name]) for every key it lacks: a new dict.

    >>> with_fallbacks("defaults", {"sampler": "ddim", "height": 64})["num_inference_steps"]
    50
    """
    return {**SD15[name], **(section or {})}


def generation_defaults(config):
    """What txt2img, img2img and inpaint use for an argument left None: config["defaults"], with SD
    v1.x's value for every key it lacks (num_inference_steps, guidance_scale, height, width, sampler)."""
    return with_fallbacks("defaults", (config or {}).get("defaults"))
