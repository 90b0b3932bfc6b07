"""npsd's PNDM, LMS, DPM++ 2M SDE, UniPC, DPM2, DPM2 ancestral, LCM and DEIS samplers against
diffusers 0.42.1's schedulers configured like SD v1.5 (tests/test_schedulers.py covers the first six);
also prediction types and zero terminal SNR for all fourteen, and guidance rescale.

Reference schedulers, all with beta_start 0.00085, beta_end 0.012, "scaled_linear", steps_offset 1
and timestep_spacing set explicitly, other settings diffusers' defaults:
PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False) (SD v1.5's own scheduler; also
skip_prk_steps=False), LMSDiscreteScheduler (step's default order 4),
DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2),
UniPCMultistepScheduler(solver_order=2, solver_type="bh2"), KDPM2DiscreteScheduler,
KDPM2AncestralDiscreteScheduler, LCMScheduler (original_inference_steps 50), DEISMultistepScheduler
(solver_order 2); use_karras_sigmas on and off for all but PNDM and LCM.

Tolerances (relative error = max |npsd - ref| / max |ref|, see npsd.testing; `pytest -s` prints
the measured numbers):
- Integer timesteps equal exactly. Float timesteps: LMS's and DPM2's plain ones equal; Karras and
  DPM2's midpoint timesteps come from interpolating log(sigma) in the table (diffusers partly in
  float32): measured max |dt| 3.4e-4 (of 0..999), tolerance 1e-3 absolute.
- Sigmas and init_noise_sigma: 1e-6 (float64 vs diffusers' float32 betas, as in
  tests/test_schedulers.py); measured 5.1e-7 and 4.4e-7.
- Each step, given the same model outputs and noise and restarted from diffusers' state: 1e-6;
  measured <= 5.5e-7 (LMS; the others <= 4.0e-7). noise_at_step: 1e-6, measured 3.5e-7.
- Whole loops with a fake model that depends on x and t, 1-50 steps, every spacing, Karras on/off,
  final latents and every step's x0_pred: 5e-6 (errors of ~1e-7 per step carry through up to 50
  steps and the 1/sigma factors); measured <= 2.5e-6 (LMS with Karras sigmas, 50 steps, where
  diffusers' quad integrates a float32 integrand), <= 1.5e-6 for the others, <= 2.0e-6 at SD's
  latent size, <= 7.1e-7 for img2img, <= 6.3e-7 for PNDM's Runge-Kutta start. img2img from every
  start 1..n-1 of 2-25 steps for PNDM and LMS (diffusers' part-way rules): the start state 1e-5,
  measured 1.1e-6 (LMS, Karras sigmas, trailing; 6.4e-7 PNDM), the loop 5e-6, measured 2.2e-6
  (LMS, trailing, 25 steps; 7.9e-7 PNDM). One exception:
  DPM2 ancestral with 2 steps, whose first step goes from sigma 14.6 to
  sigma_down = s1^2 / s0 ~ 6e-5: diffusers computes sigma_down = sqrt(s1^2 - sigma_up^2) in float32,
  which cancels to 1 % there, and the midpoint sqrt(sigma sigma_down) inherits half of it (npsd
  computes it in float64): measured 4.6e-5, tolerance 1e-4 for that case. Its midpoint timestep:
  in exact arithmetic sqrt(sigma sigma_down) is sigma_min, t = 0; one float32 ulp of sigma_up^2 moves
  diffusers' value by 0.012, and which ulp it lands on depends on the CPU (torch's float32 sqrt is
  not correctly rounded on every one): measured 0.0096 on an AMD EPYC, < 1e-3 on an Intel Xeon;
  tolerance 0.025 (2 ulps) for that case.
- Inpainting's blending after every scheduler call: 2e-6, measured 4.1e-7 (6.5e-7 from a part-way
  start).
- v- and x0-prediction loops: 5e-6, measured <= 3.6e-6 (PNDM, 1 step from t = 999, where
  sqrt(abar_0 / abar_999) = 14.6 magnifies float32 rounding); zero-SNR v-prediction loops: 5e-6,
  measured <= 1.7e-6, the sigma samplers run on diffusers' own float32 sigmas (the test says why). Rescaled betas: 2e-5, measured 7.1e-6 (diffusers' float32 cancels near
  t = 999); their alpha_bar: 1e-6, measured 5.4e-7. Guidance rescale: 5e-7, measured 5.7e-8.
"""

import dataclasses
import inspect
import types

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, UniPCMultistepScheduler)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from npsd import InputError
from npsd import schedulers as S
from npsd.config import sd15_config
from npsd.guidance import cfg, guided_model, rescale_cfg
from npsd.testing import assert_close
from tests.test_schedulers import fake_eps_np, fake_eps_torch, randn, torch_draws  # noqa: F401 (shared helpers)

CONFIG = sd15_config()
RTOL_SIGMA = 1e-6
RTOL_STEP = 1e-6
RTOL_LOOP = 5e-6
RTOL_LOOP_DPM2_A_2_STEPS = 1e-4          # diffusers' float32 sigma_down (module docstring)
RTOL_START = 1e-5                        # img2img start state, every spacing (module docstring)
T_ATOL = 1e-3
T_ATOL_DPM2_A_2_STEPS = 0.025            # the midpoint timestep of diffusers' float32 sigma_down (docstring)
SHAPE = (2, 4, 8, 8)
NEW = ("pndm", "lms", "dpmpp_2m_sde", "unipc", "dpm2", "dpm2_a", "lcm", "deis")
KARRAS_OK = tuple(name for name in NEW if name in S.SIGMA_SAMPLERS)
STOCHASTIC = ("dpmpp_2m_sde", "dpm2_a", "lcm")
WITH_KARRAS = [(name, k) for name in NEW for k in ((False, True) if name in KARRAS_OK else (False,))]


def step_counts(name):
    return (1, 2, 4, 10, 25, 50) if name == "lcm" else (1, 2, 10, 25, 50)


