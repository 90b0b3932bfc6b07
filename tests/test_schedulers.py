"""npsd.schedulers and npsd.guidance against diffusers 0.42.1's schedulers, configured like SD v1.5.

Reference schedulers: DDPMScheduler, DDIMScheduler (clip_sample=False, set_alpha_to_one=False),
EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2); all with beta_start
0.00085, beta_end 0.012, "scaled_linear", steps_offset 1 and timestep_spacing set explicitly.
Their other settings are diffusers' defaults (final_sigmas_type "zero", lower_order_final True,
interpolation_type "linear", s_churn 0), which is what SD v1.5 pipelines use.

Tolerances (relative error = max |npsd - ref| / max |ref|, see npsd.testing):
- Integer timesteps must be equal exactly; dtypes too.
- Sigmas: 1e-6. diffusers computes the betas with a float32 linspace and npsd in float64 as the
  original latent-diffusion code does (both stored as float32); measured 5.9e-7.
- Karras' fractional timesteps come from interpolating log(sigma) in that table: measured max
  |dt| 3.7e-4 (of 0..999); tolerance 1e-3 absolute. The rounded DPM-Solver ones are equal.
- One step: 1e-6 (float32 arithmetic in both; npsd computes scalar coefficients in float64);
  measured <= 3e-7.
- Whole loops with a fake model that depends on x and t: 5e-6, as errors of ~1e-7 per step
  carry through up to 25 steps and the 1/sigma, 1/sqrt(abar) factors; measured <= 9.1e-7 (final
  latents) and <= 9.8e-7 (x0_pred of every step). ``pytest -s`` prints the numbers; docs/samplers.md
  lists them.
"""

import math
import types

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from npsd import InputError
from npsd import schedulers as S
from npsd.config import sd15_config
from npsd.guidance import cfg, guided_model
from npsd.testing import assert_close

CONFIG = sd15_config()
RTOL_SIGMA = 1e-6
RTOL_STEP = 1e-6
RTOL_LOOP = 5e-6
KARRAS_T_ATOL = 1e-3
SHAPE = (2, 4, 8, 8)
STEP_COUNTS = (1, 2, 10, 25, 50)
SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m")   # the rest: tests/test_samplers_more.py
KARRAS_OK = ("euler", "euler_a", "heun", "dpmpp_2m")
WITH_KARRAS = [(name, k) for name in SAMPLERS for k in ((False, True) if name in KARRAS_OK else (False,))]

# diffusers' schedulers call np.array(tensor) in a way NumPy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def reference(name, spacing="leading", karras=False):
    """The diffusers scheduler that npsd's `name` follows, configured like SD v1.5."""
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, timestep_spacing=spacing)
    if name == "ddpm":
        return DDPMScheduler(**kw, clip_sample=False, variance_type="fixed_small")
    if name == "ddim":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler(**kw, use_karras_sigmas=karras)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**kw)       # no Karras option: patched in where needed
    if name == "heun":
        return HeunDiscreteScheduler(**kw, use_karras_sigmas=karras)
    return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras)


def reference_set(name, n, spacing="leading", karras=False):
    """A diffusers scheduler after set_timesteps(n). Euler ancestral with Karras sigmas gets the
    Euler scheduler's Karras sigmas and timesteps (diffusers' EA has no such option; its step
    formula is what is checked then)."""
    r = reference(name, spacing, karras)
    r.set_timesteps(n)
    if name == "euler_a" and karras:
        e = reference("euler", spacing, True)
        e.set_timesteps(n)
        r.sigmas, r.timesteps = e.sigmas.clone(), e.timesteps.clone()
    return r


def ref_timesteps_sigmas(r, name):
    """diffusers' timesteps and sigmas in npsd's layout (Heun lists every timestep but the first twice)."""
    ts = r.timesteps.numpy()
    sig = getattr(r, "sigmas", None)
    if name in ("ddpm", "ddim"):
        sig = None
    elif name == "heun":
        ts, sig = ts[::2], torch.cat([r.sigmas[::2], r.sigmas[-1:]])
    return ts, (None if sig is None else sig.numpy())


