"""A Brownian path drawn from a seed, for the noise of the SDE samplers as AUTOMATIC1111 gives it.

An SDE sampler adds, on its step from sigma_i to sigma_{i+1}, noise z ~ N(0, I) scaled to the step.
diffusers draws z from the generator step by step; k-diffusion's ``BrownianTreeNoiseSampler``, which
A1111 uses for its "DPM++ 2M SDE", "DPM++ SDE" and "DPM++ 3M SDE", takes instead the increment of one
Brownian path W over [sigma_{i+1}, sigma_i], normalised:
z = (W(sigma_i) - W(sigma_{i+1})) / sqrt(sigma_i - sigma_{i+1}).
The path is a function of the seed alone, whatever the steps (so the image changes little with the
step count). torchsde's ``BrownianTree`` builds it; this module builds the same numbers without torch.

The tree (torchsde's ``BrownianInterval`` with ``halfway_tree=True``, Levy area off):

- The root interval [t0, t1] has W = sqrt(t1 - t0) N(0, I), the normal numbers of torch's CPU
  generator (npsd.rng.TorchGenerator) seeded with the first of three words that NumPy's
  ``SeedSequence(entropy=seed, pool_size=24)`` generates.
- An interval is split at its halfway point (rounded to 6 decimals, the tolerance 1e-6) into a left
  and a right child. Given the interval's increment W over a length h = l + r, the left child's is
  the Brownian bridge's value at the split, W_left = (l / h) W + sqrt(l r / h) z, and the right
  child's W_right = W - W_left; z are torch's normal numbers seeded with the first word of
  ``SeedSequence(entropy=seed, spawn_key=(key, depth), pool_size=24)``, where the root has key 0 at
  depth 0 and a child key 2 key + (0 left, 1 right) at depth + 1.
- W over [a, b] is the sum of the increments of the intervals that tile it, each found by splitting
  from the root until an interval's ends are a and b.

Everything is in float32 with the same order of operations as torchsde's, so the numbers are the
same (tests/test_brownian.py compares them with torchsde and k-diffusion).
"""

import math
from collections import OrderedDict

import numpy as np

from .rng import TorchGenerator

F = np.float32
SDE_NOISES = ("generator", "brownian")   # the pipelines' sde_noise: drawn step by step, or this module's
TOL_DIGITS = 6                   # torchsde's BrownianTree: tol = 1e-6, points rounded to 6 decimals
POOL_SIZE = 24                   # its SeedSequence pool size
CACHE_SIZE = 45                  # increments kept (torchsde's LRU cache of the same size)


class _Interval:
    __slots__ = ("start", "end", "parent", "is_left", "midway", "key", "depth", "w_seed", "left", "right")

    def __init__(self, start, end, parent, is_left):
        self.start, self.end = round(start, TOL_DIGITS), round(end, TOL_DIGITS)
        self.parent, self.is_left, self.midway = parent, is_left, None


