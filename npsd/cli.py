"""The command line: `npsd txt2img | img2img | inpaint | parity | trace | compare | serve` (also `python -m npsd`).

    npsd txt2img "a red circle on a blue background" -o out.png --steps 20 --seed 1
    npsd img2img "a watercolour painting" --image in.png --strength 0.6
    npsd inpaint "a cat" --image in.png --mask mask.png
    npsd txt2img --from-png out.png --steps 30         # re-run from a PNG's parameters
    npsd parity --model v1-5-pruned-emaonly.safetensors
    npsd trace "a cat" --steps 4 -o npsd.safetensors      # every block's activations (docs/traces.md)
    npsd txt2img --from-png out.png --trace run.safetensors  # ... of the run that makes an image
    npsd compare npsd.safetensors reference.safetensors  # the first block where they differ
    npsd serve --models-dir models/                     # AUTOMATIC1111's HTTP API and a page (npsd/serve/)

What this module promises (tests/test_cli.py checks each):
- every PNG carries its generation parameters in the "parameters" text chunk, in A1111's names
  (npsd/pngmeta.py writes them and reads them back for --from-png);
- files are written atomically (npsd/images.py's write_png_atomic: a temporary file in the same
  folder, then os.replace); an existing output is refused before any work unless --overwrite;
  Ctrl-C leaves no file behind and exits 130;
- errors are one line on stderr that says what to do; exit code 2 for bad usage or input (options,
  images, model or VAE files that cannot be used: InputError, CheckpointError), 1 for anything else
  (a run that fails, e.g. NaN latents; a file system error; memory that ran out; an internal error);
  --debug adds the traceback;
- the same seed and parameters give byte-identical PNGs.
stdout receives only the paths of the images written (one a line); everything else goes to stderr.

Conventions:
- Model hash: the first 10 hex digits of the SHA-256 of the checkpoint file (A1111's "AutoV2" hash);
  for a diffusers folder, of its UNet weights file (unet/diffusion_pytorch_model.*).
- --clip-skip N counts as diffusers' clip_skip (0 = last layer); the PNG stores A1111's "Clip skip"
  (N + 1), and --from-png converts it back.
- --threads N: npsd's own threads (the fast kernels' pieces, nn.set_threads) and the BLAS threads
  of the plain path (npsd.blas.limit_threads): through npsd.blas (NumPy's OpenBLAS, by ctypes);
  where that is not possible (another BLAS), through threadpoolctl when installed; without it, npsd
  sets OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS and restarts itself with the same
  arguments (os.execv): OpenBLAS reads them only when numpy loads it, which importing npsd has done.
- --from-png re-makes one image of a batch alone (it re-runs the batch and keeps "Batch pos");
  a PNG made by img2img/inpaint needs the same subcommand and the input --image (and --mask).
"""

import argparse
import bdb
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from . import nn, resources
from .version import __version__
from .blas import THREAD_VARS, limit_threads
from .errors import CheckpointError, InputError, NpsdError, UsageError, one_line
from .generation import (file_hash, model_defaults, model_file, network_hashes, pipeline_call,  # noqa: F401
                         png_size, step_range, to_images)                                         # (also cli's API)
from .hires import SCALE as HIRES_SCALE, STRENGTH as HIRES_STRENGTH, UPSCALERS, check_resize
from .a1111_inpaint import INPAINT_AREAS, MASKED_CONTENT
from .images import RESIZE_MODES, filmstrip, heat_overlay, leftover_parts, to_pil, write_png_atomic
from .pngmeta import (SCHEDULE_SETTINGS, checkpoint_title, parameters_text, sampler_from_a1111, settings_from_png,
                      short_hash, size_of)
from .prompts import EMPHASIS
from .refiner import HIRES_PASSES as REFINER_PASSES, SWITCH_AT as REFINER_SWITCH_AT
from .loading import BUILTIN_SAME_VALUES, WEIGHTS_DTYPES
from .pipeline import DECODERS
from .previews import PREVIEW_METHODS, check_method, preview, taesd_for
from .brownian import SDE_NOISES
from .clip import layer_count
from .rng import RNG_KINDS, SEED_LIMIT
from .tome import check_ratio
from .schedulers import (KDIFFUSION_SAMPLERS, NOISE_SAMPLER_SAMPLERS, PREDICTION_TYPES, SAMPLERS, SCHEDULE_TYPES,
                         SIGMA_SAMPLERS, SPACINGS)

WEIGHTS_DTYPE_HELP = ("keep the weights in float16 to halve their memory; npsd computes in float32 either way, and "
                      "the image changes by the float16 rounding of the weights (default float32)")
PROMPT_SYNTAX_HELP = ("a1111 (default): AUTOMATIC1111's (word:1.3), [word], BREAK, [a:b:when], [a|b], a AND b:0.5 and <lora:NAME:S> "
                      "(docs/prompts.md); plain: brackets are literal, as in diffusers")


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


def _ratio(text):
    """--token-merging-ratio R: a number in [0, 0.9] (npsd/tome.py)."""
    try:
        return check_ratio(float(text), "the ratio")
    except (ValueError, InputError) as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, InputError) else f"expected a number, got {text!r}") from None


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


def _lora_option(text):
    """--lora FILE[:STRENGTH] -> (FILE, strength)."""
    path, _, strength = text.rpartition(":") if ":" in text and not os.path.exists(text) else (text, "", "1")
    try:
        value = float(strength)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FILE[:STRENGTH], got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the strength must be a finite number, got {strength}")
    return path, value


def _sampler(text):
    """--sampler NAME: npsd's names (argparse's choices); an A1111 name gets npsd's name in the error."""
    found, schedule = sampler_from_a1111(text) if text not in SAMPLERS else (None, None)
    if found:
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}: npsd's name for it is {found!r}"
                                         f"{f' with --schedule-type {schedule}' if schedule else ''}")
    return text


def _size(text):
    """--seed-resize-from WxH -> (width, height), two whole numbers > 0."""
    if size_of(text) is None:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 512x384), got {text!r}")
    if min(size_of(text)) <= 0:
        raise argparse.ArgumentTypeError(f"the width and height must be > 0, got {text}")
    return size_of(text)