def fake_eps_np(x, t):
    # a fake noise predictor that depends on both x and t (so a sampler that gives it the wrong x or t fails)
    return np.tanh(np.float32(0.3) * x) * np.float32(math.cos(float(t) / 300)) + np.float32(0.1)


def fake_eps_torch(x, t):
    return torch.tanh(0.3 * x) * math.cos(float(t) / 300) + 0.1


def randn(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_draws(seed, count, shape=SHAPE):
    """The first `count` draws diffusers' steps make from torch.Generator().manual_seed(seed)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy() for _ in range(count)]


def run_reference(name, r, x, timesteps, seed=123, eta=0.0):
    """diffusers' sampling loop (as StableDiffusionPipeline runs it) with the fake model.
    Returns the final latents and the x0 prediction of every step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x.copy())
    x0s = []
    for t in timesteps:
        x_in = r.scale_model_input(x, t)
        eps = fake_eps_torch(x_in, t)
        kw = {}
        if name in ("ddpm", "euler_a"):
            kw["generator"] = g
        if name == "ddim":
            kw.update(eta=eta, generator=g)
        out = r.step(eps, t, x, **kw)
        x = out.prev_sample
        x0s.append((r.model_outputs[-1] if name == "dpmpp_2m" else out.pred_original_sample).numpy().copy())
    return x.numpy(), x0s


def get_timesteps(r, n, strength):
    """diffusers' own img2img get_timesteps (it also calls r.set_begin_index)."""
    return StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=r), n, strength, "cpu")


def run_npsd(sched, x, seed=123, eta=0.0, start_index=0):
    x0s = []
    out = S.sample(fake_eps_np, x, sched, noises=torch_draws(seed, 2 * sched.num_inference_steps),
                   callback=lambda i, t, xi, x0: x0s.append(x0), start_index=start_index, eta=eta)
    return out, x0s


def loop_cases():
    cases = []
    for name in SAMPLERS:
        for spacing in S.SPACINGS:
            for karras in ((False, True) if name in KARRAS_OK else (False,)):
                for n in ((1, 2, 10, 25) if spacing == "leading" else (10,)):
                    cases.append((name, spacing, karras, n))
    return cases


# ---------------------------------------------------------------------------------------------
# Noise schedule and forward process
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_betas_and_alphas_cumprod(kind):
    cfg_ = dict(CONFIG["scheduler"], beta_schedule=kind)
    r = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=kind)
    b, ac = S.betas(cfg_), S.alphas_cumprod(cfg_)
    assert b.dtype == ac.dtype == np.float32 and b.shape == ac.shape == (1000,)
    print(assert_close(b, r.betas.numpy(), RTOL_SIGMA, f"betas {kind}"))
    print(assert_close(ac, r.alphas_cumprod.numpy(), RTOL_SIGMA, f"alphas_cumprod {kind}"))
    # the float64 computation of the original latent-diffusion code, stored in float32
    if kind == "scaled_linear":
        lin = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    else:
        lin = np.linspace(0.00085, 0.012, 1000)
    np.testing.assert_array_equal(ac, np.cumprod(1 - lin).astype(np.float32))


def test_add_noise_per_item_and_scalar_t():
    r = reference("ddpm")
    ac = S.alphas_cumprod(CONFIG)
    x0, noise = randn(1), randn(2)
    t = np.array([999, 1], dtype=np.int64)
    ref = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    print(assert_close(S.add_noise(x0, noise, t, ac), ref, RTOL_STEP, "add_noise per item"))
    ref = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([500, 500])).numpy()
    print(assert_close(S.add_noise(x0, noise, 500, ac), ref, RTOL_STEP, "add_noise scalar t"))
    # the formula itself: sqrt(abar) x0 + sqrt(1 - abar) eps, not sqrt(1 - abar) x0 + sqrt(abar) eps
    with pytest.raises(AssertionError):
        assert_close(S.add_noise(noise, x0, 500, ac), ref, 1e-3, "add_noise with x0/noise swapped")


