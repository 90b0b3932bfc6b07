"""The KL autoencoder of Stable Diffusion v1.x (Rombach et al. 2022, sec. 3; diffusers' AutoencoderKL).

The encoder maps an image x [B, 3, H, W] in [-1, 1] to a diagonal Gaussian over latents
[B, 4, H/8, W/8] (mean and log-variance); the decoder maps a latent back to an image. Both work on
UNSCALED latents: pipelines multiply by config["scaling_factor"] (0.18215 for SD v1.x) before
diffusion and divide by it before decoding, as diffusers' pipelines do.

Parameters are the diffusers names (``params["decoder"]["up_blocks"][0]["resnets"][1]["conv1"]``);
channels, resnets per level and the number of levels come from the weight shapes, so small VAEs of
the same design run too. config is the "vae" section of npsd.config (norm_groups, eps).

The blocks below are the formulas (h = conv(silu(GroupNorm(x))), upsample then conv, x + h), which
a debugger steps through with the fast path off (``nn.set_fast(False)`` or NPSD_FAST=0). With it
on (the default) the resnet blocks, the upsamplers and the output layers run their fast versions
in npsd/fast.py, which compute the same values holding fewer copies of the largest maps (256
channels at 512x512, 268 MB, in a 512x512 decode): GroupNorm + SiLU and the 2x upsampling written
straight into the zero-bordered buffer the next 3x3 conv reads, residuals added in place
(docs/vae.md gives both paths' memory). Either way a batch is encoded and decoded one image at a time.
``decode(..., tile_size=T)`` decodes large latents in overlapping tiles blended linearly, as
diffusers' ``AutoencoderKL.tiled_decode`` does (docs/vae.md shows the difference tiling makes).
"""

import numpy as np

from . import fast as _fast
from . import nn, settings
from .errors import CheckpointError, InputError
from .trace import record as _record, scope as _scope

# Fraction of a tile that overlaps its neighbour in tiled decoding (diffusers' tile_overlap_factor).
TILE_OVERLAP = 0.25


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def _norm_groups(config, *norms):
    """config["norm_groups"], checked against the channels of each GroupNorm in norms."""
    groups = config["norm_groups"]
    for norm in norms:
        c = norm["weight"].shape[0]
        if c % groups:
            raise CheckpointError(f"VAE GroupNorm: {c} channels cannot be split into {groups} groups; "
                                  "check the config's vae.norm_groups")
    return groups


def group_norm(x, p, config):
    """GroupNorm (Wu & He 2018) of x [B, C, H, W] with the VAE's groups and eps:
    (x - mean_g) / sqrt(var_g + eps) * weight + bias, mean and variance over each group g of channels."""
    return nn.group_norm(x, _norm_groups(config, p), p["weight"], p["bias"], config["eps"])


def resnet_block(p, x, config):
    """ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))).

    x [B, C, H, W] -> [B, O, H, W]; when C != O the skip is a 1x1 conv (conv_shortcut).
    """
    if _fused():                                                           # same values, fewer full-size maps
        return _fast.vae_resnet_block(p, x, _norm_groups(config, p["norm1"], p["norm2"]), config["eps"])
    h = nn.silu(group_norm(x, p["norm1"], config))                         # [B, C, H, W]
    h = nn.conv2d(h, **p["conv1"], padding=1)                              # [B, O, H, W]
    h = nn.silu(group_norm(h, p["norm2"], config))                         # [B, O, H, W]
    h = nn.conv2d(h, **p["conv2"], padding=1)                              # [B, O, H, W]
    skip = nn.conv2d(x, **p["conv_shortcut"]) if "conv_shortcut" in p else x   # 1x1 when C != O
    return skip + h


