"""The UNet noise predictor of Stable Diffusion v1.x: eps = unet(x_t, t, context).

A forward pass of diffusers' ``UNet2DConditionModel`` (the LDM paper's UNet, Rombach et al. 2022,
sec. 3.3) in NumPy, with parameters named as in diffusers (docs/parameters.md). The structure is
read from the weights: number of levels, resnets per block, which levels have spatial transformers,
channels, input channels (4, or 9 for inpainting checkpoints), transformer depth, linear or 1x1-conv
projections. The config gives what the weights cannot: heads, GroupNorm groups, eps values.

Layout at SD v1.5 size (docs/unet.md has the table with shapes):
    time_embedding: sinusoid(t) [B,320] -> linear -> SiLU -> linear -> temb [B,1280]
    conv_in:        [B,4,h,w] -> [B,320,h,w]
    down_blocks:    4 levels (320, 640, 1280, 1280); each: 2 x (ResBlock [+ transformer]),
                    then a stride-2 conv (not on the last level); every output is kept as a skip
    mid_block:      ResBlock, transformer, ResBlock at [B,1280,h/8,w/8]
    up_blocks:      4 levels (1280, 1280, 640, 320); each: 3 x (concat skip, ResBlock
                    [+ transformer]), then nearest upsampling to the next skip's size + conv
    conv_norm_out, SiLU, conv_out: [B,320,h,w] -> eps [B,4,h,w]
"""

import numpy as np

from . import nn
from .errors import InputError
from .params import unflatten


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def time_embedding(p, t, batch, dim):
    """t scalar or [B] -> temb [B, 4*dim] (DDPM's sinusoidal embedding, then a 2-layer MLP)."""
    t = np.broadcast_to(np.atleast_1d(np.asarray(t, dtype=np.float32)), (batch,))   # [B]
    # emb = [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2)), i < dim/2 (flip_sin_to_cos, shift 0)
    emb = nn.timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0)          # [B] -> [B, 320]
    emb = nn.silu(nn.linear(emb, **p["linear_1"]))                                   # [B, 320] -> [B, 1280]
    return nn.linear(emb, **p["linear_2"])                                           # [B, 1280] -> [B, 1280]


def resnet(p, x, temb, cfg):
    """ResBlock (Ho et al. 2020, as in LDM): x [B, Cin, H, W], temb [B, T] -> [B, Cout, H, W].

    h = conv1(SiLU(GN(x))) + W_t SiLU(temb);  out = skip(x) + conv2(SiLU(GN(h)))
    (dropout is the identity at inference; skip is a 1x1 conv when Cin != Cout, else identity).
    """
    groups, eps = cfg["norm_groups"], cfg["resnet_eps"]
    h = nn.silu(nn.group_norm(x, groups, **p["norm1"], eps=eps))                      # [B, Cin, H, W]
    h = nn.conv2d(h, **p["conv1"], padding=1)                                         # -> [B, Cout, H, W]
    # the timestep enters as a per-channel bias: [B, T] -> [B, Cout] -> [B, Cout, 1, 1]
    h += nn.linear(nn.silu(temb), **p["time_emb_proj"])[:, :, None, None]
    h = nn.silu(nn.group_norm(h, groups, **p["norm2"], eps=eps))                      # [B, Cout, H, W]
    h = nn.conv2d(h, **p["conv2"], padding=1)                                         # [B, Cout, H, W]
    if "conv_shortcut" in p:
        h += nn.conv2d(x, **p["conv_shortcut"])                                       # 1x1: [B, Cin, ..] -> [B, Cout, ..]
    else:
        h += x
    return h


def attention(p, x, context, heads):
    """Multi-head attention (Vaswani et al. 2017, eq. 1) with diffusers' names.

    x [B, N, C] queries; context [B, M, Cc] keys/values (None: self-attention) -> [B, N, C].
    """
    kv = x if context is None else context
    q = nn.linear(x, **p["to_q"])                                                     # [B, N, C]
    k = nn.linear(kv, **p["to_k"])                                                    # [B, M, C]
    v = nn.linear(kv, **p["to_v"])                                                    # [B, M, C]
    # softmax(q k^T / sqrt(d)) v per head, queries in chunks of nn.CHUNK_BYTES
    out = nn.attention(q, k, v, heads)                                                # [B, N, C]
    del q, k, v
    return nn.linear(out, **p["to_out"][0])                                           # [B, N, C]


