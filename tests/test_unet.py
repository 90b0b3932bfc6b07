"""npsd.unet against diffusers' UNet2DConditionModel with the same perturbed random weights.

Every comparison is of whole tensors (npsd.testing.assert_close: max abs diff / max |ref|), at the
final output and at each block (forward hooks on conv_in, time_embedding, every down block, the
mid block and every up block), so a failure names the block where npsd first departs.

Tolerances (relative, fp32), from measured errors:
- tiny configs: RTOL_TINY = 1e-5. Measured 1.5e-7 .. 1.5e-6 at every block and the output (both
  sides sum in float32 in a different order); the bugs tried below give 5e-2 .. 0.2.
- full SD v1.5 size: one tolerance per block, each at most ~10x the error measured there (the
  table above RTOL_FULL). test_full_size_sensitivity shows that the small real bugs of
  tests.helpers.BUGS (GELU's tanh form in GEGLU, a GroupNorm or LayerNorm eps off by 10x, the
  attention scale of the wrong width, t - 1) each fail it.
"""

import gc
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from npsd import settings
from npsd.architecture import unet_shapes
from npsd.errors import InputError
from npsd.params import unflatten
from npsd.testing import assert_close, compare
from npsd.unet import unet
from tests.helpers import BUGS, TILING_BUGS, assert_caught, circular, n2t, perturb_, t2n, to_numpy_params

RTOL_TINY = 1e-5
# Full size: 22 resnets and 16 transformers deep with up to 2560 input channels per conv. The
# errors measured at each block over the three FULL_CASES on both kernel paths (npsd/fast.py and
# the plain npsd/nn.py), and the tolerance, at most ~10x the smallest of them:
#   conv_in         0 (20x28) .. 3.4e-7        3e-6
#   down_blocks.0   6.3e-7 .. 8.8e-7           6e-6
#   down_blocks.1   9.0e-7 .. 1.3e-6           8e-6
#   down_blocks.2   9.2e-7 .. 1.3e-6           1e-5
#   down_blocks.3   1.2e-6 .. 1.9e-6           1e-5
#   mid_block       1.2e-6 .. 1.5e-6           1e-5
#   up_blocks.0     1.2e-6 .. 1.6e-6           1e-5
#   up_blocks.1     1.6e-6 .. 2.0e-6           1.5e-5
#   up_blocks.2     1.3e-6 .. 1.7e-6           1e-5
#   up_blocks.3     7.3e-7 .. 1.0e-6           7e-6
#   eps             1.1e-6 .. 1.5e-6           1e-5
# The small real bugs give 2.1e-5 (GEGLU's tanh GELU, ResBlock GroupNorm eps) .. 1e-2 at
# down_blocks.0 and 2.9e-5 .. 2e-2 at eps (test_full_size_sensitivity).
# On the AMD EPYC without AVX-512 of README.md's speed tables (PyTorch on oneDNN's AVX2 kernels) the
# same blocks differ by 2-4x more, 2.2e-6 .. 7.5e-6 on both paths (the 32x32 case), 1.6-2.5x under
# the tolerances, and PyTorch's float32 rounding is most of it: against the same diffusers model
# run in float64, npsd's blocks were within 0.9e-6 .. 1.4e-6 there, PyTorch's within 1.9e-6 .. 7.5e-6
# (python -m benchmarks.float64_reference).
# The time embedding's error grows with t, so each case has its own tolerance (FULL_CASES): torch
# evaluates exp(-ln(10000) i/160) in float32 (an ulp off in some entries), npsd in float64 rounded
# once, and t multiplies that ulp into sin/cos (npsd/nn.py, timestep_embedding).
RTOL_FULL = {"conv_in": 3e-6, "down_blocks.0": 6e-6, "down_blocks.1": 8e-6, "down_blocks.2": 1e-5,
             "down_blocks.3": 1e-5, "mid_block": 1e-5, "up_blocks.0": 1e-5, "up_blocks.1": 1.5e-5,
             "up_blocks.2": 1e-5, "up_blocks.3": 7e-6, "eps": 1e-5}

