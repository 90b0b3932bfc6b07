"""The UNet noise predictor of Stable Diffusion v1.x: eps = unet(x_t, t, context).

A forward pass of diffusers' ``UNet2DConditionModel`` (the LDM paper's UNet, Rombach et al. 2022,
sec. 3.3) in NumPy, with parameters named as in diffusers (docs/parameters.md). The structure is
read from the weights: number of levels, resnets per block, which levels have spatial transformers,
channels, input channels (4, or 9 for inpainting checkpoints), transformer depth, linear or 1x1-conv
projections. The config gives what the weights cannot: heads, GroupNorm groups, eps values.

Layout at SD v1.5 size (docs/unet.md has the table with shapes; npsd/architecture.py every parameter's):
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
from .architecture import context_width
from .config import with_fallbacks
from .errors import InputError
from .params import flatten
from .tome import TokenMerging, check_ratio
from .trace import record as _record, scope as _scope

# an npsd.attention_maps.AttentionMaps while a generation collects cross-attention maps, else None
_collector = None


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def time_embedding(p, t, batch, dim, w_emb=None, trace=None):
    """t scalar or [B] -> temb [B, 4*dim] (DDPM's sinusoidal embedding, then a 2-layer MLP).
    w_emb: an LCM UNet's guidance-scale embedding [B, D] (guidance_embedding), projected and added."""
    t = np.broadcast_to(np.atleast_1d(np.asarray(t, dtype=np.float32)), (batch,))   # [B]
    # emb = [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2)), i < dim/2 (flip_sin_to_cos, shift 0)
    emb = nn.timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0)          # [B] -> [B, 320]
    _record(trace, ":in", emb)
    if "cond_proj" in p:                                                             # LCM (Luo et al. 2023)
        emb = emb + nn.linear(np.broadcast_to(w_emb, (batch, w_emb.shape[-1])), **p["cond_proj"])  # + [B, 320]
    emb = nn.silu(nn.linear(emb, **p["linear_1"]))                                   # [B, 320] -> [B, 1280]
    temb = nn.linear(emb, **p["linear_2"])                                           # [B, 1280] -> [B, 1280]
    _record(trace, "", temb)
    return temb


def resnet(p, x, temb, config, trace=None):
    """ResBlock (Ho et al. 2020, as in LDM): x [B, Cin, H, W], temb [B, T] -> [B, Cout, H, W].

    h = conv1(SiLU(GN(x))) + W_t SiLU(temb);  out = skip(x) + conv2(SiLU(GN(h)))
    (dropout is the identity at inference; skip is a 1x1 conv when Cin != Cout, else identity).
    """
    _record(trace, ":in", x)
    groups, eps = config["norm_groups"], config["resnet_eps"]
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
    _record(trace, "", h)
    return h


def attention(p, x, context, heads, trace=None):
    """Multi-head attention (Vaswani et al. 2017, eq. 1) with diffusers' names.

    x [B, N, C] queries; context [B, M, Cc] keys/values (None: self-attention) -> [B, N, C].
    """
    _record(trace, ":in", x)
    if context is None:                                                               # self-attention
        q, k, v = nn.linears(x, p["to_q"], p["to_k"], p["to_v"])                      # 3 x [B, N, C]
    else:                                                                             # cross-attention
        q = nn.linear(x, **p["to_q"])                                                 # [B, N, C]
        k, v = nn.linears(context, p["to_k"], p["to_v"])                              # 2 x [B, M, C]
    if _collector is not None and context is not None:                                # cross-attention maps:
        _collector.record(q, k, heads)                                                # npsd/attention_maps.py
    # softmax(q k^T / sqrt(d)) v per head, queries in chunks of settings.CHUNK_BYTES
    out = nn.attention(q, k, v, heads)                                                # [B, N, C]
    del q, k, v
    out = nn.linear(out, **p["to_out"][0])                                            # [B, N, C]
    _record(trace, "", out)
    return out