@pytest.mark.parametrize("name, karras", WITH_KARRAS)
def test_noise_at_step_equals_scheduler_add_noise(name, karras):
    n, start = 10, 4
    r = reference_set(name, n, "leading", karras)
    order = 2 if name == "heun" else 1
    if hasattr(r, "set_begin_index"):
        r.set_begin_index(start * order)
    x0, noise = randn(3), randn(4)
    t = r.timesteps[start * order:][:1].repeat(SHAPE[0])
    ref = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras)
    print(assert_close(S.noise_at_step(sched, x0, noise, start), ref, RTOL_STEP, f"noise_at_step {name}"))
    np.testing.assert_array_equal(S.noise_at_step(sched, x0, noise, n), x0)


# ---------------------------------------------------------------------------------------------
# Timesteps and sigmas
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_timesteps_and_sigmas(name, spacing):
    for karras in ((False, True) if name in KARRAS_OK else (False,)):
        for n in STEP_COUNTS:
            r = reference_set(name, n, spacing, karras)
            ref_t, ref_s = ref_timesteps_sigmas(r, name)
            sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras, timestep_spacing=spacing)
            what = f"{name} {spacing} karras={karras} n={n}"
            assert sched.timesteps.dtype == ref_t.dtype, what
            if karras and ref_t.dtype == np.float32:
                # fractional timesteps recovered from Karras sigmas (see the module docstring)
                assert np.abs(sched.timesteps - ref_t).max() <= KARRAS_T_ATOL, what
            else:
                np.testing.assert_array_equal(sched.timesteps, ref_t, err_msg=what)
            if ref_s is not None:
                assert sched.sigmas.dtype == np.float32 and sched.sigmas[-1] == 0, what
                assert_close(sched.sigmas, ref_s, RTOL_SIGMA, f"sigmas {what}")
            ref_init = float(r.init_noise_sigma)
            assert abs(sched.init_noise_sigma - ref_init) <= RTOL_SIGMA * ref_init, what
            if name in ("ddpm", "ddim"):
                assert sched.sigmas is None and sched.init_noise_sigma == 1.0


def test_known_timesteps():
    """The values docs/samplers.md quotes."""
    assert list(S.timesteps(50)[:3]) == [981, 961, 941] and S.timesteps(50)[-1] == 1
    assert list(S.timesteps(50, steps_offset=0)[[0, -1]]) == [980, 0]           # the course's spacing
    assert list(S.timesteps(50, "trailing")[[0, 1, -1]]) == [999, 979, 19]
    assert list(S.timesteps(50, "linspace")[[0, 1, -1]]) == [999, 979, 0]
    assert list(S.dpm_timesteps(50)[[0, 1, -1]]) == [951, 932, 20]
    assert list(S.timesteps(1)) == [1]                                          # leading with one step
    assert list(S.sigma_timesteps(7, "linspace")[:2]) == [999.0, 832.5]


def test_course_spacing_differs_from_sd15_leading():
    """Sensitivity: the course's 980..0 spacing is not SD v1.5's leading, steps_offset=1 one, and a
    DDIM loop run on it fails the parity check against diffusers' SD v1.5 configuration."""
    course = dict(CONFIG["scheduler"], steps_offset=0)
    assert not np.array_equal(S.timesteps(50, steps_offset=0), reference_set("ddim", 50).timesteps.numpy())
    x = randn(5)
    r = reference_set("ddim", 10)
    ref, _ = run_reference("ddim", r, x, r.timesteps)
    print(assert_close(S.sample(fake_eps_np, x, S.make_schedule("ddim", 10, CONFIG)), ref, RTOL_LOOP, "ddim leading"))
    with pytest.raises(AssertionError):
        out = S.sample(fake_eps_np, x, S.make_schedule("ddim", 10, course))
        assert_close(out, ref, RTOL_LOOP, "ddim course spacing")


