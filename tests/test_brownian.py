"""npsd.brownian against torchsde's BrownianTree and k-diffusion's BrownianTreeNoiseSampler (the step
noise of AUTOMATIC1111's "DPM++ 2M SDE", "DPM++ SDE" and "DPM++ 3M SDE"), and those samplers run on it
against k-diffusion's.

The tree's numbers are compared bit for bit (tolerance 0): the same seeds (NumPy's SeedSequence), the
same normal numbers (torch's CPU generator, npsd.rng.TorchGenerator) and the same float32 operations
in the same order. A whole DPM++ 2M SDE or 3M SDE run differs by float32 rounding only: measured
1.5e-6 and 1.8e-6 relative (the generator-noise runs of tests/test_kdiffusion.py measure the same);
tolerance 1e-5.
DPM++ SDE also asks the tree at each step's midpoint, which k-diffusion computes as exp(-(t + h/2))
with torch's float32 log and exp; npsd takes sqrt(sigma_i sigma_{i+1}). The two differ in the last
bit of float32 now and then (so do NumPy's log and exp from torch's), and a point that then rounds
to the other 1e-6 neighbour of the tree's grid gets slightly different noise: measured 2.7e-4
relative on the final latents, far below what shows in an image; tolerance 1e-3.
"""

import math

import numpy as np
import pytest
import torch
import torchsde

import npsd
from npsd import schedulers as S
from npsd.brownian import BrownianNoise, BrownianTree, brownian_noise
from npsd.testing import assert_close
from tests.test_kdiffusion import denoiser, fake_eps_np, kd, kd_sigmas, npsd_schedule, randn, torch_draws  # noqa: F401

# torchsde warns when a float32 sigma lies beyond the tree's ends rounded to 6 decimals, and holds it
# there (as npsd does, without a warning)
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
RTOL_RUN = 1e-5
# DPM++ SDE asks the tree at its midpoints, which k-diffusion computes with torch's float32 log and
# exp; NumPy's differ in the last bit now and then, and a point that then rounds to the other 1e-6
# neighbour gets slightly different noise (module docstring)
RTOL_SDE_MIDPOINTS = 1e-3
SIGMA_MIN, SIGMA_MAX = np.float32(0.0291675), np.float32(14.614642)


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 31337, 2**32 - 1, 2**40 + 3])
def test_tree_equals_torchsde_bit_for_bit(seed):
    """Increments over neighbouring intervals (a sampler's steps, in either order), over intervals that
    span several of them, the whole interval and a repeated query: the same float32 numbers."""
    rng = np.random.default_rng(seed % 1000)
    ref = torchsde.BrownianTree(torch.tensor(SIGMA_MIN), torch.zeros(2, 4, 5), torch.tensor(SIGMA_MAX), entropy=seed)
    ours = BrownianTree(SIGMA_MIN, SIGMA_MAX, (2, 4, 5), seed)
    points = np.sort(rng.uniform(SIGMA_MIN, SIGMA_MAX, 15).astype(np.float32))[::-1]    # decreasing, as sigmas
    queries = [(b, a) for a, b in zip(points[:-1], points[1:])]
    queries += [(points[9], points[2]), (SIGMA_MIN, SIGMA_MAX), queries[0], (points[-1], points[0])]
    for a, b in queries:
        expected = ref(torch.tensor(a), torch.tensor(b)).numpy()
        got = ours(a, b)
        assert got.dtype == np.float32 and np.array_equal(bits(got), bits(expected)), (seed, a, b)


def test_noise_equals_kdiffusion_noise_sampler(kd):  # noqa: F811 - the fixture
    """BrownianNoise with one seed per image is k-diffusion's BrownianTreeNoiseSampler with a list of
    seeds (A1111's create_noise_sampler): N(0, I) per element, the same numbers."""
    x = torch.zeros(2, 4, 6, 6)
    sigmas = kd_sigmas(kd, 10, True)
    ref = kd.sampling.BrownianTreeNoiseSampler(x, torch.tensor(sigmas[-2]), torch.tensor(sigmas[0]), seed=[7, 8])
    ours = BrownianNoise((4, 6, 6), [7, 8], sigmas[-2], sigmas[0])
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        expected = ref(torch.tensor(s), torch.tensor(s_next)).numpy()
        assert np.array_equal(bits(ours(s, s_next)), bits(expected)), (s, s_next)
    z = np.concatenate([ours(s, s_next).ravel() for s, s_next in zip(sigmas[:-2], sigmas[1:-1])])
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1                  # 2592 numbers, N(0, 1)


@pytest.mark.parametrize("karras", [False, True], ids=["default-sigmas", "karras"])
@pytest.mark.parametrize("name, function", [("dpmpp_2m_sde", "sample_dpmpp_2m_sde"), ("dpmpp_sde", "sample_dpmpp_sde"),
                                            ("dpmpp_3m_sde", "sample_dpmpp_3m_sde")])