def transformer_block(p, x, context, heads, config, trace=None, tome=None):
    """BasicTransformerBlock: pre-LayerNorm self-attention, cross-attention, GEGLU MLP; x [B, N, C].

    x += attn1(LN(x));  x += attn2(LN(x), context);  x += W2 GEGLU(LN(x))   (modified in place)
    tome: an npsd.tome.TokenMerging, or None; where it applies, x += unmerge(attn1(merge(LN(x)))).
    """
    _record(trace, ":in", x)                                                                # before x changes in place
    eps = config["layer_norm_eps"]
    if tome is None or not tome.applies(x.shape[1]):
        x += attention(p["attn1"], nn.layer_norm(x, **p["norm1"], eps=eps), None, heads, _scope(trace, "attn1"))
    else:                           # ToMe (npsd/tome.py): attend over N - r tokens, the metric is x
        merge, unmerge = tome.matching(x)
        h = merge(nn.layer_norm(x, **p["norm1"], eps=eps))                                  # [B, N - r, C]
        x += unmerge(attention(p["attn1"], h, None, heads, _scope(trace, "attn1")))         # [B, N, C]
    x += attention(p["attn2"], nn.layer_norm(x, **p["norm2"], eps=eps), context, heads, _scope(trace, "attn2"))
    # GEGLU feed-forward (Shazeer 2020): value * GELU(gate), [B, N, C] -> [B, N, 4C] -> [B, N, C]
    h = nn.layer_norm(x, **p["norm3"], eps=eps)                                             # [B, N, C]
    _record(trace, "ff:in", h)
    h = nn.geglu(h, **p["ff"]["net"][0]["proj"])                                            # [B, N, 4C]
    h = nn.linear(h, **p["ff"]["net"][2])                                                   # [B, N, C]
    _record(trace, "ff", h)
    x += h
    _record(trace, "", x)
    return x


def spatial_transformer(p, x, context, heads, config, trace=None, tome=None):
    """Transformer2DModel: GN, proj_in, transformer blocks over the H*W tokens, proj_out, residual.

    x [B, C, H, W], context [B, M, Cc] -> [B, C, H, W].
    """
    _record(trace, ":in", x)
    b, c, hh, ww = x.shape
    h = nn.group_norm(x, config["norm_groups"], **p["norm"], eps=config["transformer_eps"])  # [B, C, H, W]
    h = h.reshape(b, c, hh * ww).transpose(0, 2, 1)                                     # [B, H*W, C] (view)
    h = nn.linear_or_conv1x1(h, **p["proj_in"])                                         # [B, H*W, C]
    for k, block in enumerate(p["transformer_blocks"]):
        h = transformer_block(block, h, context, heads, config, _scope(trace, f"transformer_blocks.{k}"),
                              tome)                                                     # [B, H*W, C]
    h = h.transpose(0, 2, 1).reshape(b, c, hh, ww)                                      # [B, C, H, W] (view)
    h = nn.conv1x1(h, **p["proj_out"])                                                  # [B, C, H, W]
    h += x
    _record(trace, "", h)
    return h


def down_block(p, x, temb, context, heads, config, trace=None, tome=None):
    """(CrossAttn)DownBlock2D: x [B, Cin, H, W] -> (output, skips) with output [B, C, H/2, W/2]
    (H/2 rounded up; no downsampler on the last level) and one skip per resnet and downsampler."""
    _record(trace, ":in", x)
    skips = []
    for j, res in enumerate(p["resnets"]):
        x = resnet(res, x, temb, config, _scope(trace, f"resnets.{j}"))                 # [B, C, H, W]
        if "attentions" in p:
            x = spatial_transformer(p["attentions"][j], x, context, heads, config,
                                    _scope(trace, f"attentions.{j}"), tome)             # [B, C, H, W]
        skips.append(x)
    if "downsamplers" in p:
        _record(trace, "downsamplers.0:in", x)
        # stride-2 3x3 conv, padding 1: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]
        x = nn.conv2d(x, **p["downsamplers"][0]["conv"], stride=2, padding=1)
        _record(trace, "downsamplers.0", x)
        skips.append(x)
    _record(trace, "", x)
    return x, skips


