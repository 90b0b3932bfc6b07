"""npsd against PyTorch on the same inputs, in the same run.

    python -m benchmarks.bench            # full mode: SD v1.5 shapes (about 20 minutes on 2 cores)
    python -m benchmarks.bench --quick    # small shapes, seconds (tests/test_benchmarks.py runs it)
    python -m benchmarks.bench --only unet --repeat 5 --markdown table.md

Needs the test extra (torch, diffusers, transformers). The weights are random, at the real shapes;
torch and npsd share them (npsd's arrays are views of torch's tensors), so one copy is in memory.

For every case the two implementations run alternately (npsd, torch, npsd, torch, ...) after one
warm-up call each (the whole txt2img, minutes long, is timed once, on that first call), and the
table gives:
- the median time of each and the ratio npsd / torch (below 1: npsd is faster);
- the peak working memory of each call: the largest resident set size sampled every millisecond
  during the call, minus the size just before it (inputs and weights already exist then);
- npsd's fraction of the FLOP bound: (FLOPs of the direct computation / this machine's sgemm rate)
  / npsd's time. FLOPs are counted from the shapes that reach nn.conv2d, nn.linear and nn.attention
  (2 per multiply-add, as a direct convolution computes them); the sgemm rate is the best of numpy's
  and torch's 4096x4096 float32 matrix product, measured at the start of the run. A fraction above 1
  is possible only with fewer multiplications (Winograd convolution);
- the relative difference of the two outputs (max |npsd - torch| / max |torch|): a benchmark of two
  different computations would mean nothing, so a case whose outputs disagree beyond its tolerance
  is reported as a failure (exit status 1).

Timings on a shared machine are meaningless: run it on a quiet one, and compare ratios, not times.
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import npsd  # noqa: E402
from npsd import clip, nn, settings, unet as unet_model, vae  # noqa: E402
from npsd.config import sd15_config  # noqa: E402
from npsd.params import unflatten  # noqa: E402
from npsd.testing import compare  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample the resident set size every millisecond while the block runs; .peak is the largest
    increase over the size at entry (bytes). Numpy and torch release the GIL in their kernels, so
    the sampling thread runs during them."""

    def __enter__(self):
        self.base = self.peak_abs = rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.001):
            self.peak_abs = max(self.peak_abs, rss_bytes())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_abs = max(self.peak_abs, rss_bytes())
        self.peak = self.peak_abs - self.base


class FlopCounter:
    """Count the multiply-adds of nn.conv2d, nn.linear and nn.attention (x2 = FLOPs) while active,
    by wrapping those three functions (every layer of npsd's models goes through them)."""

    def __enter__(self):
        self.flops, self.saved = 0, {name: getattr(nn, name) for name in ("conv2d", "linear", "attention")}
        conv2d, linear, attention = self.saved["conv2d"], self.saved["linear"], self.saved["attention"]

        def counted_conv2d(x, weight, bias=None, stride=1, padding=0):
            y = conv2d(x, weight, bias, stride, padding)
            o, c, kh, kw = weight.shape
            self.flops += 2 * y.size * c * kh * kw
            return y

        def counted_linear(x, weight, bias=None):
            y = linear(x, weight, bias)
            self.flops += 2 * y.size * weight.shape[1]
            return y

        def counted_attention(q, k, v, num_heads, causal=False):
            y = attention(q, k, v, num_heads, causal)
            self.flops += 2 * 2 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]   # Q K^T and P V
            return y

        nn.conv2d, nn.linear, nn.attention = counted_conv2d, counted_linear, counted_attention
        return self

    def __exit__(self, *exc):
        for name, f in self.saved.items():
            setattr(nn, name, f)


def sgemm_rate(torch):
    """The best float32 GEMM rate here (FLOP/s): numpy's and torch's 4096^3 product, best of 3."""
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    ta = torch.from_numpy(a)
    best = {}
    for name, f in (("numpy", lambda: a @ a), ("torch", lambda: torch.mm(ta, ta))):
        f()
        best[name] = min(_timed(f)[0] for _ in range(3))
    return {name: 2 * 4096 ** 3 / t for name, t in best.items()}


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    npsd: object            # () -> numpy array
    torch: object           # () -> numpy array
    tolerance: float        # relative difference of the outputs allowed (the parity tests' figure)
    repeat: int = 0         # 0: the run's --repeat
    note: str = ""


