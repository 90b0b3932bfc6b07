"""Noise schedule, forward process, timestep selection and the six samplers, as pure functions.

Read docs/samplers.md first: it derives every formula used here, with the notation below.

Glossary (code name -> paper symbol)
- ``alphas_cumprod[t]``  alpha_bar_t = prod_{s<=t} (1 - beta_s)          (Ho et al. 2020, "DDPM")
- ``sigma``              sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)   (Karras et al. 2022, "EDM")
- ``x`` / ``x_t``        the noisy latent. DDPM, DDIM and DPM-Solver++ work with the variance-
                         preserving x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps; Euler,
                         Euler ancestral and Heun with Karras' x = x_t / sqrt(alpha_bar_t) = x0 + sigma eps.
- ``eps``                the model's noise prediction eps_theta(x_t, t)
- ``x0_pred``            the model's estimate of the clean latent x0 at this step

How the pieces fit (what a pipeline does; txt2img with Euler)::

    sched = make_schedule("euler", 50, config)                  # timesteps, sigmas, init_noise_sigma
    x = noise * sched.init_noise_sigma                           # noise ~ N(0, I) [B, 4, h, w]
    x = sample(model, x, sched, rng=rng, callback=cb)            # model(x_in, t) -> eps

img2img: ``start = img2img_start_index(steps, strength)``, ``x = noise_at_step(sched, x0, noise,
start)``, ``sample(model, x, sched, start_index=start, ...)``.

Arrays stay float32; the scalar coefficients of a step (sqrt(abar), 1/sigma, e^-h, ...) are Python
floats computed in float64 from the float32 schedule, which NumPy applies without upcasting.

Every function is pure: arrays in, arrays out. Randomness enters only as explicit noise arrays or an
``np.random.Generator`` argument. Schedules are computed like SD v1.5's diffusers schedulers
(diffusers 0.42.1, each with its own ``set_timesteps`` rules); tests/test_schedulers.py checks them.
"""

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m")
SIGMA_SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m")   # schedules described by sigmas
SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------
# The noise schedule
# ---------------------------------------------------------------------------------------------

def _section(config):
    """Accept a whole model config or just its "scheduler" section."""
    return config["scheduler"] if "scheduler" in config else config


