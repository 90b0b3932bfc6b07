"""Cheap step previews: a linear map from latents to RGB instead of a VAE decode.

A latent pixel's 4 channels already carry most of the colour of the 8x8 (SD v1.x) or 4x4 (the built-in
model) image pixels it decodes to, so one 4x3 matrix and a bias, applied per latent pixel, gives a
blurry but recognisable picture at latent resolution for the cost of a matrix product:

    rgb[y, x] = latents[:, y, x] @ factors + bias        # [4] @ [4, 3] + [3] -> [3], in VAE units [-1, 1]
    image     = clip(rgb / 2 + 0.5, 0, 1)                # as npsd.images.postprocess maps a decode

`latents` are the *scaled* latents the sampler works on (the pipeline's x0 prediction, unscaled latent
times the model's scaling_factor), as in A1111 and ComfyUI. The factors of a model are fitted by least
squares against its own VAE's decodes (`fit_latent_rgb`; for the built-in model:
`python -m npsd.train.fit_latent_rgb`, which prints the table stored below and its error).

`preview(pipe, x0, method)` draws a step's x0 prediction by one of PREVIEW_METHODS (this table, the
full VAE or TAESD) at the image size; the pipelines' `preview=` argument (`with_previews`) and the
command line's --save-steps both use it (docs/inside.md section 2).
"""

import numpy as np

from . import taesd
from .errors import InputError

# SD v1.x: the table of AUTOMATIC1111's stable-diffusion-webui "Approximate cheap" live preview
# (modules/sd_vae_approx.py, cheap_approximation, which cites the Hugging Face forum thread
# "Decoding latents to RGB without upscaling"), also ComfyUI's first latent_formats.SD15.latent_rgb_factors
# (ComfyUI later replaced it by a refit of its own). Rows: latent channels 1-4; columns: R, G, B.
# No bias. Applied to scaled latents; the output is in [-1, 1].
SD1_FACTORS = np.array([[0.298, 0.207, 0.208],
                        [0.187, 0.286, 0.173],
                        [-0.158, 0.189, 0.264],
                        [-0.184, -0.271, -0.473]], np.float32)
SD1_BIAS = np.zeros(3, np.float32)

# The built-in model (weights/npsd-tiny.safetensors): fitted by `python -m npsd.train.fit_latent_rgb`
# on 256 images of its training distribution (npsd.train.data, seed 0); mean absolute error against the
# real decode, box-averaged to latent size, on 256 other images (seed 1): BUILTIN_ERROR, in [0, 1] units.
BUILTIN_FACTORS = np.array([[0.0995, 0.0636, 1.0172],
                            [-0.1920, 1.2548, -0.8736],
                            [0.0081, 0.3662, -0.6374],
                            [0.6217, -0.1799, -0.2611]], np.float32)
BUILTIN_BIAS = np.array([0.1924, -0.6661, 0.3294], np.float32)
BUILTIN_ERROR = 0.134        # measured: 0.1342 (0.1560 on every step's x0 of 4 txt2img runs)

TABLES = {"sd-v1": (SD1_FACTORS, SD1_BIAS), "npsd-tiny": (BUILTIN_FACTORS, BUILTIN_BIAS)}

# How a step preview is drawn (`preview` below: the pipelines' preview=, npsd's --preview): "full"
# decodes with the model's VAE, "approx" uses the table above, "taesd" the tiny autoencoder
# (npsd/taesd.py, weights in pipe.taesd; --taesd). A further method is one more entry here and one
# more branch in `preview`.
PREVIEW_METHODS = ("full", "approx", "taesd")


def latent_to_rgb(latents, factors, bias=None, scale=1):
    """Scaled latents float [B, C, h, w], factors [C, 3], bias [3] (None: 0) -> float32 images
    [B, h*scale, w*scale, 3] in [0, 1]. scale > 1 repeats each pixel (nearest upscaling), e.g. to the
    image size (scale = the VAE factor)."""
    latents, factors = np.asarray(latents, np.float32), np.asarray(factors, np.float32)
    if latents.ndim != 4 or factors.shape != (latents.shape[1], 3):
        raise InputError(f"latents [B, C, h, w] and factors [C, 3] do not fit: {latents.shape}, {factors.shape}")
    rgb = np.einsum("bchw,cr->bhwr", latents, factors)                     # [B, h, w, 3], about [-1, 1]
    if bias is not None:
        rgb += np.asarray(bias, np.float32)
    images = np.clip(rgb / 2 + 0.5, 0, 1).astype(np.float32)              # [B, h, w, 3] in [0, 1]
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)        # nearest: [B, h*s, w*s, 3]
    return images


def downsample(images, factor):
    """float [B, 3, H, W] -> [B, 3, H/factor, W/factor]: the mean of each factor x factor block."""
    b, c, h, w = images.shape
    return images.reshape(b, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def fit_latent_rgb(latents, images):
    """Least squares fit of the latent -> RGB map. latents: scaled latents [B, C, h, w]; images: their
    VAE decodes [B, 3, H, W] in [-1, 1], H a multiple of h (box-averaged to h x w here).
    -> factors float32 [C, 3], bias float32 [3], such that latents @ factors + bias ~ decode (in [-1, 1])."""
    latents, images = np.asarray(latents, np.float64), np.asarray(images, np.float64)
    b, c, h, w = latents.shape
    if images.shape[0] != b or images.shape[1] != 3 or images.shape[2] % h or images.shape[2] * w != images.shape[3] * h:
        raise InputError(f"images {images.shape} are not decodes of latents {latents.shape}")
    target = downsample(images, images.shape[2] // h)                        # [B, 3, h, w]
    x = latents.transpose(0, 2, 3, 1).reshape(-1, c)                         # [B*h*w, C]
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)                    # [B*h*w, C+1]: the bias column
    y = target.transpose(0, 2, 3, 1).reshape(-1, 3)                          # [B*h*w, 3]
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)                         # [C+1, 3]
    return solution[:c].astype(np.float32), solution[c].astype(np.float32)


