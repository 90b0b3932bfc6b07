"""The Pipeline object: a model's parameters and config, and the functions that run it."""

from . import clip, unet as unet_model, vae
from .config import sd15_config
from .tokenizer import Tokenizer


class Pipeline:
    """Stable Diffusion v1.x in NumPy.

    params: {"text_encoder": ..., "unet": ..., "vae": ...}, nested dicts/lists of float32 arrays
            named as in diffusers/transformers (see docs/parameters.md);
    config: {"text_encoder": ..., "unet": ..., "vae": ..., "scheduler": ..., "defaults": ...}
            (npsd.config.SD15 shows the keys);
    tokenizer: a Tokenizer (default: the CLIP tokenizer shipped in weights/).
    """

    def __init__(self, params, config=None, tokenizer=None):
        self.params = params
        self.config = config if config is not None else sd15_config()
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.default()
        return self._tokenizer

    # --- components ---------------------------------------------------------------------------

    def tokenize(self, prompts):
        """str or list of str -> int64 token ids [B, 77]."""
        return self.tokenizer(prompts)

    def encode_text(self, ids, clip_skip=None):
        """int64 [B, L] -> float32 [B, L, width]: CLIP's last hidden state (after the final LayerNorm)."""
        return clip.encode_text(self.params["text_encoder"], ids, self.config["text_encoder"], clip_skip=clip_skip)

    def unet(self, latents, t, context):
        """latents [B, C, h, w], t scalar or [B], context [B, L, 768] -> predicted noise [B, 4, h, w]."""
        return unet_model.unet(self.params["unet"], latents, t, context, self.config["unet"])

    def vae_encode(self, images):
        """images float32 [B, 3, H, W] in [-1, 1] -> (mean, logvar) of the unscaled latent [B, 4, H/8, W/8]."""
        return vae.encode(self.params["vae"], images, self.config["vae"])

    def vae_decode(self, latents, tile_size=None):
        """unscaled latents [B, 4, h, w] -> images float32 [B, 3, 8h, 8w] in [-1, 1]."""
        return vae.decode(self.params["vae"], latents, self.config["vae"], tile_size=tile_size)
