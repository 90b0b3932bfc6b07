"""The Pipeline object: a model's parameters and config, and the generation loops built on them.

All randomness of one call comes from one generator (npsd/rng.py), chosen by ``rng``:

- ``rng="numpy"`` (default): ``np.random.default_rng(seed)``. Draws, each a
  ``standard_normal(shape, dtype=float32)``, in this order:
  1. img2img / inpaint with ``sample_posterior=True``: the VAE posterior noise of the input image,
     then (inpainting with a 9-channel UNet) that of the masked image;
  2. the initial noise: txt2img's ``latents`` [B, C, h, w], img2img's and inpaint's forward noise
     (unless passed explicitly as ``latents`` / ``noise``);
  3. the samplers that add noise at each step (ddpm, ddim with eta > 0, euler_a), one draw per step.
- ``rng="torch"``: ``torch.Generator("cpu").manual_seed(seed)``'s numbers, drawn in the order and
  shapes of diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline, so that the same seed gives
  diffusers' image (docs/reproducibility.md). The VAE posterior is then sampled by default, as
  diffusers does; inpainting draws the image's posterior (when diffusers encodes it), the initial
  noise, then the masked image's posterior (drawn even for a 4-channel UNet, which does not use it).

The same seed and arguments give the same images on every run and machine.
"""

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image

from . import a1111_inpaint, clip, resources, schedulers, taesd, unet as unet_model, vae
from .malloc import holding
from .embeddings import load_used_embeddings
from .prompts import (PROMPT_SYNTAXES, check_emphasis, composable, encode_schedule, extract_loras, encode_weighted, pad_chunks,
                      prompt_syntax_used, repeat_last, split_and, text_at_step)
from .brownian import SDE_NOISES, brownian_noise
from .rng import SEED_LIMIT, make_rng, seed_noise
from .config import generation_defaults, sd15_config, with_fallbacks
from .errors import InputError, NpsdError, is_flag, is_number, is_whole
from .guidance import check_rescale, guided_model, uses_guidance
from .hires import LATENT_UPSCALERS, Hires, upscale_image, upscale_latents
from .images import (RESIZE_MODES, default_size, fit_size, mask_to_array, open_image, postprocess, to_array, to_pil,
                     to_uint8)
from .previews import taesd_for, with_previews
from .refiner import Refiner, SwitchingModel
from .settings import padding_mode
from .tokenizer import Tokenizer
from .tome import check_ratio

OUTPUT_TYPES = ("pil", "np", "latent")
# What turns the final latents into images: the model's VAE, or TAESD (npsd/taesd.py, pipe.taesd):
# several times faster and less detailed, for drafts (docs/inside.md section 2).
DECODERS = ("vae", "taesd")


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def _lora_file(folder, name):
    """<lora:NAME> -> the file NAME.safetensors (or .pt/.ckpt) found under folder (recursively, as
    A1111 does); only files inside the folder count, whatever NAME says."""
    tag = f"<lora:{name}>" if name.isprintable() else repr(f"<lora:{name}>")     # one line, whatever NAME holds
    if folder is None:
        raise InputError(f"the prompt names {tag} but no LoRA folder is set; set pipe.lora_dir (CLI: --lora-dir)")
    root = Path(folder).resolve()
    if not root.is_dir():
        raise InputError(f"LoRA folder {folder} does not exist or is not a folder")
    for path in sorted(root.rglob("*")):
        if path.stem == name and path.suffix.lower() in LORA_SUFFIXES and path.is_file() \
                and path.resolve().is_relative_to(root):
            return path
    shown = name if name.isprintable() else repr(name)[1:-1]
    raise InputError(f"{tag}: no {shown}.safetensors/.pt/.ckpt in {folder}; check the name or --lora-dir")


def _loras_from_prompt(generate):
    """With prompt_syntax="a1111", the prompts' <lora:NAME:STRENGTH> tags (npsd.prompts.extract_loras)
    load NAME from self.lora_dir for this call only (tags from every prompt of the batch apply to
    the whole batch); the prompts go on without the tags."""
    @functools.wraps(generate)
    def run(self, prompt, *args, prompt_syntax="plain", **kwargs):
        if prompt_syntax != "a1111" or not isinstance(prompt, (str, list, tuple)) \
                or not all(isinstance(p, str) for p in ([prompt] if isinstance(prompt, str) else prompt)):
            return generate(self, prompt, *args, prompt_syntax=prompt_syntax, **kwargs)
        cleaned, tags = [], []
        for p in [prompt] if isinstance(prompt, str) else prompt:
            text, found = extract_loras(p)
            cleaned.append(text)
            tags += found
        hires = kwargs.get("hires")
        if isinstance(hires, Hires) and hires.prompt is not None:       # A1111's "Hires prompt": its own tags
            texts = [extract_loras(p) for p in ([hires.prompt] if isinstance(hires.prompt, str) else hires.prompt)]
            if {t for _, found in texts for t in found} != set(tags):
                raise InputError("the hires prompt's <lora:...> tags differ from the prompt's; npsd applies one set "
                                 "of LoRAs to both passes: give the hires prompt the prompt's tags")
            hires_prompt = texts[0][0] if isinstance(hires.prompt, str) else [t for t, _ in texts]
            kwargs["hires"] = dataclasses.replace(hires, prompt=hires_prompt)
        others = kwargs.get("refiner") is not None or getattr(hires, "checkpoint", None) is not None
        if tags and others:
            raise InputError("<lora:...> tags with a refiner or hires checkpoint: npsd applies LoRAs to this model "
                             "only; load the LoRA into each model (load_lora) and leave the tags out")
        loaded = []
        try:
            for tag in tags:
                name = f"<lora:{tag.name}>"
                if name not in loaded:
                    self.load_lora(_lora_file(self.lora_dir, tag.name), tag.strength, name=name,
                                   unet_strength=tag.unet_strength)
                    loaded.append(name)
            prompt = cleaned[0] if isinstance(prompt, str) else cleaned
            return generate(self, prompt, *args, prompt_syntax=prompt_syntax, **kwargs)
        finally:
            for name in loaded:
                self.unload_lora(name)
    return run


def _refiner_in(refiner, pass_number, hires):
    """The refiner for this pass (1 or 2) of a txt2img with (hires) or without the hires fix, or None."""
    return refiner if refiner is not None and refiner.acts_in(pass_number, hires) else None


def _counting_on(callback, offset, i, t, x, x0_pred, **kw):
    """callback with the step index moved on by offset (the second pass of hires)."""
    return callback(i + offset, t, x, x0_pred, **kw)


def _traced(generate):
    """trace=None or an npsd.trace.Trace (docs/traces.md): record this call's activations into it,
    the UNet's under the sampler step (step3/unet.down_blocks.1) for trace.steps (None: every step)."""
    @functools.wraps(generate)
    def run(self, *args, trace=None, **kwargs):
        if trace is None:
            return generate(self, *args, **kwargs)
        before, self._trace = self._trace, trace
        try:
            return generate(self, *args, **kwargs)
        finally:
            self._trace, trace.step = before, None
    return run


def _tiled(generate):
    """tiling=True: the call's padded convolutions wrap around the map (npsd.settings.padding_mode("circular"),
    AUTOMATIC1111's "Tiling"); False: zeros, as always."""
    @functools.wraps(generate)
    def run(self, *args, tiling=False, **kwargs):
        if not is_flag(tiling):
            raise InputError(f"tiling must be True or False, got {tiling!r}")
        with padding_mode("circular" if tiling else "zeros"):
            return generate(self, *args, **kwargs)
    return run