def mid_block(p, x, temb, context, heads, config, trace=None, tome=None):
    """UNetMidBlock2DCrossAttn: ResBlock, then (transformer, ResBlock) pairs; [B, C, h, w] kept."""
    _record(trace, ":in", x)
    x = resnet(p["resnets"][0], x, temb, config, _scope(trace, "resnets.0"))
    for j, res in enumerate(p["resnets"][1:]):
        if "attentions" in p:
            x = spatial_transformer(p["attentions"][j], x, context, heads, config, _scope(trace, f"attentions.{j}"),
                                    tome)
        x = resnet(res, x, temb, config, _scope(trace, f"resnets.{j + 1}"))
    _record(trace, "", x)
    return x


def up_block(p, x, skips, temb, context, heads, config, size, trace=None, tome=None):
    """(CrossAttn)UpBlock2D: each resnet takes [x, skip] concatenated on channels (the skips are
    popped from the end of `skips`, last in first out); then nearest upsampling to `size` (the
    spatial size of the next skip, so odd sizes round-trip) and a 3x3 conv."""
    _record(trace, ":in", x)
    for j, res in enumerate(p["resnets"]):
        x = np.concatenate([x, skips.pop()], axis=1)                                    # [B, C + Cskip, H, W]
        x = resnet(res, x, temb, config, _scope(trace, f"resnets.{j}"))                 # [B, C', H, W]
        if "attentions" in p:
            x = spatial_transformer(p["attentions"][j], x, context, heads, config, _scope(trace, f"attentions.{j}"),
                                    tome)
    if "upsamplers" in p:
        _record(trace, "upsamplers.0:in", x)
        x = nn.upsample_nearest(x, size)                                                # [B, C', H, W] -> [B, C', size]
        x = nn.conv2d(x, **p["upsamplers"][0]["conv"], padding=1)
        _record(trace, "upsamplers.0", x)
    _record(trace, "", x)
    return x


# ---------------------------------------------------------------------------------------------
# The whole UNet
# ---------------------------------------------------------------------------------------------

