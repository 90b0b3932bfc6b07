"""Token merging (npsd/tome.py) against the `tomesd` package, as AUTOMATIC1111 applies it.

A1111 (modules/sd_models.py, apply_token_merging) patches its ldm model with
tomesd.apply_patch(model, ratio, use_rand=False, merge_attn=True, merge_crossattn=False,
merge_mlp=False). The references here are tomesd's own functions: bipartite_soft_matching_random2d
(merge.py) for the matching; compute_merge (patch.py) and the three lines of its ldm block patch
(ToMeBlock._forward, which A1111 runs) for a transformer block; tomesd.apply_patch on diffusers' UNet
(its diffusers block patch, which gives the ldm lines' numbers bit for bit: checked) for a whole UNet
and for whole A1111 runs, assembled as tests/test_a1111_pipeline.py assembles them.

Which tokens merge is an argsort of similarities, so a near tie could flip between npsd and torch and
move a result far outside a tolerance; none did in the runs here (RTOL_BLOCK's comment).
"""

import dataclasses
import inspect
import textwrap
import types

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from npsd import tome, unet as unet_model
from npsd.errors import InputError
from npsd.hires import Hires
from npsd.testing import assert_close, compare
from tests.helpers import assert_caught, n2t, perturb_, t2n, to_numpy_params
from tests.test_a1111_pipeline import TOL_IMAGE, npsd_run
from tests.test_kdiffusion import kd  # noqa: F401 - the fixture
from tests.test_pipelines import SIZE, models, npsd_pipe  # noqa: F401 - models is a fixture

tomesd = pytest.importorskip("tomesd")
from tomesd.merge import bipartite_soft_matching_random2d  # noqa: E402
from tomesd.patch import compute_merge  # noqa: E402

A1111_ARGS = dict(use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)   # its apply_patch call


def a1111_tome_info(size, ratio):
    """The _tome_info that tomesd.apply_patch(model, ratio, **A1111_ARGS) gives every block, its
    forward pre-hook having read the UNet input's map size (h, w)."""
    return {"size": size, "hooks": [], "args": dict(ratio=ratio, max_downsample=1, sx=2, sy=2, generator=None,
                                                    **A1111_ARGS)}


def ldm_tome_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
    """tomesd's ldm ToMeBlock._forward (patch.py), the block A1111 runs, on diffusers' block."""
    x, context = hidden_states, encoder_hidden_states
    m_a, m_c, m_m, u_a, u_c, u_m = compute_merge(x, self._tome_info)
    x = u_a(self.attn1(m_a(self.norm1(x)))) + x
    x = u_c(self.attn2(m_c(self.norm2(x)), encoder_hidden_states=context)) + x
    x = u_m(self.ff(m_m(self.norm3(x)))) + x
    return x


def mutated(function, old, new):
    """`function` with one piece of its source replaced (a small real bug), in its own module."""
    source = textwrap.dedent(inspect.getsource(function))
    assert source.count(old) == 1, f"{old!r} is not in {function.__name__} once"
    namespace = {}
    exec(compile(source.replace(old, new), inspect.getsourcefile(function), "exec"), function.__globals__, namespace)
    return namespace[function.__name__]


rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The matching
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, ratio", [(8, 8, 0.5), (7, 9, 0.3), (16, 12, 0.74), (5, 6, 0.1), (8, 6, 0.9)])
def test_matching_as_tomesd(h, w, ratio):
    """The same tokens merged into the same destinations as tomesd's, and the same values.

    Merging one-hot rows (token i -> e_i) gives, per output token, the weights of the input tokens
    it averages: these must be tomesd's exactly. tomesd orders its tokens by an unstable argsort,
    so the rows are compared as sets (sorted)."""
    b, n = 2, h * w
    metric, x = randn(b, n, 16), randn(b, n, 8)
    r = int(n * ratio)
    merge, unmerge = tome.bipartite_soft_matching(metric, h, w, r)
    ref_merge, ref_unmerge = bipartite_soft_matching_random2d(n2t(metric), w, h, 2, 2, r, no_rand=True)
    onehot = np.broadcast_to(np.eye(n, dtype=np.float32), (b, n, n))
    ours, theirs = merge(onehot), t2n(ref_merge(n2t(onehot.copy())))
    assert ours.shape == theirs.shape == (b, n - min(r, n - (h // 2) * (w // 2)), n)    # at most every source
    for k in range(b):
        np.testing.assert_array_equal(ours[k][np.lexsort(ours[k].T)], theirs[k][np.lexsort(theirs[k].T)])
    # values through a per-token function between merge and unmerge (as attention's output)
    ours = unmerge(np.tanh(merge(x)))
    theirs = t2n(ref_unmerge(torch.tanh(ref_merge(n2t(x)))))
    print(f"\n  {h}x{w} r={r}: {compare(ours, theirs, 'unmerge(tanh(merge(x)))')}, tolerance 5e-7")
    assert_close(ours, theirs, 5e-7, "unmerge(tanh(merge(x)))")          # measured 6.1e-8 at most


def test_ratio_checked():
    for bad in (-0.1, 0.91, 1.0, float("nan"), "0.5", True, None):
        with pytest.raises(InputError, match=r"token_merging_ratio must be a number in \[0, 0.9\]"):
            tome.check_ratio(bad)
    assert tome.check_ratio(0) == 0.0 and tome.check_ratio(np.float32(0.5)) == 0.5 and tome.check_ratio(0.9) == 0.9


# ---------------------------------------------------------------------------------------------
# One transformer block
# ---------------------------------------------------------------------------------------------

BLOCK = dict(dim=64, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=24, activation_fn="geglu")
# Measured: the block 1.0e-7 .. 1.7e-7 (ratios 0.3, 0.5, 0.7), the tiny UNet 0.9e-6 .. 1.0e-6 (as without merging,
# tests/test_unet.py's RTOL_TINY); over 150 more UNet calls (seeds, t and ratios 0.3 .. 0.7, 1500
# matchings) at most 1.8e-6: npsd never chose other tokens than tomesd. The bugs below give 1.9e-2 ..
# 2.1 at the block, 1.8e-2 and 1.6e-1 at the UNet.
RTOL_BLOCK = 1e-6
RTOL_UNET = 1e-5


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = perturb_(BasicTransformerBlock(**BLOCK).eval())
    return model, to_numpy_params(model.state_dict())


def block_reference(model, x, context, size, ratio):
    model._tome_info = a1111_tome_info(size, ratio)
    with torch.no_grad():
        return t2n(ldm_tome_forward(model, n2t(x), encoder_hidden_states=n2t(context)))


def npsd_block(params, x, context, size, ratio):
    merging = tome.TokenMerging(ratio, *size)
    return unet_model.transformer_block(params, x.copy(), context, 4, {"layer_norm_eps": 1e-5}, tome=merging)


def test_block_as_tomesd(block):
    model, params = block
    h, w = 16, 12
    x, context = smooth(2, h, w, 64), randn(2, 7, 24)
    plain = unet_model.transformer_block(params, x.copy(), context, 4, {"layer_norm_eps": 1e-5})
    for ratio in (0.3, 0.5, 0.7):
        ours, theirs = npsd_block(params, x, context, (h, w), ratio), block_reference(model, x, context, (h, w), ratio)
        print(f"\n  ratio {ratio}: {compare(ours, theirs, 'block')}, tolerance {RTOL_BLOCK:g}; "
              f"merging moves the block's output by {compare(theirs, plain, 'merged - plain').max_rel:.3g}")
        assert_close(ours, theirs, RTOL_BLOCK, "block")
    # a map at a quarter of the tokens (a lower UNet level): no merging, in tomesd and here
    x4 = x[:, : (h // 2) * (w // 2)]
    assert_close(npsd_block(params, x4, context, (h, w), 0.5),
                 unet_model.transformer_block(params, x4.copy(), context, 4, {"layer_norm_eps": 1e-5}), 0, "lower level")
    assert_close(npsd_block(params, x4, context, (h, w), 0.5), block_reference(model, x4, context, (h, w), 0.5),
                 RTOL_BLOCK, "lower level")


def smooth(b, h, w, c):
    """Feature maps [B, h*w, C] that vary smoothly in space, as a UNet's do: neighbouring tokens
    are similar, so which ones merge is decided by clear margins and by the map's layout."""
    coarse = randn(b, c, (h + 3) // 4, (w + 3) // 4)
    up = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :h, :w]                # [B, C, h, w]
    x = up + np.float32(0.3) * randn(b, c, h, w)
    return np.ascontiguousarray(x.reshape(b, c, h * w).transpose(0, 2, 1))


BLOCK_BUGS = {
    "unmerge skipped for the merged tokens (they get no attention output)":
        (tome, "bipartite_soft_matching", "out[rows, src[merged]] = yd[rows, into]", "out[rows, src[merged]] = 0"),
    "destinations at the bottom-right of each cell":
        (tome, "bipartite_soft_matching", "is_dst[:h // STRIDE * STRIDE:STRIDE, :w // STRIDE * STRIDE:STRIDE]",
         "is_dst[1:h // STRIDE * STRIDE:STRIDE, 1:w // STRIDE * STRIDE:STRIDE]"),
    "similarity by dot product, not cosine":
        (tome, "bipartite_soft_matching", "m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)", "m = metric"),
    "merged tokens summed, not averaged":
        (tome, "bipartite_soft_matching", "total / count[..., None]", "total"),
    "the metric LN(x) instead of the block's input x":
        (unet_model, "transformer_block", "tome.matching(x)",
         "tome.matching(nn.layer_norm(x, **p[\"norm1\"], eps=eps))"),
}


@pytest.mark.parametrize("bug", BLOCK_BUGS)
def test_block_sensitivity(block, monkeypatch, bug):
    module, name, old, new = BLOCK_BUGS[bug]
    model, params = block
    h, w = 16, 12
    x, context = smooth(2, h, w, 64), randn(2, 7, 24)
    theirs = block_reference(model, x, context, (h, w), 0.5)
    monkeypatch.setattr(module, name, mutated(getattr(module, name), old, new))
    assert_caught(bug, lambda: assert_close(npsd_block(params, x, context, (h, w), 0.5), theirs, RTOL_BLOCK, "block"))


def test_block_sensitivity_stride(block, monkeypatch):
    model, params = block
    x, context = smooth(2, 16, 12, 64), randn(2, 7, 24)
    theirs = block_reference(model, x, context, (16, 12), 0.5)
    monkeypatch.setattr(tome, "STRIDE", 4)
    assert_caught("one destination per 4x4 cell instead of 2x2", lambda: assert_close(
        npsd_block(params, x, context, (16, 12), 0.5), theirs, RTOL_BLOCK, "block"))


# ---------------------------------------------------------------------------------------------
# A whole UNet: diffusers' with tomesd applied as A1111 applies it
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
    from tests.test_unet import TINY_SD, build
    model = build(TINY_SD)
    return model, to_numpy_params(model.state_dict())


def tomesd_unet(model, latents, t, context, ratio):
    """diffusers' UNet patched by tomesd.apply_patch with A1111's arguments -> eps. tomesd's diffusers
    block patch runs here; A1111 runs its ldm patch, whose three lines (ldm_tome_forward) give the
    same numbers on diffusers' block (checked)."""
    t = t if np.isscalar(t) else torch.tensor(t)
    tomesd.apply_patch(model, ratio=ratio, **A1111_ARGS)
    try:
        with torch.no_grad():
            eps = t2n(model(n2t(latents), t, n2t(context)).sample)
            blocks = [m for m in model.modules() if type(m).__name__ == "ToMeBlock"]
            for m in blocks:
                m.forward = types.MethodType(ldm_tome_forward, m)
            ldm = t2n(model(n2t(latents), t, n2t(context)).sample)
            for m in blocks:
                del m.forward
    finally:
        tomesd.remove_patch(model)
    np.testing.assert_array_equal(eps, ldm)
    return eps


@pytest.mark.parametrize("shape, t, ratio", [((2, 4, 16, 16), [999.0, 20.0], 0.5), ((2, 4, 16, 12), 500, 0.3),
                                             ((1, 4, 15, 13), 261.5, 0.7), ((2, 4, 8, 10), 30.0, 0.9)])
def test_unet_as_tomesd(tiny_unet, shape, t, ratio):
    from tests.test_unet import TINY_SD_CONFIG
    model, params = tiny_unet
    latents, context = randn(*shape), randn(shape[0], 77, 24)
    theirs = tomesd_unet(model, latents, t, context, ratio)
    ours = unet_model.unet(params, latents, t, context, TINY_SD_CONFIG, token_merging_ratio=ratio)
    plain = unet_model.unet(params, latents, t, context, TINY_SD_CONFIG)
    print(f"\n  {compare(ours, theirs, 'eps')}, tolerance {RTOL_UNET:g}; merging moves eps by "
          f"{compare(theirs, plain, 'merged - plain').max_rel:.3g}")
    assert_close(ours, theirs, RTOL_UNET, "eps")
    np.testing.assert_array_equal(unet_model.unet(params, latents, t, context, TINY_SD_CONFIG, token_merging_ratio=0),
                                  plain)


@pytest.mark.parametrize("bug", ["unmerge skipped for the merged tokens (they get no attention output)",
                                 "the metric LN(x) instead of the block's input x"])
def test_unet_sensitivity(tiny_unet, monkeypatch, bug):
    from tests.test_unet import TINY_SD_CONFIG
    model, params = tiny_unet
    latents, context = randn(2, 4, 16, 16), randn(2, 77, 24)
    theirs = tomesd_unet(model, latents, 500, context, 0.5)
    module, name, old, new = BLOCK_BUGS[bug]
    monkeypatch.setattr(module, name, mutated(getattr(module, name), old, new))
    assert_caught(bug, lambda: assert_close(unet_model.unet(params, latents, 500, context, TINY_SD_CONFIG,
                                                            token_merging_ratio=0.5), theirs, RTOL_UNET, "eps"))


# ---------------------------------------------------------------------------------------------
# Whole A1111 runs (tests/test_a1111_pipeline.py's procedure) with token merging
# ---------------------------------------------------------------------------------------------

def a1111_run_with_tome(monkeypatch, kd, models, ratio, hr_ratio=None, **run):
    """tests/test_a1111_pipeline.py's a1111_run with A1111's token merging: process_images patches the
    UNet with get_token_merging_ratio() before sampling, and sample_hr_pass with
    get_token_merging_ratio(for_hr=True) before the second pass (hr_ratio; None: the first's)."""
    from tests import test_a1111_pipeline as a1111
    unet = models[run.get("unet_key", "unet4")]
    first_pass_hires = a1111.a1111_hires_pass

    def hires_pass(*args, **kwargs):
        tomesd.apply_patch(unet, ratio=ratio if hr_ratio is None else hr_ratio, **A1111_ARGS)
        return first_pass_hires(*args, **kwargs)

    monkeypatch.setattr(a1111, "a1111_hires_pass", hires_pass)
    tomesd.apply_patch(unet, ratio=ratio, **A1111_ARGS)
    try:
        return a1111.a1111_run(kd, models, **run)
    finally:
        tomesd.remove_patch(unet)


# (sampler, schedule type, seed, steps, strength, first ratio, npsd's Hires and A1111's hires spec (scale,
# mode, antialias, steps, strength), the UNet: "unet9" a 9-channel inpainting one)
RUNS = {"txt2img": ("euler_a", "automatic", 42, 5, None, 0.5, None, None, "unet4"),
        "img2img": ("dpmpp_2m", "karras", 7, 8, 0.6, 0.3, None, None, "unet4"),
        "hires": ("euler", "automatic", 11, 5, None, 0.3, Hires(2.0, "latent", 4, 0.55, token_merging_ratio=0.6),
                  (2.0, "bilinear", False, 4, 0.55), "unet4"),
        "inpainting UNet img2img": ("euler", "automatic", 5, 6, 0.7, 0.5, None, None, "unet9")}


@pytest.mark.parametrize("run", RUNS)
def test_a1111_run_with_token_merging(kd, models, monkeypatch, run):  # noqa: F811
    """npsd's txt2img/img2img with token_merging_ratio (and a hires pass with its own ratio) against
    A1111's run with tomesd: within tests/test_a1111_pipeline.py's TOL_IMAGE, 2e-5 (measured: txt2img
    2.0e-6, img2img 1.6e-6, hires 2.6e-6, a 9-channel inpainting UNet's img2img 1.9e-6). The same run
    without merging (1.1e-2 .. 2.2e-2), or with the first pass's ratio in the hires pass (1.3e-3), is far
    outside it."""
    sampler, schedule_type, seed, steps, strength, ratio, hires, spec, unet_key = RUNS[run]
    hr_ratio = None if hires is None else hires.token_merging_ratio
    ref = a1111_run_with_tome(monkeypatch, kd, models, ratio, hr_ratio, sampler=sampler, schedule_type=schedule_type,
                              seed=seed, steps=steps, strength=strength, hires=spec, unet_key=unet_key)
    ours = npsd_run(models, sampler, schedule_type, seed, steps, strength, hires, unet_key=unet_key,
                    token_merging_ratio=ratio)
    print(f"\n  {assert_close(ours, ref, TOL_IMAGE, f'{run} with token merging vs A1111')}, tolerance {TOL_IMAGE:g}")
    wrong = {"without merging": dict(token_merging_ratio=0.0)}
    if hires is not None:
        wrong["the first pass's ratio in the hires pass"] = dict(
            token_merging_ratio=ratio, hires=dataclasses.replace(hires, token_merging_ratio=None))
    for what, options in wrong.items():
        kw = dict(dict(hires=hires, token_merging_ratio=ratio), **options)
        assert_caught(what, lambda: assert_close(npsd_run(models, sampler, schedule_type, seed, steps, strength,
                                                          unet_key=unet_key, **kw), ref, TOL_IMAGE, run))


def test_ratio_0_is_the_default_path(models):  # noqa: F811
    """Ratio 0 gives the default path's numbers bit for bit; a ratio reaches the UNet in every pipeline
    (inpaint with a 9-channel UNet included)."""
    from tests.test_pipelines import make_image
    pipe = npsd_pipe(models)
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=3, output_type="np")
    default = pipe.txt2img("a red circle", **kw)
    np.testing.assert_array_equal(pipe.txt2img("a red circle", token_merging_ratio=0, **kw), default)
    assert not np.array_equal(pipe.txt2img("a red circle", token_merging_ratio=0.5, **kw), default)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:24, 8:24] = True
    inpaint = npsd_pipe(models, "unet9").inpaint
    default = inpaint("a red circle", make_image(), mask, **kw)
    np.testing.assert_array_equal(inpaint("a red circle", make_image(), mask, token_merging_ratio=0, **kw), default)
    assert not np.array_equal(inpaint("a red circle", make_image(), mask, token_merging_ratio=0.5, **kw), default)
    with pytest.raises(InputError, match=r"^token_merging_ratio must be a number in \[0, 0.9\] \(0: off\), got 0.95$"):
        pipe.txt2img("a red circle", token_merging_ratio=0.95, **kw)
    with pytest.raises(InputError, match=r"^hires token_merging_ratio must be a number"):
        Hires(token_merging_ratio=-0.1)