rng = np.random.default_rng(0)

BLOCKS = re.compile(r"^(conv_in|time_embedding|mid_block|(down|up)_blocks\.\d+)$")


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def reference(model, latents, t, context, timestep_cond=None):
    """diffusers' eps and every block's output (by diffusers module name) as NumPy arrays."""
    outs, hooks = {}, []
    for name, mod in model.named_modules():
        if BLOCKS.match(name):
            # down blocks return (hidden_states, skips): keep hidden_states
            hook = (lambda m, i, o, name=name: outs.__setitem__(name, t2n(o[0] if isinstance(o, tuple) else o)))
            hooks.append(mod.register_forward_hook(hook))
    tt = t if np.isscalar(t) else torch.from_numpy(np.asarray(t, dtype=np.float32))
    with torch.no_grad():
        eps = t2n(model(n2t(latents), tt, n2t(context),
                        timestep_cond=None if timestep_cond is None else n2t(timestep_cond)).sample)
    for h in hooks:
        h.remove()
    return eps, outs


def check(params, config, latents, t, context, ref, rtol, w_emb=None):
    """Run npsd and compare every block (in execution order) and the output, printing every error;
    rtol is one tolerance or {block name or "eps": tolerance}. Returns the comparisons."""
    eps_ref, blocks_ref = ref
    trace = {}
    eps = unet(params, latents, t, context, config, trace=trace, w_emb=w_emb)
    assert set(trace) == set(blocks_ref), f"blocks traced {sorted(trace)} != hooked {sorted(blocks_ref)}"
    pairs = [(trace[k], blocks_ref[k], k) for k in trace] + [(eps, eps_ref, "eps")]
    tol = (lambda name: rtol[name]) if isinstance(rtol, dict) else (lambda name: rtol)
    for actual, reference, name in pairs:
        print(f"{compare(actual, reference, name)}, tolerance {tol(name):g}")
    return [assert_close(actual, reference, tol(name), name) for actual, reference, name in pairs]


# ---------------------------------------------------------------------------------------------
# Tiny configs (fast): SD v1's design with few channels
# ---------------------------------------------------------------------------------------------

