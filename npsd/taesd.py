"""TAESD, the tiny autoencoder for SD v1.x latents (madebyollin/taesd; diffusers' AutoencoderTiny).

A distilled stand-in for the KL autoencoder (npsd/vae.py) made of plain 3x3 convolutions and
ReLUs, with no GroupNorm and no attention: 1.2M parameters per half instead of the KL decoder's
49.5M, for previews and fast decoding at a small cost in detail.

TAESD works on the diffusion (SCALED) latents directly: ``decode(params, latents)`` takes what
the UNet produces (no division by 0.18215; AutoencoderTiny's scaling_factor is 1.0) and
``encode(params, images)`` returns latents ready for diffusion. latent_magnitude (3) and
latent_shift (0.5) of diffusers' config are used only to store latents as uint8 images
(``AutoencoderTiny.forward`` and ``scale_latents``), not by encode or decode; here they are
``to_uint8`` / ``from_uint8``.

    decoder:  z [B, 4, h, w]  -> 3 tanh(z / 3)            (a soft clamp to (-3, 3))
                              -> conv 4->64, ReLU
                              -> 3 blocks, 2x nearest upsample, conv 64->64 (no bias)   x3 stages
                              -> 1 block, conv 64->3      -> y [B, 3, 8h, 8w] in about [0, 1]
                              -> 2 y - 1                  (diffusers' [-1, 1] convention)
    encoder:  x [B, 3, H, W] in [-1, 1] -> (x + 1) / 2 -> conv 3->64, 1 block
                              -> conv 64->64 stride 2 (no bias), 3 blocks               x3 stages
                              -> conv 64->4               -> z [B, 4, H/8, W/8]
    block(x) = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x)),  skip = identity or a 1x1 conv

Parameters are diffusers' AutoencoderTiny names: ``params["decoder"]["layers"][2]["conv"][0]["weight"]``.
``layers`` mirrors diffusers' nn.Sequential, so a parameterless module (a ReLU, an Upsample) is a
None in the list; the layers' kinds are read from the weights (a conv has "weight", a block has
"conv"), so TAESD variants with other channels or block counts run too. madebyollin's own files
use the same Sequential with bare indices ("3.conv.0.weight"); the decoder's starts with a
parameterless Clamp module, so its indices are one higher (ORIGINAL_OFFSET).

Decode time of a 64x64 latent (one 512x512 image), float32, fast path on, 2 CPU cores, machine
quiet: TAESD 1.2 .. 1.9 s, npsd's full SD v1.x VAE decoder (npsd.vae, random SD-size weights)
10.1 .. 10.3 s; 8.2x faster, best against best (the runs: docs/inside.md section 2).
Nearly all of TAESD's time is the five 64-channel 3x3 convs at 512x512. The pipelines use TAESD
for step previews (preview="taesd") and, for drafts, as the final decoder (decoder="taesd").
"""

import os
import re

import numpy as np

from . import fast as _fast
from . import nn, settings
from .errors import CheckpointError, InputError
from .params import unflatten
from .safetensors_io import open_weights

# madebyollin's taesd.py: Decoder() = Sequential(Clamp(), conv, ReLU, Block, ...), Encoder() = Sequential(conv, Block, ...);
# diffusers' DecoderTiny/EncoderTiny.layers are the same Sequentials without the Clamp (done in forward).
ORIGINAL_OFFSET = {"encoder": 0, "decoder": 1}              # original index = diffusers index + offset
ORIGINAL_FILES = {"encoder": "taesd_encoder", "decoder": "taesd_decoder"}
# Every tensor a TAESD half may hold, as a name under "<half>.layers.":
# a conv ("N.weight", "N.bias"), a block's convs ("N.conv.K.weight/bias") and its 1x1 skip.
LAYER_NAME = re.compile(r"(\d+)\.(weight|bias|conv\.\d+\.(?:weight|bias)|skip\.weight)$")
DIFFUSERS_NAME = re.compile(r"(encoder|decoder)\.layers\." + LAYER_NAME.pattern)

LATENT_MAGNITUDE = 3.0                                      # diffusers' AutoencoderTiny config defaults
LATENT_SHIFT = 0.5


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def relu(x):
    return np.maximum(x, np.float32(0))


def conv3x3(p, x, stride=1):
    """A 3x3 conv with padding 1 of zeros (bias optional). [B, C, H, W] -> [B, O, H/stride, W/stride].
    Zeros with tiling too: TAESD is a separate small model, which AUTOMATIC1111's Tiling leaves as it is."""
    return nn.conv2d(x, p["weight"], p.get("bias"), stride=stride, padding=1, padding_mode="zeros")


