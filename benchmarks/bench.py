"""npsd against PyTorch on the same inputs, in the same run.

    python -m benchmarks.bench            # full mode: SD v1.5 and 2.1 shapes (about 25 minutes on 2 cores with --repeat 3)
    python -m benchmarks.bench --quick    # small shapes, seconds (tests/test_benchmarks.py runs it)
    python -m benchmarks.bench --only unet --repeat 5 --markdown table.md
    python -m benchmarks.bench --only image   # the time-to-image rows alone (about 7 minutes)
    python -m benchmarks.bench --threads 1 2 4 8 16 --only unet   # each case at each thread count, with speed-ups

Needs the test extra (torch, diffusers, transformers). The weights are random, at the real shapes;
torch and npsd share them (npsd's arrays are views of torch's tensors), so one copy is in memory.

For every case the two implementations run alternately (npsd, torch, npsd, torch, ...) after one
warm-up call each (the whole generations, minutes long, are timed once, on that first call): `--repeat`
calls each, or as many as make MIN_SECONDS (3 s) per side for a short case, at most 50. The
table gives:
- the median time of each and the ratio npsd / torch (below 1: npsd is faster);
- the peak working memory of each call: the largest resident set size sampled every millisecond
  during the call, minus the size just before it (inputs and weights already exist then);
- npsd's fraction of the FLOP bound: (FLOPs of the direct computation / this machine's sgemm rate)
  / npsd's time. FLOPs are counted from the shapes that reach nn.conv2d, nn.linear(s) and nn.attention
  (2 per multiply-add, as a direct convolution computes them); the sgemm rate is the best of numpy's
  and torch's 4096x4096 float32 matrix product, measured at the start of the run. A fraction above 1
  is possible only with fewer multiplications (Winograd convolution);
- the relative difference of the two outputs (max |npsd - torch| / max |torch|): a benchmark of two
  different computations would mean nothing, so a case whose outputs disagree beyond its tolerance
  is reported as a failure (exit status 1).

Besides the layers, models and the txt2img of the course's recipe (DDIM), the rows named "image: ..."
time whole 512x512 generations as CPU users run them, each against diffusers doing the same, once:
- DPM++ 2M Karras, 15 steps, CFG 7.5 (sampler="dpmpp_2m", use_karras_sigmas=True; diffusers'
  DPMSolverMultistepScheduler(use_karras_sigmas=True)) on the SD v1.5 models;
- LCM-LoRA, 4 steps, guidance 1: a random LoRA with the layers and rank of the LCM-LoRA for SD v1.5,
  merged by npsd's load_lora and by diffusers' load_lora_weights + fuse_lora (before the timed call),
  then the lcm sampler / LCMScheduler;
- SD-Turbo, 1 step, no guidance: SD 2.1-shaped models (built for these rows only, freed after),
  euler_a with trailing spacing / EulerAncestralDiscreteScheduler(timestep_spacing="trailing");
- the LCM-LoRA and SD-Turbo rows again with a random TAESD decoding the latents (decoder="taesd";
  diffusers' pipeline with AutoencoderTiny as its vae).
Their output difference is absolute (images in [0, 1]), as the txt2img row's.

Timings on a shared machine are meaningless: run it on a quiet one, and compare ratios, not times.
"""

import argparse
import contextlib
import gc
import inspect
import itertools
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import npsd  # noqa: E402
from npsd import blas, clip, fast, malloc, nn, settings  # noqa: E402
from npsd.config import sd15_config, sd2_config  # noqa: E402
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


