"""AUTOMATIC1111's API requests and responses <-> npsd's settings (no web framework here).

A request of /sdapi/v1/txt2img or /sdapi/v1/img2img is a JSON object of A1111's fields
(modules/processing.py's StableDiffusionProcessing* classes, modules/api/models.py). Every field
falls in one of four groups:

- USED: what npsd does (prompt, negative_prompt, seed, subseed, subseed_strength, sampler_name,
  scheduler, steps, cfg_scale, width, height, batch_size, n_iter, eta, override_settings,
  send_images; img2img: init_images, denoising_strength, mask, mask_blur, inpainting_mask_invert, ...);
- INERT: A1111's bookkeeping, which changes no pixel npsd computes (do_not_save_samples, the hr_*
  fields while enable_hr is false, ...): accepted, ignored;
- OFF: features npsd lacks (scripts, face restoration, styles, img2img's refiner, ...): accepted at
  their "off" value (what
  clients such as webuiapi send by default), else refused with 422 naming them;
- anything else is unknown: refused with 422 (a misspelt field would otherwise be silently dropped).

Fields left out take npsd's defaults, those of its command line and Pipeline API: the model's steps,
cfg_scale, size and sampler (npsd.config.generation_defaults, not A1111's 512x512 and 50 steps, so
that the built-in 64x64 model works with an empty request), denoising_strength 0.8 (img2img) or 1
(inpainting), mask_blur 0, inpainting from the original image over the whole picture.
`read_request` checks types and ranges (in A1111's names, before the job waits in the queue); what
depends on the model (the size's multiple of the VAE factor, memory) is the pipeline's check.

Batches follow A1111: image k of a request (counted over batch_size and n_iter) has the seed
seed + k and its own random numbers from it, so npsd makes it alone from that seed (its PNG says so,
without "Batch size"), and all_seeds lists seed, seed + 1, ....
The scheduler is A1111's schedule type ("Automatic": A1111's choice for the sampler; npsd's
schedule_type) for the samplers A1111 runs with k-diffusion. enable_hr runs the hires fix with
A1111's latent upscalers (hr_scale or hr_resize_x/y, hr_upscaler, hr_second_pass_steps, denoising_strength,
hr_prompt, hr_negative_prompt, hr_sampler_name, hr_scheduler, hr_checkpoint_name; npsd/hires.py);
refiner_checkpoint and refiner_switch_at run A1111's refiner (npsd/refiner.py; the option
hires_fix_refiner_pass), in txt2img; checkpoints are named as sd_model_checkpoint is.
With those samplers an inpainting request is A1111's inpainting (npsd/a1111_inpaint.py: its mask
blur, inpainting_fill's masked content, inpaint_full_res's "only masked" crop with its padding, the
denoised latents blended with the image's, the input pasted back over the kept region), and every
image is made 8-bit as A1111 saves it (truncated);
with the others (DDIM, PLMS, UniPC, which A1111 runs with its own code) npsd's diffusers inpainting.
"""

import base64
import binascii
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from ..errors import InputError
from ..hires import LABELS as UPSCALER_LABELS, MAX_RESIZE, UPSCALERS, upscaler_named
from ..images import open_image, upright
from ..pngmeta import (A1111_BROWNIAN, A1111_SAMPLERS, KEY, SCHEDULE_LABELS, SCHEDULE_NAMED, _exif_user_comment,
                       emphasis_named, parse_parameters, png_info, sampler_from_a1111, schedule_label)
from ..prompts import EMPHASIS_LABELS
from ..refiner import HIRES_PASSES as REFINER_PASSES
from ..rng import SEED_LIMIT
from ..a1111_inpaint import INPAINT_AREAS, MASKED_CONTENT
from ..images import RESIZE_MODES
from ..schedulers import BETA_ALPHA, BETA_BETA, KDIFFUSION_SAMPLERS
from ..tome import MAX_RATIO

# --- the fields ---------------------------------------------------------------------------------

USED = {"prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w",
        "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
        "steps", "cfg_scale", "width", "height", "eta", "override_settings", "override_settings_restore_afterwards",
        "send_images", "save_images", "npsd_attention_maps", "s_min_uncond", "tiling", "token_merging_ratio"}
USED_IMG2IMG = {"init_images", "denoising_strength", "mask", "mask_blur", "mask_blur_x", "mask_blur_y",
                "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert", "resize_mode",
                "initial_noise_multiplier", "include_init_images"}
INERT = {"do_not_save_samples", "do_not_save_grid", "comments", "force_task_id", "s_tmin", "s_tmax",
         "refiner_switch_at", "user"}   # (refiner_switch_at: img2img's)
USED_TXT2IMG = {"enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_resize_x",
                "hr_resize_y", "hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler", "token_merging_ratio_hr",
                "hr_checkpoint_name", "refiner_checkpoint"}