def upsample(p, x):
    """Upsample2D: nearest-neighbour 2x upsampling, then a 3x3 conv. [B, C, h, w] -> [B, O, 2h, 2w]."""
    if _fused():                                                           # same values, fewer full-size maps
        return _fast.vae_upsample(p, x)
    x = nn.upsample_nearest(x)                                             # [B, C, 2h, 2w]: each pixel a 2x2 block
    return nn.conv2d(x, **p["conv"], padding=1)                            # [B, O, 2h, 2w]


def output_layers(p, x, config, trace=None):
    """The last layers of the encoder and the decoder: conv_out(silu(conv_norm_out(x))), a 3x3 conv.

    [B, C, H, W] -> [B, O, H, W]. trace: records conv_out's input.
    """
    if trace is not None:                                                  # the fast path never holds it
        _record(trace, "conv_out:in", nn.silu(group_norm(x, p["conv_norm_out"], config)))
    if _fused():                                                           # same values, fewer full-size maps
        groups = _norm_groups(config, p["conv_norm_out"])
        return _fast.vae_norm_silu_conv(x, p["conv_norm_out"], p["conv_out"], groups, config["eps"])
    x = nn.silu(group_norm(x, p["conv_norm_out"], config))                 # [B, C, H, W]
    return nn.conv2d(x, **p["conv_out"], padding=1)                        # [B, O, H, W]


def attention_block(p, x, config):
    """The mid-block self-attention: one head over all H*W positions, with a residual.

    x [B, C, H, W] -> [B, C, H, W]:  x + to_out(softmax(q k^T / sqrt(C)) v),
    q, k, v = to_q/to_k/to_v(GroupNorm(x)) as tokens [B, H*W, C] (Vaswani et al. 2017, eq. 1).
    """
    b, c, h, w = x.shape
    t = group_norm(x, p["group_norm"], config)                             # [B, C, H, W]
    t = t.reshape(b, c, h * w).transpose(0, 2, 1)                          # [B, HW, C]
    q = nn.linear_or_conv1x1(t, **p["to_q"])                               # [B, HW, C]
    k = nn.linear_or_conv1x1(t, **p["to_k"])                               # [B, HW, C]
    v = nn.linear_or_conv1x1(t, **p["to_v"])                               # [B, HW, C]
    del t
    o = nn.attention(q, k, v, num_heads=1)                                 # [B, HW, C]
    del q, k, v
    o = nn.conv1x1(o.transpose(0, 2, 1).reshape(b, c, h, w), **p["to_out"][0])   # [B, C, H, W]
    o += x                                                                 # residual connection
    return o


def mid_block(p, x, config, trace=None):
    """UNetMidBlock2D: resnet, attention, resnet. [B, C, h, w] -> [B, C, h, w]."""
    _record(trace, ":in", x)
    _record(trace, "resnets.0:in", x)
    x = resnet_block(p["resnets"][0], x, config)
    _record(trace, "resnets.0", x)
    attentions = p.get("attentions") or [None] * (len(p["resnets"]) - 1)   # none if mid_block_add_attention=False
    for j, (attn, res) in enumerate(zip(attentions, p["resnets"][1:])):
        if attn is not None:
            _record(trace, f"attentions.{j}:in", x)
            x = attention_block(attn, x, config)
            _record(trace, f"attentions.{j}", x)
        _record(trace, f"resnets.{j + 1}:in", x)
        x = resnet_block(res, x, config)
        _record(trace, f"resnets.{j + 1}", x)
    _record(trace, "", x)
    return x


def down_block(p, x, config, trace=None):
    """DownEncoderBlock2D: resnets, then (not on the last level) a stride-2 conv.

    [B, C, H, W] -> [B, O, H/2, W/2] (or [B, O, H, W] on the last level).
    """
    _record(trace, ":in", x)
    for j, res in enumerate(p["resnets"]):
        _record(trace, f"resnets.{j}:in", x)
        x = resnet_block(res, x, config)                                   # [B, O, H, W]
        _record(trace, f"resnets.{j}", x)
    if p.get("downsamplers"):
        _record(trace, "downsamplers.0:in", x)
        # pad right and bottom by one pixel of zeros only, then 3x3 stride 2 (the LDM downsampler, whose
        # pad is a separate zero pad before the conv: it stays zeros with tiling too)
        x = nn.conv2d(x, **p["downsamplers"][0]["conv"], stride=2, padding=(0, 1, 0, 1),
                      padding_mode="zeros")                                # [B, O, H/2, W/2]
        _record(trace, "downsamplers.0", x)
    _record(trace, "", x)
    return x