def _hires_resize(text):
    """--hires-resize WxH -> (width, height), whole numbers >= 0, not both 0 (0: from the other side)."""
    if size_of(text) is None:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 1024x768, or 1024x0), got {text!r}")
    try:
        return check_resize(size_of(text))
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seed(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {v}")
    return v


def build_parser():
    p = _Parser(prog="npsd", description="Stable Diffusion v1.x in NumPy: generate images on the CPU, "
                "check parity with PyTorch.")
    p.add_argument("--version", action="version", version=f"npsd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{txt2img,img2img,inpaint,parity,trace,compare,serve}",
                           parser_class=_Parser)
    for mode, help_text in (("txt2img", "generate images from a prompt"),
                            ("img2img", "redraw --image following a prompt (SDEdit)"),
                            ("inpaint", "repaint the white part of --mask in --image")):
        _generation_options(sub.add_parser(mode, help=help_text, description=help_text), mode)
    par = sub.add_parser("parity", help="compare npsd with diffusers/transformers on your checkpoint",
                         description="Load a checkpoint with npsd and with diffusers/transformers and compare them "
                         "block by block (needs the test extra: pip install \"npsd[test]\").")
    par.add_argument("--model", help="an SD v1.x or 2.x .safetensors/.ckpt file or diffusers folder (default: the "
                     "built-in small model)")
    par.add_argument("--size", type=_int_at_least(8), default=64, help="image side of the comparison (default 64)")
    par.add_argument("--tolerance", type=_float_in(0, lo_open=True), default=1e-4,
                     help="largest accepted relative error per block (default 1e-4)")
    par.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default 0)")
    par.add_argument("--no-ema", action="store_true", help="compare the raw UNet weights instead of the EMA copies")
    par.add_argument("--debug", action="store_true", help="show tracebacks")
    from .trace_cli import add_parsers
    add_parsers(sub, _int_at_least, _float_in, _seed, SAMPLERS, WEIGHTS_DTYPE_HELP, PROMPT_SYNTAX_HELP, _lora_option)
    srv = sub.add_parser("serve", help="serve AUTOMATIC1111's HTTP API and a page (needs: pip install \"npsd[serve]\")",
                         description="A web server: AUTOMATIC1111's /sdapi/v1 API (txt2img, img2img, progress, "
                         "models, ...) and a page at /; one generation at a time, the others wait in order.")
    srv.add_argument("--listen", action="store_true", help="accept connections from other machines (0.0.0.0; "
                     "default: this machine only, 127.0.0.1); give --api-auth with it")
    srv.add_argument("--port", type=_int_at_least(1, "port"), default=7860, help="the port (default 7860)")
    srv.add_argument("--model", metavar="NAME", help="the model loaded first: the title of a file of --models-dir "
                     "(default: the built-in npsd-tiny)")
    srv.add_argument("--models-dir", metavar="DIR", help="the models offered (.safetensors/.ckpt files and diffusers "
                     "folders, searched recursively); the built-in model is always offered")
    srv.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32", help=WEIGHTS_DTYPE_HELP)
    srv.add_argument("--output-dir", metavar="DIR",
                     help="also write every image made here, as a PNG with its parameters")
    srv.add_argument("--lora-dir", metavar="DIR", help="where <lora:NAME:S> in a prompt finds NAME.safetensors")
    srv.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings used by name in prompts")
    srv.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP basic authentication "
                     "(several: USER:PASS,USER2:PASS2)")
    srv.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _generation_options(p, mode):
    a = p.add_argument
    a("prompt", nargs="?", default=None, help="what the image should show (optional with --from-png)")
    a("-o", "--output", metavar="FILE", help="output PNG (default npsd-<seed>.png; with --num-images N, NAME-1.png ... NAME-N.png)")
    a("--negative-prompt", metavar="TEXT", help="what the image should not show (default: empty)")
    a("--steps", metavar="N", type=_int_at_least(1, "steps"), help="denoising steps (default: the model's, SD v1.x: 50)")
    a("--guidance-scale", metavar="SCALE", type=_float_in(0.0, what="guidance"),
      help="classifier-free guidance scale; <= 1 turns guidance off (default: the model's, SD v1.x: 7.5)")
    a("--sampler", choices=SAMPLERS, type=_sampler, help="sampler (default: the model's)")
    a("--seed", metavar="N", type=_seed, help="random seed in [0, 2**64) (default: random below 2**32, printed)")
    a("--rng", choices=RNG_KINDS, help="random numbers: numpy (npsd's own, default) or torch (torch's CPU "
                                       "generator: diffusers' and A1111's 'CPU' images from the same seed)")
    a("--variation-seed", metavar="N", type=_seed, help="A1111's variation seed: its noise is mixed into the seed's")
    a("--variation-strength", metavar="S", type=_float_in(0.0, 1.0, what="variation strength"),
      help="how much of the variation seed's noise, 0 to 1 (default 0)")
    a("--ensd", dest="eta_noise_seed_delta", metavar="N", type=_seed, help="A1111's eta noise seed delta: the samplers' noise from seed + N "
                                              "(default 0)")
    a("--emphasis", choices=EMPHASIS, help="A1111's emphasis mode for (word:1.2) weights: original (default), "
                                           "no_norm, ignore, none (docs/prompts.md)")
    a("--ngms", dest="negative_guidance_min_sigma", metavar="SIGMA", type=_float_in(0.0, what="sigma"),
      help="A1111's negative guidance minimum sigma: every second model call below SIGMA skips the unconditional "
           "pass (with --schedule-type; default 0, off)")
    a("--tiling", action=argparse.BooleanOptionalAction, default=None,
      help="A1111's Tiling: every padded convolution wraps around the image's edges, so that the image tiles "
           "seamlessly (default: off)")
    a("--token-merging-ratio", metavar="R", type=_ratio,
      help="A1111's token merging ratio (ToMe): merge that share of the full-size map's tokens before "
           "self-attention, in [0, 0.9] (faster at large sizes, the image changes a little; default 0, off)")
    a("--seed-resize-from", metavar="WxH", type=_size,
      help="A1111's seed resize: the seed's start noise of a WxH image, pasted centred (default: off)")
    a("--inpainting-mask-weight", metavar="W", type=_float_in(0.0, 1.0, what="weight"),
      help="A1111's inpainting conditioning mask strength for a 9-channel inpainting model, 0 to 1 (default 1)")
    a("--height", metavar="PIXELS", type=_int_at_least(1, "height"), help="image height, a multiple of 8 (default: the model's)")
    a("--width", metavar="PIXELS", type=_int_at_least(1, "width"), help="image width, a multiple of 8 (default: the model's)")
    a("--num-images", metavar="N", type=_int_at_least(1, "count"), help="images to generate (default 1)")
    a("--model", metavar="PATH", help="an SD v1.x .safetensors/.ckpt file or diffusers folder (default: the built-in small model)")
    a("--no-ema", action="store_true", default=None,
      help="use the raw UNet weights of a file that also holds EMA copies (v1-5-pruned.*; default: the EMA ones)")
    a("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32", help=WEIGHTS_DTYPE_HELP)
    a("--vae", metavar="PATH", help="a separate VAE: a .safetensors/.ckpt file (original names, optionally first_stage_model.*, "
                    "or diffusers names) or a diffusers vae folder")
    if mode != "txt2img":
        a("--image", metavar="FILE", help="input image (required)")
        a("--strength", metavar="S", type=_float_in(0.0, 1.0, lo_open=True, what="strength"),
          help=f"how much of --image to redraw, in (0, 1] (default {0.8 if mode == 'img2img' else 1.0})")
    if mode == "txt2img":
        a("--hires-scale", metavar="S", type=_float_in(1.0, 8.0, what="scale"),
          help="A1111's hires fix: enlarge the latents S times (1 to 8) and redraw them with img2img at that size "
               "(npsd/hires.py; default: no second pass)")
        a("--hires-upscaler", choices=UPSCALERS, help="how the first pass is enlarged: the latents (latent*; default "
                                                      "latent: bilinear) or the image (lanczos, nearest, none)")
        a("--hires-steps", metavar="N", type=_int_at_least(0, "steps"),
          help="the second pass's steps (default 0: as --steps)")
        a("--hires-strength", metavar="S", type=_float_in(0.0, 1.0, what="strength"),
          help="how much the second pass redraws, A1111's denoising strength (default 0.7)")
        a("--hires-resize", metavar="WxH", type=_hires_resize,
          help="A1111's hires resize, instead of --hires-scale: enlarge to cover WxH and crop the middle "
               "(0 for one side: from the other and the aspect ratio)")
        a("--hires-prompt", metavar="TEXT", help="the second pass's prompt (default: PROMPT)")
        a("--hires-sampler", choices=SAMPLERS, help="the second pass's sampler (default: --sampler's)")
        a("--hires-schedule-type", choices=SCHEDULE_TYPES,
          help="the second pass's A1111 schedule type (default: --schedule-type's, resolved for the hires sampler)")
        a("--hires-negative-prompt", metavar="TEXT", help="the second pass's negative prompt (default: --negative-prompt)")
        a("--hires-token-merging-ratio", metavar="R", type=_ratio,
          help="the second pass's token merging ratio, in [0, 0.9] (default: --token-merging-ratio's)")
        a("--hires-checkpoint", metavar="PATH", help="A1111's Hires checkpoint: another model (same latents) runs the "
                                                    "second pass (default: --model)")
        a("--refiner", metavar="PATH", help="A1111's Refiner, with --schedule-type: another model (same latents) "
                                           "takes over at --refiner-switch-at (npsd/refiner.py)")
        a("--refiner-switch-at", metavar="F", type=_float_in(0.0, 1.0, what="switch point"),
          help=f"the completed ratio (999 - timestep) / 1000 at which --refiner takes over, 0 to 1 (default "
               f"{REFINER_SWITCH_AT}; 1: never)")
        a("--hires-refiner-pass", choices=tuple(REFINER_PASSES),
          help="with the hires fix, the passes --refiner acts in (A1111's option; default: 'second pass')")
        a("--models-dir", metavar="DIR", help="where --from-png's Refiner and Hires checkpoint are found by name "
                                              "(NAME.safetensors, NAME.ckpt or a diffusers folder NAME)")
    if mode != "txt2img":
        a("--noise-multiplier", dest="initial_noise_multiplier", metavar="M", type=_float_in(0.0, what="multiplier"),
          help="A1111's noise multiplier for img2img: the noise added to the image times M, >= 0 (default 1)")
        a("--resize-mode", choices=RESIZE_MODES,
          help="how an image of another shape is brought to --height x --width (default: just resize)")
    if mode == "inpaint":
        a("--mask", metavar="FILE", help="mask image, white = repaint (required)")
        a("--mask-blur", metavar="PIXELS", type=_int_at_least(0, "pixels"),
          help="blur radius of the mask edge in pixels (default 0; with --schedule-type: A1111's mask blur)")
        a("--masked-content", choices=MASKED_CONTENT,
          help="with --schedule-type, A1111's start for the masked region (default original)")
        a("--inpaint-area", choices=INPAINT_AREAS,
          help="with --schedule-type: 'only masked' repaints a crop around the mask at --height x --width "
               "(default: whole picture)")
        a("--masked-area-padding", metavar="PIXELS", type=_int_at_least(0, "pixels"),
          help="'only masked': the crop's margin around the mask (default 32)")
    a("--eta", type=_float_in(0.0, 1.0, what="eta"),
      help="DDIM eta, from 0 (deterministic) to 1 (DDPM's step variance) (default 0)")
    a("--karras", action=argparse.BooleanOptionalAction, default=None,
      help="Karras sigmas (the sigma samplers: " + ", ".join(SIGMA_SAMPLERS) + "; default off)")
    a("--timestep-spacing", choices=SPACINGS, help="timestep spacing (default: the model's, SD v1.x: leading)")
    a("--schedule-type", choices=SCHEDULE_TYPES,
      help="AUTOMATIC1111's schedule type, for the samplers A1111 runs with k-diffusion (" + ", ".join(KDIFFUSION_SAMPLERS)
           + "): its sigmas, timesteps, start and img2img steps, to remake its images (with --rng torch); "
             "automatic = A1111's choice per sampler (default: diffusers' schedule, --timestep-spacing and --karras)")
    a("--schedule-sigma-min", metavar="SIGMA", type=_float_in(0.0, what="sigma"),
      help="A1111's schedule min sigma: the schedule's smallest sigma instead of the model's (with --schedule-type; "
           "0, the default: the model's)")
    a("--schedule-sigma-max", metavar="SIGMA", type=_float_in(0.0, what="sigma"),
      help="A1111's schedule max sigma: the schedule's largest sigma instead of the model's (0: the model's)")
    a("--schedule-rho", metavar="RHO", type=_float_in(0.0, what="rho"),
      help="A1111's schedule rho, for the karras and polyexponential types (0, the default: 7 and 1)")
    a("--discard-penultimate-sigma", action="store_true", default=None,
      help="A1111's always discard next-to-last sigma: one more sigma computed and the next-to-last dropped")
    a("--beta-schedule-alpha", metavar="A", type=_float_in(0.0, lo_open=True, what="alpha"),
      help="alpha of the beta schedule type's Beta distribution (default 0.6, A1111's)")
    a("--beta-schedule-beta", metavar="B", type=_float_in(0.0, lo_open=True, what="beta"),
      help="beta of the beta schedule type's Beta distribution (default 0.6, A1111's)")
    a("--prediction-type", choices=PREDICTION_TYPES,
      help="what the UNet predicts (default: the model's config, SD v1.x: epsilon)")
    a("--sde-noise", choices=SDE_NOISES,
      help="the step noise of the SDE samplers (dpmpp_2m_sde, dpmpp_sde, dpmpp_3m_sde): generator (default; drawn "
           "step by step, as diffusers) or brownian (a Brownian path of the seed, as A1111; npsd/brownian.py)")
    a("--guidance-rescale", metavar="PHI", type=_float_in(0.0, 1.0, what="phi"),
      help="rescale the guided prediction's std to the conditional one's (Lin et al. 2024 eq. 16), 0 = off (default)")
    a("--clip-skip", metavar="N", type=_int_at_least(0, "layers"),
      help="skip the last N CLIP layers, as diffusers' clip_skip (A1111's 'Clip skip' is N + 1) (default 0)")
    a("--long-prompt", choices=("truncate", "chunk"), help="prompts over 77 tokens: truncate (default) or chunk")
    a("--prompt-syntax", choices=("a1111", "plain"), help=PROMPT_SYNTAX_HELP)
    a("--lora", metavar="FILE[:STRENGTH]", action="append", type=_lora_option,
      help="apply a LoRA file (kohya/A1111 or diffusers/PEFT) with a strength (default 1), merged into the "
           "weights without keeping a second copy of them; repeatable")
    a("--lora-dir", metavar="DIR", help="where <lora:NAME:S> in a prompt finds NAME.safetensors (also --from-png's LoRAs)")
    a("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings used by name in prompts (the file's stem)")
    a("--threads", metavar="N", type=_int_at_least(1, "threads"),
      help="threads: npsd's own and BLAS's (default: one per CPU this process may use)")
    a("--attention-maps", metavar="DIR", help="write each word's cross-attention map over the image (DAAM, "
                                                 "npsd/attention_maps.py) and a grid of them into DIR")
    a("--save-steps", metavar="DIR", help="write every K-th step's predicted x0 as PNG and a filmstrip.png into DIR "
                                          "(each preview costs one VAE decode, see --preview)")
    a("--preview", choices=PREVIEW_METHODS, default="full",
      help="with --save-steps: how previews are drawn: full (default): the VAE decode; approx: a 4x3 linear "
           "map of the latents (npsd/previews.py), blocky but almost free; taesd: the tiny autoencoder of --taesd")
    a("--vae-decoder", choices=DECODERS,
      help="what decodes the final latents: vae (default): the model's VAE; taesd: the tiny autoencoder of --taesd, "
           "several times faster and less detailed, for drafts (input images are still encoded by the VAE)")
    a("--taesd", metavar="PATH", help="with --preview taesd or --vae-decoder taesd: TAESD weights for the model's latents "
                                      "(a diffusers AutoencoderTiny folder or file, or madebyollin's taesd_decoder file; "
                                      "madebyollin/taesd: SD v1.x)")
    a("--save-every", type=_int_at_least(1, "K"), default=1, metavar="K",
      help="with --save-steps: every K-th step (default 1)")
    a("--trace", metavar="FILE", help="also write every block's input and output of this run (the UNet's at every "
                                      "step) to FILE.safetensors, for `npsd compare` (docs/traces.md)")
    a("--from-png", metavar="IMAGE", help="re-run from the parameters stored in a PNG; options given override them")
    a("--overwrite", action="store_true", help="replace existing output files")
    a("--quiet", action="store_true", help="no progress bar or notes; print only the output path(s)")
    a("--debug", action="store_true", help="show tracebacks")