# diffusers' schedulers call np.array(tensor) in a way NumPy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def reference(name, spacing="leading", karras=False, skip_prk_steps=True, prediction_type="epsilon", **extra):
    """The diffusers scheduler that npsd's `name` follows, configured like SD v1.5."""
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, timestep_spacing=spacing, prediction_type=prediction_type, **extra)
    if name == "ddpm":
        return DDPMScheduler(**kw, clip_sample=False, variance_type="fixed_small")
    if name == "ddim":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler(**kw)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**kw)
    if name == "heun":
        return HeunDiscreteScheduler(**kw)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2)
    if name == "pndm":
        return PNDMScheduler(**kw, skip_prk_steps=skip_prk_steps, set_alpha_to_one=False)
    if name == "lms":
        return LMSDiscreteScheduler(**kw, use_karras_sigmas=karras)
    if name == "dpmpp_2m_sde":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="sde-dpmsolver++", solver_order=2,
                                           use_karras_sigmas=karras)
    if name == "unipc":
        return UniPCMultistepScheduler(**kw, solver_order=2, solver_type="bh2", use_karras_sigmas=karras)
    if name == "dpm2":
        return KDPM2DiscreteScheduler(**kw, use_karras_sigmas=karras)
    if name == "dpm2_a":
        return KDPM2AncestralDiscreteScheduler(**kw, use_karras_sigmas=karras)
    if name == "lcm":
        return LCMScheduler(**kw)
    assert name == "deis"
    return DEISMultistepScheduler(**kw, solver_order=2, use_karras_sigmas=karras)


def reference_set(name, n, spacing="leading", karras=False, **kw):
    r = reference(name, spacing, karras, **kw)
    r.set_timesteps(n)
    return r


def ref_layout(r, name):
    """diffusers' timesteps, sigmas and midpoint timesteps in npsd's layout (one entry per step).

    PNDM (skip_prk_steps) lists its second timestep twice, for the improved-Euler start; DPM2 and
    DPM2 ancestral interleave each step's midpoint timestep and list their sigmas twice."""
    ts, sig, mid = r.timesteps.numpy(), getattr(r, "sigmas", None), None
    if name == "pndm":
        if len(ts) > 1:
            assert ts[1] == ts[2]
            ts = np.concatenate([ts[:1], ts[2:]])
        sig = None
    elif name in ("dpm2", "dpm2_a"):
        ts, mid = ts[0::2], ts[1::2]
        sig = torch.cat([r.sigmas[:1], r.sigmas[1:-1:2]])
    elif name == "lcm":
        sig = None
    return ts, (None if sig is None else sig.numpy()), mid


def ref_step_ends(name, n):
    """The index of the diffusers step() call that finishes each of npsd's n steps."""
    if name == "pndm":
        return [0] if n == 1 else list(range(1, n + 1))
    if name in ("dpm2", "dpm2_a"):
        return [2 * i + 1 for i in range(n - 1)] + [2 * n - 2]
    return list(range(n))


class Outputs:
    """A stand-in model that returns pre-drawn outputs in call order, whatever its input."""

    def __init__(self, outputs, torch_out=False):
        self.outputs, self.k, self.torch_out = outputs, 0, torch_out

    def __call__(self, x, t):
        out = self.outputs[self.k]
        self.k += 1
        return torch.from_numpy(out.copy()) if self.torch_out else out


def run_reference(name, r, x, timesteps=None, seed=123, model=fake_eps_torch):
    """diffusers' sampling loop (as StableDiffusionPipeline runs it). Returns the final latents, the
    state after every step() call and the x0 estimate each call reports (None where it has none)."""
    g = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(r.step).parameters
    x = torch.from_numpy(x.copy())
    xs, x0s = [], []
    for t in (r.timesteps if timesteps is None else timesteps):
        x_in = r.scale_model_input(x, t)
        out = model(x_in, t)
        res = r.step(out, t, x, **({"generator": g} if takes_generator else {}))
        x = res.prev_sample
        xs.append(x.numpy().copy())
        if name in ("dpmpp_2m_sde", "unipc"):
            x0s.append(r.model_outputs[-1].numpy().copy())
        elif name == "lcm":
            x0s.append(res.denoised.numpy().copy())
        else:
            x0 = getattr(res, "pred_original_sample", None)
            x0s.append(None if x0 is None else x0.numpy().copy())
    return x.numpy(), xs, x0s


def run_npsd(sched, x, seed=123, model=fake_eps_np, start_index=0, callback=None):
    x0s = []

    def cb(i, t, xi, x0):
        x0s.append(x0)
        return callback(i, t, xi, x0) if callback is not None else None
    out = S.sample(model, x, sched, noises=torch_draws(seed, 2 * sched.num_inference_steps), callback=cb,
                   start_index=start_index)
    return out, x0s


def loop_tolerance(name, n):
    return RTOL_LOOP_DPM2_A_2_STEPS if (name, n) == ("dpm2_a", 2) else RTOL_LOOP


def loop_cases():
    return [(name, spacing, karras, n) for name in NEW for spacing in S.SPACINGS
            for karras in ((False, True) if name in KARRAS_OK else (False,)) for n in step_counts(name)
            if not (name == "lcm" and spacing != "leading")]          # LCM has its own timesteps


