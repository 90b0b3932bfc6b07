"""AUTOMATIC1111's inpainting: what npsd's `Pipeline.inpaint` does with one of A1111's schedule types
(schedule_type=...), as A1111 1.10's modules/processing.py (StableDiffusionProcessingImg2Img),
modules/masking.py and modules/sd_samplers_cfg_denoiser.py do it:

1. The mask: its gray level (white repaints), or for a mask with transparency its alpha channel,
   255 above 128 and 0 below. mask_blur > 0 blurs it as OpenCV's GaussianBlur blurs an 8-bit
   image, sigma = mask_blur over 2 int(2.5 sigma + 0.5) + 1 taps, across and then down, each pass
   rounded to 8 bits (`blur_mask`), and it is resized to the run's size as the image is
   (resize_mode): the soft mask m in [0, 255]. "Only masked" (inpaint_area) runs on a crop instead: the box around m's nonzero
   pixels, `masked_area_padding` pixels wider, grown to the run's ratio (`crop_region`), cut from the
   image and the mask and scaled to the run's size ("resize and fill": npsd.images.resize_to).
2. The latent mask: m resized to the latents' size with PIL's bicubic filter, / 255, rounded to 0
   or 1: 1 repaints (A1111's nmask), 0 keeps (its mask).
3. The masked region's start ("Masked content", `MASKED_CONTENT`): the image itself ("original"),
   or the image with its masked part painted over from blurred copies of the rest (`fill`) before
   it is encoded ("fill"), and then, in the latents, the seed's noise ("latent noise") or zeros
   ("latent nothing") there.
4. Every model evaluation's denoised latents x0 are blended with the image's latents z:
   x0 <- keep z + repaint x0 (A1111's CFGDenoiser), and so are the final latents.
5. The decoded image is made 8-bit by truncation (floor(255 x), as A1111 saves), and the input
   image is pasted back over it with the opacity 255 - min(2 m, 255) (`paste_back`): the kept region
   stays the input's pixels exactly, the blurred edge fades between the two. "Only masked" scales
   the result back into its box of the whole image first ("crop and resize"), with the opacity 255 - m.

A 9-channel inpainting UNet reads round(m / 255) at every f-th pixel (f the VAE's factor) and the
latents of the image with the repainted region zeroed, and gets steps 4 and 5 as well.
"""

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import InputError, is_whole
from .images import resize_to

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")    # A1111's inpainting_fill 0..3
MAX_BLUR = 256             # sigma; the blur's cost grows with it (5 sigma taps), and by then the mask is flat
INPAINT_AREAS = ("whole picture", "only masked")                           # A1111's inpaint_full_res False, True


def check(masked_content, inpaint_area, padding, blur):
    """The A1111-only arguments of inpaint, checked (blur: mask_blur, already a whole number >= 0)."""
    if blur > MAX_BLUR:
        raise InputError(f"mask_blur {blur} is more than A1111's inpainting blurs here ({MAX_BLUR}); give at most "
                         f"{MAX_BLUR}")
    if masked_content not in MASKED_CONTENT:
        raise InputError(f"masked_content must be one of {', '.join(repr(m) for m in MASKED_CONTENT)}, "
                         f"got {masked_content!r}")
    if inpaint_area not in INPAINT_AREAS:
        raise InputError(f"inpaint_area must be one of {', '.join(repr(a) for a in INPAINT_AREAS)}, got {inpaint_area!r}")
    if not is_whole(padding) or padding < 0:
        raise InputError(f"masked_area_padding must be a whole number of pixels >= 0, got {padding!r}")


def prepare(image, mask_img, blur, inpaint_area, padding, height, width, resize_mode="just resize"):
    """Step 1 and, "only masked", A1111's crop -> (image, m, paste): the image (RGB PIL) and its soft
    mask m (uint8) at height x width, to run on, and paste(uint8 [B, height, width, 3]) -> uint8
    [B, H', W', 3], step 5's paste-back. image: at height x width for "whole picture", at its own
    size for "only masked": the box around the mask (crop_region) is cut out and scaled to height x
    width ("resize and fill"), and paste puts the result back into the whole image."""
    m = soft_mask(mask_img, blur)
    if inpaint_area == "whole picture":                     # (the image is already at height x width)
        m = _resized(m, height, width, resize_mode)
        return image, m, lambda out: np.stack([paste_back(o, image, m) for o in out])
    m = _resized(m, image.height, image.width, "just resize")
    box = crop_region(m, padding, height, width)
    if box is None:
        raise InputError("the mask is all black: 'only masked' has no region to repaint; paint the region white")
    crop = resize_to(image.crop(box), width, height, "resize and fill")
    crop_m = np.asarray(resize_to(Image.fromarray(m).crop(box), width, height, "resize and fill"))
    return crop, crop_m, lambda out: np.stack([paste_back(o, image, m, box) for o in out])