def test_sde_samplers_with_brownian_noise_equal_kdiffusion(kd, name, function, karras):  # noqa: F811 - the fixture
    """npsd's dpmpp_2m_sde, dpmpp_sde and dpmpp_3m_sde on the Brownian noise of the image seeds 5 and 6 against
    k-diffusion's samplers with the BrownianTreeNoiseSampler A1111 builds for them, on A1111's sigmas,
    the fake model of tests/test_kdiffusion.py (npsd's dpmpp_2m_sde steps on x / sqrt(sigma^2 + 1)).
    With the generator's draws instead of the tree's, the run differs by far more than the tolerance."""
    vp = name == "dpmpp_2m_sde"
    rtol = RTOL_SDE_MIDPOINTS if name == "dpmpp_sde" else RTOL_RUN
    worst = 0.0
    for n in (2, 10, 20, 50):
        sigmas = kd_sigmas(kd, n, karras)
        x_T = randn(n) * np.float32(sigmas[0])
        x = torch.from_numpy(x_T.copy())
        noise = kd.sampling.BrownianTreeNoiseSampler(x, torch.from_numpy(sigmas[sigmas > 0]).min(),
                                                     torch.from_numpy(sigmas).max(), seed=[5, 6])
        ref = getattr(kd.sampling, function)(denoiser(kd), x, torch.from_numpy(sigmas), disable=True,
                                             extra_args={"cond": None}, noise_sampler=noise).numpy()
        sched = npsd_schedule(name, sigmas)
        start = x_T / np.float32(math.sqrt(float(sigmas[0]) ** 2 + 1)) if vp else x_T
        out = S.sample(fake_eps_np, start, sched, noise_sampler=brownian_noise(sched, 0, x_T.shape, 5))
        worst = max(worst, assert_close(out, ref, rtol, f"{name} brownian karras={karras} n={n}").max_rel)
        drawn = S.sample(fake_eps_np, start, sched, noises=torch_draws(5, 2 * n))
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            assert_close(drawn, ref, rtol, "the generator's noise instead of the tree's")
    print(f"{name} on Brownian noise, karras={karras}: {worst:.3g} (tolerance {rtol:g})")


def test_noise_sampler_only_where_it_applies():
    from npsd.config import sd15_config
    from npsd.errors import InputError
    sched = S.make_schedule("euler_a", 4, sd15_config())
    with pytest.raises(InputError, match="applies to dpmpp_2m_sde, dpmpp_sde, dpmpp_3m_sde, not to 'euler_a'"):
        S.sample(fake_eps_np, randn(0), sched, noise_sampler=lambda s, t: None)


def test_each_image_of_a_batch_has_its_own_seeds_tree():
    """As A1111 gives image b of a batch the seed + b, the pipelines give it the Brownian tree of seed
    + b: with the same starting latents, image 2 of a batch from seed 5 is image 1 from seed 6 (measured
    equal; tolerance 1e-6 for the rounding a batch of 2 may add against 1), and not image 1 from seed 5."""
    import npsd
    from npsd.rng import TorchGenerator
    pipe = npsd.load()
    h = pipe.config["defaults"]["height"] // pipe.vae_factor
    latents = TorchGenerator(9).standard_normal((2, pipe.latent_channels, h, h))
    kw = dict(num_inference_steps=4, sampler="dpmpp_2m_sde", sde_noise="brownian", output_type="np")
    both = pipe.txt2img("a red circle", seed=5, latents=latents, num_images=2, **kw)
    second = pipe.txt2img("a red circle", seed=6, latents=latents[1:], **kw)
    print(assert_close(both[1], second[0], 1e-6, "image 2 of seed 5 against image 1 of seed 6"))
    other = pipe.txt2img("a red circle", seed=5, latents=latents[1:], **kw)
    assert np.abs(other[0] - both[1]).max() > 1e-2


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde"])
def test_one_step_runs(sampler):
    """One step goes from sigma_max to 0: the tree spans [sigma_max, sigma_max] and is never asked
    (torchsde builds such a tree too); the image is the generator-noise run's, whose one draw goes
    unused. It was an internal error ("a Brownian tree needs t0 < t1")."""
    torchsde.BrownianTree(t0=torch.tensor(14.6), w0=torch.zeros(2), t1=torch.tensor(14.6), entropy=1)
    pipe = npsd.load()
    for schedule_type in (None, "karras"):
        kw = dict(num_inference_steps=1, seed=3, sampler=sampler, schedule_type=schedule_type, output_type="np")
        brownian = pipe.txt2img("a red circle", sde_noise="brownian", **kw)
        assert np.array_equal(brownian, pipe.txt2img("a red circle", **kw))