def up_block(p, x, config, trace=None):
    """UpDecoderBlock2D: resnets, then (not on the last level) nearest 2x upsampling and a 3x3 conv.

    [B, C, h, w] -> [B, O, 2h, 2w] (or [B, O, h, w] on the last level).
    """
    _record(trace, ":in", x)
    for j, res in enumerate(p["resnets"]):
        _record(trace, f"resnets.{j}:in", x)
        x = resnet_block(res, x, config)                                   # [B, O, h, w]
        _record(trace, f"resnets.{j}", x)
    if p.get("upsamplers"):
        _record(trace, "upsamplers.0:in", x)
        x = upsample(p["upsamplers"][0], x)                                # [B, O, 2h, 2w]
        _record(trace, "upsamplers.0", x)
    _record(trace, "", x)
    return x


# ---------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------

def _fused():
    """True where the blocks run fast.py's fused versions: on the fast path with zero padding (they
    write the zero border as they go). With circular padding (tiling) the blocks run as written
    above, and their convolutions still take the fast kernels."""
    return settings.FAST and settings.PADDING_MODE == "zeros"


def _fast_arguments(config):
    """(groups, eps, attention) as fast.vae_encoder and fast.vae_decoder take them."""
    return (lambda *norms: _norm_groups(config, *norms), config["eps"],
            lambda attn, x: attention_block(attn, x, config))


def encoder(p, x, config, trace=None):
    """Image [B, 3, H, W] -> moments [B, 2*latent_channels, H/8, W/8] (before quant_conv).
    trace: None or an npsd.trace Scope ("vae.encoder"): records conv_in, down_blocks.i, mid_block, conv_out."""
    if _fused() and trace is None:                                         # same values; maps reused in place
        return _fast.vae_encoder(p, x, *_fast_arguments(config))
    _record(trace, ":in", x)
    _record(trace, "conv_in:in", x)
    x = nn.conv2d(x, **p["conv_in"], padding=1)                            # [B, 128, H, W]
    _record(trace, "conv_in", x)
    for i, block in enumerate(p["down_blocks"]):
        x = down_block(block, x, config, _scope(trace, f"down_blocks.{i}"))   # 128@H -> 128@H/2 -> 256@H/4 -> 512@H/8 -> 512@H/8
    x = mid_block(p["mid_block"], x, config, _scope(trace, "mid_block"))  # [B, 512, H/8, W/8]
    x = output_layers(p, x, config, trace)                                 # [B, 8, H/8, W/8]
    _record(trace, "conv_out", x)
    _record(trace, "", x)
    return x


def decoder(p, z, config, trace=None):
    """Latent [B, latent_channels, h, w] (after post_quant_conv) -> image [B, 3, 8h, 8w].
    trace: None or an npsd.trace Scope ("vae.decoder"): records conv_in, mid_block, up_blocks.i, conv_out."""
    if _fused() and trace is None:                                         # same values; each map reused in place
        return _fast.vae_decoder(p, z, *_fast_arguments(config))
    _record(trace, ":in", z)
    _record(trace, "conv_in:in", z)
    x = nn.conv2d(z, **p["conv_in"], padding=1)                            # [B, 512, h, w]
    _record(trace, "conv_in", x)
    x = mid_block(p["mid_block"], x, config, _scope(trace, "mid_block"))  # [B, 512, h, w]
    for i, block in enumerate(p["up_blocks"]):
        x = up_block(block, x, config, _scope(trace, f"up_blocks.{i}"))    # 512@2h -> 512@4h -> 256@8h -> 128@8h
    x = output_layers(p, x, config, trace)                                 # [B, 3, 8h, 8w]
    _record(trace, "conv_out", x)
    _record(trace, "", x)
    return x