class OutermostCalls:
    """While active, the functions (module, name) in WRAPPED are wrapped so that each call not made
    inside another wrapped call is reported to self.called(name, its arguments by parameter name, its
    result, its seconds). FlopCounter below and benchmarks/profile.py's LayerTimes build on it."""

    WRAPPED = ()

    def __enter__(self):
        self.depth = 0
        self.saved = [(module, name, getattr(module, name)) for module, name in self.WRAPPED]
        for module, name, f in self.saved:
            setattr(module, name, self._wrapped(name, f))
        return self

    def _wrapped(self, name, f):
        signature = inspect.signature(f)

        def wrapped(*args, **kwargs):
            if self.depth:
                return f(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                y = f(*args, **kwargs)
            finally:
                self.depth -= 1
            self.called(name, signature.bind(*args, **kwargs).arguments, y, time.perf_counter() - t0)
            return y
        return wrapped

    def called(self, name, arguments, result, seconds):
        raise NotImplementedError

    def __exit__(self, *exc):
        for module, name, f in self.saved:
            setattr(module, name, f)


class FlopCounter(OutermostCalls):
    """Count the multiply-adds (x2 = FLOPs) of every convolution, linear layer and attention while
    active, by wrapping nn.conv2d, nn.linear(s) and nn.attention (every layer of npsd's models goes
    through them) and the fast path's convolutions that the VAE decoder's fast blocks call directly
    (fast.conv2d, fast.conv3x3_rows, fast.conv1x1_over_input); a call inside a counted call is not
    counted again."""

    WRAPPED = ((nn, "conv2d"), (nn, "linear"), (nn, "linears"), (nn, "attention"),
               (fast, "conv2d"), (fast, "conv3x3_rows"), (fast, "conv1x1_over_input"))

    @staticmethod
    def multiply_adds(name, a, y):
        """a: the call's arguments by parameter name; y: its result."""
        if name == "conv2d":
            o, c, kh, kw = a["weight"].shape
            return y.size * c * kh * kw
        if name == "conv3x3_rows":                        # the map's shape [B, C, h, w]
            return y.size * a["shape"][1] * 9
        if name == "conv1x1_over_input":                  # x [1, C, H, W] -> [1, O, H, W]
            return y.size * a["x"].shape[1]
        if name == "linear":
            return y.size * a["weight"].shape[1]
        if name == "linears":                             # attention's q, k, v: [out_i, in] each
            return sum(yi.size * p["weight"].shape[1] for yi, p in zip(y, a["layers"]))
        q, k = a["q"], a["k"]                             # attention: Q K^T and P V
        return 2 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]

    def __enter__(self):
        self.flops = 0
        return super().__enter__()

    def called(self, name, arguments, result, seconds):
        self.flops += 2 * self.multiply_adds(name, arguments, result)