# ---------------------------------------------------------------------------------------------
# Timesteps and sigmas
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_timesteps_and_sigmas(name, spacing):
    worst = 0.0
    for karras in ((False, True) if name in KARRAS_OK else (False,)):
        r = reference(name, spacing, karras)          # built once: KDPM2's constructor computes 1000 steps
        for n in step_counts(name):
            r.set_timesteps(n)
            ref_t, ref_s, ref_mid = ref_layout(r, name)
            sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras, timestep_spacing=spacing)
            what = f"{name} {spacing} karras={karras} n={n}"
            assert sched.num_inference_steps == n and len(ref_t) == n, what
            if sched.timesteps.dtype == np.int64:
                assert ref_t.dtype == np.int64, what
                np.testing.assert_array_equal(sched.timesteps, ref_t, err_msg=what)
            else:
                assert sched.timesteps.dtype == np.float32, what
                dt = np.abs(sched.timesteps - ref_t.astype(np.float64)).max()
                worst = max(worst, dt)
                assert dt <= (T_ATOL if karras else 0.0), what
            if ref_s is not None:
                assert sched.sigmas.dtype == np.float32, what
                assert_close(sched.sigmas, ref_s, RTOL_SIGMA, f"sigmas {what}")
            else:
                assert sched.sigmas is None, what
            if ref_mid is not None:
                dt = np.abs(sched.mid_timesteps[:-1] - ref_mid.astype(np.float64)).max(initial=0.0)
                if (name, n) == ("dpm2_a", 2):
                    assert dt <= T_ATOL_DPM2_A_2_STEPS, (what, dt)
                else:
                    worst = max(worst, dt)
                    assert dt <= T_ATOL, what
            ref_init = float(r.init_noise_sigma)
            assert abs(sched.init_noise_sigma - ref_init) <= RTOL_SIGMA * ref_init, what
    print(f"{name} {spacing}: worst float timestep difference {worst:.2g}")


def test_known_timesteps():
    """The values docs/samplers.md quotes."""
    assert list(S.lcm_timesteps(4)) == [999, 759, 499, 259]
    assert list(S.make_schedule("pndm", 50, CONFIG).timesteps[:3]) == [981, 961, 941]
    assert list(S.make_schedule("unipc", 50, CONFIG).timesteps[[0, -1]]) == [951, 20]
    deis = S.make_schedule("deis", 10, CONFIG)
    assert deis.sigmas[-1] == S.sigmas_from_alphas_cumprod(deis.alphas_cumprod)[0]   # ends at sigma_min


def test_pndm_runge_kutta_timesteps():
    """skip_prk_steps=False: diffusers' 12 Runge-Kutta calls (t, t_mid, t_mid, t_next for the first
    three steps) and then one PLMS call per step."""
    for spacing in S.SPACINGS:
        for n in (4, 10, 25):
            r = reference_set("pndm", n, spacing, skip_prk_steps=False)
            sched = S.make_schedule("pndm", n, dict(CONFIG["scheduler"], skip_prk_steps=False),
                                    timestep_spacing=spacing)
            assert not sched.skip_prk_steps
            ts, mid = sched.timesteps, sched.mid_timesteps
            calls = [v for k in range(3) for v in (ts[k], mid[k], mid[k], ts[k + 1])] + list(ts[3:])
            np.testing.assert_array_equal(np.array(calls), r.timesteps.numpy(), err_msg=f"{spacing} n={n}")


@pytest.mark.parametrize("name, karras", WITH_KARRAS)
def test_noise_at_step_equals_scheduler_add_noise(name, karras):
    n, start = 10, 4
    r = reference_set(name, n, "leading", karras)
    ends = ref_step_ends(name, n)
    first = 0 if start == 0 else ends[start - 1] + 1                    # diffusers' index of npsd's step
    if hasattr(r, "set_begin_index"):
        r.set_begin_index(first)
    x0, noise = randn(3), randn(4)
    t = r.timesteps[first:][:1].repeat(SHAPE[0])
    ref = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras)
    print(assert_close(S.noise_at_step(sched, x0, noise, start), ref, RTOL_STEP, f"noise_at_step {name}"))
    np.testing.assert_array_equal(S.noise_at_step(sched, x0, noise, n), x0)


# ---------------------------------------------------------------------------------------------
# Each step with the same model output and the same noise
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, karras", WITH_KARRAS)
def test_each_step_same_model_output_and_noise(name, karras):
    """Both run 10 steps on the same model outputs (random arrays, one per model call, whatever the
    input) and the same noise; npsd restarts every step from diffusers' state (the callback
    returns it), so that each step is compared on its own."""
    n = 10
    r = reference_set(name, n, karras=karras)
    sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras)
    x_T = randn(5) * np.float32(sched.init_noise_sigma)
    outputs = [randn(100 + k) for k in range(2 * n)]
    _, ref_xs, _ = run_reference(name, r, x_T, model=Outputs(outputs, torch_out=True))
    ends = ref_step_ends(name, n)
    checks = []

    def restart(i, t, x, x0):
        ref = ref_xs[ends[i]]
        checks.append(assert_close(x, ref, RTOL_STEP, f"{name} karras={karras} step {i}"))
        return ref
    run_npsd(sched, x_T, model=Outputs(outputs), callback=restart)
    assert len(checks) == n
    print(max(checks, key=lambda c: c.max_rel))


def test_plms_and_transfer_one_step():
    """PLMS with a full history (diffusers' ets set by hand) and the transfer phi against DDIM."""
    n, i = 10, 5
    r = reference_set("pndm", n)
    sched = S.make_schedule("pndm", n, CONFIG)
    x, eps = randn(6), randn(7)
    prev = [randn(8 + k) for k in range(3)]                             # oldest first
    r.counter, r.ets = 2 + i, [torch.from_numpy(e) for e in prev]
    t, t_prev = int(sched.timesteps[i]), int(sched.prev_timesteps[i])
    ref = r.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
    x_prev, x0 = S.plms_step(x, eps, t, t_prev, sched.alphas_cumprod, prev, sched.final_alpha_cumprod)
    print(assert_close(x_prev, ref, RTOL_STEP, "plms step"))
    ddim, _ = S.ddim_step(x, eps, t, t_prev, sched.alphas_cumprod)
    print(assert_close(S.pndm_transfer(x, eps, t, t_prev, sched.alphas_cumprod), ddim, RTOL_STEP, "phi = DDIM"))


def test_lms_coefficients_against_quad():
    """The exact Lagrange integrals equal diffusers' scipy.integrate.quad ones."""
    r = reference_set("lms", 10)
    sched = S.make_schedule("lms", 10, CONFIG)
    for i in range(10):
        order = min(i + 1, 4)
        ours = S.lms_coefficients(sched.sigmas, i, order)
        ref = [r.get_lms_coefficient(order, i, j) for j in range(order)]
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7, err_msg=f"step {i}")
    assert abs(sum(S.lms_coefficients(sched.sigmas, 5, 4)) - (sched.sigmas[6] - sched.sigmas[5])) < 1e-6


