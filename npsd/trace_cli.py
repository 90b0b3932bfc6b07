"""`npsd trace` (record a txt2img's activations) and `npsd compare` (find the first block where two
trace files differ); the trace format is npsd/trace.py's, docs/traces.md shows both in use."""

import re
import sys

import numpy as np

from . import trace as trace_io
from .errors import InputError
from .loading import WEIGHTS_DTYPES
from .rng import RNG_KINDS
from .testing import compare


def add_parsers(sub, int_at_least, float_in, seed, samplers, weights_dtype_help, prompt_syntax_help, lora_option):
    """Add the `trace` and `compare` subcommands to the CLI's subparsers."""
    t = sub.add_parser("trace", help="run txt2img and save every block's activations (.safetensors)",
                       description="Run a txt2img with tracing: every block's input and output under "
                       "diffusers' module names, the UNet's per sampler step, saved to one .safetensors "
                       "file for `npsd compare` (docs/traces.md). To trace a run with every option of "
                       "txt2img, img2img or inpaint (--from-png included), give them --trace FILE.")
    t.add_argument("prompt", help="what the image should show")
    t.add_argument("-o", "--output", metavar="FILE", default="trace.safetensors",
                   help="the trace file to write (default trace.safetensors)")
    t.add_argument("--model", metavar="PATH", help="an SD v1.x .safetensors/.ckpt file or diffusers folder "
                                                   "(default: the built-in small model)")
    t.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32", help=weights_dtype_help)
    t.add_argument("--no-ema", action="store_true", help="the raw UNet weights of a file that also holds EMA copies")
    t.add_argument("--vae", metavar="PATH", help="a separate VAE file or diffusers vae folder (as txt2img's --vae)")
    t.add_argument("--lora", metavar="FILE[:STRENGTH]", action="append", type=lora_option, default=[],
                   help="a LoRA merged into the weights first, with a strength (default 1); repeatable")
    t.add_argument("--rng", choices=RNG_KINDS, default="numpy",
                   help="random numbers: numpy (default) or torch (the initial noise of diffusers' pipelines "
                        "from the same seed, so that a diffusers trace starts from the same latents)")
    t.add_argument("--negative-prompt", metavar="TEXT", default="", help="(default: empty)")
    t.add_argument("--prompt-syntax", choices=("a1111", "plain"), default="a1111", help=prompt_syntax_help)
    t.add_argument("--steps", metavar="N", type=int_at_least(1, "steps"), help="denoising steps (default: the model's)")
    t.add_argument("--trace-steps", metavar="I,J,...", help="the 0-based sampler steps whose UNet calls are "
                                                            "recorded (default: every step)")
    t.add_argument("--only", metavar="REGEX", help="record only the names this regular expression matches in "
                                                   "full, e.g. 'unet\\.(down|up)_blocks\\.\\d+' (default: every block)")
    t.add_argument("--guidance-scale", metavar="SCALE", type=float_in(0.0, what="guidance"),
                   help="classifier-free guidance scale (default: the model's)")
    t.add_argument("--sampler", choices=samplers, help="sampler (default: the model's)")
    t.add_argument("--seed", metavar="N", type=seed, default=0, help="random seed (default 0)")
    t.add_argument("--height", metavar="PIXELS", type=int_at_least(8, "height"), help="image height (default: the model's)")
    t.add_argument("--width", metavar="PIXELS", type=int_at_least(8, "width"), help="image width (default: the model's)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    t.add_argument("--debug", action="store_true", help="show tracebacks")

    c = sub.add_parser("compare", help="compare two trace files tensor by tensor",
                       description="Compare every tensor the two files share (max abs and relative error, "
                       "npsd.testing.compare; integer tensors must be equal) in A's execution order; the "
                       "first one over the tolerance is marked. Exit code 0: all within the tolerance; 1: some tensor exceeds it or has "
                       "another shape; 2: a file cannot be read.")
    c.add_argument("a", metavar="A.safetensors", help="the trace under test (e.g. npsd's)")
    c.add_argument("b", metavar="B.safetensors", help="the reference trace (e.g. diffusers')")
    c.add_argument("--tolerance", type=float_in(0, lo_open=True), default=1e-4,
                   help="largest accepted relative error, max|a - b| / max|b| (default 1e-4)")
    c.add_argument("--debug", action="store_true", help="show tracebacks")


def run_trace(args):
    import npsd
    from .cli import attach_vae, check_exists, check_lora_files, check_writable
    check_writable([args.output], args.overwrite, suffix=".safetensors")
    steps = None
    if args.trace_steps:
        try:
            steps = [int(s) for s in args.trace_steps.split(",")]
        except ValueError:
            raise InputError(f"--trace-steps takes 0-based step numbers separated by commas, got {args.trace_steps!r}") from None
    try:
        trace = trace_io.Trace(steps=steps, only=args.only)
    except re.error as e:
        raise InputError(f"--only is not a valid regular expression: {e}") from None
    for path, what in [(args.model, "--model"), (args.vae, "--vae")]:
        check_exists(path, what)
    check_lora_files(args.lora)
    pipe = npsd.load(args.model, ema=not args.no_ema, weights_dtype=args.weights_dtype)
    if args.vae is not None:
        attach_vae(pipe, args.vae, args.weights_dtype)
    for path, strength in args.lora:
        pipe.load_lora(path, strength, keep_base=False)
    settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
                "guidance_scale": args.guidance_scale, "sampler": args.sampler, "seed": args.seed,
                "height": args.height, "width": args.width, "model": args.model or "built-in",
                "weights_dtype": args.weights_dtype, "no_ema": args.no_ema, "vae": args.vae,
                "lora": [[path, strength] for path, strength in args.lora], "rng": args.rng,
                "trace_steps": steps, "only": args.only, "prompt_syntax": args.prompt_syntax}
    pipe.txt2img(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=args.seed,
                 sampler=args.sampler, rng=args.rng, output_type="np", trace=trace, prompt_syntax=args.prompt_syntax)
    trace.save(args.output, settings)
    print(f"{args.output}: {len(trace)} tensors")
    return 0