def sgemm_rate(torch, n=4096):
    """{"numpy": (FLOP/s, threads), "torch": ...}: each library's n^3 float32 product, best of 3,
    and how many threads computed during those 3 calls (busy_threads): a BLAS that did not take the
    thread count it was given shows here."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    out = {}
    for name, f in (("numpy", lambda: a @ a), ("torch", lambda: torch.mm(ta, ta))):
        f()
        times, threads = busy_threads(lambda: [_timed(f)[0] for _ in range(3)])
        out[name] = (2 * n ** 3 / min(times), threads)
    return out


def busy_threads(work):
    """(work's result, the number of this process's threads that each computed for at least a quarter
    of work's wall time), the count None where the kernel does not say (not Linux)."""
    before, t0 = blas.thread_cpu_seconds(), time.perf_counter()
    result = work()
    wall, after = time.perf_counter() - t0, blas.thread_cpu_seconds()
    if not after:
        return result, None
    return result, sum(after[tid] - before.get(tid, 0.0) >= wall / 4 for tid in after)


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
    setup: object = None    # None, or a context manager function that builds what the case needs (models,
                            # a merged LoRA) before its calls and frees it after; consecutive cases with
                            # the same setup share one


@dataclass
class Result:
    case: Case
    npsd_times: list = field(default_factory=list)
    torch_times: list = field(default_factory=list)
    npsd_mem: int = 0
    torch_mem: int = 0
    flops: int = 0
    rel_err: float = float("nan")
    threads: int = 0        # the --threads count the case ran at (0: the machine's default)

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
    params = {"unet": shared_params(models["unet"]), "vae": shared_params(models["vae"]),
              "text_encoder": text_params(models["text"])}
    return models, params, config


def model_cases(torch, quick, models, params, config):
    rng = np.random.default_rng(1)
    cases = []
    pipe = npsd.Pipeline(params, config)        # its model calls, as a sampling loop of one's own makes them
    tokens, width = 77, (CLIP_QUICK if quick else CLIP_FULL)["hidden_size"]
    for s in ((16, 8) if quick else (64, 32)):
        x, ctx = rng.standard_normal((2, 4, s, s), dtype=np.float32), rng.standard_normal((2, tokens, width), dtype=np.float32)
        t = np.array([801, 801])
        cases.append(Case(f"UNet step, batch 2, {s}x{s} latents",
                          lambda x=x, ctx=ctx, t=t: pipe.unet(x, t, ctx),
                          lambda x=_t(x), ctx=_t(ctx), t=torch.from_numpy(t): _n(models["unet"](x, t, ctx).sample),
                          2e-5))
    side = 32 if quick else 64                                      # latent side
    z = rng.standard_normal((1, 4, side, side), dtype=np.float32)
    out_side = z.shape[-1] * 2 ** (len(params["vae"]["encoder"]["down_blocks"]) - 1)
    cases.append(Case(f"VAE decode, {z.shape[-1]}x{z.shape[-1]} -> {out_side}x{out_side}",
                      lambda: pipe.vae_decode(z),
                      lambda tz=_t(z): _n(models["vae"].decode(tz).sample), 2e-5))
    img = rng.uniform(-1, 1, (1, 3, out_side, out_side)).astype(np.float32)
    cases.append(Case(f"VAE encode, {out_side}x{out_side} (mean)",
                      lambda: pipe.vae_encode(img)[0],
                      lambda ti=_t(img): _n(models["vae"].encode(ti).latent_dist.mean), 2e-5))
    ids = np.array(pipe.tokenize(["a photograph of an astronaut riding a horse", ""]))
    cases.append(Case("CLIP text encoder, 2x77 tokens",
                      lambda: pipe.encode_text(ids),
                      lambda ti=torch.from_numpy(ids): _n(models["text"](ti).last_hidden_state), 1e-5))
    return cases


def txt2img_case(torch, quick, models, params, config):
    from diffusers import DDIMScheduler
    size, steps = (64, 4) if quick else (512, 20)
    sched = DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    ref = reference_pipeline(models["vae"], models["text"], models["unet"], sched)
    pipe = npsd.Pipeline(params, config)
    factor = 2 ** (len(params["vae"]["encoder"]["down_blocks"]) - 1)
    latents = np.random.default_rng(2).standard_normal((1, 4, size // factor, size // factor), dtype=np.float32)
    prompt = PROMPT
    kw = dict(negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)
    return Case(f"txt2img {size}x{size}, {steps} DDIM steps, CFG 7.5",
                lambda: pipe.txt2img(prompt, sampler="ddim", latents=latents, output_type="np", **kw),
                lambda tl=_t(latents): ref(prompt, latents=tl, output_type="np", **kw).images,
                1e-3, repeat=1,
                note="vs diffusers' StableDiffusionPipeline on the same weights; images in [0, 1], so the "
                     "difference is absolute")


# ---------------------------------------------------------------------------------------------
# Time to image: whole generations as CPU users run them, each against diffusers doing the same
# ---------------------------------------------------------------------------------------------

IMAGE = "image: "                       # the rows' names start so: `--only image` selects exactly them
IMAGE_WORDS = ("image", "dpm++", "karras", "lcm", "turbo", "taesd")    # --only words that need the models
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 7
# diffusers' schedulers with SD v1.5's scheduler settings (SD 2.1 and SD-Turbo have the same betas)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading")
# SD 2.1 (and SD-Turbo, distilled from it): heads 64 channels wide, linear proj_in/proj_out, context
# width 1024 from OpenCLIP ViT-H/14's text tower (23 of its 24 layers, GELU): 865M and 340M parameters
UNET_SD21 = dict(UNET_FULL, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
UNET_SD21_QUICK = dict(UNET_QUICK, attention_head_dim=(2, 4), use_linear_projection=True)
CLIP_SD21 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
TAESD_QUICK = dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                   num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))        # one 2x step, as the quick VAE
# The LCM-LoRA for SD v1.5 (latent-consistency/lcm-lora-sdv1-5): rank 64 on the UNet layers its trainer
# targets (diffusers' examples/consistency_distillation), 278 layers at SD v1.5 size, 67.3M parameters
# (the LCM-LoRA paper, Luo et al. 2023, gives 67.5M); no text encoder layers.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# The largest max |npsd - diffusers| allowed between the images (in [0, 1]), (quick mode, full size):
# about 10x the difference measured on this project's machine (quick mode, full size) beside each.
IMAGE_TOLERANCE = {
    ("dpmpp", "vae"): (1e-5, 2e-5),      # measured 9.5e-7, 2.1e-6
    ("lcm", "vae"): (5e-6, 1e-5),        # measured 4.8e-7, 1.3e-6
    ("lcm", "taesd"): (1e-5, 3e-6),      # measured 9.5e-7, 3.0e-7
    ("turbo", "vae"): (5e-6, 1e-5),      # measured 4.8e-7, 1.3e-6
    ("turbo", "taesd"): (1e-5, 3e-6),    # measured 9.5e-7, 2.7e-7
}


def text_params(model):
    """npsd text encoder params from a transformers CLIPTextModel (with or without text_model.), laid
    out as npsd.load lays them out: views of the model's tensors, the linear weights transposed copies."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    return clip.blas_layout(shared_params(model, prefix))


def reference_pipeline(autoencoder, text, unet, scheduler, pad_token="<|endoftext|>"):
    """diffusers' StableDiffusionPipeline on these torch models, with the CLIP vocabulary npsd ships.
    autoencoder: AutoencoderKL or AutoencoderTiny (TAESD). pad_token: SD v1.x's tokenizer pads with
    <|endoftext|>, SD 2.x's with "!" (id 0)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    from npsd.weights import path as weights_path
    tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77,
                        pad_token=pad_token)
    ref = StableDiffusionPipeline(vae=autoencoder, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def seeded(torch):
    """diffusers' generator for SEED; npsd draws the same numbers with seed=SEED, rng="torch"."""
    return torch.Generator("cpu").manual_seed(SEED)


def tolerance(row, decoder, quick):
    return IMAGE_TOLERANCE[row, decoder][0 if quick else 1]


def image_cases(torch, quick, models, params, config):
    """The time-to-image rows, 512x512 (64x64 in quick mode, on the quick models), each timed once."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    taesd_model = AutoencoderTiny(**(TAESD_QUICK if quick else {})).eval().requires_grad_(False)   # random TAESD
    return ([dpmpp_karras_case(torch, quick, models, params, config)]
            + lcm_lora_cases(torch, quick, models, params, config, taesd_model)
            + sd_turbo_cases(torch, quick, models, config, taesd_model))


def dpmpp_karras_case(torch, quick, models, params, config):
    """DPM++ 2M with Karras sigmas (A1111's "DPM++ 2M Karras"), 15 steps, CFG 7.5, fixed initial latents."""
    from diffusers import DPMSolverMultistepScheduler
    size = 64 if quick else 512
    sched = DPMSolverMultistepScheduler(**SD15_SCHEDULER, algorithm_type="dpmsolver++", solver_order=2,
                                        use_karras_sigmas=True)
    ref = reference_pipeline(models["vae"], models["text"], models["unet"], sched)
    pipe = npsd.Pipeline(params, config)
    latents = np.random.default_rng(3).standard_normal((1, 4, size // pipe.vae_factor, size // pipe.vae_factor),
                                                       dtype=np.float32)
    kw = dict(negative_prompt="blurry", num_inference_steps=15, guidance_scale=7.5, height=size, width=size,
              output_type="np")
    return Case(f"{IMAGE}{size}x{size}, DPM++ 2M Karras, 15 steps, CFG 7.5",
                lambda: pipe.txt2img(PROMPT, sampler="dpmpp_2m", use_karras_sigmas=True, latents=latents, **kw),
                lambda tl=_t(latents): ref(PROMPT, latents=tl, **kw).images,
                tolerance("dpmpp", "vae", quick), repeat=1,
                note="vs diffusers' DPMSolverMultistepScheduler(use_karras_sigmas=True), SD v1.5's settings")


def lcm_lora_file(params, rank):
    """A random LoRA with the LCM-LoRA's layers (LCM_LORA_TARGETS) of these npsd params and rank, in
    kohya's layout (lora_unet_<module path, dots as underscores>.lora_down/.lora_up.weight, .alpha),
    float16 as the published file's 135 MB say; alpha = rank / 8, a visible but moderate update (any
    alpha costs the same). -> {name: array}"""
    from npsd import lora
    layers, rng, sd = lora.targets(params), np.random.default_rng(4), {}
    for key, (comp, module) in lora.kohya_names(layers).items():
        if comp != "unet" or not module.endswith(LCM_LORA_TARGETS):
            continue
        shape = layers[comp][module]
        down = rng.standard_normal((rank, *shape[1:]), dtype=np.float32) / np.float32(math.sqrt(math.prod(shape[1:])))
        up = 0.1 * rng.standard_normal((shape[0], rank) + (1, 1) * (len(shape) == 4), dtype=np.float32)
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down.astype(np.float16), up.astype(np.float16)
        sd[key + ".alpha"] = np.array(rank / 8, np.float16)
    return sd


def lcm_lora_cases(torch, quick, models, params, config, taesd_model):
    """SD v1.5 with the LCM-LoRA merged: the lcm sampler, 4 steps, guidance 1 (no unconditional pass),
    decoded by the VAE and by TAESD. The same seed: the same initial latents and per-step noise."""
    from diffusers import LCMScheduler
    from safetensors.numpy import save_file
    size, rank = (64, 4) if quick else (512, 64)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, height=size, width=size, output_type="np")
    state, cases = {}, []

    def scheduler():
        return LCMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False)

    @contextlib.contextmanager
    def lcm_lora():
        """Both sides load the LoRA file and merge it before the timed calls: npsd's load_lora into new
        arrays; diffusers' load_lora_weights + fuse_lora into the UNet's weights in place, which
        npsd's base arrays view: unfuse_lora subtracts it again after the rows (the weights come back
        within float32 rounding, still shared by both sides)."""
        pipe = npsd.Pipeline(params, config)
        pipe.taesd = shared_params(taesd_model)
        ref = {"vae": reference_pipeline(models["vae"], models["text"], models["unet"], scheduler()),
               "taesd": reference_pipeline(taesd_model, models["text"], models["unet"], scheduler())}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "lcm_lora.safetensors")
            save_file(lcm_lora_file(params, rank), path)
            t_npsd = _timed(lambda: pipe.load_lora(path))[0]
            t_ref = _timed(lambda: (ref["vae"].load_lora_weights(path), ref["vae"].fuse_lora()))[0]
        for case in cases:
            case.note = (f"LoRA of rank {rank} on {pipe.loras['lcm_lora'].layers} UNet layers, loaded and merged "
                         f"before the timed call: npsd {fmt_time(t_npsd)}, diffusers (load_lora_weights + "
                         f"fuse_lora) {fmt_time(t_ref)}")
        state.update(pipe=pipe, ref=ref)
        try:
            yield
        finally:
            ref["vae"].unfuse_lora()
            ref["vae"].unload_lora_weights()
            pipe.unload_lora()
            state.clear()
            gc.collect()

    for decoder, what in (("vae", ""), ("taesd", ", TAESD")):
        cases.append(Case(
            f"{IMAGE}{size}x{size}, LCM-LoRA, 4 steps, guidance 1{what}",
            lambda d=decoder: state["pipe"].txt2img(PROMPT, sampler="lcm", seed=SEED, rng="torch", decoder=d, **kw),
            lambda d=decoder: state["ref"][d](PROMPT, generator=seeded(torch), **kw).images,
            tolerance("lcm", decoder, quick), repeat=1, setup=lcm_lora))
    return cases


def sd_turbo_cases(torch, quick, models, config, taesd_model):
    """SD-Turbo as README.md's model table runs it: SD 2.1 shapes, epsilon prediction, 1 step of
    euler_a with trailing spacing, guidance 0 (no unconditional pass); decoded by the VAE (SD 2.1's
    has SD v1.5's shapes: the same random one) and by TAESD. Euler a's only step ends at sigma 0,
    where its fresh noise is multiplied by 0: the same seed gives the same initial latents."""
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    size = 64 if quick else 512
    u, c = (UNET_SD21_QUICK, CLIP_QUICK) if quick else (UNET_SD21, CLIP_SD21)
    kw = dict(num_inference_steps=1, guidance_scale=0.0, height=size, width=size, output_type="np")
    state = {}

    def scheduler():
        return EulerAncestralDiscreteScheduler(**{**SD15_SCHEDULER, "timestep_spacing": "trailing"})

    @contextlib.contextmanager
    def sd_turbo():
        """The SD 2.1-shaped UNet and text encoder, random, built for these rows and freed after them."""
        torch.manual_seed(1)
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **u).eval().requires_grad_(False)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu",
                                            **c)).eval().requires_grad_(False)
        sd2 = sd2_config(u["block_out_channels"], "epsilon")
        sd2["unet"].update(num_heads=list(u["attention_head_dim"]), norm_groups=u["norm_num_groups"])
        sd2["text_encoder"].update(num_heads=c["num_attention_heads"])
        sd2["vae"] = dict(config["vae"])
        pipe = npsd.Pipeline({"unet": shared_params(unet), "vae": shared_params(models["vae"]),
                              "text_encoder": text_params(text)}, sd2)
        pipe.taesd = shared_params(taesd_model)
        state.update(pipe=pipe, ref={"vae": reference_pipeline(models["vae"], text, unet, scheduler(), "!"),
                                     "taesd": reference_pipeline(taesd_model, text, unet, scheduler(), "!")})
        del unet, text, pipe
        try:
            yield
        finally:
            state.clear()
            gc.collect()

    return [Case(f"{IMAGE}{size}x{size}, SD-Turbo, 1 step, no guidance{what}",
                 lambda d=decoder: state["pipe"].txt2img(PROMPT, sampler="euler_a", timestep_spacing="trailing",
                                                         seed=SEED, rng="torch", decoder=d, **kw),
                 lambda d=decoder: state["ref"][d](PROMPT, generator=seeded(torch), **kw).images,
                 tolerance("turbo", decoder, quick), repeat=1, setup=sd_turbo,
                 note="SD 2.1 shapes: UNet and text encoder built for these rows and freed after them")
            for decoder, what in (("vae", ""), ("taesd", ", TAESD"))]


