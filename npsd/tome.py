"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023), as AUTOMATIC1111 applies it.

Self-attention over the full latent map costs N^2 for N = h*w tokens (4096 at 512x512). ToMe
merges the r = int(N * ratio) most redundant tokens into others before attn1, attends over the
N - r left, and copies each merged token's output back to its place:

    x += unmerge(attn1(merge(LN(x))))            (in the transformer blocks at the full map only)

merge is bipartite soft matching (Bolya et al. 2023, "Token Merging: Your ViT But Faster", sec. 3):
the tokens are split into destinations D, the top-left token of every 2x2 cell, and sources S,
the rest; each source s picks its most similar destination d(s) = argmax_d cos(x_s, x_d) by the
cosine similarity of the block's input x; the r sources with the highest similarity are merged,
each destination becoming the mean of itself and the sources merged into it; unmerge gives each
merged source its destination's output.

This is the `tomesd` package's bipartite_soft_matching_random2d and compute_merge (tomesd 0.1.3,
merge.py and patch.py) with the arguments A1111's modules/sd_models.py apply_token_merging gives
tomesd.apply_patch: use_rand=False (the top-left destination of each cell, no random choice),
merge_attn=True, merge_crossattn=False, merge_mlp=False, max_downsample=1, sx = sy = 2.
tests/test_token_merging.py checks it against tomesd.
"""

from dataclasses import dataclass

import numpy as np

from . import blas
from .errors import InputError, is_number

STRIDE = 2                                  # tomesd's sx = sy: one destination per 2x2 cell
# A1111's slider goes to 0.9; tomesd merges at most every source, 1 - 1/4 = 0.75 of the tokens (r is
# capped at |S|), so the ratios from 0.75 to 0.9 give the same image
MAX_RATIO = 0.9


def check_ratio(ratio, name="token_merging_ratio"):
    """ratio in [0, MAX_RATIO] as a float, else a one-line InputError."""
    if not is_number(ratio) or not 0 <= ratio <= MAX_RATIO:
        raise InputError(f"{name} must be a number in [0, {MAX_RATIO}] (0: off), got {ratio!r}")
    return float(ratio)


def bipartite_soft_matching(metric, h, w, r):
    """metric [B, N, C] (N = h*w tokens in raster order), r tokens to merge -> (merge, unmerge):
    merge [B, N, C'] -> [B, N - r, C'], unmerge [B, N - r, C'] -> [B, N, C']."""
    b = metric.shape[0]
    # destinations: the top-left token of each full 2x2 cell; sources: the rest (odd edges included)
    is_dst = np.zeros((h, w), bool)
    is_dst[:h // STRIDE * STRIDE:STRIDE, :w // STRIDE * STRIDE:STRIDE] = True
    dst, src = np.flatnonzero(is_dst), np.flatnonzero(~is_dst)                   # token indices, raster order
    r = min(r, len(src))                                                         # (ratios above 0.75)
    m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)                  # unit vectors
    with blas.single_threaded():          # (OpenBLAS's threads cost 20x the product at 1024 tokens; npsd/blas.py)
        scores = m[:, src] @ m[:, dst].transpose(0, 2, 1)                        # [B, |S|, |D|] cosines
    best = scores.argmax(axis=-1)                                                # [B, |S|] d(s)
    order = np.argsort(-scores.max(axis=-1), axis=-1, kind="stable")             # most similar first
    merged, kept = order[:, :r], order[:, r:]                                    # [B, r], [B, |S| - r] into S
    into = np.take_along_axis(best, merged, axis=-1)                             # [B, r] into D
    rows = np.arange(b)[:, None]                                                 # [B, 1] batch index

    def merge(x):                                                                # [B, N, C]
        xs, xd = x[:, src], x[:, dst]                                            # [B, |S|, C], [B, |D|, C]
        total, count = xd.copy(), np.ones(xd.shape[:2], np.float32)              # each destination ...
        np.add.at(total, (rows, into), xs[rows, merged])                         # ... plus its sources,
        np.add.at(count, (rows, into), 1)
        return np.concatenate([xs[rows, kept], total / count[..., None]], axis=1)  # ... averaged: [B, N - r, C]

    def unmerge(y):                                                              # [B, N - r, C]
        yk, yd = y[:, :len(src) - r], y[:, len(src) - r:]                        # kept sources, destinations
        out = np.empty((b, h * w, y.shape[2]), y.dtype)
        out[:, dst] = yd
        out[rows, src[kept]] = yk
        out[rows, src[merged]] = yd[rows, into]                                  # a merged token: its d(s)'s
        return out

    return merge, unmerge


@dataclass(frozen=True)
class TokenMerging:
    """A UNet call's ToMe: ratio of the tokens merged, in (0, MAX_RATIO], and the latent map h x w."""
    ratio: float
    h: int
    w: int

    def applies(self, tokens):
        # tomesd's max_downsample=1: the blocks whose map is the UNet input's, tokens = h*w
        return tokens == self.h * self.w

    def matching(self, x):
        """The block input x [B, h*w, C] -> (merge, unmerge) of int(h*w * ratio) tokens."""
        return bipartite_soft_matching(x, self.h, self.w, int(x.shape[1] * self.ratio))