# ---------------------------------------------------------------------------------------------
# One step with the same model output and the same noise
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "euler_a"])
def test_one_step(name):
    n, i = 10, 3
    r = reference_set(name, n)
    if hasattr(r, "set_begin_index"):
        r.set_begin_index(i)
    sched = S.make_schedule(name, n, CONFIG)
    x, eps = randn(6) * np.float32(sched.init_noise_sigma), randn(7)
    t = r.timesteps[i]
    ref_in = r.scale_model_input(torch.from_numpy(x), t).numpy()
    noise = torch_draws(9, 1)[0]
    kw = {"generator": torch.Generator().manual_seed(9)} if name in ("ddpm", "euler_a") else {}
    if name == "ddim":
        kw = {"eta": 0.7, "generator": torch.Generator().manual_seed(9)}
    out = r.step(torch.from_numpy(eps), t, torch.from_numpy(x), **kw)
    ac, sig = sched.alphas_cumprod, sched.sigmas
    if name == "ddpm":
        x_prev, x0 = S.ddpm_step(x, eps, int(t), int(sched.prev_timesteps[i]), ac, noise)
    elif name == "ddim":
        x_prev, x0 = S.ddim_step(x, eps, int(t), int(sched.prev_timesteps[i]), ac, 0.7, noise)
    elif name == "euler":
        x_prev, x0 = S.euler_step(x, eps, sig[i], sig[i + 1])
    else:
        x_prev, x0 = S.euler_ancestral_step(x, eps, sig[i], sig[i + 1], noise)
    assert x_prev.dtype == x0.dtype == np.float32
    print(assert_close(x_prev, out.prev_sample.numpy(), RTOL_STEP, f"{name} step x_prev"))
    print(assert_close(x0, out.pred_original_sample.numpy(), RTOL_STEP, f"{name} step x0_pred"))
    # the model input scaling of the sigma-based samplers
    if sig is not None:
        print(assert_close(S.scale_model_input(x, sig[i]), ref_in, RTOL_STEP, f"{name} scale_model_input"))


def test_ddim_eta0_and_ddpm_last_step():
    r = reference_set("ddim", 10)
    x, eps = randn(10), randn(11)
    for t, t_prev in ((int(r.timesteps[0]), int(r.timesteps[1])), (1, -99)):  # a middle and the last step
        out = r.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=0.0)
        x_prev, x0 = S.ddim_step(x, eps, t, t_prev, S.alphas_cumprod(CONFIG))
        print(assert_close(x_prev, out.prev_sample.numpy(), RTOL_STEP, f"ddim eta=0 t={t}"))
    # DDPM at t = 0 (linspace spacing ends there): the posterior mean, no noise
    r = reference_set("ddpm", 10, "linspace")
    out = r.step(torch.from_numpy(eps), 0, torch.from_numpy(x))
    x_prev, _ = S.ddpm_step(x, eps, 0, -1, S.alphas_cumprod(CONFIG), None)
    print(assert_close(x_prev, out.prev_sample.numpy(), RTOL_STEP, "ddpm t=0"))


def test_ddim_eta_from_0_to_1():
    """eta = 1 (DDPM's sigma_t) keeps eq. 12's square root real at every step; above 1 it need not
    (2 gave a math domain error from deep inside the loop), so eta outside [0, 1] is refused first."""
    ac, x, eps, noise = S.alphas_cumprod(CONFIG), randn(3), randn(4), randn(5)
    for steps in (1, 2, 10, 50):
        ts = [int(t) for t in S.make_schedule("ddim", steps, CONFIG).timesteps] + [-1]
        for t, t_prev in zip(ts, ts[1:]):
            x_prev, _ = S.ddim_step(x, eps, t, t_prev, ac, eta=1.0, noise=noise)
            assert np.isfinite(x_prev).all()
    t, t_prev = [int(t) for t in S.make_schedule("ddim", 2, CONFIG).timesteps]
    ab_t, ab_prev = float(ac[t]), float(ac[t_prev])
    sigma2 = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)          # eq. 16 at eta = 1, squared
    assert 1 - ab_prev - 1.01 ** 2 * sigma2 < 0                          # eta 1.01 would take a negative root
    for eta in (1.01, 2, -0.1, float("nan"), "0.5", True):
        with pytest.raises(InputError, match=r"eta must be a number in \[0, 1\]"):
            S.ddim_step(x, eps, t, t_prev, ac, eta=eta, noise=noise)
        with pytest.raises(InputError, match=r"eta must be a number in \[0, 1\]"):
            S.sample(lambda x, t: x * 0.1 + float(t) * 1e-4, x, S.make_schedule("ddim", 2, CONFIG),
                     rng=np.random.default_rng(0), eta=eta)


