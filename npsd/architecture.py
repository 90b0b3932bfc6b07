"""The architectures npsd runs, each described once: a design, and every parameter's name and shape.

A design is the handful of numbers that fix a component's architecture, named as in diffusers' and
transformers' config.json; the defaults are SD v1.5's. Per component, both directions:

    design = unet_design(shapes)      # read back from a checkpoint's {diffusers name: shape}
    shapes = unet_shapes(design)      # {diffusers name: shape} of every tensor the forward pass uses

and likewise vae_* and text_encoder_*. The loader reads a file's design from a few anchor tensors and
checks every tensor against that design's shapes (npsd.loading.check); random_params(shapes, rng)
gives random weights of any design (tests, docs). What the weights cannot say (heads, GroupNorm
groups, eps values, the latent scaling factor) is each model's config (npsd.config), not a design.

Where later architectures go (a field here, not a copy of the layout):
- SD 2.x UNet: the same design with `use_linear_projection` (proj_in/proj_out as [C, C] linears, not
  [C, C, 1, 1] convs; read back from proj_in's rank) and cross_attention_dim 1024. Its 64-wide heads
  (5, 10, 20, 20 per level) are config, not design.
- SD 2.x text encoder (OpenCLIP ViT-H): once the loader's name tables map its names onto
  CLIPTextModel's, TextEncoderDesign describes it (width 1024; its GELU is config).
- LCM UNets: `time_cond_proj_dim` (None: absent) adds time_embedding.cond_proj.weight
  [block_out_channels[0], time_cond_proj_dim]: the guidance scale's embedding enters the time embedding.
"""

import re
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError
from .params import unflatten


# --- Designs (defaults: SD v1.5) ------------------------------------------------------------------

@dataclass(frozen=True)
class UNetDesign:
    """diffusers' UNet2DConditionModel in SD v1's design."""
    block_out_channels: tuple = (320, 640, 1280, 1280)    # channels per level; level i works at h/2^i
    layers_per_block: int = 2                             # ResBlocks per down level (an up level has one more)
    attention_levels: tuple = (True, True, True, False)   # levels with a spatial transformer after each ResBlock
    in_channels: int = 4                                  # latent channels (9 for inpainting: + mask + masked image)
    out_channels: int = 4
    cross_attention_dim: int = 768                        # the context's width: the text encoder's width
    transformer_layers_per_block: int = 1                 # transformer blocks in each spatial transformer
    time_embedding_dim: int = None                        # None: 4 x block_out_channels[0] (1280)
    ff_mult: int = 4                                      # GEGLU MLP: C -> 2 x ff_mult x C -> C
    use_linear_projection: bool = False                   # proj_in/out as [C, C] linears (SD 2.x), not 1x1 convs
    time_cond_proj_dim: int = None                        # LCM: width of the guidance-scale embedding (None: none)

    def __post_init__(self):
        object.__setattr__(self, "time_embedding_dim", self.time_embedding_dim or 4 * self.block_out_channels[0])


@dataclass(frozen=True)
class VAEDesign:
    """diffusers' AutoencoderKL (the KL-f8 autoencoder of LDM)."""
    block_out_channels: tuple = (128, 256, 512, 512)      # encoder channels per level (the decoder reverses them)
    layers_per_block: int = 2                             # encoder ResBlocks per level (the decoder has one more)
    latent_channels: int = 4
    in_channels: int = 3                                  # image channels in
    out_channels: int = 3                                 # image channels out


@dataclass(frozen=True)
class TextEncoderDesign:
    """transformers' CLIPTextModel (SD v1.x: OpenAI's ViT-L/14 text tower)."""
    vocab_size: int = 49408
    hidden_size: int = 768                                # the width W, the UNet's context width
    intermediate_size: int = 3072                         # MLP: W -> 4W -> W
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77


# --- Design -> {name: shape} ----------------------------------------------------------------------

