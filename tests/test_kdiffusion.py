"""npsd's sigma samplers against k-diffusion (k-diffusion 0.1.1.post1, Crowson), the sampler library that
AUTOMATIC1111's web UI runs; docs/samplers.md ("k-diffusion and AUTOMATIC1111") gives the numbers.

What is compared
- The samplers: npsd's euler, euler_a, heun, dpmpp_2m, dpmpp_2s_a, dpmpp_2m_sde (``npsd.schedulers.sample``)
  against k-diffusion's sample_euler, sample_euler_ancestral, sample_heun, sample_dpmpp_2m,
  sample_dpmpp_2s_ancestral (DPM++ 2S a, which diffusers lacks; also with v-prediction),
  sample_dpmpp_2m_sde, sample_dpmpp_sde and sample_dpmpp_3m_sde (given npsd's noise arrays; A1111
  gives them a Brownian tree's, tests/test_brownian.py), given the SAME
  sigma sequence (k-diffusion's own: ``CompVisDenoiser.get_sigmas(n)`` and ``get_sigmas_karras``, as
  AUTOMATIC1111 builds them) and the same fake noise predictor eps(x_in, t), which depends on x and t.
  k-diffusion wraps it as A1111 wraps the UNet, in ``CompVisDenoiser``: D(x, sigma) = x - sigma
  eps(x / sqrt(sigma^2 + 1), t(sigma)) with fractional t(sigma); npsd's loop calls the same eps with
  its own fractional timesteps (``sigma_to_t``) and forms the same x0. DPM-Solver++(2M) steps in
  npsd on the variance-preserving x_t = x / sqrt(sigma^2 + 1), in k-diffusion on x itself: npsd starts
  from x_T / sqrt(sigma_0^2 + 1) and the trajectories are compared in k-diffusion's variable.
- The discretisation: npsd's default schedule (SD v1.5's "leading" spacing, steps_offset=1, as
  diffusers' EulerDiscreteScheduler) against A1111's, and npsd's "linspace" spacing, which is the
  same up to how the table is interpolated.

Tolerances (relative error = max |npsd - ref| / max |ref|, npsd.testing; ``pytest -s`` prints each):
- The sigma table sqrt((1 - abar) / abar): npsd in float64 rounded to float32, k-diffusion in float32;
  measured 6.5e-8; tolerance 5e-7 (also for npsd's dpmpp_2m Karras sigmas against A1111's, 2.3e-7).
- Fractional timesteps t(sigma) (both interpolate log sigma linearly between neighbouring integer
  timesteps): measured max |dt| 6.4e-5, Karras sigmas 8.8e-5 (of 0..999; k-diffusion computes t in
  float32); tolerance 5e-4 absolute.
- Whole loops (n = 1, 2, 10, 20, 50 steps), final latents and the state after every step, measured
  worst: euler 2.1e-7, euler_a 2.6e-7, heun 1.6e-7, dpmpp_2m 1.1e-6, dpmpp_2s_a 1.0e-6, dpmpp_2m_sde
  1.4e-6, dpmpp_sde 6.1e-7, dpmpp_3m_sde 1.8e-6; tolerances 2e-6, 2e-6, 1.5e-6 and 1e-5 for the others.
  One exception, Heun with 2 steps (sigmas 14.6, 0.029, 0): its correction divides x - D(x) by
  sigma_next = 0.029, which multiplies float32's rounding of x by 1 / 0.029; npsd and k-diffusion
  are then both 1.1e-5 away from a float64 run of k-diffusion, and 1.2e-5 (Karras: 5.8e-6) from each
  other; tolerance 1e-4.
- npsd's "linspace" sigmas against A1111's default ones, each sigma against its own value (the two
  libraries interpolate sigma, resp. log sigma, linearly between integer timesteps): measured 7.3e-5
  for n <= 50 steps, 2.5e-4 for n <= 100; tolerances 2e-4, 1e-3. With Karras sigmas: measured 7.1e-7;
  tolerance 5e-6. A whole 20-step run of each on its own sigmas: measured <= 1.7e-6; tolerance 1.5e-5.
- dpmpp_2m with Karras sigmas as npsd runs it (start N(0, I), integer timesteps) against A1111's run:
  measured 2.0e-3, bound 2e-2 (and > 1e-3: a real difference); from A1111's scaled start 4.3e-5,
  bound 4e-4.
- A1111's schedule types (``make_schedule(schedule_type=...)``, the last section): each sigma
  against its reference for n = 1 .. 150, measured at most 7.3e-7 (Karras); tolerance 2e-6 (sigma
  interpolated linearly instead of log sigma: 7.3e-5, which must fail). Whole runs of the eleven
  k-diffusion samplers (LMS, DPM2 and DPM2 a among them) on eight schedule types, 3 and 20 steps:
  measured 1.1e-7 to 2.0e-6 (DPM2 a with KL Optimal, whose last step ends at sigma_min: 3.6e-6);
  tolerances RTOL_LOOP (1e-5 for the three added samplers).
- A1111's settings of its schedules (schedulers.ScheduleOptions: sigma_min, sigma_max, rho, the
  discarded sigma, Beta's alpha and beta), against the references given them and A1111's get_sigmas
  written out: each sigma measured at most 3.3e-6 (Karras at rho 1.5: k-diffusion's float32);
  tolerance RTOL_A1111_OPTIONS = 2e-5; three small bugs (rho applied to Exponential, the sigma
  discarded twice, sigma_min ignored by KL Optimal) are 0.7 to 1.0 off. Whole runs with them:
  measured 2.3e-7 to 8.1e-7; tolerances RTOL_LOOP.
"""

import dataclasses
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from npsd import schedulers as S
from npsd.config import sd15_config
from npsd.testing import assert_close

# diffusers' Heun scheduler calls np.array(tensor) in a way NumPy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONFIG = sd15_config()
SHAPE = (2, 4, 8, 8)
KDIFFUSION_VERSION = "0.1.1.post1"
INSTALL = f"pip install --no-deps k-diffusion=={KDIFFUSION_VERSION} torchsde torchdiffeq"
RTOL_TABLE = 5e-7
T_ATOL = 5e-4
RTOL_LOOP = {"euler": 2e-6, "euler_a": 2e-6, "heun": 1.5e-6, "dpmpp_2m": 1e-5, "dpmpp_2s_a": 1e-5,
             "dpmpp_2m_sde": 1e-5, "dpmpp_sde": 1e-5, "dpmpp_3m_sde": 1e-5}
RTOL_HEUN_TWO_STEPS = 1e-4     # Heun, n = 2: see the module docstring
RTOL_2S_A_V_FLOAT64 = 5e-5     # DPM++ 2S a, v-prediction, n = 2: see test_dpmpp_2s_a_with_v_prediction
RTOL_LINSPACE_50 = 2e-4       # each sigma's own relative error, n <= 50 (measured 7.3e-5)
RTOL_LINSPACE_100 = 1e-3      # n <= 100 (measured 2.5e-4)
RTOL_KARRAS_EACH = 5e-6       # Karras sigmas, each its own relative error (measured 7.1e-7)
RTOL_RUN = 1.5e-5             # a whole 20-step run on either library's sigmas (measured 1.7e-6)
SAMPLER_PAIRS = {              # npsd name -> k-diffusion function
    "euler": "sample_euler",
    "euler_a": "sample_euler_ancestral",
    "heun": "sample_heun",
    "dpmpp_2m": "sample_dpmpp_2m",
    "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
    "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
    "dpmpp_sde": "sample_dpmpp_sde",
    "dpmpp_3m_sde": "sample_dpmpp_3m_sde",
}
VP = ("dpmpp_2m", "dpmpp_2m_sde")      # npsd steps on x_t = x / sqrt(sigma^2 + 1) (module docstring)
TWO_CALLS = ("heun", "dpmpp_2s_a", "dpmpp_sde")      # two model evaluations a step, one on the last (to sigma = 0)


