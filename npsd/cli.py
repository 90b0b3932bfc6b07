"""The command line: `npsd txt2img | img2img | inpaint | parity` (also `python -m npsd`).

    npsd txt2img "a red circle on a blue background" -o out.png --steps 20 --seed 1
    npsd img2img "a watercolour painting" --image in.png --strength 0.6
    npsd inpaint "a cat" --image in.png --mask mask.png
    npsd txt2img --from-png out.png --steps 30         # re-run from a PNG's parameters
    npsd parity --model v1-5-pruned-emaonly.safetensors

What this module promises (tests/test_cli.py checks each):
- every PNG carries its generation parameters in the "parameters" text chunk (npsd/pngmeta.py);
- files are written atomically (a temporary file in the same folder, then os.replace); an existing
  output is refused before any work unless --overwrite; Ctrl-C leaves no file behind and exits 130;
- errors are one line on stderr that says what to do; exit code 2 for bad usage or input (options,
  images, model or VAE files that cannot be used: InputError, CheckpointError), 1 for anything else
  (a run that fails, e.g. NaN latents; a file system error; an internal error); --debug adds the traceback;
- the same seed and parameters give byte-identical PNGs.
stdout receives only the paths of the images written (one a line); everything else goes to stderr.

Decisions:
- Model hash: the first 10 hex digits of the SHA-256 of the checkpoint file (A1111's "AutoV2" hash);
  for a diffusers folder, of its UNet weights file (unet/diffusion_pytorch_model.*).
- --clip-skip N counts as diffusers' clip_skip (0 = last layer); the PNG stores A1111's "Clip skip"
  (N + 1), and --from-png converts it back.
- --threads N: npsd's own threads (the fast kernels' pieces, nn.set_threads) and the BLAS threads
  of the plain path. BLAS is set through npsd.blas (NumPy's OpenBLAS, by ctypes); where that is not
  possible (another BLAS), through threadpoolctl when installed; without it, npsd sets
  OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS and restarts itself with the same
  arguments (os.execv): OpenBLAS reads them only when numpy loads it, which importing npsd has done.
- --from-png re-makes one image of a batch alone (it re-runs the batch and keeps "Batch pos");
  a PNG made by img2img/inpaint needs the same subcommand and the input --image (and --mask).
"""

import argparse
import hashlib
import math
import os
import sys
import tempfile
import time
import traceback
import warnings

from . import __version__
from .errors import CheckpointError, InputError, NpsdError
from .rng import RNG_KINDS
from .schedulers import PREDICTION_TYPES, SAMPLERS, SIGMA_SAMPLERS, SPACINGS

MODES = ("txt2img", "img2img", "inpaint")
# npsd's sampler names <-> the names A1111 writes in "Sampler:" (read case-insensitively)
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                  "dpmpp_2m": "DPM++ 2M", "pndm": "PLMS", "lms": "LMS", "dpmpp_2m_sde": "DPM++ 2M SDE",
                  "unipc": "UniPC", "dpm2": "DPM2", "dpm2_a": "DPM2 a", "lcm": "LCM", "deis": "DEIS"}