def unet(params, latents, t, context, config, trace=None, w_emb=None, token_merging_ratio=0.0):
    """Predict the noise in `latents` (LDM eq. 2: eps_theta(z_t, t, tau(y))).

    params:  the UNet's nested params (diffusers UNet2DConditionModel names)
    latents: [B, C, h, w] float32 (C = 4, or 9 for inpainting: latents, mask, masked-image latents);
             any h, w >= 1 (sizes that do not halve evenly work as in diffusers)
    t:       scalar or [B] timesteps (may be fractional)
    context: [B, L, Cc] text encoder states (L = 77, or 77*k for long prompts; Cc = 768 for SD v1)
    config:  the "unet" section of a model's config (num_heads, norm_groups, eps values); a key it
             lacks takes SD v1.x's value (npsd.config.SD15["unet"])
    trace:   None, or an npsd.trace.Trace: every block's input and output is recorded under diffusers'
             module names ("unet.conv_in", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2",
             ...; docs/traces.md); or a dict, which receives the top-level block outputs without
             the "unet." ("conv_in", "time_embedding", "down_blocks.0", ..., "mid_block", "up_blocks.3")
    w_emb:   an LCM UNet's (time_embedding.cond_proj) guidance_embedding(w) [1 or B, D]; else None
    token_merging_ratio: ToMe's (npsd/tome.py), in [0, 0.9]: the share of the tokens merged before
             self-attention in the transformer blocks at the full h x w map; 0: none (as before, at no cost)
    returns  eps [B, out_channels, h, w]
    """
    if isinstance(trace, dict):
        return _unet_into_dict(params, latents, t, context, config, trace, w_emb, token_merging_ratio)
    if ("cond_proj" in params["time_embedding"]) != (w_emb is not None):
        raise InputError("an LCM UNet (time_embedding.cond_proj) needs w_emb=guidance_embedding(w, D), and only "
                         "it takes one")
    trace = _scope(trace, "unet")                                                       # None: nothing recorded
    config = with_fallbacks("unet", config)
    latents, t, context = _check_inputs(params, latents, t, context)
    b = latents.shape[0]
    levels = len(params["down_blocks"])
    heads = _heads(config["num_heads"], levels)                                         # one per level
    ratio = check_ratio(token_merging_ratio)
    tome = TokenMerging(ratio, *latents.shape[2:]) if ratio else None                  # None: no merging

    _record(trace, ":in", latents)
    dim = params["time_embedding"]["linear_1"]["weight"].shape[1]                     # 320 = block_out_channels[0]
    temb = time_embedding(params["time_embedding"], t, b, dim, w_emb,
                          _scope(trace, "time_embedding"))                              # [B, 1280]
    _record(trace, "conv_in:in", latents)
    x = nn.conv2d(latents, **params["conv_in"], padding=1)                              # [B, 320, h, w]
    _record(trace, "conv_in", x)

    skips = [x]                                                                         # 1 + 3 + 3 + 3 + 2 = 12 at SD size
    for i, block in enumerate(params["down_blocks"]):
        x, block_skips = down_block(block, x, temb, context, heads[i], config,
                                    _scope(trace, f"down_blocks.{i}"), tome)            # [B, C_i, h/2^i.., ..]
        skips += block_skips

    if "mid_block" in params:
        x = mid_block(params["mid_block"], x, temb, context, heads[-1], config,
                      _scope(trace, "mid_block"), tome)                                 # [B, 1280, h/8, w/8]

    for i, block in enumerate(params["up_blocks"]):
        n = len(block["resnets"])
        # the upsampler goes to the size of the skip that the next up block takes first
        size = skips[-n - 1].shape[2:] if "upsamplers" in block else None
        x = up_block(block, x, skips, temb, context, heads[levels - 1 - i], config, size,
                     _scope(trace, f"up_blocks.{i}"), tome)                             # pops n skips

    _record(trace, "conv_norm_out:in", x)
    x = nn.group_norm(x, config["norm_groups"], **params["conv_norm_out"], eps=config["resnet_eps"])  # [B, 320, h, w]
    _record(trace, "conv_norm_out", x)
    x = nn.silu(x)
    _record(trace, "conv_out:in", x)
    x = nn.conv2d(x, **params["conv_out"], padding=1)                                   # [B, 320, h, w] -> [B, 4, h, w]
    _record(trace, "conv_out", x)
    _record(trace, "", x)
    return x


def _unet_into_dict(params, latents, t, context, config, into, w_emb=None, token_merging_ratio=0.0):
    """unet(..., trace={}): a Trace of the top-level block outputs, copied into the dict."""
    from .trace import Trace
    top = Trace(only=r"unet\.(time_embedding|conv_in|down_blocks\.\d+|mid_block|up_blocks\.\d+)")
    eps = unet(params, latents, t, context, config, trace=top, w_emb=w_emb, token_merging_ratio=token_merging_ratio)
    into.update({name[len("unet."):]: x for name, x in top.tensors.items()})
    return eps


def guidance_embedding(w, dim):
    """An LCM UNet's input for the guidance scale w (Luo et al. 2023, as diffusers'
    get_guidance_scale_embedding): the sinusoid of 1000 (w - 1), sin half first -> [len(w), dim]."""
    w = (np.atleast_1d(np.asarray(w, dtype=np.float32)) - np.float32(1)) * np.float32(1000)   # [n]
    half = dim // 2
    # f_i = exp(-i ln(10000) / (half - 1)), in diffusers' float32 order of operations: the arguments
    # reach 14000, where one ulp of a frequency moves sin(w f_i) by 1e-3
    step = np.float32(np.log(10000.0)) / np.float32(half - 1)
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)
    args = (w[:, None] * freqs[None, :]).astype(np.float64)                          # [n, half]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)                      # [n, 2 half]
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)                    # [n, dim]


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
    cc = context_width({name: w.shape for name, w in flatten(params).items()})        # 768 for SD v1.x
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