def block(p, x):
    """AutoencoderTinyBlock: ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x)). [B, C, H, W] -> [B, O, H, W].

    p["conv"] is the Sequential (conv, ReLU, conv, ReLU, conv): entries 1 and 3 are None (the ReLUs).
    """
    if settings.FAST:                                                      # the fast kernels, fewer copies
        return _fast.taesd_block(p, x)
    h = relu(conv3x3(p["conv"][0], x))                                     # [B, O, H, W]
    h = relu(conv3x3(p["conv"][2], h))                                     # [B, O, H, W]
    h = conv3x3(p["conv"][4], h)                                           # [B, O, H, W]
    skip = nn.conv2d(x, p["skip"]["weight"]) if "skip" in p else x         # 1x1, no bias, when C != O
    return relu(h + skip)


def clamp(z):
    """The decoder's soft clamp of its input latents to (-3, 3): 3 tanh(z / 3) (taesd.py's Clamp)."""
    return np.tanh(z / np.float32(3)) * np.float32(3)


def _kind(layer):
    """'conv', 'block' or None (a parameterless module) for one entry of `layers`."""
    if layer is None:
        return None
    return "block" if "conv" in layer else "conv"


# ---------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------

def decoder(p, z):
    """DecoderTiny: latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1].

    A parameterless layer after a conv is the ReLU; after a block it is the 2x nearest upsampling.
    """
    x = clamp(z)                                                           # [B, 4, h, w] in (-3, 3)
    if settings.FAST:                                                      # the fast kernels, fewer copies
        x = _fast.taesd_decoder([(_kind(layer), layer) for layer in p["layers"]], x)
    else:
        previous = None
        for layer in p["layers"]:
            kind = _kind(layer)
            if kind == "conv":
                x = conv3x3(layer, x)                                      # [B, 64, h', w'] (last: [B, 3, 8h, 8w])
            elif kind == "block":
                x = block(layer, x)                                        # [B, 64, h', w']
            elif previous == "conv":
                x = relu(x)                                                # after the first conv
            else:
                x = nn.upsample_nearest(x)                                 # [B, 64, 2h', 2w']
            previous = kind
    return x * np.float32(2) - np.float32(1)                               # [0, 1] -> [-1, 1]


def encoder(p, x):
    """EncoderTiny: images [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/8, W/8].

    The first and the last conv keep the size; the convs between them are stride-2 downsamplers.
    """
    x = (x + np.float32(1)) / np.float32(2)                                # [-1, 1] -> [0, 1]
    layers = p["layers"]
    for i, layer in enumerate(layers):
        if _kind(layer) == "block":
            x = block(layer, x)                                            # [B, 64, H', W']
        else:
            stride = 1 if i in (0, len(layers) - 1) else 2
            x = conv3x3(layer, x, stride=stride)                           # [B, 64, H'/stride, W'/stride]
    return x


def _check_params(params, half):
    layers = params.get(half, {}).get("layers") if isinstance(params, dict) else None
    if not layers:
        raise CheckpointError(f"TAESD parameters lack {half}.layers; pass params from npsd.taesd.load_taesd "
                              "(diffusers AutoencoderTiny names)")
    return layers