class _Shapes(dict):
    """{name: shape}, filled module by module in the order of the forward pass."""

    def linear(self, name, o, i, bias=True):                   # [.., i] -> [.., o]
        self[name + ".weight"] = (o, i)
        if bias:
            self[name + ".bias"] = (o,)

    def conv(self, name, o, i, k):                             # [B, i, H, W] -> [B, o, H, W], k x k
        self[name + ".weight"], self[name + ".bias"] = (o, i, k, k), (o,)

    def norm(self, name, c):                                   # GroupNorm / LayerNorm over c channels
        self[name + ".weight"], self[name + ".bias"] = (c,), (c,)

    def resnet(self, name, i, o, temb=None):
        """ResBlock [B, i, H, W] -> [B, o, H, W]; temb: the UNet's time embedding width (VAE: none)."""
        self.norm(name + ".norm1", i)
        self.conv(name + ".conv1", o, i, 3)
        if temb:
            self.linear(name + ".time_emb_proj", o, temb)
        self.norm(name + ".norm2", o)
        self.conv(name + ".conv2", o, o, 3)
        if i != o:
            self.conv(name + ".conv_shortcut", o, i, 1)             # 1x1 on the residual path


def _transformer(s, name, c, d):
    """Spatial transformer on c channels: GN, proj_in, transformer blocks, proj_out (d: UNetDesign)."""
    s.norm(name + ".norm", c)
    projection = s.linear if d.use_linear_projection else lambda n, o, i: s.conv(n, o, i, 1)
    projection(name + ".proj_in", c, c)
    for k in range(d.transformer_layers_per_block):
        block = f"{name}.transformer_blocks.{k}"
        for attn, kv in (("attn1", c), ("attn2", d.cross_attention_dim)):   # self-, then cross-attention
            for proj, i in (("to_q", c), ("to_k", kv), ("to_v", kv)):
                s.linear(f"{block}.{attn}.{proj}", c, i, bias=False)
            s.linear(f"{block}.{attn}.to_out.0", c, c)
        for n in (1, 2, 3):
            s.norm(f"{block}.norm{n}", c)
        s.linear(f"{block}.ff.net.0.proj", 2 * d.ff_mult * c, c)   # GEGLU: value and gate halves
        s.linear(f"{block}.ff.net.2", c, d.ff_mult * c)
    projection(name + ".proj_out", c, c)


def unet_shapes(d=UNetDesign()):
    """{diffusers name: shape} of a UNet of design d (SD v1.5: 686 tensors), in npsd.unet's order."""
    s, c0, temb = _Shapes(), d.block_out_channels[0], d.time_embedding_dim
    levels = len(d.block_out_channels)
    s.conv("conv_in", c0, d.in_channels, 3)                    # [B, 4, h, w] -> [B, 320, h, w]
    if d.time_cond_proj_dim:                                   # LCM: embedding of w, added to the sinusoid
        s.linear("time_embedding.cond_proj", c0, d.time_cond_proj_dim, bias=False)
    s.linear("time_embedding.linear_1", temb, c0)              # sinusoid [B, 320] -> [B, 1280]
    s.linear("time_embedding.linear_2", temb, temb)
    c, skips = c0, [c0]            # channels of every down-path output, taken back in reverse by the up path
    for l, ch in enumerate(d.block_out_channels):
        for j in range(d.layers_per_block):
            s.resnet(f"down_blocks.{l}.resnets.{j}", c, ch, temb)
            c = ch
            if d.attention_levels[l]:
                _transformer(s, f"down_blocks.{l}.attentions.{j}", c, d)
            skips.append(c)
        if l < levels - 1:                                     # stride-2 conv: h/2^l -> h/2^(l+1)
            s.conv(f"down_blocks.{l}.downsamplers.0.conv", c, c, 3)
            skips.append(c)
    s.resnet("mid_block.resnets.0", c, c, temb)                # at h/8: ResBlock, transformer, ResBlock
    _transformer(s, "mid_block.attentions.0", c, d)
    s.resnet("mid_block.resnets.1", c, c, temb)
    for u in range(levels):                                    # up block u works at down level levels-1-u
        ch = d.block_out_channels[levels - 1 - u]
        for j in range(d.layers_per_block + 1):
            s.resnet(f"up_blocks.{u}.resnets.{j}", c + skips.pop(), ch, temb)   # input: [x, skip] concatenated
            c = ch
            if d.attention_levels[levels - 1 - u]:
                _transformer(s, f"up_blocks.{u}.attentions.{j}", c, d)
        if u < levels - 1:                                     # nearest 2x upsampling, then a 3x3 conv
            s.conv(f"up_blocks.{u}.upsamplers.0.conv", c, c, 3)
    s.norm("conv_norm_out", c)
    s.conv("conv_out", d.out_channels, c, 3)                   # [B, 320, h, w] -> eps [B, 4, h, w]
    return dict(s)