# ---------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------

def _measured(f):
    """(seconds, peak working memory in bytes, result) of one call f()."""
    gc.collect()
    with PeakRSS() as m:
        dt, out = _timed(f)
    return dt, m.peak, out


# A median of 3 calls of 0.2 s follows the one or two slow calls of a noisy moment (CLIP's row spread
# over 0.92-1.25 between runs, docs/speed.md section 8; 0.91-1.07 with 13-15 calls, the host's speed
# drifting between runs), so a short case gets more calls: each side's timed calls add up to at least
# MIN_SECONDS (at most MAX_CALLS of them).
MIN_SECONDS = 3.0
MAX_CALLS = 50


def timed_calls(repeat, first_seconds):
    """How many alternating timed calls a case gets: `repeat`, or more where its first calls (the
    slower side's, first_seconds) were short; a case run once (repeat 1) stays at one."""
    if repeat <= 1:
        return repeat
    return max(repeat, min(MAX_CALLS, math.ceil(MIN_SECONDS / max(first_seconds, 1e-6))))


def run_case(case, repeat):
    """Warm-up calls (npsd's with the FLOP count), the output check, then `repeat` alternating timed
    calls of each, more for a short case (timed_calls). A case run once (repeat 1: the whole txt2img)
    is timed on those first calls."""
    res = Result(case)
    with FlopCounter() as fc:
        first = {"npsd": _measured(case.npsd)}
    res.flops = fc.flops
    first["torch"] = _measured(case.torch)
    n = timed_calls(case.repeat or repeat, max(first["npsd"][0], first["torch"][0]))
    c = compare(np.asarray(first["npsd"][2]), np.asarray(first["torch"][2]))
    res.rel_err = c.max_abs if "txt2img" in case.name or case.name.startswith(IMAGE) else c.max_rel
    runs = [{side: r[:2] for side, r in first.items()}] if n == 1 else []
    del first, c
    for _ in range(n if n > 1 else 0):
        runs.append({side: _measured(getattr(case, side))[:2] for side in ("npsd", "torch")})
    res.npsd_times, res.torch_times = [r["npsd"][0] for r in runs], [r["torch"][0] for r in runs]
    res.npsd_mem, res.torch_mem = max(r["npsd"][1] for r in runs), max(r["torch"][1] for r in runs)
    return res


