"""The server of `npsd serve`: AUTOMATIC1111's HTTP API on npsd's pipelines, one job at a time.

    from npsd.serve.app import ServeSettings, create_app
    app = create_app(ServeSettings(models_dir="models", output_dir="outputs"))   # a FastAPI app
    # uvicorn.run(app, port=7860), or the command line: npsd serve --models-dir models

How it works:
- one worker thread takes the jobs (generations, option changes) from a first-in first-out queue
  and runs them one at a time; a request waits for its job (GET /sdapi/v1/progress shows the
  running one, its step, a preview, and how many wait: npsd.queue);
- the model stays loaded between jobs; a job that asks for another one (the sd_model_checkpoint
  option, or override_settings) loads it first, then lets go of the old one, so the memory
  holds two models only while switching;
- POST /sdapi/v1/interrupt stops the running generation after its current step; as A1111 does, the
  request then returns the images decoded from that step's prediction of x_0;
- a generation is npsd.generation.pipeline_call with the command line's settings (npsd/serve/a1111.py
  translates A1111's fields), so a PNG made here carries the parameters the command line writes,
  and `npsd txt2img --from-png` remakes it;
- names of models resolve only to the files listed in --models-dir (LoRAs and embeddings: only inside
  their folders, npsd/pipeline.py's _lora_file, npsd/embeddings.py); links out of a folder do not count;
- a request body is read up to ServeSettings.max_upload_bytes (413 beyond); an image's pixel count is
  checked from its header before its pixels are decoded (npsd/serve/a1111.py's decode_image);
- errors: 422 {"detail": one line} for a request npsd cannot honour, 401 without the credentials of
  --api-auth (every route, the page too), 503 when memory ran out (MemoryError), 500 for an internal
  error; none stops the server.
"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import gc
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import generation, pngmeta, resources
from ..attention_maps import AttentionMaps
from ..clip import layer_count
from ..config import generation_defaults
from ..errors import InputError, NpsdError, UsageError, one_line
from ..images import default_size, heat_overlay, to_pil, write_png_atomic
from ..hires import LATENT_UPSCALERS, UPSCALERS
from ..pngmeta import A1111_SAMPLERS, SCHEDULE_LABELS, emphasis_named, parameters_text
from ..previews import preview, table_name
from ..prompts import prompt_syntax_used
from ..schedulers import A1111_DEFAULT_RHO
from ..version import __version__
from . import a1111

STATIC = Path(__file__).parent / "static"
BUILTIN = "npsd-tiny"                            # the built-in model's title (npsd.load())
MODEL_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class ServeSettings:
    """What `npsd serve` is started with (the command line's options)."""
    models_dir: str = None          # the models offered besides the built-in one (searched recursively)
    output_dir: str = None          # also write every image made here (PNG with its parameters)
    lora_dir: str = None            # where <lora:NAME:S> finds NAME.safetensors
    embeddings_dir: str = None      # textual-inversion embeddings named in prompts
    api_auth: str = None            # "USER:PASS" or "USER:PASS,USER2:PASS2": HTTP basic authentication
    model: str = None               # the title of the model loaded first (None: the built-in one)
    weights_dtype: str = "float32"  # every model's weights kept in float32 or float16 (npsd.load's weights_dtype)
    max_upload_bytes: int = 32 * 2**20       # a request body's bytes
    max_image_pixels: int = 4096 * 4096      # an uploaded image's width * height
    gallery_images: int = 500       # images kept in memory for the gallery without output_dir


# --- the models offered ---------------------------------------------------------------------------

class Models:
    """The built-in model and the model files and diffusers folders of a folder, by title (the path
    relative to the folder, as A1111's titles without their " [hash]")."""

    def __init__(self, folder):
        self.folder = folder
        self.sha256 = {}                         # file -> (size, mtime, sha256), filled when a model loads

    def entries(self):
        """-> [{"title", "model_name", "path" (None: the built-in), "file" (what the hash is of)}]."""
        from ..weights import path as weights_path
        from ..loading import BUILTIN_MODEL
        found = [{"title": BUILTIN, "model_name": BUILTIN, "path": None, "file": str(weights_path(BUILTIN_MODEL))}]
        if not self.folder:
            return found
        root = Path(self.folder).resolve()
        for folder, dirs, files in os.walk(root):       # does not follow links to folders
            here = Path(folder)
            if "model_index.json" in files or {"unet", "vae"} <= set(dirs):     # a diffusers folder
                dirs.clear()
                found.append(self._entry(root, here, here))
                continue
            dirs.sort()
            for name in sorted(files):
                path = here / name
                if path.suffix.lower() in MODEL_SUFFIXES and path.resolve().is_relative_to(root) and path.is_file():
                    found.append(self._entry(root, path, path))
        return found

    @staticmethod
    def _entry(root, path, file):
        title = path.relative_to(root).as_posix()
        return {"title": title, "model_name": a1111.model_name_of(title) if path.is_file() else title,
                "path": str(path), "file": str(file)}

    def find(self, name, field="sd_model_checkpoint"):
        """A title ("sub/model.safetensors", optionally with A1111's " [hash]"), a model_name or a short
        hash -> the entry; anything else (a path outside the folder included) is a one-line InputError
        naming the request's field."""
        plain = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", name.strip())
        entries = self.entries()
        for e in entries:
            if plain in (e["title"], e["model_name"]) or plain.lower() == (self.short_hash(e) or "-"):
                return e
        titles = ", ".join(e["title"] for e in entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise InputError(f"{field} {name!r} is not a model this server offers ({titles}); "
                         "see GET /sdapi/v1/sd-models")

    def full_hash(self, entry, compute=False):
        """The SHA-256 of the entry's weights file (a diffusers folder: its UNet file, as npsd.generation's
        "Model hash"), cached while the file's size and time stay; None until computed."""
        file = entry["file"]
        try:
            st = os.stat(file)
        except OSError:
            return None
        cached = self.sha256.get(file)
        if cached and cached[:2] == (st.st_size, st.st_mtime):
            return cached[2]
        if not compute:
            return None
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        self.sha256[file] = (st.st_size, st.st_mtime, h.hexdigest())
        return h.hexdigest()

    def short_hash(self, entry):
        full = self.full_hash(entry)
        return full[:10] if full else None          # A1111's "AutoV2" hash, npsd.generation.file_hash


# --- the worker: one job at a time, first in first out ---------------------------------------------

class Interrupted(Exception):
    """Raised in the pipeline's callback after the step during which an interrupt was asked."""

    def __init__(self, x0, step):
        super().__init__(f"interrupted after step {step}")
        self.x0, self.step = x0, step


class Job:
    """One queued piece of work and, while it runs, its progress (written by the worker thread,
    read by GET /sdapi/v1/progress)."""

    def __init__(self, number, kind, run):
        self.number, self.kind, self.run = number, kind, run      # run(job) -> the response
        self.future = concurrent.futures.Future()
        self.run_number = None          # the order in which the worker took the jobs
        self.interrupted = False
        self.pipe = None
        self.iteration, self.iterations, self.step, self.steps = 0, 1, 0, 0
        self.step_time = self.step_seconds = None
        self.started = time.strftime("%Y%m%d%H%M%S")
        self.x0 = None                  # the last step's x_0 prediction of the first image [1, C, h, w]
        self.preview_method = None      # "approx" (drawn on request) or "full" (drawn by the worker)
        self.want_preview = False
        self.preview = None             # ((iteration, step), PIL image) of the "full" method
        self.preview_png = None         # ((iteration, step), base64 PNG): the last one sent

    def begin(self, pipe, iterations, steps):
        self.pipe, self.iterations, self.steps = pipe, iterations, steps
        self.preview_method = "approx" if table_name(pipe) else "full"

    def start_iteration(self, j):
        self.iteration, self.step, self.step_time = j, 0, time.perf_counter()

    def on_step(self, i, t, latents, x0_pred):
        """The pipeline's callback after every step: progress, preview, interrupt."""
        now = time.perf_counter()
        self.step_seconds, self.step_time = now - self.step_time, now
        self.step += 1
        self.x0 = None if x0_pred is None else x0_pred[:1].copy()
        if self.want_preview and self.preview_method == "full" and self.x0 is not None:
            self.preview = ((self.iteration, self.step), to_pil(preview(self.pipe, self.x0, "full"))[0])
            self.want_preview = False
        if self.interrupted and x0_pred is not None:
            raise Interrupted(x0_pred, self.step)

    def finish(self):
        """Let go of what the job holds (the model, the latents) once it is done."""
        self.pipe = self.x0 = self.preview = None


class Worker:
    """A thread that runs the submitted jobs one at a time, in the order submitted."""

    def __init__(self):
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.current = None
        self.numbers, self.runs = itertools.count(1), itertools.count(1)
        self.last_step_seconds = None
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="npsd-worker", daemon=True)
        self.thread.start()

    def submit(self, kind, run):
        """Queue run(job) -> the Job (await its future)."""
        with self.cond:
            if self.closed:
                raise NpsdError("the server is stopping; no new jobs")
            job = Job(next(self.numbers), kind, run)
            self.waiting.append(job)
            self.cond.notify()
        return job

    def queue_length(self):
        with self.cond:
            return len(self.waiting)

    def interrupt(self):
        """Stop the running generation after its current step."""
        with self.cond:
            if self.current is not None and self.current.kind != "options":
                self.current.interrupted = True

    def close(self):
        """Refuse the waiting jobs, stop the running one after its step, end the thread."""
        self.interrupt()
        with self.cond:
            self.closed = True
            for job in self.waiting:
                job.future.set_exception(NpsdError("the server stopped before this job ran"))
            self.waiting.clear()
            self.cond.notify()
        self.thread.join(timeout=60)

    def _loop(self):
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                job = self.waiting.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue                       # its request went away while it waited
                self.current, job.run_number = job, next(self.runs)
            result = error = None
            try:
                result = job.run(job)
            except BaseException as e:            # noqa: BLE001 - handed to the request that waits
                error = e
            finally:
                # the job is over before its request hears so: a progress call right after the
                # answer sees no job running
                with self.cond:
                    self.last_step_seconds = job.step_seconds or self.last_step_seconds
                    self.current = None
                job.finish()
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
                if not isinstance(error, Exception):
                    raise error


# --- the server: models, options, generations, gallery -------------------------------------------

class Server:
    """The state behind the routes: the loaded model, the options, the worker, the gallery."""

    def __init__(self, settings):
        self.settings = settings
        for name in ("models_dir", "lora_dir", "embeddings_dir"):
            folder = getattr(settings, name)
            if folder is not None and not os.path.isdir(folder):
                raise UsageError(f"--{name.replace('_', '-')} {folder} is not a folder; check the path")
        if settings.output_dir is not None:
            from ..cli import check_folder
            check_folder(settings.output_dir, "--output-dir")                # a file, or a path mkdir refuses
            os.makedirs(settings.output_dir, exist_ok=True)
        self.credentials = parse_auth(settings.api_auth)
        self.limits = a1111.Limits(settings.max_upload_bytes, settings.max_image_pixels)
        self.models = Models(settings.models_dir)
        self.options = dict(a1111.OPTION_DEFAULTS)
        self.pipe = self.loaded = None
        self.others = {}                 # title -> Pipeline: the refiners and hires checkpoints of the last job
        self._load(self.models.find(settings.model) if settings.model else self.models.entries()[0])
        self.options["sd_model_checkpoint"] = self.loaded["title"]
        self.gallery, self.gallery_lock, self.image_ids = [], threading.Lock(), itertools.count(1)
        self.file_numbers = itertools.count(_next_file_number(settings.output_dir))
        self.worker = Worker()

    # --- models (called by the worker thread, or before it starts) ---

    def _load(self, entry):
        """Load a model, then let go of the one loaded before (two are in memory only meanwhile)."""
        import npsd
        pipe = npsd.load(entry["path"], weights_dtype=self.settings.weights_dtype)   # path None: the built-in one
        pipe.lora_dir, pipe.embeddings_dir = self.settings.lora_dir, self.settings.embeddings_dir
        file = generation.model_file(pipe, entry["path"]) or entry["file"]
        entry = dict(entry, file=file)
        self.models.full_hash(entry, compute=True)
        old, self.pipe, self.loaded = self.pipe, pipe, entry
        del old
        gc.collect()

    def _use_model(self, title):
        if title != self.loaded["title"]:
            self._load(self.models.find(title))

    def _others(self, settings):
        """The job's refiner and hires checkpoint (A1111's refiner_checkpoint, hr_checkpoint_name; named
        as sd_model_checkpoint) -> ({"refiner": Pipeline or None, "hires_checkpoint": ...}, {PNG field:
        "NAME [hash]"}). Loaded beside the model (two or three models in memory: each runs alone, and
        resources.check_request checks each); those of the job before are let go unless used again."""
        import npsd
        pipes, titles, kept = {}, {}, {}
        for key, field, label in (("refiner", "refiner_checkpoint", "Refiner"),
                                  ("hires_checkpoint", "hr_checkpoint_name", "Hires checkpoint")):
            if not settings.get(key) or (key == "hires_checkpoint" and not settings.get("hires_scale")):
                pipes[key] = None
                continue
            entry = self.models.find(settings[key], field)
            if entry["title"] == self.loaded["title"]:
                pipes[key] = self.pipe
            else:
                pipe = self.others.get(entry["title"]) or kept.get(entry["title"])
                if pipe is None:
                    pipe = npsd.load(entry["path"], weights_dtype=self.settings.weights_dtype)
                    pipe.embeddings_dir = self.settings.embeddings_dir
                kept[entry["title"]] = pipes[key] = pipe
            file = generation.model_file(pipes[key], entry["path"]) or entry["file"]
            self.models.full_hash(dict(entry, file=file), compute=True)
            titles[label] = pngmeta.checkpoint_title(entry["model_name"], self.models.short_hash(dict(entry, file=file)))
        self.others = kept
        gc.collect()
        return pipes, titles

    def set_options(self, options):
        """POST /sdapi/v1/options: queued, so that the jobs before it keep the options they were sent with."""
        def run(job):
            if "sd_model_checkpoint" in options:
                self._use_model(self.models.find(options["sd_model_checkpoint"])["title"])
                options["sd_model_checkpoint"] = self.loaded["title"]
            self.options.update(options)
        return self.worker.submit("options", run)

    def get_options(self):
        return {**self.options, "sd_checkpoint_hash": self.models.full_hash(self.loaded)}

    # --- a generation (in the worker thread) ---

    def submit(self, plan):
        if "sd_model_checkpoint" in plan.overrides:          # refused now, not after the queue
            self.models.find(plan.overrides["sd_model_checkpoint"])
        for key, field in (("refiner", "refiner_checkpoint"), ("hires_checkpoint", "hr_checkpoint_name")):
            if plan.settings.get(key):
                self.models.find(plan.settings[key], field)
        return self.worker.submit(plan.mode, lambda job: self._generate(plan, job))

    def _generate(self, plan, job):
        options = {**self.options, **plan.overrides}
        self._use_model(self.models.find(options["sd_model_checkpoint"])["title"])
        if not plan.restore_afterwards:
            self.options.update(plan.overrides)
        pipe, settings = self.pipe, self._settings(plan, options)
        settings["hires_refiner_pass"] = options["hires_fix_refiner_pass"]
        others, titles = self._others(settings)
        count = settings["num_images"] * plan.n_iter
        first, end = generation.step_range(pipe, plan.mode, settings)
        job.begin(pipe, count, end - first)
        maps = AttentionMaps() if plan.attention_maps else None
        images, texts, seeds, networks, stopped = [], [], [], None, None
        for k in range(count):
            # A1111 gives image k of a request (over batch_size and n_iter) its own generators from
            # seed + k (and variation seed + k): the image npsd makes alone from those seeds
            call = dict(settings, seed=settings["seed"] + k, num_images=1)
            if settings["variation_seed"] is not None:
                call["variation_seed"] = settings["variation_seed"] + k
            job.start_iteration(k)
            try:
                out = generation.pipeline_call(pipe, plan.mode, call, plan.image, plan.mask, job.on_step,
                                               maps if k == 0 else None, **others)
            except Interrupted as stop:                    # A1111: the last step's x_0, decoded
                out, stopped = pipe.decode_latents(stop.x0, call["vae_decoder"]), stop.step
            if networks is None:
                networks = generation.network_hashes(pipe, call, types.SimpleNamespace(
                    lora_dir=self.settings.lora_dir, embeddings_dir=self.settings.embeddings_dir))
            img = generation.to_images(out, call)[0]
            extra = f", Interrupted at step: {stopped}/{job.steps}" if stopped else ""
            size = generation.png_size(pipe, plan.mode, call, plan.image, img)
            text = parameters_text(call, plan.mode, self._model_label(), self.models.short_hash(self.loaded),
                                   None, None, *size, 1, 1, networks, None, titles) + extra
            images.append(img)
            texts.append(text)
            seeds.append(call["seed"])
            self._remember(img, text, a1111.reload_settings(plan, call, self.loaded["title"], 1))
            if stopped:
                break
        inpainting_unet = plan.mode == "inpaint" and pipe.unet_in_channels == 2 * pipe.latent_channels + 1
        subseeds = None if settings["variation_seed"] is None else [settings["variation_seed"] + k
                                                                    for k in range(len(seeds))]
        info = a1111.info_json(plan, settings, seeds, texts, self.loaded["model_name"],
                               self.models.short_hash(self.loaded), settings["clip_skip"] + 1, inpainting_unet,
                               job.started, subseeds)
        response = {"images": [a1111.encode_png(img, text) for img, text in zip(images, texts)]
                    if plan.send_images else [],
                    "parameters": plan.received, "info": info,
                    "npsd": {"job": job.number, "run": job.run_number, "interrupted": bool(stopped)}}
        if maps is not None:
            words = maps.word_maps(pipe, settings["prompt"])                          # {word: [B, h, w]}
            response["npsd"]["attention_maps"] = [
                {"word": w, "image": a1111.encode_png(heat_overlay(images[0], m[0], w))} for w, m in words.items()]
        return response

    def _settings(self, plan, options):
        """The plan's settings with the options and the model's defaults filled in."""
        settings = dict(plan.settings)
        settings["clip_skip"] = options["CLIP_stop_at_last_layers"] - 1
        layers = layer_count(self.pipe.params["text_encoder"])
        if settings["clip_skip"] > layers:
            raise InputError(f"CLIP_stop_at_last_layers {settings['clip_skip'] + 1} skips more than this model's "
                             f"{layers} text encoder layers; give 1 to {layers + 1}")
        settings["rng"] = a1111.RANDN_SOURCES[options["randn_source"]]
        if plan.settings["sampler"] is None:                      # the model's default sampler
            settings["sampler"] = generation_defaults(self.pipe.config)["sampler"]
            settings["schedule_type"] = a1111.schedule_for(settings["sampler"], settings["schedule_type"])
        if settings["schedule_type"] is not None:                 # (A1111's other samplers read none of them)
            settings.update({k: options[name] for name, k in a1111.SCHEDULE_OPTIONS.items()})
        generation.model_defaults(settings, self.pipe)           # steps, cfg scale, sampler, spacing, prediction type
        a1111.check_eta(settings["sampler"], settings["eta"])      # the sampler may be the model's default
        a1111.check_inpainting(settings)
        a1111.check_hires(settings)
        if settings["sampler"] == "ddim":
            settings["eta"] = options["eta_ddim"] if settings["eta"] is None else settings["eta"]
        else:
            settings["eta"] = 0.0                          # only DDIM reads it (npsd/serve/a1111.py: ETA_ONE)
        if settings["height"] is None or settings["width"] is None:
            defaults = generation_defaults(self.pipe.config)
            h, w = default_size(plan.image) if plan.image is not None else (defaults["height"], defaults["width"])
            settings["height"], settings["width"] = settings["height"] or h, settings["width"] or w
        if settings["seed"] == -1:
            settings["seed"] = secrets.randbelow(2**32 - settings["num_images"] * plan.n_iter + 1)
        if settings["variation_seed"] == -1:                    # subseed -1 with a strength: a random one
            settings["variation_seed"] = secrets.randbelow(2**32 - settings["num_images"] * plan.n_iter + 1)
        settings["eta_noise_seed_delta"] = options["eta_noise_seed_delta"]
        settings["inpainting_mask_weight"] = options["inpainting_mask_weight"]
        settings["emphasis"] = emphasis_named(options["emphasis"])
        if settings["negative_guidance_min_sigma"] is None:
            settings["negative_guidance_min_sigma"] = options["s_min_uncond"]
        if settings["tiling"] is None:
            settings["tiling"] = options["tiling"]
        settings.update(a1111.token_merging(settings, options, plan.overrides, plan.mode != "txt2img"))
        if settings["negative_guidance_min_sigma"] and settings["schedule_type"] is None:
            raise InputError(f"s_min_uncond (Negative Guidance minimum sigma) applies to the samplers A1111 runs with "
                             f"k-diffusion, not to {A1111_SAMPLERS[settings['sampler']]}; send 0 or another sampler_name")
        if plan.mode != "txt2img" and settings.get("initial_noise_multiplier") is None:
            settings["initial_noise_multiplier"] = options["initial_noise_multiplier"]
        if plan.attention_maps and prompt_syntax_used(settings["prompt"], settings["steps"]):
            raise InputError("npsd_attention_maps needs a prompt without A1111 syntax (its words are mapped token "
                             "by token); remove the brackets")
        return settings

    def _model_label(self):
        """The "Model" of the PNG parameters: what the command line writes for the same model."""
        return os.path.basename(os.path.normpath(self.loaded["path"] or self.loaded["file"]))

    # --- the gallery and the output folder ---

    def _remember(self, image, text, reload):
        """Add an image to the gallery (and write it to the output folder)."""
        number = next(self.image_ids)
        entry = {"id": str(number), "url": f"/npsd/v1/images/{number}.png", "parameters": text, "settings": reload}
        if self.settings.output_dir is not None:
            path = os.path.join(self.settings.output_dir, f"{next(self.file_numbers):05d}-{reload['seed']}.png")
            write_png_atomic(image, path, text, overwrite=False)
            private = {"path": path}
        else:
            private = {"png": base64.b64decode(a1111.encode_png(image, text))}
        with self.gallery_lock:
            self.gallery.append((entry, private))
            if self.settings.output_dir is None and len(self.gallery) > self.settings.gallery_images:
                del self.gallery[0]

    def gallery_list(self):
        with self.gallery_lock:
            return [entry for entry, _ in self.gallery]

    def gallery_image(self, number):
        with self.gallery_lock:
            for entry, private in self.gallery:
                if entry["id"] == number:
                    return private
        return None

    # --- progress ---

    def progress(self):
        """GET /sdapi/v1/progress: A1111's answer, and npsd's queue length and last step time."""
        job, worker = self.worker.current, self.worker
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        answer = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                  "npsd": {"queue": worker.queue_length(), "step_seconds": worker.last_step_seconds}}
        if job is None:
            return answer
        state.update(job=job.kind, job_count=job.iterations, job_no=job.iteration, job_timestamp=job.started,
                     sampling_step=job.step, sampling_steps=job.steps, interrupted=job.interrupted)
        total, done = job.iterations * job.steps, job.iteration * job.steps + job.step
        answer["progress"] = min(done / total, 1.0) if total else 0.0
        answer["eta_relative"] = (total - done) * job.step_seconds if job.step_seconds else 0.0
        answer["npsd"]["step_seconds"] = job.step_seconds or worker.last_step_seconds
        answer["current_image"] = self._current_image(job)
        return answer

    @staticmethod
    def _current_image(job):
        """The running job's preview of its first image at the last step: the cheap latent -> RGB table
        (npsd/previews.py) where the model has one, else the VAE decode, drawn by the worker when asked."""
        x0, pipe, key = job.x0, job.pipe, (job.iteration, job.step)
        if x0 is None or pipe is None:
            return None
        if job.preview_png is not None and job.preview_png[0] == key:
            return job.preview_png[1]
        if job.preview_method == "approx":
            image = to_pil(preview(pipe, x0, "approx"))[0]
        else:
            job.want_preview = True                          # the worker draws it after the next step
            if job.preview is None:
                return None
            key, image = job.preview
        job.preview_png = (key, a1111.encode_png(image))
        return job.preview_png[1]

    def close(self):
        self.worker.close()