def _check_params(params, part):
    for key in ("conv_in", "mid_block", "conv_out"):
        if key not in params.get(part, {}):
            raise CheckpointError(f"VAE parameters lack {part}.{key}; pass the 'vae' subtree of a Stable "
                                  "Diffusion checkpoint, with diffusers AutoencoderKL names")


def _check_input(x, channels, what, hint):
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError(f"VAE {what} must be an array [B, {channels}, H, W], got shape {x.shape}; {hint}")
    if x.shape[2] < 1 or x.shape[3] < 1 or x.shape[0] < 1:
        raise InputError(f"VAE {what} is empty (shape {x.shape}); pass at least one non-empty image")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"VAE {what} contains NaN or infinite values; check how it was computed")
    return x


def encode(params, images, config, trace=None):
    """images float32 [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, 4, H/8, W/8], unscaled.

    The posterior is a diagonal Gaussian N(mean, exp(logvar)); logvar is clamped to [-30, 20] as
    diffusers' DiagonalGaussianDistribution does. Images are encoded one at a time (bounded memory).
    trace: None, or an npsd.trace.Trace: records vae.encoder.* and vae.quant_conv per image (docs/traces.md).
    """
    trace = _scope(trace, "vae")
    _check_params(params, "encoder")
    cin = params["encoder"]["conv_in"]["weight"].shape[1]
    images = _check_input(images, cin, "images", "convert HWC images with x.transpose(2, 0, 1) and scale to [-1, 1]")
    moments = []
    for i in range(images.shape[0]):
        m = encoder(params["encoder"], images[i:i + 1], config, _scope(trace, "encoder"))  # [1, 8, h, w]
        if "quant_conv" in params:
            _record(trace, "quant_conv:in", m)
            m = nn.conv2d(m, **params["quant_conv"])                       # 1x1: [1, 8, h, w]
            _record(trace, "quant_conv", m)
        moments.append(m)
    moments = np.concatenate(moments)                                      # [B, 8, h, w]
    mean, logvar = np.split(moments, 2, axis=1)                            # 2 x [B, 4, h, w]
    return np.ascontiguousarray(mean), np.clip(logvar, -30.0, 20.0)


def sample(mean, logvar, noise):
    """A draw from the posterior: z = mean + exp(0.5 * logvar) * noise, noise ~ N(0, I) given by the caller."""
    mean, logvar, noise = (np.asarray(a, dtype=np.float32) for a in (mean, logvar, noise))
    if not mean.shape == logvar.shape == noise.shape:
        raise InputError(f"sample: mean {mean.shape}, logvar {logvar.shape} and noise {noise.shape} "
                         "must have the same shape")
    # reparameterisation (Kingma & Welling 2014): z = mu + sigma * eps, sigma = exp(logvar / 2)
    return mean + np.exp(np.float32(0.5) * logvar) * noise


def _decode_one(params, z, config, trace=None):
    # z [1, 4, h, w] -> [1, 3, f*h, f*w]
    if "post_quant_conv" in params:
        _record(trace, "post_quant_conv:in", z)
        z = nn.conv2d(z, **params["post_quant_conv"])                      # 1x1: [1, 4, h, w]
        _record(trace, "post_quant_conv", z)
    return decoder(params["decoder"], z, config, _scope(trace, "decoder"))


