"""The published SD v1.x configurations, for `npsd parity` (npsd/parity_cli.py) to hand to diffusers.

An original single file (v1-5-pruned-emaonly.safetensors) holds tensors but no configuration, so
diffusers' single-file loading needs one beside it; online it fetches it from the Hub. `npsd parity`
runs offline and gives diffusers these instead: the model entries of the LDM configurations that
came with the weights (CompVis' configs/stable-diffusion/v1-inference.yaml; RunwayML's
v1-inpainting-inference.yaml, the same with 9 UNet input channels), the CLIP ViT-L/14 text encoder's
config.json and SD v1.5's scheduler_config.json. Training-only entries (learning rate, loss,
monitors) are left out. npsd's own loader never reads this module: its settings come from
npsd/config.py and the file, so a wrong inference there shows up as a difference in `npsd parity`.
"""

# {in_channels}: 4, or 9 for the inpainting model (4 latent + 4 masked-image latent + 1 mask)
_LDM_YAML = """\
model:
  target: {target}
  params:
    linear_start: 0.00085
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
        num_heads: 8
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 768
        legacy: false
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
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

# diffusers' name for the model it reads a single file as (infer_diffusers_model_type) -> the
# published LDM configuration: (file name, YAML text)
LDM_CONFIGS = {
    "v1": ("v1-inference.yaml", _LDM_YAML.format(
        target="ldm.models.diffusion.ddpm.LatentDiffusion", conditioning_key="crossattn", in_channels=4)),
    "inpainting": ("v1-inpainting-inference.yaml", _LDM_YAML.format(
        target="ldm.models.diffusion.ddpm.LatentInpaintDiffusion", conditioning_key="hybrid", in_channels=9)),
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
