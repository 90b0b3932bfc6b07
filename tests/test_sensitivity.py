"""The parity checks can fail: small real bugs (tests.helpers.BUGS) injected into npsd make the
comparison with torch fail on its tolerance, at the level of one layer and of one block.

Whole components at full SD v1.5 size and whole pipelines do the same in their own files, on the
reference outputs they already compute: tests/test_unet.py and tests/test_clip.py
(test_full_size_sensitivity), tests/test_vae.py (test_sd15_sensitivity) and
tests/test_pipeline_full.py (test_full_size_pipeline_sensitivity).

Each case below is one parity check: npsd against torch on the same inputs and weights, with one
tolerance. test_clean runs it as npsd is (it must pass; -s prints the measured error), and
test_bug runs it with each bug that the layer or block contains injected: it must fail because
the error exceeds the tolerance (`assert_caught` checks the message of npsd.testing.assert_close
and prints the error the bug causes). Each tolerance is at most ~10x the error measured on both
kernel paths (npsd/fast.py and the plain npsd/nn.py, `nn.set_fast`); with two other input seeds
and weights the errors stayed within 1.3x of those quoted, and the bugs' errors within 1.2x.

Shapes are SD v1.5's: the UNet's first level (320 channels, 32x32 latents = 1024 tokens, 8 heads
of 40), its text context [2, 77, 768], CLIP ViT-L/14's width 768 with 12 heads, the VAE's 256
channels at 64x64. The blocks are diffusers' and transformers' own modules with perturbed random
weights (tests.helpers.perturb_); inputs are N(0, 1).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D

from npsd import clip, guidance, nn, unet, vae
from npsd.config import sd15_config
from npsd.testing import assert_close
from npsd.tokenizer import Tokenizer
from tests.helpers import BUGS, Bug, assert_caught, n2t, perturb_, t2n, to_numpy_params

NO_BUG = Bug("no bug")
PROMPTS = ["a photograph of an astronaut riding a horse", "blurry"]


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@dataclass(frozen=True)
class Case:
    rtol: float           # the tolerance of this parity check
    bugs: tuple           # keys of BUGS: the bugs this layer or block contains
    run: object           # run(bug) -> (npsd's output with the bug's settings, torch's output)


# ---------------------------------------------------------------------------------------------
# Layers (npsd/nn.py, npsd/guidance.py) against torch.nn.functional and diffusers
# ---------------------------------------------------------------------------------------------

def geglu(bug):
    rng = np.random.default_rng(0)
    x, w, b = randn(rng, 2, 1024, 320), randn(rng, 2560, 320, scale=320 ** -0.5), randn(rng, 2560)
    value, gate = F.linear(n2t(x), n2t(w), n2t(b)).chunk(2, dim=-1)
    return nn.geglu(x, w, b), t2n(value * F.gelu(gate))


def group_norm(bug):
    rng = np.random.default_rng(1)
    x, w, b = randn(rng, 2, 320, 32, 32), 1 + randn(rng, 320, scale=0.1), randn(rng, 320, scale=0.1)
    eps = bug.section("unet", sd15_config()["unet"])["resnet_eps"]
    return nn.group_norm(x, 32, w, b, eps), t2n(F.group_norm(n2t(x), 32, n2t(w), n2t(b), eps=1e-5))


def layer_norm(bug):
    rng = np.random.default_rng(2)
    x, w, b = randn(rng, 2, 77, 768), 1 + randn(rng, 768, scale=0.1), randn(rng, 768, scale=0.1)
    eps = bug.section("text_encoder", sd15_config()["text_encoder"])["layer_norm_eps"]
    return nn.layer_norm(x, w, b, eps), t2n(F.layer_norm(n2t(x), (768,), n2t(w), n2t(b), eps=1e-5))


def attention(bug):
    rng = np.random.default_rng(3)
    q, k, v = (randn(rng, 2, 1024, 320) for _ in range(3))
    heads = lambda a: n2t(a).reshape(2, 1024, 8, 40).transpose(1, 2)                 # [2, 8, 1024, 40]
    ref = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, 1024, 320)
    return nn.attention(q, k, v, 8), t2n(ref)


def timestep_embedding(bug):
    t = np.array([981.0, 501.0], np.float32)
    ref = get_timestep_embedding(n2t(t), 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    return nn.timestep_embedding(t, 320), t2n(ref)


def cfg(bug):
    rng = np.random.default_rng(4)
    eps_uncond, eps_cond = randn(rng, 1, 4, 32, 32), randn(rng, 1, 4, 32, 32)
    u, c = n2t(eps_uncond), n2t(eps_cond)
    # diffusers' StableDiffusionPipeline: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    return guidance.cfg(eps_uncond, eps_cond, 7.5), t2n(u + 7.5 * (c - u))


LAYERS = {
    # measured (fast / plain path): 1.5e-7 / 1.1e-7; the bug: 1.2e-4
    "geglu": Case(1e-6, ("geglu_tanh",), geglu),
    # 3.3e-7 / 2.4e-7; the bug 4.7e-6: it moves the normalised values of unit-variance groups by
    # (1e-5 - 1e-6) / 2 relative
    "group_norm": Case(2e-6, ("group_norm_eps",), group_norm),
    # 1.9e-7 / 1.4e-7; the bug 4.6e-5
    "layer_norm": Case(2e-6, ("layer_norm_eps",), layer_norm),
    # 1.8e-6 / 1.6e-6; the bug 0.95
    "attention": Case(1e-5, ("attention_scale",), attention),
    # 5.0e-5 on both paths: torch's float32 exp is an ulp off on 3 of the 160 frequencies, and
    # t ~ 1000 multiplies that into sin/cos (tests/test_nn.py, test_timestep_embedding); the bug 0.91
    "timestep_embedding": Case(1e-4, ("timestep",), timestep_embedding),
    # 0: both evaluate the same float32 operations in the same order; the bug 2.0
    "cfg": Case(0.0, ("cfg_swapped",), cfg),
}


# ---------------------------------------------------------------------------------------------
# Blocks (npsd/unet.py, npsd/clip.py, npsd/vae.py, npsd/guidance.py) against diffusers' and
# transformers' modules
# ---------------------------------------------------------------------------------------------

def torch_block(make, seed):
    """A torch module made with a seeded initialisation, perturbed; and its weights as npsd params."""
    torch.manual_seed(seed)
    module = perturb_(make().eval(), seed=seed)
    state = module.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in state) else ""   # transformers 4.x
    return module, to_numpy_params(state, prefix, drop=("position_ids",))


@lru_cache(maxsize=None)
def built(name):
    """Each reference block, built once: (torch module, npsd params)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    makers = {
        # SD v1.5's first level: 8 heads of 40, cross-attention to the 768-wide text context
        "transformer": lambda: BasicTransformerBlock(320, 8, 40, cross_attention_dim=768),
        "resnet": lambda: ResnetBlock2D(in_channels=320, out_channels=640, temb_channels=1280, eps=1e-5, groups=32),
        "time_embedding": lambda: TimestepEmbedding(320, 1280),
        "vae_resnet": lambda: ResnetBlock2D(in_channels=256, out_channels=256, temb_channels=None, eps=1e-6,
                                            groups=32),
        # ViT-L/14's text tower cut to its first layer
        "clip_layer": lambda: CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=77, hidden_act="quick_gelu")),
        # SD v1's design with few channels, for the guided model
        "tiny_unet": lambda: UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    }
    return torch_block(makers[name], seed=list(makers).index(name))