# ---------------------------------------------------------------------------------------------
# Whole sampling loops with a fake model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, spacing, karras, n", loop_cases())
def test_sampling_loop(name, spacing, karras, n):
    r = reference_set(name, n, spacing, karras)
    sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras, timestep_spacing=spacing)
    x_T = randn(20) * np.float32(float(r.init_noise_sigma))     # latents * init_noise_sigma, as the pipelines do
    ref, _, ref_x0s = run_reference(name, r, x_T)
    out, x0s = run_npsd(sched, x_T)
    what = f"{name} {spacing} karras={karras} n={n}"
    rtol = loop_tolerance(name, n)
    print(assert_close(out, ref, rtol, f"loop {what}"))
    assert len(x0s) == n
    ref_x0s = [ref_x0s[k] for k in ref_step_ends(name, n)]     # the estimate of each step's last call
    if ref_x0s[0] is not None:                                 # PNDM and DEIS report none
        checks = [assert_close(a, b, rtol, f"x0_pred step {i} {what}") for i, (a, b) in enumerate(zip(x0s, ref_x0s))]
        print(f"  worst x0_pred: {max(checks, key=lambda c: c.max_rel)}")


@pytest.mark.parametrize("spacing, n", [("leading", 4), ("leading", 10), ("leading", 25), ("linspace", 10),
                                        ("trailing", 10)])
def test_pndm_runge_kutta_loop(spacing, n):
    r = reference_set("pndm", n, spacing, skip_prk_steps=False)
    sched = S.make_schedule("pndm", n, CONFIG, timestep_spacing=spacing, skip_prk_steps=False)
    x_T = randn(21)
    ref, _, _ = run_reference("pndm", r, x_T)
    out, _ = run_npsd(sched, x_T)
    print(assert_close(out, ref, RTOL_LOOP, f"pndm Runge-Kutta warm-up {spacing} n={n}"))


@pytest.mark.parametrize("name", NEW)
def test_sampling_loop_at_sd_latent_size(name):
    """SD v1.5's own latent size (batch 2, 4 x 64 x 64 for 512 x 512 images), 3 steps."""
    shape, n = (2, 4, 64, 64), 3
    r = reference_set(name, n)
    sched = S.make_schedule(name, n, CONFIG)
    x_T = randn(60, shape) * np.float32(sched.init_noise_sigma)
    ref, _, _ = run_reference(name, r, x_T)
    out = S.sample(fake_eps_np, x_T, sched, noises=torch_draws(123, n, shape))
    print(assert_close(out, ref, RTOL_LOOP, f"loop {name} at 2x4x64x64"))


# ---------------------------------------------------------------------------------------------
# img2img: the start step for a strength, and the loop from there
# ---------------------------------------------------------------------------------------------

def get_timesteps(r, n, strength):
    """diffusers' own img2img get_timesteps (it also calls r.set_begin_index)."""
    return StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=r), n, strength, "cpu")


@pytest.mark.parametrize("name, karras", WITH_KARRAS)
def test_img2img_loop(name, karras):
    """The img2img pipeline's scheduler use: get_timesteps, set_begin_index, add_noise, then the loop."""
    n, strength = 10, 0.6
    r = reference_set(name, n, karras=karras)
    ref_ts, ref_n = get_timesteps(r, n, strength)
    start = S.img2img_start_index(n, strength)
    assert ref_n == n - start
    x0, noise = randn(30), randn(31)
    x_start = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[:1].repeat(SHAPE[0])).numpy()
    ref, _, _ = run_reference(name, r, x_start, timesteps=ref_ts)
    sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras)
    x = S.noise_at_start(sched, x0, noise, start)
    print(assert_close(x, x_start, RTOL_STEP, f"img2img start {name}"))
    out, _ = run_npsd(sched, x, start_index=start)
    print(assert_close(out, ref, RTOL_LOOP, f"img2img loop {name} karras={karras}"))


class Recording:
    """A model that records the timesteps it is called at."""

    def __init__(self, model):
        self.model, self.ts = model, []

    def __call__(self, x, t):
        self.ts.append(float(t))
        return self.model(x, t)


def partway_cases(name):
    """(spacing, karras, n, strength), one strength per start: every start 1..n-1 up to 4 steps."""
    cases = {(spacing, karras, n, S.img2img_start_index(n, strength)): strength for spacing in S.SPACINGS
             for karras in ((False, True) if name in KARRAS_OK else (False,))
             for n in (2, 3, 4, 10, 25) for strength in (0.9, 0.75, 0.6, 0.5, 0.4, 0.25, 0.1)
             if int(n * strength) > 0}
    return [(spacing, karras, n, strength) for (spacing, karras, n, start), strength in cases.items() if start > 0]


@pytest.mark.parametrize("name", ["pndm", "lms"])
def test_img2img_partway_start_pndm_lms(name):
    """diffusers' img2img pipeline (get_timesteps, set_begin_index, add_noise at its first timestep,
    then its loop) from every start 1..n-1 of 2-25 steps, every spacing, Karras on/off for LMS. PNDM:
    the slice d[t_start:] of its list [t0, t1, t1, t2, ..]; LMS: the order min(i + 1, 4) of the step
    index. The model-call timesteps equal (Karras: within T_ATOL), the start state within
    RTOL_START = 1e-5 (measured 1.1e-6: LMS, Karras, trailing; diffusers' float32 sigma), the final
    latents within RTOL_LOOP = 5e-6 (measured 2.2e-6: LMS, Karras, trailing, 25 steps)."""
    worst_start, worst_loop = None, None
    for spacing, karras, n, strength in partway_cases(name):
        what = f"{name} {spacing} karras={karras} n={n} strength={strength}"
        r = reference_set(name, n, spacing, karras=karras)
        ref_ts, ref_n = get_timesteps(r, n, strength)
        start = S.img2img_start_index(n, strength)
        assert ref_n == n - start, what
        x0, noise = randn(32), randn(33)
        x_start = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[:1].repeat(SHAPE[0])).numpy()
        ref_model = Recording(fake_eps_torch)
        ref, _, _ = run_reference(name, r, x_start, timesteps=ref_ts, model=ref_model)
        sched = S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras, timestep_spacing=spacing)
        x = S.noise_at_start(sched, x0, noise, start)
        c_start = assert_close(x, x_start, RTOL_START, f"img2img start {what}")
        model = Recording(fake_eps_np)
        out, _ = run_npsd(sched, x, start_index=start, model=model)
        # the timesteps run: PNDM's model calls are diffusers' list entries d[start], d[start + 1], ..
        np.testing.assert_allclose(model.ts, ref_model.ts, rtol=0, atol=T_ATOL if karras else 0, err_msg=what)
        c_loop = assert_close(out, ref, RTOL_LOOP, f"img2img loop {what}")
        worst_start = max(worst_start or c_start, c_start, key=lambda c: c.max_rel)
        worst_loop = max(worst_loop or c_loop, c_loop, key=lambda c: c.max_rel)
    print(worst_start)
    print(worst_loop)


