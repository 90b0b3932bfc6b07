"""Noise schedule, forward process, timestep selection and the samplers, as pure functions.

Read docs/samplers.md first: it derives every formula used here, with the notation below.

Glossary (code name -> paper symbol)
- ``alphas_cumprod[t]``  alpha_bar_t = prod_{s<=t} (1 - beta_s)          (Ho et al. 2020, "DDPM")
- ``sigma``              sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)   (Karras et al. 2022, "EDM");
                         DEIS calls it rho, and lambda = -log(sigma) is DPM-Solver's half log-SNR
- ``x`` / ``x_t``        the noisy latent. DDPM, DDIM, PNDM, LCM and the DPM-Solver family
                         (DPM++ 2M, DPM++ 2M SDE, UniPC, DEIS) work with the variance-preserving
                         x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps; Euler, Euler ancestral,
                         Heun, LMS, DPM2, DPM2 ancestral, DPM++ 2S ancestral, DPM++ SDE and
                         DPM++ 3M SDE with Karras' x = x_t / sqrt(alpha_bar_t) = x0 + sigma eps.
- ``eps``                the model's noise prediction eps_theta(x_t, t)
- ``x0_pred``            the model's estimate of the clean latent x0 at this step

How the pieces fit (what a pipeline does; txt2img with Euler)::

    sched = make_schedule("euler", 50, config)                  # timesteps, sigmas, init_noise_sigma
    x = noise * sched.init_noise_sigma                           # noise ~ N(0, I) [B, 4, h, w]
    x = sample(model, x, sched, rng=rng, callback=cb)            # model(x_in, t) -> model output

img2img: ``start = img2img_start_index(steps, strength)``, ``x = noise_at_start(sched, x0, noise,
start)``, ``sample(model, x, sched, start_index=start, ...)``.

Arrays stay float32; the scalar coefficients of a step (sqrt(abar), 1/sigma, e^-h, ...) are Python
floats computed in float64 from the float32 schedule, which NumPy applies without upcasting.

Every function is pure: arrays in, arrays out. Randomness enters only as explicit noise arrays or an
``np.random.Generator`` argument. Schedules are computed like SD v1.5's diffusers schedulers
(diffusers 0.42.1, each with its own ``set_timesteps`` rules; tests/test_schedulers.py and
tests/test_samplers_more.py check them), or with ``schedule_type`` like AUTOMATIC1111's schedule
types (``a1111_sigmas``; tests/test_kdiffusion.py).
"""

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError, is_flag, is_number, is_whole

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "pndm", "lms", "dpmpp_2m_sde", "unipc",
            "dpm2", "dpm2_a", "lcm", "deis", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_3m_sde")
# samplers in Karras' variable x = x0 + sigma eps; the model sees scale_model_input(x, sigma)
KARRAS_VARIABLE = ("euler", "euler_a", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_3m_sde")
# the DPM-Solver family: the variance-preserving x_t, described by the sigmas of DPM-Solver's timesteps
DPM_SOLVERS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "deis")
SIGMA_SAMPLERS = KARRAS_VARIABLE + DPM_SOLVERS      # schedules described by sigmas (Karras sigmas apply)
# samplers whose step noise can come from a noise sampler (a Brownian tree, npsd/brownian.py)
NOISE_SAMPLER_SAMPLERS = ("dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde")
# samplers that call the model twice in a step (all but the last)
TWO_STAGE = ("heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde")
SPACINGS = ("leading", "trailing", "linspace")
# AUTOMATIC1111's schedule types ("Schedule type" in its images' parameters), which npsd computes as
# A1111 does for the samplers A1111 runs with k-diffusion (a1111_sigmas); "automatic" is each sampler's
# own choice in A1111 (A1111_AUTOMATIC), the others are in A1111's modules/sd_schedulers.py
SCHEDULE_TYPES = ("automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
                  "align_your_steps", "simple", "normal", "ddim", "beta")
KDIFFUSION_SAMPLERS = KARRAS_VARIABLE + ("dpmpp_2m", "dpmpp_2m_sde")     # the samplers they apply to
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------------------------------------
# The noise schedule
# ---------------------------------------------------------------------------------------------

def _section(config):
    """Accept a whole model config or just its "scheduler" section."""
    return config["scheduler"] if "scheduler" in config else config


def _betas64(sched_config):
    n = int(sched_config["num_train_timesteps"])
    b0, b1 = float(sched_config["beta_start"]), float(sched_config["beta_end"])
    kind = sched_config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        # SD v1.x: betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2
        b = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2       # [N]
    elif kind == "linear":
        # DDPM (Ho et al. 2020, sec. 4): betas linear from beta_start to beta_end
        b = np.linspace(b0, b1, n, dtype=np.float64)                          # [N]
    else:
        raise InputError(f"beta_schedule {kind!r} is not supported; use 'scaled_linear' (SD v1.x) or 'linear'")
    return rescale_zero_terminal_snr(b) if sched_config.get("rescale_betas_zero_snr", False) else b


def rescale_zero_terminal_snr(betas):
    """Rescale a beta schedule so that the last timestep has zero SNR (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.1, Algorithm 1), float64 [N].

    sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first is unchanged:
    the model then trains on (and samples from) pure noise at t = N - 1. Use it with v-prediction
    (an eps-model cannot say anything at zero SNR: x0 = (x_t - eps) / 0).
    """
    abar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))   # [N]
    first, last = abar_sqrt[0], abar_sqrt[-1]
    # sqrt(abar)_new = (sqrt(abar) - sqrt(abar_T)) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T))
    abar = ((abar_sqrt - last) * first / (first - last)) ** 2                   # [N], abar[-1] = 0
    # back to betas: alpha_t = abar_t / abar_{t-1}, alpha_0 = abar_0
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])                  # [N]
    return 1.0 - alphas


def _finite_terminal(ac):
    """alpha_bar with a zero last value (a zero-SNR schedule) replaced by 2^-24, so that its sigma
    is finite (4096), as diffusers' sigma-based schedulers do; other schedules unchanged."""
    if ac[-1] > 0:
        return ac
    ac = ac.copy()
    ac[-1] = 2.0 ** -24
    return ac


def betas(config):
    """The training noise schedule beta_1..beta_N, float32 [N].

    config: the "scheduler" section of a model config (or the whole config): num_train_timesteps,
    beta_start, beta_end, beta_schedule ("scaled_linear" for SD v1.x, or "linear").
    Computed in float64 and stored as float32, as the original latent-diffusion code does (its
    checkpoints carry the result as the ``betas`` / ``alphas_cumprod`` buffers).
    """
    return _betas64(_section(config)).astype(np.float32)                      # [N]


def alphas_cumprod(config):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..N-1, float32 [N] (DDPM, sec. 2)."""
    b = _betas64(_section(config))                                             # [N] float64
    # alpha_bar_t = prod_{s=0..t} (1 - beta_s), accumulated in float64
    return np.cumprod(1.0 - b).astype(np.float32)                              # [N]


def sigmas_from_alphas_cumprod(ac):
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float32 [N]: the noise-to-signal ratio of
    x_t, i.e. the noise level of x = x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps."""
    a = np.asarray(ac, dtype=np.float64)
    return np.sqrt((1.0 - a) / a).astype(np.float32)                           # [N]


def add_noise(x0, noise, t, alphas_cumprod):
    """Sample the forward process q(x_t | x_0) (DDPM eq. 4):  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

    x0, noise [B, ...]; t an integer timestep or an integer array [B] (one per item).
    Returns float32 [B, ...]. This is the variance-preserving x_t that DDPM, DDIM and DPM-Solver++
    step on; for a sampler's own variable use ``noise_at_step``.
    """
    t = np.asarray(t)
    ab = alphas_cumprod[t].astype(np.float32)                                  # [] or [B]
    if ab.ndim == 1:
        ab = ab.reshape((-1,) + (1,) * (x0.ndim - 1))                          # [B] -> [B, 1, 1, 1]
    # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    return (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Timestep selection
# ---------------------------------------------------------------------------------------------

def _check_steps(num_inference_steps, num_train_timesteps):
    if not is_whole(num_inference_steps):
        raise InputError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if num_inference_steps > num_train_timesteps:
        raise InputError(f"num_inference_steps is {num_inference_steps}, but the model was trained with "
                         f"{num_train_timesteps} timesteps; use at most {num_train_timesteps}")


def _check_spacing(spacing):
    if spacing not in SPACINGS:
        raise InputError(f"unknown timestep_spacing {spacing!r}; use one of {', '.join(SPACINGS)}")


def _check_range(ts, num_train_timesteps, spacing, steps_offset):
    if ts.max() >= num_train_timesteps or ts.min() < 0:
        raise InputError(f"{spacing!r} spacing with steps_offset={steps_offset} gives timesteps outside "
                         f"0..{num_train_timesteps - 1}; use fewer steps or another spacing")
    return ts


