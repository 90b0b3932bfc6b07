"""The published SD v1.x and 2.x configurations, for `npsd parity` (npsd/parity_cli.py) to hand to diffusers.

An original single file (v1-5-pruned-emaonly.safetensors, v2-1_768-ema-pruned.safetensors) holds
tensors but no configuration, so diffusers' single-file loading needs one beside it; online it
fetches it from the Hub. `npsd parity` runs offline and gives diffusers these instead: the model
entries of the LDM configurations that came with the weights (CompVis' configs/stable-diffusion/
v1-inference.yaml; RunwayML's v1-inpainting-inference.yaml, the same with 9 UNet input channels;
Stability AI's v2-inference.yaml, v2-inference-v.yaml and v2-inpainting-inference.yaml: 64-wide
heads, linear proj_in/proj_out, context 1024, and `parameterization: "v"` in the -v one), the text
encoders' config.json (CLIP ViT-L/14's for SD v1.x; for SD 2.x OpenCLIP ViT-H/14's text tower as
stabilityai/stable-diffusion-2-1 ships it: 23 of its 24 layers, GELU), the tokenizers' padding token
and SD v1.5's scheduler_config.json (SD 2.x's have the same betas and spacing; what differs, the
prediction type, is npsd's choice, printed by `npsd parity`). Training-only entries (learning rate,
loss, monitors, data) are left out. npsd's own loader never reads this module: its settings come
from npsd/config.py and the file, so a wrong inference there shows up as a difference in `npsd parity`.
"""

# The autoencoder: the same in every SD v1.x and 2.x configuration
_FIRST_STAGE = """\
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
"""

# {in_channels}: 4, or 9 for the inpainting models (4 latent + 4 masked-image latent + 1 mask);
# {parameterization}: SD 2.x's 768-v model predicts v (`parameterization: "v"`), the others epsilon
_LDM_YAML = """\
model:
  target: {target}
  params:
{parameterization}    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 64
    channels: 4
    conditioning_key: {conditioning_key}
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: {in_channels}
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4, 4]
{heads}        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: {context_dim}
        legacy: false
""" + _FIRST_STAGE + """\
    cond_stage_config:
      target: ldm.modules.encoders.modules.{cond_stage}
"""

_V1 = dict(heads="        num_heads: 8\n", context_dim=768, cond_stage="FrozenCLIPEmbedder", parameterization="")
# SD 2.x: heads 64 channels wide (5, 10, 20, 20 per level), linear proj_in/proj_out, OpenCLIP's
# penultimate layer (then ln_final) as the condition
_V2 = dict(heads="        num_head_channels: 64\n        use_linear_in_transformer: true\n", context_dim=1024,
           cond_stage="FrozenOpenCLIPEmbedder\n      params:\n        freeze: true\n        layer: penultimate",
           parameterization="")
_TXT2IMG = dict(target="ldm.models.diffusion.ddpm.LatentDiffusion", conditioning_key="crossattn", in_channels=4)
_INPAINT = dict(target="ldm.models.diffusion.ddpm.LatentInpaintDiffusion", conditioning_key="hybrid", in_channels=9)

# (diffusers' name for the model it reads a single file as (infer_diffusers_model_type), what the
# UNet predicts (npsd's choice, npsd.loading.prediction_type_of)) -> the published LDM configuration:
# (file name, YAML text)
LDM_CONFIGS = {
    ("v1", "epsilon"): ("v1-inference.yaml", _LDM_YAML.format(**_V1, **_TXT2IMG)),
    ("inpainting", "epsilon"): ("v1-inpainting-inference.yaml", _LDM_YAML.format(**_V1, **_INPAINT)),
    ("v2", "epsilon"): ("v2-inference.yaml", _LDM_YAML.format(**_V2, **_TXT2IMG)),
    ("v2", "v_prediction"): ("v2-inference-v.yaml", _LDM_YAML.format(
        **{**_V2, "parameterization": '    parameterization: "v"\n'}, **_TXT2IMG)),
    ("inpainting_v2", "epsilon"): ("v2-inpainting-inference.yaml", _LDM_YAML.format(**_V2, **_INPAINT)),
}

# text_encoder/config.json of SD v1.x (the text tower of openai/clip-vit-large-patch14)
CLIP_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# text_encoder/config.json of SD 2.x (stabilityai/stable-diffusion-2-1): OpenCLIP ViT-H/14's text
# tower without its last layer, as diffusers' convert_open_clip_checkpoint fills it
OPEN_CLIP_TEXT_CONFIG = {
    **CLIP_TEXT_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
}

# the tokenizers' padding token (tokenizer/special_tokens_map.json), by text tower: OpenCLIP's
# tokenizer pads with "!" (id 0), CLIP's with its end token
PAD_TOKENS = {"clip": "<|endoftext|>", "open_clip": "!"}

# scheduler/scheduler_config.json of SD v1.5
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