def test_pndm_start_timesteps():
    """The values pndm_start's docstring and docs/samplers.md give (SD v1.5, 10 steps)."""
    sched = S.make_schedule("pndm", 10, CONFIG)
    ts = sched.timesteps                                          # 901, 801, .., 1
    assert [(int(a), None if b is None else int(b)) for a, b in (S.pndm_start(sched, s) for s in (0, 1, 2, 9))] \
        == [(ts[0], ts[1]), (ts[1], ts[1]), (ts[1], ts[2]), (ts[8], ts[9])]
    assert S.pndm_start(S.make_schedule("pndm", 1, CONFIG), 0)[1] is None


@pytest.mark.parametrize("name", ["pndm", "lms"])
def test_img2img_start_at_first_order_fails(name, monkeypatch):
    """npsd's former img2img rule (PNDM's improved-Euler start at step t_start, LMS at the order its
    slopes allow) misses diffusers' img2img by far more than the tolerance: measured 1.4e-1 (PNDM)
    and 5.3e-3 (LMS) for 10 steps at strength 0.6, against 1.5e-7 and 3.4e-7 with diffusers' rule."""
    if name == "pndm":
        monkeypatch.setattr(S, "pndm_start", lambda sched, i: (sched.timesteps[i], sched.timesteps[i + 1]))
    else:
        lms = S.lms_step
        monkeypatch.setattr(S, "lms_step", lambda x, eps, sig, i, prev=(), order=4, x0_pred=None:
                            lms(x, eps, sig, i, prev, min(order, len(prev) + 1), x0_pred))
    n, strength = 10, 0.6
    r = reference_set(name, n)
    ref_ts, _ = get_timesteps(r, n, strength)
    x0, noise = randn(34), randn(35)
    x_start = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[:1].repeat(SHAPE[0])).numpy()
    ref, _, _ = run_reference(name, r, x_start, timesteps=ref_ts)
    sched = S.make_schedule(name, n, CONFIG)
    start = S.img2img_start_index(n, strength)
    out, _ = run_npsd(sched, S.noise_at_start(sched, x0, noise, start), start_index=start)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(out, ref, RTOL_LOOP, f"{name} img2img with the first-order start")


# ---------------------------------------------------------------------------------------------
# Inpainting's blending, also between the two stages of a step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pndm", "dpm2", "dpm2_a", "lms", "unipc"])
def test_inpainting_blend_after_every_scheduler_call(name):
    """diffusers' inpainting loop (4-channel UNet) re-imposes the known region, noised to the next
    listed timestep, after every step() call, so also between the two stages of PNDM's first step
    and of every DPM2 step; npsd does it with callback (after a step) and between_stages (inside)."""
    n = 10
    r = reference_set(name, n)
    r.set_begin_index(0) if hasattr(r, "set_begin_index") else None
    sched = S.make_schedule(name, n, CONFIG)
    x0, noise = randn(40), randn(41)
    mask = (randn(42) > 0).astype(np.float32)                               # 1 = repaint
    x_T = randn(43) * np.float32(sched.init_noise_sigma)
    g = torch.Generator().manual_seed(123)
    takes_generator = "generator" in inspect.signature(r.step).parameters
    x = torch.from_numpy(x_T.copy())
    for k, t in enumerate(r.timesteps):
        out = fake_eps_torch(r.scale_model_input(x, t), t)
        x = r.step(out, t, x, **({"generator": g} if takes_generator else {})).prev_sample
        if k < len(r.timesteps) - 1:
            known = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), r.timesteps[k + 1:k + 2])
            x = (1 - torch.from_numpy(mask)) * known + torch.from_numpy(mask) * x
    calls = []

    def keep_known(i, x_i):
        calls.append(i)
        if i + 1 < n:
            return (1 - mask) * S.noise_at_step(sched, x0, noise, i + 1) + mask * x_i
    out = S.sample(fake_eps_np, x_T, sched, noises=torch_draws(123, 2 * n),
                   callback=lambda i, t, x_i, x0_pred: keep_known(i, x_i), between_stages=keep_known)
    print(assert_close(out, x.numpy(), 2e-6, f"inpainting {name}"))
    stages = {"pndm": 1, "dpm2": n - 1, "dpm2_a": n - 1}.get(name, 0)     # calls of between_stages
    assert len(calls) == n + stages