@pytest.mark.parametrize("karras", [False, True])
def test_heun_two_stages(karras):
    n, k = 10, 3
    r = reference_set("heun", n, karras=karras)
    r.set_begin_index(2 * k)                      # diffusers' index of npsd's step k (first stage)
    sched = S.make_schedule("heun", n, CONFIG, use_karras_sigmas=karras)
    sig = sched.sigmas
    x, eps1, eps2 = randn(12) * np.float32(3.0), randn(13), randn(14)
    t = r.timesteps[2 * k]
    out1 = r.step(torch.from_numpy(eps1), t, torch.from_numpy(x))
    x_euler, x0_1, d = S.heun_predict(x, eps1, sig[k], sig[k + 1])
    print(assert_close(x_euler, out1.prev_sample.numpy(), RTOL_STEP, "heun stage 1"))
    print(assert_close(x0_1, out1.pred_original_sample.numpy(), RTOL_STEP, "heun stage 1 x0"))
    out2 = r.step(torch.from_numpy(eps2), r.timesteps[2 * k + 1], out1.prev_sample)
    x_next, x0_2 = S.heun_correct(x, d, eps2, x_euler, sig[k], sig[k + 1])
    print(assert_close(x_next, out2.prev_sample.numpy(), RTOL_STEP, "heun stage 2"))
    print(assert_close(x0_2, out2.pred_original_sample.numpy(), RTOL_STEP, "heun stage 2 x0"))


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_first_and_second_order_steps(karras):
    n = 10
    r = reference_set("dpmpp_2m", n, karras=karras)
    sched = S.make_schedule("dpmpp_2m", n, CONFIG, use_karras_sigmas=karras)
    sig = sched.sigmas
    x, eps1, eps2 = randn(15), randn(16), randn(17)
    out1 = r.step(torch.from_numpy(eps1), r.timesteps[0], torch.from_numpy(x)).prev_sample
    x1, x0_1 = S.dpmpp_2m_step(x, eps1, sig[0], sig[1])
    print(assert_close(x1, out1.numpy(), RTOL_STEP, "dpm++ first-order step"))
    print(assert_close(x0_1, r.model_outputs[-1].numpy(), RTOL_STEP, "dpm++ x0 of step 0"))
    out2 = r.step(torch.from_numpy(eps2), r.timesteps[1], out1).prev_sample
    x2, x0_2 = S.dpmpp_2m_step(x1, eps2, sig[1], sig[2], sig[0], x0_1)
    print(assert_close(x2, out2.numpy(), RTOL_STEP, "dpm++ second-order step"))
    print(assert_close(x0_2, r.model_outputs[-1].numpy(), RTOL_STEP, "dpm++ x0 of step 1"))


