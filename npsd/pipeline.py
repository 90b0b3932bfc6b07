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

import math

import numpy as np

from . import clip, resources, schedulers, unet as unet_model, vae
from .rng import make_rng
from .config import sd15_config
from .errors import InputError, NpsdError
from .guidance import guided_model, uses_guidance
from .images import default_size, fit_size, mask_to_array, open_image, postprocess, to_array, to_pil
from .tokenizer import Tokenizer

OUTPUT_TYPES = ("pil", "np", "latent")


class Pipeline:
    """Stable Diffusion v1.x in NumPy.

    params: {"text_encoder": ..., "unet": ..., "vae": ...}, nested dicts/lists of float32 arrays
            named as in diffusers/transformers (see docs/parameters.md);
    config: {"text_encoder": ..., "unet": ..., "vae": ..., "scheduler": ..., "defaults": ...}
            (npsd.config.SD15 shows the keys);
    tokenizer: a Tokenizer (default: the CLIP tokenizer shipped in weights/).
    """

    def __init__(self, params, config=None, tokenizer=None, info=None):
        self.params = params
        self.config = config if config is not None else sd15_config()
        self._tokenizer = tokenizer
        self.info = dict(info or {})          # where the weights came from (set by npsd.load)

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

    def txt2img(self, prompt, negative_prompt="", num_inference_steps=None, guidance_scale=None,
                height=None, width=None, seed=None, sampler=None, latents=None, num_images=1,
                output_type="pil", callback=None, eta=0.0, use_karras_sigmas=False,
                timestep_spacing=None, clip_skip=None, long_prompt="truncate", rng="numpy",
                prediction_type=None, guidance_rescale=0.0, progress=False):
        """Text to image.

        prompt: str or list of str; negative_prompt: str or a list of the same length ("" is the
        unconditional prompt). num_images: images per prompt. None for num_inference_steps,
        guidance_scale, height, width, sampler means the model's own defaults (config["defaults"]).
        latents: the initial noise [B, C, h, w] BEFORE multiplication by the sampler's initial sigma
        (as in diffusers); default drawn from the seed. output_type "pil" (a list of PIL images, or
        one image when one was asked), "np" (float32 [B, H, W, 3] in [0, 1]) or "latent" (the final
        latents in the scaled latent space). callback(step, t, latents, x0_pred) after every step.
        long_prompt: "truncate" (to 77 tokens, as diffusers) or "chunk" (75-token chunks, concatenated).
        rng: "numpy" (default) or "torch" (torch's CPU generator: diffusers' image from the same seed).
        prediction_type: what the UNet predicts, "epsilon", "v_prediction" or "sample" (None: the
        model's config). guidance_rescale: Lin et al. 2024's rescaled guidance (eq. 16), 0 = off.
        """
        s = self._settings(num_inference_steps, guidance_scale, height, width, sampler, output_type, seed)
        resources.check_request(self, prompt, num_images, s)                        # refuse what cannot fit
        rng, model, batch, schedule = self._begin(s, rng, prompt, negative_prompt, num_images, clip_skip, long_prompt,
                                                  use_karras_sigmas, timestep_spacing, prediction_type, guidance_rescale)
        h, w = s["height"] // self.vae_factor, s["width"] // self.vae_factor
        shape = (batch, self.latent_channels, h, w)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)                 # [B, 4, h, w]
        else:
            latents = _check_array(latents, shape, "latents")
        x = latents * np.float32(schedule.init_noise_sigma)                        # x_T
        x = self._sample(model, x, schedule, rng, 0, eta, callback, progress)
        return self._output(x, output_type)

    def img2img(self, prompt, image, strength=0.8, negative_prompt="", num_inference_steps=None,
                guidance_scale=None, height=None, width=None, seed=None, sampler=None, noise=None,
                num_images=1, output_type="pil", callback=None, eta=0.0, use_karras_sigmas=False,
                timestep_spacing=None, clip_skip=None, long_prompt="truncate", sample_posterior=None,
                rng="numpy", prediction_type=None, guidance_rescale=0.0, progress=False):
        """Image to image (SDEdit, Meng et al. 2022): encode the image, noise it to the step that
        `strength` selects, and denoise the remaining steps.

        image: a PIL image or a path; it is resized (with a warning) to height x width, which default
        to its own size rounded down to multiples of 8. strength in (0, 1]: 1 starts from pure noise
        at the first step, small values keep more of the image. noise: the forward-process noise
        [B, C, h, w] (default drawn from the seed). sample_posterior: encode the image to a sample of
        the VAE posterior (True) or to its mean (False); None: a sample with rng="torch" (as diffusers),
        the mean with rng="numpy". Other arguments as in txt2img.
        """
        _check_strength(strength)
        img = open_image(image)
        s = self._settings(num_inference_steps, guidance_scale, height, width, sampler, output_type, seed, img)
        resources.check_request(self, prompt, num_images, s)                        # refuse what cannot fit
        img = fit_size(img, s["height"], s["width"])
        sample_posterior = rng == "torch" if sample_posterior is None else sample_posterior
        rng, model, batch, schedule = self._begin(s, rng, prompt, negative_prompt, num_images, clip_skip, long_prompt,
                                                  use_karras_sigmas, timestep_spacing, prediction_type, guidance_rescale)
        start = schedulers.img2img_start_index(s["steps"], strength)
        x0 = self._encode_image(to_array(img), rng, sample_posterior)               # [1, 4, h, w], scaled
        x0 = np.repeat(x0, batch, axis=0)                                          # [B, 4, h, w]
        noise = rng.standard_normal(x0.shape, dtype=np.float32) if noise is None else _check_array(noise, x0.shape, "noise")
        x = schedulers.noise_at_step(schedule, x0, noise, start)                    # x at step `start`
        x = self._sample(model, x, schedule, rng, start, eta, callback, progress)
        return self._output(x, output_type)

    def inpaint(self, prompt, image, mask_image, strength=1.0, negative_prompt="", num_inference_steps=None,
                guidance_scale=None, height=None, width=None, seed=None, sampler=None, latents=None,
                noise=None, num_images=1, output_type="pil", callback=None, eta=0.0, use_karras_sigmas=False,
                timestep_spacing=None, clip_skip=None, long_prompt="truncate", sample_posterior=None,
                mask_blur=0, rng="numpy", prediction_type=None, guidance_rescale=0.0, progress=False):
        """Repaint the white part of mask_image.

        With a 4-channel (ordinary) checkpoint: the course's method (RePaint-style blending, as
        diffusers' StableDiffusionInpaintPipeline does): after every step the kept region of the
        latents is replaced by the original image's latents noised to the next step's level. With a
        9-channel inpainting checkpoint: the UNet also reads the mask and the masked image's latents
        (concatenated to its input). strength 1 starts from pure noise; < 1 from the image noised to
        the step that strength selects. latents (strength 1) / noise (strength < 1): the initial
        noise, as in txt2img / img2img. mask_blur: a Gaussian blur radius in pixels applied to the
        mask; the blurred mask's soft values then weight the blending. sample_posterior, rng: as in
        img2img.
        """
        _check_strength(strength)
        img = open_image(image)
        s = self._settings(num_inference_steps, guidance_scale, height, width, sampler, output_type, seed, img)
        resources.check_request(self, prompt, num_images, s)                        # refuse what cannot fit
        img = fit_size(img, s["height"], s["width"])
        mask_img = fit_size(open_image(mask_image, "mask"), s["height"], s["width"], "mask")
        nine = self.unet_in_channels == self.latent_channels * 2 + 1
        if not nine and self.unet_in_channels != self.latent_channels:
            raise NpsdError(f"a UNet with {self.unet_in_channels} input channels is neither an ordinary "
                            f"({self.latent_channels}) nor an inpainting ({2 * self.latent_channels + 1}) model")
        f = self.vae_factor
        pixels = to_array(img)                                                     # [1, 3, H, W]
        mask_px = mask_to_array(mask_img, mask_blur)                               # [1, 1, H, W], 1 = repaint
        mask = mask_px[:, :, ::f, ::f]                                             # [1, 1, h, w] (nearest)
        masked_pixels = pixels * (mask_px < 0.5)                                   # the kept region only
        masked = None                                                              # its latents, below

        def nine_channel_unet(x, t, context):                                      # the UNet also reads
            b = x.shape[0]                                                         # mask and masked image
            extra = [np.repeat(mask, b, axis=0), np.repeat(masked, b, axis=0)]
            return self.unet(np.concatenate([x] + extra, axis=1), t, context)      # [b, 9, h, w]

        diffusers_order = rng == "torch"
        sample_posterior = diffusers_order if sample_posterior is None else sample_posterior
        rng, model, batch, schedule = self._begin(s, rng, prompt, negative_prompt, num_images, clip_skip, long_prompt,
                                                  use_karras_sigmas, timestep_spacing, prediction_type,
                                                  guidance_rescale, nine_channel_unet if nine else None)
        start = schedulers.img2img_start_index(s["steps"], strength)
        pure_noise = start == 0 and strength == 1.0
        # diffusers does not encode the image for a 9-channel UNet that starts from pure noise
        x0 = self._encode_image(pixels, rng, sample_posterior and not (diffusers_order and nine and pure_noise))
        if nine and not diffusers_order:
            masked = self._encode_image(masked_pixels, rng, sample_posterior)     # [1, 4, h, w]
        x0 = np.repeat(x0, batch, axis=0)                                          # [B, 4, h, w]
        shape = x0.shape
        if pure_noise:
            eps0 = rng.standard_normal(shape, dtype=np.float32) if latents is None else _check_array(latents, shape, "latents")
            x = eps0 * np.float32(schedule.init_noise_sigma)                        # pure noise
            noise = eps0 if noise is None else _check_array(noise, shape, "noise")
        else:
            noise = rng.standard_normal(shape, dtype=np.float32) if noise is None else _check_array(noise, shape, "noise")
            x = schedulers.noise_at_step(schedule, x0, noise, start)
        if diffusers_order:             # diffusers encodes the masked image now, even for a 4-channel UNet
            if nine:
                masked = self._encode_image(masked_pixels, rng, sample_posterior)
            elif sample_posterior:
                rng.standard_normal(shape[1:], dtype=np.float32)[None]            # drawn and not used

        def keep_known(i, t, x, x0_pred):
            if nine:
                return None
            # the kept region: the original latents noised to the level of the next step
            known = schedulers.noise_at_step(schedule, x0, noise, i + 1)           # [B, 4, h, w]
            return (1 - mask) * known + mask * x

        x = self._sample(model, x, schedule, rng, start, eta, callback, progress, keep_known)
        return self._output(x, output_type)

    # --- the pieces of the loops ----------------------------------------------------------------

    def _settings(self, steps, guidance, height, width, sampler, output_type, seed, image=None):
        """Fill None with the model's defaults and check every value; one-line errors."""
        d = self.config.get("defaults", {})
        if image is not None and (height is None or width is None):
            ih, iw = default_size(image)
            height, width = height or ih, width or iw
        steps = d.get("num_inference_steps", 50) if steps is None else steps
        guidance = d.get("guidance_scale", 7.5) if guidance is None else guidance
        height = d.get("height", 512) if height is None else height
        width = d.get("width", 512) if width is None else width
        sampler = d.get("sampler", "ddim") if sampler is None else sampler
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"num_inference_steps must be a whole number >= 1, got {steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating, np.integer)) \
                or not math.isfinite(guidance) or guidance < 0:
            raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
        f = self.vae_factor
        smallest = f * 2 ** (len(self.params["unet"]["down_blocks"]) - 1)
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v % f or v < smallest:
                raise InputError(f"{name} must be a multiple of {f} and at least {smallest}, got {v!r}")
        schedulers.check_sampler(sampler)
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**32)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise InputError(f"seed must be a whole number in [0, 2**32), got {seed!r}")
        return {"steps": int(steps), "guidance_scale": float(guidance), "height": int(height),
                "width": int(width), "sampler": sampler, "seed": int(seed)}

    def _begin(self, s, rng, prompt, negative_prompt, num_images, clip_skip, long_prompt, use_karras_sigmas,
               timestep_spacing, prediction_type, guidance_rescale, unet=None):
        """What every generation sets up first -> (the generator, model(x, t) with guidance, batch, schedule).
        unet: the UNet call to guide (default self.unet)."""
        rng = make_rng(rng, s["seed"])
        cond, uncond, batch = self._contexts(prompt, negative_prompt, num_images, s["guidance_scale"],
                                             clip_skip, long_prompt)
        schedule = schedulers.make_schedule(s["sampler"], s["steps"], self.config, use_karras_sigmas,
                                            timestep_spacing, prediction_type=prediction_type)
        model = guided_model(unet or self.unet, cond, uncond, s["guidance_scale"], guidance_rescale)
        return rng, model, batch, schedule

    def _contexts(self, prompt, negative_prompt, num_images, guidance_scale, clip_skip, long_prompt):
        """Encode prompt and negative prompt -> (cond [B, L, D], uncond [B, L, D] or None, B).

        B = number of prompts * num_images (each prompt's images are consecutive, as in diffusers)."""
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one or one per prompt")
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise InputError(f"num_images must be a whole number >= 1, got {num_images!r}")
        guided = uses_guidance(guidance_scale)
        if long_prompt == "truncate":
            ids, neg_ids = self.tokenizer(prompts), (self.tokenizer(negatives) if guided else None)
        elif long_prompt == "chunk":
            # both sides get the same number of 77-token chunks, so that they can be batched
            k = max(self.tokenizer.chunked(prompts).shape[1], self.tokenizer.chunked(negatives).shape[1]) // 77
            ids = self.tokenizer.chunked(prompts, num_chunks=k)
            neg_ids = self.tokenizer.chunked(negatives, num_chunks=k) if guided else None
        else:
            raise InputError(f"long_prompt must be 'truncate' or 'chunk', got {long_prompt!r}")
        cond = np.repeat(self.encode_text(ids, clip_skip), num_images, axis=0)     # [B, L, D]
        uncond = np.repeat(self.encode_text(neg_ids, clip_skip), num_images, axis=0) if guided else None
        return cond, uncond, cond.shape[0]

    def _sample(self, model, x, schedule, rng, start, eta, callback, progress, after_step=None):
        """Run the sampler; stops with a clear error as soon as the latents stop being finite.
        after_step(i, t, x, x0_pred) -> array or None replaces the state after every step, and
        between the two stages of a two-stage sampler (as diffusers' inpainting does)."""
        n = schedule.num_inference_steps
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n - start, unit="step", leave=False)

        def each_step(i, t, x, x0_pred):
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
                                         between_stages=mid)
        finally:
            if bar is not None:
                bar.close()

    def _encode_image(self, pixels, rng, sample_posterior):
        """[1, 3, H, W] in [-1, 1] -> scaled latents [1, 4, h, w]: the posterior mean, or a sample."""
        mean, logvar = self.vae_encode(pixels)
        if sample_posterior:
            mean = vae.sample(mean, logvar, rng.standard_normal(mean.shape, dtype=np.float32))
        return mean * np.float32(self.scaling_factor)

    def _output(self, latents, output_type):
        if output_type == "latent":
            return latents
        images = postprocess(self.vae_decode(latents / np.float32(self.scaling_factor)))   # [B, H, W, 3]
        if output_type == "np":
            return images
        pil = to_pil(images)
        return pil[0] if len(pil) == 1 else pil


def _as_prompt_list(prompt, what):
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return list(prompts)


def _check_strength(strength):
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
            or not 0 < strength <= 1:
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}")


def _check_array(a, shape, what):
    a = np.asarray(a, dtype=np.float32)
    if a.shape != tuple(shape):
        raise InputError(f"{what} must have shape {tuple(shape)}, got {a.shape}")
    return a