def blur_kernel(sigma):
    """OpenCV's Gaussian kernel for 8-bit images (getGaussianKernelBitExact, then
    getGaussianKernelFixedPoint_ED): exp(-x^2 / (2 sigma^2)) over n = 2 int(2.5 sigma + 0.5) + 1
    taps, normalised, in 1/256ths, rounded from the outside in with the rounding error carried to
    the next tap, the centre taking what makes the sum exactly 256 -> int64 [n]."""
    n = 2 * int(2.5 * sigma + 0.5) + 1
    half = n // 2
    x = np.arange(half, 0, -1.0)                                       # distances of the outer taps
    g = np.exp(-x * x / (2.0 * sigma * sigma))
    g = g / (2 * g.sum() + 1)                                          # the centre's value is 1
    taps, carry = np.zeros(half, np.int64), 0.0
    for i in range(half):
        wanted = g[i] * 256 + carry
        taps[i] = np.rint(wanted)
        carry = wanted - taps[i]
    return np.concatenate([taps, [256 - 2 * taps.sum()], taps[::-1]])


def _blur_axis(m, kernel, axis):
    """One pass of the blur over an 8-bit image along axis, borders mirrored without repeating the
    edge pixel (OpenCV's BORDER_REFLECT_101), the sum rounded to 8 bits."""
    m = np.moveaxis(m.astype(np.int64), axis, 0)                       # [L, ...]
    size, r = m.shape[0], len(kernel) // 2
    at = np.arange(-r, size + r)
    if size > 1:
        at = np.mod(at, 2 * size - 2)
        at = np.where(at >= size, 2 * size - 2 - at, at)               # ... 2 1 | 0 1 2 ... L-1 | L-2 ...
    else:
        at = np.zeros_like(at)
    padded = m[at]                                                     # [L + 2r, ...]
    total = sum(k * padded[i:i + size] for i, k in enumerate(kernel))  # in 1/256ths
    return np.moveaxis((total + 128) >> 8, 0, axis).astype(np.uint8)


def blur_mask(mask, sigma):
    """A1111's mask blur: uint8 [H, W] -> uint8 [H, W], across then down (two cv2.GaussianBlur calls)."""
    kernel = blur_kernel(sigma)
    return _blur_axis(_blur_axis(mask, kernel, 1), kernel, 0)


def soft_mask(mask_img, blur):
    """The mask image (PIL) -> m, uint8 [H, W] at its own size: its alpha channel where it has
    transparency (255 above 128, else 0: A1111's create_binary_mask), else its gray level as it is;
    then blurred (blur_mask)."""
    if mask_img.mode == "RGBA" and mask_img.getextrema()[-1] != (255, 255):
        m = np.where(np.asarray(mask_img)[..., 3] > 128, 255, 0).astype(np.uint8)
    else:
        m = np.asarray(mask_img.convert("L"))
    return blur_mask(m, blur) if blur > 0 else m


def _resized(m, height, width, mode):
    """A mask m (uint8 [H, W]) at height x width, resized in A1111's way (npsd.images.resize_to)."""
    return m if m.shape == (height, width) else np.asarray(resize_to(Image.fromarray(m), width, height, mode))


def crop_region(m, padding, height, width):
    """"Only masked": the box (x1, y1, x2, y2) around m's nonzero pixels, `padding` pixels wider on
    every side (within the image), then widened or heightened about its centre to the ratio
    width / height (A1111's get_crop_region_v2 and expand_crop_region) -> box, or None for a black m."""
    rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    if len(rows) == 0:
        return None
    H, W = m.shape
    x1, y1 = max(cols[0] - padding, 0), max(rows[0] - padding, 0)
    x2, y2 = min(cols[-1] + 1 + padding, W), min(rows[-1] + 1 + padding, H)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:                                  # too wide: more rows
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), H)
    else:                                                              # too tall: more columns
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), W)
    return int(x1), int(y1), int(x2), int(y2)


def _widen(a, b, more, size):
    """[a, b) grown by `more` (half before, half after), shifted back inside [0, size), cut at size."""
    a, b = a - more // 2, b + more - more // 2
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def latent_mask(m, height, width):
    """m -> float32 [1, 1, height, width]: 1 repaints, 0 keeps (PIL's bicubic resize, rounded)."""
    small = np.asarray(Image.fromarray(m).resize((width, height), Image.BICUBIC), dtype=np.float32) / 255
    return np.around(small)[None, None]


def fill(image, m):
    """A1111's "fill" (modules/masking.py): the masked part of image (RGB PIL) painted over with
    blurred copies of the kept part, from a blur radius of 256 down to none."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(Image.fromarray(m)))
    out = Image.new("RGBA", image.size)
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def paste_back(generated, image, m, box=None):
    """A1111's apply_overlay: the input image (RGB PIL) over the generated one (uint8 [h, w, 3]) with
    the opacity 255 - min(2 m, 255), in PIL's premultiplied 8-bit arithmetic -> uint8 [H, W, 3].
    box ("only masked"): the generated crop is first scaled into it ("crop and resize") on a transparent
    picture of the image's size, and the opacity is 255 - m (m of the image's size)."""
    edge = m.astype(np.int64) if box is not None else np.minimum(2 * m.astype(np.int64), 255)
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=Image.fromarray((255 - edge).astype(np.uint8)))
    if box is None:
        out = Image.fromarray(generated).convert("RGBA")
    else:
        x1, y1, x2, y2 = box
        out = Image.new("RGBA", image.size)
        out.paste(resize_to(Image.fromarray(generated), x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
    out.alpha_composite(overlay.convert("RGBA"))
    return np.asarray(out.convert("RGB"))