# --- small helpers ------------------------------------------------------------------------------

def output_paths(output, seed, n):
    """-o and --num-images -> the list of output paths."""
    if output is None:
        output = f"npsd-{seed}.png"
    if n == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{k}{ext or '.png'}" for k in range(1, n + 1)]


# what npsd writes, by the name's ending: why the name must end so (a trace must not replace a PNG)
OUTPUT_KINDS = {".png": "npsd writes PNG files (the parameters live in a PNG text chunk)",
                ".safetensors": "a trace is a .safetensors file"}


def check_writable(paths, overwrite, suffix=".png", option="-o"):
    """Refuse existing outputs (without --overwrite), missing folders and names that do not end in
    `suffix` (a key of OUTPUT_KINDS), before any work; option: the option that names them."""
    for p in paths:
        folder = os.path.dirname(os.path.abspath(p))
        if not p:
            raise UsageError(f"{option} is empty; give the name of the file to write")
        if not p.lower().endswith(suffix):
            raise UsageError(f"{p}: {OUTPUT_KINDS[suffix]}; give a name ending in {suffix}")
        if not os.path.isdir(folder):
            raise UsageError(f"the folder of {p} does not exist; create it or choose another {option}")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write to the folder of {p}; choose another {option}")
        if os.path.isdir(p):
            raise UsageError(f"{p} is a folder; give a file name with {option}")
        if os.path.exists(p) and not overwrite:
            raise UsageError(f"{p} already exists; use --overwrite to replace it or {option} to choose another name")


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


