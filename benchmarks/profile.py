"""Where the time of one model call goes: npsd's time by layer function beside PyTorch's self CPU
time by operator (torch.profiler), on the models, inputs and threads of benchmarks/bench.py.

    python -m benchmarks.profile                          # UNet step, batch 2, 64x64 latents
    python -m benchmarks.profile --only clip "VAE decode" --repeat 3
    python -m benchmarks.profile --quick --threads 1      # small shapes, seconds

npsd's side wraps the functions of npsd/nn.py that the models call, and the fast path's functions
that the VAE's fast blocks call directly (npsd/fast.py), and charges each call's wall time to the
outermost of them: GEGLU's projection is in geglu's row, not in linear's; a VAE resnet block's
GroupNorm, SiLU and convolutions are in vae_resnet_block's. Convolutions have a row per kernel
size, stride and input size, attention a row per shape (queries x keys). The last row is the time
outside all of them: additions, reshapes, the model code itself. PyTorch's side is torch.profiler's
self CPU time per operator, and the time outside its operators (Python, the modules' calls); the
profiler's own cost makes its total larger than the call's time without it, which is given too.
Run it on a quiet machine, like the benchmark.
"""

import argparse
import statistics
import sys
import time
from collections import Counter

from benchmarks import bench
from npsd import clip, fast, nn, settings

WRAPPED = ([(nn, name) for name in ("conv2d", "conv1x1", "linear", "linears", "linear_or_conv1x1", "geglu",
                                    "attention", "group_norm", "layer_norm", "silu", "gelu", "quick_gelu", "softmax",
                                    "upsample_nearest", "timestep_embedding")]
           + [(fast, name) for name in ("conv2d", "conv3x3_rows", "conv1x1_over_input", "vae_resnet_block",
                                        "vae_upsample", "vae_norm_silu_conv")])


def label(name, a):
    """The row a call is charged to; a: its arguments by parameter name."""
    if name == "conv3x3_rows":
        return f"conv2d 3x3, {a['shape'][2]}x{a['shape'][3]} input"
    if name in ("conv1x1", "conv1x1_over_input"):
        return f"conv2d 1x1, {a['x'].shape[2]}x{a['x'].shape[3]} input"
    if name == "conv2d":
        kh, kw = a["weight"].shape[2:]
        stride = a.get("stride", 1)
        strided = f", stride {stride}" if stride not in (1, (1, 1)) else ""
        return f"conv2d {kh}x{kw}{strided}, {a['x'].shape[2]}x{a['x'].shape[3]} input"
    if name == "attention":
        return f"attention, {a['q'].shape[1]} queries x {a['k'].shape[1]} keys"
    if name == "linears":
        return "linears (attention's q, k, v)"
    return name


class LayerTimes(bench.OutermostCalls):
    """While active: seconds[row] and calls[row] of the wrapped functions, each call charged to the
    outermost wrapped call it is part of (a call inside another is not timed again)."""

    WRAPPED = WRAPPED

    def __enter__(self):
        self.seconds, self.calls = Counter(), Counter()
        super().__enter__()
        # clip.ACTIVATIONS holds nn.quick_gelu and nn.gelu themselves, taken at import
        wrapper = {f: getattr(module, name) for module, name, f in self.saved}
        self.tables = [(clip.ACTIVATIONS, k, f) for k, f in clip.ACTIVATIONS.items() if f in wrapper]
        for table, k, f in self.tables:
            table[k] = wrapper[f]
        return self

    def called(self, name, arguments, result, seconds):
        row = label(name, arguments)
        self.seconds[row] += seconds
        self.calls[row] += 1

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for table, k, f in self.tables:
            table[k] = f


def npsd_profile(case, repeat):
    """(seconds a call, [(row, seconds a call, calls a call)] largest first, outside time last)."""
    case.npsd()                                                  # warm-up
    with LayerTimes() as lt:
        t0 = time.perf_counter()
        for _ in range(repeat):
            case.npsd()
        total = (time.perf_counter() - t0) / repeat
    rows = sorted(((row, s / repeat, lt.calls[row] / repeat) for row, s in lt.seconds.items()), key=lambda r: -r[1])
    return total, rows + [("outside these functions", total - sum(r[1] for r in rows), None)]


def torch_profile(torch, case, repeat, top):
    """(seconds a call without the profiler, under it, [(operator, self seconds a call, calls a call)]
    for the `top` largest, then the rest together, then the time outside every operator)."""
    case.torch()                                                 # warm-up
    plain = statistics.median(bench._timed(case.torch)[0] for _ in range(repeat))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeat):
            case.torch()
        profiled = (time.perf_counter() - t0) / repeat
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6 / repeat, e.count / repeat) for e in prof.key_averages()),
                 key=lambda r: -r[1])
    rows = ops[:top]
    if ops[top:]:
        rows.append((f"{len(ops) - top} other operators", sum(r[1] for r in ops[top:]), None))
    return plain, profiled, rows + [("outside the operators", profiled - sum(r[1] for r in ops), None)]


def table(title, rows, total):
    lines = [f"| {title} | calls | time | share |", "|---|---|---|---|"]
    for name, seconds, calls in rows:
        count = "" if calls is None else f"{calls:g}"
        lines.append(f"| {name} | {count} | {bench.fmt_time(seconds)} | {seconds / total:.1%} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: seconds")
    ap.add_argument("--only", nargs="*", default=None,
                    help="the model cases whose name contains one of these words (case-insensitive); "
                         "default: the first UNet step")
    ap.add_argument("--repeat", type=int, default=1, help="profiled calls of each side per case (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="threads on both sides (default: the machine's)")
    ap.add_argument("--top", type=int, default=15, help="PyTorch operators listed before the rest (default 15)")
    ap.add_argument("--markdown", help="also write the tables to this file")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("benchmarks need torch, diffusers and transformers: pip install -e '.[test]'", file=sys.stderr)
        return 2
    if args.repeat < 1 or args.top < 1 or (args.threads is not None and args.threads < 1):
        print("--repeat, --top and --threads must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        bench.set_threads(torch, args.threads)
    header = (f"{time.strftime('%Y-%m-%d')}, {bench.machine()}, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), npsd kernels: {'fast' if settings.FAST else 'plain'} "
              f"({settings.THREADS} threads)\n{bench.libraries(torch)}")
    print(header, flush=True)
    out = [header]
    with torch.no_grad():
        models, params, config = bench.build_models(torch, args.quick)
        every = bench.model_cases(torch, args.quick, models, params, config)
        every.append(bench.txt2img_case(torch, args.quick, models, params, config))
        words = args.only or [every[0].name]
        cases = [c for c in every if any(bench.named(w, [c]) for w in words)]
        unmatched = [w for w in words if not bench.named(w, cases)]
        if unmatched:
            print(f"--only: no case's name contains {', '.join(map(repr, unmatched))}; the cases are: "
                  f"{'; '.join(c.name for c in every)}", file=sys.stderr)
            return 2
        for case in cases:
            total, rows = npsd_profile(case, args.repeat)
            plain, profiled, ops = torch_profile(torch, case, args.repeat, args.top)
            text = "\n".join([
                f"\n### {case.name}\n",
                f"npsd {bench.fmt_time(total)} a call, its layer functions timed; torch {bench.fmt_time(plain)} "
                f"without the profiler, {bench.fmt_time(profiled)} under it (times per call, over {args.repeat}).\n",
                table("npsd: layer function", rows, total), "",
                table("torch: operator, self CPU time", ops, profiled)])
            print(text, flush=True)
            out.append(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