def preview_error(latents, images, factors, bias):
    """Mean absolute difference in [0, 1] units between latent_to_rgb(latents) and the decodes `images`
    [B, 3, H, W] in [-1, 1] box-averaged to latent size (both clipped to [0, 1])."""
    target = downsample(np.asarray(images, np.float32), images.shape[2] // latents.shape[2])
    target = np.clip(target / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)           # [B, h, w, 3]
    return float(np.abs(latent_to_rgb(latents, factors, bias) - target).mean())


def table_name(pipe):
    """Which stored table fits a pipeline's VAE: "npsd-tiny" for the built-in model (its config comes
    from npsd's own metadata and its VAE has factor 4), "sd-v1" for a 4-channel, factor-8 VAE, else None."""
    if pipe.latent_channels != 4:
        return None
    if pipe.info.get("config") == "npsd_config metadata" and pipe.vae_factor == 4:
        return "npsd-tiny"
    if pipe.vae_factor == 8:
        return "sd-v1"
    return None


def approx_preview(pipe, x0_latents, full_size=False):
    """A pipeline's scaled latents (e.g. the callback's x0_pred) [B, 4, h, w] -> float32 images
    [B, h, w, 3] in [0, 1] from the stored table of its model (full_size: nearest-upscaled to the
    image size [B, h*f, w*f, 3], f the VAE factor)."""
    name = table_name(pipe)
    if name is None:
        raise InputError(f"no latent -> RGB table for this model ({pipe.latent_channels} latent channels, "
                         f"VAE factor {pipe.vae_factor}); use the full VAE decode")
    factors, bias = TABLES[name]
    return latent_to_rgb(x0_latents, factors, bias, scale=pipe.vae_factor if full_size else 1)


# --- previews of a running generation: one implementation for the pipelines and the command line ---

def taesd_for(pipe, use):
    """pipe.taesd (TAESD parameters, npsd.taesd.load_taesd), checked to decode this pipeline's latents
    -> the parameters. use: what asked for TAESD ("preview 'taesd'", "--vae-decoder taesd"), for the
    one-line errors."""
    params = getattr(pipe, "taesd", None)
    if params is None:
        raise InputError(f"{use} needs TAESD weights: set pipe.taesd = npsd.taesd.load_taesd(PATH) first "
                         "(command line: --taesd PATH)")
    channels, factor = taesd.decoder_shape(params)
    if (channels, factor) != (pipe.latent_channels, pipe.vae_factor):
        raise InputError(f"{use}: these TAESD weights decode latents of {channels} channels at VAE factor {factor}; "
                         f"this model's latents have {pipe.latent_channels} channels at factor {pipe.vae_factor}; "
                         "use TAESD weights made for this model, or the full VAE")
    return params


def check_method(pipe, method, use=None):
    """Refuse, with a one-line InputError, a preview method that cannot draw this pipeline's latents:
    an unknown name, "approx" without a stored table, "taesd" without fitting weights in pipe.taesd."""
    use = use or f"preview {method!r}"
    if method not in PREVIEW_METHODS:
        raise InputError(f"preview must be one of {', '.join(PREVIEW_METHODS)}, got {method!r}")
    if method == "approx" and table_name(pipe) is None:
        raise InputError(f"{use}: no latent -> RGB table for this model ({pipe.latent_channels} latent channels, "
                         f"VAE factor {pipe.vae_factor}); use the 'full' or 'taesd' preview")
    if method == "taesd":
        taesd_for(pipe, use)


def preview(pipe, x0_latents, method):
    """A step's predicted clean latents (scaled, [B, C, h, w]: the callback's x0_pred) -> float32 images
    [B, H, W, 3] in [0, 1] at the image size (npsd.images.to_pil makes PIL images of them), drawn by
    `method`: "full" the model's VAE decode, "approx" the stored latent -> RGB table (latent resolution,
    nearest-upscaled: blocks of f x f pixels), "taesd" the decode of pipe.taesd."""
    check_method(pipe, method)
    if method == "approx":
        return approx_preview(pipe, x0_latents, full_size=True)
    return pipe.decode_latents(x0_latents, "taesd" if method == "taesd" else "vae")


def with_previews(pipe, callback, method):
    """callback(i, t, latents, x0_pred, preview=images) -> a pipeline callback(i, t, latents, x0_pred)
    that first draws x0_pred by `method` (`preview` above). What the pipelines' preview= does; checks
    the method at once, so that a generation does not start to fail at its first step."""
    check_method(pipe, method)
    if callback is None:
        raise InputError(f"preview={method!r} draws images for the callback; give callback= too")

    def draw(i, t, latents, x0_pred):
        return callback(i, t, latents, x0_pred, preview=preview(pipe, x0_pred, method))
    return draw
