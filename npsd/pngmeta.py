"""Generation parameters in PNG files, in the "parameters" text chunk that A1111 and other tools read.

The text has three parts (A1111's layout, so other tools can read npsd's images and npsd can re-run
theirs):

    a red circle on a blue background                       <- the prompt (may span several lines)
    Negative prompt: blurry                                 <- the negative prompt
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 123, Size: 512x512, Model hash: 0123456789, ...

The last line is a list of `Name: value` fields separated by ", "; a value that contains a comma,
a colon or a newline is written as a JSON string ("..."). `Size` is WIDTHxHEIGHT; `Model hash` is
the first 10 hex digits of the SHA-256 of the model file (A1111's "AutoV2" hash).

`parameters_text` writes a run's settings in A1111's names ("Sampler: DPM++ 2M", "CFG scale",
"Clip skip" counted from 1, "RNG: CPU" for torch's CPU generator); `settings_from_png` reads them
back, from npsd's images and A1111's, as the command line's settings (npsd/cli.py, --from-png).

    >>> text = format_parameters("a cat", "blurry", {"Steps": 2, "Sampler": "DDIM", "Seed": 7})
    >>> text
    'a cat\\nNegative prompt: blurry\\nSteps: 2, Sampler: DDIM, Seed: 7'
    >>> parse_parameters(text)
    {'prompt': 'a cat', 'negative_prompt': 'blurry', 'fields': {'Steps': '2', 'Sampler': 'DDIM', 'Seed': '7'}}
"""

import json
import os
import re
import warnings

from PIL import Image, PngImagePlugin

from .a1111_inpaint import INPAINT_AREAS, MASKED_CONTENT
from .errors import InputError, UsageError
from .images import RESIZE_MODES
from .prompts import EMPHASIS_LABELS
from .refiner import HIRES_PASSES as REFINER_PASSES
from .hires import LABELS as UPSCALER_LABELS, SCALE as HIRES_SCALE, UPSCALERS, check_resize, upscaler_named
from .tome import check_ratio
from .version import __version__
from .schedulers import (A1111_AUTOMATIC, A1111_DISCARD_PENULTIMATE, KDIFFUSION_SAMPLERS, PREDICTION_TYPES, SAMPLERS,
                         SCHEDULE_TYPES, SPACINGS, ScheduleOptions, resolve_schedule_type)

KEY = "parameters"
NEGATIVE = "Negative prompt:"
# one "Name: value" field: a name of word characters, spaces, - and /; a JSON-quoted or plain value
FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

MODES = ("txt2img", "img2img", "inpaint")   # the "Pipeline" field: which command made the image
# npsd's sampler names <-> the names A1111 writes in "Sampler:" (read case-insensitively; the table
# at the top of docs/samplers.md)
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                  "dpmpp_2m": "DPM++ 2M", "pndm": "PLMS", "lms": "LMS", "dpmpp_2m_sde": "DPM++ 2M SDE",
                  "unipc": "UniPC", "dpm2": "DPM2", "dpm2_a": "DPM2 a", "lcm": "LCM", "deis": "DEIS",
                  "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_3m_sde": "DPM++ 3M SDE"}
# --schedule-type <-> A1111's "Schedule type" field (A1111's labels; "SGMUniform" is an older alias)
SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                   "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
                   "beta": "Beta"}
assert tuple(SCHEDULE_LABELS) == SCHEDULE_TYPES
# a "Schedule type" field or A1111 API "scheduler" (its name or label, any case) -> --schedule-type
SCHEDULE_NAMED = {**{name: name for name in SCHEDULE_LABELS},
                  **{label.lower(): name for name, label in SCHEDULE_LABELS.items()}, "sgmuniform": "sgm_uniform"}
# A1111's settings of its schedule types: a run's setting -> (its npsd.schedulers.ScheduleOptions
# field, A1111's field in the parameters; "Discard penultimate sigma: True" is A1111's
# always_discard_next_to_last_sigma)
SCHEDULE_SETTINGS = {"schedule_sigma_min": ("sigma_min", "Schedule min sigma"),
                     "schedule_sigma_max": ("sigma_max", "Schedule max sigma"),
                     "schedule_rho": ("rho", "Schedule rho"),
                     "discard_penultimate_sigma": ("discard_penultimate", "Discard penultimate sigma"),
                     "beta_schedule_alpha": ("beta_alpha", "Beta schedule alpha"),
                     "beta_schedule_beta": ("beta_beta", "Beta schedule beta")}
