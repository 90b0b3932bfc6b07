"""The KL autoencoder of Stable Diffusion v1.x (Rombach et al. 2022, sec. 3; diffusers' AutoencoderKL).

The encoder maps an image x [B, 3, H, W] in [-1, 1] to a diagonal Gaussian over latents
[B, 4, H/8, W/8] (mean and log-variance); the decoder maps a latent back to an image. Both work on
UNSCALED latents: pipelines multiply by config["scaling_factor"] (0.18215 for SD v1.x) before
diffusion and divide by it before decoding, as diffusers' pipelines do.

Parameters are the diffusers names (``params["decoder"]["up_blocks"][0]["resnets"][1]["conv1"]``);
channels, resnets per level and the number of levels come from the weight shapes, so small VAEs of
the same design run too. config is the "vae" section of npsd.config (norm_groups, eps).

Memory: the largest activation of a 512x512 decode is 256 channels at 512x512 (268 MB). The forward
pass avoids needless copies of such maps: GroupNorm + SiLU and the 2x upsampling write straight
into a zero-padded buffer that the next 3x3 conv reads without padding again, GroupNorm/SiLU work a
few groups at a time, residual adds are in place, and a batch is processed one image at a time.
``decode(..., tile_size=T)`` decodes large latents in overlapping tiles blended linearly, as
diffusers' ``AutoencoderKL.tiled_decode`` does (docs/vae.md shows the difference tiling makes).
"""

import numpy as np

from . import nn
from .errors import CheckpointError, InputError

# Fraction of a tile that overlaps its neighbour in tiled decoding (diffusers' tile_overlap_factor).
TILE_OVERLAP = 0.25