@pytest.mark.parametrize("name", ["pndm", "lms", "heun", "dpm2"])
def test_inpainting_blend_from_a_partway_start(name):
    """diffusers' inpainting loop (4-channel UNet, strength < 1): the sliced timesteps, the start
    noised to their first, the known region noised to the next listed timestep after every step()
    call (inside PNDM's part-way first step: to step t_start's level). 2e-6 as above; measured
    <= 6.5e-7 (LMS; PNDM 3.4e-7, Heun and DPM2 5.3e-7)."""
    for n, strength in ((4, 0.25), (4, 0.5), (4, 0.75), (10, 0.3), (10, 0.6), (10, 0.9)):
        r = reference_set(name, n)
        ref_ts, _ = get_timesteps(r, n, strength)
        x0, noise = randn(44), randn(45)
        mask = (randn(46) > 0).astype(np.float32)                           # 1 = repaint
        x = r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[:1].repeat(SHAPE[0]))
        for k, t in enumerate(ref_ts):
            x = r.step(fake_eps_torch(r.scale_model_input(x, t), t), t, x).prev_sample
            known = (r.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[k + 1:k + 2])
                     if k < len(ref_ts) - 1 else torch.from_numpy(x0))
            x = (1 - torch.from_numpy(mask)) * known + torch.from_numpy(mask) * x
        sched = S.make_schedule(name, n, CONFIG)
        start = S.img2img_start_index(n, strength)

        def keep_known(i, x_i):                                               # as npsd's inpaint pipeline
            return (1 - mask) * S.noise_at_step(sched, x0, noise, i + 1) + mask * x_i
        out = S.sample(fake_eps_np, S.noise_at_start(sched, x0, noise, start), sched, start_index=start,
                       callback=lambda i, t, x_i, x0_pred: keep_known(i, x_i), between_stages=keep_known)
        print(assert_close(out, x.numpy(), 2e-6, f"inpainting {name} n={n} strength={strength}"))


# ---------------------------------------------------------------------------------------------
# Randomness: one draw of the latents' shape wherever diffusers draws
# ---------------------------------------------------------------------------------------------

class CountingRng:
    def __init__(self, seed):
        self.g, self.calls = np.random.default_rng(seed), []

    def standard_normal(self, shape, dtype=np.float64):
        self.calls.append((tuple(shape), dtype))
        return self.g.standard_normal(shape, dtype=dtype)


@pytest.mark.parametrize("name, draws", [("dpmpp_2m_sde", 10), ("dpm2_a", 9), ("lcm", 9), ("pndm", 0), ("lms", 0),
                                         ("unipc", 0), ("dpm2", 0), ("deis", 0)])
def test_rng_draws_as_documented(name, draws):
    """rng= draws standard_normal(x.shape, float32) per noisy step (as many as diffusers' generator
    gives), the same as noises= with those draws."""
    sched = S.make_schedule(name, 10, CONFIG)
    x = randn(22) * np.float32(sched.init_noise_sigma)
    rng = CountingRng(7)
    a = S.sample(fake_eps_np, x, sched, rng=rng)
    assert rng.calls == [(SHAPE, np.float32)] * draws
    g = np.random.default_rng(7)
    b = S.sample(fake_eps_np, x, sched, noises=[g.standard_normal(SHAPE, dtype=np.float32) for _ in range(draws)])
    np.testing.assert_array_equal(a, b)
    if draws:
        with pytest.raises(InputError, match="rng"):
            S.sample(fake_eps_np, x, sched)


# ---------------------------------------------------------------------------------------------
# Sensitivity: the comparisons above fail on the bugs they are meant to catch
# ---------------------------------------------------------------------------------------------

def loop_against_reference(name, n=10, karras=False, sched=None):
    r = reference_set(name, n, karras=karras)
    sched = sched or S.make_schedule(name, n, CONFIG, use_karras_sigmas=karras)
    x_T = randn(23) * np.float32(sched.init_noise_sigma)
    ref, _, _ = run_reference(name, r, x_T)
    out, _ = run_npsd(sched, x_T)
    return assert_close(out, ref, RTOL_LOOP, f"{name} loop")


def older(history):
    """An off-by-one history: every entry one step older (the oldest repeated)."""
    history = list(history)
    return history[:1] + history[:-1]


def shift_history(monkeypatch, fn_name, arg):
    """Make sample() pass S.<fn_name> its `arg` history one step older."""
    fn = getattr(S, fn_name)
    pos = list(inspect.signature(fn).parameters).index(arg)

    def bad(*args, **kw):
        args = list(args)
        if len(args) > pos:
            args[pos] = older(args[pos])
        elif arg in kw:
            kw[arg] = older(kw[arg])
        return fn(*args, **kw)
    monkeypatch.setattr(S, fn_name, bad)


class Lagging:
    """Wrap a step function so that its prev_x0-like argument comes from two steps back."""

    def __init__(self, fn, arg):
        self.fn, self.arg, self.seen = fn, arg, []
        self.pos = list(inspect.signature(fn).parameters).index(arg)

    def __call__(self, *args, **kw):
        args = list(args)
        value = args[self.pos] if len(args) > self.pos else kw.get(self.arg)
        self.seen.append(value)
        stale = self.seen[-2] if len(self.seen) >= 2 else None
        if value is not None and stale is not None and np.shape(stale) == np.shape(value):
            value = stale
        if len(args) > self.pos:
            args[self.pos] = value
        else:
            kw[self.arg] = value
        return self.fn(*args, **kw)


@pytest.mark.parametrize("name, fn, arg", [("pndm", "plms_step", "prev_eps"), ("lms", "lms_step", "prev_derivatives")])
def test_off_by_one_history_fails(monkeypatch, name, fn, arg):
    print(loop_against_reference(name))
    shift_history(monkeypatch, fn, arg)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        loop_against_reference(name)


@pytest.mark.parametrize("name, fn, arg", [("dpmpp_2m_sde", "dpmpp_2m_sde_step", "prev_x0"),
                                           ("unipc", "unipc_correct", "x0_prev"),
                                           ("unipc", "unipc_predict", "prev_x0")])
def test_stale_multistep_memory_fails(monkeypatch, name, fn, arg):
    """The previous step's x0 estimate replaced by the one from a step earlier."""
    monkeypatch.setattr(S, fn, Lagging(getattr(S, fn), arg))
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        loop_against_reference(name)


def test_deis_stale_history_fails(monkeypatch):
    print(loop_against_reference("deis"))
    monkeypatch.setattr(S, "deis_step", Lagging(S.deis_step, "prev_eps"))
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        loop_against_reference("deis")