# --rng <-> the "RNG" field (A1111's value "CPU" is torch's CPU generator, which rng="torch" reproduces)
RNG_FIELD = {"numpy": "numpy", "torch": "CPU"}
# --vae-decoder <-> A1111's "VAE Decoder" field ("Full" or "TAESD"; A1111 writes it only for TAESD).
# npsd adds "TAESD hash": the short hash (short_hash) of the TAESD decoder's weights file.
DECODER_FIELD = {"vae": "Full", "taesd": "TAESD"}


def quote(value):
    """A field value as written: plain, or a JSON string when it holds ',', ':' or a newline."""
    text = str(value)
    if not any(c in text for c in ',:\n"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def format_parameters(prompt, negative_prompt, fields):
    """prompt, negative prompt (str) and an ordered {name: value} dict -> the "parameters" text.
    Fields whose value is None are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    return f"{prompt}\n{NEGATIVE} {negative_prompt}\n{line}"


def _field_line(line):
    """{name: value} when the line is a field line (at least one `Name: value` and nothing else)."""
    found = FIELD.findall(line)
    if not found:
        return None
    rebuilt = ", ".join(f"{k}: {v}" for k, v in found)
    if rebuilt.replace(" ", "") != line.strip().rstrip(",").replace(" ", ""):
        return None
    return {k.strip(): unquote(v) for k, v in found}


def parse_parameters(text):
    """The "parameters" text -> {"prompt": str, "negative_prompt": str, "fields": {name: str}}.

    Field values stay strings (A1111 writes numbers as text too); the caller converts the ones it
    uses. A text without a field line gives fields == {}."""
    if not isinstance(text, str):
        raise InputError(f"PNG parameters must be text, got {type(text).__name__}")
    lines = text.strip("\n").split("\n")
    fields = {}
    if len(lines) > 1 or (lines and not lines[0].startswith(NEGATIVE)):
        parsed = _field_line(lines[-1]) if lines else None
        if parsed is not None and len(parsed) >= 2:
            fields, lines = parsed, lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if not in_negative and line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].lstrip(" ")
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), "fields": fields}


def png_info(text):
    """A PngInfo holding the "parameters" chunk (tEXt when the text is Latin-1, else iTXt as UTF-8).
    A file name that is not UTF-8 (its bytes kept as lone surrogates, Python's surrogateescape) is
    written with U+FFFD for each such byte, as UTF-8 cannot hold them."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    return info


def _exif_user_comment(img):
    """A1111 stores the parameters of JPEG/WebP images in EXIF UserComment: an 8-byte charset
    prefix ("UNICODE\\0": UTF-16, big-endian as written; "ASCII\\0\\0\\0") then the text."""
    raw = img.getexif().get_ifd(0x8769).get(0x9286)            # Exif IFD, UserComment
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        le = body[:1] != b"\x00" and body[1:2] == b"\x00"        # a few writers use little-endian
        return body.decode("utf-16-le" if le else "utf-16-be", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\x00")


def read_parameters(path):
    """The "parameters" text of an image: the PNG chunk npsd writes, or the EXIF UserComment that
    A1111 writes in JPEG/WebP files. A one-line InputError when there is none."""
    try:
        with Image.open(path) as img:
            text = img.info.get(KEY)                      # a chunk before the pixels, where npsd and A1111 write it
            if not isinstance(text, str):
                img.load()                                # one after them, or EXIF
                text = img.info.get(KEY)
            if not isinstance(text, str):
                text = _exif_user_comment(img)
    except FileNotFoundError:
        raise InputError(f"--from-png: {path} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:          # bomb: > 179 Mpixels
        raise InputError(f"--from-png: cannot read {path} as an image ({e})") from None
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"--from-png: {path} has no '{KEY}' text chunk or EXIF comment (not made by npsd or "
                         f"A1111, or the metadata was stripped); give the PNG that npsd wrote")
    return text


# --- A1111's fields <-> the command line's settings ---------------------------------------------

def parameters_text(settings, mode, model_name, model_hash, vae_name, vae_hash, width, height, batch, pos,
                    networks=None, taesd_hash=None, checkpoints=None):
    """The "parameters" text of one image made by the command line (settings: npsd/cli.py's SETTINGS,
    the model's defaults filled in). Settings at their default values are left out. networks: the
    "Lora hashes" and "TI hashes" fields (npsd/cli.py's network_hashes). taesd_hash: the short hash
    of the TAESD weights that decoded the image (settings["vae_decoder"] == "taesd"). checkpoints: the
    "Refiner" and "Hires checkpoint" titles, "NAME [hash]" (checkpoint_title), of those in use."""
    taesd = settings.get("vae_decoder", "vae") == "taesd"
    hires = mode == "txt2img" and settings.get("hires_scale")
    checkpoints = checkpoints or {}
    switch_at = settings.get("refiner_switch_at")
    refined = checkpoints.get("Refiner") is not None and switch_at is not None and switch_at < 1   # (A1111: once it switched)
    fields = {
        "Steps": settings["steps"],
        "Sampler": A1111_SAMPLERS[settings["sampler"]],
        "Schedule type": schedule_label(settings),
        "CFG scale": _num(settings["guidance_scale"]),
        "Seed": settings["seed"],
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "VAE Decoder": DECODER_FIELD["taesd"] if taesd else None,
        "TAESD hash": taesd_hash if taesd else None,
        "Denoising strength": _num(settings["strength"]) if mode != "txt2img" else (
            _num(settings["hires_strength"]) if hires else None),                # A1111: the hires pass's
        "Mask blur": settings["mask_blur"] if mode == "inpaint" else None,
        "Masked content": settings.get("masked_content") if mode == "inpaint" and settings.get("masked_content")
        not in (None, "original") else None,
        "Variation seed": settings.get("variation_seed") if settings.get("variation_strength") else None,
        "Variation seed strength": _num(settings["variation_strength"]) if settings.get("variation_strength") else None,
        "ENSD": settings.get("eta_noise_seed_delta") or None,
        "Token merging ratio": _num(settings["token_merging_ratio"]) if settings.get("token_merging_ratio") else None,
        "Token merging ratio hr": _num(_hires_tome(settings)) if hires and _hires_tome(settings) else None,
        "NGMS": _num(settings["negative_guidance_min_sigma"]) if settings.get("negative_guidance_min_sigma") else None,
        "Emphasis": EMPHASIS_LABELS[settings["emphasis"]] if settings.get("emphasis") not in (None, "original") else None,
        **schedule_fields(settings, hires),
        "Seed resize from": "{}x{}".format(*settings["seed_resize_from"]) if settings.get("seed_resize_from") else None,
        "Noise multiplier": _num(settings["initial_noise_multiplier"]) if mode != "txt2img"
        and settings.get("initial_noise_multiplier") not in (None, 1.0) else None,
        "Conditional mask weight": _num(settings["inpainting_mask_weight"])
        if settings.get("inpainting_mask_weight") not in (None, 1.0) else None,
        "Resize mode": settings["resize_mode"].capitalize() if mode != "txt2img" and settings.get("resize_mode")
        not in (None, "just resize") else None,
        "Inpaint area": "Only masked" if mode == "inpaint" and settings.get("inpaint_area") == "only masked" else None,
        "Masked area padding": settings.get("masked_area_padding") if mode == "inpaint"
        and settings.get("inpaint_area") == "only masked" else None,
        "Hires upscale": _num(settings["hires_scale"]) if hires and not settings.get("hires_resize") else None,
        "Hires resize": "x".join(map(str, settings["hires_resize"])) if hires and settings.get("hires_resize") else None,
        "Hires steps": settings["hires_steps"] if hires and settings["hires_steps"] else None,
        "Hires upscaler": UPSCALERS[settings["hires_upscaler"]][0] if hires else None,
        "Hires checkpoint": checkpoints.get("Hires checkpoint") if hires else None,
        "Hires sampler": A1111_SAMPLERS[settings["hires_sampler"]] if hires and settings.get("hires_sampler")
        not in (None, settings["sampler"]) else None,
        "Hires schedule type": _hires_schedule_label(settings) if hires else None,
        "Hires prompt": settings.get("hires_prompt") if hires and settings.get("hires_prompt") not in
        (None, settings["prompt"]) else None,
        "Hires negative prompt": settings.get("hires_negative_prompt") if hires and settings.get("hires_negative_prompt")
        not in (None, settings["negative_prompt"]) else None,
        "Hires refiner": settings.get("hires_refiner_pass") if refined and hires
        and settings.get("hires_refiner_pass") not in (None, "second pass") else None,
        "Refiner": checkpoints.get("Refiner") if refined else None,
        "Refiner switch at": _num(settings["refiner_switch_at"]) if refined else None,
        "Eta": _num(settings["eta"]) if settings["eta"] else None,
        "Clip skip": settings["clip_skip"] + 1 if settings["clip_skip"] else None,
        "Timestep spacing": settings["timestep_spacing"],
        "Prediction type": settings["prediction_type"] if settings["prediction_type"] != "epsilon" else None,
        "Guidance rescale": _num(settings["guidance_rescale"]) if settings["guidance_rescale"] else None,
        "Long prompt": settings["long_prompt"] if settings["long_prompt"] != "truncate" else None,
        "Batch size": batch if batch > 1 else None,
        "Batch pos": pos if batch > 1 else None,
        "EMA": "off" if settings["no_ema"] else None,
        "RNG": RNG_FIELD[settings["rng"]],
        "Tiling": "True" if settings.get("tiling") else None,
        "SDE noise": "Brownian" if settings["sde_noise"] == "brownian" else None,
        "Prompt syntax": settings["prompt_syntax"],
        "Lora": ", ".join(f"{name}: {_num(strength)}" for name, strength in _loras(settings)) or None,
        **(networks or {}),
        "Pipeline": mode,
        "npsd version": __version__,
    }
    return format_parameters(settings["prompt"], settings["negative_prompt"], fields)


def schedule_label(settings):
    """The "Schedule type" field: A1111's schedule (schedule_type; "automatic" as A1111 resolves it, the
    type it writes), or "Karras" for diffusers' Karras sigmas (with a "Timestep spacing" field), or None."""
    kind = settings.get("schedule_type")
    if kind is None:
        return "Karras" if settings["karras"] else None
    return SCHEDULE_LABELS[resolve_schedule_type(settings["sampler"], kind)]


def schedule_options_of(settings):
    """The npsd.schedulers.ScheduleOptions of a run's settings (SCHEDULE_SETTINGS; those left None:
    A1111's defaults), or None without a schedule type."""
    if settings.get("schedule_type") is None:
        return None
    return ScheduleOptions(**{field: settings[k] for k, (field, _) in SCHEDULE_SETTINGS.items()
                              if settings.get(k) is not None})


def schedule_fields(settings, hires):
    """The fields A1111's get_sigmas writes for its schedule settings, in either pass (hires: a
    txt2img with the hires fix): an overridden sigma_min, sigma_max or rho where a schedule type
    makes the sigmas (with "Automatic", the samplers in A1111_AUTOMATIC; the others take k-diffusion's
    get_sigmas, which reads none), "Discard penultimate sigma" where the setting discards one (not
    where the sampler does by itself), Beta's alpha and beta where Beta makes them. A1111 writes the
    settings' floats as Python prints them (5.0). The model's own ends are 0 here
    (npsd.generation.model_defaults)."""
    options = schedule_options_of(settings)
    if options is None:
        return {}
    passes = [(settings["sampler"], settings["schedule_type"])]
    if hires:
        passes.append((settings.get("hires_sampler") or settings["sampler"],
                       settings.get("hires_schedule_type") or settings["schedule_type"]))
    label = {field: name for field, name in SCHEDULE_SETTINGS.values()}
    fields = {}
    for sampler, kind in passes:
        used = resolve_schedule_type(sampler, kind)
        if kind != "automatic" or sampler in A1111_AUTOMATIC:
            fields.update({label[k]: repr(v) for k, v in options.overrides(used, 0.0, 0.0).items()})
        if options.discard_penultimate and sampler not in A1111_DISCARD_PENULTIMATE:
            fields[label["discard_penultimate"]] = "True"
        if used == "beta":
            fields.update({label["beta_alpha"]: repr(float(options.beta_alpha)),
                           label["beta_beta"]: repr(float(options.beta_beta))})
    return fields


def _hires_schedule_label(settings):
    """The "Hires schedule type" field: the label of the second pass's schedule where it is not the
    first pass's (A1111 writes it so); None otherwise or on diffusers' schedules."""
    kind = settings.get("hires_schedule_type") or settings.get("schedule_type")
    if kind is None:
        return None
    label = SCHEDULE_LABELS[resolve_schedule_type(settings.get("hires_sampler") or settings["sampler"], kind)]
    return label if label != schedule_label(settings) else None


def _loras(settings):
    """The --lora files (by stem) and the LoRAs re-made from a PNG (by name), with their strengths."""
    import os
    return ([(os.path.splitext(os.path.basename(path))[0], strength) for path, strength in settings["lora"]]
            + list(settings["lora_names"]))


def short_hash(path):
    """A1111's short hash of a LoRA or an embedding file: the first 12 hex digits of the SHA-256 of a
    .safetensors file's tensor data (after its header: the "addnet" hash) or of any other whole file."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).lower().endswith(".safetensors"):
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _num(x):
    """7.5 -> "7.5", 7.0 -> "7" (what A1111 writes), full float precision otherwise."""
    return int(x) if float(x).is_integer() else repr(float(x))


def settings_from_png(path, mode):
    """The settings stored in an image's "parameters" text (npsd's or A1111's) -> {setting: value},
    named as the command line's options (npsd/cli.py's SETTINGS). Fields that are absent are left
    out. Keys starting with "_" are not options: "_select" (the batch position to re-make), "_model"
    (the stored model name and hash), "_taesd_hash" (that of the TAESD decoder), "_bad_sampler" /
    "_bad_rng" / "_bad_vae_decoder" (an error unless --sampler / --rng / --vae-decoder is given)."""
    p = parse_parameters(read_parameters(path))
    f = p["fields"]
    made_by = f.get("Pipeline")
    if made_by in MODES and made_by != mode:
        needs = {"img2img": " --image FILE", "inpaint": " --image FILE --mask FILE"}.get(made_by, "")
        raise UsageError(f"{path} was made by {made_by}; run `npsd {made_by} --from-png {path}{needs}`")
    settings = {"prompt": p["prompt"], "negative_prompt": p["negative_prompt"],
                "steps": _convert(f, "Steps", int, "a whole number"),
                "guidance_scale": _convert(f, "CFG scale", float, "a number"),
                "seed": _convert(f, "Seed", int, "a whole number")}
    if "Size" in f:
        if size_of(f["Size"]) is None:
            raise InputError(f"--from-png: the stored Size is {f['Size']!r}, not WIDTHxHEIGHT")
        settings["width"], settings["height"] = size_of(f["Size"])
    suffix = None
    if "Sampler" in f:
        found = _sampler_from_field(f["Sampler"])
        suffix = found.pop("_schedule", None)
        settings.update(found)
    settings.update(_schedule_from_fields(f, settings.get("sampler"), suffix))
    settings["strength"] = _convert(f, "Denoising strength", float, "a number")
    if mode == "txt2img" and ("Hires upscale" in f or "Hires resize" in f):     # A1111's hires fix
        settings.update(_hires_from_fields(f))
        settings["hires_strength"] = settings.pop("strength")
    settings["eta"] = _convert(f, "Eta", float, "a number")
    skip = _convert(f, "Clip skip", int, "a whole number")            # A1111's count: 1 = last layer
    settings["clip_skip"] = None if skip is None else max(skip - 1, 0)
    settings["mask_blur"] = _convert(f, "Mask blur", int, "a whole number")
    settings["masked_content"] = _choice(f, "Masked content", MASKED_CONTENT, "--masked-content")
    settings["inpaint_area"] = _choice(f, "Inpaint area", INPAINT_AREAS, "--inpaint-area")   # A1111: "Only masked"
    settings["masked_area_padding"] = _convert(f, "Masked area padding", int, "a whole number")
    settings["resize_mode"] = _choice(f, "Resize mode", RESIZE_MODES, "--resize-mode")       # npsd's own field
    settings["variation_seed"] = _convert(f, "Variation seed", int, "a whole number")
    settings["variation_strength"] = _convert(f, "Variation seed strength", float, "a number")
    settings["eta_noise_seed_delta"] = _convert(f, "ENSD", int, "a whole number")
    settings["seed_resize_from"] = _seed_resize(f.get("Seed resize from"))
    if mode != "txt2img":                                             # (A1111 writes it in img2img only)
        settings["initial_noise_multiplier"] = _at_least_0(f, "Noise multiplier")
    settings["negative_guidance_min_sigma"] = _at_least_0(f, "NGMS")
    if "Tiling" in f:                                                 # A1111 writes "True" or nothing
        settings["tiling"] = _choice(f, "Tiling", ("true", "false"), "--tiling or --no-tiling") == "true"
    for k, (_, name) in SCHEDULE_SETTINGS.items():                   # (applied with a schedule type)
        settings[k] = _at_least_0(f, name) if k != "discard_penultimate_sigma" else (
            f.get(name, "").strip().lower() == "true" or None)
    settings["token_merging_ratio"] = _ratio(f, "Token merging ratio")
    if "Emphasis" in f:                                               # A1111's "No norm": no_norm
        settings["emphasis"] = emphasis_named(f["Emphasis"])
        if settings["emphasis"] is None:
            raise InputError(f"--from-png: the stored 'Emphasis' is {f['Emphasis']!r}, not one npsd has "
                             f"({', '.join(EMPHASIS_LABELS.values())}); give --emphasis")
    settings["inpainting_mask_weight"] = _convert(f, "Conditional mask weight", float, "a number")
    if f.get("Timestep spacing") in SPACINGS and "schedule_type" not in settings:
        settings["timestep_spacing"] = f["Timestep spacing"]
    if f.get("Prediction type") in PREDICTION_TYPES:
        settings["prediction_type"] = f["Prediction type"]
    settings["guidance_rescale"] = _convert(f, "Guidance rescale", float, "a number")
    if f.get("Long prompt") in ("truncate", "chunk"):
        settings["long_prompt"] = f["Long prompt"]
    settings["num_images"] = n = _convert(f, "Batch size", int, "a whole number")
    pos = _convert(f, "Batch pos", int, "a whole number")
    settings["_select"] = pos if pos is not None and n and n > 1 else None
    settings["_model"] = (f.get("Model"), f.get("Model hash"))
    settings["no_ema"] = True if f.get("EMA") == "off" else None
    if "RNG" in f:                                                    # absent: npsd's own numpy numbers
        settings.update(_rng_from_field(f["RNG"]))
    # npsd writes "SDE noise: Brownian"; A1111 draws the noise of its SDE samplers so, without a field
    if f.get("SDE noise", "").strip().lower() == "brownian" or (
            "npsd version" not in f and (settings.get("sampler") in A1111_BROWNIAN
                                         or settings.get("hires_sampler") in A1111_BROWNIAN)):
        settings["sde_noise"] = "brownian"
    if "VAE Decoder" in f:
        by_field = {v.lower(): k for k, v in DECODER_FIELD.items()}
        settings["vae_decoder"] = by_field.get(f["VAE Decoder"].strip().lower())
        if settings["vae_decoder"] is None:
            settings["_bad_vae_decoder"] = (f"--from-png: the image was decoded by {f['VAE Decoder']!r}, which npsd "
                                            "lacks (it has Full and TAESD); give --vae-decoder")
    settings["_taesd_hash"] = f.get("TAESD hash")
    if f.get("Prompt syntax") in ("a1111", "plain"):
        settings["prompt_syntax"] = f["Prompt syntax"]
    settings["lora_names"] = _named_values(f.get("Lora"), "Lora") or None
    if mode == "txt2img":                                             # A1111's refiner, hires checkpoint
        settings.update(_checkpoints_from_fields(f, "hires_scale" in settings))
    settings["ti_names"] = [name for name, _ in _named_pairs(f.get("TI hashes"))] or None
    unapplied = unapplied_fields(f, mode)
    if unapplied:
        warnings.warn(f"--from-png: the PNG used A1111 settings that npsd does not apply ({', '.join(unapplied)}); "
                      f"the image will differ")
    return {k: v for k, v in settings.items() if v is not None}


# A1111's fields that change its image and that npsd does not apply (A1111 writes each only when it
# is in use): a re-make from such a PNG says so instead of ignoring them
A1111_UNAPPLIED = ("Hires CFG Scale", "Face restoration", "Hypernet", "Refiner switch by sampling steps")
A1111_UNAPPLIED_PREFIXES = ("ADetailer ", "ControlNet", "Soft inpainting")   # extensions' (and built-in ones') fields
# the hires fix's fields npsd applies (to txt2img only)
HIRES_FIELDS = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires prompt", "Hires negative prompt",
                "Hires sampler", "Hires schedule type", "Token merging ratio hr", "Hires checkpoint", "Hires refiner")
# A1111's refiner's fields, which npsd's command line applies to txt2img
REFINER_FIELDS = ("Refiner", "Refiner switch at")
# the samplers A1111 runs with k-diffusion's BrownianTreeNoiseSampler (a Brownian tree of the image's
# seed): npsd's sde_noise="brownian" (npsd/brownian.py); its own default draws the noise step by step
A1111_BROWNIAN = ("dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde")


def _schedule_from_fields(f, sampler, suffix):
    """The schedule of a stored run -> {"schedule_type": ...} (A1111's sigmas), {"karras": True}
    (diffusers' Karras sigmas), {"_bad_schedule_type": message} or {}.

    npsd writes "Timestep spacing" with diffusers' schedules and never with A1111's; A1111 never
    writes it. So without that field, a sampler A1111 runs with k-diffusion ran on A1111's schedule:
    the "Schedule type" field's, the sampler name's old suffix ("DPM++ 2M Karras"), or, with neither,
    A1111's Uniform (A1111 writes the type whenever it is another)."""
    text = f.get("Schedule type", "").strip()
    kind = SCHEDULE_NAMED.get(text.lower()) if text else suffix
    if "Timestep spacing" in f or sampler not in KDIFFUSION_SAMPLERS:
        return {"karras": True} if kind == "karras" else {}
    if text and kind is None:
        return {"_bad_schedule_type": f"--from-png: the image's schedule type {text!r} is not one npsd has "
                                      f"({', '.join(SCHEDULE_LABELS.values())}); give --schedule-type"}
    return {"schedule_type": kind or "uniform"}


def _hires_tome(settings):
    """The hires pass's token merging ratio: its own, or (None) the first pass's, as A1111's
    get_token_merging_ratio(for_hr=True)."""
    own = settings.get("hires_token_merging_ratio")
    return settings.get("token_merging_ratio") if own is None else own


def _hires_from_fields(f):
    """A1111's hires fix fields -> the hires_* settings (or "_bad_hires_upscaler" for an upscaler npsd lacks)."""
    found = {"hires_scale": _convert(f, "Hires upscale", float, "a number") or HIRES_SCALE,
             "hires_steps": _convert(f, "Hires steps", int, "a whole number"),
             "hires_resize": _hires_resize(f["Hires resize"]) if "Hires resize" in f else None,
             "hires_prompt": f.get("Hires prompt") or None, "hires_negative_prompt": f.get("Hires negative prompt") or None,
             "hires_token_merging_ratio": _ratio(f, "Token merging ratio hr")}
    suffix = None
    if "Hires sampler" in f:
        found["hires_sampler"], suffix = sampler_from_a1111(f["Hires sampler"])
        if found["hires_sampler"] is None:                                   # an error unless --hires-sampler
            found["_bad_hires_sampler"] = (f"--from-png: the stored hires sampler {f['Hires sampler']!r} is not one "
                                           f"npsd has ({', '.join(A1111_SAMPLERS.values())}); give --hires-sampler")
    text = f.get("Hires schedule type", "").strip()
    found["hires_schedule_type"] = SCHEDULE_NAMED.get(text.lower()) if text else suffix   # (None: the first's)
    if text and found["hires_schedule_type"] is None:
        raise InputError(f"--from-png: the stored hires schedule type {text!r} is not one npsd has "
                         f"({', '.join(SCHEDULE_LABELS.values())}); give --hires-schedule-type")
    label = f.get("Hires upscaler", UPSCALERS["latent"][0]).strip()          # A1111's default: Latent
    found["hires_upscaler"] = upscaler_named(label)
    if found["hires_upscaler"] is None:
        found["_bad_hires_upscaler"] = (f"--from-png: the image's hires upscaler {label!r} is not one npsd has "
                                        f"({UPSCALER_LABELS}); give --hires-upscaler")
    return found


def checkpoint_title(name, digest):
    """A checkpoint as A1111's infotext names it (CheckpointInfo.short_title): "NAME [hash]", NAME the
    file's name without its extension, hash the first 10 hex digits of its SHA-256 (npsd.generation.file_hash)."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(name)))[0]
    return f"{stem} [{digest}]" if digest else stem


def title_name(text):
    """"NAME [hash]" (checkpoint_title) -> (NAME, hash or None)."""
    text = text.strip()
    if text.endswith("]") and " [" in text:
        name, digest = text[:-1].rsplit(" [", 1)
        return name.strip(), digest.strip() or None
    return text, None


def _checkpoints_from_fields(f, hires):
    """A1111's "Refiner", "Refiner switch at", "Hires refiner" and (with the hires fix) "Hires
    checkpoint" -> the settings refiner, refiner_switch_at, hires_refiner_pass, hires_checkpoint (names),
    and "_refiner", "_hires_checkpoint": (name, hash) for the files found under that name."""
    found = {}
    if "Refiner" in f:
        found["_refiner"] = title_name(f["Refiner"])
        found["refiner"] = found["_refiner"][0]
        found["refiner_switch_at"] = _convert(f, "Refiner switch at", float, "a number")
        found["hires_refiner_pass"] = _choice(f, "Hires refiner", REFINER_PASSES, "--hires-refiner-pass")
    if hires and "Hires checkpoint" in f:
        found["_hires_checkpoint"] = title_name(f["Hires checkpoint"])
        found["hires_checkpoint"] = found["_hires_checkpoint"][0]
    return found


def size_of(text):
    """"WIDTHxHEIGHT", as A1111 writes sizes ("512x768") -> (width, height), or None where the text is
    not two whole numbers."""
    try:
        w, h = (int(v) for v in text.strip().lower().split("x"))
    except ValueError:
        return None
    return w, h


def _hires_resize(text):
    """A1111's "Hires resize: 1024x768" -> (1024, 768); 0 for a side it derives."""
    try:
        return check_resize(size_of(text))
    except InputError as e:
        raise InputError(f"--from-png: the stored Hires resize {text!r}: {e}; give --hires-scale or --hires-resize") \
            from None


def unapplied_fields(fields, mode="txt2img"):
    """The stored fields npsd leaves out: "name: value" (the name alone for a long value). mode: the
    command that re-makes the image (hires fix applies to txt2img only)."""
    names = [k for k in fields if k in A1111_UNAPPLIED or k.startswith(A1111_UNAPPLIED_PREFIXES)
             or (k in HIRES_FIELDS + REFINER_FIELDS and mode != "txt2img")      # (npsd's CLI: txt2img's)
             or (k == "Noise multiplier" and mode == "txt2img")]                 # (an img2img field)
    return [f"{k}: {fields[k]}" if len(str(fields[k])) <= 30 else k for k in names]


def _seed_resize(text):
    """A1111's "Seed resize from: WxH" -> (width, height), or None when absent (A1111 writes it only in use)."""
    if text is None:
        return None
    w, h = size_of(text) or (0, 0)
    if w <= 0 or h <= 0:
        raise InputError(f"--from-png: the stored 'Seed resize from' is {text!r}, not WIDTHxHEIGHT of two whole "
                         f"numbers > 0; give --seed-resize-from")
    return w, h


def _ratio(f, name):
    """A stored token merging ratio (npsd/tome.py), or None."""
    value = _convert(f, name, float, "a number")
    if value is not None:
        check_ratio(value, f"--from-png: the stored '{name}'")
    return value


def _at_least_0(f, name):
    value = _convert(f, name, float, "a number")
    if value is not None and not value >= 0:
        raise InputError(f"--from-png: the stored '{name}' is {f[name]!r}, not a number >= 0")
    return value


def _named_pairs(text):
    """ "a: 1, b: 0.5" -> [("a", "1"), ("b", "0.5")] (A1111's "Lora hashes" / "TI hashes" layout)."""
    pairs = []
    for item in (text or "").split(","):
        name, _, value = item.strip().rpartition(":")
        if name.strip():
            pairs.append((name.strip(), value.strip()))
    return pairs


def _named_values(text, field):
    try:
        return [(name, float(value)) for name, value in _named_pairs(text)]
    except ValueError:
        raise InputError(f"--from-png: the stored '{field}' is {text!r}, not NAME: STRENGTH, ...") from None


def emphasis_named(label):
    """A1111's emphasis label ("No norm", any case) -> npsd's name (npsd.prompts.EMPHASIS), or None."""
    return {v.lower(): k for k, v in EMPHASIS_LABELS.items()}.get(label.strip().lower())


def _choice(fields, name, choices, option):
    """A stored field that names one of choices (in any case) -> that choice; None when absent."""
    if name not in fields:
        return None
    if fields[name].lower() not in choices:
        raise InputError(f"--from-png: the stored '{name}' is {fields[name]!r}, not one npsd has "
                         f"({', '.join(choices)}); give {option}")
    return fields[name].lower()


def _convert(fields, name, kind, what):
    if name not in fields:
        return None
    text = fields[name]
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"--from-png: the stored '{name}' is {text!r}, not {what}; "
                         f"give the option explicitly") from None


def sampler_from_a1111(name):
    """A1111's sampler name ("DPM++ 2M", "Euler a", before A1111 1.9 also "DPM++ 2M Karras" and
    "DPM++ 2M SDE Exponential"; any case) or npsd's ("dpmpp_2m") -> (npsd's name or None, the
    schedule type the name's suffix asks for: "karras", "exponential" or None)."""
    text, schedule = name.strip(), None
    for suffix in ("karras", "exponential"):
        if text.lower().endswith(" " + suffix):
            text, schedule = text[: -len(suffix) - 1], suffix
    by_label = {label.lower(): npsd_name for npsd_name, label in A1111_SAMPLERS.items()}
    return by_label.get(text.lower(), text if text in SAMPLERS else None), schedule


def _sampler_from_field(text):
    """A "Sampler" field -> {"sampler": npsd's name or None, "_schedule": the name's schedule suffix,
    "_bad_sampler" when the name is not npsd's}."""
    found = {}
    found["sampler"], found["_schedule"] = sampler_from_a1111(text)
    if found["sampler"] is None:                                      # an error unless --sampler is given
        found["_bad_sampler"] = (f"--from-png: the stored sampler {text!r} is not one npsd has "
                                 f"({', '.join(A1111_SAMPLERS.values())}); give --sampler")
    return found


def _rng_from_field(text):
    """An "RNG" field -> {"rng": "numpy" | "torch" | None, and "_bad_rng" for a generator npsd lacks}."""
    by_field = {v.lower(): k for k, v in RNG_FIELD.items()}
    found = {"rng": by_field.get(text.strip().lower())}
    if found["rng"] is None:                                          # an error unless --rng is given
        found["_bad_rng"] = (f"--from-png: the image's noise came from the {text!r} generator, which npsd "
                             f"cannot reproduce (it has numpy and torch's CPU one); give --rng to run anyway")
    return found