def load_kdiffusion():
    """k_diffusion.sampling and k_diffusion.external, imported without running the package's
    ``__init__`` (which imports every module, torchvision included): the package directory is
    registered under a private name, and while its modules import, a stub stands in for torchvision
    (only ``k_diffusion/utils.py``'s image helpers use it, and nothing here calls them). The stubs
    are removed afterwards, so no other test sees a fake torchvision or a half-loaded k_diffusion."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"k-diffusion is not installed: {INSTALL}")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    name = "_npsd_test_k_diffusion"
    if name + ".external" in sys.modules:
        return sys.modules[name + ".sampling"], sys.modules[name + ".external"]
    pkg_spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                      submodule_search_locations=[str(pkg_dir)])
    pkg = importlib.util.module_from_spec(pkg_spec)     # created, never executed
    stub_names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    saved = {k: sys.modules[k] for k in stub_names if k in sys.modules}
    stubs = {k: types.ModuleType(k) for k in stub_names}
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules[name] = pkg
    sys.modules.update(stubs)
    try:
        sampling = importlib.import_module(name + ".sampling")
        external = importlib.import_module(name + ".external")
    finally:
        for k in stub_names:
            del sys.modules[k]
        sys.modules.update(saved)
    return sampling, external


@pytest.fixture(scope="module")
def kd():
    sampling, external = load_kdiffusion()
    return types.SimpleNamespace(sampling=sampling, external=external)


class FakeLDM:
    """What CompVisDenoiser needs of a latent-diffusion model: alphas_cumprod and apply_model(x, t)."""

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = torch.from_numpy(np.asarray(alphas_cumprod, dtype=np.float32))
        self.calls = 0

    def apply_model(self, x_in, t, cond=None):           # (CompVisVDenoiser passes a cond)
        self.calls += 1
        return fake_eps_torch(x_in, t)


def fake_eps_np(x, t):
    # a fake noise predictor that depends on both x and t (as in tests/test_schedulers.py)
    return np.tanh(np.float32(0.3) * x) * np.float32(math.cos(float(t) / 300)) + np.float32(0.1)


def fake_eps_torch(x, t):
    # t: [B] fractional timesteps, one per item (k-diffusion passes sigma_to_t(sigma * ones(B)))
    return torch.tanh(0.3 * x) * torch.cos(t.to(torch.float64) / 300).to(x.dtype).view(-1, 1, 1, 1) + 0.1


def denoiser(kd):
    """k-diffusion's CompVisDenoiser around the fake model, built from SD v1.5's alphas_cumprod as
    A1111 builds it from the checkpoint's buffer (the same float32 numbers as npsd's)."""
    return kd.external.CompVisDenoiser(FakeLDM(S.alphas_cumprod(CONFIG)))


def kd_sigmas(kd, n, karras):
    """A1111's sigmas for n steps: get_sigmas(n) (its default "Automatic" schedule) or Karras with the
    model's own sigma_min and sigma_max. [n + 1] float32, the last one 0."""
    den = denoiser(kd)
    if karras:
        s = kd.sampling.get_sigmas_karras(n, den.sigma_min.item(), den.sigma_max.item())
    else:
        s = den.get_sigmas(n)
    return s.numpy()


def npsd_schedule(name, sigmas):
    """An npsd Schedule for sampler `name` on the given sigmas [n + 1], with npsd's own fractional
    timesteps for them (the t at which the training table has noise level sigma)."""
    n = len(sigmas) - 1
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    ts = S.sigma_to_t(sigmas[:-1], table).astype(np.float32)                   # [n], fractional
    base = S.make_schedule(name, n, CONFIG)
    mid = None
    if name in ("dpmpp_2s_a", "dpmpp_sde"):     # the midpoints' timesteps, as make_schedule finds them
        sm = [S.dpm2_sigma_mid(sigmas[i], sigmas[i + 1], ancestral=name == "dpmpp_2s_a") for i in range(n - 1)]
        mid = np.append(S.sigma_to_t(np.array(sm, np.float64), table), 0.0).astype(np.float32)
    return dataclasses.replace(base, sigmas=np.asarray(sigmas, np.float32), timesteps=ts,
                               init_noise_sigma=float(sigmas[0]), mid_timesteps=mid)