def fmt_time(t):
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def table(results, rates):
    """The results as a markdown table; rates maps a thread count to the sgemm rate measured at it.
    With several thread counts, a threads column and each side's speed-up over its time at the first
    count are added."""
    scaling = len(rates) > 1
    head = ["case"] + (["threads"] if scaling else []) + ["npsd", "torch", "npsd / torch"]
    head += (["npsd speed-up", "torch speed-up"] if scaling else [])
    head += ["npsd peak", "torch peak", "FLOP-bound fraction", "output diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = {}
    for r in results:
        tn, tt = statistics.median(r.npsd_times), statistics.median(r.torch_times)
        t0 = first.setdefault(r.case.name, (tn, tt))
        frac = f"{r.flops / rates[r.threads] / tn:.2f} ({r.flops / 1e9:.1f} GFLOP)" if r.flops else "-"
        mark = "" if r.rel_err <= r.case.tolerance else " FAIL"
        row = [r.case.name] + ([str(r.threads)] if scaling else [])
        row += [fmt_time(tn), fmt_time(tt), f"**{r.ratio:.2f}**"]
        row += ([f"{t0[0] / tn:.2f}x", f"{t0[1] / tt:.2f}x"] if scaling else [])
        row += [f"{r.npsd_mem / 2**20:.0f} MiB", f"{r.torch_mem / 2**20:.0f} MiB", frac, f"{r.rel_err:.1e}{mark}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine():
    """The CPU's model, its logical CPUs, hardware threads per core (where Linux says), and how many
    CPUs this process may use when fewer: npsd's default thread count counts logical CPUs, PyTorch's
    counts cores."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            per_core = f" ({cpu_list_size(f.read())} per core)"
    except (OSError, ValueError):
        per_core = ""
    usable = settings.usable_cpus()
    mine = f", {usable} of them for this process" if usable != os.cpu_count() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{per_core}{mine}"


def cpu_list_size(text):
    """The number of CPUs in a Linux CPU list such as "0", "0,8" or "0-3,8-11"."""
    return sum(int(hi or lo) - int(lo) + 1 for lo, _, hi in (part.partition("-") for part in text.strip().split(",")))


def libraries(torch):
    """What each side computes with: numpy's BLAS (and OpenBLAS's kernel for this CPU), torch's BLAS
    and the CPU features its kernels use (AVX2, AVX512)."""
    import re
    info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    numpy_blas = f"{info.get('name')} {info.get('version')}, kernel {blas.kernel() or 'unknown'}"
    config = torch.__config__.show()
    torch_blas = ", ".join(re.findall(r"BLAS_INFO=(\w+)", config)) or "unknown"
    onednn = " + oneDNN" if "mkldnn" in config.lower() or "onednn" in config.lower() else ""
    return (f"numpy BLAS: {numpy_blas}; torch BLAS: {torch_blas}{onednn}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def named(word, cases):
    """Whether an --only word is part of the name of one of these cases (case-insensitive)."""
    return any(word.lower() in c.name.lower() for c in cases)


def set_threads(torch, n):
    """n threads on both sides: npsd's own pool and BLAS, torch's intra-op pool."""
    settings.set_threads(n)
    blas.set_threads(n)
    torch.set_num_threads(n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: seconds, for CI")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls of each implementation per case")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only cases whose name contains one of these words (case-insensitive); "
                         "a word that no case's name contains is an error")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--plain", action="store_true", help="npsd's plain reference kernels (nn.set_fast(False))")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="threads for npsd (its pool and BLAS) and torch alike (default: each side's own); "
                         "several counts (--threads 1 2 4 8) run every case at each and add the speed-ups")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("benchmarks need torch, diffusers and transformers: pip install -e '.[test]'", file=sys.stderr)
        return 2
    if args.plain:
        nn.set_fast(False)
    if args.threads and min(args.threads) < 1:
        print(f"--threads must be at least 1, got {min(args.threads)}", file=sys.stderr)
        return 2
    counts = args.threads or [0]                              # 0: the machine's default, left as it is
    if counts[0]:
        set_threads(torch, counts[0])
    kernels = "fast" if settings.FAST else "plain"
    if len(counts) > 1:
        threads = f"threads {', '.join(map(str, counts))} on both sides (every case at each), npsd kernels: {kernels}"
    else:
        threads = f"({torch.get_num_threads()} threads), npsd kernels: {kernels} ({settings.THREADS} threads)"
    header = (f"{time.strftime('%Y-%m-%d')}, {machine()}, numpy {np.__version__}, torch {torch.__version__} "
              f"{threads}, {'quick' if args.quick else 'full'} mode\n{libraries(torch)}; "
              "malloc (both sides): " + ("npsd/malloc.py settings, npsd.Pipeline holding the heap in its model calls "
                                         "and generations" if malloc.KEPT else "as the system has it"))
    print(header, flush=True)

    results = []
    with torch.no_grad():
        every = primitive_cases(torch, args.quick)
        # the models are built only when a word names them or matches no kernel case ("64x64 latents")
        model_words = ("unet", "vae", "clip", "txt2img", "encode", "decode", "text") + IMAGE_WORDS
        if args.only is None or any(w.lower() in model_words or not named(w, every) for w in args.only):
            models, params, config = build_models(torch, args.quick)
            every += model_cases(torch, args.quick, models, params, config)
            every += [txt2img_case(torch, args.quick, models, params, config)]
            every += image_cases(torch, args.quick, models, params, config)
        cases = [c for c in every if args.only is None or any(named(w, [c]) for w in args.only)]
        unmatched = [w for w in args.only or [] if not named(w, cases)]
        if unmatched:
            print(f"--only: no case's name contains {', '.join(map(repr, unmatched))}; the cases are: "
                  f"{'; '.join(c.name for c in every)}", file=sys.stderr)
            return 2
        rates, mismatches = {}, []                                # thread count -> sgemm rate; wrong counts
        for n in counts:
            if n:
                set_threads(torch, n)
            by_library = sgemm_rate(torch)
            rates[n] = max(rate for rate, _ in by_library.values())
            at = f" on {n} threads" if len(counts) > 1 else ""
            print(f"sgemm 4096^3{at}: " + ", ".join(
                f"{name} {rate / 1e9:.0f} GFLOP/s" + (f" ({busy} threads busy)" if busy is not None else "")
                for name, (rate, busy) in by_library.items()), flush=True)
            wanted_threads = {"numpy": n or blas.get_threads(), "torch": n or torch.get_num_threads()}
            for name, (_, busy) in by_library.items():
                if None not in (busy, wanted_threads[name]) and busy != wanted_threads[name]:
                    mismatches.append(f"{name}'s 4096^3 product computed on {busy} threads where {wanted_threads[name]}"
                                      f" were set: its timings{at} are not of that many threads")
                    print(f"warning: {mismatches[-1]}", file=sys.stderr, flush=True)
        for setup, group in itertools.groupby(cases, key=lambda c: c.setup):
            with setup() if setup is not None else contextlib.nullcontext():
                for case, n in itertools.product(group, counts):
                    if n:
                        set_threads(torch, n)
                    r = run_case(case, args.repeat)
                    r.threads = n
                    results.append(r)
                    at = f" ({n} threads)" if len(counts) > 1 else ""
                    print(f"{case.name}{at}: npsd {fmt_time(statistics.median(r.npsd_times))}, torch "
                          f"{fmt_time(statistics.median(r.torch_times))}, ratio {r.ratio:.2f}, diff {r.rel_err:.1e}",
                          flush=True)
    out = table(results, rates)
    notes = [f"- {r.case.name}: {r.case.note}" for r in results if r.case.note]
    notes += [f"- warning: {m}" for m in mismatches]
    used = ", ".join(f"{rate / 1e9:.0f} GFLOP/s" + (f" on {n} threads" if len(counts) > 1 else "")
                     for n, rate in rates.items())
    text = "\n".join([header, f"sgemm rate used for the FLOP bound: {used}", "", out, ""] + notes)
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