# --rng <-> the "RNG" field (A1111's value "CPU" is torch's CPU generator, which rng="torch" reproduces)
RNG_FIELD = {"numpy": "numpy", "torch": "CPU"}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class UsageError(InputError):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised, so main() prints it and returns 2)."""

    def error(self, message):
        raise UsageError(f"{message}; see `{self.prog} --help`")


# --- option types: checked while parsing, before anything is loaded -----------------------------

def _int_at_least(lo, what=None):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = what or "integer"
    return parse


def _float_in(lo, hi=math.inf, lo_open=False, what=None):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            if hi == math.inf:
                rng = f"> {lo}" if lo_open else f">= {lo}"
            else:
                rng = f"in ({lo}, {hi}]" if lo_open else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text}")
        return v
    parse.__name__ = what or "number"
    return parse


def _seed(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {v}")
    return v


def build_parser():
    p = _Parser(prog="npsd", description="Stable Diffusion v1.x in NumPy: generate images on the CPU, "
                "check parity with PyTorch.")
    p.add_argument("--version", action="version", version=f"npsd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{txt2img,img2img,inpaint,parity}", parser_class=_Parser)
    for mode, help_text in (("txt2img", "generate images from a prompt"),
                            ("img2img", "redraw --image following a prompt (SDEdit)"),
                            ("inpaint", "repaint the white part of --mask in --image")):
        _generation_options(sub.add_parser(mode, help=help_text, description=help_text), mode)
    par = sub.add_parser("parity", help="compare npsd with diffusers/transformers on your checkpoint",
                         description="Load a checkpoint with npsd and with diffusers/transformers and compare them "
                         "block by block (needs the test extra: pip install \"npsd[test]\").")
    par.add_argument("--model", required=True, help="an SD v1.x .safetensors/.ckpt file or diffusers folder")
    par.add_argument("--size", type=_int_at_least(8), default=64, help="image side of the comparison (default 64)")
    par.add_argument("--tolerance", type=_float_in(0, lo_open=True), default=1e-4,
                     help="largest accepted relative error per block (default 1e-4)")
    par.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default 0)")
    par.add_argument("--no-ema", action="store_true", help="compare the raw UNet weights instead of the EMA copies")
    par.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _generation_options(p, mode):
    a = p.add_argument
    a("prompt", nargs="?", default=None, help="what the image should show (optional with --from-png)")
    a("-o", "--output", metavar="FILE", help="output PNG (default npsd-<seed>.png; with --num-images N, NAME-1.png ... NAME-N.png)")
    a("--negative-prompt", metavar="TEXT", help="what the image should not show (default: empty)")
    a("--steps", metavar="N", type=_int_at_least(1, "steps"), help="denoising steps (default: the model's, SD v1.x: 50)")
    a("--guidance-scale", metavar="SCALE", type=_float_in(0.0, what="guidance"),
      help="classifier-free guidance scale; <= 1 turns guidance off (default: the model's, SD v1.x: 7.5)")
    a("--sampler", choices=SAMPLERS, help="sampler (default: the model's)")
    a("--seed", metavar="N", type=_seed, help="random seed in [0, 2**32) (default: random, printed)")
    a("--rng", choices=RNG_KINDS, help="random numbers: numpy (npsd's own, default) or torch (torch's CPU "
                                       "generator: diffusers' and A1111's 'CPU' images from the same seed)")
    a("--height", metavar="PIXELS", type=_int_at_least(1, "height"), help="image height, a multiple of 8 (default: the model's)")
    a("--width", metavar="PIXELS", type=_int_at_least(1, "width"), help="image width, a multiple of 8 (default: the model's)")
    a("--num-images", metavar="N", type=_int_at_least(1, "count"), help="images to generate (default 1)")
    a("--model", metavar="PATH", help="an SD v1.x .safetensors/.ckpt file or diffusers folder (default: the built-in small model)")
    a("--no-ema", action="store_true", default=None,
      help="use the raw UNet weights of a file that also holds EMA copies (v1-5-pruned.*; default: the EMA ones)")
    a("--vae", metavar="PATH", help="a separate VAE: a .safetensors/.ckpt file (original names, optionally first_stage_model.*, "
                    "or diffusers names) or a diffusers vae folder")
    if mode != "txt2img":
        a("--image", metavar="FILE", help="input image (required)")
        a("--strength", metavar="S", type=_float_in(0.0, 1.0, lo_open=True, what="strength"),
          help=f"how much of --image to redraw, in (0, 1] (default {0.8 if mode == 'img2img' else 1.0})")
    if mode == "inpaint":
        a("--mask", metavar="FILE", help="mask image, white = repaint (required)")
        a("--mask-blur", metavar="PIXELS", type=_int_at_least(0, "pixels"),
          help="blur radius of the mask edge in pixels (default 0)")
    a("--eta", type=_float_in(0.0, what="eta"), help="DDIM eta; 0 is deterministic (default 0)")
    a("--karras", action=argparse.BooleanOptionalAction, default=None,
      help="Karras sigmas (the sigma samplers: " + ", ".join(SIGMA_SAMPLERS) + "; default off)")
    a("--timestep-spacing", choices=SPACINGS, help="timestep spacing (default: the model's, SD v1.x: leading)")
    a("--prediction-type", choices=PREDICTION_TYPES,
      help="what the UNet predicts (default: the model's config, SD v1.x: epsilon)")
    a("--guidance-rescale", metavar="PHI", type=_float_in(0.0, 1.0, what="phi"),
      help="rescale the guided prediction's std to the conditional one's (Lin et al. 2024 eq. 16), 0 = off (default)")
    a("--clip-skip", metavar="N", type=_int_at_least(0, "layers"),
      help="skip the last N CLIP layers, as diffusers' clip_skip (A1111's 'Clip skip' is N + 1) (default 0)")
    a("--long-prompt", choices=("truncate", "chunk"), help="prompts over 77 tokens: truncate (default) or chunk")
    a("--threads", metavar="N", type=_int_at_least(1, "threads"),
      help="threads: npsd's own and BLAS's (default: one per core)")
    a("--save-steps", metavar="DIR", help="write every K-th step's predicted x0 as PNG and a filmstrip.png into DIR "
                                          "(each preview costs one VAE decode)")
    a("--save-every", type=_int_at_least(1, "K"), default=1, metavar="K",
      help="with --save-steps: every K-th step (default 1)")
    a("--from-png", metavar="IMAGE", help="re-run from the parameters stored in a PNG; options given override them")
    a("--overwrite", action="store_true", help="replace existing output files")
    a("--quiet", action="store_true", help="no progress bar or notes; print only the output path(s)")
    a("--debug", action="store_true", help="show tracebacks")


# --- small helpers ------------------------------------------------------------------------------

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


def write_png_atomic(image, path, parameters, overwrite):
    """Save a PIL image as PNG with its "parameters" chunk: a temporary file in the same folder, then
    os.replace, so the path holds either nothing/the old file or the whole new file, never a part."""
    from .pngmeta import png_info
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(parameters))
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)             # mkstemp makes 0600 files; give the usual mode
        if not overwrite and os.path.exists(path):
            raise UsageError(f"{path} appeared while npsd was running; use --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def output_paths(output, seed, n):
    """-o and --num-images -> the list of output paths."""
    if output is None:
        output = f"npsd-{seed}.png"
    if n == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{k}{ext or '.png'}" for k in range(1, n + 1)]


def check_writable(paths, overwrite):
    """Refuse existing outputs (without --overwrite) and missing folders, before any work."""
    for p in paths:
        folder = os.path.dirname(os.path.abspath(p))
        if not p.lower().endswith(".png"):
            raise UsageError(f"{p}: npsd writes PNG files (the parameters live in a PNG text chunk); give a name "
                             f"ending in .png")
        if not os.path.isdir(folder):
            raise UsageError(f"the folder of {p} does not exist; create it or choose another -o")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write to the folder of {p}; choose another -o")
        if os.path.isdir(p):
            raise UsageError(f"{p} is a folder; give a file name with -o")
        if os.path.exists(p) and not overwrite:
            raise UsageError(f"{p} already exists; use --overwrite to replace it or -o to choose another name")


def limit_threads(n, argv_for_restart):
    """--threads N. With threadpoolctl: limit the BLAS pools of this process (returns the limiter,
    keep it alive). Without it: OpenBLAS/MKL read their thread count only when numpy loads them, which
    has happened by now (importing npsd imports numpy), so set OMP/OPENBLAS/MKL_NUM_THREADS and
    restart the process with the same arguments (os.execv) when running as a command. npsd's own
    threads (the fast kernels) are set first, and BLAS's through npsd.blas when it can."""
    from . import blas, nn
    nn.set_threads(n)
    if blas.set_threads(n):
        return "npsd.blas"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if all(os.environ.get(v) == str(n) for v in THREAD_VARS):
            return "environment"                   # set before numpy loaded (or after our restart)
        for v in THREAD_VARS:
            os.environ[v] = str(n)
        if argv_for_restart is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "npsd", *argv_for_restart])
        warnings.warn(f"--threads {n}: cannot change the BLAS threads of this running process without "
                      f"threadpoolctl (pip install threadpoolctl); set {THREAD_VARS[1]}={n} before starting")
        return None
    return threadpool_limits(limits=n)


