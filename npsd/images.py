"""Images in and out: PIL <-> float32 arrays, masks, sizes; PNG files written whole; the filmstrip.

Pixel arrays inside npsd are float32 [B, 3, H, W] in [-1, 1] (what the VAE reads and writes).
"""

import glob
import os
import tempfile
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from .errors import InputError, UsageError


def from_array(a, what="image"):
    """A pixel array -> a PIL image: [H, W], [H, W, C] (C = 1, 3 or 4) or one image [1, H, W, C];
    uint8 as it is, floats in [0, 1] as diffusers' image processor and npsd's output_type="np" have
    them, bool (a mask) as black and white."""
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or min(a.shape[:2], default=0) < 1:
        raise InputError(f"{what} array must be [H, W] or [H, W, 3] (or 4 channels), got shape {a.shape}")
    if a.dtype == np.uint8:
        return Image.fromarray(a)
    if a.dtype == bool:                                                # a mask: True is white
        return Image.fromarray(a.astype(np.uint8) * np.uint8(255))
    if a.dtype.kind != "f" or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise InputError(f"{what} array must be uint8, or floats in [0, 1], got {a.dtype} "
                         f"values from {a.min()} to {a.max()}")
    return Image.fromarray(np.round(a * 255).astype(np.uint8))


def open_image(image, what="image", keep_alpha=False):
    """A path, a file object, a PIL image or a pixel array (from_array) -> an RGB PIL image
    (a file's turned upright by its EXIF orientation; grayscale, RGBA, palette and 16-bit are
    converted; transparent pixels become white, or with keep_alpha an image with transparency is
    returned as RGBA)."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = from_array(image, what)
    elif not isinstance(image, (str, bytes, os.PathLike)) and not hasattr(image, "read"):
        raise InputError(f"{what} must be a file path, a PIL image or a pixel array [H, W, 3], "
                         f"got {type(image).__name__}")
    else:
        img = None
        try:
            img = Image.open(image)
            img.load()
        except FileNotFoundError:
            raise InputError(f"{what} file not found: {image}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # bomb: > 179 Mpixels
            if img is not None:
                img.close()                                         # no open file left behind
            raise InputError(f"cannot read {what} {image}: {e}; give a PNG or JPEG file") from None
        opened, img = img, upright(img)                             # (an animation: its first frame)
        if isinstance(image, (str, bytes, os.PathLike)):
            img = opened.copy() if img is opened else img
            opened.close()                  # an animated GIF, APNG or TIFF keeps its file open after load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):                 # 16/32-bit grayscale -> 8-bit
        a = np.asarray(img, dtype=np.float64)                       # 65535 is white (a 16-bit PNG's,
        top = 65535 if a.max() <= 65535 else a.max()                # also as older Pillows' mode I)
        img = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        if keep_alpha:
            return img
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)                # transparent pixels become white
    return img.convert("RGB")


def upright(img):
    """A file's image as viewers show it: turned by its EXIF Orientation tag (a phone's JPEG stores the
    sensor's rows and says how to turn them), as diffusers' load_image does; an image without the tag,
    or with an EXIF block Pillow cannot read, as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:                                   # noqa: BLE001 - a broken EXIF block: the pixels as stored
        return img


RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")   # A1111's resize_mode 0, 1, 2