def test_wrong_order_coefficient_fails(monkeypatch):
    """PLMS's 4-step -59/24 as -58/24; LMS's and DEIS's weight of the previous step 1 % off;
    UniPC's corrector at first order where diffusers' is second-order."""
    c = list(S.PLMS_COEFFICIENTS)
    c[3] = (55 / 24, -58 / 24, 37 / 24, -9 / 24)
    with monkeypatch.context() as m:
        m.setattr(S, "PLMS_COEFFICIENTS", tuple(c))
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            loop_against_reference("pndm")
    lms = S.lms_coefficients
    with monkeypatch.context() as m:
        m.setattr(S, "lms_coefficients",
                  lambda s, i, k: [w * (1.01 if j == 1 else 1) for j, w in enumerate(lms(s, i, k))])
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            loop_against_reference("lms")
    deis = S._deis_coefficient
    with monkeypatch.context() as m:
        m.setattr(S, "_deis_coefficient", lambda a, b, nodes, j: deis(a, b, nodes, j) * (1.01 if j == 1 else 1))
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            loop_against_reference("deis")
    correct = S.unipc_correct
    with monkeypatch.context() as m:
        m.setattr(S, "unipc_correct", lambda *args: correct(*args[:5]))      # UniC-1 where UniC-2 belongs
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            loop_against_reference("unipc")


@pytest.mark.parametrize("name", NEW)
def test_epsilon_read_as_v_fails(name):
    sched = S.make_schedule(name, 10, CONFIG, prediction_type="v_prediction")
    assert sched.prediction_type == "v_prediction"
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        loop_against_reference(name, sched=sched)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_noise_order_matters(name):
    """The draws in another order (the first two swapped) fail: the order is part of the parity."""
    n = 10
    r = reference_set(name, n)
    sched = S.make_schedule(name, n, CONFIG)
    x_T = randn(24) * np.float32(sched.init_noise_sigma)
    ref, _, _ = run_reference(name, r, x_T)
    draws = torch_draws(123, 2 * n)
    print(assert_close(S.sample(fake_eps_np, x_T, sched, noises=draws), ref, RTOL_LOOP, name))
    draws[0], draws[1] = draws[1], draws[0]
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(S.sample(fake_eps_np, x_T, sched, noises=draws), ref, RTOL_LOOP, f"{name} draws swapped")


# ---------------------------------------------------------------------------------------------
# Prediction types, zero terminal SNR and guidance rescale (every sampler, also the first six)
# ---------------------------------------------------------------------------------------------

# diffusers has no "sample" prediction in Euler a, PNDM, DPM2 and DPM2 a. Its PNDM combines the raw
# v outputs of several steps and converts the combination; npsd converts each output, as the
# original latent-diffusion PLMS sampler does for v-models, so the two agree on a single evaluation
# only (docs/samplers.md, 14). DEIS with x0-prediction and 1 step divides by sigma(1) = 0.04 and is
# left out (float32 rounding, magnified). DPM++ 2S a, DPM++ SDE and 3M SDE follow k-diffusion, not a
# diffusers scheduler: tests/test_kdiffusion.py checks DPM++ 2S a with v-prediction too.
PREDICTION_CASES = [(name, pred, n) for pred in ("v_prediction", "sample") for name in S.SAMPLERS
                    for n in ((1,) if name == "pndm" else (2, 10))
                    if not (pred == "sample" and name in ("euler_a", "pndm", "dpm2", "dpm2_a")) and name not in ("dpmpp_2s_a", "dpmpp_sde", "dpmpp_3m_sde")]


@pytest.mark.parametrize("name, prediction_type, n", PREDICTION_CASES)
def test_prediction_types(name, prediction_type, n):
    """The fake model's output read as v or as x0, by npsd (converted in sample()) and by diffusers'
    scheduler configured with the same prediction_type."""
    spacing = "trailing" if name == "pndm" else "leading"
    r = reference_set(name, n, spacing, prediction_type=prediction_type)
    config = dict(CONFIG["scheduler"], prediction_type=prediction_type)
    sched = S.make_schedule(name, n, config, timestep_spacing=spacing)
    assert sched.prediction_type == prediction_type
    x_T = randn(25) * np.float32(float(r.init_noise_sigma))
    ref, _, _ = run_reference(name, r, x_T)
    out, _ = run_npsd(sched, x_T)
    print(assert_close(out, ref, RTOL_LOOP, f"{name} {prediction_type} n={n}"))


