"""Token merging (npsd/tome.py) against the `tomesd` package, as AUTOMATIC1111 applies it.

A1111 (modules/sd_models.py, apply_token_merging) patches its ldm model with
tomesd.apply_patch(model, ratio, use_rand=False, merge_attn=True, merge_crossattn=False,
merge_mlp=False). The references here are tomesd's own functions: bipartite_soft_matching_random2d
(merge.py) for the matching, compute_merge (patch.py) and the three lines of its ldm block patch
(ToMeBlock._forward, which A1111 runs) for a transformer block and a whole diffusers UNet.
"""

import inspect
import textwrap
import types

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from npsd import tome, unet as unet_model
from npsd.errors import InputError
from npsd.testing import assert_close, compare
from tests.helpers import assert_caught, n2t, perturb_, t2n, to_numpy_params

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

@pytest.mark.parametrize("h, w, ratio", [(8, 8, 0.5), (7, 9, 0.3), (16, 12, 0.74), (5, 6, 0.1)])
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
    assert ours.shape == theirs.shape == (b, n - r, n)
    for k in range(b):
        np.testing.assert_array_equal(ours[k][np.lexsort(ours[k].T)], theirs[k][np.lexsort(theirs[k].T)])
    # values through a per-token function between merge and unmerge (as attention's output)
    ours = unmerge(np.tanh(merge(x)))
    theirs = t2n(ref_unmerge(torch.tanh(ref_merge(n2t(x)))))
    print(f"\n  {h}x{w} r={r}: {compare(ours, theirs, 'unmerge(tanh(merge(x)))')}, tolerance 1e-6")
    assert_close(ours, theirs, 1e-6, "unmerge(tanh(merge(x)))")


def test_ratio_checked():
    for bad in (-0.1, 0.75, 1.0, float("nan"), "0.5", True, None):
        with pytest.raises(InputError, match=r"token_merging_ratio must be a number in \[0, 0.75\)"):
            tome.check_ratio(bad)
    assert tome.check_ratio(0) == 0.0 and tome.check_ratio(np.float32(0.5)) == 0.5


# ---------------------------------------------------------------------------------------------
# One transformer block
# ---------------------------------------------------------------------------------------------

BLOCK = dict(dim=64, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=24, activation_fn="geglu")
RTOL_BLOCK = 1e-5


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
        (unet_model, "transformer_block", "tome.matching(x)", "tome.matching(h)"),
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
