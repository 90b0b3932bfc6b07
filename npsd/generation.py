"""A run's settings turned into a pipeline call: what the command line (npsd/cli.py) and
`npsd serve` (npsd/serve/) share.

A run's settings are a dict (npsd.cli.SETTINGS: prompt, steps, sampler, seed, ...) that the command
line builds from its options (and --from-png's PNG) and the server from AUTOMATIC1111's request
fields; `model_defaults` fills what was left None from the model's config, `pipeline_call` runs
txt2img, img2img or inpaint with them, and `model_file` / `file_hash` / `network_hashes` give the
hashes the PNG parameters record.
"""

import hashlib
import os

from .config import generation_defaults, with_fallbacks
from .pngmeta import schedule_options_of, short_hash


def file_hash(path, chunk=1 << 22):
    """First 10 hex digits of the SHA-256 of a file (A1111's "AutoV2" model hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:10]


def model_file(pipe, model_arg):
    """The file that identifies the model: the checkpoint file, or a diffusers folder's UNet file."""
    info = getattr(pipe, "info", {}) or {}
    files = info.get("files") or {}
    for candidate in (files.get("unet"), info.get("file"), model_arg):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None



def network_hashes(pipe, settings, args):
    """{"Lora hashes": "name: hash, ...", "TI hashes": ...} as A1111 writes them (npsd.pngmeta.short_hash)
    for the LoRAs of --lora and of the prompt's tags, and the embeddings the prompts used."""
    from .embeddings import embedding_files, used_embeddings
    from .pipeline import _lora_file
    from .prompts import extract_loras
    loras = {os.path.splitext(os.path.basename(path))[0]: path for path, _ in settings["lora"]}
    loras.update({name: pipe.loras[name].path for name, _ in settings["lora_names"]})
    if settings["prompt_syntax"] == "a1111":
        for tag in extract_loras(settings["prompt"])[1]:
            loras.setdefault(tag.name, _lora_file(args.lora_dir, tag.name))
    used = used_embeddings(pipe, [settings["prompt"], settings["negative_prompt"]]) if args.embeddings_dir else []
    files = embedding_files(args.embeddings_dir) if used else {}
    embeddings = {name: files[name][0] for name in used if name in files}
    return {"Lora hashes": ", ".join(f"{n}: {short_hash(p)}" for n, p in loras.items()) or None,
            "TI hashes": ", ".join(f"{n}: {short_hash(p)}" for n, p in embeddings.items()) or None}



def model_defaults(settings, pipe):
    """Fill the settings left None with the model's own defaults: npsd.config.generation_defaults
    (what the pipeline uses too), and the timestep spacing and prediction type of its scheduler.
    A schedule sigma_min or sigma_max equal to the model's own is A1111's "not overridden": 0."""
    from .schedulers import a1111_model_ends, sigma_table
    ends = a1111_model_ends(sigma_table(pipe.config))
    for k, end in zip(("schedule_sigma_min", "schedule_sigma_max"), ends):
        if settings.get(k) == end:
            settings[k] = 0.0
    defaults = generation_defaults(pipe.config)
    scheduler = with_fallbacks("scheduler", pipe.config.get("scheduler"))
    settings["steps"] = settings["steps"] or defaults["num_inference_steps"]
    if settings["guidance_scale"] is None:
        settings["guidance_scale"] = defaults["guidance_scale"]
    settings["sampler"] = settings["sampler"] or defaults["sampler"]
    if settings.get("schedule_type") is None:                         # (A1111's schedules have no spacing)
        settings["timestep_spacing"] = settings["timestep_spacing"] or scheduler["timestep_spacing"]
    settings["prediction_type"] = settings["prediction_type"] or scheduler["prediction_type"]



def hires_of(settings):
    """The npsd.hires.Hires of a run's settings (--hires-scale and the rest), or None."""
    if not settings.get("hires_scale"):
        return None
    from .hires import Hires
    return Hires(settings["hires_scale"], settings["hires_upscaler"], settings["hires_steps"], settings["hires_strength"],
                 settings.get("hires_resize"), settings.get("hires_prompt"), settings.get("hires_negative_prompt"),
                 settings.get("hires_sampler"), settings.get("hires_schedule_type"),
                 settings.get("hires_token_merging_ratio"))


def step_range(pipe, mode, settings):
    """The sampler steps a run of these settings takes, as the callback counts them -> (first, end):
    from img2img's start to the last step + 1, the hires fix's second pass counted on after the first."""
    from .schedulers import make_schedule, start_index

    def steps_from(steps, strength, sampler, schedule_type):        # (the first step, the schedule's steps)
        schedule = make_schedule(sampler, steps, pipe.config, settings["karras"], settings["timestep_spacing"],
                                 schedule_type=schedule_type)
        return (0 if strength is None else start_index(schedule, strength)), schedule.num_inference_steps

    first, end = steps_from(settings["steps"], None if mode == "txt2img" else settings["strength"],
                            settings["sampler"], settings.get("schedule_type"))
    hires = hires_of(settings) if mode == "txt2img" else None
    if hires is not None:
        kind = hires.schedule_type or settings.get("schedule_type")
        start, n = steps_from(hires.second_steps(settings["steps"], kind is not None), hires.strength,
                              hires.sampler or settings["sampler"], kind)
        end += n - start
    return first, end