# --- a separate VAE -----------------------------------------------------------------------------

def vae_weights_file(path):
    """The weights file behind a --vae path (for its hash): the file itself, or a diffusers vae
    folder's (or a pipeline folder's vae/) diffusion_pytorch_model file."""
    if not os.path.isdir(path):
        return path
    folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def attach_vae(pipe, path):
    """Replace the model's VAE by the one in `path` (npsd.loading.load_vae: original names as in
    vae-ft-mse-840000-ema-pruned, with or without first_stage_model., or diffusers names). The
    model's VAE settings (scaling factor, groups) stay unless the VAE brings its own config.json."""
    from .loading import load_vae
    params, vae_config = load_vae(path)
    z = params["post_quant_conv"]["weight"].shape[0]
    if z != pipe.latent_channels:
        raise CheckpointError(f"--vae: the VAE's latents have {z} channels but the model's UNet uses "
                              f"{pipe.latent_channels}; give a VAE made for SD v1.x")
    pipe.params["vae"] = params
    if os.path.isdir(path):
        pipe.config["vae"] = vae_config


# --- parameters: from the options, from a PNG ---------------------------------------------------

SETTINGS = ("prompt", "negative_prompt", "steps", "guidance_scale", "sampler", "seed", "height", "width",
            "num_images", "strength", "eta", "karras", "timestep_spacing", "clip_skip", "long_prompt",
            "mask_blur", "no_ema", "rng", "prediction_type", "guidance_rescale")