# ---------------------------------------------------------------------------------------------
# Whole sampling loops with a fake model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, spacing, karras, n", loop_cases())
def test_sampling_loop(name, spacing, karras, n):
    r = reference_set(name, n, spacing, karras)
    sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras, timestep_spacing=spacing)
    x_T = randn(20) * np.float32(float(r.init_noise_sigma))     # latents * init_noise_sigma, as the pipelines do
    eta = 0.5 if name == "ddim" and spacing == "leading" else 0.0
    ref, ref_x0s = run_reference(name, r, x_T, r.timesteps, eta=eta)
    out, x0s = run_npsd(sched, x_T, eta=eta)
    what = f"{name} {spacing} karras={karras} n={n}"
    c = assert_close(out, ref, RTOL_LOOP, f"loop {what}")
    print(c)
    # one x0_pred per npsd step; diffusers' Heun makes two per step, the second is the step's final estimate
    ref_x0s = ref_x0s[1::2] + ref_x0s[-1:] if name == "heun" else ref_x0s
    assert len(x0s) == len(ref_x0s) == n
    checks = [assert_close(a, b, RTOL_LOOP, f"x0_pred step {i} {what}") for i, (a, b) in enumerate(zip(x0s, ref_x0s))]
    worst = max(checks, key=lambda c: c.max_rel)
    print(f"  worst x0_pred: {worst}")


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_loop_at_sd_latent_size(name):
    """SD v1.5's own latent size (batch 2, 4 x 64 x 64 for 512 x 512 images), 3 steps."""
    shape, n = (2, 4, 64, 64), 3
    r = reference_set(name, n)
    sched = S.make_schedule(name, n, CONFIG)
    x_T = randn(60, shape) * np.float32(sched.init_noise_sigma)
    ref, _ = run_reference(name, r, x_T, r.timesteps, eta=0.3 if name == "ddim" else 0.0)
    g = torch.Generator().manual_seed(123)
    noises = [torch.randn(shape, generator=g).numpy() for _ in range(n)]
    out = S.sample(fake_eps_np, x_T, sched, noises=noises, eta=0.3 if name == "ddim" else 0.0)
    print(assert_close(out, ref, RTOL_LOOP, f"loop {name} at 2x4x64x64"))


def test_rng_order_is_documented():
    """rng= draws standard_normal(x.shape, float32) per noisy step: the same as noises= with those draws."""
    sched = S.make_schedule("euler_a", 5, CONFIG)
    x = randn(21) * np.float32(sched.init_noise_sigma)
    a = S.sample(fake_eps_np, x, sched, rng=np.random.default_rng(7))
    g = np.random.default_rng(7)
    b = S.sample(fake_eps_np, x, sched, noises=[g.standard_normal(SHAPE, dtype=np.float32) for _ in range(5)])
    np.testing.assert_array_equal(a, b)
    c = S.sample(fake_eps_np, x, sched, rng=np.random.default_rng(8))
    assert not np.array_equal(a, c)


def test_wrong_sigma_fails():
    """Sensitivity: an Euler loop whose sigma schedule is off (one sigma perturbed by 1%) fails the check."""
    n = 10
    r = reference_set("euler", n)
    sched = S.make_schedule("euler", n, CONFIG)
    x_T = randn(22) * np.float32(sched.init_noise_sigma)
    ref, _ = run_reference("euler", r, x_T, r.timesteps)
    sig = sched.sigmas.copy()
    sig[4] *= 1.01
    bad = S.Schedule(**{**sched.__dict__, "sigmas": sig})
    print(assert_close(S.sample(fake_eps_np, x_T, sched), ref, RTOL_LOOP, "euler"))
    with pytest.raises(AssertionError):
        assert_close(S.sample(fake_eps_np, x_T, bad), ref, RTOL_LOOP, "euler with a wrong sigma")


# ---------------------------------------------------------------------------------------------
# img2img: the start step for a strength, and the loop from there
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_start_equals_diffusers_get_timesteps(name):
    for n in (10, 25, 50):
        for strength in (0.05, 0.3, 0.5, 0.75, 0.99, 1.0):
            r = reference_set(name, n)
            ref_ts, ref_n = get_timesteps(r, n, strength)
            if ref_n == 0:
                with pytest.raises(InputError):
                    S.img2img_start_index(n, strength)
                continue
            start = S.img2img_start_index(n, strength)
            sched = S.make_schedule(name, n, CONFIG)
            ref_ts = ref_ts.numpy()[::2] if name == "heun" else ref_ts.numpy()
            np.testing.assert_array_equal(sched.timesteps[start:], ref_ts, err_msg=f"{name} n={n} strength={strength}")
            assert n - start == ref_n


@pytest.mark.parametrize("name, karras", WITH_KARRAS)
def test_img2img_loop(name, karras):
    """The img2img pipeline's scheduler use: get_timesteps, set_begin_index, add_noise, then the loop."""
    n, strength = 10, 0.6
    r = reference_set(name, n, karras=karras)
    ref_ts, _ = get_timesteps(r, n, strength)
    x0, noise = randn(30), randn(31)
    x_start = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[:1].repeat(SHAPE[0])).numpy()
    ref, _ = run_reference(name, r, x_start, ref_ts)
    sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras)
    start = S.img2img_start_index(n, strength)
    x = S.noise_at_step(sched, x0, noise, start)
    out, _ = run_npsd(sched, x, start_index=start)
    print(assert_close(out, ref, RTOL_LOOP, f"img2img loop {name} karras={karras}"))


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