@dataclass
class Result:
    case: Case
    npsd_times: list = field(default_factory=list)
    torch_times: list = field(default_factory=list)
    npsd_mem: int = 0
    torch_mem: int = 0
    flops: int = 0
    rel_err: float = float("nan")

    @property
    def ratio(self):
        return statistics.median(self.npsd_times) / statistics.median(self.torch_times)


def _t(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x))


def _n(x):
    return x.detach().float().numpy()


def primitive_cases(torch, quick):
    F = torch.nn.functional
    rng = np.random.default_rng(0)

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    cases = []
    convs = [(2, 32, 16), (2, 64, 8)] if quick else [(2, 320, 64), (2, 640, 32), (2, 1280, 16)]
    for b, c, s in convs:
        x, w, bias = randn(b, c, s, s), randn(c, c, 3, 3, scale=(9 * c) ** -0.5), randn(c, scale=0.1)
        tx, tw, tb = _t(x), _t(w), _t(bias)
        cases.append(Case(f"conv2d 3x3, {b}x{c}x{s}x{s}",
                          lambda x=x, w=w, bias=bias: nn.conv2d(x, w, bias, padding=1),
                          lambda tx=tx, tw=tw, tb=tb: _n(F.conv2d(tx, tw, tb, padding=1)), 1e-5))
    attns = [(2, 256, 64, 8), (2, 64, 128, 8)] if quick else [(2, 4096, 320, 8), (2, 1024, 640, 8)]
    for b, n, c, heads in attns:
        q, k, v = randn(b, n, c), randn(b, n, c), randn(b, n, c)

        def ref(q=_t(q), k=_t(k), v=_t(v), b=b, n=n, c=c, heads=heads):
            split = [t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
            return _n(F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c))
        cases.append(Case(f"self-attention, {b}x{n} tokens x {c}, {heads} heads",
                          lambda q=q, k=k, v=v, heads=heads: nn.attention(q, k, v, heads), ref, 1e-5))
    b, c, s = (2, 64, 16) if quick else (2, 320, 64)
    x, gw, gb = randn(b, c, s, s), 1 + randn(c, scale=0.1), randn(c, scale=0.1)
    cases.append(Case(f"group_norm, {b}x{c}x{s}x{s}, 32 groups",
                      lambda: nn.group_norm(x, 32, gw, gb, 1e-5),
                      lambda tx=_t(x), tw=_t(gw), tb=_t(gb): _n(F.group_norm(tx, 32, tw, tb, 1e-5)), 1e-5))
    shape = (2, 8, 64, 256) if quick else (2, 8, 1024, 4096)
    s = randn(*shape, scale=3.0)
    cases.append(Case(f"softmax, {'x'.join(map(str, shape))}", lambda: nn.softmax(s),
                      lambda ts=_t(s): _n(torch.softmax(ts, dim=-1)), 1e-5,
                      note="one attention score block of 4096 tokens (npsd's default chunk)" if not quick else ""))
    return cases


UNET_QUICK = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8)
UNET_FULL = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
                 norm_num_groups=32)
VAE_QUICK = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
VAE_FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
CLIP_QUICK = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
CLIP_FULL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def shared_params(model, prefix=""):
    """npsd params that are views of the torch model's tensors (no copy)."""
    return unflatten({k[len(prefix):]: v.detach().numpy() for k, v in model.state_dict().items()
                      if k.startswith(prefix) and "position_ids" not in k})


def build_models(torch, quick):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    u = UNET_QUICK if quick else UNET_FULL
    v = VAE_QUICK if quick else VAE_FULL
    c = CLIP_QUICK if quick else CLIP_FULL
    models = {
        "unet": UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **u).eval(),
        "vae": AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                             down_block_types=("DownEncoderBlock2D",) * len(v["block_out_channels"]),
                             up_block_types=("UpDecoderBlock2D",) * len(v["block_out_channels"]), **v).eval(),
        "text": CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                             **c)).eval(),
    }
    for m in models.values():
        m.requires_grad_(False)
    config = sd15_config()
    config["unet"].update(num_heads=u["attention_head_dim"], norm_groups=u["norm_num_groups"])
    config["vae"].update(norm_groups=v["norm_num_groups"])
    config["text_encoder"].update(num_heads=c["num_attention_heads"])
    sd = models["text"].state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    params = {"unet": shared_params(models["unet"]), "vae": shared_params(models["vae"]),
              "text_encoder": shared_params(models["text"], prefix)}
    return models, params, config