TINY_SD = dict(  # the SD v1.5 block layout (4 levels, 3 with attention), few channels
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
TINY_SD_CONFIG = {"num_heads": 4, "norm_groups": 8}

TINY_INPAINT = dict(  # 9 input channels, linear proj_in/out, 2 transformer blocks, heads per level
    sample_size=16, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
    transformer_layers_per_block=2, norm_num_groups=8)
TINY_INPAINT_CONFIG = {"num_heads": [2, 4], "norm_groups": 8}


def build(kwargs, seed=0):
    torch.manual_seed(seed)
    return perturb_(UNet2DConditionModel(**kwargs).eval(), seed=seed)


@pytest.fixture(scope="module")
def tiny_sd():
    model = build(TINY_SD)
    return model, to_numpy_params(model.state_dict())


@pytest.mark.parametrize("name, latent_shape, t, tokens", [
    ("t per item, fractional", (2, 4, 16, 16), [999.0, 0.5], 77),
    ("scalar int t", (2, 4, 16, 16), 500, 77),
    ("scalar fractional t", (1, 4, 8, 24), 261.75, 77),
    ("t of shape [1]", (2, 4, 16, 16), [37.0], 77),
    ("154-token context (two 77 chunks)", (2, 4, 16, 16), [10.0, 980.0], 154),
    # 37 -> 19 -> 10 -> 5 on the way down: each upsampler must take its skip's size (5->10->19->37)
    ("odd latent 37x21", (2, 4, 37, 21), [999.0, 1.0], 77),
])
def test_tiny_sd_layout(tiny_sd, name, latent_shape, t, tokens):
    model, params = tiny_sd
    latents, context = randn(*latent_shape), randn(latent_shape[0], tokens, 24)
    check(params, TINY_SD_CONFIG, latents, t, context, reference(model, latents, t, context), RTOL_TINY)


def test_tiny_inpaint_linear_projection_depth2():
    """9-channel input (sd-v1-5-inpainting), use_linear_projection, 2 transformer blocks per
    transformer, heads (2, 4) per level: the up path must use them reversed, the mid block the last."""
    model = build(TINY_INPAINT, seed=1)
    params = to_numpy_params(model.state_dict())
    assert params["down_blocks"][0]["attentions"][0]["proj_in"]["weight"].ndim == 2      # linear
    assert len(params["down_blocks"][0]["attentions"][0]["transformer_blocks"]) == 2
    latents, context, t = randn(2, 9, 12, 10), randn(2, 5, 24), [3.25, 640.0]
    ref = reference(model, latents, t, context)
    check(params, TINY_INPAINT_CONFIG, latents, t, context, ref, RTOL_TINY)
    assert_caught("the same heads at every level", lambda: check(
        params, dict(TINY_INPAINT_CONFIG, num_heads=4), latents, t, context, ref, RTOL_TINY))


def test_sensitivity(tiny_sd):
    """The checks can fail: swapped context batch, swapped timesteps, wrong eps values.

    eps only matters where a GroupNorm's variance is small, so here conv_in and the first resnet's
    conv2 are scaled by 1e-2 (in the shared weights): the first transformer's GroupNorm then sees a
    variance of about 1e-4, as low-variance channels of real checkpoints do."""
    model = build(TINY_SD)
    with torch.no_grad():
        for mod in (model.conv_in, model.down_blocks[0].resnets[0].conv2):
            mod.weight.mul_(1e-2)
            mod.bias.mul_(1e-2)
    params = to_numpy_params(model.state_dict())
    latents, context, t = randn(2, 4, 16, 16), randn(2, 77, 24), np.array([10.0, 700.0], np.float32)
    ref = reference(model, latents, t, context)
    check(params, TINY_SD_CONFIG, latents, t, context, ref, RTOL_TINY)
    wrong = {
        "context batch swapped ([cond, uncond] for [uncond, cond])": (t, context[::-1], TINY_SD_CONFIG),
        "timesteps swapped": (t[::-1], context, TINY_SD_CONFIG),
        "transformer GroupNorm eps 1e-5 instead of 1e-6": (t, context, dict(TINY_SD_CONFIG, transformer_eps=1e-5)),
        "resnet GroupNorm eps 1e-6 instead of 1e-5": (t, context, dict(TINY_SD_CONFIG, resnet_eps=1e-6)),
    }
    for what, (tw, cw, cfg) in wrong.items():
        assert_caught(what, lambda: check(params, cfg, latents, tw, cw, ref, RTOL_TINY))


def test_input_errors(tiny_sd):
    _, params = tiny_sd
    latents, context = randn(2, 4, 8, 8), randn(2, 77, 24)
    with pytest.raises(InputError, match="context batch 1 does not match the latent batch 2"):
        unet(params, latents, 1, context[:1], TINY_SD_CONFIG)
    with pytest.raises(InputError, match=r"latents must be \[B, 4, h, w\]"):
        unet(params, randn(2, 9, 8, 8), 1, context, TINY_SD_CONFIG)
    with pytest.raises(InputError, match=r"context must be \[B, tokens, 24\]"):
        unet(params, latents, 1, randn(2, 77, 768), TINY_SD_CONFIG)
    with pytest.raises(InputError, match="t must be a scalar or one timestep per batch item"):
        unet(params, latents, [1, 2, 3], context, TINY_SD_CONFIG)
    with pytest.raises(InputError, match="num_heads has 2 entries but the UNet has 4 levels"):
        unet(params, latents, 1, context, dict(TINY_SD_CONFIG, num_heads=[4, 4]))
    with pytest.raises(InputError, match="finite"):
        unet(params, latents, np.nan, context, TINY_SD_CONFIG)


# ---------------------------------------------------------------------------------------------
# Full SD v1.5 size: the torch model is built once, its outputs computed, then it is freed
# ---------------------------------------------------------------------------------------------

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_CONFIG = {"num_heads": 8, "norm_groups": 32, "resnet_eps": 1e-5, "transformer_eps": 1e-6, "layer_norm_eps": 1e-5}

FULL_CASES = {
    # name: (latent shape, t, context tokens, time_embedding tolerance: measured on both paths)
    "32x32 batch 2": ((2, 4, 32, 32), [999.0, 500.25], 77, 3e-5),        # 3.5e-6
    "64x64 batch 2": ((2, 4, 64, 64), 261, 77, 1e-5),                    # 1.2e-6
    # 20 -> 10 -> 5 -> 3 down, 3 -> 5 -> 10 -> 20 up (the upsampler takes the skip's size); long prompt
    "20x28 batch 1, 154 tokens": ((1, 4, 20, 28), 0.5, 154, 3e-6),       # 3.1e-7
}


TILED_CASE = "20x28 batch 1, 154 tokens"      # the inputs of test_full_size_tiling


def full_tolerances(case):
    return {**RTOL_FULL, "time_embedding": FULL_CASES[case][3]}


@pytest.fixture(scope="module")
def full_size():
    """(params, {case: (inputs, reference)}). Module scope (this is the only module that uses it,
    so it is built once per session) lets its 3.4 GB go before later test files run."""
    model = build(SD15)
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}   # shares torch's memory
    assert {k: tuple(v.shape) for k, v in params.items()} == unet_shapes()     # SD v1.5's 686 tensors
    cases = {}
    for name, (shape, t, tokens, _) in FULL_CASES.items():
        latents, context = randn(*shape), randn(shape[0], tokens, 768)
        cases[name] = ((latents, t, context), reference(model, latents, t, context))
    with circular(model):                        # A1111's Tiling: every Conv2d pads circularly
        inputs = cases[TILED_CASE][0]
        cases["tiled"] = (inputs, reference(model, *inputs))
    del model                                     # the params keep the weights alive: 3.4 GB once
    gc.collect()
    yield unflatten(params), cases