def _convert(fields, name, kind, what):
    if name not in fields:
        return None
    text = fields[name]
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"--from-png: the stored '{name}' is {text!r}, not {what}; "
                         f"give the option explicitly") from None


def settings_from_png(path, mode):
    """The settings stored in a PNG's "parameters" text (npsd's or A1111's) -> {setting: value}."""
    from .pngmeta import parse_parameters, read_parameters
    p = parse_parameters(read_parameters(path))
    f = p["fields"]
    s = {"prompt": p["prompt"], "negative_prompt": p["negative_prompt"]}
    made_by = f.get("Pipeline")
    if made_by in MODES and made_by != mode:
        needs = {"img2img": " --image FILE", "inpaint": " --image FILE --mask FILE"}.get(made_by, "")
        raise UsageError(f"{path} was made by {made_by}; run `npsd {made_by} --from-png {path}{needs}`")
    s["steps"] = _convert(f, "Steps", int, "a whole number")
    s["guidance_scale"] = _convert(f, "CFG scale", float, "a number")
    s["seed"] = _convert(f, "Seed", int, "a whole number")
    if "Size" in f:
        try:
            w, h = (int(v) for v in f["Size"].lower().split("x"))
        except ValueError:
            raise InputError(f"--from-png: the stored Size is {f['Size']!r}, not WIDTHxHEIGHT") from None
        s["width"], s["height"] = w, h
    if "Sampler" in f:
        name = f["Sampler"].strip()
        if name.lower().endswith(" karras"):                         # older A1111: "DPM++ 2M Karras"
            name, s["karras"] = name[: -len(" karras")], True
        by_label = {v.lower(): k for k, v in A1111_SAMPLERS.items()}
        sampler = by_label.get(name.lower(), name if name in SAMPLERS else None)
        if sampler is None:                                           # an error unless --sampler is given
            s["_bad_sampler"] = (f"--from-png: the stored sampler {f['Sampler']!r} is not one npsd has "
                                 f"({', '.join(A1111_SAMPLERS.values())}); give --sampler")
        s["sampler"] = sampler
    if f.get("Schedule type", "").lower() == "karras":
        s["karras"] = True
    s["strength"] = _convert(f, "Denoising strength", float, "a number")
    s["eta"] = _convert(f, "Eta", float, "a number")
    skip = _convert(f, "Clip skip", int, "a whole number")            # A1111's count: 1 = last layer
    s["clip_skip"] = None if skip is None else max(skip - 1, 0)
    s["mask_blur"] = _convert(f, "Mask blur", int, "a whole number")
    if f.get("Timestep spacing") in SPACINGS:
        s["timestep_spacing"] = f["Timestep spacing"]
    if f.get("Prediction type") in PREDICTION_TYPES:
        s["prediction_type"] = f["Prediction type"]
    s["guidance_rescale"] = _convert(f, "Guidance rescale", float, "a number")
    if f.get("Long prompt") in ("truncate", "chunk"):
        s["long_prompt"] = f["Long prompt"]
    s["num_images"] = _convert(f, "Batch size", int, "a whole number")
    pos = _convert(f, "Batch pos", int, "a whole number")
    s["_select"] = pos if pos is not None and s["num_images"] and s["num_images"] > 1 else None
    s["_model"] = (f.get("Model"), f.get("Model hash"))
    s["no_ema"] = True if f.get("EMA") == "off" else None
    if "RNG" in f:                                                    # absent: npsd's own numpy numbers
        by_field = {v.lower(): k for k, v in RNG_FIELD.items()}
        s["rng"] = by_field.get(f["RNG"].strip().lower())
        if s["rng"] is None:                                          # an error unless --rng is given
            s["_bad_rng"] = (f"--from-png: the image's noise came from the {f['RNG']!r} generator, which npsd "
                             f"cannot reproduce (it has numpy and torch's CPU one); give --rng to run anyway")
    return {k: v for k, v in s.items() if v is not None}