class Pipeline:
    """Stable Diffusion v1.x in NumPy.

    params: {"text_encoder": ..., "unet": ..., "vae": ...}, nested dicts/lists of float32 arrays
            named as in diffusers/transformers (see docs/parameters.md);
    config: {"text_encoder": ..., "unet": ..., "vae": ..., "scheduler": ..., "defaults": ...}
            (npsd.config.SD15 shows the keys);
    tokenizer: a Tokenizer (default: the CLIP tokenizer shipped in weights/).
    """

    _trace = None                             # the npsd.trace.Trace of the running generation, if any

    def __init__(self, params, config=None, tokenizer=None, info=None):
        self.params = params
        self.config = config if config is not None else sd15_config()
        self._tokenizer = tokenizer
        self.info = dict(info or {})          # where the weights came from (set by npsd.load)
        self.lora_dir = None                  # where A1111-syntax <lora:NAME> tags find NAME.safetensors
        self.embeddings_dir = None            # where embeddings named in prompts are found (stem = name)
        self.taesd = None                     # TAESD params (npsd.taesd.load_taesd) for preview/decoder "taesd"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.default(with_fallbacks("text_encoder", self.config.get("text_encoder"))["pad_token"])
        return self._tokenizer

    # --- components ---------------------------------------------------------------------------

    def tokenize(self, prompts):
        """str or list of str -> int64 token ids [B, 77]."""
        return self.tokenizer(prompts)

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    def encode_text(self, ids, clip_skip=None):
        """int64 [B, L] -> float32 [B, L, width]: CLIP's last hidden state (after the final LayerNorm)."""
        context = clip.encode_text(self.params["text_encoder"], ids, self.config["text_encoder"], clip_skip=clip_skip,
                                   trace=self._trace)
        if not np.isfinite(context).all():
            raise NpsdError("the text encoder's output is NaN or infinite: its weights, or a LoRA or embedding "
                            "loaded into them, hold NaN or inf values; check those files")
        return context

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    def unet(self, latents, t, context, w_emb=None, token_merging_ratio=0.0):
        """latents [B, C, h, w], t scalar or [B], context [B, L, 768] -> predicted noise [B, 4, h, w].
        w_emb: an LCM UNet's guidance_embedding (npsd.unet), else None. token_merging_ratio: ToMe's
        (npsd/tome.py), 0: off."""
        return unet_model.unet(self.params["unet"], latents, t, context, self.config["unet"], trace=self._trace,
                               w_emb=w_emb, token_merging_ratio=token_merging_ratio)

    @property
    def guidance_embedding_dim(self):
        """An LCM-distilled UNet's guidance-embedding width (time_cond_proj_dim), else None."""
        proj = self.params["unet"]["time_embedding"].get("cond_proj")
        return None if proj is None else proj["weight"].shape[1]

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    def vae_encode(self, images):
        """images float32 [B, 3, H, W] in [-1, 1] -> (mean, logvar) of the unscaled latent [B, 4, H/8, W/8]."""
        return vae.encode(self.params["vae"], images, self.config["vae"], trace=self._trace)

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    def vae_decode(self, latents, tile_size=None):
        """unscaled latents [B, 4, h, w] -> images float32 [B, 3, 8h, 8w] in [-1, 1]."""
        return vae.decode(self.params["vae"], latents, self.config["vae"], tile_size=tile_size, trace=self._trace)

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    def decode_latents(self, latents, decoder="vae"):
        """SCALED latents [B, 4, h, w] (what the sampler works on) -> images float32 [B, H, W, 3] in [0, 1].
        decoder "vae": the model's VAE, after dividing by the scaling factor k; "taesd": self.taesd,
        which reads the scaled latents as they are (npsd/taesd.py)."""
        if decoder == "taesd":
            return postprocess(taesd.decode(taesd_for(self, "decoder 'taesd'"), latents))
        return postprocess(self.vae_decode(latents / np.float32(self.scaling_factor)))

    # --- LoRA (npsd/lora.py, docs/lora.md) -------------------------------------------------------

    @holding(huge_pages=True)                 # the merged weights stay: huge pages, as npsd.load's
    def load_lora(self, path, strength=1.0, name=None, unet_strength=None, keep_base=True):
        """Merge a LoRA (kohya/A1111 or diffusers/PEFT; .safetensors, or .pt/.ckpt read without pickle's
        code) into the text encoder and UNet: W + strength * (alpha / r) * up @ down. name: default the
        file's stem; loading a name again replaces it. unet_strength: the UNet's own (None: strength).
        keep_base=False merges it into the base weights' arrays in place (so into any other pipeline
        made on the same arrays too) without keeping their originals: the layers it touches are not
        held twice (the LCM-LoRA touches nearly the whole UNet), but it cannot be unloaded or changed.
        -> the number of layers it touches."""
        return self._lora_set().load(path, strength, name, unet_strength, keep_base)

    @holding(huge_pages=True)
    def unload_lora(self, name=None):
        """Remove the LoRA `name` (None: all but those loaded with keep_base=False); the layers no LoRA
        touches any more get their original arrays back."""
        self._lora_set().unload(name)

    @property
    def loras(self):
        """{name: npsd.lora.Loaded(path, format, strength, unet_strength, layers, in_base)}: those merged
        into the base weights first, then the others in load order."""
        return self._lora_set().info()

    def _lora_set(self):
        from .lora import LoraSet
        if getattr(self, "_loras", None) is None:
            self._loras = LoraSet(self.params)
        return self._loras

    # --- facts derived from the weights -------------------------------------------------------

    @property
    def vae_factor(self):
        """Image pixels per latent pixel: 2^(VAE levels - 1) (8 for SD v1.x)."""
        return 2 ** (len(self.params["vae"]["encoder"]["down_blocks"]) - 1)

    @property
    def latent_channels(self):
        return self.params["unet"]["conv_out"]["weight"].shape[0]

    @property
    def unet_in_channels(self):
        return self.params["unet"]["conv_in"]["weight"].shape[1]

    @property
    def scaling_factor(self):
        return float(self.config["vae"]["scaling_factor"])

    # --- generation ---------------------------------------------------------------------------

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    @_traced
    @_tiled
    @_loras_from_prompt
    def txt2img(self, prompt, negative_prompt="", num_inference_steps=None, guidance_scale=None,
                height=None, width=None, seed=None, sampler=None, latents=None, num_images=1,
                output_type="pil", callback=None, eta=0.0, use_karras_sigmas=False,
                timestep_spacing=None, clip_skip=None, long_prompt="truncate", rng="numpy",
                prediction_type=None, guidance_rescale=0.0, prompt_syntax="plain", progress=False,
                attention_maps=None, preview=None, decoder="vae", sde_noise="generator", schedule_type=None,
                hires=None, variation_seed=None, variation_strength=0.0, eta_noise_seed_delta=0, seed_resize_from_h=0,
                seed_resize_from_w=0, inpainting_mask_weight=1.0, negative_guidance_min_sigma=0.0, emphasis="original",
                schedule_options=None, token_merging_ratio=0.0, refiner=None):
        """Text to image.

        prompt: str or list of str; negative_prompt: str or a list of the same length ("" is the
        unconditional prompt). num_images: images per prompt. None for num_inference_steps,
        guidance_scale, height, width, sampler means the model's own defaults (config["defaults"],
        npsd.config.generation_defaults).
        latents: the initial noise [B, C, h, w] BEFORE multiplication by the sampler's initial sigma
        (as in diffusers); default drawn from the seed. output_type "pil" (a list of PIL images, or
        one image when one was asked), "np" (float32 [B, H, W, 3] in [0, 1]) or "latent" (the final
        latents in the scaled latent space). callback(step, t, latents, x0_pred) after every step.
        long_prompt: "truncate" (to 77 tokens, as diffusers) or "chunk" (75-token chunks, concatenated).
        rng: "numpy" (default) or "torch" (torch's CPU generator: diffusers' image from the same seed).
        seed: a whole number in [0, 2**64) (None: a random one) or a list of them, one per image
        (prompts x num_images): each image then draws from its own generator, as diffusers' pipelines
        with a list of generators (and A1111, whose image b of a batch has seed + b), so image b is
        the single image of its seed.
        prediction_type: what the UNet predicts, "epsilon", "v_prediction" or "sample" (None: the
        model's config). guidance_rescale: Lin et al. 2024's rescaled guidance (eq. 16), 0 = off.
        prompt_syntax: "plain" (brackets are literal, as in diffusers) or "a1111": AUTOMATIC1111's
        emphasis "(word:1.3)", "[word]", BREAK, prompt editing "[a:b:0.5]", alternation "[a|b]" and
        "<lora:NAME:STRENGTH>" tags (files in self.lora_dir; active for this call only), as
        npsd/prompts.py parses and weights them (docs/prompts.md). A prompt without any of these gives
        the numbers of "plain". Embeddings named in a prompt are loaded from self.embeddings_dir
        (when set) in either mode.
        attention_maps: an npsd.attention_maps.AttentionMaps that collects the per-token
        cross-attention maps of this call (DAAM); None: none collected, at no cost.
        preview: "full", "approx" or "taesd" (npsd.previews.PREVIEW_METHODS): draw every step's x0_pred
        and pass the images to the callback as a keyword, callback(step, t, latents, x0_pred,
        preview=images), images float32 [B, H, W, 3] in [0, 1] (npsd.previews.preview): "full" decodes
        with the VAE, "approx" applies a 4x3 latent -> RGB table (blocky, almost free), "taesd" decodes
        with self.taesd (set it to npsd.taesd.load_taesd(PATH) first). None: the callback as above.
        decoder: what decodes the final latents: "vae" (the model's) or "taesd" (self.taesd: several
        times faster, less detailed; for drafts). Input images are always encoded by the VAE.
        sde_noise: the step noise of the SDE samplers (schedulers.NOISE_SAMPLER_SAMPLERS): "generator" (drawn
        step by step from rng, as diffusers' DPM++ 2M SDE) or "brownian" (the increments of a Brownian
        path of the seed, image b's from seed + b, as A1111 and k-diffusion; npsd/brownian.py).
        schedule_type: None (diffusers' schedule: timestep_spacing, use_karras_sigmas) or one of
        AUTOMATIC1111's schedule types (schedulers.SCHEDULE_TYPES: "automatic", "karras",
        "exponential", ...) for the samplers A1111 runs with k-diffusion: A1111's sigmas, fractional
        timesteps and starting noise (schedulers.make_schedule), its img2img start
        (schedulers.start_index); with rng="torch" and sde_noise="brownian" where A1111 uses it, A1111's
        image from the same seed.
        hires: an npsd.hires.Hires for AUTOMATIC1111's "Hires. fix": after this pass the latents are
        enlarged hires.scale times (or to cover hires.resize) and redrawn by img2img at that size, with
        hires.prompt and hires.negative_prompt where given (npsd/hires.py); the callback's step counts on
        through the second pass. None: one pass.
        variation_seed, variation_strength, eta_noise_seed_delta: AUTOMATIC1111's seed options
        (npsd.rng.Variation): the starting noise mixed with the variation seed's (image b of a list
        of seeds: variation_seed + b) by A1111's slerp, 0 keeping the seed's, 1 taking the
        variation's; a delta > 0 (A1111's "ENSD") draws the samplers' later noise from seed + delta.
        seed_resize_from_h, seed_resize_from_w: A1111's "Seed resize from" (0 and 0: off): the start
        noise is the seed's (and variation seed's) noise of an image of that size, pasted centred into
        this size's (npsd.rng.paste_centred): the image of that size's composition, kept.
        inpainting_mask_weight: A1111's "Inpainting conditioning mask strength" for a 9-channel
        inpainting UNet, in [0, 1]: img2img and inpaint give that UNet the image blended with its
        masked copy, lerp(image, image * (1 - mask), weight) (txt2img's image is gray: no effect).
        negative_guidance_min_sigma: A1111's "Negative Guidance minimum sigma" (NGMS; 0: off), with a
        schedule_type: every second model call below that noise level skips the unconditional pass
        and takes the conditional prediction alone: with half the steps below it, a quarter of the
        unconditional rows left out (the same in img2img and inpaint).
        emphasis: A1111's "Emphasis mode" for prompt_syntax="a1111" (npsd.prompts.EMPHASIS): "original"
        (the weights, then the mean restored), "no_norm" (the weights alone), "ignore" (brackets read,
        weights not applied) or "none" (brackets are text); the same in img2img and inpaint.
        tiling: AUTOMATIC1111's "Tiling": every padded convolution of the UNet and the VAE wraps around
        the map's edges instead of reading zeros (torch's padding_mode="circular"; npsd.nn.conv2d), so
        the image tiles seamlessly; the same in img2img and inpaint. TAESD, a separate model, keeps its
        zeros (as in A1111).
        schedule_options: an npsd.schedulers.ScheduleOptions with A1111's settings of its schedule
        types (its "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Always discard
        next-to-last sigma", "Beta schedule alpha" and "beta"), with a schedule_type; they apply to the
        hires pass too, and in img2img and inpaint. None: A1111's defaults.
        token_merging_ratio: A1111's "Token merging ratio" (ToMe for Stable Diffusion, npsd/tome.py),
        in [0, 0.9]: that share of the tokens of the transformer blocks at the full latent map is merged
        before their self-attention, which then costs less, and the image changes a little (at most 3
        in 4 tokens merge: 0.75 to 0.9 are the same); 0: off. hires.token_merging_ratio sets the second
        pass's (the same in img2img and inpaint).
        refiner: an npsd.refiner.Refiner for AUTOMATIC1111's "Refiner" (with a schedule_type): at the
        first model call whose completed ratio (999 - timestep) / 1000 reaches refiner.switch_at, the
        refiner's text encoder, UNet and then VAE take over (npsd/refiner.py); with hires, in the passes
        refiner.hires_pass names. None: this pipeline alone.
        """
        _check_hooks(callback, progress, attention_maps)
        _check_image_options(1.0, inpainting_mask_weight)
        settings = self._settings(num_inference_steps, guidance_scale, height, width, sampler, output_type, seed,
                                  decoder=decoder, eta=eta, sde_noise=sde_noise,
                                  variation=(variation_seed, variation_strength, eta_noise_seed_delta,
                                             seed_resize_from_h, seed_resize_from_w),
                                  second_sampler=hires.sampler if isinstance(hires, Hires) else None,
                                  ngms=negative_guidance_min_sigma, emphasis=(emphasis, prompt_syntax),
                                  schedule_options=schedule_options, tome=token_merging_ratio)
        callback = with_previews(self, callback, preview) if preview is not None else callback
        resources.check_request(self, prompt, num_images, settings)                 # refuse what cannot fit
        hires_settings = self._hires_settings(hires, settings, attention_maps, schedule_type, sde_noise)
        if hires_settings is not None and inpainting_mask_weight != 1 and self._inpainting_unet():
            raise InputError("inpainting_mask_weight below 1 with hires: A1111 then conditions the inpainting UNet's "
                             "second pass on the first pass's image, which npsd does not remake; leave it at 1")
        if hires_settings is not None:
            resources.check_request(self, prompt, num_images, hires_settings)
        self._check_refiner(refiner, schedule_type, attention_maps)
        for other in (refiner.pipeline if refiner is not None else None, hires.checkpoint if hires_settings else None):
            if other is not None:                               # (one model runs at a time: each alone)
                resources.check_request(other, prompt, num_images, hires_settings or settings)
        first = (rng, prompt, negative_prompt, num_images, clip_skip, long_prompt, use_karras_sigmas, timestep_spacing,
                 prediction_type, guidance_rescale, prompt_syntax)
        rng, model, batch, schedule = self._begin(settings, rng, prompt, negative_prompt, num_images, clip_skip,
                                                  long_prompt, use_karras_sigmas, timestep_spacing, prediction_type,
                                                  guidance_rescale, prompt_syntax, schedule_type,
                                                  self._unet_without_mask(settings),
                                                  _refiner_in(refiner, 1, hires_settings is not None))
        h, w = settings["height"] // self.vae_factor, settings["width"] // self.vae_factor
        shape = (batch, self.latent_channels, h, w)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)                 # [B, 4, h, w]
        else:
            latents = _check_array(latents, shape, "latents")
        x = latents * np.float32(schedule.init_noise_sigma)                        # x_T
        x = self._sample(model, x, schedule, rng, 0, eta, callback, progress, attention_maps=attention_maps,
                         settings=settings)
        last = refiner.pipeline if getattr(model, "switched", False) else self      # the model that ended the pass
        if hires_settings is not None:
            x, last = self._hires_pass(x, hires, hires_settings, first, eta, callback, progress,
                                       schedule.num_inference_steps, last, _refiner_in(refiner, 2, True))
        return self._output(x, output_type, decoder, a1111=schedule.schedule_type is not None, by=last)

    def _inpainting_unet(self):
        """True for a 9-channel inpainting UNet (it also reads a mask and a masked image's latents),
        False for an ordinary one; any other is refused."""
        if self.unet_in_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise NpsdError(f"a UNet with {self.unet_in_channels} input channels is neither an ordinary "
                            f"({self.latent_channels}) nor an inpainting ({2 * self.latent_channels + 1}) model")
        return self.unet_in_channels == 2 * self.latent_channels + 1

    def _check_refiner(self, refiner, schedule_type, attention_maps):
        """txt2img's and img2img's refiner: None or an npsd.refiner.Refiner whose pipeline fits this one, checked."""
        if refiner is None:
            return
        if not isinstance(refiner, Refiner):
            raise InputError(f"refiner must be an npsd.refiner.Refiner(pipeline, switch_at) or None, got "
                             f"{type(refiner).__name__}")
        if schedule_type is None:
            raise InputError("the refiner's switch is A1111's, computed from the noise levels of its schedules: give "
                             "a schedule_type (e.g. 'automatic'), or leave refiner out")
        if attention_maps is not None or self._trace is not None:
            raise InputError("attention maps and traces record one model; give them without a refiner")
        self._check_other(refiner.pipeline, "the refiner")

    def _check_other(self, other, what):
        """A second model that takes over part of a generation (a refiner, a hires checkpoint) must read
        and write the same latents on the same noise schedule; npsd does not remake the others."""
        for name, mine, its in (("latent channels", self.latent_channels, other.latent_channels),
                                ("VAE factor", self.vae_factor, other.vae_factor),
                                ("noise schedule", with_fallbacks("scheduler", self.config.get("scheduler")),
                                 with_fallbacks("scheduler", other.config.get("scheduler")))):
            if mine != its:
                values = f" ({its} vs {mine})" if isinstance(mine, int) else ""
                raise InputError(f"{what}'s {name} differs from this model's{values}; npsd switches only between "
                                 f"models of one latent space and noise schedule")
        if self._inpainting_unet() or other._inpainting_unet() or self.guidance_embedding_dim \
                or other.guidance_embedding_dim:
            raise InputError(f"{what} and this model must both be ordinary UNets (not 9-channel inpainting or "
                             f"LCM-distilled ones) for npsd to switch between them")

    def _unet_without_mask(self, settings, pixels=None, weight=1.0):
        """The UNet call of txt2img and img2img: None (self.unet), or for a 9-channel inpainting UNet
        what A1111 gives it there: an all-ones mask, everything to repaint, and the latents (the
        posterior's mean) of a mid-gray image (0 in [-1, 1]) of the run's size (txt2img_image_conditioning),
        or in img2img of the image pixels [1, 3, H, W] times 1 - weight, its lerp(image, image * (1 - 1),
        weight) with A1111's inpainting_mask_weight (inpainting_image_conditioning): gray at weight 1."""
        if not self._inpainting_unet():
            return None
        f = self.vae_factor
        mask = np.ones((1, 1, settings["height"] // f, settings["width"] // f), np.float32)
        if pixels is None or weight == 1:
            pixels = np.zeros((1, 3, settings["height"], settings["width"]), np.float32)
        cond = self._encode_image(pixels - np.float32(weight) * pixels, None, False)         # [1, 4, h, w]
        return lambda x, t, context, **options: _with_mask(self.unet, x, t, context, mask, cond, **options)

    def _hires_settings(self, hires, settings, attention_maps, schedule_type, sde_noise="generator"):
        """The second pass's settings (its size, steps, sampler, schedule type and SDE noise) of
        txt2img(hires=...), or None; checked before the first pass runs."""
        if hires is None:
            return None
        if not isinstance(hires, Hires):
            raise InputError(f"hires must be an npsd.hires.Hires(scale=..., upscaler=..., steps=..., strength=...) "
                             f"or None, got {type(hires).__name__}")
        if attention_maps is not None or self._trace is not None:
            raise InputError("attention maps and traces record one pass; give them without hires")
        if hires.checkpoint is not None:
            self._check_other(hires.checkpoint, "the hires checkpoint")
        height, width = hires.size(settings["height"], settings["width"], self.vae_factor)
        smallest = self.vae_factor * 2 ** (len(self.params["unet"]["down_blocks"]) - 1)
        if min(height, width) < smallest:
            raise InputError(f"the hires pass would be {width}x{height} pixels, below this model's smallest side "
                             f"{smallest}; give a larger hires scale or resize")
        sampler = hires.sampler or settings["sampler"]
        if hires.schedule_type is not None and schedule_type is None:
            raise InputError("hires schedule_type is one of A1111's schedules; give the first pass one too "
                             "(schedule_type=...), or leave it to the first pass's")
        kind = hires.schedule_type or schedule_type                # A1111: hr_scheduler None is the first's
        if kind is not None and sampler not in schedulers.KDIFFUSION_SAMPLERS:
            raise InputError(f"the hires sampler {sampler!r} has no A1111 schedule type; with schedule_type use "
                             f"one of {', '.join(schedulers.KDIFFUSION_SAMPLERS)}")
        steps = hires.second_steps(settings["steps"], kind is not None)
        tome = settings["token_merging_ratio"] if hires.token_merging_ratio is None else hires.token_merging_ratio
        return dict(settings, height=height, width=width, steps=steps, sampler=sampler, schedule_type=kind,
                    sde_noise=sde_noise if sampler in schedulers.NOISE_SAMPLER_SAMPLERS else "generator",
                    token_merging_ratio=tome)

    def _hires_pass(self, x0, hires, settings, first, eta, callback, progress, done, ended_by=None, refiner=None):
        """Hires. fix's second pass (npsd/hires.py): enlarge the first pass's latents x0 and run img2img
        on them with a fresh generator of the seed. settings: _hires_settings'; first: the first pass's
        (rng, prompt, ..., prompt_syntax) as txt2img got them; done: its steps (the callback's count goes on
        from there). The pass runs on hires.checkpoint (A1111's "Hires checkpoint"), else on self;
        ended_by: the pipeline whose VAE decodes the first pass for an image upscaler (the refiner where
        it took over; default self); refiner: an npsd.refiner.Refiner for this pass, or None.
        -> (latents, the pipeline that ended the pass)."""
        runner = hires.checkpoint if hires.checkpoint is not None else self
        ended_by = ended_by or self
        rng_name, prompt, negative_prompt, *text = first
        f = self.vae_factor
        fh, fw = x0.shape[2] * f, x0.shape[3] * f                                 # the first pass's size
        (uh, uw), (cy, cx) = hires.upscaled(fh, fw), hires.crop(fh, fw, f)         # enlarged; cropped latents
        if hires.upscaler in LATENT_UPSCALERS:
            x0 = upscale_latents(x0, uh // f, uw // f, hires.upscaler)
        else:                                   # A1111's 8-bit image, enlarged with PIL, encoded again
            images = [Image.fromarray(u) for u in to_uint8(ended_by.decode_latents(x0), truncate=True)]
            x0 = np.concatenate([runner._encode_image(to_array(upscale_image(im, uw, uh,
                                                                           hires.upscaler)), None, False)
                                 for im in images])
        x0 = x0[:, :, cy // 2:x0.shape[2] - (cy + 1) // 2, cx // 2:x0.shape[3] - (cx + 1) // 2]   # the middle
        if hires.negative_prompt is not None:                                      # A1111's hires prompts
            negative_prompt = _per_prompt(hires.negative_prompt, prompt)
        if hires.prompt is not None:
            prompt = _per_prompt(hires.prompt, prompt)
        rng, model, batch, schedule = runner._begin(settings, rng_name, prompt, negative_prompt, *text,
                                                    settings["schedule_type"], runner._unet_without_mask(settings),
                                                    refiner)
        start = schedulers.start_index(schedule, hires.strength)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)                   # A1111: the seed's first draw
        x = schedulers.noise_at_start(schedule, x0, noise, start)
        on = None if callback is None else functools.partial(_counting_on, callback, done - start)
        x = runner._sample(model, x, schedule, rng, start, eta, on, progress, settings=settings)
        return x, (refiner.pipeline if getattr(model, "switched", False) else runner)

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    @_traced
    @_tiled
    @_loras_from_prompt
    def img2img(self, prompt, image, strength=0.8, negative_prompt="", num_inference_steps=None,
                guidance_scale=None, height=None, width=None, seed=None, sampler=None, noise=None,
                num_images=1, output_type="pil", callback=None, eta=0.0, use_karras_sigmas=False,
                timestep_spacing=None, clip_skip=None, long_prompt="truncate", sample_posterior=None,
                rng="numpy", prediction_type=None, guidance_rescale=0.0, prompt_syntax="plain", progress=False,
                attention_maps=None, preview=None, decoder="vae", sde_noise="generator", schedule_type=None,
                variation_seed=None, variation_strength=0.0, eta_noise_seed_delta=0, resize_mode="just resize",
                seed_resize_from_h=0, seed_resize_from_w=0, initial_noise_multiplier=1.0, inpainting_mask_weight=1.0,
                negative_guidance_min_sigma=0.0, emphasis="original", schedule_options=None,
                token_merging_ratio=0.0, refiner=None):
        """Image to image (SDEdit, Meng et al. 2022): encode the image, noise it to the step that
        `strength` selects, and denoise the remaining steps.

        image: a PIL image, a path, or a pixel array [H, W, 3] (uint8, or floats in [0, 1] such as
        output_type="np" returns; npsd.images.from_array); it is resized (with a warning) to height
        x width, which default to its own size rounded down to multiples of 8, in resize_mode (A1111's:
        "just resize", "crop and resize" or "resize and fill"; npsd.images.resize_to). strength in (0, 1]: 1
        starts from pure noise at the first step, small values keep more of the image. noise: the
        forward-process noise [B, C, h, w] (default drawn from the seed). sample_posterior: encode the
        image to a sample of the VAE posterior (True) or to its mean (False); None: a sample with
        rng="torch" (as diffusers), the mean with rng="numpy" or an A1111 schedule_type (A1111 draws
        the sample from torch's global generator, which no seed sets, so the seed's first draw is
        its start noise). initial_noise_multiplier: A1111's "Noise multiplier for img2img", >= 0: the
        noise added to the image's latents (drawn or given) is multiplied by it. refiner: as in txt2img
        (the image is encoded by this model's VAE, as A1111 encodes it before sampling). Other arguments
        as in txt2img.
        """
        _check_strength(strength)
        _check_hooks(callback, progress, attention_maps)
        _check_image_options(initial_noise_multiplier, inpainting_mask_weight)
        img = open_image(image)
        settings = self._settings(num_inference_steps, guidance_scale, height, width, sampler, output_type, seed, img,
                                  decoder, eta, sde_noise,
                                  variation=(variation_seed, variation_strength, eta_noise_seed_delta,
                                             seed_resize_from_h, seed_resize_from_w),
                                  ngms=negative_guidance_min_sigma, emphasis=(emphasis, prompt_syntax),
                                  schedule_options=schedule_options, tome=token_merging_ratio)
        callback = with_previews(self, callback, preview) if preview is not None else callback
        resources.check_request(self, prompt, num_images, settings)                 # refuse what cannot fit
        self._check_refiner(refiner, schedule_type, attention_maps)
        if refiner is not None:
            resources.check_request(refiner.pipeline, prompt, num_images, settings)
        img = fit_size(img, settings["height"], settings["width"], mode=_check_resize_mode(resize_mode))
        sample_posterior = _posterior(sample_posterior, rng == "torch" and schedule_type is None, settings)
        rng, model, batch, schedule = self._begin(settings, rng, prompt, negative_prompt, num_images, clip_skip,
                                                  long_prompt, use_karras_sigmas, timestep_spacing, prediction_type,
                                                  guidance_rescale, prompt_syntax, schedule_type,
                                                  self._unet_without_mask(settings, to_array(img), inpainting_mask_weight),
                                                  refiner)
        start = schedulers.start_index(schedule, strength)
        per_image = batch if isinstance(settings["seed"], tuple) else 1             # one sample per seed
        x0 = self._encode_image(to_array(img), rng, sample_posterior, per_image)   # [1 or B, 4, h, w], scaled
        x0 = np.repeat(x0, batch // len(x0), axis=0)                               # [B, 4, h, w]
        noise = rng.standard_normal(x0.shape, dtype=np.float32) if noise is None else _check_array(noise, x0.shape, "noise")
        noise = noise * np.float32(initial_noise_multiplier)                        # (A1111's, at any sampler)
        x = schedulers.noise_at_start(schedule, x0, noise, start)                   # x at step `start`
        x = self._sample(model, x, schedule, rng, start, eta, callback, progress, attention_maps=attention_maps,
                         settings=settings)
        last = refiner.pipeline if getattr(model, "switched", False) else self      # the model that ended it
        return self._output(x, output_type, decoder, a1111=schedule.schedule_type is not None, by=last)

    @holding()                                # its temporaries stay in the heap (npsd/malloc.py)
    @_traced
    @_tiled
    @_loras_from_prompt
    def inpaint(self, prompt, image, mask_image, strength=1.0, negative_prompt="", num_inference_steps=None,
                guidance_scale=None, height=None, width=None, seed=None, sampler=None, latents=None,
                noise=None, num_images=1, output_type="pil", callback=None, eta=0.0, use_karras_sigmas=False,
                timestep_spacing=None, clip_skip=None, long_prompt="truncate", sample_posterior=None,
                mask_blur=0, rng="numpy", prediction_type=None, guidance_rescale=0.0, prompt_syntax="plain", progress=False,
                attention_maps=None, preview=None, decoder="vae", sde_noise="generator", schedule_type=None,
                masked_content="original", inpaint_area="whole picture", masked_area_padding=32,
                variation_seed=None, variation_strength=0.0, eta_noise_seed_delta=0, resize_mode="just resize",
                seed_resize_from_h=0, seed_resize_from_w=0, initial_noise_multiplier=1.0, inpainting_mask_weight=1.0,
                negative_guidance_min_sigma=0.0, emphasis="original", schedule_options=None,
                token_merging_ratio=0.0):
        """Repaint the white part of mask_image.

        With a 4-channel (ordinary) checkpoint: the course's method (RePaint-style blending, as
        diffusers' StableDiffusionInpaintPipeline does): after every step the kept region of the
        latents is replaced by the original image's latents noised to the next step's level. With a
        9-channel inpainting checkpoint: the UNet also reads the mask and the masked image's latents
        (concatenated to its input). strength 1 starts from pure noise; < 1 from the image noised to
        the step that strength selects. image and mask_image as img2img's image (a mask array may
        also be bool). latents (strength 1) / noise (strength < 1): the initial
        noise, as in txt2img / img2img. mask_blur: a Gaussian blur radius in pixels applied to the
        mask; the blurred mask's soft values then weight the blending. sample_posterior, rng,
        resize_mode (for both images): as in img2img; the other arguments (preview, decoder, ...) as
        in txt2img.

        With an A1111 schedule_type, A1111's inpainting instead (npsd/a1111_inpaint.py): the mask
        blurred as A1111 blurs it (mask_blur: OpenCV's Gaussian of that sigma), every denoised
        estimate and the result blended with the image's latents, the input pasted back over the
        kept region in 8 bits ("np" then returns that 8-bit image / 255); masked_content: A1111's
        "Masked content", "original", "fill", "latent noise" or "latent nothing"; inpaint_area:
        "whole picture", or "only masked": the box around the mask (masked_area_padding pixels
        wider) is cut out, repainted at height x width and put back, and the result has the input
        image's size (height and width default to it). initial_noise_multiplier and
        inpainting_mask_weight: as img2img's (the weight: the masked image a 9-channel UNet reads is
        lerp(image, image * (1 - mask), weight)), A1111's options, so with a schedule_type only.
        """
        _check_strength(strength)
        _check_hooks(callback, progress, attention_maps, mask_blur)
        _check_image_options(initial_noise_multiplier, inpainting_mask_weight)
        img = open_image(image)
        settings = self._settings(num_inference_steps, guidance_scale, height, width, sampler, output_type, seed, img,
                                  decoder, eta, sde_noise,
                                  variation=(variation_seed, variation_strength, eta_noise_seed_delta,
                                             seed_resize_from_h, seed_resize_from_w),
                                  ngms=negative_guidance_min_sigma, emphasis=(emphasis, prompt_syntax),
                                  schedule_options=schedule_options, tome=token_merging_ratio)
        callback = with_previews(self, callback, preview) if preview is not None else callback
        resources.check_request(self, prompt, num_images, settings)                 # refuse what cannot fit
        inpainting_unet = self._inpainting_unet()
        a1111 = schedule_type is not None                                          # A1111's inpainting
        a1111_inpaint.check(masked_content, inpaint_area, masked_area_padding, mask_blur if a1111 else 0)
        if not a1111 and (masked_content, inpaint_area) != ("original", "whole picture"):
            raise InputError(f"masked_content={masked_content!r} and inpaint_area={inpaint_area!r} are A1111's "
                             f"inpainting: give a schedule_type (e.g. 'automatic'), or leave them at their defaults")
        if not a1111 and (initial_noise_multiplier, inpainting_mask_weight) != (1, 1):
            raise InputError(f"initial_noise_multiplier={initial_noise_multiplier!r} and inpainting_mask_weight="
                             f"{inpainting_mask_weight!r} are A1111's inpainting's: give a schedule_type "
                             f"(e.g. 'automatic'), or leave them at 1")
        height, width, f = settings["height"], settings["width"], self.vae_factor
        mode = _check_resize_mode(resize_mode)
        if a1111:                                                # A1111's mask (and crop): npsd/a1111_inpaint.py
            mask_img = open_image(mask_image, "mask", keep_alpha=True)
            if inpaint_area == "whole picture":
                img = fit_size(img, height, width, mode=mode)
            fit_size(mask_img, img.height, img.width, "mask", resample=False)    # (resized after its blur)
            img, soft, paste = a1111_inpaint.prepare(img, mask_img, mask_blur, inpaint_area, masked_area_padding,
                                                     height, width, mode)        # soft: uint8 [H, W]
            pixels = to_array(img)                                                 # [1, 3, H, W]
            mask_px = np.around(soft / np.float32(255))[None, None]                # [1, 1, H, W], 1 = repaint
            repaint = a1111_inpaint.latent_mask(soft, height // f, width // f)     # [1, 1, h, w]
            if masked_content != "original":                                     # (A1111 fills for all three)
                pixels = to_array(a1111_inpaint.fill(img, soft))
        else:
            img = fit_size(img, height, width, mode=mode)
            pixels = to_array(img)                                                 # [1, 3, H, W]
            mask_img = fit_size(open_image(mask_image, "mask"), height, width, "mask", mode=mode)
            mask_px = mask_to_array(mask_img, mask_blur)                           # [1, 1, H, W], 1 = repaint
        mask = mask_px[:, :, ::f, ::f]                                             # [1, 1, h, w] (nearest)
        if a1111:                       # lerp(image, image * (1 - mask), weight), A1111's inpainting_mask_weight
            masked_pixels = pixels - np.float32(inpainting_mask_weight) * (pixels - pixels * (1 - mask_px))
        else:
            masked_pixels = pixels * (mask_px < 0.5)                               # the kept region only
        masked = None                                                              # its latents, below

        def nine_channel_unet(x, t, context, **options):           # the UNet also reads mask and masked image
            return _with_mask(self.unet, x, t, context, mask, masked, **options)

        diffusers_order = rng == "torch" and not a1111
        sample_posterior = _posterior(sample_posterior, diffusers_order, settings)
        rng, model, batch, schedule = self._begin(settings, rng, prompt, negative_prompt, num_images, clip_skip,
                                                  long_prompt, use_karras_sigmas, timestep_spacing, prediction_type,
                                                  guidance_rescale, prompt_syntax, schedule_type,
                                                  nine_channel_unet if inpainting_unet else None)
        start = schedulers.start_index(schedule, strength)
        # (A1111 noises the image at every strength)
        pure_noise = start == 0 and strength == 1.0 and schedule.schedule_type is None
        # diffusers does not encode the image for a 9-channel UNet that starts from pure noise
        x0 = self._encode_image(pixels, rng,
                                sample_posterior and not (diffusers_order and inpainting_unet and pure_noise))
        if inpainting_unet and not diffusers_order:
            masked = self._encode_image(masked_pixels, rng, sample_posterior)     # [1, 4, h, w]
        x0 = np.repeat(x0, batch, axis=0)                                          # [B, 4, h, w]
        shape = x0.shape
        if pure_noise:
            eps0 = rng.standard_normal(shape, dtype=np.float32) if latents is None else _check_array(latents, shape, "latents")
            x = eps0 * np.float32(schedule.init_noise_sigma)                        # pure noise
            noise = eps0 if noise is None else _check_array(noise, shape, "noise")
        else:
            noise = rng.standard_normal(shape, dtype=np.float32) if noise is None else _check_array(noise, shape, "noise")
            x = schedulers.noise_at_start(schedule, x0, noise, start)
        if diffusers_order:             # diffusers encodes the masked image now, even for a 4-channel UNet
            if inpainting_unet:
                masked = self._encode_image(masked_pixels, rng, sample_posterior)
            elif sample_posterior:
                rng.standard_normal((1,) + shape[1:], dtype=np.float32)          # drawn and not used
        if a1111:
            return self._inpaint_a1111(model, x0, noise, schedule, rng, start, eta, callback, progress,
                                       attention_maps, settings, repaint, masked_content, paste, output_type, decoder,
                                       initial_noise_multiplier)

        def keep_known(i, t, x, x0_pred):
            if inpainting_unet:
                return None
            # the kept region: the original latents noised to the level of the next step
            known = schedulers.noise_at_step(schedule, x0, noise, i + 1)           # [B, 4, h, w]
            return (1 - mask) * known + mask * x

        x = self._sample(model, x, schedule, rng, start, eta, callback, progress, keep_known, attention_maps, settings)
        return self._output(x, output_type, decoder)

    def _inpaint_a1111(self, model, z, noise, schedule, rng, start, eta, callback, progress, attention_maps, settings,
                       repaint, masked_content, paste, output_type, decoder, multiplier=1.0):
        """Steps 3-5 of A1111's inpainting (npsd/a1111_inpaint.py) from the image's latents z [B, 4, h, w],
        the start noise, the latent mask repaint [1, 1, h, w] (1 = repaint) and prepare's paste.
        multiplier: A1111's initial_noise_multiplier, of the noise that noises z (not of the fill's)."""
        if masked_content == "latent noise":          # the seed's noise there (not the variation seed's)
            z = z * (1 - repaint) + seed_noise(rng, noise) * repaint
        elif masked_content == "latent nothing":
            z = z * (1 - repaint)
        x = schedulers.noise_at_start(schedule, z, noise * np.float32(multiplier), start)

        def blend(latents):                                                        # keep z, repaint latents
            return latents * repaint + z * (1 - repaint)

        x = blend(self._sample(model, x, schedule, rng, start, eta, callback, progress, None, attention_maps,
                               settings, edit_x0=blend))
        return self._output(x, output_type, decoder, a1111=True, paste_back=paste)

    # --- the pieces of the loops ----------------------------------------------------------------

    def _settings(self, steps, guidance, height, width, sampler, output_type, seed, image=None, decoder="vae", eta=0.0,
                  sde_noise="generator", variation=(None, 0.0, 0, 0, 0), second_sampler=None, ngms=0.0,
                  emphasis=("original", "plain"), schedule_options=None, tome=0.0):
        """Fill None with the model's defaults (npsd.config.generation_defaults; for height and width
        the image's own size first) and check every value; one-line errors. second_sampler: the hires
        fix's own sampler, which sde_noise may be for."""
        defaults = generation_defaults(self.config)
        from_image = ()
        if image is not None and (height is None or width is None):
            ih, iw = default_size(image)
            from_image = (("height",) if height is None else ()) + (("width",) if width is None else ())
            height, width = ih if height is None else height, iw if width is None else width
        steps = defaults["num_inference_steps"] if steps is None else steps
        guidance = defaults["guidance_scale"] if guidance is None else guidance
        height = defaults["height"] if height is None else height
        width = defaults["width"] if width is None else width
        sampler = defaults["sampler"] if sampler is None else sampler
        if not is_whole(steps) or steps < 1:
            raise InputError(f"num_inference_steps must be a whole number >= 1, got {steps!r}")
        if not is_number(guidance) or not math.isfinite(guidance) or guidance < 0:
            raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
        f = self.vae_factor
        smallest = f * 2 ** (len(self.params["unet"]["down_blocks"]) - 1)
        for name, v in (("height", height), ("width", width)):
            if not is_whole(v) or v % f or v < smallest:
                if name in from_image:
                    raise InputError(f"the input image is {image.size[0]}x{image.size[1]} pixels, too small for its own "
                                     f"size ({name} {v}); give height and width (multiples of {f}, at least "
                                     f"{smallest}) to resize it")
                raise InputError(f"{name} must be a multiple of {f} and at least {smallest}, got {v!r}")
        schedulers.check_sampler(sampler)
        schedulers.check_eta(eta)
        if sde_noise not in SDE_NOISES:
            raise InputError(f"sde_noise must be one of {', '.join(SDE_NOISES)}, got {sde_noise!r}")
        if sde_noise == "brownian" and sampler not in schedulers.NOISE_SAMPLER_SAMPLERS \
                and second_sampler not in schedulers.NOISE_SAMPLER_SAMPLERS:
            raise InputError(f"sde_noise='brownian' applies to {', '.join(schedulers.NOISE_SAMPLER_SAMPLERS)}, "
                             f"not to {sampler!r}")
        if decoder not in DECODERS:
            raise InputError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if decoder == "taesd":
            taesd_for(self, "decoder 'taesd'")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**32)
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if not seeds or not all(is_whole(s) and 0 <= s < SEED_LIMIT for s in seeds):
            raise InputError(f"seed must be a whole number in [0, 2**64) or a list of them, one per image, got {seed!r}")
        seed = tuple(int(s) for s in seed) if isinstance(seed, (list, tuple)) else int(seed)
        if not is_number(ngms) or not 0 <= ngms < math.inf:
            raise InputError(f"negative_guidance_min_sigma must be a finite number >= 0 (0: off), got {ngms!r}")
        emphasis, syntax = emphasis                                  # (the mode and the call's prompt_syntax)
        if check_emphasis(emphasis) != "original" and syntax != "a1111":
            raise InputError(f"emphasis={emphasis!r} is A1111's way of weighting (word:1.2): give prompt_syntax='a1111'")
        tome = check_ratio(tome)
        return {"steps": int(steps), "guidance_scale": float(guidance), "height": int(height),
                "width": int(width), "sampler": sampler, "seed": seed,
                "sde_noise": sde_noise if sampler in schedulers.NOISE_SAMPLER_SAMPLERS else "generator",
                "variation": _check_variation(*variation, seeds, f), "ngms": float(ngms), "emphasis": emphasis,
                "schedule_options": schedule_options, "token_merging_ratio": tome}

    def _begin(self, settings, rng, prompt, negative_prompt, num_images, clip_skip, long_prompt, use_karras_sigmas,
               timestep_spacing, prediction_type, guidance_rescale, prompt_syntax, schedule_type, unet=None,
               refiner=None):
        """What every generation sets up first -> (the generator, model(x, t) with guidance, batch, schedule).
        unet: the UNet call to guide (default self.unet). refiner: an npsd.refiner.Refiner that takes
        over this pass's model calls from its switch on (npsd.refiner.SwitchingModel), or None."""
        check_rescale(guidance_rescale)
        rng = make_rng(rng, settings["seed"], settings["variation"])
        schedule = schedulers.make_schedule(settings["sampler"], settings["steps"], self.config, use_karras_sigmas,
                                            timestep_spacing, prediction_type=prediction_type,
                                            schedule_type=schedule_type,
                                            schedule_options=settings["schedule_options"])
        text = (prompt, negative_prompt, num_images, clip_skip, long_prompt, guidance_rescale, prompt_syntax)
        model, batch = self._guided(settings, schedule, *text, unet=unet)
        if refiner is not None:
            table = schedulers.sigmas_from_alphas_cumprod(schedule.alphas_cumprod)           # [1000] sigma_t
            model = SwitchingModel(model, lambda k: refiner.pipeline._guided(settings, schedule, *text, first_call=k)[0],
                                   lambda t: schedulers.t_to_sigma([t], table)[0], table, refiner.switch_at)
        return rng, model, batch, schedule

    def _guided(self, settings, schedule, prompt, negative_prompt, num_images, clip_skip, long_prompt, guidance_rescale,
                prompt_syntax, unet=None, first_call=0):
        """The prompts encoded by this pipeline's text encoder and its UNet (or unet) guided -> (model(x, t),
        batch). first_call: the model call it starts at (npsd.guidance.guided_model)."""
        model_calls = settings["steps"] * (2 if settings["sampler"] in schedulers.TWO_STAGE else 1)
        scale, unet = settings["guidance_scale"], unet or self.unet
        if self.guidance_embedding_dim:
            # an LCM-distilled UNet (Luo et al. 2023) reads w as an input, as diffusers' pipelines
            # give it: no unconditional pass, so no negative prompt
            if unet != self.unet:
                raise InputError("an LCM-distilled UNet (time_cond_proj_dim) runs txt2img and img2img, not inpainting")
            unet = functools.partial(self.unet, w_emb=unet_model.guidance_embedding(scale, self.guidance_embedding_dim))
            scale = 1.0
        if settings["token_merging_ratio"]:                                    # ToMe (npsd/tome.py)
            unet = functools.partial(unet, token_merging_ratio=settings["token_merging_ratio"])
        cond, uncond, batch, weights = self._contexts(prompt, negative_prompt, num_images, scale, clip_skip,
                                                      long_prompt, prompt_syntax, model_calls, settings["emphasis"])
        if isinstance(settings["seed"], tuple) and len(settings["seed"]) != batch:
            raise InputError(f"{len(settings['seed'])} seeds for {batch} images; give one seed, or one per image "
                             f"(prompts x num_images)")
        if weights is not None and self.guidance_embedding_dim:
            raise InputError("an LCM-distilled UNet has no unconditional pass to combine the parts of a prompt "
                             "with AND; remove AND or its weight")
        model = guided_model(unet, cond, uncond, scale, guidance_rescale, weights, _ngms(settings["ngms"], schedule),
                             first_call)
        return model, batch

    def _contexts(self, prompt, negative_prompt, num_images, guidance_scale, clip_skip, long_prompt,
                  prompt_syntax="plain", model_calls=1, emphasis="original"):
        """Encode prompt and negative prompt -> (cond [B, L, D], uncond [B, L, D] or None, B, weights).

        B = number of prompts * num_images (each prompt's images are consecutive, as in diffusers).
        With A1111's syntax in use, cond and uncond may be functions of the model call's index k (prompt
        editing), and a prompt with AND or a weight gives weights (one list per image) and cond one row
        per part (guided_model); weights is None otherwise."""
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
        if not is_whole(num_images) or num_images < 1:
            raise InputError(f"num_images must be a whole number >= 1, got {num_images!r}")
        if prompt_syntax not in PROMPT_SYNTAXES:
            raise InputError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {prompt_syntax!r}")
        composed = prompt_syntax == "a1111" and any(composable(p) for p in prompts)
        guided = uses_guidance(guidance_scale) or composed        # AND's parts are weighed against uncond
        texts = prompts + (negatives if guided else [])
        if getattr(self, "embeddings_dir", None):
            load_used_embeddings(self, self.embeddings_dir, texts)
        if prompt_syntax == "a1111" and (emphasis != "original" or any(prompt_syntax_used(t, model_calls) for t in texts)):
            return self._a1111_contexts(prompts, negatives if guided else None, num_images, clip_skip, model_calls,
                                        emphasis)
        if long_prompt == "truncate":
            ids, neg_ids = self.tokenizer(prompts), (self.tokenizer(negatives) if guided else None)
        elif long_prompt == "chunk":
            # both sides get the same number of 77-token chunks, so that they can be batched
            k = max(self.tokenizer.chunked(prompts).shape[1], self.tokenizer.chunked(negatives).shape[1]) // 77
            ids = self.tokenizer.chunked(prompts, num_chunks=k)
            neg_ids = self.tokenizer.chunked(negatives, num_chunks=k) if guided else None
        else:
            raise InputError(f"long_prompt must be 'truncate' or 'chunk', got {long_prompt!r}")
        if guided and self._trace is None:        # one batch: products twice as tall, 0.83 of two calls' time
            both = self.encode_text(np.concatenate([ids, neg_ids]), clip_skip)     # (a trace keeps the two
            cond, uncond = both[:len(ids)], both[len(ids):]                       # calls diffusers makes)
        else:
            cond = self.encode_text(ids, clip_skip)
            uncond = self.encode_text(neg_ids, clip_skip) if guided else None
        cond = np.repeat(cond, num_images, axis=0)                                  # [B, L, D]
        uncond = np.repeat(uncond, num_images, axis=0) if guided else None
        return cond, uncond, cond.shape[0], None

    def _a1111_contexts(self, prompts, negatives, num_images, clip_skip, model_calls, emphasis="original"):
        """A1111's composable, weighted, chunked, scheduled prompts (npsd/prompts.py) -> (cond, uncond
        or None, B, weights), as _contexts. Each prompt's parts (split_and) are encoded once per
        distinct text; the parts are brought to one length by repeating their last token's vector
        (repeat_last), then every context to the same number of 77-token chunks with the empty prompt's."""
        parts = [split_and(p) for p in prompts]
        texts = list(dict.fromkeys(t for ps in parts for t, _ in ps))
        groups = [texts] + ([negatives] if negatives is not None else [])
        schedules = [[encode_schedule(self, t, model_calls, clip_skip, emphasis=emphasis) for t in group]
                     for group in groups]
        longest = max(c.shape[1] for sch in schedules[0] for _, c in sch)
        schedules[0] = [[(end, repeat_last(c, longest)) for end, c in sch] for sch in schedules[0]]
        contexts = pad_chunks([c for g in schedules for sch in g for _, c in sch], encode_weighted(self, "", clip_skip))
        it = iter(contexts)
        schedules = [[[(end, next(it)) for end, _ in sch] for sch in g] for g in schedules]
        rows = [schedules[0][texts.index(t)] for ps in parts for _ in range(num_images) for t, _ in ps]
        negative_rows = [sch for sch in schedules[1] for _ in range(num_images)] if negatives is not None else None

        def context_at(rows):                                       # model call k -> [rows, L, D]
            def at(k):
                return np.concatenate([text_at_step(sch, k) for sch in rows])
            return at if any(len(sch) > 1 for sch in rows) else at(0)
        cond = context_at(rows)
        uncond = context_at(negative_rows) if negatives is not None else None
        weights = None
        if any(composable(p) for p in prompts):
            weights = [[w for _, w in ps] for ps in parts for _ in range(num_images)]
        return cond, uncond, len(prompts) * num_images, weights

    def _sample(self, model, x, schedule, rng, start, eta, callback, progress, after_step=None, attention_maps=None,
                settings=None, edit_x0=None):
        """Run the sampler; stops with a clear error as soon as the latents stop being finite.
        after_step(i, t, x, x0_pred) -> array or None replaces the state after every step, and
        between the two stages of a two-stage sampler (as diffusers' inpainting does).
        attention_maps: an npsd.attention_maps.AttentionMaps to report the steps' cross-attention to.
        settings: the call's (_settings); with sde_noise "brownian", the step noise is the seed's
        Brownian tree (npsd/brownian.py). edit_x0: as schedulers.sample's."""
        noise_sampler = None
        if settings is not None and settings["sde_noise"] == "brownian":
            noise_sampler = brownian_noise(schedule, start, x.shape, settings["seed"])
        if attention_maps is not None:
            model, callback = attention_maps.watch(model, callback, x.shape, start)
        n = schedule.num_inference_steps
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n - start, unit="step", leave=False)

        trace = self._trace
        if trace is not None:
            trace.step = start                                      # step i's UNet calls record as step{i}/unet...

        def each_step(i, t, x, x0_pred):
            if trace is not None:
                trace.step = i + 1
            if not np.isfinite(x).all():
                raise NpsdError(f"the latents became NaN or infinite at step {i + 1} of {n} (t={t}); "
                                "try another sampler, fewer steps or a lower guidance scale")
            replaced = after_step(i, t, x, x0_pred) if after_step is not None else None
            if replaced is not None:
                x = replaced
            if callback is not None:
                callback(i, t, x, x0_pred)
            if bar is not None:
                bar.update(1)
            return replaced

        try:  # overflow shows as a non-finite latent, reported above with its step: no numpy warnings
            with np.errstate(over="ignore", invalid="ignore"):
                mid = None if after_step is None else (lambda i, x_mid: after_step(i, None, x_mid, None))
                return schedulers.sample(model, x, schedule, rng=rng, callback=each_step, start_index=start, eta=eta,
                                         between_stages=mid, noise_sampler=noise_sampler, edit_x0=edit_x0)
        finally:
            if trace is not None:
                trace.step = None
            if bar is not None:
                bar.close()

    def _encode_image(self, pixels, rng, sample_posterior, count=1):
        """[1, 3, H, W] in [-1, 1] -> scaled latents [1, 4, h, w]: the posterior mean, or a sample
        (count: that many samples [count, 4, h, w], one per image, as diffusers' img2img draws them with
        one generator per image)."""
        mean, logvar = self.vae_encode(pixels)
        if sample_posterior and count > 1:
            mean, logvar = np.repeat(mean, count, axis=0), np.repeat(logvar, count, axis=0)
        if sample_posterior:
            mean = vae.sample(mean, logvar, rng.standard_normal(mean.shape, dtype=np.float32))
        return mean * np.float32(self.scaling_factor)

    def _output(self, latents, output_type, decoder="vae", a1111=False, paste_back=None, by=None):
        """The latents as output_type asks. a1111: 8 bits by truncation, as A1111 saves (else rounded,
        as diffusers). paste_back(uint8 [B, H, W, 3]) -> uint8 [B, H, W, 3]: A1111's inpainting's last
        step, after which "np" returns the 8-bit images / 255. by: the pipeline whose VAE decodes
        (a refiner or hires checkpoint that ended the sampling; None: self)."""
        if output_type == "latent":
            return latents
        by = self if by is None or decoder == "taesd" else by
        images = by.decode_latents(latents, decoder)                                    # [B, H, W, 3]
        if paste_back is not None:
            images = paste_back(to_uint8(images, truncate=True)).astype(np.float32) / np.float32(255)
        if output_type == "np":
            return images
        pil = to_pil(images, truncate=a1111)
        return pil[0] if len(pil) == 1 else pil


def _as_prompt_list(prompt, what):
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return list(prompts)


def _posterior(sample_posterior, default, settings):
    """img2img's and inpaint's sample_posterior: None takes default (diffusers samples it; A1111
    samples it from torch's unseeded global generator, so with an A1111 schedule_type npsd takes the
    mean), and the mean with A1111's seed options, whose variation mixes the generator's first draw:
    the start noise, which a posterior sample would otherwise come before."""
    if sample_posterior is None:
        return default and settings["variation"] is None
    if sample_posterior and settings["variation"] is not None:
        raise InputError("variation_seed and eta_noise_seed_delta act on the start noise, the generator's first "
                         "draw, and sample_posterior=True would draw before it; leave sample_posterior out")
    return sample_posterior


def _ngms(min_sigma, schedule):
    """A1111's "Negative Guidance minimum sigma" (its s_min_uncond; 0: off) -> guided_model's
    skip_uncond: every second model call (odd k) at a noise level below min_sigma goes without the
    unconditional pass, as A1111's CFGDenoiser does, or None."""
    if not min_sigma:
        return None
    if schedule.schedule_type is None:
        raise InputError("negative_guidance_min_sigma is A1111's, compared with its samplers' noise levels: give a "
                         "schedule_type (e.g. 'automatic'), or leave it at 0")
    table = schedulers.sigmas_from_alphas_cumprod(schedule.alphas_cumprod)               # [N] sigma_t
    return lambda k, t: k % 2 == 1 and schedulers.t_to_sigma([t], table)[0] < min_sigma


def _per_prompt(value, prompts):
    """The hires pass's prompt or negative prompt (a str, or one per prompt) for the first pass's
    prompts: a str serves every prompt of a list."""
    if isinstance(value, str) and isinstance(prompts, (list, tuple)):
        return [value] * len(prompts)
    return list(value) if isinstance(value, (list, tuple)) else value


def _with_mask(unet, x, t, context, mask, masked, **options):
    """A 9-channel inpainting UNet at x [b, 4, h, w]: it reads [x, mask, masked image latents] along the
    channels (diffusers' order), mask [1, 1, h, w] and masked [1, 4, h, w] repeated for the batch.
    options: the UNet call's keywords (token_merging_ratio)."""
    b = x.shape[0]
    return unet(np.concatenate([x, np.repeat(mask, b, axis=0), np.repeat(masked, b, axis=0)], axis=1), t, context,
                **options)


def _check_resize_mode(mode):
    if mode not in RESIZE_MODES:
        raise InputError(f"resize_mode must be one of {', '.join(repr(m) for m in RESIZE_MODES)}, got {mode!r}")
    return mode


def _check_variation(variation_seed, strength, delta, resize_h, resize_w, seeds, f):
    """A1111's seed options (npsd.rng.Variation), checked -> (variation seed, strength, delta, resize)
    or None; resize: "Seed resize from" as (h, w) latents of f pixels each (A1111's h // 8, w // 8), or None."""
    resize = _check_seed_resize(resize_h, resize_w, f)
    if variation_seed is None and not strength and not delta and resize is None:
        return None
    if not is_number(strength) or not 0 <= strength <= 1:
        raise InputError(f"variation_strength must be a number in [0, 1], got {strength!r}")
    if strength and variation_seed is None:
        raise InputError("variation_strength needs a variation_seed (the seed whose noise is mixed in)")
    variation_seed = 0 if variation_seed is None else variation_seed
    if not is_whole(variation_seed) or not 0 <= variation_seed <= SEED_LIMIT - len(seeds):
        raise InputError(f"variation_seed must be a whole number in [0, 2**64), one more per image, got {variation_seed!r}")
    if not is_whole(delta) or delta < 0 or max(seeds) + delta >= SEED_LIMIT:
        raise InputError(f"eta_noise_seed_delta must be a whole number >= 0 with seed + delta below 2**64, got {delta!r}")
    return int(variation_seed), float(strength), int(delta), resize


def _check_seed_resize(h, w, f):
    """seed_resize_from_h, _w: 0 and 0 (off) or two whole numbers of pixels >= f -> (h // f, w // f) or None."""
    for name, v in (("seed_resize_from_h", h), ("seed_resize_from_w", w)):
        if not is_whole(v) or (v and v < f) or v < 0:
            raise InputError(f"{name} must be 0 (off) or a whole number of pixels >= {f}, got {v!r}")
    if bool(h) != bool(w):
        raise InputError(f"seed_resize_from_h and seed_resize_from_w go together: give both (the size the seed's "
                         f"noise is drawn at) or neither, got {h!r} and {w!r}")
    return (int(h) // f, int(w) // f) if h else None


def _check_image_options(multiplier, weight):
    """A1111's initial_noise_multiplier and inpainting_mask_weight, checked."""
    if not is_number(multiplier) or not math.isfinite(multiplier) or multiplier < 0:
        raise InputError(f"initial_noise_multiplier must be a finite number >= 0 (1: the noise as drawn), got {multiplier!r}")
    if not is_number(weight) or not 0 <= weight <= 1:
        raise InputError(f"inpainting_mask_weight must be a number in [0, 1] (1: the masked image), got {weight!r}")


def _check_hooks(callback, progress, attention_maps, mask_blur=0):
    """The arguments that watch a generation (and inpainting's mask_blur), checked before any work."""
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be a function callback(step, t, latents, x0_pred) or None, got {callback!r}")
    if not is_flag(progress):
        raise InputError(f"progress must be True or False, got {progress!r}")
    if attention_maps is not None and not hasattr(attention_maps, "watch"):
        raise InputError(f"attention_maps must be an npsd.attention_maps.AttentionMaps or None, got {attention_maps!r}")
    if not is_whole(mask_blur) or mask_blur < 0:
        raise InputError(f"mask_blur must be a whole number of pixels >= 0, got {mask_blur!r}")


def _check_strength(strength):
    if not is_number(strength) or not 0 < strength <= 1:
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}")


def _check_array(a, shape, what):
    a = np.asarray(a, dtype=np.float32)
    if a.shape != tuple(shape):
        raise InputError(f"{what} must have shape {tuple(shape)}, got {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{what} must be finite numbers (found NaN or inf)")
    return a