def _betas64(cfg):
    n, b0, b1 = int(cfg["num_train_timesteps"]), float(cfg["beta_start"]), float(cfg["beta_end"])
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        # SD v1.x: betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2
        return np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2    # [N]
    if kind == "linear":
        # DDPM (Ho et al. 2020, sec. 4): betas linear from beta_start to beta_end
        return np.linspace(b0, b1, n, dtype=np.float64)                       # [N]
    raise InputError(f"beta_schedule {kind!r} is not supported; use 'scaled_linear' (SD v1.x) or 'linear'")


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
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
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
# A schedule: everything a sampling loop needs, computed once
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The fixed numbers of one sampling run (read-only arrays; compute with ``make_schedule``).

    sampler           one of SAMPLERS
    timesteps         [n] the t given to the model at step i (int64; float32 for euler, euler_a, heun,
                      which may be fractional). Heun evaluates the model twice per step: at
                      timesteps[i] and, for the correction, at timesteps[i + 1].
    sigmas            [n + 1] float32 noise levels, sigmas[n] = 0 (sigma-based samplers), else None
    prev_timesteps    [n] int64 t_prev of each DDPM/DDIM step (negative: "past the end", whose
                      alpha_bar is final_alpha_cumprod), else None
    alphas_cumprod    [N] float32 training schedule alpha_bar_t
    final_alpha_cumprod  alpha_bar used for t_prev < 0: DDPM 1.0; DDIM alphas_cumprod[0]
                      (SD's set_alpha_to_one=False)
    init_noise_sigma  the std of the starting latent: x_T = N(0, I) * init_noise_sigma
    spacing, use_karras_sigmas   how the schedule was chosen
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

    @property
    def num_inference_steps(self):
        return len(self.timesteps)


def check_sampler(name):
    """Return name if it is a known sampler, else raise InputError listing the valid names."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    return name


def _readonly(a):
    if a is not None:
        a = np.ascontiguousarray(a)
        a.flags.writeable = False
    return a


def make_schedule(sampler, num_inference_steps, config, use_karras_sigmas=False, timestep_spacing=None):
    """Compute the Schedule of one sampler for num_inference_steps steps, as diffusers does.

    config: a model config or its "scheduler" section (npsd.config.SD15["scheduler"]).
    timestep_spacing: "leading", "trailing" or "linspace"; None takes the config's (SD v1.5: leading,
    steps_offset 1). use_karras_sigmas (Karras eq. 5) applies to euler, euler_a, heun, dpmpp_2m.
    """
    check_sampler(sampler)
    cfg = _section(config)
    N = int(cfg["num_train_timesteps"])
    spacing = timestep_spacing if timestep_spacing is not None else cfg.get("timestep_spacing", "leading")
    offset = int(cfg.get("steps_offset", 0))
    if use_karras_sigmas and sampler not in SIGMA_SAMPLERS:
        raise InputError(f"use_karras_sigmas applies to {', '.join(SIGMA_SAMPLERS)}, not to {sampler!r}")
    ac = alphas_cumprod(cfg)                                                   # [N]
    table = sigmas_from_alphas_cumprod(ac)                                     # [N] sigma_t, increasing
    sigmas = prev = None
    final_ac, init_sigma = 1.0, 1.0

    if sampler in ("ddpm", "ddim"):
        ts = timesteps(num_inference_steps, spacing, offset, N)                # [n] int64
        if sampler == "ddpm":
            # DDPM steps to the next timestep of the list; past the end alpha_bar_prev = 1
            prev = np.append(ts[1:], -1)                                       # [n]
        else:
            # diffusers' DDIM steps to t - N // n whatever the spacing (for leading this is the next
            # timestep); past the end it uses alpha_bar_0 (SD's set_alpha_to_one=False)
            prev = ts - N // int(num_inference_steps)                          # [n]
            final_ac = float(ac[0]) if not cfg.get("set_alpha_to_one", False) else 1.0
    elif sampler == "dpmpp_2m":
        ts = dpm_timesteps(num_inference_steps, spacing, offset, N)            # [n] int64
        if use_karras_sigmas:
            # Karras sigmas over the whole training range, timesteps rounded to integers
            s = karras_sigmas(table[0], table[-1], int(num_inference_steps))   # [n]
            ts = np.round(sigma_to_t(s, table)).astype(np.int64)               # [n]
        else:
            s = table[ts]                                                      # [n]
        sigmas = np.append(s, 0.0).astype(np.float32)                          # [n + 1]
    else:                                                                      # euler, euler_a, heun
        ts = sigma_timesteps(num_inference_steps, spacing, offset, N)          # [n] float32
        # sigma at each (maybe fractional) timestep: linear interpolation of the table
        s = np.interp(ts, np.arange(N), table)                                 # [n] float64
        if use_karras_sigmas:
            # Karras sigmas between the first and last sigma of the spaced schedule
            s = karras_sigmas(s[-1], s[0], int(num_inference_steps))           # [n]
            ts = sigma_to_t(s, table).astype(np.float32)                       # [n], fractional
        sigmas = np.append(s, 0.0).astype(np.float32)                          # [n + 1]
        smax = float(sigmas.max())
        # diffusers: leading spacing starts from the VP noise N(0, I) / sqrt(alpha_bar) (std
        # sqrt(sigma_max^2 + 1)); linspace / trailing start from std sigma_max
        init_sigma = smax if spacing in ("linspace", "trailing") else float(np.sqrt(np.float32(smax) ** 2 + 1))

    return Schedule(sampler=sampler, timesteps=_readonly(ts), sigmas=_readonly(sigmas),
                    prev_timesteps=_readonly(prev), alphas_cumprod=_readonly(ac),
                    final_alpha_cumprod=final_ac, init_noise_sigma=init_sigma,
                    spacing=spacing, use_karras_sigmas=bool(use_karras_sigmas))


def img2img_start_index(num_inference_steps, strength):
    """The step at which img2img (and inpainting with strength < 1) starts, as diffusers computes it.

    init_timestep = min(int(n * strength), n); t_start = n - init_timestep. The run then does the
    last n - t_start steps of the schedule, starting from the input noised to step t_start
    (``noise_at_step``). Valid for every sampler: diffusers' Heun lists each timestep twice and
    starts at t_start * 2 of its list, which is npsd's step t_start (see docs/samplers.md).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise InputError(f"strength must be between 0 and 1, got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    if t_start >= num_inference_steps:
        raise InputError(f"strength {strength} with {num_inference_steps} steps leaves no step to run "
                         f"(int(steps * strength) = 0); raise strength or num_inference_steps")
    return t_start