def vae_shapes(d=VAEDesign()):
    """{diffusers name: shape} of an AutoencoderKL of design d (SD v1.5: 248 tensors)."""
    s, ch, levels = _Shapes(), d.block_out_channels, len(d.block_out_channels)
    z = d.latent_channels

    def mid(part, c):                      # ResBlock, one-head self-attention over the pixels, ResBlock
        s.resnet(f"{part}.mid_block.resnets.0", c, c)
        s.norm(f"{part}.mid_block.attentions.0.group_norm", c)
        for k in ("to_q", "to_k", "to_v", "to_out.0"):
            s.linear(f"{part}.mid_block.attentions.0.{k}", c, c)
        s.resnet(f"{part}.mid_block.resnets.1", c, c)

    s.conv("encoder.conv_in", ch[0], d.in_channels, 3)         # [B, 3, H, W] -> [B, 128, H, W]
    c = ch[0]
    for l in range(levels):
        for j in range(d.layers_per_block):
            s.resnet(f"encoder.down_blocks.{l}.resnets.{j}", c, ch[l])
            c = ch[l]
        if l < levels - 1:                                     # stride-2 conv
            s.conv(f"encoder.down_blocks.{l}.downsamplers.0.conv", c, c, 3)
    mid("encoder", c)
    s.norm("encoder.conv_norm_out", c)
    s.conv("encoder.conv_out", 2 * z, c, 3)                    # mean and log-variance: [B, 8, H/8, W/8]
    s.conv("quant_conv", 2 * z, 2 * z, 1)
    s.conv("post_quant_conv", z, z, 1)
    s.conv("decoder.conv_in", c, z, 3)                         # [B, 4, h, w] -> [B, 512, h, w]
    mid("decoder", c)
    for u in range(levels):
        for j in range(d.layers_per_block + 1):
            s.resnet(f"decoder.up_blocks.{u}.resnets.{j}", c, ch[levels - 1 - u])
            c = ch[levels - 1 - u]
        if u < levels - 1:                                     # nearest 2x upsampling, then a 3x3 conv
            s.conv(f"decoder.up_blocks.{u}.upsamplers.0.conv", c, c, 3)
    s.norm("decoder.conv_norm_out", c)
    s.conv("decoder.conv_out", d.out_channels, c, 3)           # [B, 128, H, W] -> [B, 3, H, W]
    return dict(s)


def text_encoder_shapes(d=TextEncoderDesign()):
    """{transformers name without "text_model.": shape} of a CLIPTextModel of design d (SD v1.5: 196)."""
    s, w, m = _Shapes(), d.hidden_size, d.intermediate_size
    s["embeddings.token_embedding.weight"] = (d.vocab_size, w)
    s["embeddings.position_embedding.weight"] = (d.max_position_embeddings, w)
    for i in range(d.num_hidden_layers):
        p = f"encoder.layers.{i}"
        for k in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s.linear(f"{p}.self_attn.{k}", w, w)
        s.norm(f"{p}.layer_norm1", w)
        s.linear(f"{p}.mlp.fc1", m, w)
        s.linear(f"{p}.mlp.fc2", w, m)
        s.norm(f"{p}.layer_norm2", w)
    s.norm("final_layer_norm", w)
    return dict(s)


# --- {name: shape} -> design (from a few anchor tensors; the loader then checks all of them) ------

def block_indices(names, pattern):
    """The sorted indices that `pattern`'s group matches at the start of names (e.g. levels)."""
    return sorted({int(m[1]) for n in names for m in [re.match(pattern, n)] if m})


