"""Hires. fix: AUTOMATIC1111's two-pass txt2img.

A model draws best near the size it was trained at (512x512 for SD v1.x); asked for 1024x1024 at
once it repeats its subject. A1111's "Hires. fix" makes the image at the trained size first, then
enlarges the latents and runs img2img on them at the larger size:

    x0 = txt2img(prompt, H x W)                           first pass, latents [B, 4, H/8, W/8]
    x0' = interpolate(x0, (int(s H) // 8, int(s W) // 8))  the latent upscaler, s = scale
    x  = img2img(prompt', x0', strength, steps)            fresh noise from the seed, the same sampler

"Hires resize" (resize=(W', H')) asks for a size instead of a scale: the first pass is enlarged to
cover W' x H' with its own aspect ratio, and the latents are cropped to the middle (A1111's
calculate_target_resolution and its truncate_x/y). prompt' is the first pass's prompt unless a
"Hires prompt" (and "Hires negative prompt") is given.

The upscalers here are A1111's latent ones: torch.nn.functional.interpolate on the latents with the
mode it names (A1111's modules/shared.py latent_upscale_modes), written out below; and its image
upscalers without a network, "Lanczos", "Nearest" and "None" (modules/upscaler.py, upscale_image
below): the first pass is decoded to A1111's 8-bit image, enlarged with PIL and encoded again (the
posterior's mean; A1111 samples it from torch's unseeded global generator). Its other image
upscalers (ESRGAN and the like) are networks npsd does not have. The second pass takes its noise
from a fresh generator of the image's seed, as A1111 does, and starts where A1111's img2img starts
(npsd.schedulers.start_index).
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InputError, is_number, is_whole
from .schedulers import SAMPLERS, SCHEDULE_TYPES
from .tome import check_ratio

# npsd's name -> (A1111's label in "Hires upscaler", torch's interpolate mode; "-aa": antialias=True).
# "Latent (antialiased)" is torch's antialiased bilinear, which for enlarging equals the plain one
# (tests/test_hires.py); the antialiased bicubic is another kernel (PIL's)
UPSCALERS = {"latent": ("Latent", "bilinear"), "latent_antialiased": ("Latent (antialiased)", "bilinear"),
             "latent_bicubic": ("Latent (bicubic)", "bicubic"),
             "latent_bicubic_antialiased": ("Latent (bicubic antialiased)", "bicubic-aa"),
             "latent_nearest": ("Latent (nearest)", "nearest"),
             "latent_nearest_exact": ("Latent (nearest-exact)", "nearest-exact"),
             "lanczos": ("Lanczos", "image"), "nearest": ("Nearest", "image"), "none": ("None", "image")}
LATENT_UPSCALERS = tuple(name for name, (_, mode) in UPSCALERS.items() if mode != "image")
CUBIC_A = -0.75                 # the cubic convolution kernel's a (Keys 1981), as torch's bicubic
CUBIC_A_AA = -0.5               # ... and as PIL's, which torch's antialiased bicubic follows
STRENGTH = 0.7                  # A1111's default denoising strength of the second pass
SCALE = 2.0                     # A1111's default hr_scale
MAX_RESIZE = 16384              # the largest side "Hires resize" takes, in pixels


LABELS = ", ".join(label for label, _ in UPSCALERS.values())              # for messages


def upscaler_named(label):
    """A1111's "Hires upscaler" label (any case) -> npsd's name in UPSCALERS, or None."""
    return {lab.lower(): name for name, (lab, _) in UPSCALERS.items()}.get(label.strip().lower())


@dataclass(frozen=True)
class Hires:
    """The second pass of a txt2img call (Pipeline.txt2img(hires=...)).

    scale     the enlargement, >= 1: the image is int(scale H) x int(scale W), rounded down to the VAE's factor
    upscaler  one of UPSCALERS
    steps     the second pass's steps; 0: as many as the first pass (A1111's "Hires steps" 0)
    strength  how much the second pass redraws, in [0, 1] (A1111's "Denoising strength")
    resize    (width, height) instead of scale (A1111's "Hires resize"): enlarge to cover that size
              and crop the middle; one of them 0: that side follows the image's aspect ratio
    sampler, schedule_type
              the second pass's sampler and A1111 schedule type (A1111's "Hires sampler", "Hires
              schedule type"); None: the first pass's (its schedule type resolved for this sampler)
    prompt, negative_prompt
              the second pass's (A1111's "Hires prompt", "Hires negative prompt"); None: the first
              pass's (A1111's empty text; here "" is the empty prompt). A str for every prompt, or
              a list with one per prompt
    token_merging_ratio
              the second pass's ToMe ratio in [0, 0.9] (A1111's "Token merging ratio hr"; npsd/tome.py);
              None: the first pass's. 0 turns merging off in this pass, which A1111 cannot do (its 0
              means the first pass's), so an image made so reads back from its PNG with the first's
    checkpoint
              the npsd.Pipeline whose text encoder, UNet and VAE run the second pass (A1111's "Hires
              checkpoint": its VAE encodes the enlarged image of an image upscaler and decodes the
              result); None: the first pass's model (A1111's "Use same checkpoint")
    checkpoint_name
              what the PNG's "Hires checkpoint" field calls it (A1111: "NAME [hash]"); None: left out
    """
    scale: float = SCALE
    upscaler: str = "latent"
    steps: int = 0
    strength: float = STRENGTH
    resize: tuple = None
    prompt: object = None
    negative_prompt: object = None
    sampler: str = None
    schedule_type: str = None
    token_merging_ratio: float = None
    checkpoint: object = None
    checkpoint_name: str = None

    def __post_init__(self):
        if self.checkpoint is not None and not (hasattr(self.checkpoint, "unet") and hasattr(self.checkpoint, "params")):
            raise InputError(f"hires checkpoint must be an npsd.Pipeline (npsd.load(PATH)) or None, got "
                             f"{type(self.checkpoint).__name__}")
        if self.resize is not None:
            check_resize(self.resize)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise InputError(f"unknown hires sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.schedule_type is not None and self.schedule_type not in SCHEDULE_TYPES:
            raise InputError(f"unknown hires schedule_type {self.schedule_type!r}; use one of {', '.join(SCHEDULE_TYPES)}")
        for name in ("prompt", "negative_prompt"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str) and not (
                    isinstance(v, (list, tuple)) and v and all(isinstance(t, str) for t in v)):
                raise InputError(f"hires {name} must be a str, a list of str or None, got {type(v).__name__}")
        if not is_number(self.scale) or not 1.0 <= float(self.scale) <= 8.0:
            raise InputError(f"hires scale must be a number from 1 to 8, got {self.scale!r}")
        if self.upscaler not in UPSCALERS:
            raise InputError(f"unknown hires upscaler {self.upscaler!r}; use one of {', '.join(UPSCALERS)}")
        if not is_whole(self.steps) or self.steps < 0:
            raise InputError(f"hires steps must be a whole number >= 0 (0: as the first pass), got {self.steps!r}")
        if not is_number(self.strength) or not 0.0 <= float(self.strength) <= 1.0:
            raise InputError(f"hires strength must be between 0 and 1, got {self.strength!r}")
        if self.token_merging_ratio is not None:
            check_ratio(self.token_merging_ratio, "hires token_merging_ratio")

    def second_steps(self, first_steps, a1111_start):
        """The second pass's steps; refused when it would run none (diffusers' img2img start, which
        runs int(steps * strength); A1111's start, a1111_start, runs one more)."""
        steps = self.steps or first_steps
        if not a1111_start and int(steps * self.strength) == 0:
            raise InputError(f"the hires pass's strength {self.strength} with {steps} steps runs no step "
                             f"(int(steps * strength) = 0); raise the hires strength or steps")
        return steps

    def upscaled(self, height, width):
        """The size (height, width) the first pass is enlarged to (A1111's hr_upscale_to_y/x): int(scale
        * side), or with resize the smallest of the image's aspect ratio that covers it."""
        if self.resize is None:
            return int(height * self.scale), int(width * self.scale)
        rw, rh = self.resize
        if rh == 0 or (rw != 0 and width / height < rw / rh):
            return rw * height // width, rw                        # the width fits, the height overhangs
        return rh, rh * width // height

    def crop(self, height, width, factor):
        """The latent rows and columns (y, x) cut from the enlarged latents, half from each end (the
        extra at the end): what overhangs the resize size (A1111's truncate_y/x); (0, 0) without one."""
        if self.resize is None or 0 in self.resize:
            return 0, 0
        uh, uw = self.upscaled(height, width)
        return (uh - self.resize[1]) // factor, (uw - self.resize[0]) // factor

    def size(self, height, width, factor):
        """The second pass's image size: the enlarged size in whole latents (A1111 interpolates to
        side // 8 latents), less the crop."""
        (uh, uw), (ch, cw) = self.upscaled(height, width), self.crop(height, width, factor)
        return (uh // factor - ch) * factor, (uw // factor - cw) * factor


def check_resize(resize):
    """A "Hires resize" (width, height), checked: whole numbers from 0 to MAX_RESIZE, not both 0."""
    if not (isinstance(resize, (tuple, list)) and len(resize) == 2
            and all(is_whole(v) and 0 <= v <= MAX_RESIZE for v in resize) and any(resize)):
        raise InputError(f"hires resize must be (width, height), whole numbers from 0 to {MAX_RESIZE} (0: from the "
                         f"other side and the aspect ratio), not both 0, got {resize!r}")
    return tuple(resize)


def _source(out_size, in_size, mode):
    """For each output index along one axis: the source coordinate, as torch's interpolate with
    align_corners=False computes it (scale = in / out)."""
    scale = np.float32(in_size / out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if mode == "nearest":
        return np.minimum(np.floor(dst * scale), in_size - 1).astype(np.int64)
    if mode == "nearest-exact":
        return np.minimum(np.floor((dst + np.float32(0.5)) * scale), in_size - 1).astype(np.int64)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)                    # [out] pixel centres
    return np.maximum(src, 0) if mode == "bilinear" else src                  # (bicubic reads past the edge)


def _cubic(x, a):
    """The cubic convolution kernel (Keys 1981) at distances x >= 0 (0 from 2 on)."""
    near = ((a + 2) * x - (a + 3)) * x * x + 1                                 # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a                            # 1 < |x| < 2
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _cubic_weights(t):
    """Cubic convolution weights of the 4 neighbours (offsets -1, 0, 1, 2) at fraction t [out] -> [out, 4]."""
    return np.stack([_cubic(np.abs(d), CUBIC_A) for d in (t + 1, t, 1 - t, 2 - t)], axis=-1)


def _antialiased_cubic_matrix(out_size, in_size):
    """torch's antialiased bicubic (PIL's resampling) as a matrix [out, in]: output i is the average of
    the inputs within 2 max(in / out, 1) of its centre (i + 0.5) in / out, weighted by the cubic
    kernel (a = -0.5) of the distance (scaled by out / in when shrinking), the weights normalised."""
    scale = in_size / out_size
    support, step = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    centre = scale * (np.arange(out_size) + 0.5)                               # [out]
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)          # the window [first, last)
    last = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    j = np.arange(in_size)                                                     # [in]
    w = _cubic(np.abs((j[None, :] + 0.5 - centre[:, None]) * step), CUBIC_A_AA)  # [out, in]
    w = w * ((j[None, :] >= first[:, None]) & (j[None, :] < last[:, None]))
    return w / w.sum(axis=1, keepdims=True)