def noise_at_step(schedule, x0, noise, step_index):
    """x0 noised to the noise level of step ``step_index``, in the sampler's own variable (what
    diffusers' scheduler.add_noise gives there). step_index == n (past the end) returns x0.

    ddpm, ddim:     x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise         (DDPM eq. 4, t = timesteps[i])
    dpmpp_2m:       the same with alpha = 1 / sqrt(sigma_i^2 + 1), sigma_t = sigma_i alpha
    euler, euler_a, heun:  x = x0 + sigma_i noise                          (Karras' variable)
    """
    n = schedule.num_inference_steps
    if not 0 <= step_index <= n:
        raise InputError(f"step_index must be in 0..{n}, got {step_index}")
    if step_index == n:
        return np.asarray(x0, dtype=np.float32)
    if schedule.sampler in ("ddpm", "ddim"):
        return add_noise(x0, noise, int(schedule.timesteps[step_index]), schedule.alphas_cumprod)
    sigma = float(schedule.sigmas[step_index])
    if schedule.sampler == "dpmpp_2m":
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        return (alpha_t * x0 + sigma_t * noise).astype(np.float32, copy=False)
    # x = x0 + sigma * noise
    return (x0 + sigma * noise).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Step functions. Each returns (x_next, x0_pred); scalars are Python floats, arrays float32.
# ---------------------------------------------------------------------------------------------

def ddpm_step(x_t, eps, t, t_prev, alphas_cumprod, noise=None):
    """One ancestral DDPM step x_t -> x_{t_prev} (Ho et al. 2020, eq. 6-7), fixed small variance.

    x_t, eps [B, C, h, w]; t, t_prev integer timesteps (t_prev < 0: the end, alpha_bar_prev = 1);
    noise: N(0, I) like x_t, or None for the posterior mean alone (diffusers draws no noise at t = 0).
    Returns (x_prev, x0_pred).
    """
    ab_t = float(alphas_cumprod[t])
    ab_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    alpha_t = ab_t / ab_prev                                  # alpha of this (strided) step
    beta_t = 1.0 - alpha_t
    # x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                 (DDPM eq. 15 rearranged)
    x0_pred = (x_t - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)           # [B, C, h, w]
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