def attach_vae(pipe, path, weights_dtype="float32"):
    """Replace the model's VAE by the one in `path` (npsd.loading.load_vae: original names as in
    vae-ft-mse-840000-ema-pruned, with or without first_stage_model., or diffusers names). The
    model's VAE settings (scaling factor, groups) stay unless the VAE brings its own config.json."""
    from .loading import load_vae
    params, vae_config = load_vae(path, weights_dtype)
    z = params["post_quant_conv"]["weight"].shape[0]
    if z != pipe.latent_channels:
        raise CheckpointError(f"--vae: the VAE's latents have {z} channels but the model's UNet uses "
                              f"{pipe.latent_channels}; give a VAE made for SD v1.x")
    pipe.params["vae"] = params
    if os.path.isdir(path):
        pipe.config["vae"] = vae_config


# --- LoRAs and embeddings -------------------------------------------------------------------------

def attach_networks(pipe, args, settings):
    """--lora files, or --from-png's LoRA names looked up in --lora-dir; --lora-dir for prompt tags;
    --embeddings-dir for embeddings named in prompts."""
    from .pipeline import _lora_file
    pipe.lora_dir, pipe.embeddings_dir = args.lora_dir, args.embeddings_dir
    for path, strength in settings["lora"]:        # never unloaded here: merged without a second copy
        pipe.load_lora(path, strength, keep_base=False)                # (check_lora_files checked them)
    for name, strength in settings["lora_names"]:                      # stored in --from-png's image
        if args.lora_dir is None:
            raise UsageError(f"--from-png: the image used the LoRA {name!r}; give --lora-dir (a folder with "
                             f"{name}.safetensors) or --lora FILE")
        pipe.load_lora(_lora_file(args.lora_dir, name), strength, name=name, keep_base=False)
    if settings["ti_names"] and args.embeddings_dir is None:
        raise UsageError(f"--from-png: the image used the embeddings {', '.join(settings['ti_names'])}; give "
                         "--embeddings-dir (a folder with those files)")


# --- the settings of a run: the options given, over those stored in --from-png's PNG ------------

SETTINGS = ("prompt", "negative_prompt", "steps", "guidance_scale", "sampler", "seed", "height", "width",
            "num_images", "strength", "eta", "karras", "timestep_spacing", "clip_skip", "long_prompt",
            "resize_mode", "mask_blur", "masked_content", "inpaint_area", "masked_area_padding", "variation_seed",
            "variation_strength", "eta_noise_seed_delta", "seed_resize_from", "initial_noise_multiplier",
            "inpainting_mask_weight", "negative_guidance_min_sigma", "emphasis", "tiling", "token_merging_ratio", "no_ema", "rng", "prediction_type", "guidance_rescale", "prompt_syntax", "lora",
            "lora_names", "ti_names", "vae_decoder", "sde_noise", "schedule_type", "hires_scale", "hires_upscaler",
            "hires_steps", "hires_strength", "hires_resize", "hires_prompt", "hires_negative_prompt", "hires_sampler",
            "hires_schedule_type", "hires_token_merging_ratio", "hires_checkpoint", "refiner", "refiner_switch_at",
            "hires_refiner_pass", *SCHEDULE_SETTINGS)