def transformer_block(p, x, context, heads, cfg):
    """BasicTransformerBlock: pre-LayerNorm self-attention, cross-attention, GEGLU MLP; x [B, N, C].

    x += attn1(LN(x));  x += attn2(LN(x), context);  x += W2 GEGLU(LN(x))   (modified in place)
    """
    eps = cfg["layer_norm_eps"]
    x += attention(p["attn1"], nn.layer_norm(x, **p["norm1"], eps=eps), None, heads)        # [B, N, C]
    x += attention(p["attn2"], nn.layer_norm(x, **p["norm2"], eps=eps), context, heads)     # [B, N, C]
    # GEGLU feed-forward (Shazeer 2020): value * GELU(gate), [B, N, C] -> [B, N, 4C] -> [B, N, C]
    h = nn.geglu(nn.layer_norm(x, **p["norm3"], eps=eps), **p["ff"]["net"][0]["proj"])      # [B, N, 4C]
    x += nn.linear(h, **p["ff"]["net"][2])                                                  # [B, N, C]
    return x


def spatial_transformer(p, x, context, heads, cfg):
    """Transformer2DModel: GN, proj_in, transformer blocks over the H*W tokens, proj_out, residual.

    x [B, C, H, W], context [B, M, Cc] -> [B, C, H, W].
    """
    b, c, hh, ww = x.shape
    h = nn.group_norm(x, cfg["norm_groups"], **p["norm"], eps=cfg["transformer_eps"])   # [B, C, H, W]
    h = h.reshape(b, c, hh * ww).transpose(0, 2, 1)                                     # [B, H*W, C] (view)
    h = nn.pointwise(h, **p["proj_in"])                                                 # [B, H*W, C]
    for block in p["transformer_blocks"]:
        h = transformer_block(block, h, context, heads, cfg)                            # [B, H*W, C]
    h = nn.pointwise(h, **p["proj_out"])                                                # [B, H*W, C]
    h = h.transpose(0, 2, 1).reshape(b, c, hh, ww)                                      # [B, C, H, W]
    h += x
    return h


def down_block(p, x, temb, context, heads, cfg):
    """(CrossAttn)DownBlock2D: x [B, Cin, H, W] -> (output, skips) with output [B, C, H/2, W/2]
    (H/2 rounded up; no downsampler on the last level) and one skip per resnet and downsampler."""
    skips = []
    for j, res in enumerate(p["resnets"]):
        x = resnet(res, x, temb, cfg)                                                   # [B, C, H, W]
        if "attentions" in p:
            x = spatial_transformer(p["attentions"][j], x, context, heads, cfg)         # [B, C, H, W]
        skips.append(x)
    if "downsamplers" in p:
        # stride-2 3x3 conv, padding 1: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]
        x = nn.conv2d(x, **p["downsamplers"][0]["conv"], stride=2, padding=1)
        skips.append(x)
    return x, skips


def mid_block(p, x, temb, context, heads, cfg):
    """UNetMidBlock2DCrossAttn: ResBlock, then (transformer, ResBlock) pairs; [B, C, h, w] kept."""
    x = resnet(p["resnets"][0], x, temb, cfg)
    for j, res in enumerate(p["resnets"][1:]):
        if "attentions" in p:
            x = spatial_transformer(p["attentions"][j], x, context, heads, cfg)
        x = resnet(res, x, temb, cfg)
    return x


def up_block(p, x, skips, temb, context, heads, cfg, size):
    """(CrossAttn)UpBlock2D: each resnet takes [x, skip] concatenated on channels (the skips are
    popped from the end of `skips`, last in first out); then nearest upsampling to `size` (the
    spatial size of the next skip, so odd sizes round-trip) and a 3x3 conv."""
    for j, res in enumerate(p["resnets"]):
        x = np.concatenate([x, skips.pop()], axis=1)                                    # [B, C + Cskip, H, W]
        x = resnet(res, x, temb, cfg)                                                   # [B, C', H, W]
        if "attentions" in p:
            x = spatial_transformer(p["attentions"][j], x, context, heads, cfg)
    if "upsamplers" in p:
        x = nn.upsample_nearest(x, size)                                                # [B, C', H, W] -> [B, C', size]
        x = nn.conv2d(x, **p["upsamplers"][0]["conv"], padding=1)
    return x


# ---------------------------------------------------------------------------------------------
# The whole UNet
# ---------------------------------------------------------------------------------------------