def randn(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_draws(seed, count, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy() for _ in range(count)]


def run_kdiffusion(kd, name, sigmas, x_T, noises, den=None):
    """k-diffusion's sampler on sigmas from x_T (its own variable x = x0 + sigma eps). Returns the
    final latents, the state before every step and the number of model evaluations.
    den: the denoiser (default: CompVisDenoiser around the fake model)."""
    den = den or denoiser(kd)
    fn = getattr(kd.sampling, SAMPLER_PAIRS[name])
    states = []
    kw = {}
    if name in ("euler_a", "dpmpp_2s_a", "dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde"):
        draws = iter(noises)
        kw["noise_sampler"] = lambda sigma, sigma_next: torch.from_numpy(next(draws))
    out = fn(den, torch.from_numpy(x_T.copy()), torch.from_numpy(sigmas), disable=True, extra_args={"cond": None},
             callback=lambda d: states.append(d["x"].numpy().copy()), **kw)
    return out.numpy(), states + [out.numpy()], den.inner_model.calls


def run_npsd(name, sigmas, x_T, noises, prediction_type="epsilon"):
    """npsd's sample() on the same sigmas; states in k-diffusion's variable (see the module docstring)."""
    sched = dataclasses.replace(npsd_schedule(name, sigmas), prediction_type=prediction_type)
    vp = name in VP                             # DPM-Solver++ steps on x_t = x / sqrt(sigma^2 + 1)
    to_vp = 1.0 / math.sqrt(float(sigmas[0]) ** 2 + 1.0) if vp else 1.0
    states = [x_T]
    calls = []

    def model(x_in, t):
        calls.append(t)
        return fake_eps_np(x_in, t)

    def callback(i, t, x, x0_pred):
        states.append(x * np.float32(math.sqrt(float(sigmas[i + 1]) ** 2 + 1.0)) if vp else x)

    out = S.sample(model, x_T * np.float32(to_vp), sched, noises=noises, callback=callback)
    return out, states, len(calls)


# ---------------------------------------------------------------------------------------------
# The installation: k-diffusion beside the pinned CPU torch
# ---------------------------------------------------------------------------------------------

def test_torch_is_still_the_pinned_cpu_build():
    """k-diffusion's own dependencies (torchvision) would make pip replace torch with a CUDA build;
    the test extra installs it with --no-deps, and this checks that torch stayed as pinned."""
    assert torch.__version__ == "2.13.0+cpu", (
        f"torch {torch.__version__} is installed, not the pinned 2.13.0+cpu: reinstall with "
        f"`pip install torch==2.13.0` and install k-diffusion with --no-deps ({INSTALL})")


def test_kdiffusion_version(kd):
    from importlib.metadata import version
    assert version("k-diffusion") == KDIFFUSION_VERSION


# ---------------------------------------------------------------------------------------------
# The noise table and the fractional timesteps
# ---------------------------------------------------------------------------------------------

def test_sigma_table_equals_compvis_denoiser(kd):
    """A1111: sigmas = sqrt((1 - abar) / abar) from the checkpoint's alphas_cumprod (k-diffusion's
    DiscreteEpsDDPMDenoiser); npsd's table is the same, and so are sigma_min and sigma_max."""
    den = denoiser(kd)
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    print(assert_close(table, den.sigmas.numpy(), RTOL_TABLE, "sigma table"))
    assert abs(float(table[0]) - 0.029168) < 1e-6 and abs(float(table[-1]) - 14.614642) < 1e-5
    assert abs(den.sigma_min.item() - float(table[0])) <= 1e-7
    assert abs(den.sigma_max.item() - float(table[-1])) <= 2e-6


@pytest.mark.parametrize("karras", [False, True])
def test_fractional_timesteps_equal_kdiffusion(kd, karras):
    """t(sigma): both interpolate log sigma linearly between the two neighbouring table entries."""
    den = denoiser(kd)
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    worst = 0.0
    for n in (5, 10, 20, 25, 30, 50, 100):
        sig = kd_sigmas(kd, n, karras)[:-1]                                    # [n]
        t_kd = den.sigma_to_t(torch.from_numpy(sig)).numpy()
        t_np = S.sigma_to_t(sig, table)
        worst = max(worst, float(np.abs(t_np - t_kd).max()))
    print(f"fractional timesteps, karras={karras}: max |dt| = {worst:.3g}")
    assert worst <= T_ATOL


# ---------------------------------------------------------------------------------------------
# The samplers, given the same sigmas and the same model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("karras", [False, True], ids=["default-sigmas", "karras"])
@pytest.mark.parametrize("name", list(SAMPLER_PAIRS))
def test_sampler_equals_kdiffusion(kd, name, karras):
    worst_final = worst_state = 0.0
    # k-diffusion 0.1.1.post1's sample_dpmpp_2m_sde and sample_dpmpp_3m_sde fail on one step (their h
    # is unset when the first step goes to sigma 0)
    for n in (1, 2, 10, 20, 50) if name not in ("dpmpp_2m_sde", "dpmpp_3m_sde") else (2, 10, 20, 50):
        sigmas = kd_sigmas(kd, n, karras)                                       # [n + 1]
        x_T = randn(n) * np.float32(sigmas[0])     # A1111: x = noise * sigmas[0]
        noises = torch_draws(100 + n, 2 * n)       # DPM++ SDE draws two a step
        ref, ref_states, ref_calls = run_kdiffusion(kd, name, sigmas, x_T, noises)
        out, states, calls = run_npsd(name, sigmas, x_T, noises)
        what = f"{name} karras={karras} n={n}"
        rtol = RTOL_HEUN_TWO_STEPS if (name, n) == ("heun", 2) else RTOL_LOOP[name]
        c = assert_close(out, ref, rtol, f"final latents {what}")
        if rtol == RTOL_LOOP[name]:
            worst_final = max(worst_final, c.max_rel)
        else:
            print(c)
        assert len(states) == len(ref_states) == n + 1
        for i, (a, b) in enumerate(zip(states[1:], ref_states[1:])):
            c = assert_close(a, b, rtol, f"x after step {i} {what}")
            if rtol == RTOL_LOOP[name]:
                worst_state = max(worst_state, c.max_rel)
        # model evaluations: one per step; Heun, DPM++ 2S a and DPM++ SDE two per step except the last (to sigma = 0)
        assert calls == ref_calls == (2 * n - 1 if name in TWO_CALLS else n)
    print(f"{name} karras={karras}: final latents {worst_final:.3g}, every step's x {worst_state:.3g}"
          f"{' (n = 2 apart)' if name == 'heun' else ''}")


@pytest.mark.parametrize("karras", [False, True], ids=["default-sigmas", "karras"])
def test_dpmpp_2s_a_with_v_prediction(kd, karras):
    """DPM++ 2S a on a v-prediction model (SD 2.x 768): k-diffusion's CompVisVDenoiser, which A1111
    uses for such checkpoints, against npsd's conversion of v (model_output_to_eps); measured up to
    1.4e-6 for n = 1, 3, 10, 20, 50 (tolerance RTOL_LOOP, 1e-5). n = 2 (sigmas 14.6, 0.029, 0) apart:
    k-diffusion computes sigma_down = sqrt(sigma_next^2 - sigma_up^2) in float32, where the two nearly
    cancel (5.8104e-5 for 5.8212e-5), so its midpoint sits 0.1% off, and v-prediction's x0 = c_skip x
    + c_out v carries that into the result: npsd and k-diffusion are 7.2e-5 apart, k-diffusion 6.8e-5
    from a float64 run of itself and npsd 5.9e-6. n = 2 is compared with that float64 run
    (RTOL_2S_A_V_FLOAT64 = 5e-5)."""
    worst = 0.0
    for n in (1, 2, 3, 10, 20, 50):
        sigmas = kd_sigmas(kd, n, karras)
        x_T = randn(n) * np.float32(sigmas[0])
        noises = torch_draws(200 + n, n)
        den = kd.external.CompVisVDenoiser(FakeLDM(S.alphas_cumprod(CONFIG)))
        ref, _, _ = run_kdiffusion(kd, "dpmpp_2s_a", sigmas, x_T, noises, den=den)
        out, _, _ = run_npsd("dpmpp_2s_a", sigmas, x_T, noises, prediction_type="v_prediction")
        if n == 2:
            ldm = FakeLDM(S.alphas_cumprod(CONFIG))
            ldm.alphas_cumprod = ldm.alphas_cumprod.double()
            draws = iter(noises)
            ref64 = kd.sampling.sample_dpmpp_2s_ancestral(
                kd.external.CompVisVDenoiser(ldm), torch.from_numpy(x_T.astype(np.float64)),
                torch.from_numpy(sigmas.astype(np.float64)), extra_args={"cond": None}, disable=True,
                noise_sampler=lambda sigma, sigma_next: torch.from_numpy(next(draws)).double()).numpy()
            print(assert_close(out, ref64, RTOL_2S_A_V_FLOAT64, "dpmpp_2s_a v n=2 against k-diffusion in float64"))
            print(f"  (k-diffusion in float32 against it: {np.abs(ref - ref64).max() / np.abs(ref64).max():.3g})")
        else:
            worst = max(worst, assert_close(out, ref, RTOL_LOOP["dpmpp_2s_a"], f"dpmpp_2s_a v n={n}").max_rel)
        eps_read, _, _ = run_npsd("dpmpp_2s_a", sigmas, x_T, noises)           # v read as eps: another image
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            assert_close(eps_read, ref, RTOL_LOOP["dpmpp_2s_a"], "v read as eps")
    print(f"dpmpp_2s_a with v-prediction, karras={karras}: final latents {worst:.3g} (n != 2)")


def test_wrong_sigma_fails(kd):
    """Sensitivity: the same comparison with one sigma off by 1% fails (by 4e-5, 20x the tolerance)."""
    sigmas = kd_sigmas(kd, 10, False)
    x_T = randn(0) * np.float32(sigmas[0])
    ref, _, _ = run_kdiffusion(kd, "euler", sigmas, x_T, [])
    bad = sigmas.copy()
    bad[3] *= 1.01
    out, _, _ = run_npsd("euler", bad, x_T, [])
    with pytest.raises(AssertionError):
        assert_close(out, ref, RTOL_LOOP["euler"], "euler with one sigma off by 1%")


def test_ancestral_noise_is_used_in_the_same_order(kd):
    """Sensitivity: Euler ancestral with the noise arrays in another order fails."""
    sigmas = kd_sigmas(kd, 10, False)
    x_T = randn(1) * np.float32(sigmas[0])
    noises = torch_draws(5, 10)
    ref, _, _ = run_kdiffusion(kd, "euler_a", sigmas, x_T, noises)
    out, _, _ = run_npsd("euler_a", sigmas, x_T, noises[1:] + noises[:1])
    with pytest.raises(AssertionError):
        assert_close(out, ref, RTOL_LOOP["euler_a"], "euler_a with the noises rotated")


def test_dpmpp_2s_a_with_dpm2s_update_fails(kd, monkeypatch):
    """Sensitivity: DPM++ 2S a taking its second stage as DPM2 does (along the midpoint's slope, not
    towards its data prediction) differs from k-diffusion's by far more than the tolerance."""
    sigmas = kd_sigmas(kd, 10, True)
    x_T = randn(2) * np.float32(sigmas[0])
    noises = torch_draws(9, 10)
    ref, _, _ = run_kdiffusion(kd, "dpmpp_2s_a", sigmas, x_T, noises)
    monkeypatch.setattr(S, "dpmpp_2s_correct", S.dpm2_correct)
    out, _, _ = run_npsd("dpmpp_2s_a", sigmas, x_T, noises)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(out, ref, RTOL_LOOP["dpmpp_2s_a"], "dpmpp_2s_a with DPM2's second stage")


def test_dpmpp_3m_sde_without_its_third_order_fails(kd, monkeypatch):
    """Sensitivity: DPM++ 3M SDE that keeps only the last step's data prediction (second order, as
    DPM++ 2M SDE extrapolates) differs from k-diffusion's by more than the tolerance."""
    sigmas = kd_sigmas(kd, 10, True)
    x_T = randn(3) * np.float32(sigmas[0])
    noises = torch_draws(11, 10)
    ref, _, _ = run_kdiffusion(kd, "dpmpp_3m_sde", sigmas, x_T, noises)
    step = S.dpmpp_3m_sde_step
    monkeypatch.setattr(S, "dpmpp_3m_sde_step", lambda x, x0, s, s_next, z, earlier=(): step(x, x0, s, s_next, z,
                                                                                              earlier[:1]))
    out, _, _ = run_npsd("dpmpp_3m_sde", sigmas, x_T, noises)
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(out, ref, RTOL_LOOP["dpmpp_3m_sde"], "dpmpp_3m_sde at second order")


# ---------------------------------------------------------------------------------------------
# How npsd's schedules differ from A1111's
# ---------------------------------------------------------------------------------------------

def test_default_schedule_differs_from_a1111(kd):
    """npsd's default (SD v1.5's diffusers config: "leading", steps_offset=1) against A1111's default
    get_sigmas(n): a lower first sigma, a higher last one, and a larger starting noise std. The
    numbers here are the ones docs/samplers.md gives."""
    rows = {}
    for n in (10, 20, 50):
        a = kd_sigmas(kd, n, False)
        s = S.make_schedule("euler", n, CONFIG)
        rows[n] = (float(s.sigmas[0]), float(a[0]), float(s.sigmas[-2]), float(a[-2]),
                   float(s.init_noise_sigma), float(s.timesteps[0]))
        print(f"n={n}: first sigma npsd {s.sigmas[0]:.4f} (t={s.timesteps[0]:.0f}) vs A1111 {a[0]:.4f} (t=999); "
              f"last nonzero npsd {s.sigmas[-2]:.5f} (t={s.timesteps[-1]:.0f}) vs A1111 {a[-2]:.5f} (t=0); "
              f"start std npsd {s.init_noise_sigma:.4f} vs A1111 {a[0]:.4f}")
    expected = {10: (8.3907, 901), 20: (11.0283, 951), 50: (13.1204, 981)}
    for n, (first, t0) in expected.items():
        assert abs(rows[n][0] - first) < 1e-3 and rows[n][5] == t0
        assert abs(rows[n][1] - 14.6146) < 1e-3                     # A1111 always starts at sigma_max
        assert abs(rows[n][2] - 0.04131) < 1e-4 and abs(rows[n][3] - 0.02917) < 1e-4
        assert abs(rows[n][4] - math.sqrt(first ** 2 + 1)) < 1e-3   # leading: std sqrt(sigma^2 + 1)
    # DPM-Solver++(2M)'s leading schedule is coarser still: n + 1 points, the last dropped
    for n, (t0, first, t1, last) in {10: (901, 8.3907, 91, 0.3235), 20: (941, 10.4250, 48, 0.2204),
                                     50: (951, 11.0283, 20, 0.1380)}.items():
        d = S.make_schedule("dpmpp_2m", n, CONFIG)
        assert (int(d.timesteps[0]), int(d.timesteps[-1])) == (t0, t1)
        assert abs(float(d.sigmas[0]) - first) < 1e-3 and abs(float(d.sigmas[-2]) - last) < 1e-4
    assert abs(d.init_noise_sigma - 1.0) < 1e-12   # it steps on x_t: N(0, I), vs A1111's N(0, I) * sigma_max


def test_karras_endpoints_differ_from_a1111(kd):
    """Karras sigmas: npsd (as diffusers' Euler and Heun) spans the spaced schedule's own first and last
    sigma (leading: sigma(t=1) .. sigma(t=981) for 50 steps); A1111 spans the model's whole range,
    sigma_min = sigma(0) = 0.0292 to sigma_max = sigma(999) = 14.6146. npsd's dpmpp_2m already spans
    the whole range, and rounds its timesteps to integers."""
    for n in (20, 50):
        a = kd_sigmas(kd, n, True)
        s = S.make_schedule("euler", n, CONFIG, use_karras_sigmas=True)
        print(f"Karras n={n}: npsd euler {s.sigmas[0]:.4f} .. {s.sigmas[-2]:.5f}, A1111 {a[0]:.4f} .. {a[-2]:.5f}")
        assert float(s.sigmas[0]) < float(a[0]) - 1 and float(s.sigmas[-2]) > float(a[-2]) + 0.01
        d = S.make_schedule("dpmpp_2m", n, CONFIG, use_karras_sigmas=True)
        print(assert_close(d.sigmas, a, RTOL_TABLE, f"dpmpp_2m Karras sigmas n={n}"))
        dt = float(np.abs(d.timesteps - denoiser(kd).sigma_to_t(torch.from_numpy(a[:-1])).numpy()).max())
        print(f"  dpmpp_2m Karras: max |t_npsd - t_A1111| = {dt:.3f} (npsd rounds t to integers)")
        assert 0 < dt <= 0.5 + T_ATOL


def max_rel_each(sigmas, ref):
    """max over the nonzero sigmas of |sigma / ref - 1| (each sigma against its own value)."""
    return float(np.abs(np.asarray(sigmas[:-1], np.float64) / np.asarray(ref[:-1], np.float64) - 1).max())


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
def test_linspace_spacing_reproduces_a1111_sigmas(kd, name):
    """npsd's timestep_spacing="linspace" (euler, euler_a, heun) gives A1111's sigmas: t = linspace(999,
    0, n) as in CompVisDenoiser.get_sigmas, with sigma interpolated linearly in t (diffusers) instead
    of log sigma (k-diffusion). Equal where every t is whole (n = 10: 1.3e-7); else the largest
    difference is at the smallest nonzero t, 999 / (n - 1), where log sigma bends most: measured
    7.3e-5 for n <= 50 (n = 50, t = 20.4), 2.5e-4 for n <= 100. With Karras sigmas it spans sigma(0) ..
    sigma(999) exactly like A1111 (7.1e-7), and the starting noise std is sigma_max in both."""
    worst = {50: 0.0, 100: 0.0}
    for n in range(2, 101):
        a = kd_sigmas(kd, n, False)
        s = S.make_schedule(name, n, CONFIG, timestep_spacing="linspace")
        assert float(s.sigmas[-1]) == float(a[-1]) == 0.0
        err = max_rel_each(s.sigmas, a)
        for m in worst:
            if n <= m:
                worst[m] = max(worst[m], err)
        if n in (10, 20, 50):
            assert abs(s.init_noise_sigma - float(a[0])) < 1e-5
            k = S.make_schedule(name, n, CONFIG, timestep_spacing="linspace", use_karras_sigmas=True)
            kerr = max_rel_each(k.sigmas, kd_sigmas(kd, n, True))
            print(f"{name} linspace n={n}: {err:.3g}; with Karras: {kerr:.3g}")
            assert kerr <= RTOL_KARRAS_EACH
    print(f"{name} linspace vs A1111 get_sigmas(n): n <= 50: {worst[50]:.3g}, n <= 100: {worst[100]:.3g}")
    assert worst[50] <= RTOL_LINSPACE_50 and worst[100] <= RTOL_LINSPACE_100


def test_dpmpp_2m_has_no_a1111_uniform_schedule(kd):
    """npsd's dpmpp_2m follows diffusers' DPMSolverMultistepScheduler: its "linspace" spaces n + 1
    integer timesteps and drops the last (t = 0), so it never ends at A1111's sigma_min."""
    n = 20
    d = S.make_schedule("dpmpp_2m", n, CONFIG, timestep_spacing="linspace")
    a = kd_sigmas(kd, n, False)
    print(f"dpmpp_2m linspace n={n}: t = {d.timesteps[:3]} .. {d.timesteps[-1]}, sigmas {d.sigmas[0]:.4f} .. "
          f"{d.sigmas[-2]:.4f}; A1111 {a[0]:.4f}, {a[1]:.4f} .. {a[-2]:.5f}")
    assert int(d.timesteps[-1]) == 50 and abs(float(d.sigmas[-2]) - 0.2256) < 1e-3 and abs(float(a[-2]) - 0.02917) < 1e-4
    assert abs(float(d.sigmas[1]) / float(a[1]) - 1) > 0.01          # 10.9042 (t = 949) vs 10.7468 (t = 946.4)


def test_heun_counts_steps_like_kdiffusion():
    """n Heun steps are 2n - 1 model evaluations in npsd, k-diffusion (n + 1 sigmas; the last step, to
    sigma 0, is an Euler step) and diffusers (num_inference_steps=n lists 2n - 1 timesteps); the
    sampler comparison above counts npsd's and k-diffusion's calls."""
    from diffusers import HeunDiscreteScheduler
    for n in (1, 2, 10, 20, 50):
        r = HeunDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        r.set_timesteps(n)
        assert len(r.timesteps) == 2 * n - 1
        assert S.make_schedule("heun", n, CONFIG).num_inference_steps == n


@pytest.mark.parametrize("karras", [False, True], ids=["default-sigmas", "karras"])
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
def test_linspace_run_against_a1111_run(kd, name, karras):
    """A whole run as a user would do it: npsd with timestep_spacing="linspace" against k-diffusion on
    A1111's sigmas, both from the same noise (times each one's init sigma). The small sigma differences
    above carry through to the final latents (measured in the test output)."""
    n = 20
    sigmas = kd_sigmas(kd, n, karras)
    noise, noises = randn(7), torch_draws(8, n)
    ref, _, _ = run_kdiffusion(kd, name, sigmas, noise * np.float32(sigmas[0]), noises)
    sched = S.make_schedule(name, n, CONFIG, timestep_spacing="linspace", use_karras_sigmas=karras)
    out = S.sample(fake_eps_np, noise * np.float32(sched.init_noise_sigma), sched, noises=noises)
    c = assert_close(out, ref, RTOL_RUN, f"{name} linspace karras={karras} vs A1111, 20 steps")
    print(c)


def test_dpmpp_2m_karras_run_against_a1111_run(kd):
    """npsd's dpmpp_2m with Karras sigmas has A1111's sigmas (test above) but differs in two ways:
    it starts from x_t = N(0, I) where A1111 starts from N(0, I) * sigma_max in Karras' variable, i.e.
    x_t = N(0, I) * sigma_max / sqrt(sigma_max^2 + 1) = N(0, I) * 0.99767; and it gives the model
    integer timesteps (|dt| <= 0.5). With the fake model, 20 steps: measured 2.0e-3 as npsd runs it,
    4.3e-5 when npsd starts from A1111's scaled noise (the rest is the rounded timesteps)."""
    n = 20
    sigmas = kd_sigmas(kd, n, True)
    noise = randn(7)
    ref, _, _ = run_kdiffusion(kd, "dpmpp_2m", sigmas, noise * np.float32(sigmas[0]), [])
    sched = S.make_schedule("dpmpp_2m", n, CONFIG, use_karras_sigmas=True)
    assert sched.init_noise_sigma == 1.0
    scale = float(sigmas[0]) / math.sqrt(float(sigmas[0]) ** 2 + 1)
    assert abs(scale - 0.99767) < 1e-5
    as_is = assert_close(S.sample(fake_eps_np, noise, sched), ref, 2e-2, "dpmpp_2m Karras as npsd runs it")
    scaled = assert_close(S.sample(fake_eps_np, noise * np.float32(scale), sched), ref, 4e-4,
                          "dpmpp_2m Karras from A1111's scaled start")
    print(as_is, scaled, sep="\n")
    assert as_is.max_rel > 1e-3          # the starting scale is a real difference, not rounding


# ---------------------------------------------------------------------------------------------
# A1111's schedule types (make_schedule(schedule_type=...)): its sigmas, its start, its runs
# ---------------------------------------------------------------------------------------------

# A1111 1.10's modules/sd_samplers_kdiffusion.py: the schedule each sampler takes for "Automatic"
# (the others: k-diffusion's get_sigmas, "Uniform"), and those for which it discards the
# next-to-last of n + 2 sigmas
A1111_AUTOMATIC_EXPECTED = {"euler": "uniform", "euler_a": "uniform", "heun": "uniform", "lms": "uniform",
                            "dpm2": "karras", "dpm2_a": "karras", "dpmpp_2s_a": "karras", "dpmpp_2m": "karras",
                            "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_3m_sde": "exponential"}
A1111_DISCARD_EXPECTED = ("dpm2", "dpm2_a", "dpmpp_3m_sde")
RTOL_A1111_SIGMA = 2e-6        # each sigma against its reference's own value
RTOL_A1111_T = 5e-4            # fractional timesteps, absolute (as T_ATOL)
# A1111 1.10's modules/shared_options.py: the sampler parameters that change the schedules
RTOL_A1111_OPTIONS = 2e-5      # the same with A1111's options (test_a1111_schedule_options_equal_their_references)
A1111_OPTION_DEFAULTS = {"sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0, "always_discard_next_to_last_sigma": False,
                         "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6}


def a1111_reference_sigmas(kd, schedule_type, n, opts=None):
    """A1111's sigmas for n steps of one schedule type, made from independent code where it exists:
    k-diffusion's CompVisDenoiser (get_sigmas, sigma_to_t, t_to_sigma, its sigma table) and
    get_sigmas_karras / _exponential / _polyexponential, diffusers' Beta conversion and AYS table;
    the rest (kl_optimal, simple, the AYS interpolation) written here from A1111's definitions.
    opts: A1111's options {"sigma_min", "sigma_max", "rho", "beta_dist_alpha", "beta_dist_beta"} (absent:
    their defaults 0, 0, 0, 0.6, 0.6), applied as A1111 1.10's KDiffusionSampler.get_sigmas does."""
    opts = dict(A1111_OPTION_DEFAULTS, **(opts or {}))
    den = denoiser(kd)
    m_lo, m_hi = den.sigma_min.item(), den.sigma_max.item()
    # get_sigmas: kwargs = the model's ends, each replaced by the option where it is neither 0 nor the
    # model's own; rho passed where the scheduler has a default_rho (not -1) and the option is neither
    # 0 nor that default
    lo = opts["sigma_min"] if opts["sigma_min"] != 0 and opts["sigma_min"] != m_lo else m_lo
    hi = opts["sigma_max"] if opts["sigma_max"] != 0 and opts["sigma_max"] != m_hi else m_hi
    default_rho = {"karras": 7.0, "polyexponential": 1.0}.get(schedule_type, -1)
    kw = {"rho": opts["rho"]} if default_rho != -1 and opts["rho"] != 0 and opts["rho"] != default_rho else {}
    table = den.sigmas                                                         # [1000] float32
    zero = torch.zeros(1)
    if schedule_type == "uniform":
        s = den.get_sigmas(n)
    elif schedule_type in ("karras", "exponential", "polyexponential"):
        s = getattr(kd.sampling, f"get_sigmas_{schedule_type}")(n, lo, hi, **kw)
    elif schedule_type in ("normal", "sgm_uniform"):
        start, end = den.sigma_to_t(torch.tensor(hi)), den.sigma_to_t(torch.tensor(lo))
        count = n + 1 if schedule_type == "sgm_uniform" else n
        s = torch.cat([den.t_to_sigma(torch.linspace(start, end, count)[:n]), zero])
    elif schedule_type == "kl_optimal":
        i = torch.arange(n + 1)
        s = torch.tan(i / n * math.atan(lo) + (1.0 - i / n) * math.atan(hi))
    elif schedule_type == "simple":
        s = torch.tensor([float(table[-(1 + int(x * len(table) / n))]) for x in range(n)] + [0.0])
    elif schedule_type == "ddim":
        s = torch.tensor([float(table[x]) for x in range(1, len(table), max(len(table) // n, 1))][::-1] + [0.0])
    elif schedule_type == "beta":
        from diffusers import EulerDiscreteScheduler
        s = torch.cat([torch.from_numpy(EulerDiscreteScheduler()._convert_to_beta(
            torch.tensor([hi, lo], dtype=torch.float64), n, opts["beta_dist_alpha"], opts["beta_dist_beta"])).float(),
            zero])
    else:                                                                      # align_your_steps
        from diffusers.schedulers import AysSchedules
        # diffusers' 10 steps end 0.152 -> 0; NVIDIA's list, and A1111's, goes on to 0.029 (sigma_min)
        ays = np.array(AysSchedules["StableDiffusionSigmas"][:-1] + [0.029])  # [11]
        if n != len(ays):
            ays = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(ays)), np.log(ays[::-1])))[::-1]
        s = torch.cat([torch.from_numpy(ays.copy()).float(), zero])
    return s.numpy().astype(np.float64)


def a1111_sampler_sigmas(kd, name, schedule_type, n, opts=None):
    """What A1111's KDiffusionSampler.get_sigmas gives sampler `name` (with "Automatic" resolved and
    the next-to-last sigma discarded where A1111 does: the sampler's own option, or the option
    always_discard_next_to_last_sigma)."""
    used = A1111_AUTOMATIC_EXPECTED[name] if schedule_type == "automatic" else schedule_type
    if name in A1111_DISCARD_EXPECTED or (opts or {}).get("always_discard_next_to_last_sigma"):
        s = a1111_reference_sigmas(kd, used, n + 1, opts)
        return np.append(s[:-2], s[-1])
    return a1111_reference_sigmas(kd, used, n, opts)


def rel_each(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nz = b != 0
    assert np.all(a[~nz] == 0), "a sigma that should be 0 is not"
    return float(np.abs(a[nz] / b[nz] - 1).max())


@pytest.mark.parametrize("schedule_type", [t for t in S.SCHEDULE_TYPES if t != "automatic"])
def test_a1111_schedule_types_equal_their_references(kd, schedule_type):
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    worst = 0.0
    for n in (1, 2, 3, 7, 10, 11, 20, 33, 50, 150):
        if n == 1 and schedule_type == "beta":
            continue                                 # Beta's ppf(1 - linspace(0, 1, 1)) = ppf(1): sigma_max only
        ref = a1111_reference_sigmas(kd, schedule_type, n)
        got = S.a1111_sigmas(schedule_type, n, table)
        assert got.shape == ref.shape and (schedule_type == "ddim" or len(got) == n + 1), (schedule_type, n, got.shape)
        worst = max(worst, rel_each(got, ref))
    print(f"A1111 {schedule_type}: each sigma within {worst:.3g} of the reference (n = 1 .. 150)")
    assert worst <= RTOL_A1111_SIGMA


def test_a1111_uniform_with_diffusers_interpolation_fails(kd):
    """Interpolating sigma itself between timesteps (diffusers' linspace spacing) instead of log sigma
    is 7.3e-5 off at n = 50: far beyond the tolerance above."""
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    n = 50
    wrong = np.append(np.interp(np.linspace(999, 0, n), np.arange(1000), table), 0.0)
    err = rel_each(wrong, a1111_reference_sigmas(kd, "uniform", n))
    print(f"uniform with sigma interpolated linearly: {err:.3g} (tolerance {RTOL_A1111_SIGMA})")
    assert err > 10 * RTOL_A1111_SIGMA


@pytest.mark.parametrize("name", list(A1111_AUTOMATIC_EXPECTED))
def test_a1111_automatic_schedule_of_each_sampler(kd, name):
    """schedule_type="automatic": the type A1111 picks for the sampler, with its discarded sigma; the
    timesteps the model sees are k-diffusion's sigma_to_t of them and the start is N(0, I) sigma_0."""
    den = denoiser(kd)
    for n in (1, 2, 10, 20):
        sched = S.make_schedule(name, n, CONFIG, schedule_type="automatic")
        assert sched.schedule_type == A1111_AUTOMATIC_EXPECTED[name]
        ref = a1111_sampler_sigmas(kd, name, "automatic", n)
        err = rel_each(sched.sigmas, ref)
        assert err <= RTOL_A1111_SIGMA, (name, n, err)
        t_ref = den.sigma_to_t(torch.from_numpy(ref[:-1]).float()).numpy()
        assert float(np.abs(sched.timesteps - t_ref).max()) <= RTOL_A1111_T
        s0 = float(ref[0])
        start = s0 / math.sqrt(s0 * s0 + 1) if name in S.DPM_SOLVERS else s0
        assert abs(sched.init_noise_sigma / start - 1) < 1e-6


def test_a1111_schedule_type_is_refused_where_it_does_not_apply():
    from npsd.errors import InputError
    with pytest.raises(InputError, match="apply to the samplers euler.*not to 'ddim'"):
        S.make_schedule("ddim", 20, CONFIG, schedule_type="karras")
    with pytest.raises(InputError, match="without use_karras_sigmas and timestep_spacing"):
        S.make_schedule("euler", 20, CONFIG, schedule_type="karras", use_karras_sigmas=True)
    with pytest.raises(InputError, match="without use_karras_sigmas and timestep_spacing"):
        S.make_schedule("euler", 20, CONFIG, schedule_type="uniform", timestep_spacing="linspace")
    with pytest.raises(InputError, match="unknown schedule_type 'Karras'; use one of automatic, uniform"):
        S.make_schedule("euler", 20, CONFIG, schedule_type="Karras")


A1111_RUN_TYPES = ("automatic", "uniform", "karras", "exponential", "sgm_uniform", "kl_optimal", "align_your_steps",
                   "ddim", "beta")
KD_RUN = dict(SAMPLER_PAIRS, lms="sample_lms", dpm2="sample_dpm_2", dpm2_a="sample_dpm_2_ancestral")


@pytest.mark.parametrize("schedule_type", A1111_RUN_TYPES)
@pytest.mark.parametrize("name", list(A1111_AUTOMATIC_EXPECTED))
def test_a1111_run_equals_kdiffusion(kd, name, schedule_type):
    """A whole A1111 run: npsd's make_schedule(schedule_type=...) and sample() from N(0, I) *
    init_noise_sigma, against k-diffusion's sampler on A1111's sigmas from the same N(0, I) * sigma_0
    and the same step noise (x compared in k-diffusion's variable)."""
    worst = 0.0
    for n in (3, 20):
        worst = max(worst, a1111_run(kd, name, schedule_type, n).max_rel)
    print(f"A1111 run {name} {schedule_type}: {worst:.3g}")


def a1111_run(kd, name, schedule_type, n, opts=None):
    """npsd's run of sampler `name` on A1111's schedule (with A1111's options opts) against k-diffusion's
    on A1111's sigmas, from the same N(0, I) and the same step noise -> assert_close's comparison."""
    sigmas = a1111_sampler_sigmas(kd, name, schedule_type, n, opts).astype(np.float32)
    z = randn(n)
    noises = torch_draws(200 + n, 2 * n)
    fn = getattr(kd.sampling, KD_RUN[name])
    kw = {}
    if name in ("euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde"):
        draws = iter(noises)
        kw["noise_sampler"] = lambda sigma, sigma_next: torch.from_numpy(next(draws))
    ref = fn(denoiser(kd), torch.from_numpy(z * sigmas[0]), torch.from_numpy(sigmas), disable=True,
             extra_args={}, **kw).numpy()
    sched = S.make_schedule(name, n, CONFIG, schedule_type=schedule_type, schedule_options=npsd_options(opts))
    out = S.sample(fake_eps_np, z * np.float32(sched.init_noise_sigma), sched, noises=noises)
    if name in S.DPM_SOLVERS:                    # x_t -> x at the last sigma (kl_optimal: sigma_min)
        out = out * np.float32(math.sqrt(float(sigmas[-1]) ** 2 + 1))
    return assert_close(out, ref, RTOL_LOOP.get(name, 1e-5), f"{name} {schedule_type} n={n} {opts or ''}")


# ---------------------------------------------------------------------------------------------
# A1111's sampler parameters that change its schedules (schedulers.ScheduleOptions)
# ---------------------------------------------------------------------------------------------

def npsd_options(opts):
    """A1111's options (a1111_reference_sigmas' opts) -> npsd's ScheduleOptions, or None."""
    if opts is None:
        return None
    o = dict(A1111_OPTION_DEFAULTS, **opts)
    return S.ScheduleOptions(sigma_min=o["sigma_min"], sigma_max=o["sigma_max"], rho=o["rho"],
                             discard_penultimate=o["always_discard_next_to_last_sigma"],
                             beta_alpha=o["beta_dist_alpha"], beta_beta=o["beta_dist_beta"])


# option sets, each read by some of the types and passed over by the others (uniform, simple, ddim
# and align_your_steps read none; rho only karras and polyexponential; Beta's only beta)
A1111_OPTION_SETS = ({"sigma_min": 0.1}, {"sigma_max": 10.0}, {"sigma_min": 0.05, "sigma_max": 8.0, "rho": 3.0},
                     {"rho": 5.0}, {"rho": 1.5}, {"sigma_min": 0.3, "beta_dist_alpha": 0.5, "beta_dist_beta": 0.8},
                     {"beta_dist_alpha": 1.0, "beta_dist_beta": 0.3})


@pytest.mark.parametrize("schedule_type", [t for t in S.SCHEDULE_TYPES if t != "automatic"])
def test_a1111_schedule_options_equal_their_references(kd, schedule_type):
    """Every schedule type with A1111's sigma_min, sigma_max, rho and Beta options: each sigma
    against the reference (k-diffusion's functions given the overrides, diffusers' Beta conversion
    given alpha and beta, A1111's get_sigmas written out), n = 2 .. 150. Measured at most 3.3e-6
    (Karras, rho 1.5) and 1.7e-6 (KL Optimal, sigma_min 0.3): the references' float32, whose rounding
    near sigma_max^(1 / rho) is a larger part of the small sigmas as rho falls; tolerance
    RTOL_A1111_OPTIONS = 2e-5."""
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    worst = 0.0
    for opts in A1111_OPTION_SETS:
        for n in (2, 3, 7, 10, 20, 33, 150):
            ref = a1111_reference_sigmas(kd, schedule_type, n, opts)
            got = S.a1111_sigmas(schedule_type, n, table, npsd_options(opts))
            assert got.shape == ref.shape, (schedule_type, n, opts, got.shape)
            worst = max(worst, rel_each(got, ref))
    print(f"A1111 {schedule_type} with options: each sigma within {worst:.3g} of the reference (tolerance "
          f"{RTOL_A1111_OPTIONS})")
    assert worst <= RTOL_A1111_OPTIONS


def test_a1111_karras_rho_below_1_is_float32_rounding_in_kdiffusion(kd):
    """Karras with rho = 0.5 spaces sigma^2 evenly from 213.6 down to 0.00085: k-diffusion does it in
    float32, whose rounding near 213.6 (1.5e-5) is 2% of the last sigma^2, so A1111's last sigma is
    2.2e-3 from the formula's (measured). npsd computes in float64: against k-diffusion's function run
    in float64 it is within 4e-16 (measured); tolerance RTOL_A1111_SIGMA."""
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    got = S.a1111_sigmas("karras", 20, table, S.ScheduleOptions(rho=0.5))
    as_a1111 = rel_each(got, a1111_reference_sigmas(kd, "karras", 20, {"rho": 0.5}))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lo, hi = float(np.float32(table[0])), float(np.float32(table[-1]))
        in_float64 = rel_each(got, kd.sampling.get_sigmas_karras(20, lo, hi, rho=0.5).numpy())
    finally:
        torch.set_default_dtype(default)
    print(f"Karras rho 0.5: {in_float64:.3g} from k-diffusion in float64, {as_a1111:.3g} from it in float32")
    assert in_float64 <= RTOL_A1111_SIGMA and 1e-3 < as_a1111 < 1e-2


@pytest.mark.parametrize("name", ["euler", "dpm2", "dpmpp_2m_sde"])
def test_a1111_discard_penultimate_sigma(kd, name):
    """always_discard_next_to_last_sigma: n + 2 sigmas, the next-to-last dropped; for DPM2 (which
    discards by itself) nothing changes: it is not discarded twice."""
    opts = {"always_discard_next_to_last_sigma": True, "sigma_min": 0.1}
    for n in (2, 10, 20):
        sched = S.make_schedule(name, n, CONFIG, schedule_type="automatic", schedule_options=npsd_options(opts))
        ref = a1111_sampler_sigmas(kd, name, "automatic", n, opts)
        assert len(sched.sigmas) == n + 1
        err = rel_each(sched.sigmas, ref)
        assert err <= RTOL_A1111_OPTIONS, (name, n, err)
        if name in A1111_DISCARD_EXPECTED:
            plain = S.make_schedule(name, n, CONFIG, schedule_type="automatic",
                                    schedule_options=npsd_options({"sigma_min": 0.1}))
            np.testing.assert_array_equal(sched.sigmas, plain.sigmas)


def test_a1111_options_not_overridden_at_zero_or_the_default():
    """A1111's rule: sigma_min and sigma_max at 0 or at the model's own value (k-diffusion's float32
    table end), rho at 0 or at the type's default_rho, override nothing; rho is no setting of the
    types whose default_rho is -1 (all but Karras and Polyexponential)."""
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    m_lo, m_hi = float(np.float32(table[0])), float(np.float32(table[-1]))
    for kind in ("karras", "polyexponential", "exponential", "kl_optimal", "normal", "beta"):
        base = S.a1111_sigmas(kind, 10, table)
        rho = {"karras": 7.0, "polyexponential": 1.0}.get(kind, 0.0)
        for o in (S.ScheduleOptions(), S.ScheduleOptions(sigma_min=m_lo, sigma_max=m_hi, rho=rho)):
            assert o.overrides(kind, m_lo, m_hi) == {}
            np.testing.assert_array_equal(S.a1111_sigmas(kind, 10, table, o), base)
    o = S.ScheduleOptions(rho=3.0)
    assert [k for k in S.SCHEDULE_TYPES if o.overrides(k, m_lo, m_hi)] == ["karras", "polyexponential"]
    for kind in ("exponential", "uniform", "kl_optimal", "beta"):
        np.testing.assert_array_equal(S.a1111_sigmas(kind, 10, table, o), S.a1111_sigmas(kind, 10, table))
    assert S.ScheduleOptions(sigma_min=0.1, sigma_max=9.0, rho=7.0).overrides("karras", m_lo, m_hi) == \
        {"sigma_min": 0.1, "sigma_max": 9.0}
    for kind in ("uniform", "simple", "ddim", "align_your_steps"):     # types that read no ends
        np.testing.assert_array_equal(S.a1111_sigmas(kind, 10, table, S.ScheduleOptions(sigma_min=0.5, sigma_max=5.0)),
                                      S.a1111_sigmas(kind, 10, table))


def test_a1111_option_mutants_fail(kd, monkeypatch):
    """Three small bugs, each far beyond the tolerance of the tests above (RTOL_A1111_OPTIONS = 2e-5):
    rho applied to Exponential, the next-to-last sigma discarded twice (DPM2 with the option), and
    sigma_min ignored by KL Optimal."""
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(CONFIG))
    n = 10
    errors = {}
    with monkeypatch.context() as m:
        m.setitem(S.A1111_DEFAULT_RHO, "exponential", 1.0)         # the rho rule of Polyexponential
        errors["rho on exponential"] = rel_each(S.a1111_sigmas("exponential", n, table, S.ScheduleOptions(rho=3.0)),
                                                a1111_reference_sigmas(kd, "exponential", n, {"rho": 3.0}))
    twice = S.a1111_schedule_sigmas("dpm2", "karras", n + 1, table, S.ScheduleOptions(discard_penultimate=True))[0]
    twice = np.append(twice[:-2], twice[-1])                                                             # [n + 1]
    errors["discarded twice"] = rel_each(twice, a1111_sampler_sigmas(
        kd, "dpm2", "karras", n, {"always_discard_next_to_last_sigma": True}))
    errors["kl_optimal without sigma_min"] = rel_each(S.a1111_sigmas("kl_optimal", n, table),
                                                      a1111_reference_sigmas(kd, "kl_optimal", n, {"sigma_min": 0.1}))
    print(", ".join(f"{k}: {v:.3g}" for k, v in errors.items()), f"(tolerance {RTOL_A1111_OPTIONS})")
    for what, err in errors.items():
        assert err > 10 * RTOL_A1111_OPTIONS, what


@pytest.mark.parametrize("name, schedule_type, opts", [
    ("dpmpp_2m", "karras", {"sigma_min": 0.1, "sigma_max": 10.0, "rho": 5.0}),
    ("euler_a", "polyexponential", {"rho": 2.0, "always_discard_next_to_last_sigma": True}),
    ("heun", "kl_optimal", {"sigma_min": 0.05, "sigma_max": 12.0}),
    ("dpm2", "beta", {"beta_dist_alpha": 0.5, "beta_dist_beta": 0.8, "sigma_min": 0.2,
                      "always_discard_next_to_last_sigma": True}),
    ("dpmpp_2m_sde", "sgm_uniform", {"sigma_max": 8.0})])
def test_a1111_run_with_options_equals_kdiffusion(kd, name, schedule_type, opts):
    """Whole runs on schedules changed by A1111's options, against k-diffusion's samplers on A1111's
    sigmas (a1111_run); tolerances RTOL_LOOP (1e-5 for DPM2), as the runs without options."""
    worst = max(a1111_run(kd, name, schedule_type, n, opts).max_rel for n in (3, 20))
    print(f"A1111 run {name} {schedule_type} {opts}: {worst:.3g} (tolerance {RTOL_LOOP.get(name, 1e-5)})")


def test_a1111_options_refused():
    from npsd.errors import InputError
    with pytest.raises(InputError, match="give a schedule_type"):
        S.make_schedule("euler", 20, CONFIG, schedule_options=S.ScheduleOptions(rho=3.0))
    with pytest.raises(InputError, match="schedule_options must be an npsd.schedulers.ScheduleOptions"):
        S.make_schedule("euler", 20, CONFIG, schedule_type="karras", schedule_options={"rho": 3.0})
    with pytest.raises(InputError, match="schedule sigma_min must be a finite number >= 0"):
        S.ScheduleOptions(sigma_min=-1.0)
    with pytest.raises(InputError, match="beta_alpha must be a finite number > 0"):
        S.ScheduleOptions(beta_alpha=0)
    with pytest.raises(InputError, match="discard_penultimate must be True or False"):
        S.ScheduleOptions(discard_penultimate="yes")
    with pytest.raises(InputError, match="sigma_min 20 must be below its sigma_max 14.6"):
        S.make_schedule("euler", 20, CONFIG, schedule_type="karras", schedule_options=S.ScheduleOptions(sigma_min=20.0))