def resize_to(img, width, height, mode="just resize"):
    """A PIL image at width x height, with PIL's Lanczos filter, in one of A1111's resize modes
    (modules/images.py, resize_image; diffusers' VaeImageProcessor.resize "default", "crop", "fill"):
    "just resize" stretches it; "crop and resize" scales it to cover width x height, centred, and
    cuts the overhang; "resize and fill" scales it to fit inside, centred, and fills the bands left
    over by stretching its edge rows or columns."""
    if mode == "just resize":
        return img.resize((width, height), Image.LANCZOS)
    w, h = _fitted(img, width, height, inside=mode == "resize and fill")
    small = img.resize((w, h), Image.LANCZOS)
    out = Image.new(img.mode, (width, height))
    out.paste(small, box=(width // 2 - w // 2, height // 2 - h // 2))
    if mode == "crop and resize":
        return out
    band = height // 2 - h // 2
    if width / height < img.width / img.height and band > 0:         # bands above and below
        out.paste(small.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(small.resize((width, band), box=(0, h, width, h)), box=(0, band + h))
    band = width // 2 - w // 2
    if width / height > img.width / img.height and band > 0:         # bands left and right
        out.paste(small.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(small.resize((band, height), box=(w, 0, w, height)), box=(band + w, 0))
    return out


def _fitted(img, width, height, inside):
    """The size of img scaled to width or height (the other side by its ratio, rounded down, at least
    1 pixel: A1111 fails where it rounds to 0): the one that fits inside width x height, or (not
    inside) the one that covers it."""
    ratio, own = width / height, img.width / img.height
    if (ratio < own) if inside else (ratio > own):
        return width, max(img.height * width // img.width, 1)
    return max(img.width * height // img.height, 1), height


def fit_size(img, height, width, what="image", resample=True, mode="just resize"):
    """Resize to (width, height) when the size differs (resize_to's mode), with a note (a warning);
    resample=False: the note only (the caller resizes later)."""
    if img.size != (width, height):
        warnings.warn(f"{what} of size {img.size[0]}x{img.size[1]} resized to {width}x{height}", stacklevel=3)
        img = resize_to(img, width, height, mode) if resample else img
    return img


def default_size(img):
    """An image's size rounded down to multiples of 8: (height, width)."""
    w, h = img.size
    return h - h % 8, w - w % 8


def to_array(img):
    """RGB PIL image -> float32 [1, 3, H, W] in [-1, 1]  (x / 255 * 2 - 1, as diffusers does)."""
    a = np.asarray(img, dtype=np.float32) / 255.0                  # [H, W, 3] in [0, 1]
    return (2.0 * a - 1.0).transpose(2, 0, 1)[None]


def mask_to_array(mask, blur=0):
    """Mask image -> float32 [1, 1, H, W] of 0 and 1 (white, >= 0.5, means "repaint").

    blur > 0 applies a Gaussian blur of that radius before binarising (softens the mask's edge)."""
    m = mask.convert("L")
    if blur:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(m, dtype=np.float32) / 255.0
    if np.any((a > 0.02) & (a < 0.98)):
        warnings.warn("the mask is not binary: pixels >= 0.5 are repainted, the rest kept", stacklevel=3)
    a = (a >= 0.5).astype(np.float32)
    if a.max() == 0:
        warnings.warn("the mask is all black: nothing will be repainted", stacklevel=3)
    elif a.min() == 1:
        warnings.warn("the mask is all white: the whole image will be repainted", stacklevel=3)
    return a[None, None]


def to_uint8(images, truncate=False):
    """float32 [B, H, W, 3] in [0, 1] -> uint8: 255 x rounded to the nearest (diffusers' numpy_to_pil)
    or, truncate, rounded down (A1111 saves its images so: modules/processing.py)."""
    return (images * 255).astype(np.uint8) if truncate else (images * 255).round().astype(np.uint8)


def to_pil(images, truncate=False):
    """float32 [B, H, W, 3] in [0, 1] -> list of PIL images (8 bits: to_uint8)."""
    return [Image.fromarray(im) for im in to_uint8(images, truncate)]


def postprocess(decoded):
    """VAE output [B, 3, H, W] in about [-1, 1] -> float32 [B, H, W, 3] in [0, 1]."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)


def write_png_atomic(image, path, parameters, overwrite):
    """Save a PIL image as PNG with its "parameters" chunk (npsd/pngmeta.py), atomically (write_atomic)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            from .pngmeta import png_info               # (here: pngmeta imports what imports this module)
            image.save(f, format="PNG", pnginfo=png_info(parameters))
    write_atomic(path, write, overwrite)


def write_atomic(path, write, overwrite=True):
    """write(temporary_path) writes a whole file into a temporary file in the same folder, which then
    replaces `path` (os.replace), so the path holds either nothing/the old file or the whole new
    file, never a part (a full disk, Ctrl-C). Without `overwrite`, a file that appeared at `path`
    meanwhile is kept."""
    path = os.path.abspath(path)
    prefix, suffix = _part_affixes(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)             # mkstemp makes 0600 files; give the usual mode
        if not overwrite and os.path.exists(path):
            raise UsageError(f"{path} appeared while npsd was running; use --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _part_affixes(path):
    """The start and end of the name of write_atomic's temporary file for `path` in this process."""
    return f".{os.path.basename(path)}.{os.getpid()}.", ".part"


def leftover_parts(path):
    """Temporary files of write_atomic for `path` that this process left behind: an interrupt
    that comes between the file's creation and the handler that removes it leaves one."""
    prefix, suffix = _part_affixes(path)
    folder = os.path.dirname(os.path.abspath(path))
    return glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*" + glob.escape(suffix)))


def filmstrip(rows, labels, height=128):
    """The denoising filmstrip. rows: one list of PIL images per generated image (the saved x0
    predictions, then the result); labels: one per column. -> one image, frames scaled to `height`
    pixels, labelled."""
    w0, h0 = rows[0][0].size
    h = min(height, h0)
    w = max(1, round(w0 * h / h0))
    pad = 2
    sheet = Image.new("RGB", (len(rows[0]) * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, frames in enumerate(rows):
        for c, frame in enumerate(frames):
            x, y = pad + c * (w + pad), pad + r * (h + pad)
            sheet.paste(frame.resize((w, h), Image.LANCZOS) if frame.size != (w, h) else frame, (x, y))
            if r == 0 and h >= 24:
                draw.rectangle([x, y, x + 6 * len(labels[c]) + 3, y + 11], fill=(0, 0, 0))
                draw.text((x + 2, y), labels[c], fill=(255, 255, 255))
    return sheet


def heat_overlay(image, heat, label):
    """A PIL image with a heat map [h, w] (any scale; normalised to its max) blended over it in red
    (nearest-upscaled to the image size), and a label in the corner: how attention maps are shown."""
    from PIL import Image, ImageDraw
    heat = np.maximum(np.asarray(heat, dtype=np.float32), 0)
    heat = heat / heat.max() if heat.max() > 0 else heat                     # [h, w] in [0, 1]
    w, h = image.size
    mask = Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255 * 0.7        # [H, W, 1]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    red = np.array([255, 0, 0], dtype=np.float32)
    out = Image.fromarray(np.clip(base * (1 - alpha) + red * alpha, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    draw.rectangle([0, 0, 6 * len(label) + 3, 11], fill=(0, 0, 0))
    draw.text((2, 0), label, fill=(255, 255, 255))
    return out