def _resize_axis(x, out_size, axis, mode):
    """Interpolate x along one axis to out_size."""
    in_size = x.shape[axis]
    if mode == "bicubic-aa":
        out = np.tensordot(np.moveaxis(x, axis, -1), _antialiased_cubic_matrix(out_size, in_size).T, axes=1)
        return np.moveaxis(out, -1, axis).astype(np.float32)
    src = _source(out_size, in_size, mode)
    if mode in ("nearest", "nearest-exact"):
        return np.take(x, src, axis=axis)
    i0 = np.floor(src).astype(np.int64)                                        # [out]
    t = (src - i0).astype(np.float32)
    x = np.moveaxis(x, axis, -1)                                               # [..., in]
    if mode == "bilinear":
        i1 = np.minimum(i0 + 1, in_size - 1)
        out = x[..., i0] * (1 - t) + x[..., i1] * t                            # [..., out]
    else:                                                                      # bicubic
        w = _cubic_weights(t).astype(np.float32)                               # [out, 4]
        out = sum(x[..., np.clip(i0 + k - 1, 0, in_size - 1)] * w[:, k] for k in range(4))
    return np.moveaxis(out, -1, axis)


def upscale_latents(x, height, width, upscaler="latent"):
    """Latents [B, C, h, w] -> [B, C, height, width] with one of LATENT_UPSCALERS (torch's interpolate,
    align_corners=False: separable, first along the height, then the width)."""
    if upscaler not in LATENT_UPSCALERS:
        raise InputError(f"unknown latent upscaler {upscaler!r}; use one of {', '.join(LATENT_UPSCALERS)}")
    mode = UPSCALERS[upscaler][1]
    x = _resize_axis(np.asarray(x, dtype=np.float32), int(height), 2, mode)
    return np.ascontiguousarray(_resize_axis(x, int(width), 3, mode), dtype=np.float32)


def upscale_image(img, width, height, upscaler):
    """A PIL image at width x height with one of A1111's image upscalers without a network, as its
    resize_image(0, img, width, height, upscaler) does: "none" is one Lanczos resize; "lanczos" and
    "nearest" (Upscaler.upscale), when enlarging by s = max(width / w, height / h), resize with their
    filter to int(s w) x int(s h) unless the image already covers that rounded down to multiples of
    8, then with Lanczos to that rounded size and to width x height, each only where the size still
    differs."""
    if upscaler == "none":
        return img.resize((width, height), Image.LANCZOS)
    scale = max(width / img.width, height / img.height)
    if scale > 1.0:
        filt = Image.LANCZOS if upscaler == "lanczos" else Image.NEAREST
        dest = (int(img.width * scale) // 8 * 8, int(img.height * scale) // 8 * 8)
        if img.width < dest[0] or img.height < dest[1]:
            img = img.resize((int(img.width * scale), int(img.height * scale)), filt)
        if img.size != dest:
            img = img.resize(dest, Image.LANCZOS)
    return img if img.size == (width, height) else img.resize((width, height), Image.LANCZOS)
