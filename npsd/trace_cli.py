"""`npsd trace` (record a txt2img's activations) and `npsd compare` (find the first block where two
trace files differ); the trace format is npsd/trace.py's, docs/traces.md shows both in use."""

import os
import re

import numpy as np

from . import trace as trace_io
from .errors import InputError
from .testing import compare


def add_parsers(sub, int_at_least, float_in, seed, samplers):
    """Add the `trace` and `compare` subcommands to the CLI's subparsers."""
    t = sub.add_parser("trace", help="run txt2img and save every block's activations (.safetensors)",
                       description="Run a txt2img with tracing: every block's input and output under "
                       "diffusers' module names, the UNet's per sampler step, saved to one .safetensors "
                       "file for `npsd compare` (docs/traces.md).")
    t.add_argument("prompt", help="what the image should show")
    t.add_argument("-o", "--output", metavar="FILE", default="trace.safetensors",
                   help="the trace file to write (default trace.safetensors)")
    t.add_argument("--model", metavar="PATH", help="an SD v1.x .safetensors/.ckpt file or diffusers folder "
                                                   "(default: the built-in small model)")
    t.add_argument("--negative-prompt", metavar="TEXT", default="", help="(default: empty)")
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
                       "npsd.testing.compare) in A's execution order; the first one over the tolerance is "
                       "marked. Exit code 0: all within the tolerance; 1: some tensor exceeds it or has "
                       "another shape; 2: a file cannot be read.")
    c.add_argument("a", metavar="A.safetensors", help="the trace under test (e.g. npsd's)")
    c.add_argument("b", metavar="B.safetensors", help="the reference trace (e.g. diffusers')")
    c.add_argument("--tolerance", type=float_in(0, lo_open=True), default=1e-4,
                   help="largest accepted relative error, max|a - b| / max|b| (default 1e-4)")
    c.add_argument("--debug", action="store_true", help="show tracebacks")


def run_trace(args):
    import npsd
    if os.path.exists(args.output) and not args.overwrite:
        raise InputError(f"{args.output} exists; give another -o or --overwrite")
    steps = None
    if args.trace_steps:
        try:
            steps = [int(s) for s in args.trace_steps.split(",")]
        except ValueError:
            raise InputError(f"--trace-steps takes 0-based step numbers separated by commas, got {args.trace_steps!r}") from None
    pipe = npsd.load(args.model) if args.model is not None else npsd.load()
    try:
        trace = trace_io.Trace(steps=steps, only=args.only)
    except re.error as e:
        raise InputError(f"--only is not a valid regular expression: {e}") from None
    settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
                "guidance_scale": args.guidance_scale, "sampler": args.sampler, "seed": args.seed,
                "height": args.height, "width": args.width, "model": args.model or "built-in",
                "trace_steps": steps, "only": args.only}
    pipe.txt2img(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=args.seed,
                 sampler=args.sampler, output_type="np", trace=trace)
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
    rows: (name, Comparison or None, problem or None) for every name in both, in a's order."""
    rows, first = [], None
    for name, x in a.items():
        if name not in b:
            continue
        y = b[name]
        if x.shape != y.shape:
            rows.append((name, None, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"))
        else:
            try:
                c = compare(x, y, name)
            except AssertionError as e:          # non-finite values or an all-zero reference
                rows.append((name, None, str(e).split(": ", 1)[-1]))
            else:
                bad = not c.max_rel <= tolerance
                rows.append((name, c, "exceeds the tolerance" if bad else None))
        if first is None and rows[-1][2] is not None and not _zero_pair(x, y):
            first = name
    missing = [n for n in b if n not in a]
    extra = [n for n in a if n not in b]
    return rows, missing, extra, first


def _zero_pair(x, y):
    """Both all zeros of the same shape: equal, though compare refuses an all-zero reference."""
    return x.shape == y.shape and not np.abs(x).max(initial=0) and not np.abs(y).max(initial=0)


def run_compare(args):
    a, b = _read(args.a), _read(args.b)
    rows, missing, extra, first = compare_traces(a, b, args.tolerance)
    width = max([len(n) for n, _, _ in rows] + [4])
    print(f"{'name':<{width}}  {'max abs':>9}  {'max rel':>9}")
    failed = 0
    for name, c, problem in rows:
        if problem is not None and _zero_pair(a[name], b[name]):
            problem = None
        mark = ">>" if name == first else ("!!" if problem else "  ")
        failed += problem is not None
        if c is not None:
            line = f"{name:<{width}}  {c.max_abs:9.3g}  {c.max_rel:9.3g}"
        else:
            line = f"{name:<{width}}  {'-':>9}  {'-':>9}"
        print(f"{line}  {mark} {problem}" if problem else line)
    print(f"{len(rows)} tensors compared, {failed} over the tolerance {args.tolerance:g} or mismatched")
    if first is not None:
        c = next(c for n, c, _ in rows if n == first)
        print(f"first difference: {first}" + (f" ({c.first})" if c is not None else ""))
    if missing:
        print(f"only in {args.b} ({len(missing)}): {', '.join(missing)}")
    if extra:
        print(f"only in {args.a} ({len(extra)}): {', '.join(extra)}")
    if not rows:
        print("no tensor names in common: nothing compared")
        return 1
    return 1 if failed else 0