def _anchor(shapes, component):
    def need(name):
        if name not in shapes:
            raise CheckpointError(f"the {component} weights lack {name}, which npsd needs to know the architecture; "
                                  f"the file is incomplete or not an SD v1.x or 2.x model")
        return shapes[name]
    return need


def _cross_attention(shapes):
    return next((n for n in sorted(shapes) if n.endswith("attn2.to_k.weight") and len(shapes[n]) == 2), None)


def context_width(shapes):
    """The width of the text states a UNet's cross-attention reads (SD v1.x 768, SD 2.x 1024): the
    input width of the first attn2.to_k weight [C, width] in {name: shape}; None without one."""
    name = _cross_attention(shapes)
    return None if name is None else shapes[name][1]


def unet_design(shapes):
    need = _anchor(shapes, "unet")
    levels = len(block_indices(shapes, r"down_blocks\.(\d+)\."))
    channels = tuple(need(f"down_blocks.{l}.resnets.0.conv1.weight")[0] for l in range(levels))
    key = _cross_attention(shapes)
    if key is None:
        raise CheckpointError("the unet weights have no cross-attention (attn2.to_k); not an SD UNet")
    block = key[: -len("attn2.to_k.weight")]                   # <spatial transformer>.transformer_blocks.0.
    blocks = block.rsplit(".transformer_blocks.", 1)[0] + ".transformer_blocks."
    has = lambda prefix: any(n.startswith(prefix) for n in shapes)
    return UNetDesign(
        block_out_channels=channels,
        layers_per_block=len(block_indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")),
        attention_levels=tuple(has(f"down_blocks.{l}.attentions.") for l in range(levels)),
        cross_attention_dim=shapes[key][1],
        ff_mult=need(block + "ff.net.2.weight")[1] // need(block + "attn1.to_q.weight")[0],
        use_linear_projection=len(need(blocks[:-len("transformer_blocks.")] + "proj_in.weight")) == 2,
        transformer_layers_per_block=len(block_indices(shapes, re.escape(blocks) + r"(\d+)\.")),
        time_embedding_dim=need("time_embedding.linear_1.weight")[0],
        time_cond_proj_dim=shapes.get("time_embedding.cond_proj.weight", (None, None))[1],
        in_channels=need("conv_in.weight")[1],
        out_channels=need("conv_out.weight")[0])


def vae_design(shapes):
    need = _anchor(shapes, "vae")
    levels = len(block_indices(shapes, r"encoder\.down_blocks\.(\d+)\."))
    return VAEDesign(
        block_out_channels=tuple(need(f"encoder.down_blocks.{l}.resnets.0.conv1.weight")[0] for l in range(levels)),
        layers_per_block=len(block_indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        latent_channels=need("encoder.conv_out.weight")[0] // 2,      # it outputs mean and log-variance
        in_channels=need("encoder.conv_in.weight")[1],
        out_channels=need("decoder.conv_out.weight")[0])


def text_encoder_design(shapes):
    need = _anchor(shapes, "text_encoder")
    vocab, width = need("embeddings.token_embedding.weight")
    return TextEncoderDesign(
        vocab_size=vocab, hidden_size=width,
        max_position_embeddings=need("embeddings.position_embedding.weight")[0],
        intermediate_size=need("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(block_indices(shapes, r"encoder\.layers\.(\d+)\.")))


# --- Random weights of any design (tests, docs, memory measurements) ------------------------------

def random_params(shapes, rng):
    """Nested float32 params with the given {name: shape}, drawn in order from rng (a
    np.random.Generator): weights N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1),
    so every parameter matters and fp16 stays finite. Each tensor is scaled in place (no temporaries)."""
    flat = {}
    for name, shape in shapes.items():
        a = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("bias"):
            a *= np.float32(0.1)
        elif len(shape) == 1:                                  # a norm's weight
            a *= np.float32(0.1)
            a += np.float32(1.0)
        else:
            a *= np.float32(1 / np.sqrt(np.prod(shape[1:])))
        flat[name] = a
    return unflatten(flat)