def model_cases(torch, quick, models, params, config):
    rng = np.random.default_rng(1)
    cases = []
    tokens, width = 77, (CLIP_QUICK if quick else CLIP_FULL)["hidden_size"]
    for s in ((16, 8) if quick else (64, 32)):
        x, ctx = rng.standard_normal((2, 4, s, s), dtype=np.float32), rng.standard_normal((2, tokens, width), dtype=np.float32)
        t = np.array([801, 801])
        cases.append(Case(f"UNet step, batch 2, {s}x{s} latents",
                          lambda x=x, ctx=ctx, t=t: unet_model.unet(params["unet"], x, t, ctx, config["unet"]),
                          lambda x=_t(x), ctx=_t(ctx), t=torch.from_numpy(t): _n(models["unet"](x, t, ctx).sample),
                          2e-5))
    side = 32 if quick else 64                                      # latent side
    z = rng.standard_normal((1, 4, side, side), dtype=np.float32)
    out_side = z.shape[-1] * 2 ** (len(params["vae"]["encoder"]["down_blocks"]) - 1)
    cases.append(Case(f"VAE decode, {z.shape[-1]}x{z.shape[-1]} -> {out_side}x{out_side}",
                      lambda: vae.decode(params["vae"], z, config["vae"]),
                      lambda tz=_t(z): _n(models["vae"].decode(tz).sample), 2e-5))
    img = rng.uniform(-1, 1, (1, 3, out_side, out_side)).astype(np.float32)
    cases.append(Case(f"VAE encode, {out_side}x{out_side} (mean)",
                      lambda: vae.encode(params["vae"], img, config["vae"])[0],
                      lambda ti=_t(img): _n(models["vae"].encode(ti).latent_dist.mean), 2e-5))
    ids = np.array(npsd.Pipeline(params, config).tokenize(["a photograph of an astronaut riding a horse", ""]))
    cases.append(Case("CLIP text encoder, 2x77 tokens",
                      lambda: clip.encode_text(params["text_encoder"], ids, config["text_encoder"]),
                      lambda ti=torch.from_numpy(ids): _n(models["text"](ti).last_hidden_state), 1e-5))
    return cases