def pipeline_call(pipe, mode, settings, image=None, mask=None, callback=None, attention_maps=None, trace=None,
                  refiner=None, hires_checkpoint=None):
    """Run txt2img, img2img or inpaint (`mode`) with the settings of a run (SETTINGS, the model's
    defaults filled in; image, mask: paths or PIL images) -> float32 images [B, H, W, 3] in [0, 1].
    trace: an npsd.trace.Trace to record the run into, or None. refiner, hires_checkpoint: the loaded
    Pipelines of A1111's "Refiner" (at settings["refiner_switch_at"], in the passes of
    settings["hires_refiner_pass"]) and "Hires checkpoint" (txt2img), or None. What the command line
    and `npsd serve` (npsd/serve/) call."""
    kw = dict(negative_prompt=settings["negative_prompt"], num_inference_steps=settings["steps"],
              guidance_scale=settings["guidance_scale"], height=settings["height"], width=settings["width"],
              seed=settings["seed"], sampler=settings["sampler"], num_images=settings["num_images"], output_type="np",
              callback=callback, eta=settings["eta"], use_karras_sigmas=settings["karras"],
              timestep_spacing=settings["timestep_spacing"], clip_skip=settings["clip_skip"] or None,
              long_prompt=settings["long_prompt"], rng=settings["rng"],
              prediction_type=settings["prediction_type"], guidance_rescale=settings["guidance_rescale"] or 0.0,
              prompt_syntax=settings["prompt_syntax"], attention_maps=attention_maps, decoder=settings["vae_decoder"],
              sde_noise=settings["sde_noise"], schedule_type=settings.get("schedule_type"), trace=trace,
              variation_seed=settings.get("variation_seed"), variation_strength=settings.get("variation_strength") or 0.0,
              eta_noise_seed_delta=settings.get("eta_noise_seed_delta") or 0,
              seed_resize_from_w=(settings.get("seed_resize_from") or (0, 0))[0],
              seed_resize_from_h=(settings.get("seed_resize_from") or (0, 0))[1],
              inpainting_mask_weight=_or(settings.get("inpainting_mask_weight"), 1.0),
              negative_guidance_min_sigma=settings.get("negative_guidance_min_sigma") or 0.0,
              emphasis=settings.get("emphasis") or "original", tiling=bool(settings.get("tiling")),
              schedule_options=schedule_options_of(settings),
              token_merging_ratio=settings.get("token_merging_ratio") or 0.0)
    if mode == "txt2img":
        hires = hires_of(settings)
        if hires is not None and hires_checkpoint is not None:
            import dataclasses
            hires = dataclasses.replace(hires, checkpoint=hires_checkpoint)
        if refiner is not None:
            from .refiner import Refiner
            refiner = Refiner(refiner, settings["refiner_switch_at"], settings.get("hires_refiner_pass") or "second pass")
        return pipe.txt2img(settings["prompt"], hires=hires, refiner=refiner, **kw)
    kw["resize_mode"] = settings.get("resize_mode") or "just resize"
    kw["initial_noise_multiplier"] = _or(settings.get("initial_noise_multiplier"), 1.0)
    if mode == "img2img":
        return pipe.img2img(settings["prompt"], image, strength=settings["strength"], **kw)
    return pipe.inpaint(settings["prompt"], image, mask, strength=settings["strength"],
                        mask_blur=settings["mask_blur"], masked_content=settings.get("masked_content") or "original",
                        inpaint_area=settings.get("inpaint_area") or "whole picture",
                        masked_area_padding=settings.get("masked_area_padding", 32), **kw)


def _or(value, default):
    """value, or default where it is None (0 is a value)."""
    return default if value is None else value


def to_images(images, settings):
    """pipeline_call's images -> PIL images, in 8 bits as A1111 saves them (truncated) with an A1111
    schedule type, else rounded (npsd.images.to_uint8)."""
    from .images import to_pil
    return to_pil(images, truncate=settings.get("schedule_type") is not None)


def png_size(pipe, mode, settings, image, made):
    """The Size a run's PNG states: the size it sampled at, which A1111 writes. That is the image's
    own (made, PIL), but with the hires fix the first pass's and with "only masked" inpainting the
    crop's: width x height, or where None what the pipeline takes (the model's, or the input image's
    size rounded down to multiples of 8)."""
    only_masked = mode == "inpaint" and settings.get("inpaint_area") == "only masked"
    if not only_masked and hires_of(settings) is None:
        return made.width, made.height
    if only_masked:
        from .images import default_size, open_image
        h, w = default_size(open_image(image))
    else:
        defaults = generation_defaults(pipe.config)
        h, w = defaults["height"], defaults["width"]
    return settings["width"] or w, settings["height"] or h