class BrownianTree:
    """W(a, b), the increment over [a, b] of a Brownian path on [t0, t1] with values of `shape`
    (float32), as torchsde.BrownianTree(t0, zeros(shape), t1, entropy=seed)(a, b) returns it."""

    def __init__(self, t0, t1, shape, seed):
        t0, t1 = float(t0), float(t1)
        if not t0 <= t1:                    # t0 == t1 (one step, to sigma 0): a tree never asked, as torchsde's
            raise ValueError(f"a Brownian tree needs t0 <= t1, got {t0} and {t1}")
        self.shape, self.seed = tuple(shape), int(seed)
        self.root = _Interval(t0, t1, None, None)
        self.root.key = self.root.depth = 0
        w_seed, _, _ = np.random.SeedSequence(entropy=self.seed, pool_size=POOL_SIZE).generate_state(3)
        self.root_w = self._normal(w_seed) * F(math.sqrt(t1 - t0))
        self.cache = OrderedDict()

    def __call__(self, a, b):
        # rounded, and held within [t0, t1] as torchsde does (a float32 sigma_max can round above it)
        a = min(max(round(float(a), TOL_DIGITS), self.root.start), self.root.end)
        b = min(max(round(float(b), TOL_DIGITS), self.root.start), self.root.end)
        if not a < b:
            raise ValueError(f"W({a}, {b}) asked of a Brownian tree: the interval is empty at its 1e-6 resolution")
        pieces = []
        self._locate(self.root, a, b, pieces)
        w = self._increment(pieces[0])
        for piece in pieces[1:]:
            w = w + self._increment(piece)
        return w

    def _normal(self, seed):
        return TorchGenerator(int(seed)).standard_normal(self.shape)

    def _locate(self, node, a, b, out):
        """The intervals that tile [a, b] within node, splitting node where needed (torchsde's _loc)."""
        if a == node.start and b == node.end:
            out.append(node)
            return
        if node.midway is None:
            self._split(node, b if a == node.start else a)
        if b <= node.midway:
            self._locate(node.left, a, b, out)
        elif a >= node.midway:
            self._locate(node.right, a, b, out)
        else:
            self._locate(node.left, a, node.midway, out)
            self._locate(node.right, node.midway, b, out)

    def _split(self, node, point):
        """Split node at its halfway point, then the child that holds `point`, until `point` is an end."""
        while True:
            node.midway = round(0.5 * (node.end + node.start), TOL_DIGITS)
            if node.parent is not None:
                node.key = 2 * node.parent.key + (0 if node.is_left else 1)
                node.depth = node.parent.depth + 1
            words = np.random.SeedSequence(entropy=self.seed, spawn_key=(node.key, node.depth),
                                           pool_size=POOL_SIZE).generate_state(4)
            node.w_seed = words[0]
            node.left = _Interval(node.start, node.midway, node, True)
            node.right = _Interval(node.midway, node.end, node, False)
            if point == node.midway:
                return
            node = node.right if point > node.midway else node.left

    def _increment(self, node):
        """The increment over node's interval, from its parent's: the Brownian bridge at the split."""
        if node is self.root:
            return self.root_w
        w_left, w_right = self._children(node.parent)
        return w_left if node.is_left else w_right

    def _children(self, parent):
        """(W_left, W_right) of a split interval, the last CACHE_SIZE of them kept."""
        if parent in self.cache:
            self.cache.move_to_end(parent)
            return self.cache[parent]
        w = self._increment(parent)
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff, right_diff = parent.midway - parent.start, parent.end - parent.midway
        # W_left = (l / h) W + sqrt(l r / h) z   (the bridge at the split), W_right = W - W_left
        mean = w * F(left_diff) * F(h_reciprocal)
        var = left_diff * right_diff * h_reciprocal
        w_left = mean + F(math.sqrt(var)) * self._normal(parent.w_seed)
        self.cache[parent] = pair = (w_left, w - w_left)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return pair


class BrownianNoise:
    """The step noise of k-diffusion's BrownianTreeNoiseSampler with one tree per image, as A1111 makes
    it for its brownian-noise samplers: ``noise(sigma, sigma_next)`` -> [B, *shape] float32, N(0, I)
    per element, (W(sigma) - W(sigma_next)) / sqrt(|sigma - sigma_next|).

    shape: one image's latents [C, h, w]; seeds: one per image (A1111: the image's seed);
    sigma_min, sigma_max: the smallest nonzero and the largest sigma of the steps that run."""

    def __init__(self, shape, seeds, sigma_min, sigma_max):
        self.trees = [BrownianTree(F(sigma_min), F(sigma_max), shape, seed) for seed in seeds]

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next = F(sigma), F(sigma_next)
        a, b, sign = (sigma, sigma_next, F(1)) if sigma < sigma_next else (sigma_next, sigma, F(-1))
        w = np.stack([tree(a, b) for tree in self.trees]) * sign
        return w / np.sqrt(np.abs(sigma_next - sigma))


def brownian_noise(schedule, start_index, shape, seed):
    """The BrownianNoise of a run of `schedule` from step start_index on latents [B, C, h, w] =
    `shape`, as A1111 makes it: image b's tree from seed + b (A1111's seed of image b of a batch;
    a tuple of seeds: one per image),
    over the smallest nonzero and the largest sigma of the steps that run; of the whole schedule for
    A1111's schedules (schedule.schedule_type), whose img2img A1111 gives the whole schedule's tree."""
    first = 0 if schedule.schedule_type is not None else start_index
    sigmas = np.asarray(schedule.sigmas[first:], dtype=F)
    seeds = list(seed) if isinstance(seed, tuple) else [int(seed) + b for b in range(shape[0])]   # (or one per image)
    return BrownianNoise(shape[1:], seeds, sigmas[sigmas > 0].min(), sigmas.max())