def test_cfg_formula_and_sign():
    u, c = randn(40), randn(41)
    # diffusers' pipelines: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond), in torch
    ref = (torch.from_numpy(u) + 7.5 * (torch.from_numpy(c) - torch.from_numpy(u))).numpy()
    out = cfg(u, c, 7.5)
    assert out.dtype == np.float32
    print(assert_close(out, ref, 1e-6, "cfg"))
    np.testing.assert_allclose(cfg(u, c, 1.0), c, rtol=0, atol=1e-6)               # scale 1 = conditional
    with pytest.raises(AssertionError):
        assert_close(cfg(c, u, 7.5), ref, 1e-3, "cfg with uncond/cond swapped")


def test_guided_model_batches_uncond_first_and_skips_at_scale_1():
    calls = []

    def unet(x, t, context):                      # a fake UNet whose output depends on the context
        calls.append(x.shape[0])
        return np.tanh(x) * context.mean(axis=(1, 2))[:, None, None, None] + np.float32(t) / 1000

    x = randn(42)
    cond, uncond = randn(43, (2, 77, 8)), randn(44, (2, 77, 8))
    ref = cfg(unet(x, 500, uncond), unet(x, 500, cond), 7.5)
    calls.clear()
    print(assert_close(guided_model(unet, cond, uncond, 7.5)(x, 500), ref, 1e-6, "guided_model"))
    assert calls == [4]                           # one UNet call on the batch [uncond, cond]
    with pytest.raises(AssertionError):           # sensitivity: the contexts swapped
        assert_close(guided_model(unet, uncond, cond, 7.5)(x, 500), ref, 1e-3, "guided_model swapped")
    calls.clear()
    np.testing.assert_array_equal(guided_model(unet, cond, uncond, 1.0)(x, 500), unet(x, 500, cond))
    assert calls == [2, 2]                        # scale 1: no unconditional pass (one call + the check's own)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_errors():
    with pytest.raises(InputError, match="ddpm, ddim, euler, euler_a, heun, dpmpp_2m"):
        S.make_schedule("k_lms", 10, CONFIG)
    for bad in (0, -3):
        with pytest.raises(InputError, match="at least 1"):
            S.make_schedule("ddim", bad, CONFIG)
    with pytest.raises(InputError, match="at most 1000"):
        S.make_schedule("euler", 1001, CONFIG)
    with pytest.raises(InputError, match="outside"):
        S.make_schedule("ddim", 1000, CONFIG)                # leading + offset 1 would reach t = 1000
    with pytest.raises(InputError, match="timestep_spacing"):
        S.make_schedule("ddim", 10, CONFIG, timestep_spacing="uniform")
    with pytest.raises(InputError, match="use_karras_sigmas"):
        S.make_schedule("ddim", 10, CONFIG, use_karras_sigmas=True)
    with pytest.raises(InputError, match="strength"):
        S.img2img_start_index(10, 1.5)
    with pytest.raises(InputError, match="no step"):
        S.img2img_start_index(10, 0.05)
    sched = S.make_schedule("euler_a", 10, CONFIG)
    with pytest.raises(InputError, match="rng"):
        S.sample(fake_eps_np, randn(50), sched)
    with pytest.raises(InputError, match="ran out"):
        S.sample(fake_eps_np, randn(50), sched, noises=[randn(51)])
    with pytest.raises(InputError, match="start_index"):
        S.sample(fake_eps_np, randn(50), sched, rng=np.random.default_rng(0), start_index=10)
    with pytest.raises(InputError, match="eta"):
        S.ddim_step(randn(50), randn(51), 981, 961, sched.alphas_cumprod, eta=0.5)
    with pytest.raises(ValueError):                          # the schedule's arrays are read-only
        sched.sigmas[0] = 1.0