def txt2img_case(torch, quick, models, params, config):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    from npsd.weights import path as weights_path
    size, steps = (64, 4) if quick else (512, 20)
    tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    ref = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text"], tokenizer=tok, unet=models["unet"],
                                  scheduler=sched, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = npsd.Pipeline(params, config)
    factor = 2 ** (len(params["vae"]["encoder"]["down_blocks"]) - 1)
    latents = np.random.default_rng(2).standard_normal((1, 4, size // factor, size // factor), dtype=np.float32)
    prompt = "a photograph of an astronaut riding a horse"
    kw = dict(negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)
    return Case(f"txt2img {size}x{size}, {steps} DDIM steps, CFG 7.5",
                lambda: pipe.txt2img(prompt, sampler="ddim", latents=latents, output_type="np", **kw),
                lambda tl=_t(latents): ref(prompt, latents=tl, output_type="np", **kw).images,
                1e-3, repeat=1,
                note="vs diffusers' StableDiffusionPipeline on the same weights; images in [0, 1], so the "
                     "difference is absolute")


# ---------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------

def _measured(f):
    """(seconds, peak working memory in bytes, result) of one call f()."""
    gc.collect()
    with PeakRSS() as m:
        dt, out = _timed(f)
    return dt, m.peak, out


def run_case(case, repeat):
    """Warm-up calls (npsd's with the FLOP count), the output check, then `repeat` alternating timed
    calls of each. A case run once (repeat 1: the whole txt2img) is timed on those first calls."""
    res, n = Result(case), case.repeat or repeat
    with FlopCounter() as fc:
        first = {"npsd": _measured(case.npsd)}
    res.flops = fc.flops
    first["torch"] = _measured(case.torch)
    c = compare(np.asarray(first["npsd"][2]), np.asarray(first["torch"][2]))
    res.rel_err = c.max_abs if "txt2img" in case.name else c.max_rel
    runs = [{side: r[:2] for side, r in first.items()}] if n == 1 else []
    del first, c
    for _ in range(n if n > 1 else 0):
        runs.append({side: _measured(getattr(case, side))[:2] for side in ("npsd", "torch")})
    res.npsd_times, res.torch_times = [r["npsd"][0] for r in runs], [r["torch"][0] for r in runs]
    res.npsd_mem, res.torch_mem = max(r["npsd"][1] for r in runs), max(r["torch"][1] for r in runs)
    return res


def fmt_time(t):
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def table(results, rate):
    lines = ["| case | npsd | torch | npsd / torch | npsd peak | torch peak | FLOP-bound fraction | output diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        tn, tt = statistics.median(r.npsd_times), statistics.median(r.torch_times)
        frac = f"{r.flops / rate / tn:.2f} ({r.flops / 1e9:.1f} GFLOP)" if r.flops else "-"
        mark = "" if r.rel_err <= r.case.tolerance else " FAIL"
        lines.append(f"| {r.case.name} | {fmt_time(tn)} | {fmt_time(tt)} | **{r.ratio:.2f}** | "
                     f"{r.npsd_mem / 2**20:.0f} MiB | {r.torch_mem / 2**20:.0f} MiB | {frac} | {r.rel_err:.1e}{mark} |")
    return "\n".join(lines)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def libraries(torch):
    """What each side computes with: numpy's BLAS (and OpenBLAS's kernel for this CPU), torch's BLAS
    and the CPU features its kernels use (AVX2, AVX512)."""
    import re
    from npsd import blas
    info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    numpy_blas = f"{info.get('name')} {info.get('version')}, kernel {blas.kernel() or 'unknown'}"
    config = torch.__config__.show()
    torch_blas = ", ".join(re.findall(r"BLAS_INFO=(\w+)", config)) or "unknown"
    onednn = " + oneDNN" if "mkldnn" in config.lower() or "onednn" in config.lower() else ""
    return (f"numpy BLAS: {numpy_blas}; torch BLAS: {torch_blas}{onednn}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def set_threads(torch, n):
    """n threads on both sides: npsd's own pool and BLAS, torch's intra-op pool."""
    from npsd import blas
    settings.set_threads(n)
    blas.set_threads(n)
    torch.set_num_threads(n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: seconds, for CI")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls of each implementation per case")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only cases whose name contains one of these words (case-insensitive)")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--plain", action="store_true", help="npsd's plain reference kernels (nn.set_fast(False))")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for npsd (its pool and BLAS) and torch alike (default: the machine's cores)")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("benchmarks need torch, diffusers and transformers: pip install -e '.[test]'", file=sys.stderr)
        return 2
    if args.plain:
        nn.set_fast(False)
    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        set_threads(torch, args.threads)
    header = (f"{time.strftime('%Y-%m-%d')}, {machine()}, numpy {np.__version__}, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), npsd kernels: {'fast' if settings.FAST else 'plain'} "
              f"({settings.THREADS} threads), {'quick' if args.quick else 'full'} mode\n{libraries(torch)}")
    print(header, flush=True)
    rates = sgemm_rate(torch)
    rate = max(rates.values())
    print(f"sgemm 4096^3: numpy {rates['numpy'] / 1e9:.0f} GFLOP/s, torch {rates['torch'] / 1e9:.0f} GFLOP/s", flush=True)

    def wanted(case):
        return args.only is None or any(w.lower() in case.name.lower() for w in args.only)

    results = []
    with torch.no_grad():
        cases = [c for c in primitive_cases(torch, args.quick) if wanted(c)]
        model_words = ("unet", "vae", "clip", "txt2img", "encode", "decode", "text")
        if args.only is None or any(w.lower() in model_words for w in args.only):
            models, params, config = build_models(torch, args.quick)
            cases += [c for c in model_cases(torch, args.quick, models, params, config) if wanted(c)]
            tc = txt2img_case(torch, args.quick, models, params, config)
            if wanted(tc):
                cases.append(tc)
        for case in cases:
            r = run_case(case, args.repeat)
            results.append(r)
            print(f"{case.name}: npsd {fmt_time(statistics.median(r.npsd_times))}, torch "
                  f"{fmt_time(statistics.median(r.torch_times))}, ratio {r.ratio:.2f}, diff {r.rel_err:.1e}",
                  flush=True)
    out = table(results, rate)
    notes = [f"- {r.case.name}: {r.case.note}" for r in results if r.case.note]
    text = "\n".join([header, f"sgemm rate used for the FLOP bound: {rate / 1e9:.0f} GFLOP/s", "", out, ""] + notes)
    print()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    failed = [r.case.name for r in results if not r.rel_err <= r.case.tolerance]
    if failed:
        print(f"outputs disagree beyond tolerance: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