def ddim_step(x_t, eps, t, t_prev, alphas_cumprod, eta=0.0, noise=None, final_alpha_cumprod=None):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12; sigma_t(eta) from eq. 16).

    t_prev < 0 means the end, whose alpha_bar is final_alpha_cumprod (default alphas_cumprod[0],
    SD's set_alpha_to_one=False). eta = 0: deterministic; eta > 0 needs noise N(0, I) like x_t.
    Returns (x_prev, x0_pred).
    """
    if eta > 0 and noise is None:
        raise InputError("ddim_step with eta > 0 needs a noise array (or use sample() with rng=)")
    if final_alpha_cumprod is None:
        final_alpha_cumprod = float(alphas_cumprod[0])
    ab_t = float(alphas_cumprod[t])
    ab_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else float(final_alpha_cumprod)
    # x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                 ("predicted x0" of eq. 12)
    x0_pred = (x_t - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)           # [B, C, h, w]
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


def euler_step(x, eps, sigma, sigma_next):
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x0_pred) / sigma from sigma to
    sigma_next (Karras et al. 2022, eq. 3 with sigma(t) = t, s(t) = 1; Algorithm 2 without churn).
    eps is the model's output for scale_model_input(x, sigma). Returns (x_next, x0_pred)."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    # x0_pred = x - sigma eps   (the denoiser D(x; sigma))
    x0_pred = x - sigma * eps                                                  # [B, C, h, w]
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


def euler_ancestral_step(x, eps, sigma, sigma_next, noise):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up.
    noise N(0, I) like x (drawn even on the last step, where sigma_up = 0). Returns (x_next, x0_pred)."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    # x0_pred = x - sigma eps;  d = (x - x0_pred) / sigma
    x0_pred = x - sigma * eps                                                  # [B, C, h, w]
    d = (x - x0_pred) / sigma                                                  # [B, C, h, w]
    # x_next = x + (sigma_down - sigma) d + sigma_up noise
    x_next = x + d * (sigma_down - sigma) + sigma_up * noise                   # [B, C, h, w]
    return x_next, x0_pred


def heun_predict(x, eps, sigma, sigma_next):
    """Heun, stage 1 (Karras et al. 2022, Algorithm 1, lines 4-5): the Euler step to sigma_next.

    Returns (x_euler, x0_pred, d) with d = (x - x0_pred) / sigma, the slope that stage 2 averages.
    When sigma_next == 0 (the last step) x_euler is the result and there is no stage 2.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    x0_pred = x - sigma * eps                                                  # [B, C, h, w]
    d = (x - x0_pred) / sigma                                                  # [B, C, h, w]
    x_euler = x + d * (sigma_next - sigma)                                     # [B, C, h, w]
    return x_euler, x0_pred, d


def heun_correct(x, d, eps_next, x_euler, sigma, sigma_next):
    """Heun, stage 2 (Algorithm 1, lines 6-8): with eps_next, the model's output at
    (scale_model_input(x_euler, sigma_next), t_next), average the two slopes and redo the step from x.
    Returns (x_next, x0_pred) where x0_pred is the estimate made at sigma_next."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    x0_pred = x_euler - sigma_next * eps_next                                  # [B, C, h, w]
    d_next = (x_euler - x0_pred) / sigma_next                                  # [B, C, h, w]
    # x_next = x + (sigma_next - sigma) (d + d_next) / 2
    x_next = x + (d + d_next) / 2 * (sigma_next - sigma)                       # [B, C, h, w]
    return x_next, x0_pred


def vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the variance-preserving x_t = alpha_t x0 + sigma_t eps that has
    noise-to-signal ratio sigma: alpha_t = 1 / sqrt(sigma^2 + 1) = sqrt(abar), sigma_t = sigma alpha_t."""
    alpha_t = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
    return alpha_t, float(sigma) * alpha_t


def dpmpp_2m_step(x, eps, sigma, sigma_next, sigma_prev=None, prev_x0=None):
    """One DPM-Solver++(2M) step on the variance-preserving x_t (Lu et al. 2022, Algorithm 2).

    x, eps [B, C, h, w] (the model sees x unscaled); sigma, sigma_next, sigma_prev: noise-to-signal
    ratios of this, the next and the previous step; prev_x0: the x0_pred the previous step returned.
    First-order (DPM-Solver++(1), i.e. DDIM) when there is no previous step or sigma_next == 0
    (diffusers' lower_order_final with its final sigma 0). Returns (x_next, x0_pred); pass x0_pred
    and sigma as prev_x0 and sigma_prev to the next step.
    """
    alpha_s, sigma_s = vp_alpha_sigma(sigma)
    # data prediction: x0 = (x_t - sigma_t eps) / alpha_t
    x0_pred = (x - sigma_s * eps) / alpha_s                                    # [B, C, h, w]
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


# ---------------------------------------------------------------------------------------------
# The sampling loop
# ---------------------------------------------------------------------------------------------

def sample(model, x, schedule, *, rng=None, noises=None, callback=None, start_index=0, eta=0.0):
    """Run a sampler from step start_index to the end; return the final latents (float32).

    model(x_in, t) -> eps: the noise prediction for the model input x_in at timestep t (a pipeline
        wraps UNet + text context + classifier-free guidance in this closure; see npsd.guidance).
        The loop calls it with x_in = scale_model_input(x, sigma) for euler, euler_a, heun and with
        x itself for ddpm, ddim, dpmpp_2m; t is schedule.timesteps[i] (a NumPy scalar).
    x: the state at step start_index in the sampler's own variable: for txt2img
        N(0, I) * schedule.init_noise_sigma (as diffusers' pipelines multiply their latents); for
        img2img noise_at_step(schedule, x0, noise, start_index).
    rng: np.random.Generator for the stochastic samplers (ddpm; ddim with eta > 0; euler_a). Each
        step that needs noise draws rng.standard_normal(x.shape, dtype=np.float32), in step order:
        ddpm at every step with t > 0, ddim (eta > 0) and euler_a at every step.
    noises: instead of rng, the same draws as a list of arrays, used in that order (tests inject
        the reference's noise this way).
    callback(i, t, x, x0_pred): called after every step i with the new x and that step's x0_pred;
        if it returns an array, that array replaces x (inpainting re-imposes the known region so).
    eta: DDIM's eta (Song et al. eq. 16); 0 is deterministic.
    """
    s = check_sampler(schedule.sampler)
    n = schedule.num_inference_steps
    if not 0 <= start_index < n:
        raise InputError(f"start_index must be in 0..{n - 1} for {n} steps, got {start_index}")
    if eta < 0:
        raise InputError(f"eta must be >= 0, got {eta}")
    stochastic = s in ("ddpm", "euler_a") or (s == "ddim" and eta > 0)
    if stochastic and rng is None and noises is None:
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
    ts, sig, ac = schedule.timesteps, schedule.sigmas, schedule.alphas_cumprod
    prev_x0 = None                                          # DPM-Solver++(2M)'s memory
    for i in range(start_index, n):
        t = ts[i]
        if s == "ddpm":
            eps = model(x, t)                                                  # [B, 4, h, w]
            noise = draw() if t > 0 else None
            x_prev, x0_pred = ddpm_step(x, eps, int(t), int(schedule.prev_timesteps[i]), ac, noise)
        elif s == "ddim":
            eps = model(x, t)
            noise = draw() if eta > 0 else None
            x_prev, x0_pred = ddim_step(x, eps, int(t), int(schedule.prev_timesteps[i]), ac, eta, noise,
                                        schedule.final_alpha_cumprod)
        elif s == "euler":
            eps = model(scale_model_input(x, sig[i]), t)
            x_prev, x0_pred = euler_step(x, eps, sig[i], sig[i + 1])
        elif s == "euler_a":
            eps = model(scale_model_input(x, sig[i]), t)
            noise = draw()
            x_prev, x0_pred = euler_ancestral_step(x, eps, sig[i], sig[i + 1], noise)
        elif s == "heun":
            eps = model(scale_model_input(x, sig[i]), t)
            x_euler, x0_pred, d = heun_predict(x, eps, sig[i], sig[i + 1])
            if sig[i + 1] > 0:
                # second model evaluation at the Euler point: noise level sigma_{i+1}, timestep t_{i+1}
                eps_next = model(scale_model_input(x_euler, sig[i + 1]), ts[i + 1])
                x_prev, x0_pred = heun_correct(x, d, eps_next, x_euler, sig[i], sig[i + 1])
            else:
                x_prev = x_euler
        else:                                                                  # dpmpp_2m
            eps = model(x, t)
            x_prev, x0_pred = dpmpp_2m_step(x, eps, sig[i], sig[i + 1],
                                            sig[i - 1] if prev_x0 is not None else None, prev_x0)
            prev_x0 = x0_pred
        x = x_prev.astype(np.float32, copy=False)
        if callback is not None:
            replaced = callback(i, t, x, x0_pred)
            if replaced is not None:
                x = np.asarray(replaced, dtype=np.float32)
    return x