# the hires fix's fields npsd lacks, refused when enable_hr is true (ignored, as by A1111, when false)
HIRES_OFF = {}
NO_CHECKPOINT = ("", "None", "none")                        # refiner_checkpoint off (A1111's processing.py)
SAME_CHECKPOINT = ("", "Use same checkpoint")               # hr_checkpoint_name off
HIRES_DENOISING = 0.75                                      # A1111's txt2img default denoising_strength
INERT_IMG2IMG = {"image_cfg_scale",                         # instruct-pix2pix only
                 "token_merging_ratio_hr"}                  # (A1111's img2img has no hires pass)
# feature field -> (its "off" values, what npsd lacks). None is always "off".
OFF = {
    "firstphase_width": ((0,), "A1111's old hires fix; send hr_scale"),
    "firstphase_height": ((0,), "A1111's old hires fix; send hr_scale"),
    "firstpass_image": (("",), "npsd's hires fix starts from its own first pass"),
    "refiner_checkpoint": (NO_CHECKPOINT, "npsd's refiner runs in txt2img"),
    "restore_faces": ((False,), "npsd has no face restoration"),
    "styles": (([],), "npsd has no saved prompt styles; write them into the prompt"),
    "s_churn": ((0,), "npsd's samplers have no churn"),
    "s_noise": ((1,), "npsd's samplers have no noise multiplier"),
    "script_name": (("",), "npsd runs no A1111 scripts"),
    "script_args": (([],), "npsd runs no A1111 scripts"),
    "alwayson_scripts": (({},), "npsd runs no A1111 scripts or extensions (ControlNet, ADetailer, ...)"),
    "disable_extra_networks": ((False,), "npsd always applies <lora:...> tags"),
    "infotext": (("",), "npsd does not read settings from an infotext; send the fields"),
    "latent_mask": (("",), "npsd has no separate latent mask"),
}
OFF_TXT2IMG = ("firstphase_width", "firstphase_height", "firstpass_image")
OFF_IMG2IMG = ("latent_mask", "refiner_checkpoint")        # (txt2img reads refiner_checkpoint)