@pytest.mark.parametrize("case", list(FULL_CASES))
def test_full_size(full_size, case):
    params, cases = full_size
    (latents, t, context), ref = cases[case]
    check(params, SD15_CONFIG, latents, t, context, ref, full_tolerances(case))


def test_full_size_tiling(full_size):
    """Tiling (every padded conv wraps around, settings.padding_mode("circular")) at full size, on
    20x28 latents (20 -> 10 -> 5 -> 3: stride 2 over odd sides), against diffusers' UNet with every
    Conv2d circular: the same tolerances as without tiling (RTOL_FULL; measured eps 1.2e-6, the
    untiled case 1.8e-6)."""
    params, cases = full_size
    (latents, t, context), ref = cases["tiled"]
    with settings.padding_mode("circular"):
        check(params, SD15_CONFIG, latents, t, context, ref, full_tolerances(TILED_CASE))


def test_full_size_tiling_sensitivity(full_size, monkeypatch):
    """Tiling's small real bug, the downsamplers' convs left zero-padded, fails the full-size check."""
    params, cases = full_size
    (latents, t, context), ref = cases["tiled"]
    bug = TILING_BUGS["tiling_downsamplers_zeros"]
    bug.inject(monkeypatch)
    with settings.padding_mode("circular"):
        assert_caught(bug, lambda: check(params, SD15_CONFIG, latents, t, context, ref, full_tolerances(TILED_CASE)))


@pytest.mark.parametrize("bug", ["geglu_tanh", "group_norm_eps", "layer_norm_eps", "attention_scale", "timestep"])
def test_full_size_sensitivity(full_size, monkeypatch, bug):
    """Each small real bug of the UNet fails the full-size check on its tolerance (on the cheapest
    case; -s prints every block's error with the bug, then the one that failed first)."""
    params, cases = full_size
    case = "20x28 batch 1, 154 tokens"
    (latents, t, context), ref = cases[case]
    bug = BUGS[bug]
    bug.inject(monkeypatch)
    config = bug.section("unet", SD15_CONFIG)
    assert_caught(bug, lambda: check(params, config, latents, t, context, ref, full_tolerances(case)))