def test_zero_terminal_snr_schedule():
    """Lin et al. 2024's rescaled betas: alpha_bar ends at 0 (sigma 4096 where a sigma is needed,
    as diffusers' 2^-24). diffusers rescales in float32, whose cancellation near t = N - 1 moves its
    betas by up to 7.1e-6 (tolerance 2e-5); alpha_bar agrees to 5.4e-7 (tolerance 1e-6)."""
    config = dict(CONFIG["scheduler"], rescale_betas_zero_snr=True)
    ref_betas = rescale_zero_terminal_snr(torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    print(assert_close(S.betas(config), ref_betas.numpy(), 2e-5, "rescaled betas"))
    ac = S.alphas_cumprod(config)
    print(assert_close(ac, torch.cumprod(1 - ref_betas, 0).numpy(), RTOL_SIGMA, "rescaled alpha_bar"))
    assert ac[-1] == 0 and abs(ac[0] - S.alphas_cumprod(CONFIG)[0]) < 1e-7     # the first one is kept
    sched = S.make_schedule("euler", 10, config, timestep_spacing="trailing")
    assert abs(sched.sigmas[0] - 4096.0) < 1e-3 and abs(sched.init_noise_sigma - 4096.0) < 1e-3
    np.testing.assert_allclose(S.rescale_zero_terminal_snr(S._betas64(CONFIG["scheduler"]))[-1], 1.0)


ZERO_SNR = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm")   # diffusers' option


@pytest.mark.parametrize("name", ZERO_SNR)
@pytest.mark.parametrize("spacing, n", [("trailing", 10), ("trailing", 25), ("linspace", 10)])
def test_zero_terminal_snr_v_prediction_loops(name, spacing, n):
    """A zero-SNR v-model's setting (Lin et al. 2024: rescaled betas, v-prediction, trailing
    timesteps): the first step starts from pure noise at t = 999, where x0 = -v exactly."""
    r = reference_set(name, n, spacing, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    config = dict(CONFIG["scheduler"], prediction_type="v_prediction", rescale_betas_zero_snr=True)
    sched = S.make_schedule(name, n, config, timestep_spacing=spacing)
    x_T = randn(26) * np.float32(sched.init_noise_sigma)
    assert abs(sched.init_noise_sigma - float(r.init_noise_sigma)) <= 1e-6 * float(r.init_noise_sigma)
    if sched.sigmas is not None:
        # The first step from sigma_max = sqrt(2^24 - 1) computes x + d (sigma_1 - sigma_max): two terms
        # of |x_T| ~ 1.4e4 that cancel to ~56, so 1 ulp of sigma_max moves the result by ~1 ulp of x_T
        # (1e-3, 1.7e-5 of the state). diffusers takes sigma_max from torch's float32 sqrt, which gives
        # 4096.0 on an AMD EPYC where the correctly rounded value (npsd's) is 4095.9998; the sigmas
        # agree to RTOL_SIGMA (test_timesteps_and_sigmas), and the loop runs on diffusers' own.
        _, ref_s, _ = ref_layout(r, name)
        assert_close(sched.sigmas, ref_s, RTOL_SIGMA, f"{name} zero SNR sigmas")
        sched = dataclasses.replace(sched, sigmas=ref_s.astype(np.float32))
    ref, _, _ = run_reference(name, r, x_T)
    out, _ = run_npsd(sched, x_T)
    print(assert_close(out, ref, RTOL_LOOP, f"{name} zero SNR, v, {spacing} n={n}"))


# (spacing, steps, tolerance on max |PNDM - DDIM| (the measured value in brackets))
PNDM_ZERO_SNR = [("trailing", 10, 0.1), ("trailing", 25, 2e-4), ("leading", 10, 5e-6)]   # [0.038, 3.3e-5, 4.8e-7]


@pytest.mark.parametrize("spacing, n, tol", PNDM_ZERO_SNR)
def test_pndm_on_a_zero_terminal_snr_schedule(spacing, n, tol):
    """PNDM's transfer (Liu et al. 2022, eq. 9) divides by alpha_bar_t, 0 at t = 999 of a zero-SNR
    schedule; diffusers' PNDM has no zero-SNR option to compare with. npsd takes alpha_bar_999 as
    2^-24 there, as the sigma samplers do. Checked with the exact v of a one-image data set: every
    step's x0 estimate is then the image, and DDIM (exact at alpha_bar = 0) follows the straight
    path. PNDM's first, improved-Euler step reads 2^-12 x0 into the pure noise x_T and averages
    two eps that differ by that much, times sqrt(alpha_bar) / 2^-12 in the transfer: 1.6% of the
    latent's range at 10 steps (alpha_bar_899 = 0.003), 3e-5 at 25 (alpha_bar_959 = 4e-4)."""
    config = dict(CONFIG["scheduler"], prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ac = S.alphas_cumprod(config)
    assert ac[999] == 0
    with pytest.raises(ZeroDivisionError):
        S.pndm_transfer(randn(28), randn(29), 999, 899, ac)
    x0 = randn(27) * np.float32(0.8)

    def exact_v(x, t, *_):
        ab = float(ac[int(t)])
        eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        return (np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0).astype(np.float32)

    out = {}
    for name in ("ddim", "pndm"):
        sched = S.make_schedule(name, n, config, timestep_spacing=spacing)
        out[name] = S.sample(exact_v, randn(28), sched)
    err = float(np.abs(out["pndm"] - out["ddim"]).max())
    print(f"pndm vs ddim, zero SNR, {spacing} n={n}: max |difference| {err:.2g} (tolerance {tol:g})")
    assert np.isfinite(out["pndm"]).all() and err < tol


def test_guidance_rescale():
    """Lin et al. 2024, eq. 15-16, against diffusers' rescale_noise_cfg; guided_model applies it."""
    u, c = randn(44), randn(45) * np.float32(1.3)
    guided = cfg(u, c, 7.5)
    ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(c), guidance_rescale=0.7).numpy()
    out = rescale_cfg(guided, c, 0.7)
    assert out.dtype == np.float32
    print(assert_close(out, ref, 5e-7, "guidance rescale"))
    np.testing.assert_array_equal(rescale_cfg(guided, c, 0.0), guided)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):             # the std of the wrong half
        assert_close(rescale_cfg(guided, u, 0.7), ref, 1e-3, "guidance rescale with uncond's std")

    def unet(x, t, context):                      # a fake UNet whose output depends on the context
        return np.tanh(x) * context.mean(axis=(1, 2))[:, None, None, None] + np.float32(t) / 1000

    x, cond, uncond = randn(46), randn(47, (2, 77, 8)), randn(48, (2, 77, 8))
    plain = guided_model(unet, cond, uncond, 7.5)(x, 500)
    expected = rescale_cfg(plain, unet(x, 500, cond), 0.7)
    np.testing.assert_allclose(guided_model(unet, cond, uncond, 7.5, guidance_rescale=0.7)(x, 500), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_errors():
    with pytest.raises(InputError, match="at most original_inference_steps = 50"):
        S.make_schedule("lcm", 51, CONFIG)
    with pytest.raises(InputError, match="at least 4 steps"):
        S.make_schedule("pndm", 3, CONFIG, skip_prk_steps=False)
    sched = S.make_schedule("pndm", 10, CONFIG, skip_prk_steps=False)
    with pytest.raises(InputError, match="at least 4 steps to run"):
        S.sample(fake_eps_np, randn(50), sched, start_index=7)
    with pytest.raises(InputError, match="prediction_type"):
        S.make_schedule("unipc", 10, CONFIG, prediction_type="x0")
    with pytest.raises(InputError, match="use_karras_sigmas"):
        S.make_schedule("lcm", 4, CONFIG, use_karras_sigmas=True)
    for name in STOCHASTIC:
        with pytest.raises(InputError, match="rng"):
            S.sample(fake_eps_np, randn(50), S.make_schedule(name, 4, CONFIG))