# the options whose default is not the model's: the pipeline's own defaults (npsd/pipeline.py)
OPTION_DEFAULTS = {"rng": "numpy", "negative_prompt": "", "num_images": 1, "long_prompt": "truncate", "eta": 0.0,
                   "clip_skip": 0, "mask_blur": 0, "masked_content": "original",
                   "inpaint_area": "whole picture", "masked_area_padding": 32, "resize_mode": "just resize", "variation_strength": 0.0,
                   "eta_noise_seed_delta": 0, "seed_resize_from": None, "initial_noise_multiplier": 1.0,
                   "inpainting_mask_weight": 1.0, "negative_guidance_min_sigma": 0.0, "emphasis": "original",
                   "tiling": False, "token_merging_ratio": 0.0,
                   "prompt_syntax": "a1111", "lora": [], "lora_names": [],
                   "ti_names": [], "vae_decoder": "vae", "sde_noise": "generator", "hires_upscaler": "latent",
                   "hires_steps": 0, "hires_refiner_pass": "second pass"}


# --- the generation command ---------------------------------------------------------------------

def _note(args, message):
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def check_exists(path, what):
    if path == "":
        raise UsageError(f"{what} is empty; give a path")
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist; check the path")


def check_lora_files(loras):
    """--lora FILE[:STRENGTH] options, before the model loads: files that exist."""
    for path, _ in loras or ():
        check_exists(path, "--lora")
        if os.path.isdir(path):
            raise UsageError(f"--lora {path} is a folder; give a LoRA file (a folder of LoRAs is --lora-dir)")


