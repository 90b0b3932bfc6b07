"""SD 2.1 at full size, random perturbed weights: the UNet (768-v and 512 base share it: linear
proj_in/proj_out, 5/10/20/20 heads of width 64, cross-attention width 1024) against diffusers'
UNet2DConditionModel, SD 2 inpainting's 9-channel UNet (at most 1.6e-6 per block), and the text encoder (OpenCLIP ViT-H/14's text tower as diffusers ships it:
width 1024, 16 heads, GELU, 23 of its 24 layers, so that the final LayerNorm follows the penultimate
one) against transformers' CLIPTextModel; and an LCM-distilled SD v1.5 UNet with its guidance
embedding. Each torch model is built once, its outputs computed, then freed.

Tolerances: the UNet's per-block tolerances of tests/test_unet.py (RTOL_FULL, each about 10x the SD
v1.5 error there); measured here at SD 2.1 size: at most 1.7e-6 (a block) and 1.3e-6 (eps); with
SD v1.x's 8 heads everywhere, 1.8e-2 at down_blocks.0. The text encoder: RTOL_TEXT 8e-6, measured
8.1e-7 (last hidden state). The LCM UNet: at most 1.6e-6 (a block), 1.2e-6 (eps); w = 7.5's
embedding instead of 8.5's gives 0.61 at time_embedding. SD v1.x's head count (8 everywhere),
quick-GELU instead of GELU, or the wrong w fails them (asserted below).
"""

import gc
import types

import numpy as np
import pytest
import torch

from npsd import clip
from npsd.architecture import UNetDesign, text_encoder_design, unet_shapes
from npsd.params import flatten, unflatten
from npsd.testing import assert_close
from npsd.tokenizer import Tokenizer
from tests.test_clip import build as build_text, reference_outputs
from tests.test_unet import RTOL_FULL, build as build_unet, check, reference

pytestmark = pytest.mark.slow

SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, norm_num_groups=32)
SD21_UNET_CONFIG = {"num_heads": [5, 10, 20, 20], "norm_groups": 32}
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, num_hidden_layers=23, num_attention_heads=16,
                 intermediate_size=4096, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
SD21_TEXT_CONFIG = {"num_heads": 16, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}
RTOL_TEXT = 8e-6
PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle on a blue background"]


@pytest.fixture(scope="module")
def unet21():
    model = build_unet(SD21_UNET, seed=3)
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((2, 4, 24, 24)).astype(np.float32)
    context = rng.standard_normal((2, 77, 1024)).astype(np.float32)
    t = [999.0, 261.0]
    ref = reference(model, latents, t, context)
    del model
    gc.collect()
    yield unflatten(params), (latents, t, context), ref


def test_sd21_unet_shapes_are_one_design(unet21):
    params = unet21[0]
    shapes = {k: v.shape for k, v in flatten(params).items()}
    assert shapes == unet_shapes(UNetDesign(use_linear_projection=True, cross_attention_dim=1024))


def test_sd21_unet_matches_diffusers(unet21):
    params, (latents, t, context), ref = unet21
    check(params, SD21_UNET_CONFIG, latents, t, context, ref, {**RTOL_FULL, "time_embedding": 3e-5})


def test_sd21_unet_with_sd1_heads_fails(unet21):
    params, (latents, t, context), ref = unet21
    with pytest.raises(AssertionError, match="down_blocks.0"):              # the first block with attention
        check(params, {**SD21_UNET_CONFIG, "num_heads": 8}, latents, t, context, ref,
              {**RTOL_FULL, "time_embedding": 3e-5})


@pytest.fixture(scope="module")
def text21():
    model, params = build_text(SD21_TEXT, seed=5)
    ids = Tokenizer.default(pad_token="!")(PROMPTS)                         # SD 2.x pads with id 0
    last, _ = reference_outputs(model, ids)
    del model
    gc.collect()
    return types.SimpleNamespace(params=params, ids=ids, last=last)


def test_sd21_text_encoder_matches_transformers(text21):
    assert text_encoder_design({k: v.shape for k, v in flatten(text21.params).items()}).num_hidden_layers == 23
    assert text21.ids[0, -1] == 0
    out = clip.encode_text(text21.params, text21.ids, SD21_TEXT_CONFIG)
    assert out.shape == (2, 77, 1024)
    print(assert_close(out, text21.last, RTOL_TEXT, "SD 2.1 text encoder, last hidden state"))


def test_sd21_text_encoder_quick_gelu_fails(text21):
    out = clip.encode_text(text21.params, text21.ids, {**SD21_TEXT_CONFIG, "hidden_act": "quick_gelu"})
    with pytest.raises(AssertionError):
        assert_close(out, text21.last, RTOL_TEXT, "quick GELU instead of GELU")


def test_lcm_unet_full_size_matches_diffusers():
    """An LCM-distilled SD v1.5 UNet (time_cond_proj_dim 256, as LCM Dreamshaper v7's) with its
    guidance embedding at w = 8.5, against diffusers' timestep_cond; the same block tolerances."""
    from npsd.unet import guidance_embedding
    from tests.test_unet import SD15, SD15_CONFIG
    model = build_unet({**SD15, "time_cond_proj_dim": 256}, seed=6)
    params = unflatten({k: v.detach().numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(8)
    latents = rng.standard_normal((1, 4, 24, 24)).astype(np.float32)
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)
    w_emb = guidance_embedding(8.5, 256)
    ref = reference(model, latents, 499, context, timestep_cond=w_emb)
    del model
    gc.collect()
    check_lcm = lambda emb: check(params, SD15_CONFIG, latents, 499, context, ref,
                                  {**RTOL_FULL, "time_embedding": 3e-5}, w_emb=emb)
    check_lcm(w_emb)
    with pytest.raises(AssertionError, match="time_embedding"):               # w = 7.5 instead of 8.5
        check_lcm(guidance_embedding(7.5, 256))


def test_sd2_inpainting_unet_full_size_matches_diffusers():
    """SD 2 inpainting's UNet: SD 2.1's with 9 input channels (latents, mask, masked-image latents)."""
    model = build_unet({**SD21_UNET, "in_channels": 9, "sample_size": 64}, seed=10)
    params = unflatten({k: v.detach().numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(11)
    latents = rng.standard_normal((2, 9, 16, 16)).astype(np.float32)
    context = rng.standard_normal((2, 77, 1024)).astype(np.float32)
    ref = reference(model, latents, [981.0, 21.0], context)
    del model
    gc.collect()
    check(params, SD21_UNET_CONFIG, latents, [981.0, 21.0], context, ref, {**RTOL_FULL, "time_embedding": 3e-5})