# GroupNorm + SiLU process whole channel groups in slices of about nn.CHUNK_BYTES / 8 bytes, so
# that their temporaries (x - mean, its square, the normalised map, exp(-x), ...) stay small.
_NORM_SLICE_FRACTION = 8


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def norm_silu(x, p, config, pad=0):
    """silu(GroupNorm(x)) of x [B, C, H, W], written into a zero-bordered buffer [B, C, H+2pad, W+2pad].

    The result is the same as nn.silu(nn.group_norm(x, ...)) (GroupNorm's statistics are per group,
    so computing a few groups at a time changes nothing); with pad=1 it is ready for a 3x3 conv
    with padding 0, so the conv does not copy the map to pad it.
    """
    b, c, h, w = x.shape
    groups = config["norm_groups"]
    if c % groups:
        raise CheckpointError(f"VAE GroupNorm: {c} channels cannot be split into {groups} groups; "
                              "check the config's vae.norm_groups")
    cg = c // groups                                                       # channels per group
    out = np.zeros((b, c, h + 2 * pad, w + 2 * pad), dtype=np.float32)    # [B, C, H+2p, W+2p]
    inner = out[:, :, pad:pad + h, pad:pad + w]                           # view [B, C, H, W]
    group_bytes = b * cg * h * w * 4
    step = max(1, nn.CHUNK_BYTES // _NORM_SLICE_FRACTION // group_bytes) * cg   # channels per slice
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        # GroupNorm (Wu & He 2018): (x - mean_g) / sqrt(var_g + eps) * weight + bias, per group g
        y = nn.group_norm(x[:, c0:c1], (c1 - c0) // cg, p["weight"][c0:c1], p["bias"][c0:c1],
                          config["eps"])                                   # [B, slice, H, W]
        # SiLU: y * sigmoid(y)
        inner[:, c0:c1] = nn.silu(y)
    return out


def upsample_pad(x):
    """Nearest-neighbour 2x upsampling of x [B, C, H, W] into a zero-bordered [B, C, 2H+2, 2W+2].

    Each input pixel is copied to a 2x2 block (what F.interpolate(scale_factor=2, mode="nearest")
    does); the 1-pixel zero border is the padding of the 3x3 conv that follows.
    """
    b, c, h, w = x.shape
    out = np.zeros((b, c, 2 * h + 2, 2 * w + 2), dtype=np.float32)       # [B, C, 2H+2, 2W+2]
    for dy in (0, 1):
        for dx in (0, 1):
            out[:, :, 1 + dy:1 + dy + 2 * h:2, 1 + dx:1 + dx + 2 * w:2] = x  # out[2i+dy+1, 2j+dx+1] = x[i, j]
    return out


def resnet_block(p, x, config):
    """ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))).

    x [B, C, H, W] -> [B, O, H, W]; when C != O the skip is a 1x1 conv (conv_shortcut).
    """
    h = norm_silu(x, p["norm1"], config, pad=1)                            # [B, C, H+2, W+2]
    h = nn.conv2d(h, **p["conv1"])                                         # [B, O, H, W]
    h = norm_silu(h, p["norm2"], config, pad=1)                            # [B, O, H+2, W+2]
    h = nn.conv2d(h, **p["conv2"])                                         # [B, O, H, W]
    if "conv_shortcut" in p:
        h += nn.conv2d(x, **p["conv_shortcut"])                            # 1x1: [B, C, H, W] -> [B, O, H, W]
    else:
        h += x
    return h


def attention_block(p, x, config):
    """The mid-block self-attention: one head over all H*W positions, with a residual.

    x [B, C, H, W] -> [B, C, H, W]:  x + to_out(softmax(q k^T / sqrt(C)) v),
    q, k, v = to_q/to_k/to_v(GroupNorm(x)) as tokens [B, H*W, C] (Vaswani et al. 2017, eq. 1).
    """
    b, c, h, w = x.shape
    t = nn.group_norm(x, config["norm_groups"], p["group_norm"]["weight"], p["group_norm"]["bias"],
                      config["eps"])                                       # [B, C, H, W]
    t = t.reshape(b, c, h * w).transpose(0, 2, 1)                          # [B, HW, C]
    q, k, v = nn.pointwise(t, **p["to_q"]), nn.pointwise(t, **p["to_k"]), nn.pointwise(t, **p["to_v"])  # 3 x [B, HW, C]
    del t
    o = nn.attention(q, k, v, num_heads=1)                                 # [B, HW, C]
    del q, k, v
    o = nn.pointwise(o, **p["to_out"][0])                                  # [B, HW, C]
    out = o.transpose(0, 2, 1).reshape(b, c, h, w)                         # [B, C, H, W] (a copy)
    out += x                                                               # residual connection
    return out


def mid_block(p, x, config):
    """UNetMidBlock2D: resnet, attention, resnet. [B, C, h, w] -> [B, C, h, w]."""
    x = resnet_block(p["resnets"][0], x, config)
    attentions = p.get("attentions") or [None] * (len(p["resnets"]) - 1)   # none if mid_block_add_attention=False
    for attn, res in zip(attentions, p["resnets"][1:]):
        if attn is not None:
            x = attention_block(attn, x, config)
        x = resnet_block(res, x, config)
    return x


def down_block(p, x, config):
    """DownEncoderBlock2D: resnets, then (not on the last level) a stride-2 conv.

    [B, C, H, W] -> [B, O, H/2, W/2] (or [B, O, H, W] on the last level).
    """
    for res in p["resnets"]:
        x = resnet_block(res, x, config)                                   # [B, O, H, W]
    if p.get("downsamplers"):
        # pad right and bottom by one pixel only, then 3x3 stride 2 (the LDM downsampler)
        x = nn.conv2d(x, **p["downsamplers"][0]["conv"], stride=2, padding=(0, 1, 0, 1))  # [B, O, H/2, W/2]
    return x


def up_block(p, x, config):
    """UpDecoderBlock2D: resnets, then (not on the last level) nearest 2x upsampling and a 3x3 conv.

    [B, C, h, w] -> [B, O, 2h, 2w] (or [B, O, h, w] on the last level).
    """
    for res in p["resnets"]:
        x = resnet_block(res, x, config)                                   # [B, O, h, w]
    if p.get("upsamplers"):
        x = nn.conv2d(upsample_pad(x), **p["upsamplers"][0]["conv"])       # [B, O, 2h+2, 2w+2] -> [B, O, 2h, 2w]
    return x


# ---------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------

def encoder(p, x, config):
    """Image [B, 3, H, W] -> moments [B, 2*latent_channels, H/8, W/8] (before quant_conv)."""
    x = nn.conv2d(x, **p["conv_in"], padding=1)                            # [B, 128, H, W]
    for block in p["down_blocks"]:
        x = down_block(block, x, config)                                   # 128@H -> 128@H/2 -> 256@H/4 -> 512@H/8 -> 512@H/8
    x = mid_block(p["mid_block"], x, config)                               # [B, 512, H/8, W/8]
    x = norm_silu(x, p["conv_norm_out"], config, pad=1)                    # [B, 512, H/8+2, W/8+2]
    return nn.conv2d(x, **p["conv_out"])                                   # [B, 8, H/8, W/8]


def decoder(p, z, config):
    """Latent [B, latent_channels, h, w] (after post_quant_conv) -> image [B, 3, 8h, 8w]."""
    x = nn.conv2d(z, **p["conv_in"], padding=1)                            # [B, 512, h, w]
    x = mid_block(p["mid_block"], x, config)                               # [B, 512, h, w]
    for block in p["up_blocks"]:
        x = up_block(block, x, config)                                     # 512@2h -> 512@4h -> 256@8h -> 128@8h
    x = norm_silu(x, p["conv_norm_out"], config, pad=1)                    # [B, 128, 8h+2, 8w+2]
    return nn.conv2d(x, **p["conv_out"])                                   # [B, 3, 8h, 8w]


def init_params(rng, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                in_channels=3):
    """Random parameters of a VAE of this design (defaults: SD v1.x's shapes and names).

    Weights are N(0, 1/fan_in), biases 0.1 N(0, 1), norm weights 1 + 0.1 N(0, 1). Useful for docs,
    memory tests and to read the layout: the encoder has len(block_out_channels) levels of
    layers_per_block resnets, the decoder the same levels reversed with one resnet more each.
    """
    def conv(o, i, k):
        return {"weight": (rng.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32),
                "bias": (0.1 * rng.standard_normal(o)).astype(np.float32)}

    def norm(c):
        return {"weight": (1 + 0.1 * rng.standard_normal(c)).astype(np.float32),
                "bias": (0.1 * rng.standard_normal(c)).astype(np.float32)}

    def resnet(i, o):
        p = {"norm1": norm(i), "conv1": conv(o, i, 3), "norm2": norm(o), "conv2": conv(o, o, 3)}
        if i != o:
            p["conv_shortcut"] = conv(o, i, 1)
        return p

    def linear(c):
        p = conv(c, c, 1)
        return {"weight": p["weight"][:, :, 0, 0], "bias": p["bias"]}

    def mid(c):
        attn = {"group_norm": norm(c), "to_q": linear(c), "to_k": linear(c), "to_v": linear(c), "to_out": [linear(c)]}
        return {"resnets": [resnet(c, c), resnet(c, c)], "attentions": [attn]}

    ch, top, n = list(block_out_channels), block_out_channels[-1], len(block_out_channels)
    down = []
    for i, c in enumerate(ch):
        block = {"resnets": [resnet(ch[max(i - 1, 0)] if j == 0 else c, c) for j in range(layers_per_block)]}
        if i < n - 1:
            block["downsamplers"] = [{"conv": conv(c, c, 3)}]
        down.append(block)
    rev, up = ch[::-1], []
    for i, c in enumerate(rev):
        block = {"resnets": [resnet(rev[max(i - 1, 0)] if j == 0 else c, c) for j in range(layers_per_block + 1)]}
        if i < n - 1:
            block["upsamplers"] = [{"conv": conv(c, c, 3)}]
        up.append(block)
    return {
        "encoder": {"conv_in": conv(ch[0], in_channels, 3), "down_blocks": down, "mid_block": mid(top),
                    "conv_norm_out": norm(top), "conv_out": conv(2 * latent_channels, top, 3)},
        "quant_conv": conv(2 * latent_channels, 2 * latent_channels, 1),
        "post_quant_conv": conv(latent_channels, latent_channels, 1),
        "decoder": {"conv_in": conv(top, latent_channels, 3), "mid_block": mid(top), "up_blocks": up,
                    "conv_norm_out": norm(ch[0]), "conv_out": conv(in_channels, ch[0], 3)},
    }


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


def encode(params, images, config):
    """images float32 [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, 4, H/8, W/8], unscaled.

    The posterior is a diagonal Gaussian N(mean, exp(logvar)); logvar is clamped to [-30, 20] as
    diffusers' DiagonalGaussianDistribution does. Images are encoded one at a time (bounded memory).
    """
    _check_params(params, "encoder")
    cin = params["encoder"]["conv_in"]["weight"].shape[1]
    images = _check_input(images, cin, "images", "convert HWC images with x.transpose(2, 0, 1) and scale to [-1, 1]")
    moments = []
    for i in range(images.shape[0]):
        m = encoder(params["encoder"], images[i:i + 1], config)           # [1, 8, h, w]
        if "quant_conv" in params:
            m = nn.conv2d(m, **params["quant_conv"])                       # 1x1: [1, 8, h, w]
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


def _decode_one(params, z, config):
    # z [1, 4, h, w] -> [1, 3, f*h, f*w]
    if "post_quant_conv" in params:
        z = nn.conv2d(z, **params["post_quant_conv"])                      # 1x1: [1, 4, h, w]
    return decoder(params["decoder"], z, config)


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


def decode(params, latents, config, tile_size=None):
    """Unscaled latents [B, 4, h, w] -> images float32 [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped).

    tile_size=None decodes in one piece. tile_size=T (latent pixels, a multiple of 4; 64 gives
    diffusers' tiles for SD v1.x) decodes latents larger than T in overlapping T x T tiles blended
    linearly, so memory is that of one T x T decode whatever the image size; the result differs
    slightly from the untiled one (docs/vae.md). Images are decoded one at a time.
    """
    _check_params(params, "decoder")
    cin = (params.get("post_quant_conv") or params["decoder"]["conv_in"])["weight"].shape[1]
    latents = _check_input(latents, cin, "latents", "pass unscaled latents (divide by config['scaling_factor'])")
    if tile_size is not None and (int(tile_size) != tile_size or tile_size < 4 or tile_size % 4):
        raise InputError(f"tile_size must be a multiple of 4 latent pixels (e.g. 64), got {tile_size!r}")
    images = []
    for i in range(latents.shape[0]):
        z = latents[i:i + 1]                                               # [1, 4, h, w]
        if tile_size is not None and max(z.shape[2:]) > tile_size:
            images.append(_decode_tiled(params, z, config, int(tile_size)))
        else:
            images.append(_decode_one(params, z, config))
    return np.concatenate(images)                                          # [B, 3, 8h, 8w]