def transformer_block(bug):
    module, params = built("transformer")
    rng = np.random.default_rng(10)
    x, context = randn(rng, 2, 1024, 320), randn(rng, 2, 77, 768)
    with torch.no_grad():
        ref = t2n(module(n2t(x), encoder_hidden_states=n2t(context)))
    return unet.transformer_block(params, x.copy(), context, 8, bug.section("unet", sd15_config()["unet"])), ref


def resnet(bug):
    module, params = built("resnet")
    rng = np.random.default_rng(11)
    x, temb = randn(rng, 2, 320, 32, 32), randn(rng, 2, 1280)
    with torch.no_grad():
        ref = t2n(module(n2t(x), n2t(temb)))
    return unet.resnet(params, x, temb, bug.section("unet", sd15_config()["unet"])), ref


def time_embedding(bug):
    module, params = built("time_embedding")
    t = np.array([981.0, 501.0], np.float32)
    with torch.no_grad():
        ref = t2n(module(get_timestep_embedding(n2t(t), 320, flip_sin_to_cos=True, downscale_freq_shift=0)))
    return unet.time_embedding(params, t, 2, 320), ref


def clip_layer(bug):
    module, params = built("clip_layer")
    ids = Tokenizer.default()(PROMPTS)                                                 # [2, 77]
    with torch.no_grad():
        ref = t2n(module(torch.from_numpy(ids), output_hidden_states=True).hidden_states[1])
    config = bug.section("text_encoder", sd15_config()["text_encoder"])
    return clip.hidden_states(params, ids, config)[1], ref                             # after the first layer