# the samplers whose noise A1111 scales by eta; npsd's use eta = 1 (ddim reads eta itself)
ETA_ONE = ("euler_a", "dpm2_a", "dpmpp_2m_sde", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_3m_sde")
MAX_IMAGES = 100                                    # batch_size * n_iter of one request

# the options npsd has (GET/POST /sdapi/v1/options, override_settings) and their defaults
OPTION_DEFAULTS = {"sd_model_checkpoint": None, "CLIP_stop_at_last_layers": 1, "randn_source": "numpy",
                   "eta_ddim": 0.0, "eta_noise_seed_delta": 0, "initial_noise_multiplier": 1.0,
                   "inpainting_mask_weight": 1.0, "s_min_uncond": 0.0, "emphasis": "Original", "tiling": False,
                   "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0, "always_discard_next_to_last_sigma": False,
                   "beta_dist_alpha": BETA_ALPHA, "beta_dist_beta": BETA_BETA,
                   "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0,
                   "hires_fix_refiner_pass": "second pass"}
# A1111's options that change its schedule types' sigmas -> the run's settings (npsd.pngmeta.SCHEDULE_SETTINGS)
SCHEDULE_OPTIONS = {"sigma_min": "schedule_sigma_min", "sigma_max": "schedule_sigma_max", "rho": "schedule_rho",
                    "always_discard_next_to_last_sigma": "discard_penultimate_sigma",
                    "beta_dist_alpha": "beta_schedule_alpha", "beta_dist_beta": "beta_schedule_beta"}
TOME_OPTIONS = ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")
READ_ONLY_OPTIONS = ("sd_checkpoint_hash",)
RANDN_SOURCES = {"numpy": "numpy", "CPU": "torch"}   # randn_source -> the pipeline's rng


@dataclass
class Limits:
    """What an upload may be: its bytes (the whole request body) and an image's pixels."""
    max_bytes: int = 32 * 2**20
    max_pixels: int = 4096 * 4096


@dataclass
class Plan:
    """One generation request, checked: the mode, the command line's settings (npsd/cli.py's
    SETTINGS; None = the model's default, filled by the worker), and what A1111's request adds."""
    mode: str                                   # "txt2img", "img2img" or "inpaint"
    settings: dict
    n_iter: int = 1
    image: object = None                        # PIL RGB (img2img, inpaint)
    mask: object = None                         # PIL (inpaint; white = repaint)
    overrides: dict = field(default_factory=dict)   # override_settings, checked (option -> value)
    restore_afterwards: bool = True
    send_images: bool = True
    attention_maps: bool = False
    received: dict = field(default_factory=dict)    # the request as received, for "parameters"


# --- values of a request ------------------------------------------------------------------------

def _short(value, n=40):
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _is_off(value, offs):
    return value is None or value in offs


def _int(body, name, default=None, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not (isinstance(v, int) or isinstance(v, float) and v.is_integer()):
        raise InputError(f"{name} must be a whole number, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be {where}, got {v}")
    return v


def _float(body, name, default=None, lo=None, hi=None, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v!r}")
    if (lo is not None and (v < lo or lo_open and v == lo)) or (hi is not None and v > hi):
        if hi is None:
            where = f"> {lo}" if lo_open else f">= {lo}"
        else:
            where = f"in ({lo}, {hi}]" if lo_open else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be {where}, got {v}")
    return float(v)


def _str(body, name, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise InputError(f"{name} must be a string, got {type(v).__name__}")
    return v


def _bool(body, name, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool) and v not in (0, 1):
        raise InputError(f"{name} must be true or false, got {v!r}")
    return bool(v)


def sampler_from_name(name, field="sampler_name"):
    """A1111's sampler name ("DPM++ 2M", "Euler a", old "DPM++ 2M Karras") or npsd's ("dpmpp_2m")
    -> (npsd's name, the schedule type the name's suffix asks for or None)."""
    found, schedule = sampler_from_a1111(name)
    if found is None:
        raise InputError(f"{field} {name!r} is not one npsd has; use one of {', '.join(A1111_SAMPLERS.values())}")
    return found, schedule


def schedule_for(sampler, schedule_type):
    """The schedule_type a request's sampler runs with: A1111's schedules for the samplers A1111 runs
    with k-diffusion, none (npsd's diffusers schedule) for the others, which A1111 runs without one."""
    if sampler in KDIFFUSION_SAMPLERS or sampler is None:
        return schedule_type
    if schedule_type != "automatic":
        raise InputError(f"scheduler {SCHEDULE_LABELS[schedule_type]} applies to the samplers "
                         f"{', '.join(A1111_SAMPLERS[s] for s in KDIFFUSION_SAMPLERS)}, not to {A1111_SAMPLERS[sampler]}")
    return None


def check_inpainting(settings):
    """inpainting_fill other than 1 (original) and inpaint_full_res are A1111's inpainting: only with
    A1111's schedules (settings with the sampler known)."""
    content = settings.get("masked_content", "original")
    if settings["schedule_type"] is not None:
        return
    if content != "original":
        raise InputError(f"inpainting_fill={MASKED_CONTENT.index(content)} ({content}) is A1111's inpainting, which "
                         f"npsd runs for the samplers A1111 runs with k-diffusion, not "
                         f"{A1111_SAMPLERS[settings['sampler']]}; send 1 (original) or another sampler_name")
    if settings.get("inpaint_area") == "only masked":
        raise InputError(f"inpaint_full_res (only masked) is A1111's inpainting, which npsd runs for the samplers "
                         f"A1111 runs with k-diffusion, not {A1111_SAMPLERS[settings['sampler']]}; send false or "
                         f"another sampler_name")


def scheduler_label(settings):
    """A1111's "scheduler" of a run's settings: the label of the schedule type it ran with."""
    return schedule_label(settings) or "Automatic"


def check_eta(sampler, eta):
    """A1111 scales the noise of its ancestral and SDE samplers by eta; npsd's add theirs at eta 1."""
    if eta is not None and sampler in ETA_ONE and eta != 1:
        raise InputError(f"eta={eta} with {A1111_SAMPLERS[sampler]}: npsd's ancestral and SDE samplers add their "
                         f"noise at eta 1; send 1 or leave eta out")


def check_options(options, where="options"):
    """{option: value} as POSTed to /sdapi/v1/options or given as override_settings -> the options
    checked (read-only ones dropped); one-line InputError naming what npsd cannot set."""
    if not isinstance(options, dict):
        raise InputError(f"{where} must be a JSON object of option: value")
    unknown = [k for k in options if k not in OPTION_DEFAULTS and k not in READ_ONLY_OPTIONS]
    if unknown:
        raise InputError(f"{where}: npsd has no option {', '.join(map(repr, unknown))}; it has "
                         f"{', '.join(OPTION_DEFAULTS)}")
    checked = {k: v for k, v in options.items() if k in OPTION_DEFAULTS}
    if "sd_model_checkpoint" in checked:
        _str(checked, "sd_model_checkpoint")
    if "CLIP_stop_at_last_layers" in checked:
        _int(checked, "CLIP_stop_at_last_layers", lo=1, hi=12)
    if "eta_ddim" in checked:
        _float(checked, "eta_ddim", lo=0.0, hi=1.0)
    if "eta_noise_seed_delta" in checked:
        _int(checked, "eta_noise_seed_delta", lo=0, hi=2**32 - 1)
    if "initial_noise_multiplier" in checked:
        _float(checked, "initial_noise_multiplier", lo=0.0)
    if "inpainting_mask_weight" in checked:
        _float(checked, "inpainting_mask_weight", lo=0.0, hi=1.0)
    for name in ("s_min_uncond", "sigma_min", "sigma_max", "rho"):
        if name in checked:
            _float(checked, name, lo=0.0)
    for name in ("beta_dist_alpha", "beta_dist_beta"):
        if name in checked:
            _float(checked, name, lo=0.0, lo_open=True)
    discard = checked.get("always_discard_next_to_last_sigma")
    if discard is not None and not isinstance(discard, bool):
        raise InputError(f"{where}: always_discard_next_to_last_sigma must be true or false, got {discard!r}")
    if "tiling" in checked:
        _bool(checked, "tiling")
    for name in TOME_OPTIONS:
        if name in checked:
            _float(checked, name, lo=0.0, hi=MAX_RATIO)
    if "emphasis" in checked and (not isinstance(checked["emphasis"], str) or emphasis_named(checked["emphasis"]) is None):
        raise InputError(f"{where}: emphasis {checked['emphasis']!r} is not one npsd has; use one of "
                         f"{', '.join(EMPHASIS_LABELS.values())}")
    if checked.get("hires_fix_refiner_pass", "second pass") not in REFINER_PASSES:
        raise InputError(f"{where}: hires_fix_refiner_pass {checked['hires_fix_refiner_pass']!r} is not one of "
                         f"{', '.join(REFINER_PASSES)}")
    source = checked.get("randn_source")
    if source is not None and source not in RANDN_SOURCES:
        raise InputError(f"{where}: randn_source {source!r} is not one npsd reproduces; use 'CPU' (torch's CPU "
                         f"generator, as A1111's CPU option) or 'numpy' (npsd's own)")
    return {k: v for k, v in checked.items() if v is not None}


def _refuse_fields(kind, body):
    """Unknown fields and features npsd lacks -> one InputError naming them all."""
    img2img = kind == "img2img"
    known = USED | INERT | set(OFF) | (USED_IMG2IMG | INERT_IMG2IMG if img2img else USED_TXT2IMG)
    unknown = [k for k in body if k not in known and not (not img2img and k.startswith("hr_"))]
    if unknown:
        elsewhere = [k for k in unknown if k in USED_IMG2IMG]
        hint = (f"{', '.join(elsewhere)} belong{'s' if len(elsewhere) == 1 else ''} to /sdapi/v1/img2img"
                if elsewhere else "check the spelling against A1111's field names")
        raise InputError(f"/sdapi/v1/{kind}: unknown field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; {hint}")
    wrong_mode = OFF_IMG2IMG if not img2img else OFF_TXT2IMG
    refused = [(k, OFF[k][1]) for k in body if k in OFF and k not in wrong_mode and not _is_off(body[k], OFF[k][0])]
    if not img2img and body.get("enable_hr"):
        refused += [(k, why) for k, (off, why) in HIRES_OFF.items() if k in body and not _is_off(body[k], off)]
    if img2img and body.get("mask"):
        if body.get("inpainting_fill") not in (None, 0, 1, 2, 3):
            refused.append(("inpainting_fill", "A1111's masked content is 0 (fill), 1 (original), 2 (latent noise) "
                                               "or 3 (latent nothing)"))
    if img2img and body.get("resize_mode") not in (None, 0, 1, 2):
        refused.append(("resize_mode", "npsd resizes the input image by 0 (just resize), 1 (crop and resize) or 2 "
                                       "(resize and fill), not by upscaling its latents (3)"))
    if refused:
        raise InputError("not supported: " + "; ".join(f"{k}={_short(body[k])} ({why})" for k, why in refused)
                         + "; leave these fields out or at their off values")


def read_request(kind, body, limits=None):
    """A txt2img or img2img request (a decoded JSON object) -> a Plan. One-line InputError for a field
    of the wrong type or range, an unknown field, or a feature npsd lacks."""
    limits = limits or Limits()
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object of A1111's fields")
    _refuse_fields(kind, body)
    prompt = _str(body, "prompt", "")
    negative = _str(body, "negative_prompt", "")
    sampler_text = _str(body, "sampler_name") or _str(body, "sampler_index")
    sampler, suffix = sampler_from_name(sampler_text) if sampler_text else (None, None)
    scheduler = (_str(body, "scheduler") or "automatic").strip().lower()
    if scheduler not in SCHEDULE_NAMED:
        raise InputError(f"scheduler {body['scheduler']!r} is not one npsd has; use one of "
                         f"{', '.join(SCHEDULE_LABELS.values())}")
    schedule_type = SCHEDULE_NAMED[scheduler]
    if schedule_type == "automatic" and suffix:                        # "DPM++ 2M Karras": A1111 before 1.9
        schedule_type = suffix
    schedule_type = schedule_for(sampler, schedule_type)
    batch_size, n_iter = _int(body, "batch_size", 1, lo=1), _int(body, "n_iter", 1, lo=1)
    if batch_size * n_iter > MAX_IMAGES:
        raise InputError(f"batch_size * n_iter is {batch_size * n_iter}, more than {MAX_IMAGES} images in one request")
    seed = _int(body, "seed", -1, lo=-1, hi=SEED_LIMIT - 1)
    if seed >= 0 and seed + batch_size * n_iter - batch_size >= SEED_LIMIT:
        raise InputError(f"seed {seed} + {n_iter - 1} iterations of {batch_size} passes 2**64 - 1; use a smaller seed")
    subseed = _int(body, "subseed", -1, lo=-1, hi=SEED_LIMIT - MAX_IMAGES)
    variation_strength = _float(body, "subseed_strength", 0.0, lo=0.0, hi=1.0)
    # A1111's "Seed resize from", in use where both are > 0 (its default -1)
    resize = tuple(_int(body, f"seed_resize_from_{k}", -1, lo=-1, hi=2**16) for k in ("w", "h"))
    eta = _float(body, "eta", lo=0.0, hi=1.0)
    check_eta(sampler, eta)
    settings = {"prompt": prompt, "negative_prompt": negative,
                "steps": _int(body, "steps", lo=1, hi=1000), "guidance_scale": _float(body, "cfg_scale", lo=0.0),
                "sampler": sampler, "seed": seed, "height": _int(body, "height", lo=8),
                "width": _int(body, "width", lo=8), "num_images": batch_size, "strength": None, "eta": eta,
                "karras": False, "schedule_type": schedule_type, "timestep_spacing": None, "clip_skip": None, "long_prompt": "chunk",
                "mask_blur": 0, "masked_content": "original", "inpaint_area": "whole picture",
                "masked_area_padding": 32, "resize_mode": "just resize", "variation_seed": subseed if variation_strength else None,
                "variation_strength": variation_strength, "eta_noise_seed_delta": 0,
                "seed_resize_from": resize if min(resize) > 0 else None, "initial_noise_multiplier": None,
                # None: the option s_min_uncond's, as A1111's processing takes it
                "negative_guidance_min_sigma": _float(body, "s_min_uncond", None, lo=0.0),
                "tiling": _bool(body, "tiling"),                # None: the option tiling's, as in A1111
                # None or 0: the options' (a1111.token_merging), as A1111's get_token_merging_ratio
                "token_merging_ratio": _float(body, "token_merging_ratio", None, lo=0.0, hi=MAX_RATIO),
                "inpainting_mask_weight": 1.0, "no_ema": False, "rng": None, "prediction_type": None, "guidance_rescale": 0.0,
                "prompt_syntax": "a1111", "lora": [], "lora_names": [], "ti_names": [], "vae_decoder": "vae",
                # A1111 draws its SDE samplers' step noise from a Brownian tree of the seed (npsd/brownian.py)
                "sde_noise": "brownian" if sampler in A1111_BROWNIAN else "generator",
                **(_hires(body, sampler, schedule_type) if kind == "txt2img" else HIRES_NONE),
                **(_refiner(body, sampler, schedule_type) if kind == "txt2img" else REFINER_NONE)}
    if settings["hires_sampler"] in A1111_BROWNIAN:
        settings["sde_noise"] = "brownian"
    if sampler is not None:
        check_hires(settings)                    # (else once the model's default sampler is known)
    plan = Plan(mode="txt2img", settings=settings, n_iter=n_iter,
                overrides=check_options(body.get("override_settings") or {}, "override_settings"),
                restore_afterwards=_bool(body, "override_settings_restore_afterwards", True),
                send_images=_bool(body, "send_images", True),
                attention_maps=_bool(body, "npsd_attention_maps", False),
                received=dict(body))
    _bool(body, "save_images")
    if plan.attention_maps and settings["hires_scale"]:
        raise InputError("npsd_attention_maps records one pass; send it without enable_hr")
    if kind == "img2img":
        _read_img2img(body, plan, limits)
    return plan


HIRES_NONE = {"hires_scale": None, "hires_upscaler": None, "hires_steps": None, "hires_strength": None,
              "hires_resize": None, "hires_prompt": None, "hires_negative_prompt": None, "hires_sampler": None,
              "hires_schedule_type": None, "hires_token_merging_ratio": None,
              "hires_checkpoint": None}
REFINER_NONE = {"refiner": None, "refiner_switch_at": None}


def _refiner(body, sampler, schedule_type):
    """refiner_checkpoint, refiner_switch_at -> the settings refiner (the checkpoint's name, found in the
    server's models as sd_model_checkpoint is) and refiner_switch_at. A1111 compares the ratio with
    refiner_switch_at only where it is given: without it the refiner takes over at the first call (0)."""
    name = _str(body, "refiner_checkpoint")
    if name is None or name.strip() in NO_CHECKPOINT:
        return REFINER_NONE
    if sampler is not None and schedule_type is None:
        raise InputError(f"refiner_checkpoint: npsd's refiner switches at A1111's completed ratio, from the noise "
                         f"levels of the samplers A1111 runs with k-diffusion; {A1111_SAMPLERS[sampler]} is not one")
    return {"refiner": name.strip(), "refiner_switch_at": _float(body, "refiner_switch_at", 0.0, lo=0.0, hi=1.0)}


def _hires(body, sampler, schedule_type):
    """txt2img's hires fix fields -> the hires_* settings (npsd/cli.py's SETTINGS). sampler,
    schedule_type: the first pass's."""
    if not _bool(body, "enable_hr", False):
        return HIRES_NONE
    label = _str(body, "hr_upscaler") or UPSCALERS["latent"][0]                 # A1111's default: Latent
    if upscaler_named(label) is None:
        raise InputError(f"hr_upscaler {label!r} is not one npsd has; use one of {UPSCALER_LABELS}")
    return {"hires_scale": _float(body, "hr_scale", 2.0, lo=1.0, hi=8.0),
            "hires_upscaler": upscaler_named(label),
            "hires_steps": _int(body, "hr_second_pass_steps", 0, lo=0, hi=1000),
            "hires_strength": _float(body, "denoising_strength", HIRES_DENOISING, lo=0.0, hi=1.0),
            # hr_resize_x/y: A1111's "Resize width/height to" (both 0: by hr_scale); "" prompts: the first pass's
            "hires_resize": resize if any(resize := (_int(body, "hr_resize_x", 0, lo=0, hi=MAX_RESIZE),
                                                     _int(body, "hr_resize_y", 0, lo=0, hi=MAX_RESIZE))) else None,
            "hires_prompt": _str(body, "hr_prompt") or None,
            "hires_negative_prompt": _str(body, "hr_negative_prompt") or None,
            "hires_token_merging_ratio": _float(body, "token_merging_ratio_hr", None, lo=0.0, hi=MAX_RATIO),
            "hires_checkpoint": None if (_str(body, "hr_checkpoint_name") or "").strip() in SAME_CHECKPOINT
            else body["hr_checkpoint_name"].strip(),
            **_hires_sampler(body, sampler, schedule_type)}


def _hires_sampler(body, sampler, schedule_type):
    """hr_sampler_name and hr_scheduler -> hires_sampler, hires_schedule_type (None: the first pass's;
    A1111 sets hr_scheduler to the first pass's scheduler where it is not given)."""
    text = _str(body, "hr_sampler_name")
    hires_sampler, suffix = (None, None) if text in (None, "", "Use same sampler") else \
        sampler_from_name(text, "hr_sampler_name")
    label = (_str(body, "hr_scheduler") or "").strip()
    kind = suffix
    if label.lower() not in ("", "use same scheduler"):
        if label.lower() not in SCHEDULE_NAMED:
            raise InputError(f"hr_scheduler {label!r} is not one npsd has; use one of {', '.join(SCHEDULE_LABELS.values())}")
        kind = SCHEDULE_NAMED[label.lower()]
    return {"hires_sampler": hires_sampler, "hires_schedule_type": kind}


def token_merging(settings, options, overrides, img2img):
    """The token merging ratios of a run -> settings' token_merging_ratio and hires_token_merging_ratio,
    as A1111's get_token_merging_ratio (modules/processing.py) picks them, where a request's 0 is unset:
    txt2img the request's or the option token_merging_ratio; img2img the request's, the option
    token_merging_ratio where override_settings sets it, token_merging_ratio_img2img, or
    token_merging_ratio; the hires pass the request's token_merging_ratio_hr, the option, or the first pass's."""
    if img2img:
        first = (settings["token_merging_ratio"] or overrides.get("token_merging_ratio")
                 or options["token_merging_ratio_img2img"] or options["token_merging_ratio"])
    else:
        first = settings["token_merging_ratio"] or options["token_merging_ratio"]
    hires = settings["hires_token_merging_ratio"] or options["token_merging_ratio_hr"] or first
    return {"token_merging_ratio": first, "hires_token_merging_ratio": hires if settings.get("hires_scale") else None}


def check_hires(settings):
    """The hires fix's own sampler and scheduler against the first pass's (settings with the sampler
    known): npsd runs A1111's schedules in both passes or in neither."""
    if not settings.get("hires_scale") or (settings["hires_sampler"] is None and settings["hires_schedule_type"] is None):
        return
    first, second = settings["sampler"], settings["hires_sampler"] or settings["sampler"]
    on_a1111 = settings["schedule_type"] is not None
    if on_a1111 != (second in KDIFFUSION_SAMPLERS) or (settings["hires_schedule_type"] and not on_a1111):
        raise InputError(f"hr_sampler_name {A1111_SAMPLERS[second]} (hr_scheduler "
                         f"{SCHEDULE_LABELS.get(settings['hires_schedule_type'], 'as the first pass')}) after "
                         f"sampler_name {A1111_SAMPLERS[first]}: npsd runs A1111's schedules in both passes or in "
                         f"neither; send two of {', '.join(A1111_SAMPLERS[s] for s in KDIFFUSION_SAMPLERS)}, or two "
                         f"others without hr_scheduler")


def _read_img2img(body, plan, limits):
    """img2img's fields: the input image, the strength, the inpainting mask."""
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise InputError("init_images must be a list of one base64 image (npsd redraws one input image; "
                         "batch_size sets how many results)")
    plan.image = decode_image(images[0], "init_images[0]", limits)
    plan.settings["strength"] = _float(body, "denoising_strength", 0.8 if not body.get("mask") else 1.0,
                                       lo=0.0, hi=1.0, lo_open=True)
    # (None: the option initial_noise_multiplier's, as A1111's StableDiffusionProcessingImg2Img takes it)
    plan.settings["initial_noise_multiplier"] = _float(body, "initial_noise_multiplier", None, lo=0.0)
    include = _bool(body, "include_init_images", False)
    if not include:
        plan.received["init_images"] = None
    plan.settings["resize_mode"] = RESIZE_MODES[_int(body, "resize_mode", 0, lo=0, hi=2)]
    if not body.get("mask"):
        plan.mode = "img2img"
        return
    plan.mode = "inpaint"
    mask = decode_image(body["mask"], "mask", limits, rgb=False)
    if _bool(body, "inpainting_mask_invert", False):
        mask = ImageOps.invert(mask.convert("L"))                  # 1: repaint the black part
    plan.mask = mask
    blur = _int(body, "mask_blur", lo=0)
    blur_x, blur_y = _int(body, "mask_blur_x", lo=0), _int(body, "mask_blur_y", lo=0)
    if blur is None and blur_x is not None and blur_y is not None and blur_x != blur_y:
        raise InputError(f"mask_blur_x={blur_x} and mask_blur_y={blur_y} differ; npsd blurs the mask the same way "
                         f"in both directions: give mask_blur")
    plan.settings["mask_blur"] = blur if blur is not None else blur_x if blur_x is not None else 0
    fill = _int(body, "inpainting_fill", lo=0)
    plan.settings["masked_content"] = MASKED_CONTENT[1 if fill is None else fill]
    plan.settings["inpaint_area"] = INPAINT_AREAS[int(_bool(body, "inpaint_full_res", False))]
    padding = _int(body, "inpaint_full_res_padding", lo=0)
    plan.settings["masked_area_padding"] = 32 if padding is None else padding
    if not include:
        plan.received["mask"] = None


# --- images ---------------------------------------------------------------------------------------

def decode_image(data, what, limits=None, rgb=True):
    """A base64 image (PNG, JPEG, ...; a "data:image/...;base64," prefix allowed) -> a PIL image
    (RGB when rgb). Its bytes and its pixel count (read from the header, before the pixels are
    decoded) are checked against `limits` and Pillow's MAX_IMAGE_PIXELS."""
    limits = limits or Limits()
    if not isinstance(data, str) or not data:
        raise InputError(f"{what} must be a base64 string of a PNG or JPEG file")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) // 4 * 3 > limits.max_bytes:
        raise InputError(f"{what} is about {len(data) // 4 * 3 / 2**20:.1f} MiB; the limit is "
                         f"{limits.max_bytes / 2**20:.0f} MiB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64; send the file's bytes in base64") from None
    max_pixels = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))                         # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(f"{what} is {w}x{h} pixels, more than the limit of {max_pixels} pixels; "
                                 "send a smaller image")
            img.load()                                                # now the pixels
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        raise InputError(f"{what} is not an image file npsd can read; send a PNG or JPEG file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} is not an image npsd can read ({' '.join(str(e).split())}); send a PNG or "
                         f"JPEG file") from None
    img = upright(img)                                                # as the browser shows it
    return open_image(img, what) if rgb else img