def _check_input(x, channels, what, hint):
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != channels or min(x.shape) < 1:
        raise InputError(f"TAESD {what} must be a non-empty array [B, {channels}, H, W], got shape {x.shape}; {hint}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"TAESD {what} contains NaN or infinite values; check how it was computed")
    return x


def decoder_shape(params):
    """What a TAESD decoder reads -> (latent channels, image pixels per latent pixel): the first conv's
    input channels, and 2 ** the number of 2x upsamplings (a parameterless layer after a block)."""
    layers = _check_params(params, "decoder")
    first = next(layer for layer in layers if layer is not None)
    upsamplings = sum(1 for before, layer in zip(layers, layers[1:]) if layer is None and _kind(before) == "block")
    return first["weight"].shape[1], 2 ** upsamplings                      # SD v1.x's TAESD: (4, 8)


def decode(params, latents):
    """Diffusion (scaled) latents [B, 4, h, w] -> images float32 [B, 3, 8h, 8w] in about [-1, 1]
    (not clamped), as diffusers' ``AutoencoderTiny.decode(latents).sample``."""
    layers = _check_params(params, "decoder")
    first = next(layer for layer in layers if layer is not None)
    latents = _check_input(latents, first["weight"].shape[1], "latents",
                           "pass the UNet's latents as they are (TAESD does not divide by 0.18215)")
    return decoder(params["decoder"], latents)


def encode(params, images):
    """Images [B, 3, H, W] in [-1, 1] -> diffusion (scaled) latents float32 [B, 4, H/8, W/8], as
    diffusers' ``AutoencoderTiny.encode(images).latents``. H and W should be multiples of 8."""
    layers = _check_params(params, "encoder")
    images = _check_input(images, layers[0]["weight"].shape[1], "images",
                          "convert HWC images with x.transpose(2, 0, 1) and scale to [-1, 1]")
    return encoder(params["encoder"], images)


def to_uint8(latents):
    """Latents -> uint8, as AutoencoderTiny.scale_latents then round: clamp(z / 6 + 0.5, 0, 1) * 255."""
    x = np.clip(latents / np.float32(2 * LATENT_MAGNITUDE) + np.float32(LATENT_SHIFT), 0, 1)
    return np.round(x * np.float32(255)).astype(np.uint8)


def from_uint8(q):
    """uint8 -> latents, as AutoencoderTiny.unscale_latents(q / 255): (q / 255 - 0.5) * 6."""
    return (q.astype(np.float32) / np.float32(255) - np.float32(LATENT_SHIFT)) * np.float32(2 * LATENT_MAGNITUDE)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def original_to_diffusers(name, half):
    """One name of madebyollin's taesd_{half}.safetensors -> diffusers' name ("3.conv.0.weight" ->
    "decoder.layers.2.conv.0.weight"), or None if it is not a TAESD name."""
    m = LAYER_NAME.match(name)
    if not m or int(m[1]) < ORIGINAL_OFFSET[half]:
        return None
    return f"{half}.layers.{int(m[1]) - ORIGINAL_OFFSET[half]}.{m[2]}"


def diffusers_to_original(name):
    """The inverse: "decoder.layers.2.conv.0.weight" -> ("decoder", "3.conv.0.weight")."""
    m = DIFFUSERS_NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not an AutoencoderTiny encoder/decoder name")
    return m[1], f"{int(m[2]) + ORIGINAL_OFFSET[m[1]]}.{m[3]}"


def _original_half(names):
    """Which half an original-layout file holds: the encoder's Sequential starts with a conv at
    index 0, the decoder's with the parameterless Clamp (its first conv is index 1)."""
    return "encoder" if "0.weight" in names else "decoder"


def _not_taesd(path, names):
    few = ", ".join(sorted(names)[:3]) or "no tensors"
    return CheckpointError(f"{path} is not a TAESD checkpoint (expected AutoencoderTiny names like "
                           f"'decoder.layers.0.weight' or taesd names like '1.weight'; found {few})")


def _read(path, dtype):
    """One file -> {diffusers name: array}."""
    with open_weights(path) as f:
        names = list(f.tensors)
        if names and all(DIFFUSERS_NAME.match(n) for n in names):
            mapping = {n: n for n in names}
        else:
            half = _original_half(names)
            mapping = {original_to_diffusers(n, half): n for n in names}
            if not names or None in mapping:
                raise _not_taesd(path, names)
        flat = {}
        for new, old in mapping.items():
            a = f.read(old, dtype)
            if (a.ndim != 4 if new.endswith("weight") else a.ndim != 1):   # conv weights [O, C, k, k], biases [O]
                raise CheckpointError(f"{path}: tensor {old!r} has shape {list(a.shape)}, not that of a conv; "
                                      "not a TAESD checkpoint")
            flat[new] = a
    return flat


def _files(path):
    """A path given by the user -> the weight files to read."""
    if not os.path.isdir(path):
        return [path]
    folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    found = [os.path.join(folder, stem + ext) for stem in ORIGINAL_FILES.values() for ext in (".safetensors", ".pth")]
    found = [p for p in found if os.path.isfile(p)]
    if not found:
        raise CheckpointError(f"{path} holds neither diffusion_pytorch_model.safetensors nor "
                              "taesd_encoder/taesd_decoder.safetensors; not a TAESD folder")
    by_stem = {}
    for p in found:                                                        # .safetensors before .pth
        by_stem.setdefault(os.path.basename(p).split(".")[0], p)
    return list(by_stem.values())


def decoder_file(path):
    """The file that holds the decoder behind a path given to load_taesd (for its hash, as the PNG
    parameters record it): the file itself, a diffusers folder's weights, or taesd_decoder.*."""
    files = _files(os.fspath(path))
    decoders = [p for p in files if os.path.basename(p).startswith(ORIGINAL_FILES["decoder"])]
    return (decoders or files)[0]


def load_taesd(path, dtype=np.float32):
    """Load TAESD weights into diffusers' AutoencoderTiny names: {"encoder": {"layers": [...]},
    "decoder": {"layers": [...]}}. path is a diffusers AutoencoderTiny folder (madebyollin/taesd)
    or its diffusion_pytorch_model.safetensors, a folder with madebyollin's taesd_encoder /
    taesd_decoder .safetensors (or .pth), or one of those files alone (then only that half)."""
    path = os.fspath(path)
    flat = {}
    for p in _files(path):
        flat.update(_read(p, dtype))
    return unflatten(flat)