def _next_file_number(folder):
    """The output files are numbered 00001-SEED.png, ... (as A1111 names them), after those there."""
    if folder is None:
        return 1
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := re.match(r"(\d+)-", name))]
    return max(numbers, default=0) + 1


def parse_auth(text):
    """--api-auth "USER:PASS[,USER2:PASS2]" -> {user: password} (None: no authentication)."""
    if not text:
        return None
    pairs = [item.partition(":") for item in text.split(",")]
    if any(not user or not sep or not password for user, sep, password in pairs):
        raise UsageError("--api-auth must be USER:PASS (several: USER:PASS,USER2:PASS2)")
    return {user: password for user, _, password in pairs}


def authorized(header, credentials):
    """Whether an Authorization header carries one of the credentials (HTTP basic, RFC 7617)."""
    if not header or not header[:6].lower() == "basic ":
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except ValueError:
        return False
    expected = credentials.get(user)
    return expected is not None and secrets.compare_digest(password.encode(), expected.encode())


# --- the routes -----------------------------------------------------------------------------------

class PayloadTooLarge(InputError):
    """A request body over the upload limit (answered 413)."""


async def read_json(request, limit):
    """The request body as JSON, read at most `limit` bytes (a Content-Length over it is refused
    before anything is read)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the request body is {int(length) / 2**20:.1f} MiB; the limit is "
                              f"{limit / 2**20:.0f} MiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit / 2**20:.0f} MiB")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"{}")
    except ValueError as e:
        raise InputError(f"the request body is not valid JSON ({e})") from None


def create_app(settings=None):
    """A FastAPI app serving A1111's API (/sdapi/v1/...), npsd's gallery (/npsd/v1/...) and the page (/).
    settings: a ServeSettings (None: the defaults). Loads the first model before it returns."""
    server = Server(settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="npsd", version=__version__, lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def basic_auth(request, call_next):
        if server.credentials and not authorized(request.headers.get("authorization"), server.credentials):
            return JSONResponse({"detail": "give the user name and password of --api-auth (HTTP basic)"},
                                status_code=401, headers={"WWW-Authenticate": 'Basic realm="npsd"'})
        return await call_next(request)

    @app.exception_handler(NpsdError)
    async def refused(request, e):
        return JSONResponse({"detail": one_line(e)}, status_code=413 if isinstance(e, PayloadTooLarge) else 422)

    @app.exception_handler(MemoryError)
    async def out_of_memory(request, e):                  # the server goes on; the request asked too much
        return JSONResponse({"detail": f"out of memory ({one_line(e) or 'MemoryError'}); {resources.ADVICE}"},
                            status_code=503)

    @app.exception_handler(Exception)
    async def internal(request, e):
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {one_line(e)}"}, status_code=500)

    async def generate(kind, request):
        body = await read_json(request, server.limits.max_bytes)
        plan = await run_in_threadpool(a1111.read_request, kind, body, server.limits)    # decodes the images
        return await asyncio.wrap_future(server.submit(plan).future)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate("txt2img", request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate("img2img", request)

    @app.get("/sdapi/v1/progress")
    def progress():
        return server.progress()

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        server.worker.interrupt()
        return {}

    @app.get("/sdapi/v1/options")
    def get_options():
        return server.get_options()

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        options = a1111.check_options(await read_json(request, server.limits.max_bytes))
        if "sd_model_checkpoint" in options:
            server.models.find(options["sd_model_checkpoint"])
        await asyncio.wrap_future(server.set_options(options).future)
        return None

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        entries = [server.loaded if e["title"] == server.loaded["title"] else e for e in server.models.entries()]
        return [{"title": e["title"], "model_name": e["model_name"], "hash": server.models.short_hash(e),
                 "sha256": server.models.full_hash(e), "filename": e["path"] or e["file"], "config": None}
                for e in entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return None                                    # the folder is read at every request

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": label, "aliases": [name], "options": {}} for name, label in A1111_SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        inner = ("uniform", "sgm_uniform", "simple", "normal", "ddim", "beta")   # those that read the model's sigmas
        return [{"name": name, "label": label, "aliases": ["SGMUniform"] if name == "sgm_uniform" else None,
                 "default_rho": A1111_DEFAULT_RHO.get(name, -1.0), "need_inner_model": name in inner}
                for name, label in SCHEDULE_LABELS.items()]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():                        # the hires fix's hr_upscaler values (npsd/hires.py)
        return [{"name": UPSCALERS[name][0]} for name in LATENT_UPSCALERS]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():                                   # ... and A1111's image upscalers npsd has
        return [{"name": label, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name, (label, _) in UPSCALERS.items() if name not in LATENT_UPSCALERS]

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/loras")
    def loras():
        from ..pipeline import LORA_SUFFIXES
        folder = server.settings.lora_dir
        if folder is None:
            return []
        root = Path(folder).resolve()
        return [{"name": p.stem, "alias": p.stem, "path": p.relative_to(root).as_posix(), "metadata": {}}
                for p in sorted(root.rglob("*")) if p.suffix.lower() in LORA_SUFFIXES and p.is_file()
                and p.resolve().is_relative_to(root)]

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        body = await read_json(request, server.limits.max_bytes)
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object {\"image\": base64 PNG}")
        return await run_in_threadpool(a1111.png_info_response, body.get("image"), server.limits)

    @app.get("/npsd/v1/gallery")
    def gallery():
        return server.gallery_list()

    @app.get("/npsd/v1/images/{name}")
    def gallery_image(name: str):
        m = re.fullmatch(r"(\d+)\.png", name)
        found = server.gallery_image(m.group(1)) if m else None
        if found is None:
            return JSONResponse({"detail": f"no image {name} in the gallery"}, status_code=404)
        if "path" in found:
            return FileResponse(found["path"], media_type="image/png")
        return Response(found["png"], media_type="image/png")

    @app.get("/")
    def page():
        index = STATIC / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return HTMLResponse("<!doctype html><title>npsd</title><p>npsd serves AUTOMATIC1111's API at "
                            "<code>/sdapi/v1/</code> (<a href=\"/docs\">the routes</a>).</p>")

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


def run_serve(args):
    """`npsd serve`: check the options, load the first model, serve until Ctrl-C -> exit code 0."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError('npsd serve needs FastAPI and uvicorn: pip install "npsd[serve]"') from None
    if args.port > 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen and not args.api_auth:
        warnings.warn(f"--listen without --api-auth: anyone who can reach port {args.port} of this machine can "
                      "use this server (and its CPU); give --api-auth USER:PASS")
    with _bound(host, args.port) as sock:                     # a port in use is said before the model loads
        app = create_app(ServeSettings(models_dir=args.models_dir, output_dir=args.output_dir, lora_dir=args.lora_dir,
                                       embeddings_dir=args.embeddings_dir, api_auth=args.api_auth, model=args.model,
                                       weights_dtype=args.weights_dtype))
        print(f"npsd: serving {app.state.server.loaded['title']} on http://{host}:{args.port}/ (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning")).run(sockets=[sock])
        finally:
            app.state.server.close()
    return 0


def _bound(host, port):
    """A TCP socket bound to (host, port), for uvicorn to listen on; a port that another program holds
    is one line (uvicorn logged "[Errno 98] ..." after npsd had said it was serving)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)           # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NpsdError(f"cannot serve on {host}:{port}: {e.strerror or e}; give another --port, or stop the "
                        f"program that uses it") from None
    return sock