def encode_png(image, parameters=None):
    """A PIL image -> base64 PNG text (no data: prefix, as A1111 returns it), with the "parameters"
    text chunk when given."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_info_response(data, limits=None):
    """/sdapi/v1/png-info: {"info": the parameters text (PNG chunk or EXIF comment, npsd/pngmeta.py)
    or "", "items": the image's other text chunks, "parameters": the fields parsed as A1111 does
    ("Prompt", "Negative prompt", "Steps", "Size-1", "Size-2", ...; values as text)}."""
    img = decode_image(data, "image", limits, rgb=False)
    items = {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop(KEY, None) or _exif_user_comment(img) or ""          # PNG chunk, or A1111's JPEG/WebP EXIF
    parameters = {}
    if text:
        parsed = parse_parameters(text)
        parameters = {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"]}
        for name, value in parsed["fields"].items():
            parameters[name] = value
            if name == "Size" and value.lower().count("x") == 1:
                parameters["Size-1"], parameters["Size-2"] = value.lower().split("x")
    return {"info": text, "items": items, "parameters": parameters}


# --- responses ------------------------------------------------------------------------------------

def info_json(plan, settings, seeds, infotexts, model_name, model_hash, clip_skip, inpainting_unet=False,
              job_timestamp=None, subseeds=None):
    """The response's "info": a JSON string with the fields of A1111's Processed.js(); subseeds: the
    images' variation seeds, when they have them."""
    n = len(infotexts)
    return json.dumps({
        "prompt": settings["prompt"], "all_prompts": [settings["prompt"]] * n,
        "negative_prompt": settings["negative_prompt"], "all_negative_prompts": [settings["negative_prompt"]] * n,
        "seed": seeds[0] if seeds else settings["seed"], "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else -1, "all_subseeds": subseeds or [-1] * n,
        "subseed_strength": settings["variation_strength"],
        "width": settings["width"], "height": settings["height"],
        "sampler_name": A1111_SAMPLERS[settings["sampler"]], "cfg_scale": settings["guidance_scale"],
        "steps": settings["steps"], "batch_size": settings["num_images"],
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": (settings.get("seed_resize_from") or (-1, -1))[0],
        "seed_resize_from_h": (settings.get("seed_resize_from") or (-1, -1))[1],
        "denoising_strength": settings["strength"] if plan.mode != "txt2img" else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": job_timestamp, "clip_skip": clip_skip, "is_using_inpainting_conditioning": inpainting_unet,
        "scheduler": scheduler_label(settings),
    })