def timesteps(num_inference_steps, spacing="leading", steps_offset=1, num_train_timesteps=1000):
    """Integer timesteps for DDPM and DDIM, int64 [n], from noisy to clean (diffusers' rules).

    leading   t_i = i * (N // n) + steps_offset, i = n-1 .. 0   SD v1.5 (offset 1): 981, 961, .., 1
    trailing  t_i = round(N - i N / n) - 1,      i = 0 .. n-1   999, 979, .., 19
    linspace  round(linspace(0, N - 1, n)), reversed            999, 979, .., 0
    The course's 980, 960, .., 0 is "leading" with steps_offset=0.
    """
    _check_steps(num_inference_steps, num_train_timesteps)
    _check_spacing(spacing)
    n, N = int(num_inference_steps), int(num_train_timesteps)
    if spacing == "leading":
        ts = np.arange(n)[::-1] * (N // n) + steps_offset                      # [n]
    elif spacing == "trailing":
        ts = np.round(np.arange(N, 0, -N / n)) - 1                             # [n]
    else:
        ts = np.linspace(0, N - 1, n).round()[::-1]                            # [n]
    return _check_range(ts.astype(np.int64), N, spacing, steps_offset)


def sigma_timesteps(num_inference_steps, spacing="leading", steps_offset=1, num_train_timesteps=1000):
    """float32 timesteps for Euler, Euler ancestral and Heun [n] (diffusers' rules).

    The same as ``timesteps`` except "linspace", which is not rounded: linspace(0, N - 1, n) can be
    fractional (e.g. 999, 888, 777, .. for n = 10 is whole, but n = 7 gives 999, 832.5, ..); the
    sigmas are then interpolated between the neighbouring integer timesteps.
    """
    _check_steps(num_inference_steps, num_train_timesteps)
    _check_spacing(spacing)
    n, N = int(num_inference_steps), int(num_train_timesteps)
    if spacing == "linspace":
        ts = np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()           # [n], maybe fractional
        return ts
    return timesteps(n, spacing, steps_offset, N).astype(np.float32)           # [n]


def dpm_timesteps(num_inference_steps, spacing="leading", steps_offset=1, num_train_timesteps=1000):
    """Integer timesteps for DPM-Solver++, int64 [n] (diffusers' DPMSolverMultistepScheduler rules).

    DPM-Solver spaces n + 1 points and drops the last one (t = 0 for leading/linspace), so its
    "leading" schedule is coarser than DDIM's: for n = 50, N // 51 = 19 and t = 951, 932, .., 20.
    """
    _check_steps(num_inference_steps, num_train_timesteps)
    _check_spacing(spacing)
    n, N = int(num_inference_steps), int(num_train_timesteps)
    if spacing == "leading":
        ts = (np.arange(n + 1) * (N // (n + 1)))[::-1][:-1] + steps_offset     # [n]
    elif spacing == "trailing":
        ts = np.round(np.arange(N, 0, -N / n)) - 1                             # [n]
    else:
        ts = np.linspace(0, N - 1, n + 1).round()[::-1][:-1]                   # [n]
    return _check_range(ts.astype(np.int64), N, spacing, steps_offset)


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. 2022, eq. 5: n noise levels from sigma_max down to sigma_min, float64 [n].

    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7:
    evenly spaced in sigma^(1/7), so the steps are short near sigma_min, where detail is decided.
    """
    ramp = np.linspace(0, 1, n)                                                # [n], i / (n - 1)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho                                      # [n]


def sigma_to_t(sigma, sigma_table):
    """The (fractional) timestep whose noise level is sigma: linear interpolation of log(sigma)
    between the two neighbouring entries of the training table sigma_t (diffusers' _sigma_to_t).

    sigma [n] (float), sigma_table [N] (increasing in t) -> t float64 [n] in [0, N - 1].
    """
    log_table = np.log(np.asarray(sigma_table, dtype=np.float64))              # [N]
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))  # [n]
    # low = the last table entry with log_table <= log_sigma (clipped so that low + 1 exists)
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)  # [n]
    w = (log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])  # [n] in [0, 1] after clip
    w = np.clip(w, 0, 1)
    return (1 - w) * low + w * (low + 1)                                       # [n]


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111's schedules (k-diffusion's discretisation of the training table)
# ---------------------------------------------------------------------------------------------

# the schedule type A1111 (1.9 and later) gives each sampler when asked for "Automatic" (the rest:
# uniform), and the samplers for which it computes one sigma more and drops the next-to-last
A1111_AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2s_a": "karras", "dpm2": "karras",
                   "dpm2_a": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_3m_sde": "exponential"}
A1111_DISCARD_PENULTIMATE = ("dpm2", "dpm2_a", "dpmpp_3m_sde")
# Align Your Steps (Sabour et al. 2024): NVIDIA's 10-step sigmas for SD 1.5, which A1111 gives every
# model that is not SDXL
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
BETA_ALPHA = BETA_BETA = 0.6    # A1111's default Beta distribution (Lee et al. 2024)
# which of A1111's settings each schedule type reads (A1111's modules/sd_schedulers.py): the types whose
# function computes with sigma_min and sigma_max (the others pass over them), and the default rho of the
# two that have one (its Scheduler.default_rho; -1, "none", for the rest)
A1111_USES_ENDS = ("normal", "sgm_uniform", "karras", "exponential", "polyexponential", "kl_optimal", "beta")
A1111_DEFAULT_RHO = {"karras": 7.0, "polyexponential": 1.0}


@dataclass(frozen=True)
class ScheduleOptions:
    """AUTOMATIC1111's settings that change the sigmas of its schedule types (its Settings > Sampler
    parameters; A1111 1.10's KDiffusionSampler.get_sigmas in modules/sd_samplers_kdiffusion.py).
    A1111's option names and the fields it writes in an image's parameters are given in brackets.

    sigma_min, sigma_max  the schedule's ends in place of the model's smallest and largest sigma
                    (sigma_min, sigma_max; "Schedule min sigma", "Schedule max sigma"); 0 or the
                    model's own value: not overridden. Only the types in A1111_USES_ENDS read them.
    rho             Karras' and Polyexponential's rho (rho; "Schedule rho"); 0 or the type's
                    default (A1111_DEFAULT_RHO): not overridden. The other types have none.
    discard_penultimate  compute n + 2 sigmas and drop the next-to-last, as A1111 does by itself for
                    DPM2, DPM2 a and DPM++ 3M SDE (always_discard_next_to_last_sigma; "Discard
                    penultimate sigma"); for those samplers it changes nothing
    beta_alpha, beta_beta  the Beta distribution of the "beta" type (beta_dist_alpha, beta_dist_beta;
                    "Beta schedule alpha", "Beta schedule beta")
    """
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    discard_penultimate: bool = False
    beta_alpha: float = BETA_ALPHA
    beta_beta: float = BETA_BETA

    def __post_init__(self):
        for name in ("sigma_min", "sigma_max", "rho"):
            v = getattr(self, name)
            if not is_number(v) or not 0 <= v < math.inf:
                raise InputError(f"schedule {name} must be a finite number >= 0 (0: the default), got {v!r}")
        for name in ("beta_alpha", "beta_beta"):
            v = getattr(self, name)
            if not is_number(v) or not 0 < v < math.inf:
                raise InputError(f"{name} must be a finite number > 0, got {v!r}")
        if not is_flag(self.discard_penultimate):
            raise InputError(f"discard_penultimate must be True or False, got {self.discard_penultimate!r}")

    def overrides(self, schedule_type, sigma_min, sigma_max):
        """What A1111 passes to schedule_type's function in place of the model's ends sigma_min,
        sigma_max (float32 values, as k-diffusion's table holds them) and the type's default rho:
        {"sigma_min": .., "sigma_max": .., "rho": ..}, only those overridden (A1111 writes each as a
        field of the image's parameters whether or not the type reads it)."""
        found = {}
        if self.sigma_min not in (0, sigma_min):
            found["sigma_min"] = float(self.sigma_min)
        if self.sigma_max not in (0, sigma_max):
            found["sigma_max"] = float(self.sigma_max)
        if schedule_type in A1111_DEFAULT_RHO and self.rho not in (0, A1111_DEFAULT_RHO[schedule_type]):
            found["rho"] = float(self.rho)
        return found


DEFAULT_SCHEDULE_OPTIONS = ScheduleOptions()


def sigma_table(config):
    """The model's training table sigma_t, float64 [N], increasing (a zero-SNR schedule's last made
    finite): what A1111's schedule types are computed from."""
    return sigmas_from_alphas_cumprod(_finite_terminal(alphas_cumprod(_section(config))))


def a1111_model_ends(sigma_table):
    """The model's (sigma_min, sigma_max) as A1111 compares its options with them: the ends of
    k-diffusion's float32 table, as Python floats."""
    return float(np.float32(sigma_table[0])), float(np.float32(sigma_table[-1]))


def t_to_sigma(t, sigma_table):
    """The noise level at the (fractional) timestep t: log(sigma) interpolated linearly between
    the neighbouring entries of the training table (k-diffusion's DiscreteSchedule.t_to_sigma).
    t [n] in [0, N - 1] -> sigma float64 [n]."""
    log_table = np.log(np.asarray(sigma_table, dtype=np.float64))              # [N]
    t = np.asarray(t, dtype=np.float64)                                        # [n]
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)      # [n]
    w = t - low
    return np.exp((1 - w) * log_table[low] + w * log_table[high])              # [n]


def a1111_sigmas(schedule_type, n, sigma_table, options=DEFAULT_SCHEDULE_OPTIONS):
    """The n + 1 noise levels of A1111's schedule type for n steps on a model with the given
    training table sigma_t (increasing, [N]), float64, as A1111's modules/sd_schedulers.py and
    k-diffusion make them (ddim: as many as its stride gives). All but kl_optimal end with 0.
    sigma_min, sigma_max = the table's ends, or options' (a ScheduleOptions) where they override
    them; rho = the type's A1111_DEFAULT_RHO, or options'.

    uniform           t = linspace(N - 1, 0, n), sigma = t_to_sigma(t)  (k-diffusion's get_sigmas)
    normal            the same from sigma_to_t(sigma_max) to sigma_to_t(sigma_min)
    sgm_uniform       n of the n + 1 timesteps of that linspace, the last dropped (Stability's SGM)
    karras            Karras et al. 2022 eq. 5, sigma_max .. sigma_min, rho (7)
    exponential       evenly spaced in log(sigma), sigma_max .. sigma_min
    polyexponential   exp(r^rho (log sigma_max - log sigma_min) + log sigma_min), r = 1 .. 0, rho (1)
    kl_optimal        tan((1 - i / n) atan(sigma_max) + i / n atan(sigma_min)), i = 0..n (the "KL-optimal"
                      discretisation of Sabour et al. 2024): the last is sigma_min, not 0
    align_your_steps  AYS_SD15, or n of its values interpolated linearly in log(sigma)
    simple            the table read backwards at every N / n-th entry: sigma_t, t = N - 1 - int(i N / n)
    ddim              sigma_t for t = 1, 1 + k, 1 + 2k, .. < N, k = max(N // n, 1), largest first (DDIM's
                      own spacing, Song et al. 2021): n steps when k divides N - 1 evenly enough, else
                      one or more extra (30 steps: 31)
    beta              sigma_min + (sigma_max - sigma_min) ppf(1 - i / (n - 1)) of Beta(alpha, beta) (0.6, 0.6)
    uniform, align_your_steps, simple and ddim read neither sigma_min nor sigma_max (A1111_USES_ENDS).
    """
    table = np.asarray(sigma_table, dtype=np.float64)                          # [N]
    N = len(table)
    if schedule_type not in SCHEDULE_TYPES or schedule_type == "automatic":
        raise InputError(f"unknown schedule_type {schedule_type!r}; use one of {', '.join(SCHEDULE_TYPES[1:])}")
    given = options.overrides(schedule_type, *a1111_model_ends(table))
    lo, hi = given.get("sigma_min", float(table[0])), given.get("sigma_max", float(table[-1]))
    rho = given.get("rho", A1111_DEFAULT_RHO.get(schedule_type))
    if schedule_type in A1111_USES_ENDS and not lo < hi:
        raise InputError(f"the schedule's sigma_min {lo:g} must be below its sigma_max {hi:g}")
    i = np.arange(n, dtype=np.float64)                                         # [n] step index
    if schedule_type in ("uniform", "normal", "sgm_uniform"):
        start, end = (N - 1.0, 0.0) if schedule_type == "uniform" else sigma_to_t(np.array([hi, lo]), table)
        count = n + 1 if schedule_type == "sgm_uniform" else n
        s = t_to_sigma(np.linspace(start, end, count)[:n], table)              # [n]
    elif schedule_type == "karras":
        s = karras_sigmas(lo, hi, n, rho)
    elif schedule_type in ("exponential", "polyexponential"):
        ramp = np.linspace(1, 0, n) ** (rho or 1.0)                            # exponential: rho = 1
        s = np.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo))        # [n]
    elif schedule_type == "kl_optimal":
        r = np.arange(n + 1) / n                                               # [n + 1]
        return np.tan(r * math.atan(lo) + (1 - r) * math.atan(hi))             # [n + 1], ends at sigma_min
    elif schedule_type == "align_your_steps":
        s = np.array(AYS_SD15)
        if n != len(s):
            # log-linear interpolation of the reversed list at n evenly spaced points
            x = np.linspace(0, 1, n)
            s = np.exp(np.interp(x, np.linspace(0, 1, len(AYS_SD15)), np.log(s[::-1])))[::-1]
    elif schedule_type == "simple":
        s = table[N - 1 - (i * (N / n)).astype(np.int64)]                      # [n]
    elif schedule_type == "ddim":
        s = table[1::max(N // n, 1)][::-1]                                     # [about n]
    else:                                                                      # beta
        from scipy import stats
        s = lo + stats.beta.ppf(1 - np.linspace(0, 1, n), options.beta_alpha, options.beta_beta) * (hi - lo)  # [n]
    return np.append(s, 0.0)                                                   # [n + 1]


def resolve_schedule_type(sampler, schedule_type):
    """schedule_type with "automatic" replaced by the type A1111 gives the sampler (A1111_AUTOMATIC, else uniform)."""
    return A1111_AUTOMATIC.get(sampler, "uniform") if schedule_type == "automatic" else schedule_type


def a1111_schedule_sigmas(sampler, schedule_type, n, sigma_table, options=DEFAULT_SCHEDULE_OPTIONS):
    """The sigmas [n + 1] A1111 samples `sampler` on for n steps with `schedule_type` (SCHEDULE_TYPES;
    "automatic": A1111_AUTOMATIC's choice or uniform) and options (a ScheduleOptions): for DPM2, DPM2 a
    and DPM++ 3M SDE, or any sampler with options.discard_penultimate, it makes n + 2 and drops the
    next-to-last (A1111's discard_next_to_last_sigma). -> (sigmas, the type used)."""
    used = resolve_schedule_type(sampler, schedule_type)
    if sampler in A1111_DISCARD_PENULTIMATE or options.discard_penultimate:
        s = a1111_sigmas(used, n + 1, sigma_table, options)                    # [n + 2]
        return np.append(s[:-2], s[-1]), used                                  # [n + 1]
    return a1111_sigmas(used, n, sigma_table, options), used


# ---------------------------------------------------------------------------------------------
# A schedule: everything a sampling loop needs, computed once
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The fixed numbers of one sampling run (read-only arrays; compute with ``make_schedule``).

    sampler           one of SAMPLERS
    timesteps         [n] the t given to the model at step i (int64; float32 for the samplers in
                      KARRAS_VARIABLE, whose timesteps may be fractional). Heun evaluates the model
                      twice per step: at timesteps[i] and, for the correction, at timesteps[i + 1];
                      DPM2 and DPM2 ancestral at timesteps[i] and mid_timesteps[i].
    sigmas            [n + 1] float32 noise levels, sigmas[n] = 0 (sigma-based samplers; DEIS ends at
                      sigma_min instead, as diffusers'), else None
    prev_timesteps    [n] int64 t_prev of each DDPM/DDIM/PNDM/LCM step (negative: "past the end",
                      whose alpha_bar is final_alpha_cumprod), else None
    alphas_cumprod    [N] float32 training schedule alpha_bar_t
    final_alpha_cumprod  alpha_bar used for t_prev < 0: DDPM 1.0; DDIM and PNDM alphas_cumprod[0]
                      (SD's set_alpha_to_one=False)
    init_noise_sigma  the std of the starting latent: x_T = N(0, I) * init_noise_sigma
    spacing, use_karras_sigmas   how the schedule was chosen
    mid_timesteps     [n] the model's timestep at the midpoint evaluation of each step: DPM2 and
                      DPM2 ancestral (float32, at the midpoint sigma; unused at the last step) and
                      PNDM's Runge-Kutta warm-up (int64, t_next + (N // n) // 2); else None
    skip_prk_steps    PNDM: True starts PLMS with one improved-Euler step (SD v1.5's configuration),
                      False with three Runge-Kutta steps (Liu et al. 2022's F-PNDM)
    prediction_type   what the model predicts: "epsilon" (SD v1.x), "v_prediction" or "sample";
                      sample() converts it to the sampler's eps (and x0)
    schedule_type     A1111's schedule type the sigmas follow (SCHEDULE_TYPES, "automatic" resolved),
                      or None for diffusers' schedule (spacing, use_karras_sigmas)
    final_timestep    the timestep of sigmas[n] when it is not 0 (A1111's kl_optimal ends at
                      sigma_min), where Heun's last step evaluates the model; else None
    steps_asked       the steps asked for (A1111's schedules, whose ddim type can make another
                      number of them), which A1111's img2img start counts with; else None
    """
    sampler: str
    timesteps: np.ndarray
    sigmas: np.ndarray
    prev_timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float
    init_noise_sigma: float
    spacing: str
    use_karras_sigmas: bool
    mid_timesteps: np.ndarray = None
    skip_prk_steps: bool = True
    prediction_type: str = "epsilon"
    schedule_type: str = None
    final_timestep: float = None
    steps_asked: int = None

    @property
    def num_inference_steps(self):
        return len(self.timesteps)


def check_sampler(name):
    """Return name if it is a known sampler, else raise InputError listing the valid names."""
    if name not in SAMPLERS:
        from .pngmeta import sampler_from_a1111                          # (pngmeta imports this module)
        found, schedule = sampler_from_a1111(name) if isinstance(name, str) else (None, None)
        if found:                                                        # A1111's display name
            raise InputError(f"unknown sampler {name!r}: npsd's name for it is {found!r}"
                             f"{f' with schedule_type={schedule!r}' if schedule else ''}; npsd's names are "
                             f"{', '.join(SAMPLERS)}")
        raise InputError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    return name


def check_prediction_type(name):
    """Return name if it is a known prediction type, else raise InputError listing the valid ones."""
    if name not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction_type {name!r}; use one of {', '.join(PREDICTION_TYPES)}")
    return name


def _readonly(a):
    if a is not None:
        a = np.ascontiguousarray(a)
        a.flags.writeable = False
    return a


def lcm_timesteps(num_inference_steps, num_train_timesteps=1000, original_inference_steps=50):
    """LCM's timesteps, int64 [n] (diffusers' LCMScheduler; spacing and steps_offset do not apply).

    The model was distilled on the original_inference_steps timesteps k - 1, 2k - 1, .., N - 1
    (k = N // original_inference_steps: 19, 39, .., 999 for SD); n of them are taken at evenly spaced
    indices from the noisy end: n = 4 gives 999, 759, 499, 259.
    """
    _check_steps(num_inference_steps, num_train_timesteps)
    n, N, orig = int(num_inference_steps), int(num_train_timesteps), int(original_inference_steps)
    if n > orig:
        raise InputError(f"lcm takes at most original_inference_steps = {orig} steps (the timesteps the model "
                         f"was distilled on), got {n}")
    k = N // orig
    origin = (np.arange(1, orig + 1) * k - 1)[::-1]                            # [orig] 999, 979, .., 19
    return origin[np.floor(np.linspace(0, orig, n, endpoint=False)).astype(np.int64)].astype(np.int64)  # [n]


def make_schedule(sampler, num_inference_steps, config, use_karras_sigmas=False, timestep_spacing=None,
                  skip_prk_steps=None, prediction_type=None, schedule_type=None, schedule_options=None):
    """Compute the Schedule of one sampler for num_inference_steps steps, as diffusers does, or, with
    schedule_type, as AUTOMATIC1111 does.

    config: a model config or its "scheduler" section (npsd.config.SD15["scheduler"]).
    timestep_spacing: "leading", "trailing" or "linspace"; None takes the config's (SD v1.5: leading,
    steps_offset 1); lcm has its own timesteps and ignores it. use_karras_sigmas (Karras eq. 5)
    applies to the samplers in SIGMA_SAMPLERS. skip_prk_steps (pndm) and prediction_type: None takes
    the config's (SD v1.5: True, "epsilon").
    schedule_type: one of SCHEDULE_TYPES for the samplers in KDIFFUSION_SAMPLERS: A1111's sigmas
    (a1111_schedule_sigmas), the model's timesteps at them fractional (k-diffusion's sigma_to_t), the
    start N(0, I) sigma_0 (in x_t for dpmpp_2m and dpmpp_2m_sde); it replaces timestep_spacing and
    use_karras_sigmas (schedule_type="karras" is A1111's Karras). None: diffusers' schedule.
    schedule_options: a ScheduleOptions (A1111's sigma_min, sigma_max, rho, discard and Beta settings)
    for a schedule_type; None: A1111's defaults.
    """
    check_sampler(sampler)
    if schedule_options is not None and not isinstance(schedule_options, ScheduleOptions):
        raise InputError(f"schedule_options must be an npsd.schedulers.ScheduleOptions(...) or None, "
                         f"got {type(schedule_options).__name__}")
    if schedule_type is not None:
        return _a1111_schedule(sampler, num_inference_steps, config, schedule_type, use_karras_sigmas,
                               timestep_spacing, prediction_type, schedule_options or DEFAULT_SCHEDULE_OPTIONS)
    if schedule_options not in (None, DEFAULT_SCHEDULE_OPTIONS):
        raise InputError("schedule_options are A1111's settings of its schedule types: give a schedule_type "
                         "(e.g. 'automatic'), or leave them out")
    sched_config = _section(config)
    N = int(sched_config["num_train_timesteps"])
    n = num_inference_steps
    spacing = timestep_spacing if timestep_spacing is not None else sched_config.get("timestep_spacing", "leading")
    offset = int(sched_config.get("steps_offset", 0))
    skip_prk = bool(sched_config.get("skip_prk_steps", True) if skip_prk_steps is None else skip_prk_steps)
    prediction = check_prediction_type(sched_config.get("prediction_type", "epsilon") if prediction_type is None
                                       else prediction_type)
    if use_karras_sigmas is not None and not is_flag(use_karras_sigmas):
        raise InputError(f"use_karras_sigmas must be True or False, got {use_karras_sigmas!r}")
    if use_karras_sigmas and sampler not in SIGMA_SAMPLERS:
        raise InputError(f"use_karras_sigmas applies to {', '.join(SIGMA_SAMPLERS)}, not to {sampler!r}")
    ac = alphas_cumprod(sched_config)                                          # [N]
    table = sigmas_from_alphas_cumprod(_finite_terminal(ac))                   # [N] sigma_t, increasing
    sigmas = prev = mid = None
    final_ac, init_sigma = 1.0, 1.0

    if sampler in ("ddpm", "ddim", "pndm"):
        ts = timesteps(n, spacing, offset, N)                                  # [n] int64
        if sampler == "ddpm":
            # DDPM steps to the next timestep of the list; past the end alpha_bar_prev = 1
            prev = np.append(ts[1:], -1)                                       # [n]
        else:
            # diffusers' DDIM and PNDM step to t - N // n whatever the spacing (for leading this is
            # the next timestep); past the end they use alpha_bar_0 (SD's set_alpha_to_one=False)
            prev = ts - N // int(n)                                            # [n]
            final_ac = float(ac[0]) if not sched_config.get("set_alpha_to_one", False) else 1.0
        if sampler == "pndm" and not skip_prk:
            if n < 4:
                raise InputError(f"pndm's Runge-Kutta warm-up (skip_prk_steps=False) needs at least 4 steps, got {n}")
            # the warm-up evaluates the model halfway, at t_next + (N // n) // 2 (diffusers' prk_timesteps)
            mid = np.append(ts[1:] + (N // int(n)) // 2, -1)                   # [n] int64, last unused
    elif sampler == "lcm":
        ts = lcm_timesteps(n, N, int(sched_config.get("original_inference_steps", 50)))  # [n] int64
        # each step re-noises its x0 estimate to the next timestep; the last returns the estimate
        prev = np.append(ts[1:], -1)                                           # [n]
    elif sampler in DPM_SOLVERS:
        ts = dpm_timesteps(n, spacing, offset, N)                              # [n] int64
        if use_karras_sigmas:
            # Karras sigmas over the whole training range, timesteps rounded to integers
            s = karras_sigmas(table[0], table[-1], int(n))                     # [n]
            ts = np.round(sigma_to_t(s, table)).astype(np.int64)               # [n]
        else:
            s = table[ts]                                                      # [n]
        # the last step goes to sigma 0, except DEIS: to sigma_min (Karras: its last sigma again)
        last = 0.0 if sampler != "deis" else (s[-1] if use_karras_sigmas else table[0])
        sigmas = np.append(s, last).astype(np.float32)                         # [n + 1]
    else:                                                                      # KARRAS_VARIABLE
        ts = sigma_timesteps(n, spacing, offset, N)                            # [n] float32
        # sigma at each (maybe fractional) timestep: linear interpolation of the table
        s = np.interp(ts, np.arange(N), table)                                 # [n] float64
        if use_karras_sigmas:
            # Karras sigmas between the first and last sigma of the spaced schedule
            s = karras_sigmas(s[-1], s[0], int(n))                             # [n]
            ts = sigma_to_t(s, table)                                          # [n], fractional
            if sampler in ("dpm2", "dpm2_a"):
                ts = np.round(ts)                                              # diffusers' KDPM2 rounds them
            ts = ts.astype(np.float32)
        sigmas = np.append(s, 0.0).astype(np.float32)                          # [n + 1]
        mid = _mid_timesteps(sampler, sigmas, table)
        smax = float(sigmas.max())
        # diffusers: leading spacing starts from the VP noise N(0, I) / sqrt(alpha_bar) (std
        # sqrt(sigma_max^2 + 1)); linspace / trailing start from std sigma_max
        init_sigma = smax if spacing in ("linspace", "trailing") else float(np.sqrt(np.float32(smax) ** 2 + 1))

    if sampler == "pndm":
        # PNDM's transfer (eq. 9) divides by alpha_bar_t, which a zero-SNR schedule makes 0 at t = N - 1
        ac = _finite_terminal(ac)
    return Schedule(sampler=sampler, timesteps=_readonly(ts), sigmas=_readonly(sigmas),
                    prev_timesteps=_readonly(prev), alphas_cumprod=_readonly(ac),
                    final_alpha_cumprod=final_ac, init_noise_sigma=init_sigma,
                    spacing=spacing, use_karras_sigmas=bool(use_karras_sigmas),
                    mid_timesteps=_readonly(mid), skip_prk_steps=skip_prk, prediction_type=prediction)


def _mid_timesteps(sampler, sigmas, table):
    """The timestep of each step's midpoint evaluation [n] (float32) for DPM2, DPM2 ancestral,
    DPM++ 2S ancestral and DPM++ SDE, 0 for a step to sigma 0 (which has none); else None."""
    if sampler not in ("dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde"):
        return None
    ancestral = sampler in ("dpm2_a", "dpmpp_2s_a")
    sm = np.array([dpm2_sigma_mid(sigmas[i], sigmas[i + 1], ancestral) for i in range(len(sigmas) - 1)])  # [n]
    return (sigma_to_t(sm, table) * (sm > 0)).astype(np.float32)


def _a1111_schedule(sampler, n, config, schedule_type, use_karras_sigmas, timestep_spacing, prediction_type, options):
    """make_schedule's schedule_type branch: A1111's sigmas for a k-diffusion sampler."""
    if schedule_type not in SCHEDULE_TYPES:
        raise InputError(f"unknown schedule_type {schedule_type!r}; use one of {', '.join(SCHEDULE_TYPES)}")
    if sampler not in KDIFFUSION_SAMPLERS:
        raise InputError(f"A1111's schedule types apply to the samplers {', '.join(KDIFFUSION_SAMPLERS)}, "
                         f"not to {sampler!r}")
    if use_karras_sigmas or timestep_spacing is not None:
        raise InputError("schedule_type sets the sigmas itself: give it without use_karras_sigmas and "
                         "timestep_spacing (schedule_type='karras' for A1111's Karras sigmas)")
    sched_config = _section(config)
    N = int(sched_config["num_train_timesteps"])
    _check_steps(n, N)
    prediction = check_prediction_type(sched_config.get("prediction_type", "epsilon") if prediction_type is None
                                       else prediction_type)
    ac = alphas_cumprod(sched_config)                                          # [N]
    table = sigmas_from_alphas_cumprod(_finite_terminal(ac))                   # [N] sigma_t, increasing
    s, used = a1111_schedule_sigmas(sampler, schedule_type, int(n), table, options)  # [n + 1] float64
    sigmas = s.astype(np.float32)                                              # [n + 1]
    asked, n = int(n), len(s) - 1                                              # (ddim: n may differ)
    ts = sigma_to_t(sigmas[:-1], table).astype(np.float32)                     # [n], fractional
    final_t = float(sigma_to_t(sigmas[-1:], table)[0]) if sigmas[-1] > 0 else None
    mid = _mid_timesteps(sampler, sigmas, table)
    # A1111 starts from N(0, I) sigma_0 in Karras' variable; the DPM-Solvers step on x_t = x / sqrt(sigma^2 + 1)
    s0 = float(sigmas[0])
    init_sigma = s0 / math.sqrt(s0 * s0 + 1.0) if sampler in DPM_SOLVERS else s0
    return Schedule(sampler=sampler, timesteps=_readonly(ts), sigmas=_readonly(sigmas), prev_timesteps=None,
                    alphas_cumprod=_readonly(ac), final_alpha_cumprod=1.0, init_noise_sigma=init_sigma,
                    spacing="a1111", use_karras_sigmas=False, mid_timesteps=_readonly(mid),
                    prediction_type=prediction, schedule_type=used, final_timestep=final_t,
                    steps_asked=asked)


def img2img_start_index(num_inference_steps, strength):
    """The step at which img2img (and inpainting with strength < 1) starts, as diffusers computes it.

    init_timestep = min(int(n * strength), n); t_start = n - init_timestep. The run then does the
    last n - t_start steps of the schedule, starting from the input noised as ``noise_at_start``
    says. Valid for every sampler: diffusers' Heun lists each timestep twice and starts at
    t_start * 2 of its list, which is npsd's step t_start; PNDM's start is one list entry early
    (``pndm_start``; see docs/samplers.md).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise InputError(f"strength must be between 0 and 1, got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    if t_start >= num_inference_steps:
        raise InputError(f"strength {strength} with {num_inference_steps} steps leaves no step to run "
                         f"(int(steps * strength) = 0); raise strength or num_inference_steps")
    return t_start


def start_index(schedule, strength):
    """The step at which img2img (and inpainting) starts with this schedule: diffusers' rule
    (img2img_start_index), or for an A1111 schedule (schedule.schedule_type) A1111's: with
    t_enc = int(min(strength, 0.999) n) it runs the last t_enc + 1 steps (so strength 0.75 of 20
    steps runs 16 from sigmas[4], where diffusers runs 15 from sigmas[5])."""
    n = schedule.num_inference_steps
    if schedule.schedule_type is None:
        return img2img_start_index(n, strength)
    if not is_number(strength) or not 0.0 <= float(strength) <= 1.0:
        raise InputError(f"strength must be between 0 and 1, got {strength}")
    asked = schedule.steps_asked or n               # (the ddim type's steps may differ from those asked)
    return min(max(asked - int(min(float(strength), 0.999) * asked) - 1, 0), n - 1)


def noise_at_step(schedule, x0, noise, step_index):
    """x0 noised to the noise level of step ``step_index``, in the sampler's own variable (what
    diffusers' scheduler.add_noise gives there). step_index == n (past the end) returns x0.

    ddpm, ddim, pndm, lcm:   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise     (DDPM eq. 4, t = timesteps[i])
    DPM_SOLVERS:             the same with alpha = 1 / sqrt(sigma_i^2 + 1), sigma_t = sigma_i alpha
    KARRAS_VARIABLE:         x = x0 + sigma_i noise                             (Karras' variable)
    """
    n = schedule.num_inference_steps
    if not 0 <= step_index <= n:
        raise InputError(f"step_index must be in 0..{n}, got {step_index}")
    if step_index == n:
        return np.asarray(x0, dtype=np.float32)
    if schedule.sampler not in SIGMA_SAMPLERS:
        return add_noise(x0, noise, int(schedule.timesteps[step_index]), schedule.alphas_cumprod)
    sigma = float(schedule.sigmas[step_index])
    if schedule.sampler in DPM_SOLVERS:
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        return (alpha_t * x0 + sigma_t * noise).astype(np.float32, copy=False)
    # x = x0 + sigma * noise
    return (x0 + sigma * noise).astype(np.float32, copy=False)


def pndm_start(schedule, start_index):
    """The two timesteps of PNDM's improved-Euler first step in a run from step start_index, as
    diffusers runs it: (t_first, t_second), or (t_first, None) for a one-step schedule. x starts at
    the noise level of t_first; the model is evaluated at t_first and, on the Euler point, at
    t_second, where the step lands; the run then goes on with step start_index + 1.

    diffusers' PNDMScheduler (skip_prk_steps) lists its timesteps with the second one twice,
    d = [t_0, t_1, t_1, t_2, .., t_{n-1}], one entry per model call (the first step takes two), and
    its order is 1, so diffusers' img2img pipeline starts PLMS at d[t_start * 1] = d[t_start], with
    PLMS's warm-up counter at 0. Step s of the schedule begins at d[s + 1] (s >= 1), so:
        s = 0:   (d[0], d[1]) = (t_0, t_1)       txt2img's start, unchanged
        s = 1:   (d[1], d[2]) = (t_1, t_1)
        s >= 2:  (d[s], d[s + 1]) = (t_{s-1}, t_s): one step early
    and the next call, at d[s + 2] = t_{s+1}, sees x at the level of t_s: from s >= 1 diffusers'
    img2img PNDM ends one step short (from s = n - 1 it stops at t_{n-1}'s noise level).
    """
    ts = schedule.timesteps
    d = np.concatenate([ts[:2], ts[1:]]) if len(ts) > 1 else ts               # [n + 1] diffusers' list
    return d[start_index], (d[start_index + 1] if start_index + 1 < len(d) else None)


def noise_at_start(schedule, x0, noise, start_index):
    """The state a run from step start_index starts from (img2img; inpainting with strength < 1),
    as diffusers' pipelines make it: ``noise_at_step(schedule, x0, noise, start_index)`` for every
    sampler but PNDM, which diffusers' img2img pipeline noises to the level of the first timestep
    of its part-way start, ``pndm_start(schedule, start_index)[0]`` (one step early from step 2 on).
    """
    n = schedule.num_inference_steps
    if not 0 <= start_index < n:
        raise InputError(f"start_index must be in 0..{n - 1} for {n} steps, got {start_index}")
    if schedule.sampler == "pndm" and schedule.skip_prk_steps:
        t_first, _ = pndm_start(schedule, start_index)
        # x = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise at diffusers' t_first, not at timesteps[start_index]
        return add_noise(x0, noise, int(t_first), schedule.alphas_cumprod)
    return noise_at_step(schedule, x0, noise, start_index)


# ---------------------------------------------------------------------------------------------
# Step functions. Each returns (x_next, x0_pred); scalars are Python floats, arrays float32.
# ---------------------------------------------------------------------------------------------

def ddpm_step(x_t, eps, t, t_prev, alphas_cumprod, noise=None, x0_pred=None):
    """One ancestral DDPM step x_t -> x_{t_prev} (Ho et al. 2020, eq. 6-7), fixed small variance.

    x_t, eps [B, C, h, w]; t, t_prev integer timesteps (t_prev < 0: the end, alpha_bar_prev = 1);
    noise: N(0, I) like x_t, or None for the posterior mean alone (diffusers draws no noise at t = 0).
    x0_pred: the model's own x0 estimate (v- and x0-prediction models); default derived from eps.
    Returns (x_prev, x0_pred).
    """
    ab_t = float(alphas_cumprod[t])
    ab_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    alpha_t = ab_t / ab_prev                                  # alpha of this (strided) step
    beta_t = 1.0 - alpha_t
    if x0_pred is None:
        # x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)             (DDPM eq. 15 rearranged)
        x0_pred = (x_t - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)       # [B, C, h, w]
    # posterior mean (eq. 7):
    #   mu = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
    c_x0 = math.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
    c_xt = math.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab_t)
    mean = c_x0 * x0_pred + c_xt * x_t                                         # [B, C, h, w]
    if noise is None:
        return mean, x0_pred
    # posterior variance (eq. 7): beta_tilde = (1 - abar_prev) / (1 - abar_t) beta_t, clamped at 1e-20 as diffusers
    var = max((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20)
    x_prev = mean + math.sqrt(var) * noise                                     # [B, C, h, w]
    return x_prev, x0_pred


def check_eta(eta):
    """DDIM's eta lies in [0, 1]: 0 is DDIM, 1 gives sigma_t of DDPM's posterior (Song et al. 2021,
    eq. 16); above 1, sigma_t^2 can exceed 1 - abar_prev and eq. 12's square root has no value."""
    if not is_number(eta) or not 0 <= eta <= 1:
        raise InputError(f"eta must be a number in [0, 1] (0: deterministic DDIM), got {eta!r}")


def ddim_step(x_t, eps, t, t_prev, alphas_cumprod, eta=0.0, noise=None, final_alpha_cumprod=None, x0_pred=None):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12; sigma_t(eta) from eq. 16).

    t_prev < 0 means the end, whose alpha_bar is final_alpha_cumprod (default alphas_cumprod[0],
    SD's set_alpha_to_one=False). eta = 0: deterministic; eta > 0 needs noise N(0, I) like x_t.
    x0_pred: the model's own x0 estimate (v- and x0-prediction models); default derived from eps.
    Returns (x_prev, x0_pred).
    """
    check_eta(eta)
    if eta > 0 and noise is None:
        raise InputError("ddim_step with eta > 0 needs a noise array (or use sample() with rng=)")
    if final_alpha_cumprod is None:
        final_alpha_cumprod = float(alphas_cumprod[0])
    ab_t = float(alphas_cumprod[t])
    ab_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else float(final_alpha_cumprod)
    if x0_pred is None:
        # x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)             ("predicted x0" of eq. 12)
        x0_pred = (x_t - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)       # [B, C, h, w]
    # eq. 16: sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    std = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
    # eq. 12: x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t noise
    x_prev = math.sqrt(ab_prev) * x0_pred + math.sqrt(1.0 - ab_prev - std ** 2) * eps   # [B, C, h, w]
    if eta > 0:
        x_prev = x_prev + std * noise
    return x_prev, x0_pred


def scale_model_input(x, sigma):
    """The model input of the sigma-based samplers: x_t = x / sqrt(sigma^2 + 1).

    Karras' x = x0 + sigma eps is x_t / sqrt(abar_t); the UNet was trained on the variance-preserving
    x_t = sqrt(abar_t) x, and sqrt(abar_t) = 1 / sqrt(sigma^2 + 1).
    """
    return x / math.sqrt(float(sigma) ** 2 + 1.0)


def euler_step(x, eps, sigma, sigma_next, x0_pred=None):
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x0_pred) / sigma from sigma to
    sigma_next (Karras et al. 2022, eq. 3 with sigma(t) = t, s(t) = 1; Algorithm 2 without churn).
    eps is the model's output for scale_model_input(x, sigma); x0_pred, where given, the model's
    own x0 estimate (v- and x0-prediction models). Returns (x_next, x0_pred)."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if x0_pred is None:
        # x0_pred = x - sigma eps   (the denoiser D(x; sigma))
        x0_pred = x - sigma * eps                                              # [B, C, h, w]
    # d = dx/dsigma = (x - D(x; sigma)) / sigma
    d = (x - x0_pred) / sigma                                                  # [B, C, h, w]
    # x_next = x + (sigma_next - sigma) d
    x_next = x + d * (sigma_next - sigma)                                      # [B, C, h, w]
    return x_next, x0_pred


def ancestral_sigmas(sigma, sigma_next):
    """Split the step sigma -> sigma_next into a deterministic part down to sigma_down and fresh
    noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's
    get_ancestral_step with eta = 1; the sigma-space form of DDPM's ancestral step)."""
    # sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
    sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    # sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
    return sigma_down, sigma_up


def euler_ancestral_step(x, eps, sigma, sigma_next, noise, x0_pred=None):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up.
    noise N(0, I) like x (drawn even on the last step, where sigma_up = 0). Returns (x_next, x0_pred)."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    if x0_pred is None:
        x0_pred = x - sigma * eps                                              # [B, C, h, w]
    # d = (x - x0_pred) / sigma
    d = (x - x0_pred) / sigma                                                  # [B, C, h, w]
    # x_next = x + (sigma_down - sigma) d + sigma_up noise
    x_next = x + d * (sigma_down - sigma) + sigma_up * noise                   # [B, C, h, w]
    return x_next, x0_pred


def heun_predict(x, eps, sigma, sigma_next, x0_pred=None):
    """Heun, stage 1 (Karras et al. 2022, Algorithm 1, lines 4-5): the Euler step to sigma_next.

    Returns (x_euler, x0_pred, d) with d = (x - x0_pred) / sigma, the slope that stage 2 averages.
    When sigma_next == 0 (the last step) x_euler is the result and there is no stage 2.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    if x0_pred is None:
        x0_pred = x - sigma * eps                                              # [B, C, h, w]
    d = (x - x0_pred) / sigma                                                  # [B, C, h, w]
    x_euler = x + d * (sigma_next - sigma)                                     # [B, C, h, w]
    return x_euler, x0_pred, d


def heun_correct(x, d, eps_next, x_euler, sigma, sigma_next, x0_pred=None):
    """Heun, stage 2 (Algorithm 1, lines 6-8): with eps_next, the model's output at
    (scale_model_input(x_euler, sigma_next), t_next), average the two slopes and redo the step from x.
    Returns (x_next, x0_pred) where x0_pred is the estimate made at sigma_next."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if x0_pred is None:
        x0_pred = x_euler - sigma_next * eps_next                              # [B, C, h, w]
    d_next = (x_euler - x0_pred) / sigma_next                                  # [B, C, h, w]
    # x_next = x + (sigma_next - sigma) (d + d_next) / 2
    x_next = x + (d + d_next) / 2 * (sigma_next - sigma)                       # [B, C, h, w]
    return x_next, x0_pred


def vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the variance-preserving x_t = alpha_t x0 + sigma_t eps that has
    noise-to-signal ratio sigma: alpha_t = 1 / sqrt(sigma^2 + 1) = sqrt(abar), sigma_t = sigma alpha_t."""
    alpha_t = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
    return alpha_t, float(sigma) * alpha_t


def _data_prediction(x, eps, sigma, x0_pred=None):
    """The DPM-Solver++ family's data prediction at the VP state x of noise-to-signal ratio sigma:
    x0 = (x_t - sigma_t eps) / alpha_t (unless the model predicted x0 itself) -> (alpha_t, sigma_t, x0)."""
    alpha_s, sigma_s = vp_alpha_sigma(sigma)
    if x0_pred is None:
        x0_pred = (x - sigma_s * eps) / alpha_s                                # [B, C, h, w]
    return alpha_s, sigma_s, x0_pred


def dpmpp_2m_step(x, eps, sigma, sigma_next, sigma_prev=None, prev_x0=None, x0_pred=None):
    """One DPM-Solver++(2M) step on the variance-preserving x_t (Lu et al. 2022, Algorithm 2).

    x, eps [B, C, h, w] (the model sees x unscaled); sigma, sigma_next, sigma_prev: noise-to-signal
    ratios of this, the next and the previous step; prev_x0: the x0_pred the previous step returned.
    First-order (DPM-Solver++(1), i.e. DDIM) when there is no previous step or sigma_next == 0
    (diffusers' lower_order_final with its final sigma 0). Returns (x_next, x0_pred); pass x0_pred
    and sigma as prev_x0 and sigma_prev to the next step.
    """
    alpha_s, sigma_s, x0_pred = _data_prediction(x, eps, sigma, x0_pred)
    if float(sigma_next) == 0.0:
        # the limit of the update below as sigma_t -> 0 (lambda -> inf, e^-h -> 0): x_next = x0_pred
        return x0_pred, x0_pred
    alpha_t, sigma_t = vp_alpha_sigma(sigma_next)
    # lambda = log(alpha / sigma) (half the log-SNR); h = lambda_t - lambda_s
    lam_s, lam_t = math.log(alpha_s) - math.log(sigma_s), math.log(alpha_t) - math.log(sigma_t)
    h = lam_t - lam_s
    if prev_x0 is None:
        # DPM-Solver++(1): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0
        D = x0_pred
    else:
        alpha_p, sigma_p = vp_alpha_sigma(sigma_prev)
        lam_p = math.log(alpha_p) - math.log(sigma_p)
        r = (lam_s - lam_p) / h                                                # r = h_prev / h
        # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev = x0 + (x0 - x0_prev) / (2r)
        D = x0_pred + 0.5 * (1.0 / r) * (x0_pred - prev_x0)                    # [B, C, h, w]
    # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D
    x_next = (sigma_t / sigma_s) * x - (alpha_t * (math.exp(-h) - 1.0)) * D    # [B, C, h, w]
    return x_next, x0_pred


def x0_from_eps(x_t, eps, alpha_bar):
    """x0_pred = (x_t - sqrt(1 - abar) eps) / sqrt(abar): DDPM eq. 4 solved for x0 (eq. 15)."""
    ab = float(alpha_bar)
    return (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)                  # [B, C, h, w]


def model_output_to_eps(output, x_t, alpha_bar, prediction_type="epsilon"):
    """The model's output as (eps, x0_pred) for the variance-preserving input x_t = sqrt(abar) x0 +
    sqrt(1 - abar) eps. x0_pred is None for "epsilon" (each step derives it from eps, as before);
    for the others both come straight from the output, so that x0 stays exact where abar = 0.

    v_prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D):
        v = sqrt(abar) eps - sqrt(1 - abar) x0, so eps = sqrt(abar) v + sqrt(1 - abar) x_t and
        x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    sample: the output is x0, and eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    """
    if prediction_type == "epsilon":
        return output, None
    a, s = math.sqrt(float(alpha_bar)), math.sqrt(1.0 - float(alpha_bar))
    if prediction_type == "v_prediction":
        return a * output + s * x_t, a * x_t - s * output                      # [B, C, h, w] x 2
    if prediction_type == "sample":
        return (x_t - a * output) / s, output
    raise InputError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")


# --- PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") ---------

# Adams-Bashforth coefficients with 1..4 points, newest first: PLMS's combination of eps
PLMS_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def pndm_transfer(x_t, eps, t, t_prev, alphas_cumprod, final_alpha_cumprod=1.0):
    """PNDM's transfer part phi(x_t, eps, t, t_prev) (Liu et al. 2022, eq. 9): the step from t to
    t_prev along the DDIM trajectory of the noise estimate eps (it equals DDIM with eta = 0).
    t_prev < 0 means the end, whose alpha_bar is final_alpha_cumprod. Returns x_prev [B, C, h, w]."""
    ab_t = float(alphas_cumprod[t])
    ab_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else float(final_alpha_cumprod)
    # eq. 9: x_prev = sqrt(abar_prev / abar_t) x_t - (abar_prev - abar_t) eps
    #                 / (abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev))
    denom = ab_t * math.sqrt(1.0 - ab_prev) + math.sqrt(ab_t * (1.0 - ab_t) * ab_prev)
    return math.sqrt(ab_prev / ab_t) * x_t - ((ab_prev - ab_t) / denom) * eps


def plms_eps(eps, prev_eps=()):
    """PLMS's gradient part (Liu et al. 2022's pseudo linear multi-step method): the 4-step
    Adams-Bashforth combination of this step's eps and up to 3 earlier ones (prev_eps, oldest
    first), e.g. with 3: eps' = (55 eps - 59 eps_-1 + 37 eps_-2 - 9 eps_-3) / 24."""
    c = PLMS_COEFFICIENTS[len(prev_eps)]
    e = c[0] * eps                                                             # [B, C, h, w]
    for cj, ej in zip(c[1:], reversed(prev_eps)):
        e = e + cj * ej
    return e


def plms_step(x_t, eps, t, t_prev, alphas_cumprod, prev_eps=(), final_alpha_cumprod=1.0):
    """One PLMS step x_t -> x_{t_prev}: phi(x_t, plms_eps(eps, prev_eps), t, t_prev).

    prev_eps: the eps of up to 3 earlier steps, oldest first (fewer at the start: the lower-order
    Adams-Bashforth formulas, as diffusers). Returns (x_prev, x0_pred) with x0_pred from this eps.
    """
    x_prev = pndm_transfer(x_t, plms_eps(eps, prev_eps), t, t_prev, alphas_cumprod, final_alpha_cumprod)
    return x_prev, x0_from_eps(x_t, eps, alphas_cumprod[t])


def prk_eps(eps1, eps2, eps3, eps4):
    """PNDM's Runge-Kutta gradient part (Liu et al. 2022, PRK): eps' = (e1 + 2 e2 + 2 e3 + e4) / 6."""
    return (eps1 + 2.0 * eps2 + 2.0 * eps3 + eps4) / 6.0


# --- LMS (k-diffusion's sample_lms; diffusers' LMSDiscreteScheduler) ------------------------------

def _lagrange_basis(nodes, j):
    """ell_j(tau) = prod_{k != j} (tau - nodes[k]) / (nodes[j] - nodes[k]), a numpy Polynomial."""
    others = [s for k, s in enumerate(nodes) if k != j]
    if not others:
        return np.polynomial.Polynomial([1.0])
    return np.polynomial.Polynomial.fromroots(others) / math.prod(nodes[j] - s for s in others)


def lms_coefficients(sigmas, i, order):
    """The linear multistep weights of step i: c_j = integral from sigma_i to sigma_{i+1} of
    ell_j(sigma) d sigma, ell_j the Lagrange basis on sigma_i, sigma_{i-1}, .., sigma_{i-order+1}
    (j = 0 is this step). Integrated exactly (float64); diffusers uses scipy.integrate.quad."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    coeffs = []
    for j in range(order):
        F = _lagrange_basis(nodes, j).integ()                                  # antiderivative
        coeffs.append(float(F(b) - F(a)))
    return coeffs


def lms_step(x, eps, sigmas, i, prev_derivatives=(), order=4, x0_pred=None):
    """One LMS step from sigmas[i] to sigmas[i + 1] in Karras' variable: the probability-flow ODE
    dx/dsigma = d(x, sigma) integrated over the polynomial that interpolates the slopes of this and
    up to order - 1 earlier steps (prev_derivatives, oldest first):

        x_{i+1} = x_i + sum_j c_j d_{i-j},   c_j = lms_coefficients(sigmas, i, k),  k = min(i + 1, order)

    The order k comes from the step index i, as in diffusers' LMSDiscreteScheduler, and the sum runs
    over the slopes there are. From step 0 (txt2img) there are always k of them; diffusers' img2img
    pipeline starts LMS at step t_start (its begin_index) with no slopes, so its first steps use
    the weights of order min(i + 1, 4) on fewer slopes (the first only c_0 d_i).
    eps: the model's output for scale_model_input(x, sigmas[i]). Returns (x_next, x0_pred, d); pass
    d on in prev_derivatives.
    """
    sigma = float(sigmas[i])
    if x0_pred is None:
        # x0_pred = x - sigma eps   (the denoiser D(x; sigma))
        x0_pred = x - sigma * eps                                              # [B, C, h, w]
    # d = dx/dsigma = (x - x0_pred) / sigma
    d = (x - x0_pred) / sigma                                                  # [B, C, h, w]
    history = (list(prev_derivatives) + [d])[-order:]                          # oldest first
    # diffusers: order = min(step_index + 1, 4) with the index in the whole schedule (see above)
    coeffs = lms_coefficients(sigmas, i, min(i + 1, order))
    x_next = x
    for c, dj in zip(coeffs, reversed(history)):                               # d_i, d_{i-1}, .. (zip: those there are)
        x_next = x_next + c * dj                                               # [B, C, h, w]
    return x_next, x0_pred, d


# --- DPM++ 2M SDE (Lu et al. 2022b, "DPM-Solver++", its SDE variant) ------------------------------

def half_log_snr(sigma):
    """lambda = log(alpha_t / sigma_t) = -log(sigma) for the noise-to-signal ratio sigma."""
    return -math.log(float(sigma))


def dpmpp_2m_sde_step(x, eps, sigma, sigma_next, noise, sigma_prev=None, prev_x0=None, x0_pred=None):
    """One SDE-DPM-Solver++(2M) step on the variance-preserving x_t (Lu et al. 2022b; diffusers'
    algorithm_type="sde-dpmsolver++" with its "midpoint" solver_type, k-diffusion's
    sample_dpmpp_2m_sde): the exact solution of the linear part of the reverse SDE, with the data
    prediction extrapolated from two steps as in DPM-Solver++(2M), and fresh noise.

    noise: N(0, I) like x (drawn on every step; unused on the last, where x_next = x0_pred).
    First-order when there is no previous step. Returns (x_next, x0_pred).
    """
    alpha_s, sigma_s, x0_pred = _data_prediction(x, eps, sigma, x0_pred)
    if float(sigma_next) == 0.0:
        # the limit of the update below as sigma_t -> 0 (lambda -> inf, e^-h -> 0): x_next = x0_pred
        return x0_pred, x0_pred
    alpha_t, sigma_t = vp_alpha_sigma(sigma_next)
    h = half_log_snr(sigma_next) - half_log_snr(sigma)                         # lambda_t - lambda_s
    D = x0_pred
    if prev_x0 is not None:
        r = (half_log_snr(sigma) - half_log_snr(sigma_prev)) / h               # r = h_prev / h
        # D = x0 + (x0 - x0_prev) / (2r)   (the 2M extrapolation, as in dpmpp_2m_step)
        D = x0_pred + 0.5 * (1.0 / r) * (x0_pred - prev_x0)                    # [B, C, h, w]
    # x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z
    x_next = ((sigma_t / sigma_s * math.exp(-h)) * x + (alpha_t * -math.expm1(-2.0 * h)) * D
              + (sigma_t * math.sqrt(-math.expm1(-2.0 * h))) * noise)          # [B, C, h, w]
    return x_next, x0_pred


# --- UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework") -------------------

def _unipc_update(x, x0_s, sigma_s, sigma_t, diffs, rks, x0_t=None):
    """The UniPC update from sigma_s to sigma_t with data prediction and B(h) = e^h - 1 in the
    variable -h ("bh2"), as diffusers' UniPCMultistepScheduler:

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_s - alpha_t B(h) sum_k rho_k D_k

    diffs D_k = (x0_{s_k} - x0_s) / r_k of earlier points with r_k = (lambda_{s_k} - lambda_s) / h.
    Predictor (x0_t None): rho = 1/2 for one earlier point (UniP-2), none for UniP-1 (DDIM).
    Corrector (x0_t, the model's estimate at the new point; D = x0_t - x0_s with r = 1): the rho
    that make the update exact for polynomials of x0 in lambda up to order p (solve R rho = b),
    rho = 1/2 for p = 1 (UniC-1).
    """
    alpha_t, sig_t = vp_alpha_sigma(sigma_t)
    _, sig_s = vp_alpha_sigma(sigma_s)
    hh = -(half_log_snr(sigma_t) - half_log_snr(sigma_s))                      # -h
    h_phi_1 = math.expm1(hh)                                                   # e^-h - 1
    B_h = math.expm1(hh)                                                       # bh2: B(h) = e^-h - 1
    # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_s
    x_t = (sig_t / sig_s) * x - (alpha_t * h_phi_1) * x0_s                     # [B, C, h, w]
    if x0_t is None:
        if not diffs:
            return x_t                                                         # UniP-1
        rhos = [0.5]                                                           # UniP-2
    else:
        diffs, rks = list(diffs) + [x0_t - x0_s], list(rks) + [1.0]
        p = len(rks)
        if p == 1:
            rhos = [0.5]                                                       # UniC-1
        else:
            # R[k, j] = r_j^k, b_k = k! h phi_{k+1}(h) / B(h)  (k = 0..p-1), in the variable -h
            R = np.array([[r ** k for r in rks] for k in range(p)], dtype=np.float64)
            b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
            for k in range(1, p + 1):
                b.append(h_phi_k * fact / B_h)
                fact *= k + 1
                h_phi_k = h_phi_k / hh - 1.0 / fact
            rhos = list(np.linalg.solve(R, np.array(b)))
    res = sum(float(rho) * D for rho, D in zip(rhos, diffs))                   # [B, C, h, w]
    # x_t -= alpha_t B(h) sum_k rho_k D_k
    return x_t - (alpha_t * B_h) * res


def unipc_predict(x, x0_pred, sigma, sigma_next, prev_x0=None, sigma_prev=None):
    """UniP (Zhao et al. 2023): the predictor from sigma to sigma_next with this step's data
    prediction x0_pred and, for order 2, the previous step's (prev_x0 at sigma_prev). First-order
    (= DPM-Solver++(1)) without one; diffusers also uses first order on the last step. At
    sigma_next = 0 the update is x0_pred. Returns x_next."""
    if float(sigma_next) == 0.0:
        return x0_pred
    diffs, rks = [], []
    if prev_x0 is not None:
        h = half_log_snr(sigma_next) - half_log_snr(sigma)
        r = (half_log_snr(sigma_prev) - half_log_snr(sigma)) / h               # r_1 = -h_prev / h
        diffs, rks = [(prev_x0 - x0_pred) / r], [r]                            # D_1
    return _unipc_update(x, x0_pred, sigma, sigma_next, diffs, rks)


def unipc_correct(x_prev, x0_prev, x0_pred, sigma_prev, sigma, prev2_x0=None, sigma_prev2=None):
    """UniC (Zhao et al. 2023): correct the predicted x at sigma with the model's estimate x0_pred
    there, redoing the step from x_prev (the previous corrected x, at sigma_prev, with estimate
    x0_prev); order 2 also uses the estimate of the step before (prev2_x0 at sigma_prev2), as
    diffusers does when the previous predictor was second-order. Returns the corrected x at sigma."""
    diffs, rks = [], []
    if prev2_x0 is not None:
        h = half_log_snr(sigma) - half_log_snr(sigma_prev)
        r = (half_log_snr(sigma_prev2) - half_log_snr(sigma_prev)) / h
        diffs, rks = [(prev2_x0 - x0_prev) / r], [r]
    return _unipc_update(x_prev, x0_prev, sigma_prev, sigma, diffs, rks, x0_t=x0_pred)


# --- DPM2 and DPM2 ancestral (k-diffusion's sample_dpm_2 / sample_dpm_2_ancestral) ----------------

def dpm2_sigma_mid(sigma, sigma_next, ancestral=False):
    """The midpoint noise level of a DPM2 step: sigma_mid = exp((log sigma + log sigma_target) / 2)
    = sqrt(sigma sigma_target), halfway in log sigma (DPM-Solver-2's r = 1/2); the target is
    sigma_next, or sigma_down for the ancestral sampler. 0 when the target is 0 (the last step)."""
    target = ancestral_sigmas(float(sigma), float(sigma_next))[0] if ancestral else float(sigma_next)
    return math.sqrt(float(sigma) * target)


def dpm2_predict(x, eps, sigma, sigma_mid, x0_pred=None):
    """DPM2, stage 1: an Euler step from sigma to sigma_mid. Returns (x_mid, x0_pred); when
    sigma_mid == 0 (the last step) x_mid is the result and there is no stage 2."""
    sigma, sigma_mid = float(sigma), float(sigma_mid)
    if x0_pred is None:
        x0_pred = x - sigma * eps                                              # [B, C, h, w]
    # d = (x - x0_pred) / sigma;  x_mid = x + (sigma_mid - sigma) d
    d = (x - x0_pred) / sigma                                                  # [B, C, h, w]
    return x + d * (sigma_mid - sigma), x0_pred


def dpm2_correct(x, eps_mid, x_mid, sigma, sigma_mid, sigma_next, x0_mid=None):
    """DPM2, stage 2: with eps_mid, the model's output at (scale_model_input(x_mid, sigma_mid),
    t(sigma_mid)), redo the whole step from x with the midpoint's slope (the midpoint rule, as
    DPM-Solver-2 and Karras et al. 2022, Algorithm 2). For the ancestral sampler sigma_next is
    sigma_down, and its noise is added after. Returns (x_next, x0_pred at the midpoint)."""
    sigma, sigma_mid, sigma_next = float(sigma), float(sigma_mid), float(sigma_next)
    if x0_mid is None:
        x0_mid = x_mid - sigma_mid * eps_mid                                   # [B, C, h, w]
    # d_mid = (x_mid - x0_mid) / sigma_mid;  x_next = x + (sigma_next - sigma) d_mid
    d_mid = (x_mid - x0_mid) / sigma_mid                                       # [B, C, h, w]
    return x + d_mid * (sigma_next - sigma), x0_mid


# --- DPM++ 2S ancestral (k-diffusion's sample_dpmpp_2s_ancestral, A1111's "DPM++ 2S a") ------------

def dpmpp_2s_correct(x, eps_mid, x_mid, sigma, sigma_mid, sigma_next, x0_mid=None):
    """DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1 with r = 1/2), stage 2. Stage 1 is dpm2_predict:
    in Karras' variable DPM-Solver++'s first-order step to sigma_mid, x_mid = (sigma_mid / sigma) x +
    (1 - sigma_mid / sigma) x0, is the Euler step there. Stage 2 takes the whole step from x with the
    midpoint's data prediction x0_mid, the model's at (scale_model_input(x_mid, sigma_mid),
    t(sigma_mid)): x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) x0_mid, where DPM2
    (dpm2_correct) steps along the midpoint's slope instead. For the ancestral sampler sigma_next is
    sigma_down, and its noise is added after. Returns (x_next, x0_pred at the midpoint)."""
    sigma, sigma_mid, sigma_next = float(sigma), float(sigma_mid), float(sigma_next)
    if x0_mid is None:
        x0_mid = x_mid - sigma_mid * eps_mid                                   # [B, C, h, w]
    # x_next = x + (1 - sigma_next / sigma) (x0_mid - x)
    return x + (1.0 - sigma_next / sigma) * (x0_mid - x), x0_mid


# --- DPM++ SDE (k-diffusion's sample_dpmpp_sde, A1111's "DPM++ SDE") -------------------------------

def dpmpp_sde_stage(x, x0, sigma, sigma_to, noise):
    """One stage of the stochastic DPM-Solver++ (k-diffusion's sample_dpmpp_sde with eta = 1, r = 1/2):
    the move from sigma to sigma_to split as in Euler a (ancestral_sigmas): DPM-Solver++'s first-order
    step towards the data prediction x0, down to sigma_down, then fresh noise of std sigma_up.
    Stage 1 goes to sigma_mid = sqrt(sigma sigma_next) with the step's own x0; stage 2, from the same
    x, to sigma_next with the x0 the model gives at the midpoint. noise: N(0, I) like x."""
    sigma, sigma_to = float(sigma), float(sigma_to)
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_to)
    # x_down = x + (1 - sigma_down / sigma) (x0 - x);  x_to = x_down + sigma_up noise
    return x + (1.0 - sigma_down / sigma) * (x0 - x) + sigma_up * noise


# --- DPM++ 3M SDE (k-diffusion's sample_dpmpp_3m_sde, A1111's "DPM++ 3M SDE") ---------------------

def dpmpp_3m_sde_step(x, x0, sigma, sigma_next, noise, earlier=()):
    """One step of the third-order multistep SDE DPM-Solver++ (k-diffusion's sample_dpmpp_3m_sde with
    eta = 1), in Karras' variable. With h = log(sigma / sigma_next) (the step in lambda = -log sigma),
    the exact solution of the SDE's linear part with the data prediction held constant,
        x' = e^-2h x + (1 - e^-2h) x0 + sigma_next sqrt(1 - e^-2h) z,
    is corrected by the first and second divided differences of the data predictions of this and
    the earlier steps (a quadratic in lambda), weighted by phi_2 = (e^-2h - 1) / 2h + 1 and
    phi_3 = phi_2 / 2h - 1/2. earlier: [(x0, h), ...] of the previous steps, newest first; with one
    the correction is first-order, with none there is none. noise: N(0, I) like x."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    h = math.log(sigma / sigma_next)
    h_eta = 2.0 * h                                                            # h (eta + 1), eta = 1
    x_next = math.exp(-h_eta) * x + -math.expm1(-h_eta) * x0                    # [B, C, h, w]
    phi_2 = math.expm1(-h_eta) / h_eta + 1.0
    if len(earlier) >= 2:
        (x0_1, h_1), (x0_2, h_2) = earlier[:2]
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (x0 - x0_1) / r0                                                # divided differences
        d1_1 = (x0_1 - x0_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x_next = x_next + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
    elif earlier:
        x0_1, h_1 = earlier[0]
        x_next = x_next + phi_2 * ((x0 - x0_1) / (h_1 / h))
    # fresh noise: sigma_next sqrt(1 - e^-2h) z
    return x_next + (sigma_next * math.sqrt(-math.expm1(-2.0 * h))) * noise


# --- DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator") ----

def _deis_coefficient(rho_s, rho_t, nodes, j):
    """integral from rho_s to rho_t of ell_j(log rho) d rho, ell_j the Lagrange basis in
    u = log rho on the nodes log rho_k. With rho = e^u: integral of P(u) e^u du =
    e^u (P - P' + P'' - ...), exact for the polynomial P = ell_j."""
    P = _lagrange_basis([math.log(r) for r in nodes], j)

    def F(rho):                                                                # antiderivative in rho
        if rho == 0.0:
            return 0.0                                                         # e^u P(u) -> 0 as u -> -inf
        u, total, Q, sign = math.log(rho), 0.0, P, 1.0
        while True:
            total += sign * Q(u)
            if Q.degree() == 0:
                break
            Q, sign = Q.deriv(), -sign
        return rho * total
    return F(float(rho_t)) - F(float(rho_s))


def deis_step(x, eps, sigma, sigma_next, prev_sigmas=(), prev_eps=()):
    """One DEIS step (rho-AB-DEIS, the "logrho" solver of diffusers' DEISMultistepScheduler) on the
    variance-preserving x_t. In Karras' variable x_t / alpha_t = x0 + rho eps (rho = sigma) the ODE
    is d(x_t / alpha_t) / d rho = eps, integrated over the polynomial in log rho through this
    step's eps and the earlier ones (prev_eps at prev_sigmas, oldest first):

        x_next = alpha_next (x_t / alpha_t + sum_j c_j eps_j),  c_j = integral of ell_j(log rho) d rho

    Returns (x_next, x0_pred).
    """
    if len(prev_sigmas) != len(prev_eps):
        raise ValueError(f"deis_step: {len(prev_sigmas)} prev_sigmas for {len(prev_eps)} prev_eps")
    alpha_s, sigma_s = vp_alpha_sigma(sigma)
    alpha_t, _ = vp_alpha_sigma(sigma_next)
    nodes = [float(sigma)] + [float(s) for s in reversed(prev_sigmas)]        # newest first
    epss = [eps] + list(reversed(prev_eps))
    x_hat = x / alpha_s                                                        # x_t / alpha_t [B, C, h, w]
    for j, e in enumerate(epss):
        x_hat = x_hat + _deis_coefficient(sigma, sigma_next, nodes, j) * e
    return alpha_t * x_hat, (x - sigma_s * eps) / alpha_s


# --- LCM (Luo et al. 2023, "Latent Consistency Models") -------------------------------------------

LCM_SIGMA_DATA = 0.5            # the consistency models' sigma_data (diffusers' LCMScheduler)
LCM_TIMESTEP_SCALING = 10.0     # diffusers' timestep_scaling: c_skip and c_out see 10 t


def lcm_scalings(t, timestep_scaling=LCM_TIMESTEP_SCALING):
    """The consistency function's boundary-condition scalings (Song et al. 2023, "Consistency
    Models", sec. 3; as diffusers' LCMScheduler with its timestep_scaling): with s = 10 t,
    c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 + sigma_data^2), so that
    f(x, 0) = x. Returns (c_skip, c_out)."""
    st = float(t) * timestep_scaling
    return LCM_SIGMA_DATA ** 2 / (st ** 2 + LCM_SIGMA_DATA ** 2), st / math.sqrt(st ** 2 + LCM_SIGMA_DATA ** 2)


def lcm_step(x_t, eps, t, t_next, alphas_cumprod, noise=None, x0_pred=None):
    """One step of multistep latent consistency sampling (Luo et al. 2023, after Song et al. 2023's
    multistep consistency sampling, their Algorithm 1): the consistency function's estimate f(x_t, t) = c_skip x_t + c_out x0_pred, then (except on the last
    step: t_next < 0 or noise None) fresh noise to timestep t_next:
    x_next = sqrt(abar_next) f + sqrt(1 - abar_next) noise. Returns (x_next, f)."""
    if x0_pred is None:
        x0_pred = x0_from_eps(x_t, eps, alphas_cumprod[t])                     # [B, C, h, w]
    c_skip, c_out = lcm_scalings(t)
    # f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred
    denoised = c_out * x0_pred + c_skip * x_t                                  # [B, C, h, w]
    if noise is None or t_next < 0:
        return denoised, denoised
    ab_next = float(alphas_cumprod[t_next])
    # x_next = sqrt(abar_next) f + sqrt(1 - abar_next) z
    return math.sqrt(ab_next) * denoised + math.sqrt(1.0 - ab_next) * noise, denoised


# ---------------------------------------------------------------------------------------------
# The sampling loop
# ---------------------------------------------------------------------------------------------

def sample(model, x, schedule, *, rng=None, noises=None, callback=None, start_index=0, eta=0.0,
           between_stages=None, noise_sampler=None, edit_x0=None):
    """Run a sampler from step start_index to the end; return the final latents (float32).

    model(x_in, t) -> the model's output for the model input x_in at timestep t: the noise
        prediction eps, or v / x0 per schedule.prediction_type (converted here to eps and x0 for the
        VP x_in). A pipeline wraps UNet + text context + classifier-free guidance in this closure
        (see npsd.guidance). The loop calls it with x_in = scale_model_input(x, sigma) for the
        samplers in KARRAS_VARIABLE and with x itself for the others; t is schedule.timesteps[i] (a
        NumPy scalar), or another timestep of the schedule for a stage inside a step (heun at
        timesteps[i + 1], dpm2, dpm2_a, dpmpp_2s_a and dpmpp_sde at mid_timesteps[i], pndm's first
        step at the two timesteps of pndm_start(schedule, start_index), its Runge-Kutta warm-up at
        mid_timesteps[i] and timesteps[i + 1]).
    x: the state at step start_index in the sampler's own variable: for txt2img
        N(0, I) * schedule.init_noise_sigma (as diffusers' pipelines multiply their latents); for
        img2img noise_at_start(schedule, x0, noise, start_index).
    rng: np.random.Generator (or any object with the same standard_normal method) for the
        stochastic samplers. Each draw is rng.standard_normal(x.shape, dtype=np.float32), one per
        step that needs noise, in step order, where diffusers draws:
            ddpm          every step with t > 0
            ddim          every step, when eta > 0
            euler_a       every step (also the last, where the noise is multiplied by 0)
            dpmpp_2m_sde  every step (also the last, where it is not used)
            dpm2_a        every step but the last (after the step's second model evaluation)
            dpmpp_2s_a    the same as dpm2_a
            dpmpp_sde     two on every step but the last (before each model evaluation's step),
                          or noise_sampler's
            dpmpp_3m_sde  every step but the last, or noise_sampler's
            lcm           every step but the last
        The other samplers (euler, heun, dpmpp_2m, pndm, lms, unipc, dpm2, deis, ddim with eta 0)
        draw nothing.
    noises: instead of rng, the same draws as a list of arrays, used in that order (tests inject
        the reference's noise this way).
    noise_sampler(sigma, sigma_next) -> N(0, I) like x: the step noise of dpmpp_2m_sde, dpmpp_sde and
        dpmpp_3m_sde instead of draws, asked for on every step but the last, dpmpp_sde's for (sigma_i, sigma_mid)
        and (sigma_i, sigma_{i+1}) (k-diffusion's noise_sampler; npsd.brownian.BrownianNoise is the
        Brownian tree A1111 gives them).
    callback(i, t, x, x0_pred): called after every step i with the new x and the x0 estimate of the
        step's last model evaluation (for lcm, the consistency function's estimate); if it returns an
        array, that array replaces x (inpainting re-imposes the known region so).
    eta: DDIM's eta (Song et al. eq. 16); 0 is deterministic. The other samplers ignore it.
    between_stages(i, x_mid): called inside the steps that evaluate the model twice (heun at its
        Euler point, dpm2, dpm2_a, dpmpp_2s_a and dpmpp_sde at the midpoint, pndm's improved-Euler
        first step) with the intermediate state before the second evaluation, which is at the noise
        level of step i + 1
        (pndm's part-way start: at step start_index's, and i = start_index - 1 is passed); if it
        returns an array, that array replaces it (diffusers' inpainting re-imposes the known region,
        noised to that level, after every scheduler call).
    edit_x0(x0_pred) -> x0: replaces the x0 estimate of every model evaluation, and eps with the
        one that gives it, eps = (x_in - sqrt(abar) x0) / sqrt(1 - abar) (A1111's inpainting blends
        the denoised latents with the image's so: npsd/a1111_inpaint.py).

    Multistep samplers (dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, pndm, lms, unipc, deis) keep their memory of earlier
    steps inside this loop, from start_index on: an img2img run starts them at first order, except
    that lms takes its weights' order from the step index (lms_step) and pndm starts one step early
    (pndm_start), as diffusers' img2img pipeline runs them.
    """
    s = check_sampler(schedule.sampler)
    n = schedule.num_inference_steps
    if not 0 <= start_index < n:
        raise InputError(f"start_index must be in 0..{n - 1} for {n} steps, got {start_index}")
    check_eta(eta)
    if s == "pndm" and not schedule.skip_prk_steps and n - start_index < 4:
        raise InputError(f"pndm's Runge-Kutta warm-up needs at least 4 steps to run, got {n - start_index}")
    stochastic = s in ("ddpm", "euler_a", "dpmpp_2m_sde", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_3m_sde",
                       "lcm") or (s == "ddim" and eta > 0)
    if noise_sampler is not None and s not in NOISE_SAMPLER_SAMPLERS:
        raise InputError(f"a noise sampler (Brownian noise) applies to {', '.join(NOISE_SAMPLER_SAMPLERS)}, "
                         f"not to {s!r}")
    if stochastic and rng is None and noises is None and noise_sampler is None:
        raise InputError(f"sampler {s!r} adds fresh noise at each step: "
                         "pass rng=np.random.default_rng(seed) or noises=")
    draws = iter(noises) if noises is not None else None

    def draw():
        if draws is not None:
            try:
                return np.asarray(next(draws), dtype=np.float32)
            except StopIteration:
                raise InputError("noises= ran out: pass one array per noisy step") from None
        return rng.standard_normal(x.shape, dtype=np.float32)

    x = np.asarray(x, dtype=np.float32)
    ts, sig, ac, prev_ts = schedule.timesteps, schedule.sigmas, schedule.alphas_cumprod, schedule.prev_timesteps
    final_ac = schedule.final_alpha_cumprod

    def predict(x_i, t, sigma=None):
        """The model at state x_i (the sampler's variable) and timestep t -> (eps, x0 or None).
        sigma: the noise-to-signal ratio of x_i for sigma-based samplers; else alpha_bar[t] is used."""
        if sigma is None:
            x_in, abar = x_i, float(ac[int(t)])
        else:
            x_in = scale_model_input(x_i, sigma) if s in KARRAS_VARIABLE else x_i
            abar = 1.0 / (float(sigma) ** 2 + 1.0)
        eps, x0 = model_output_to_eps(model(x_in, t), x_in, abar, schedule.prediction_type)
        if edit_x0 is None:
            return eps, x0
        x0 = edit_x0(x0_from_eps(x_in, eps, abar) if x0 is None else x0)
        return (x_in - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar), x0

    def staged(i, x_mid):
        replaced = between_stages(i, x_mid) if between_stages is not None else None
        return x_mid if replaced is None else np.asarray(replaced, dtype=np.float32)

    hist = []               # multistep memory, oldest first: eps (pndm), slopes d (lms), x0 (dpm++, unipc),
    hist_sigmas = []        # (sigma, eps) (deis); and the sigmas they were made at
    x_last = None           # UniPC: the previous step's corrected x
    for i in range(start_index, n):
        t = ts[i]
        last = i == n - 1
        if s == "ddpm":
            eps, x0 = predict(x, t)                                            # [B, 4, h, w]
            noise = draw() if t > 0 else None
            x_prev, x0_pred = ddpm_step(x, eps, int(t), int(prev_ts[i]), ac, noise, x0_pred=x0)
        elif s == "ddim":
            eps, x0 = predict(x, t)
            noise = draw() if eta > 0 else None
            x_prev, x0_pred = ddim_step(x, eps, int(t), int(prev_ts[i]), ac, eta, noise, final_ac, x0_pred=x0)
        elif s == "pndm":
            x_prev, x0_pred, eps = _pndm_step(predict, x, i, i - start_index, schedule, hist, staged)
            hist = (hist + [eps])[-3:]
        elif s == "lcm":
            eps, x0 = predict(x, t)
            noise = draw() if not last else None
            x_prev, x0_pred = lcm_step(x, eps, int(t), int(prev_ts[i]), ac, noise, x0_pred=x0)
        elif s == "euler":
            eps, x0 = predict(x, t, sig[i])
            x_prev, x0_pred = euler_step(x, eps, sig[i], sig[i + 1], x0_pred=x0)
        elif s == "euler_a":
            eps, x0 = predict(x, t, sig[i])
            noise = draw()
            x_prev, x0_pred = euler_ancestral_step(x, eps, sig[i], sig[i + 1], noise, x0_pred=x0)
        elif s == "heun":
            eps, x0 = predict(x, t, sig[i])
            x_euler, x0_pred, d = heun_predict(x, eps, sig[i], sig[i + 1], x0_pred=x0)
            if sig[i + 1] > 0:
                # second model evaluation at the Euler point: noise level sigma_{i+1}, timestep t_{i+1}
                x_euler = staged(i, x_euler)
                t_next = ts[i + 1] if i + 1 < n else schedule.final_timestep
                eps_next, x0_next = predict(x_euler, t_next, sig[i + 1])
                x_prev, x0_pred = heun_correct(x, d, eps_next, x_euler, sig[i], sig[i + 1], x0_pred=x0_next)
            else:
                x_prev = x_euler
        elif s == "lms":
            eps, x0 = predict(x, t, sig[i])
            x_prev, x0_pred, d = lms_step(x, eps, sig, i, hist, x0_pred=x0)
            hist = (hist + [d])[-3:]
        elif s in ("dpm2", "dpm2_a", "dpmpp_2s_a"):
            eps, x0 = predict(x, t, sig[i])
            ancestral = s != "dpm2"
            sigma_mid = dpm2_sigma_mid(sig[i], sig[i + 1], ancestral)
            x_mid, x0_pred = dpm2_predict(x, eps, sig[i], sigma_mid, x0_pred=x0)
            x_prev = x_mid
            if sigma_mid > 0:
                # second model evaluation at the midpoint: noise level sigma_mid, timestep mid_timesteps[i]
                x_mid = staged(i, x_mid)
                eps_mid, x0_mid = predict(x_mid, schedule.mid_timesteps[i], sigma_mid)
                sigma_down, sigma_up = ancestral_sigmas(float(sig[i]), float(sig[i + 1])) if ancestral \
                    else (float(sig[i + 1]), 0.0)
                correct = dpmpp_2s_correct if s == "dpmpp_2s_a" else dpm2_correct
                x_prev, x0_pred = correct(x, eps_mid, x_mid, sig[i], sigma_mid, sigma_down, x0_mid=x0_mid)
                if ancestral:
                    # fresh noise of std sigma_up (k-diffusion's sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral)
                    x_prev = x_prev + sigma_up * draw()
        elif s in ("dpmpp_sde", "dpmpp_3m_sde"):
            eps, x0 = predict(x, t, sig[i])
            x0_pred = x - sig[i] * eps if x0 is None else x0                  # the denoiser D(x; sigma)
            noise = noise_sampler or (lambda sigma, sigma_to: draw())
            if sig[i + 1] == 0:
                x_prev = x0_pred                                               # the last step, to sigma 0
            elif s == "dpmpp_3m_sde":
                x_prev = dpmpp_3m_sde_step(x, x0_pred, sig[i], sig[i + 1], noise(sig[i], sig[i + 1]), hist)
                hist = [(x0_pred, math.log(float(sig[i]) / float(sig[i + 1])))] + hist[:1]
            else:
                # stage 1 to the midpoint sigma_mid = sqrt(sigma_i sigma_{i+1}), where the model looks again
                sigma_mid = dpm2_sigma_mid(sig[i], sig[i + 1])
                x_mid = dpmpp_sde_stage(x, x0_pred, sig[i], sigma_mid, noise(sig[i], sigma_mid))
                x_mid = staged(i, x_mid)
                eps_mid, x0_mid = predict(x_mid, schedule.mid_timesteps[i], sigma_mid)
                x0_pred = x_mid - sigma_mid * eps_mid if x0_mid is None else x0_mid
                # stage 2: the whole step from x with the midpoint's data prediction
                x_prev = dpmpp_sde_stage(x, x0_pred, sig[i], sig[i + 1], noise(sig[i], sig[i + 1]))
        elif s in ("dpmpp_2m", "dpmpp_2m_sde"):
            eps, x0 = predict(x, t, sig[i])
            prev_x0, sigma_prev = (hist[-1], sig[i - 1]) if hist else (None, None)
            if s == "dpmpp_2m":
                x_prev, x0_pred = dpmpp_2m_step(x, eps, sig[i], sig[i + 1], sigma_prev, prev_x0, x0_pred=x0)
            else:
                if noise_sampler is None:
                    noise = draw()
                else:                                                          # none on the last step
                    noise = noise_sampler(sig[i], sig[i + 1]) if sig[i + 1] > 0 else None
                x_prev, x0_pred = dpmpp_2m_sde_step(x, eps, sig[i], sig[i + 1], noise, sigma_prev, prev_x0,
                                                    x0_pred=x0)
            hist = [x0_pred]
        elif s == "unipc":
            eps, x0_pred = predict(x, t, sig[i])
            if x0_pred is None:
                alpha_s, sigma_s = vp_alpha_sigma(sig[i])
                x0_pred = (x - sigma_s * eps) / alpha_s                        # data prediction
            if x_last is not None:
                # UniC: correct this step's x with the estimate just made here
                x = unipc_correct(x_last, hist[-1], x0_pred, sig[i - 1], sig[i],
                                  *((hist[-2], sig[i - 2]) if len(hist) == 2 else ()))
            # UniP: predict the next x (second-order from the second step on, first-order on the last)
            x_prev = unipc_predict(x, x0_pred, sig[i], sig[i + 1],
                                   *((hist[-1], sig[i - 1]) if hist and not last else ()))
            x_last, hist = x, (hist + [x0_pred])[-2:]
        else:                                                                  # deis
            eps, _ = predict(x, t, sig[i])
            # second order (diffusers' solver_order=2); the last step is first-order when n < 15
            k = 0 if last and n < 15 else 1
            x_prev, x0_pred = deis_step(x, eps, sig[i], sig[i + 1], hist_sigmas[len(hist_sigmas) - k:],
                                        hist[len(hist) - k:])
            hist, hist_sigmas = [eps], [sig[i]]
        x = x_prev.astype(np.float32, copy=False)
        if callback is not None:
            replaced = callback(i, t, x, x0_pred)
            if replaced is not None:
                x = np.asarray(replaced, dtype=np.float32)
    return x


def _pndm_step(predict, x, i, k, schedule, prev_eps, staged):
    """Step i of PNDM, the k-th of this run, with the eps of up to 3 earlier steps (prev_eps).
    Returns (x_next, x0_pred, eps), eps being the one PLMS remembers. staged(i, x_mid) may replace
    the improved-Euler point (sample()'s between_stages).

    skip_prk_steps (SD v1.5): PLMS, whose first step is an improved-Euler (Heun) step as in Liu et
    al.'s S-PNDM, written the way diffusers does it: x_1 = phi(x, e_0, t, t - N/n); e_1 at
    (x_1, t_next); x_1 = phi(x, (e_0 + e_1) / 2, t_next + N/n, t_next), with (t, t_next) =
    pndm_start(schedule, i): (t_i, t_{i+1}) from step 0, diffusers' img2img start from a later step.
    Else the first three steps are Runge-Kutta (PRK) steps, as in F-PNDM, evaluating the model at
    t, t_mid, t_mid and t_next.
    """
    ts, prev, ac = schedule.timesteps, schedule.prev_timesteps, schedule.alphas_cumprod
    fac = schedule.final_alpha_cumprod
    ratio = int(ts[i] - prev[i])                                               # N // n
    t, t_next = ts[i], None
    if schedule.skip_prk_steps and k == 0:
        t, t_next = pndm_start(schedule, i)                                    # the first step's two timesteps
    eps, x0 = predict(x, t)
    if schedule.skip_prk_steps or k >= 3:
        x_next, x0_pred = plms_step(x, eps, int(t), int(t) - ratio, ac, prev_eps, fac)
        if t_next is not None:
            # improved Euler: the model again at the end point, then the step with the mean of both eps;
            # the end point is at t_next, the level of step i + 1 (from step 0) or of step i (part-way)
            x_next = staged(i if i == 0 else i - 1, x_next)
            eps_1, _ = predict(x_next, t_next)
            t_next = int(t_next)
            x0_pred = x0_from_eps(x_next, eps_1, ac[t_next])
            # phi(x, (e_0 + e_1) / 2, t_next + N // n, t_next)   (t_next + N // n = t for leading spacing)
            x_next = pndm_transfer(x, (eps + eps_1) / 2, t_next + ratio, t_next, ac, fac)
        return x_next, x0_pred, eps
    # PRK: eps' = (e1 + 2 e2 + 2 e3 + e4) / 6 with the transfer phi from x each time
    t_mid, t_next = schedule.mid_timesteps[i], ts[i + 1]
    x_1 = pndm_transfer(x, eps, t, t - ratio // 2, ac, fac)                    # half step with e1
    eps_2, _ = predict(x_1, t_mid)
    x_2 = pndm_transfer(x, eps_2, t, int(t_mid), ac, fac)                      # half step with e2
    eps_3, _ = predict(x_2, t_mid)
    x_3 = pndm_transfer(x, eps_3, t, int(t_next), ac, fac)                     # full step with e3
    eps_4, _ = predict(x_3, t_next)
    x_next = pndm_transfer(x, prk_eps(eps, eps_2, eps_3, eps_4), t, int(t_next), ac, fac)
    return x_next, x0_from_eps(x_3, eps_4, ac[int(t_next)]), eps