def parameters_text(s, mode, model_name, model_hash, vae_name, vae_hash, width, height, batch, pos):
    """The "parameters" text of one image (see npsd/pngmeta.py)."""
    from .pngmeta import format_parameters
    karras = bool(s["karras"])
    fields = {
        "Steps": s["steps"],
        "Sampler": A1111_SAMPLERS[s["sampler"]],
        "Schedule type": "Karras" if karras else None,
        "CFG scale": _num(s["guidance_scale"]),
        "Seed": s["seed"],
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Denoising strength": _num(s["strength"]) if mode != "txt2img" else None,
        "Mask blur": s["mask_blur"] if mode == "inpaint" else None,
        "Eta": _num(s["eta"]) if s["eta"] else None,
        "Clip skip": s["clip_skip"] + 1 if s["clip_skip"] else None,
        "Timestep spacing": s["timestep_spacing"],
        "Prediction type": s["prediction_type"] if s["prediction_type"] != "epsilon" else None,
        "Guidance rescale": _num(s["guidance_rescale"]) if s["guidance_rescale"] else None,
        "Long prompt": s["long_prompt"] if s["long_prompt"] != "truncate" else None,
        "Batch size": batch if batch > 1 else None,
        "Batch pos": pos if batch > 1 else None,
        "EMA": "off" if s["no_ema"] else None,
        "RNG": RNG_FIELD[s["rng"]],
        "Pipeline": mode,
        "npsd version": __version__,
    }
    return format_parameters(s["prompt"], s["negative_prompt"], fields)


def _num(x):
    """7.5 -> "7.5", 7.0 -> "7" (what A1111 writes), full float precision otherwise."""
    return int(x) if float(x).is_integer() else repr(float(x))


# --- the denoising filmstrip ------------------------------------------------------------------