def _read(path):
    try:
        return trace_io.load(path)[0]
    except Exception as e:                       # noqa: BLE001 - one line per unreadable file
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def compare_traces(a, b, tolerance):
    """{name: array} x2 (a in execution order) -> (rows, missing from a, extra in a, first bad name or None).
    rows: (name, Comparison or None, problem or None) for every name in both, in a's order. Integer
    tensors (token ids) must be equal; two all-zero tensors of one shape agree."""
    rows, first = [], None
    for name, x in a.items():
        if name not in b:
            continue
        y = b[name]
        if x.shape != y.shape:
            rows.append((name, None, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"))
        elif not np.abs(x).max(initial=0) and not np.abs(y).max(initial=0):
            rows.append((name, None, None))      # equal, though compare refuses an all-zero reference
        else:
            exact = np.issubdtype(x.dtype, np.integer) or np.issubdtype(y.dtype, np.integer)
            try:
                c = compare(x, y, name)
            except AssertionError as e:          # non-finite values or an all-zero reference
                rows.append((name, None, str(e).split(": ", 1)[-1]))
            else:
                bad = not c.max_rel <= (0 if exact else tolerance)
                rows.append((name, c, ("differs (integers must be equal)" if exact else "exceeds the tolerance")
                             if bad else None))
        if first is None and rows[-1][2] is not None:
            first = name
    missing = [n for n in b if n not in a]
    extra = [n for n in a if n not in b]
    return rows, missing, extra, first


LISTED = 20          # names listed of those found in one file only (a checkpoint against a trace: 530)


def report(a, b, tolerance, labels=("A", "B"), out=None):
    """Print compare_traces(a, b, tolerance) as a table, the first difference marked >>, the others
    over the tolerance !!, then the names found in one side only (labels name the sides).
    -> (exit code: 0 all within the tolerance, 1 otherwise or nothing in common; the rows)."""
    def say(line):
        print(line, file=out or sys.stdout, flush=True)

    rows, missing, extra, first = compare_traces(a, b, tolerance)
    shapes = {name: "x".join(map(str, a[name].shape)) or "scalar" for name, _, _ in rows}
    width, sw = max([len(n) for n, _, _ in rows] + [4]), max([len(s) for s in shapes.values()] + [5])
    say(f"{'name':<{width}}  {'shape':<{sw}}  {'max abs':>9}  {'max rel':>9}")
    failed = 0
    for name, c, problem in rows:
        mark = ">>" if name == first else "!!"
        failed += problem is not None
        numbers = f"{c.max_abs:9.3g}  {c.max_rel:9.3g}" if c is not None else f"{'-':>9}  {'-':>9}"
        say(f"{name:<{width}}  {shapes[name]:<{sw}}  {numbers}" + (f"  {mark} {problem}" if problem else ""))
    say(f"{len(rows)} tensors compared, {failed} over the tolerance {tolerance:g} or mismatched")
    if first is not None:
        c = next(c for n, c, _ in rows if n == first)
        say(f"first difference: {first}" + (f" ({c.first})" if c is not None else ""))
    for names, label in ((missing, labels[1]), (extra, labels[0])):
        if names:                                                          # in each file's order; the first 20
            say(f"only in {label} ({len(names)}): {', '.join(names[:LISTED])}" + (", ..." if len(names) > LISTED else ""))
    if not rows:
        say("no tensor names in common: nothing compared")
    return (1 if failed or not rows else 0), rows


def run_compare(args):
    return report(_read(args.a), _read(args.b), args.tolerance, labels=(args.a, args.b))[0]