def vae_resnet(bug):
    module, params = built("vae_resnet")
    x = randn(np.random.default_rng(12), 1, 256, 64, 64)
    with torch.no_grad():
        ref = t2n(module(n2t(x), None))
    return vae.resnet_block(params, x, bug.section("vae", sd15_config()["vae"])), ref


def guided_unet(bug):
    """The UNet on [uncond, cond] combined by classifier-free guidance, scale 7.5, as diffusers'
    StableDiffusionPipeline does it."""
    module, params = built("tiny_unet")
    rng = np.random.default_rng(13)
    x, cond, uncond = randn(rng, 2, 4, 16, 16), randn(rng, 2, 77, 32), randn(rng, 2, 77, 32)
    with torch.no_grad():
        both = module(torch.cat([n2t(x)] * 2), 981, n2t(np.concatenate([uncond, cond]))).sample
    eps_uncond, eps_cond = both.chunk(2)
    ref = t2n(eps_uncond + 7.5 * (eps_cond - eps_uncond))
    settings = {"num_heads": 4, "norm_groups": 8}
    model = guidance.guided_model(lambda x, t, c: unet.unet(params, x, t, c, settings), cond, uncond, 7.5)
    return model(x, 981), ref


BLOCKS = {
    # measured (fast / plain path): 1.5e-7 / 1.5e-7; the bugs: GEGLU tanh 2.5e-5, LayerNorm eps
    # 1.2e-5 (1e-6 instead of 1e-5 would give 1.2e-6), attention scale 1.1e-2
    "unet transformer block": Case(1e-6, ("geglu_tanh", "layer_norm_eps", "attention_scale"), transformer_block),
    # 7.1e-7 / 6.9e-7; the bug 1.2e-5
    "unet resnet": Case(5e-6, ("group_norm_eps",), resnet),
    # 3.1e-6 on both paths (torch's float32 exp, as for the layer); the bug 0.16
    "unet time embedding": Case(2e-5, ("timestep",), time_embedding),
    # 6.5e-7 / 6.8e-7; the bugs: LayerNorm eps 4.4e-2, attention scale 0.19
    "clip encoder layer": Case(5e-6, ("layer_norm_eps", "attention_scale"), clip_layer),
    # 3.2e-7 / 2.3e-7; the bug 1.6e-5
    "vae resnet": Case(2e-6, ("vae_group_norm_eps",), vae_resnet),
    # 8.2e-6 / 7.1e-6 (guidance multiplies the UNet's own error by about 7.5); the bug 0.61
    "guided unet": Case(5e-5, ("cfg_swapped",), guided_unet),
}

CASES = {**{f"layer {k}": v for k, v in LAYERS.items()}, **{f"block {k}": v for k, v in BLOCKS.items()}}


@pytest.mark.parametrize("name", list(CASES))
def test_clean(name):
    case = CASES[name]
    ours, ref = case.run(NO_BUG)
    print(f"\n  {assert_close(ours, ref, case.rtol, name)} (tolerance {case.rtol:g})")


@pytest.mark.parametrize("name, bug", [(name, bug) for name, case in CASES.items() for bug in case.bugs])
def test_bug(name, bug, monkeypatch):
    case, bug = CASES[name], BUGS[bug]
    bug.inject(monkeypatch)
    assert_caught(bug, lambda: assert_close(*case.run(bug), case.rtol, name))


def test_every_bug_is_shown_at_both_levels():
    """Every bug of tests.helpers.BUGS is shown on a block, and on a layer (the VAE's GroupNorm eps
    is the layer case's GroupNorm eps with other values)."""
    assert {bug for case in BLOCKS.values() for bug in case.bugs} == set(BUGS)
    assert {bug for case in LAYERS.values() for bug in case.bugs} == set(BUGS) - {"vae_group_norm_eps"}