def filmstrip(rows, labels, height=128):
    """rows: one list of PIL images per generated image (the saved x0 predictions, then the result);
    labels: one per column. -> one image, frames scaled to `height` pixels, labelled."""
    from PIL import Image, ImageDraw
    w0, h0 = rows[0][0].size
    h = min(height, h0)
    w = max(1, round(w0 * h / h0))
    pad = 2
    sheet = Image.new("RGB", (len(rows[0]) * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, frames in enumerate(rows):
        for c, frame in enumerate(frames):
            x, y = pad + c * (w + pad), pad + r * (h + pad)
            sheet.paste(frame.resize((w, h), Image.LANCZOS) if frame.size != (w, h) else frame, (x, y))
            if r == 0 and h >= 24:
                draw.rectangle([x, y, x + 6 * len(labels[c]) + 3, y + 11], fill=(0, 0, 0))
                draw.text((x + 2, y), labels[c], fill=(255, 255, 255))
    return sheet


# --- the generation command ---------------------------------------------------------------------

def _note(args, message):
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _exists(path, what):
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist; check the path")


def resolve_settings(args, mode):
    """The settings of a run: those stored in --from-png, overridden by the options given, the rest
    left None (the model's defaults, filled in after loading). -> (settings, stored, batch pos to keep)."""
    stored = settings_from_png(args.from_png, mode) if args.from_png else {}
    s = {k: stored.get(k) for k in SETTINGS}
    for k in SETTINGS:
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    if s["prompt"] is None:
        raise UsageError(f"give a PROMPT (or --from-png IMAGE); see `npsd {mode} --help`")
    if stored.get("_bad_sampler") and args.sampler is None:
        raise InputError(stored["_bad_sampler"])
    if stored.get("_bad_rng") and args.rng is None:
        raise InputError(stored["_bad_rng"])
    s["rng"] = s["rng"] or "numpy"
    s["negative_prompt"] = s["negative_prompt"] or ""
    s["num_images"] = s["num_images"] or 1
    s["long_prompt"] = s["long_prompt"] or "truncate"
    s["karras"] = bool(s["karras"])
    s["eta"] = s["eta"] or 0.0
    s["clip_skip"] = s["clip_skip"] or 0
    s["mask_blur"] = s["mask_blur"] or 0
    if s["strength"] is None:
        s["strength"] = 0.8 if mode == "img2img" else 1.0
    select = stored.get("_select") if args.num_images is None else None
    return s, stored, select


def check_inputs(args, mode):
    """Options that fit the subcommand, input files that exist: one-line usage errors."""
    image, mask = getattr(args, "image", None), getattr(args, "mask", None)   # img2img / inpaint options
    if mode != "txt2img" and image is None:
        raise UsageError(f"{mode} needs --image FILE" + (" and --mask FILE" if mode == "inpaint" else ""))
    if mode == "inpaint" and mask is None:
        raise UsageError("inpaint needs --mask FILE (white = repaint)")
    for path, what in ((args.model, "--model"), (args.vae, "--vae"), (image, "--image"), (mask, "--mask")):
        _exists(path, what)
    if args.save_steps is not None and os.path.exists(args.save_steps) and not os.path.isdir(args.save_steps):
        raise UsageError(f"--save-steps {args.save_steps} is a file; give a folder")


def model_defaults(s, pipe):
    """Fill the settings left None with the model's own defaults (config["defaults"])."""
    d = pipe.config.get("defaults", {})
    s["steps"] = s["steps"] or d.get("num_inference_steps", 50)
    s["guidance_scale"] = d.get("guidance_scale", 7.5) if s["guidance_scale"] is None else s["guidance_scale"]
    s["sampler"] = s["sampler"] or d.get("sampler", "ddim")
    s["timestep_spacing"] = s["timestep_spacing"] or pipe.config["scheduler"].get("timestep_spacing", "leading")
    s["prediction_type"] = s["prediction_type"] or pipe.config["scheduler"].get("prediction_type", "epsilon")


def step_targets(folder, every, start, total, n):
    """--save-steps: the steps whose x0 is saved (every k-th and the last) -> ({step: [path per image]},
    filmstrip path). Steps are numbered from 1 in the names: step-07.png (step-07-2.png for image 2)."""
    digits = len(str(total))
    saved = [i for i in range(start, total) if (i + 1) % every == 0 or i == total - 1]
    files = {i: [os.path.join(folder, f"step-{i + 1:0{digits}d}" + (f"-{b + 1}" if n > 1 else "") + ".png")
                 for b in range(n)] for i in saved}
    return files, os.path.join(folder, "filmstrip.png")


def generate(args, argv_for_restart=None):
    """txt2img / img2img / inpaint from parsed options; returns 0 (errors are raised)."""
    import numpy as np
    mode = args.command
    started = time.perf_counter()
    limiter = limit_threads(args.threads, argv_for_restart) if args.threads else None  # noqa: F841 (kept alive)
    if args.debug and args.threads:
        how = {"npsd.blas": "npsd.blas", "environment": "the environment", None: "the environment"}.get(limiter, "threadpoolctl")
        print(f"npsd: threads: {args.threads} via {how} "
              f"({', '.join(f'{v}={os.environ.get(v)}' for v in THREAD_VARS)})", file=sys.stderr)
    # 1. the settings, the inputs, and the outputs, which must not exist (checked before any work)
    s, stored, select = resolve_settings(args, mode)
    check_inputs(args, mode)
    random_seed = s["seed"] is None
    if random_seed:
        s["seed"] = int.from_bytes(os.urandom(4), "little")          # [0, 2**32)
    n = s["num_images"]
    outputs = output_paths(args.output, s["seed"], 1 if select else n)
    check_writable(outputs, args.overwrite)
    if random_seed:
        _note(args, f"seed: {s['seed']}")

    # 2. the model
    import npsd
    t0 = time.perf_counter()
    _note(args, f"npsd: loading {args.model or 'the built-in model'} ...")
    ema = not s["no_ema"]
    pipe = npsd.load(args.model, ema=ema) if args.model is not None else npsd.load(ema=ema)
    s["no_ema"] = pipe.info.get("ema") is False              # recorded only when raw weights were chosen
    if args.vae is not None:
        attach_vae(pipe, args.vae)
    _note(args, f"npsd: loaded in {time.perf_counter() - t0:.1f} s")
    model_defaults(s, pipe)
    if s["eta"] and s["sampler"] != "ddim":
        warnings.warn(f"--eta is DDIM's; the {s['sampler']} sampler ignores it")
        s["eta"] = 0.0

    # 3. the steps that will run, and the --save-steps files (refused before any work if they exist)
    from . import schedulers
    schedule = schedulers.make_schedule(s["sampler"], s["steps"], pipe.config, s["karras"], s["timestep_spacing"])
    total = schedule.num_inference_steps
    start = 0 if mode == "txt2img" else schedulers.img2img_start_index(s["steps"], s["strength"])
    step_files, strip_file = {}, None
    if args.save_steps is not None:
        step_files, strip_file = step_targets(args.save_steps, args.save_every, start, total, n)
        if os.path.isdir(args.save_steps):
            check_writable([p for ps in step_files.values() for p in ps] + [strip_file], args.overwrite)
    saved_steps = sorted(step_files)

    # 4. generate
    frames, written, created = {}, [], []
    mfile = model_file(pipe, args.model)
    model_name = os.path.basename(os.path.normpath(args.model or mfile or "built-in"))
    hashes = {}
    if stored.get("_model"):                         # --from-png: say when the model is not the same
        name, digest = stored["_model"]
        hashes["model"] = file_hash(mfile) if mfile else None
        if digest and hashes["model"] and digest.lower() != hashes["model"]:
            warnings.warn(f"--from-png: the PNG was made with {name or 'a model'} (hash {digest}), not "
                          f"{model_name} (hash {hashes['model']}); the image will differ (give --model)")

    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=total - start, unit="step", file=sys.stderr, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}]",
                   desc=mode)

    def meta(width, height, pos, extra=None):
        if "vae" not in hashes:
            if "model" not in hashes:
                hashes["model"] = file_hash(mfile) if mfile else None
            vfile = vae_weights_file(args.vae) if args.vae else None
            hashes["vae"] = file_hash(vfile) if vfile else None
        text = parameters_text(s, mode, model_name, hashes["model"],
                               os.path.basename(os.path.normpath(args.vae)) if args.vae else None, hashes["vae"],
                               width, height, n, pos)
        return text + (f", {extra}" if extra else "")

    def save(image, path, text):
        # a new file is listed BEFORE it appears, so that Ctrl-C at any moment finds it
        new = not os.path.exists(path)
        if new:
            written.append(path)
        write_png_atomic(image, path, text, args.overwrite)
        if not new:
            written.append(path)

    def on_step(i, t, latents, x0_pred):
        if i in step_files:
            from .images import postprocess, to_pil
            decoded = postprocess(pipe.vae_decode(x0_pred / np.float32(pipe.scaling_factor)))  # [B, H, W, 3]
            images = to_pil(decoded)
            if not os.path.isdir(args.save_steps):
                os.makedirs(args.save_steps)
                created.append(args.save_steps)
            for b, (img, path) in enumerate(zip(images, step_files[i])):
                save(img, path, meta(img.width, img.height, b + 1, f"Preview of step: {i + 1}"))
            frames[i] = images
        if bar is not None:
            bar.update(1)
            if i == total - 1:
                bar.close()
                _note(args, "npsd: decoding the latents with the VAE ...")

    kw = dict(negative_prompt=s["negative_prompt"], num_inference_steps=s["steps"],
              guidance_scale=s["guidance_scale"], height=s["height"], width=s["width"], seed=s["seed"],
              sampler=s["sampler"], num_images=n, output_type="np", callback=on_step, eta=s["eta"],
              use_karras_sigmas=s["karras"], timestep_spacing=s["timestep_spacing"], clip_skip=s["clip_skip"] or None,
              long_prompt=s["long_prompt"], rng=s["rng"], prediction_type=s["prediction_type"],
              guidance_rescale=s["guidance_rescale"] or 0.0)
    try:
        if mode == "txt2img":
            result = pipe.txt2img(s["prompt"], **kw)
        elif mode == "img2img":
            result = pipe.img2img(s["prompt"], args.image, strength=s["strength"], **kw)
        else:
            result = pipe.inpaint(s["prompt"], args.image, args.mask, strength=s["strength"],
                                  mask_blur=s["mask_blur"], **kw)
        if bar is not None:
            bar.close()
            bar = None
        from .images import to_pil
        images = to_pil(result)                                               # B PIL images
        picks = [select - 1] if select else range(n)
        if select and select > len(images):
            raise InputError(f"--from-png: Batch pos {select} is larger than the batch size {n}")
        for path, b in zip(outputs, picks):
            img = images[b]
            save(img, path, meta(img.width, img.height, b + 1))
        if frames:
            rows = [[frames[i][b] for i in saved_steps] + [images[b]] for b in range(n)]
            labels = [f"step {i + 1}" for i in saved_steps] + ["result"]
            strip = filmstrip(rows, labels)          # its parameters are those of the images it shows
            save(strip, strip_file, meta(images[0].width, images[0].height, 1, "Filmstrip: true"))
    except KeyboardInterrupt:
        for path in written:                        # Ctrl-C: leave no file of this run behind
            if os.path.exists(path):
                os.unlink(path)
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    finally:
        if bar is not None:
            bar.close()
    for path in outputs:
        print(path, flush=True)
    if args.save_steps is not None:
        _note(args, f"npsd: {len(step_files) * n} step previews and {strip_file} in {args.save_steps}")
    _note(args, f"npsd: done in {time.perf_counter() - started:.1f} s (seed {s['seed']})")
    return 0