def _blend(a, b, extent, axis):
    """Blend the last `extent` rows (axis 2) or columns (axis 3) of tile a into the first ones of b,
    in place: b[y] = a[-extent + y] * (1 - y/extent) + b[y] * (y/extent), as diffusers' blend_v/h."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return
    y = np.arange(extent) / extent                                         # float64, as Python's y / extent
    shape = (-1, 1) if axis == 2 else (-1,)
    wa = (1 - y).astype(np.float32).reshape(shape)                         # weight of the earlier tile
    wb = y.astype(np.float32).reshape(shape)                               # weight of the current tile
    if axis == 2:
        b[:, :, :extent] = a[:, :, -extent:] * wa + b[:, :, :extent] * wb
    else:
        b[:, :, :, :extent] = a[:, :, :, -extent:] * wa + b[:, :, :, :extent] * wb


def _decode_tiled(params, z, config, tile):
    """Decode z [1, 4, h, w] in tiles of tile x tile latent pixels overlapping by TILE_OVERLAP,
    blending each tile into its upper and left neighbours (diffusers' AutoencoderKL.tiled_decode)."""
    _, _, h, w = z.shape
    f = 2 ** sum(1 for blk in params["decoder"]["up_blocks"] if blk.get("upsamplers"))   # 8 for SD
    stride = int(tile * (1 - TILE_OVERLAP))                                # latent step between tile origins
    blend = int(tile * f * TILE_OVERLAP)                                   # image pixels blended per seam
    keep = tile * f - blend                                                # image pixels kept per tile (= stride*f)
    cout = params["decoder"]["conv_out"]["weight"].shape[0]               # 3 image channels
    out = np.empty((1, cout, h * f, w * f), dtype=np.float32)              # [1, 3, f*h, f*w]
    above = []                                                             # the previous row of (blended) tiles
    for i in range(0, h, stride):
        row = []
        for n, j in enumerate(range(0, w, stride)):
            t = _decode_one(params, z[:, :, i:i + tile, j:j + tile], config)   # [1, 3, <=f*tile, <=f*tile]
            if i > 0:
                _blend(above[n], t, blend, axis=2)                         # seam with the tile above
            if n > 0:
                _blend(row[-1], t, blend, axis=3)                          # seam with the tile to the left
            row.append(t)
            part = t[:, :, :keep, :keep]
            out[:, :, i * f:i * f + part.shape[2], j * f:j * f + part.shape[3]] = part
        above = row
    return out


def decode(params, latents, config, tile_size=None, trace=None):
    """Unscaled latents [B, 4, h, w] -> images float32 [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped).

    tile_size=None decodes in one piece. tile_size=T (latent pixels, a multiple of 4; 64 gives
    diffusers' tiles for SD v1.x) decodes latents larger than T in overlapping T x T tiles blended
    linearly, so memory is that of one T x T decode whatever the image size; the result differs
    slightly from the untiled one (docs/vae.md). Images are decoded one at a time.
    trace: None, or an npsd.trace.Trace: records vae.post_quant_conv and vae.decoder.* per image
    (untiled decodes only; docs/traces.md).
    """
    trace = _scope(trace, "vae")
    _check_params(params, "decoder")
    cin = (params.get("post_quant_conv") or params["decoder"]["conv_in"])["weight"].shape[1]
    latents = _check_input(latents, cin, "latents", "pass unscaled latents (divide by config['scaling_factor'])")
    if tile_size is not None and (int(tile_size) != tile_size or tile_size < 4 or tile_size % 4):
        raise InputError(f"tile_size must be a multiple of 4 latent pixels (e.g. 64), got {tile_size!r}")
    if tile_size is not None and settings.PADDING_MODE == "circular":
        raise InputError("tile_size decodes tiles on their own, which circular padding (tiling) would wrap "
                         "each on itself: decode in one piece (tile_size=None)")
    images = []
    for i in range(latents.shape[0]):
        z = latents[i:i + 1]                                               # [1, 4, h, w]
        if tile_size is not None and max(z.shape[2:]) > tile_size:
            images.append(_decode_tiled(params, z, config, int(tile_size)))
        else:
            images.append(_decode_one(params, z, config, trace))
    return np.concatenate(images)                                          # [B, 3, 8h, 8w]