def reload_settings(plan, settings, model_title, pos):
    """What the page needs to make image `pos` (from 1) of a call again: A1111's request fields."""
    fields = {"mode": plan.mode, "prompt": settings["prompt"], "negative_prompt": settings["negative_prompt"],
              "steps": settings["steps"], "cfg_scale": settings["guidance_scale"], "width": settings["width"],
              "height": settings["height"], "seed": settings["seed"],
              "sampler_name": A1111_SAMPLERS[settings["sampler"]],
              "scheduler": scheduler_label(settings), "batch_size": settings["num_images"],
              "batch_pos": pos, "sd_model_checkpoint": model_title}
    if settings["variation_strength"]:
        fields.update(subseed=settings["variation_seed"], subseed_strength=settings["variation_strength"])
    if settings.get("seed_resize_from"):
        fields.update(seed_resize_from_w=settings["seed_resize_from"][0], seed_resize_from_h=settings["seed_resize_from"][1])
    if plan.mode != "txt2img":
        fields.update(denoising_strength=settings["strength"], resize_mode=RESIZE_MODES.index(settings["resize_mode"]))
    elif settings.get("hires_scale"):
        fields.update(enable_hr=True, hr_scale=settings["hires_scale"], hr_upscaler=UPSCALERS[settings["hires_upscaler"]][0],
                      hr_second_pass_steps=settings["hires_steps"], denoising_strength=settings["hires_strength"],
                      hr_resize_x=(settings.get("hires_resize") or (0, 0))[0],
                      hr_resize_y=(settings.get("hires_resize") or (0, 0))[1],
                      hr_prompt=settings.get("hires_prompt") or "", hr_negative_prompt=settings.get("hires_negative_prompt") or "",
                      hr_sampler_name=A1111_SAMPLERS[settings["hires_sampler"]] if settings.get("hires_sampler") else "",
                      hr_scheduler=SCHEDULE_LABELS[settings["hires_schedule_type"]] if settings.get("hires_schedule_type")
                      else "", hr_checkpoint_name=settings.get("hires_checkpoint") or "Use same checkpoint")
    if settings.get("token_merging_ratio"):
        fields["token_merging_ratio"] = settings["token_merging_ratio"]
    if settings.get("hires_token_merging_ratio"):
        fields["token_merging_ratio_hr"] = settings["hires_token_merging_ratio"]
    if plan.mode == "txt2img" and settings.get("refiner"):
        fields.update(refiner_checkpoint=settings["refiner"], refiner_switch_at=settings["refiner_switch_at"])
    if plan.mode == "inpaint":
        fields.update(mask_blur=settings["mask_blur"], inpainting_fill=MASKED_CONTENT.index(settings["masked_content"]),
                      inpaint_full_res=settings["inpaint_area"] == "only masked",
                      inpaint_full_res_padding=settings["masked_area_padding"])
    return fields


def model_name_of(path):
    """A model file's A1111 model_name: its name without the extension."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