def resolve_settings(args, mode):
    """The settings of a run: those stored in --from-png, overridden by the options given, the rest
    left None (the model's defaults, filled in after loading). -> (settings, stored, batch pos to keep)."""
    stored = settings_from_png(args.from_png, mode) if args.from_png else {}
    settings = {k: stored.get(k) for k in SETTINGS}
    for k in SETTINGS:
        v = getattr(args, k, None)
        if v is not None:
            settings[k] = v
    if settings["prompt"] is None:
        raise UsageError(f"give a PROMPT (or --from-png IMAGE); see `npsd {mode} --help`")
    if stored.get("_bad_sampler") and args.sampler is None:
        raise InputError(stored["_bad_sampler"])
    if stored.get("_bad_rng") and args.rng is None:
        raise InputError(stored["_bad_rng"])
    if stored.get("_bad_vae_decoder") and args.vae_decoder is None:
        raise InputError(stored["_bad_vae_decoder"])
    if stored.get("_bad_schedule_type") and args.schedule_type is None and not args.karras \
            and args.timestep_spacing is None:
        raise InputError(stored["_bad_schedule_type"])
    # A1111's schedule types and diffusers' spacing / Karras sigmas exclude each other: an option
    # given replaces what the PNG stored of the other kind
    diffusers_options = [o for o, v in (("--karras", args.karras), ("--timestep-spacing", args.timestep_spacing)) if v]
    if args.schedule_type is not None and diffusers_options:
        raise UsageError(f"--schedule-type sets A1111's sigmas itself; drop {' and '.join(diffusers_options)}")
    if args.schedule_type is not None:
        settings["karras"] = settings["timestep_spacing"] = None
    elif diffusers_options or (args.sampler is not None and args.sampler not in KDIFFUSION_SAMPLERS):
        settings["schedule_type"] = None
    if settings["schedule_type"] and settings["sampler"] is not None and settings["sampler"] not in KDIFFUSION_SAMPLERS:
        raise UsageError(f"--schedule-type applies to the samplers {', '.join(KDIFFUSION_SAMPLERS)}, "
                         f"not to {settings['sampler']}")
    if not settings["schedule_type"]:                         # (diffusers' schedule: A1111's settings do not apply)
        given = [o for o in SCHEDULE_SETTINGS if getattr(args, o, None) is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is a setting of A1111's schedule types; give --schedule-type")
        settings.update(dict.fromkeys(SCHEDULE_SETTINGS))
    if args.lora is not None:                                  # --lora replaces the image's LoRAs
        settings["lora_names"] = []
    for k, default in OPTION_DEFAULTS.items():
        settings[k] = settings[k] or default
    settings["karras"] = bool(settings["karras"])
    if settings["hires_strength"] is None:
        settings["hires_strength"] = HIRES_STRENGTH
    if stored.get("_bad_hires_sampler") and settings["hires_scale"] and getattr(args, "hires_sampler", None) is None:
        raise InputError(stored["_bad_hires_sampler"])
    if stored.get("_bad_hires_upscaler") and settings["hires_scale"] and args.hires_upscaler is None:
        raise InputError(stored["_bad_hires_upscaler"])
    if getattr(args, "hires_scale", None) is not None and getattr(args, "hires_resize", None) is None:
        settings["hires_resize"] = None                        # --hires-scale replaces a stored resize
    for k in ("hires_prompt", "hires_negative_prompt"):
        settings[k] = settings[k] or None                      # "": the first pass's (A1111's empty text)
    if settings["hires_resize"] and not settings["hires_scale"]:
        settings["hires_scale"] = HIRES_SCALE                  # (A1111's hr_scale, unused with a resize)
    if not settings["hires_scale"]:
        given = [o for o in ("hires_prompt", "hires_negative_prompt", "hires_sampler", "hires_schedule_type",
                             "hires_token_merging_ratio") if settings[o] is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is the hires fix's; give --hires-scale or --hires-resize")
    if settings["refiner_switch_at"] is None:
        settings["refiner_switch_at"] = REFINER_SWITCH_AT
    if not settings["refiner"] and getattr(args, "refiner_switch_at", None) is not None:
        raise UsageError("--refiner-switch-at is the refiner's; give --refiner PATH")
    if settings["refiner"] and not settings["schedule_type"]:
        raise UsageError("--refiner switches at A1111's completed ratio, computed from its schedules' noise levels; "
                         "give --schedule-type (e.g. automatic)")
    if not settings["hires_scale"] and getattr(args, "hires_checkpoint", None) is not None:
        raise UsageError("--hires-checkpoint is the hires fix's; give --hires-scale or --hires-resize")
    if settings["hires_scale"] or settings["refiner"]:
        given = [o for o in ("save_steps", "attention_maps", "trace") if getattr(args, o, None) is not None]
        if given and not settings["hires_scale"]:
            raise UsageError(f"--{given[0].replace('_', '-')} records one model; give it without --refiner")
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} records one pass; give it without --hires-scale")
    if settings["strength"] is None:
        settings["strength"] = 0.8 if mode == "img2img" else 1.0
    select = stored.get("_select") if args.num_images is None else None
    return settings, stored, select


def check_inputs(args, mode):
    """Options that fit the subcommand, input files that exist: one-line usage errors."""
    image, mask = getattr(args, "image", None), getattr(args, "mask", None)   # img2img / inpaint options
    if mode != "txt2img" and image is None:
        raise UsageError(f"{mode} needs --image FILE" + (" and --mask FILE" if mode == "inpaint" else ""))
    if mode == "inpaint" and mask is None:
        raise UsageError("inpaint needs --mask FILE (white = repaint)")
    for path, what in ((args.model, "--model"), (args.vae, "--vae"), (image, "--image"), (mask, "--mask"),
                       (getattr(args, "refiner", None), "--refiner"),
                       (getattr(args, "hires_checkpoint", None), "--hires-checkpoint")):
        check_exists(path, what)
    check_lora_files(args.lora)
    if args.save_steps is not None:
        check_folder(args.save_steps, "--save-steps")


def check_folder(path, what):
    """An output folder (--save-steps, --attention-maps): one that exists, or one that can be made, tried
    by making it and removing it again, so that a path that cannot be a folder fails before any work
    rather than after the generation."""
    if not path:
        raise UsageError(f"{what} is empty; give a folder")
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise UsageError(f"{what} {path} is a file; give a folder")
    missing, parent = [], os.path.abspath(path)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    made = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            made.append(folder)
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be made: {e.strerror or e}; give another folder") from None
    finally:
        for folder in reversed(made):
            os.rmdir(folder)


def taesd_uses(args, settings):
    """What asks for TAESD -> ["--vae-decoder taesd", "--preview taesd"] or fewer; any of them needs
    --taesd PATH (one-line usage error before any work)."""
    uses = [use for use, asked in (("--vae-decoder taesd", settings["vae_decoder"] == "taesd"),
                                   ("--preview taesd", args.save_steps is not None and args.preview == "taesd")) if asked]
    if uses and not args.taesd:
        if args.vae_decoder is None and settings["vae_decoder"] == "taesd":
            raise UsageError(f"--from-png: {args.from_png} was decoded by TAESD (VAE Decoder: TAESD); give --taesd "
                             "PATH (TAESD weights), or --vae-decoder vae for the full VAE")
        raise UsageError(f"{uses[0]} needs --taesd PATH (TAESD weights)")
    check_exists(args.taesd if uses else None, "--taesd")
    return uses


def step_targets(folder, every, start, total, n):
    """--save-steps: the steps whose x0 is saved (every k-th and the last) -> ({step: [path per image]},
    filmstrip path). Steps are numbered from 1 in the names: step-07.png (step-07-2.png for image 2)."""
    digits = len(str(total))
    saved = [i for i in range(start, total) if (i + 1) % every == 0 or i == total - 1]
    files = {i: [os.path.join(folder, f"step-{i + 1:0{digits}d}" + (f"-{b + 1}" if n > 1 else "") + ".png")
                 for b in range(n)] for i in saved}
    return files, os.path.join(folder, "filmstrip.png")


def generate(args, argv_for_restart=None):
    """txt2img / img2img / inpaint from parsed options; returns 0 (errors are raised).
    argv_for_restart: the arguments to restart with for --threads (npsd.blas.limit_threads), or None."""
    started = time.perf_counter()
    limiter = _limit_threads(args, argv_for_restart)  # noqa: F841 (kept alive while generating)
    settings, stored, select, outputs = _plan(args)                 # all checked before any work
    pipe, others = _load_model(args, settings)
    run = _Generation(args, settings, pipe, outputs, select, others)
    run.check_model(stored.get("_model"), stored.get("_taesd_hash"))
    run.run()
    for path in outputs + ([args.trace] if args.trace is not None else []):
        print(path, flush=True)
    if args.trace is not None:
        _note(args, f"npsd: {len(run.trace)} tensors traced in {args.trace}")
    if args.save_steps is not None:
        _note(args, f"npsd: {len(run.step_files) * run.n} step previews and {run.strip_file} in {args.save_steps}")
    _note(args, f"npsd: done in {time.perf_counter() - started:.1f} s (seed {settings['seed']})")
    return 0


def _limit_threads(args, argv_for_restart):
    """--threads N: npsd's own threads, then BLAS's -> the BLAS limiter (None without --threads)."""
    if not args.threads:
        return None
    from .settings import usable_cpus
    if args.threads > usable_cpus():
        warnings.warn(f"--threads {args.threads} is more than the {usable_cpus()} CPUs this process may use; "
                      "the threads beyond them take turns on those CPUs and make it slower")
    nn.set_threads(args.threads)
    limiter = limit_threads(args.threads, argv_for_restart)
    if args.debug:
        how = {"npsd.blas": "npsd.blas", "environment": "the environment", None: "the environment"}
        print(f"npsd: threads: {args.threads} via {how.get(limiter, 'threadpoolctl')} "
              f"({', '.join(f'{v}={os.environ.get(v)}' for v in THREAD_VARS)})", file=sys.stderr)
    return limiter


def _plan(args):
    """The settings, the inputs and the outputs, which must not exist, checked before any work
    -> (settings, the settings stored in --from-png's PNG, batch pos to keep, output paths)."""
    mode = args.command
    settings, stored, select = resolve_settings(args, mode)
    check_inputs(args, mode)
    taesd_uses(args, settings)
    random_seed = settings["seed"] is None
    if random_seed:
        settings["seed"] = int.from_bytes(os.urandom(4), "little")          # [0, 2**32)
    outputs = output_paths(args.output, settings["seed"], 1 if select else settings["num_images"])
    check_writable(outputs, args.overwrite)
    if args.trace is not None:
        check_writable([args.trace], args.overwrite, suffix=".safetensors", option="--trace")
    if random_seed:
        _note(args, f"seed: {settings['seed']}")
    return settings, stored, select, outputs


def _load_model(args, settings):
    """Load the model (and --vae), then fill the settings left None with its defaults -> (the Pipeline,
    {"refiner": .., "hires_checkpoint": ..}: each (its Pipeline, its path) or None)."""
    import npsd
    t0 = time.perf_counter()
    _note(args, f"npsd: loading {args.model or 'the built-in model'} ...")
    ema = not settings["no_ema"]
    pipe = npsd.load(args.model, ema=ema, weights_dtype=args.weights_dtype)
    settings["no_ema"] = pipe.info.get("ema") is False              # recorded only when raw weights were chosen
    if args.vae is not None:
        attach_vae(pipe, args.vae, args.weights_dtype)
    attach_networks(pipe, args, settings)
    others = {key: _load_other(args, settings, key) for key in ("refiner", "hires_checkpoint")}
    _note(args, f"npsd: loaded in {time.perf_counter() - t0:.1f} s")
    if "prediction_type" in pipe.info:                              # SD 2.x single files: v or epsilon
        kind, reason = pipe.info["prediction_type"]
        _note(args, f"npsd: the UNet predicts {kind} ({reason})"
                    + ("; --prediction-type overrides it" if settings["prediction_type"] is None else ""))
    model_defaults(settings, pipe)
    layers = layer_count(pipe.params["text_encoder"])
    if settings["clip_skip"] > layers:
        if args.clip_skip is None:
            raise UsageError(f"--from-png: the PNG's Clip skip {settings['clip_skip'] + 1} skips more than this "
                             f"model's {layers} text encoder layers; give --clip-skip 0 to {layers}")
        raise UsageError(f"--clip-skip {settings['clip_skip']} skips more than this model's {layers} text encoder "
                         f"layers; give 0 to {layers} (A1111's 'Clip skip N' is --clip-skip N-1)")
    hires_sampler = settings.get("hires_sampler") if settings.get("hires_scale") else None
    if settings["sde_noise"] == "brownian" and settings["sampler"] not in NOISE_SAMPLER_SAMPLERS \
            and hires_sampler not in NOISE_SAMPLER_SAMPLERS:
        if args.sde_noise is not None:
            raise UsageError(f"--sde-noise brownian applies to --sampler (or --hires-sampler) "
                             f"{', '.join(NOISE_SAMPLER_SAMPLERS)}, not to {settings['sampler']}")
        settings["sde_noise"] = "generator"          # --from-png's SDE sampler, run with another --sampler
    if settings["eta"] and settings["sampler"] != "ddim":
        warnings.warn(f"--eta is DDIM's; the {settings['sampler']} sampler ignores it")
        settings["eta"] = 0.0
    return pipe, others


def checkpoint_file(folder, name, what):
    """--from-png's checkpoint NAME (A1111's "Refiner" or "Hires checkpoint") -> NAME.safetensors,
    NAME.ckpt or a diffusers folder NAME under folder (--models-dir), searched recursively."""
    if folder is None:
        raise UsageError(f"--from-png: the image used the {what} {name!r}; give --models-dir (a folder with "
                         f"{name}.safetensors) or --{what.replace(' ', '-')} PATH")
    check_folder(folder, "--models-dir")
    for path in sorted(Path(folder).rglob("*")):
        if path.stem == name and (path.suffix.lower() in (".safetensors", ".ckpt") and path.is_file()
                                  or path.is_dir() and (path / "unet").is_dir()):
            return str(path)
    raise UsageError(f"--from-png: no {name}.safetensors, {name}.ckpt or diffusers folder {name} in --models-dir "
                     f"{folder} (the image's {what}); check the folder, or give --{what.replace(' ', '-')} PATH")


def _load_other(args, settings, key):
    """The refiner or hires checkpoint (key) of a run, loaded as --model is (its --vae too, as A1111 gives
    its chosen VAE to every model; the same embeddings folder), or None. settings[key]: a path given
    as an option, or --from-png's name, found in --models-dir."""
    import npsd
    value = settings.get(key)
    if not value or (key == "hires_checkpoint" and not settings["hires_scale"]):
        return None
    what = key.replace("_", " ")
    path = value if getattr(args, key, None) is not None else checkpoint_file(args.models_dir, value, what)
    _note(args, f"npsd: loading the {what} {path} ...")
    other = npsd.load(path, ema=not settings["no_ema"], weights_dtype=args.weights_dtype)
    if args.vae is not None:
        attach_vae(other, args.vae, args.weights_dtype)
    other.embeddings_dir = args.embeddings_dir
    return other, path


def _file_hash(pipe, path):
    """The hash of the weights file that pipe was loaded from (path), or None for a diffusers folder."""
    weights = model_file(pipe, path)
    return file_hash(weights) if weights else None


class _Generation:
    """One generation command once its settings are checked and its model loaded: the steps that will
    run, the files it writes (each listed before it appears, so that Ctrl-C can remove them all),
    the progress bar, and the --save-steps previews and filmstrip."""

    def __init__(self, args, settings, pipe, outputs, select, others):
        self.args, self.settings, self.pipe, self.outputs, self.select = args, settings, pipe, outputs, select
        self.others = others                      # the refiner and hires checkpoint: (Pipeline, path) or None
        self.mode, self.n = args.command, settings["num_images"]
        self.start, self.total = step_range(pipe, self.mode, settings)     # the callback's steps
        uses = taesd_uses(args, settings)
        if uses:                                          # --taesd's weights, checked to fit the model's latents
            from .taesd import load_taesd
            pipe.taesd = load_taesd(args.taesd)
            for use in uses:
                taesd_for(pipe, use)
        self.step_files, self.strip_file = {}, None      # --save-steps; refused before any work if they exist
        if args.save_steps is not None:
            self.step_files, self.strip_file = step_targets(args.save_steps, args.save_every, self.start,
                                                            self.total, self.n)
            if os.path.isdir(args.save_steps):
                previews = [p for paths in self.step_files.values() for p in paths]
                check_writable(previews + [self.strip_file], args.overwrite)
            check_method(pipe, args.preview, f"--preview {args.preview}")    # e.g. approx without a table
        self.frames, self.written, self.created, self.hashes = {}, [], [], {}
        self.model_path = model_file(pipe, args.model)
        self.model_name = os.path.basename(os.path.normpath(args.model or self.model_path or "built-in"))
        self.bar = None
        self.trace = None
        if args.trace is not None:
            from .trace import Trace
            self.trace = Trace()
        self.maps = None
        if args.attention_maps is not None:
            from .attention_maps import AttentionMaps
            from .prompts import prompt_syntax_used
            if settings["prompt_syntax"] == "a1111" and prompt_syntax_used(settings["prompt"], settings["steps"]):
                raise UsageError("--attention-maps needs a prompt without A1111 syntax (its words are mapped "
                                 "token by token); remove the brackets or use --prompt-syntax plain")
            check_folder(args.attention_maps, "--attention-maps")
            self.maps = AttentionMaps()

    def check_model(self, stored_model, stored_taesd=None):
        """--from-png: warn when the PNG was made with another model (by its hash) than the one loaded,
        or decoded by other TAESD weights than those of --taesd."""
        if stored_taesd and self.settings["vae_decoder"] == "taesd" and stored_taesd != self._taesd_hash():
            warnings.warn(f"--from-png: the PNG was decoded by TAESD weights with hash {stored_taesd}, not those of "
                          f"--taesd {self.args.taesd} (hash {self._taesd_hash()}); the image will differ")
        if not stored_model:
            return
        name, digest = stored_model
        self.hashes["model"] = file_hash(self.model_path) if self.model_path else None
        same_values = self.args.model is None and digest and digest.lower() in BUILTIN_SAME_VALUES
        if digest and self.hashes["model"] and digest.lower() != self.hashes["model"] and not same_values:
            warnings.warn(f"--from-png: the PNG was made with {name or 'a model'} (hash {digest}), not "
                          f"{self.model_name} (hash {self.hashes['model']}); the image will differ (give --model)")

    def run(self):
        """Generate and write the images (and the filmstrip); Ctrl-C removes every file of this run."""
        if not self.args.quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total - self.start, unit="step", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}]",
                            desc=self.mode)
        try:
            result = self._call_pipeline()
            self._close_bar()
            self._save_results(result)
        except BaseException as e:
            if self.bar is not None:                      # an error's line stands alone: the bar is cleared
                self.bar.leave = False
            if isinstance(e, KeyboardInterrupt):
                self._remove_written()
            raise
        finally:
            self._close_bar()

    def _call_pipeline(self):
        """The pipeline call of the subcommand -> float32 images [B, H, W, 3] in [0, 1]."""
        return pipeline_call(self.pipe, self.mode, self.settings, getattr(self.args, "image", None),
                             getattr(self.args, "mask", None), self.on_step, self.maps, self.trace,
                             **{key: other and other[0] for key, other in self.others.items()})

    def on_step(self, i, t, latents, x0_pred):
        """The pipeline's callback after every step: the step's previews (--save-steps), the progress bar."""
        if i in self.step_files:
            self.frames[i] = self._save_previews(i, x0_pred)
        if self.bar is not None:
            self.bar.update(1)
            if i == self.total - 1:
                self.bar.close()
                decoder = "TAESD" if self.settings["vae_decoder"] == "taesd" else "the VAE"
                _note(self.args, f"npsd: decoding the latents with {decoder} ...")

    def _taesd_hash(self):
        """The short hash (npsd.pngmeta.short_hash) of --taesd's decoder weights file."""
        if "taesd" not in self.hashes:
            from .taesd import decoder_file
            self.hashes["taesd"] = short_hash(decoder_file(self.args.taesd)) if self.args.taesd else None
        return self.hashes["taesd"]

    def _save_previews(self, i, x0_pred):
        """Draw step i's predicted x0 as --preview says (npsd.previews.preview, what the pipelines'
        preview= argument draws too) and write one preview per image -> the preview images (PIL)."""
        images = to_pil(preview(self.pipe, x0_pred, self.args.preview))
        folder = self.args.save_steps
        if not os.path.isdir(folder):
            os.makedirs(folder)
            self.created.append(folder)
        for b, (img, path) in enumerate(zip(images, self.step_files[i])):
            self.save(img, path, self.parameters(img.width, img.height, b + 1, f"Preview of step: {i + 1}"))
        return images

    def _save_results(self, result):
        """Write the images (only "Batch pos" for --from-png of one image of a batch), then the filmstrip."""
        images = to_images(result, self.settings)                             # B PIL images
        picks = [self.select - 1] if self.select else range(self.n)
        if self.select and self.select > len(images):
            raise InputError(f"--from-png: Batch pos {self.select} is larger than the batch size {self.n}")
        for path, b in zip(self.outputs, picks):
            img = images[b]
            size = png_size(self.pipe, self.mode, self.settings, getattr(self.args, "image", None), img)
            self.save(img, path, self.parameters(*size, b + 1))
        if self.frames:
            saved_steps = sorted(self.step_files)
            rows = [[self.frames[i][b] for i in saved_steps] + [images[b]] for b in range(self.n)]
            labels = [f"step {i + 1}" for i in saved_steps] + ["result"]
            strip = filmstrip(rows, labels)          # its parameters are those of the images it shows
            text = self.parameters(images[0].width, images[0].height, 1, "Filmstrip: true")
            self.save(strip, self.strip_file, text)
        if self.maps is not None:
            self._save_attention_maps(images)
        if self.trace is not None:
            path = self.args.trace
            if not os.path.exists(path):                  # listed before it appears, as save() does, for Ctrl-C
                self.written.append(path)
            self.trace.save(path, dict(self.settings, mode=self.mode, model=self.args.model or "built-in",
                                       weights_dtype=self.args.weights_dtype, vae=self.args.vae))

    def _save_attention_maps(self, images):
        """--attention-maps DIR: one overlay per word of the prompt (first image of the batch) and a grid."""
        folder = self.args.attention_maps
        if not os.path.isdir(folder):
            os.makedirs(folder)
            self.created.append(folder)
        words = self.maps.word_maps(self.pipe, self.settings["prompt"])              # {word: [B, h, w]}
        overlays = [(word, heat_overlay(images[0], m[0], word)) for word, m in words.items()]
        text = self.parameters(images[0].width, images[0].height, 1, "Attention maps: true")
        for k, (word, img) in enumerate(overlays, 1):
            safe = "".join(c if c.isalnum() else "_" for c in word)[:40] or "word"
            self.save(img, os.path.join(folder, f"{k:02d}-{safe}.png"), text)
        self.save(filmstrip([[img for _, img in overlays]], [w for w, _ in overlays]),
                  os.path.join(folder, "grid.png"), text)

    def parameters(self, width, height, pos, extra=None):
        """The "parameters" text of image `pos` (from 1) of the batch, `extra` fields appended. The
        model's and the VAE's hashes are computed once, for the first file written."""
        args = self.args
        if "vae" not in self.hashes:
            if "model" not in self.hashes:
                self.hashes["model"] = file_hash(self.model_path) if self.model_path else None
            vae_file = vae_weights_file(args.vae) if args.vae else None
            self.hashes["vae"] = file_hash(vae_file) if vae_file else None
            self.hashes["networks"] = network_hashes(self.pipe, self.settings, args)
            self.hashes["checkpoints"] = {field: checkpoint_title(self.others[key][1], _file_hash(*self.others[key]))
                                          for field, key in (("Refiner", "refiner"), ("Hires checkpoint", "hires_checkpoint"))
                                          if self.others[key] is not None}
        vae_name = os.path.basename(os.path.normpath(args.vae)) if args.vae else None
        text = parameters_text(self.settings, self.mode, self.model_name, self.hashes["model"], vae_name,
                               self.hashes["vae"], width, height, self.n, pos, self.hashes["networks"],
                               self._taesd_hash() if self.settings["vae_decoder"] == "taesd" else None,
                               self.hashes["checkpoints"])
        return text + (f", {extra}" if extra else "")

    def save(self, image, path, text):
        """Write one PNG (atomically); a new file is listed BEFORE it appears, so that Ctrl-C at any
        moment finds it."""
        new = not os.path.exists(path)
        if new:
            self.written.append(path)
        write_png_atomic(image, path, text, self.args.overwrite)
        if not new:
            self.written.append(path)

    def _remove_written(self):
        """Ctrl-C: leave no file of this run behind (nor a --save-steps folder it created)."""
        for path in self.written:
            for part in leftover_parts(path):                 # Ctrl-C in the middle of writing it
                os.unlink(part)
            if os.path.exists(path):
                os.unlink(path)
        for folder in self.created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- the entry point ----------------------------------------------------------------------------