# --- the entry point ----------------------------------------------------------------------------

def _one_line(e):
    text = " ".join(str(e).split("\n")).strip()
    return text or type(e).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"npsd: warning: {_one_line(message)}", file=sys.stderr, flush=True)


def main(argv=None):
    """Run the command line; returns the exit code (the console script exits with it).
    argv: the arguments without the program name (default sys.argv[1:])."""
    restart = list(sys.argv[1:]) if argv is None else None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"npsd: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:                          # --help, --version
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        print("npsd: error: give a command: txt2img, img2img, inpaint or parity; see `npsd --help`", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            if args.command == "parity":
                from .parity_cli import run_parity
                return run_parity(args)
            return generate(args, restart)
        except KeyboardInterrupt:
            print("npsd: interrupted; no output written", file=sys.stderr)
            return 130
        except Exception as e:                       # noqa: BLE001 - every error becomes one line
            if debug:
                traceback.print_exc()
            if isinstance(e, (InputError, CheckpointError)):
                print(f"npsd: error: {_one_line(e)}", file=sys.stderr)
                return 2
            if isinstance(e, (NpsdError, OSError)):
                print(f"npsd: error: {_one_line(e)}", file=sys.stderr)
                return 1
            print(f"npsd: internal error: {type(e).__name__}: {_one_line(e)}; rerun with --debug for the "
                  f"traceback and report it", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