def unet(params, latents, t, context, config, trace=None):
    """Predict the noise in `latents` (LDM eq. 2: eps_theta(z_t, t, tau(y))).

    params:  the UNet's nested params (diffusers UNet2DConditionModel names)
    latents: [B, C, h, w] float32 (C = 4, or 9 for inpainting: latents, mask, masked-image latents);
             any h, w >= 1 (sizes that do not halve evenly work as in diffusers)
    t:       scalar or [B] timesteps (may be fractional)
    context: [B, L, Cc] text encoder states (L = 77, or 77*k for long prompts; Cc = 768 for SD v1)
    config:  the "unet" section of npsd.config (num_heads, norm_groups, eps values)
    trace:   optional dict; if given, block outputs are stored in it under diffusers' module names
             ("conv_in", "time_embedding", "down_blocks.0", ..., "mid_block", "up_blocks.3")
    returns  eps [B, out_channels, h, w]
    """
    cfg = _settings(config)
    latents, t, context = _check_inputs(params, latents, t, context)
    b = latents.shape[0]
    levels = len(params["down_blocks"])
    heads = _heads(cfg["num_heads"], levels)                                            # one per level

    dim = params["time_embedding"]["linear_1"]["weight"].shape[1]                     # 320 = block_out_channels[0]
    temb = time_embedding(params["time_embedding"], t, b, dim)                          # [B, 1280]
    x = nn.conv2d(latents, **params["conv_in"], padding=1)                              # [B, 320, h, w]
    _record(trace, "time_embedding", temb)
    _record(trace, "conv_in", x)

    skips = [x]                                                                         # 1 + 3 + 3 + 3 + 2 = 12 at SD size
    for i, block in enumerate(params["down_blocks"]):
        x, block_skips = down_block(block, x, temb, context, heads[i], cfg)             # [B, C_i, h/2^i.., ..]
        skips += block_skips
        _record(trace, f"down_blocks.{i}", x)

    if "mid_block" in params:
        x = mid_block(params["mid_block"], x, temb, context, heads[-1], cfg)            # [B, 1280, h/8, w/8]
        _record(trace, "mid_block", x)

    for i, block in enumerate(params["up_blocks"]):
        n = len(block["resnets"])
        # the upsampler goes to the size of the skip that the next up block takes first
        size = skips[-n - 1].shape[2:] if "upsamplers" in block else None
        x = up_block(block, x, skips, temb, context, heads[levels - 1 - i], cfg, size)  # pops n skips
        _record(trace, f"up_blocks.{i}", x)

    x = nn.group_norm(x, cfg["norm_groups"], **params["conv_norm_out"], eps=cfg["resnet_eps"])  # [B, 320, h, w]
    x = nn.silu(x)
    return nn.conv2d(x, **params["conv_out"], padding=1)                                # [B, 320, h, w] -> [B, 4, h, w]


def _record(trace, name, x):
    if trace is not None:
        trace[name] = x


_DEFAULTS = {"num_heads": 8, "norm_groups": 32, "resnet_eps": 1e-5, "transformer_eps": 1e-6, "layer_norm_eps": 1e-5}


def _settings(config):
    cfg = dict(_DEFAULTS)
    cfg.update(config or {})
    return cfg


def _heads(num_heads, levels):
    # SD v1.x: 8 heads everywhere (diffusers calls this "attention_head_dim": 8); a list gives one
    # per down level, the up path uses them in reverse and the mid block the last one
    if np.isscalar(num_heads):
        return [int(num_heads)] * levels
    num_heads = [int(h) for h in num_heads]
    if len(num_heads) != levels:
        raise InputError(f"config num_heads has {len(num_heads)} entries but the UNet has {levels} levels; "
                         "give one number or one per level")
    return num_heads