def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"npsd: warning: {one_line(message)}", file=sys.stderr, flush=True)


def main(argv=None):
    """Run the command line; returns the exit code (the console script exits with it).
    argv: the arguments without the program name (default sys.argv[1:])."""
    restart = list(sys.argv[1:]) if argv is None else None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"npsd: error: {one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:                          # --help, --version
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        print("npsd: error: give a command: txt2img, img2img, inpaint, parity, trace, compare or serve; "
              "see `npsd --help`", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            if args.command == "parity":
                from .parity_cli import run_parity
                return run_parity(args)
            if args.command == "serve":
                from .serve.app import run_serve
                return run_serve(args)
            if args.command in ("trace", "compare"):
                from .trace_cli import run_compare, run_trace
                return run_trace(args) if args.command == "trace" else run_compare(args)
            return generate(args, restart)
        except KeyboardInterrupt:
            print("npsd: interrupted; no output written", file=sys.stderr)
            return 130
        except bdb.BdbQuit:                          # a debugger's quit (q in pdb) is the debugger's to handle
            raise
        except Exception as e:                       # noqa: BLE001 - every error becomes one line
            if debug:
                traceback.print_exc()
            if isinstance(e, (InputError, CheckpointError)):
                print(f"npsd: error: {one_line(e)}", file=sys.stderr)
                return 2
            if isinstance(e, (NpsdError, OSError)):
                print(f"npsd: error: {one_line(e)}", file=sys.stderr)
                return 1
            if isinstance(e, MemoryError):
                print(f"npsd: error: out of memory ({one_line(e) or 'MemoryError'}); {resources.ADVICE}", file=sys.stderr)
                return 1
            print(f"npsd: internal error: {type(e).__name__}: {one_line(e)}; rerun with --debug for the "
                  f"traceback and report it", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