def _check_inputs(params, latents, t, context):
    latents = np.asarray(latents, dtype=np.float32)
    context = np.asarray(context, dtype=np.float32)
    cin = params["conv_in"]["weight"].shape[1]
    if latents.ndim != 4 or latents.shape[1] != cin or min(latents.shape) < 1:
        hint = " (an inpainting UNet: concatenate latents, mask and masked-image latents)" if cin == 9 else ""
        raise InputError(f"latents must be [B, {cin}, h, w]{hint}, got shape {latents.shape}")
    b = latents.shape[0]
    cc = _context_dim(params)
    if context.ndim != 3 or (cc is not None and context.shape[2] != cc) or context.shape[1] < 1:
        raise InputError(f"context must be [B, tokens, {cc}] text encoder states, got shape {context.shape}")
    if context.shape[0] != b:
        raise InputError(f"context batch {context.shape[0]} does not match the latent batch {b}; "
                         "give one context per latent (e.g. [uncond, cond] for guidance)")
    t = np.asarray(t, dtype=np.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
        raise InputError(f"t must be a scalar or one timestep per batch item ({b}), got shape {t.shape}")
    if not (np.isfinite(latents).all() and np.isfinite(context).all() and np.isfinite(t).all()):
        raise InputError("latents, t and context must be finite (found NaN or inf)")
    return latents, t, context


def _context_dim(params):
    for block in list(params["down_blocks"]) + [params.get("mid_block", {})]:
        if "attentions" in block:
            return block["attentions"][0]["transformer_blocks"][0]["attn2"]["to_k"]["weight"].shape[1]
    return None


# ---------------------------------------------------------------------------------------------
# Random weights of the same layout (docs, memory tests)
# ---------------------------------------------------------------------------------------------

def param_shapes(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_levels=(True, True, True, False), in_channels=4, out_channels=4,
                 context_dim=768, transformer_depth=1):
    """{diffusers name: shape} of a UNet of SD v1's design; the defaults give SD v1.5's 686 tensors."""
    shapes = {}
    temb = 4 * block_out_channels[0]

    def add(prefix, **named):
        for name, shape in named.items():
            shapes[f"{prefix}.{name}"] = tuple(shape)

    def norm(prefix, c):
        add(prefix, weight=(c,), bias=(c,))

    def res(prefix, cin, cout):
        norm(prefix + ".norm1", cin)
        add(prefix + ".conv1", weight=(cout, cin, 3, 3), bias=(cout,))
        add(prefix + ".time_emb_proj", weight=(cout, temb), bias=(cout,))
        norm(prefix + ".norm2", cout)
        add(prefix + ".conv2", weight=(cout, cout, 3, 3), bias=(cout,))
        if cin != cout:
            add(prefix + ".conv_shortcut", weight=(cout, cin, 1, 1), bias=(cout,))

    def attn(prefix, c):
        norm(prefix + ".norm", c)
        add(prefix + ".proj_in", weight=(c, c, 1, 1), bias=(c,))
        for d in range(transformer_depth):
            blk = f"{prefix}.transformer_blocks.{d}"
            for k, kv in (("attn1", c), ("attn2", context_dim)):
                add(f"{blk}.{k}", **{"to_q.weight": (c, c), "to_k.weight": (c, kv), "to_v.weight": (c, kv),
                                     "to_out.0.weight": (c, c), "to_out.0.bias": (c,)})
            for n in ("norm1", "norm2", "norm3"):
                norm(f"{blk}.{n}", c)
            add(blk + ".ff.net", **{"0.proj.weight": (8 * c, c), "0.proj.bias": (8 * c,),
                                    "2.weight": (c, 4 * c), "2.bias": (c,)})
        add(prefix + ".proj_out", weight=(c, c, 1, 1), bias=(c,))

    c0, levels = block_out_channels[0], len(block_out_channels)
    add("conv_in", weight=(c0, in_channels, 3, 3), bias=(c0,))
    add("time_embedding", **{"linear_1.weight": (temb, c0), "linear_1.bias": (temb,),
                             "linear_2.weight": (temb, temb), "linear_2.bias": (temb,)})
    cin = c0
    for i, c in enumerate(block_out_channels):
        for j in range(layers_per_block):
            res(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
            if attention_levels[i]:
                attn(f"down_blocks.{i}.attentions.{j}", c)
        if i < levels - 1:
            add(f"down_blocks.{i}.downsamplers.0.conv", weight=(c, c, 3, 3), bias=(c,))
        cin = c
    cm = block_out_channels[-1]
    res("mid_block.resnets.0", cm, cm)
    attn("mid_block.attentions.0", cm)
    res("mid_block.resnets.1", cm, cm)
    prev = cm
    for i in range(levels):
        level = levels - 1 - i
        c = block_out_channels[level]
        skip_in = block_out_channels[max(level - 1, 0)]       # channels of the down level before this one
        for j in range(layers_per_block + 1):
            skip = skip_in if j == layers_per_block else c
            res(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else c) + skip, c)
            if attention_levels[level]:
                attn(f"up_blocks.{i}.attentions.{j}", c)
        if i < levels - 1:
            add(f"up_blocks.{i}.upsamplers.0.conv", weight=(c, c, 3, 3), bias=(c,))
        prev = c
    norm("conv_norm_out", c0)
    add("conv_out", weight=(out_channels, c0, 3, 3), bias=(out_channels,))
    return shapes


def random_params(seed=0, **design):
    """Random params for param_shapes(**design): weights N(0, 1/fan_in), norm weights 1 + 0.1 N,
    biases 0.1 N (DECISIONS: fan-in-scaled, every parameter non-trivial). float32, generated in place."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in param_shapes(**design).items():
        a = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("bias"):
            a *= np.float32(0.1)
        elif len(shape) == 1:                                  # norm weight
            a *= np.float32(0.1)
            a += np.float32(1.0)
        else:
            a *= np.float32(1 / np.sqrt(np.prod(shape[1:])))
        flat[name] = a
    return unflatten(flat)
