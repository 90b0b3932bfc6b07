"""Weights kept in float16, arithmetic in float32: npsd.load(path, weights_dtype="float16"), --weights-dtype.

Every layer converts its own weight and bias to float32 when it runs (nn.upcast on the plain path,
fast.upcast on the fast path), so a float16 weight gives exactly what its float32 value gives. The
first tests compare against float32 copies of the same float16-rounded weights and require equality
(measured: max difference 0 for every layer on both paths, and for whole tiny generations). Against
float32 weights that float16 cannot represent, the difference is the rounding of the weights (a
relative 2^-11 = 4.9e-4 at most per weight), measured on a small random UNet below.

Memory is measured in fresh processes as tests/test_unet_memory.py does (the child's own VmHWM):
loading a float16 file as float16 makes no float32 copy, and a whole 512x512 txt2img with SD v1.5-sized
float16 weights peaks under 2.6 GiB (measured 2.55-2.57 GiB here, 2.54 GiB by `python -m benchmarks.memory
--weights-dtype float16`; with float32 weights 4.53 GiB).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import npsd
from npsd import clip, cli, fast, nn, unet, vae
from npsd.architecture import TextEncoderDesign, UNetDesign, random_params, text_encoder_shapes, \
    unet_shapes, vae_shapes
from npsd.config import sd15_config
from npsd.params import flatten, unflatten
from tests.test_fast import CONV_ROUTES, route_every_conv

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def rounded(params, dtype=np.float16):
    """A copy of nested params with every array converted to dtype."""
    return unflatten({k: v.astype(dtype) for k, v in flatten(params).items()})


def randn(*shape, scale=1.0, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def both_paths(f):
    with nn.fast(False):
        plain = f()
    with nn.fast(True):
        quick = f()
    return plain, quick


# --- the layers ----------------------------------------------------------------------------------

def test_upcast_copies_float16_only():
    w32, w16 = randn(6, 5), randn(6, 5).astype(np.float16)
    for upcast in (nn.upcast, fast.upcast):
        assert upcast(w32) is w32 and upcast(None) is None               # float32: the array itself
        got = upcast(w16)
        assert got.dtype == np.float32 and np.array_equal(got, w16.astype(np.float32))
    big = randn(700, 600).astype(np.float16)                              # split across threads
    assert np.array_equal(fast.upcast(big), big.astype(np.float32))


def test_astype_in_parallel_pieces(monkeypatch):
    """fast.astype, which the checkpoint readers convert with, gives NumPy's astype exactly: every
    piece of a split conversion written (and every block of a piece: 420,000 values each, over
    fast.HALF_BLOCK), a strided view read in order, float32 values beyond float16's
    range turned to inf without a warning (the loader reports them itself)."""
    import warnings
    monkeypatch.setattr(fast.settings, "THREADS", 3)
    big = randn(3, 700, 600)                                              # 1.26M values: 3 pieces
    for a in (big.astype(np.float16), big.astype(np.float16)[:, ::2, 1:].transpose(2, 0, 1)):
        got = fast.astype(a, np.float32)
        assert got.dtype == np.float32 and got.shape == a.shape and np.array_equal(got, a.astype(np.float32))
    assert fast.astype(big, np.float32) is big
    big[2, -1, -1] = 1e6                                                  # in the last piece
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = fast.astype(big, np.float16)
    assert np.isinf(half[2, -1, -1]) and np.array_equal(half[:2], big[:2].astype(np.float16))


def test_half_to_single_is_numpys_cast_for_every_float16(monkeypatch):
    """fast.half_to_single, the float16 -> float32 conversion of fast.astype, computed on the bits,
    gives NumPy's cast bit for bit for all 65536 float16 values: zeros of both signs, the subnormal
    values, the normal ones, the infinities and every NaN (whose payload the cast keeps), also when
    the infinities and NaNs fall into different pieces of a conversion split across threads."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    want = every.astype(np.float32).view(np.uint32)
    assert np.array_equal(fast.half_to_single(every, np.empty(every.shape, np.float32)).view(np.uint32), want)
    monkeypatch.setattr(fast.settings, "THREADS", 3)
    shuffled = np.random.default_rng(0).permutation(np.tile(every, 5))     # 327680 values: 3 pieces
    assert np.array_equal(fast.astype(shuffled, np.float32).view(np.uint32), shuffled.astype(np.float32).view(np.uint32))


def test_single_to_half_is_numpys_cast_where_rounding_is_decided(monkeypatch):
    """fast.single_to_half, the float32 -> float16 conversion of fast.astype, computed on the bits,
    gives NumPy's cast bit for bit where rounding is decided: each finite float16 value and the
    float32 values 1-3 steps around it and around the midpoint to its neighbour (ties go to the even
    one), the same around the midpoints between float16's subnormal numbers (k + 1/2) 2^-24, the
    overflow edge (65519.99 stays finite, 65520 is infinity), infinities, NaN, signed zeros, and
    2M random values over 10^-12 .. 10^6; also split across threads and blocks by fast.astype."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    finite = every[np.isfinite(every)].view(np.uint32).astype(np.int64)
    subnormal_midpoints = ((np.arange(1024) + 0.5) * 2.0 ** -24).astype(np.float32).view(np.uint32).astype(np.int64)
    near = [(finite + d) for d in range(-3, 4)] + [(finite + 0x1000 + d) for d in range(-3, 4)] + \
           [(subnormal_midpoints + d) for d in range(-3, 4)]
    rng = np.random.default_rng(1)
    spread = (rng.standard_normal(2_000_000) * 10.0 ** rng.integers(-12, 7, 2_000_000)).astype(np.float32)
    edges = np.array([65519.99, 65520, 65536, 1e38, np.inf, np.nan, 0.0, -0.0, 2 ** -25, 2 ** -24], np.float32)
    x = np.concatenate([(np.concatenate(near) % 2 ** 32).astype(np.uint32).view(np.float32), spread, edges, -edges])
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
        got = fast.single_to_half(x, np.empty(x.shape, np.float16)).view(np.uint16)
    assert np.array_equal(got, want), f"{(got != want).sum()} of {x.size} values differ from NumPy's cast"
    monkeypatch.setattr(fast.settings, "THREADS", 3)
    monkeypatch.setattr(fast, "HALF_BLOCK", 1 << 16)
    shuffled = np.random.default_rng(0).permutation(x[:1_000_000])
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(fast.astype(shuffled, np.float16).view(np.uint16), shuffled.astype(np.float16).view(np.uint16))


def layer_cases():
    """(name, function of params, params): every nn layer that takes weights, and the VAE's fast blocks."""
    lin = {"weight": randn(12, 8, scale=0.3), "bias": randn(12, seed=1)}
    norm = {"weight": 1 + randn(16, scale=0.1), "bias": randn(16, scale=0.1, seed=2)}
    conv = lambda o, c, k, seed: {"weight": randn(o, c, k, k, scale=0.2, seed=seed), "bias": randn(o, seed=seed + 1)}
    x_tok, x_map = randn(2, 5, 8, seed=3), randn(2, 16, 9, 7, seed=4)
    vae_res = {"norm1": norm, "conv1": conv(8, 16, 3, 5), "norm2": dict(norm, weight=norm["weight"][:8],
               bias=norm["bias"][:8]), "conv2": conv(8, 8, 3, 7), "conv_shortcut": conv(8, 16, 1, 9)}
    cfg = {"norm_groups": 4, "eps": 1e-6}
    return [
        ("linear", lambda p: nn.linear(x_tok, **p), lin),
        ("linear_or_conv1x1", lambda p: nn.linear_or_conv1x1(x_tok, p["weight"][:, :, None, None], p["bias"]), lin),
        ("geglu", lambda p: nn.geglu(x_tok, **p), lin),
        ("layer_norm", lambda p: nn.layer_norm(randn(2, 5, 16, seed=6), **p), norm),
        ("group_norm", lambda p: nn.group_norm(x_map, 4, **p, eps=1e-6), norm),
        ("conv2d 3x3", lambda p: nn.conv2d(x_map, **p, padding=1), conv(6, 16, 3, 10)),
        ("conv2d 3x3 stride 2", lambda p: nn.conv2d(x_map, **p, stride=2, padding=(0, 1, 0, 1)), conv(6, 16, 3, 12)),
        ("conv2d 1x1", lambda p: nn.conv2d(x_map, **p), conv(6, 16, 1, 14)),
        ("VAE resnet block", lambda p: vae.resnet_block(p, x_map, cfg), vae_res),
        ("VAE upsampler", lambda p: vae.upsample({"conv": p}, x_map), conv(6, 16, 3, 16)),
        ("VAE output layers", lambda p: vae.output_layers({"conv_norm_out": norm, "conv_out": p}, x_map, cfg),
         conv(3, 16, 3, 18)),
        ("VAE resnet block, in place", lambda p: fast.vae_resnet_block(p, x_map[:1].copy(), 4, 1e-6, inplace=True),
         vae_res),
    ]


@pytest.mark.parametrize("route", CONV_ROUTES)
@pytest.mark.parametrize("name, f, params", layer_cases(), ids=[c[0] for c in layer_cases()])
def test_each_layer_with_float16_weights_equals_float32_of_the_same_values(name, f, params, route, monkeypatch):
    """Float16 weights vs float32 copies of the same float16 values, on both paths: equal (measured 0)."""
    route_every_conv(monkeypatch, route)
    p16 = rounded(params)
    p32 = rounded(p16, np.float32)
    for path, (a, b) in zip(("plain", "fast"), zip(*(both_paths(lambda: f(p)) for p in (p16, p32)))):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), (name, path)


# --- whole models and pipelines ------------------------------------------------------------------

def test_tiny_pipeline_with_float16_weights_equals_float32_of_the_same_values():
    """The built-in model's file is float16, so npsd.load() (float32) and weights_dtype="float16" hold
    the same values: txt2img and img2img agree exactly on both paths (measured 0)."""
    from PIL import Image
    p16 = npsd.load(weights_dtype="float16")
    p32 = npsd.load()
    assert p16.info["weights_dtype"] == "float16" and p32.info["weights_dtype"] == "float32"
    assert {a.dtype for a in flatten(p16.params).values()} == {np.dtype(np.float16)}
    for c in p32.params:
        pairs = zip(flatten(p16.params[c]).values(), flatten(p32.params[c]).values())
        assert all(np.array_equal(a, b) for a, b in pairs)
    kw = dict(num_inference_steps=2, seed=3, output_type="np")

    def generate(pipe):
        image = pipe.txt2img("a red circle", **kw)
        start = Image.fromarray((image[0] * 255).astype(np.uint8))
        return image, pipe.img2img("a blue square", start, strength=0.6, **kw)
    for (a16, b16), (a32, b32) in zip(*(both_paths(lambda: generate(pipe)) for pipe in (p16, p32))):
        assert np.array_equal(a16, a32) and np.array_equal(b16, b32)
    assert npsd.load(dtype=np.float16).info["weights_dtype"] == "float16"   # the old name still works


SMALL_UNET = UNetDesign(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64)
# Max |fp16 - fp32| / max |fp32| of eps for a small random UNet (float32 weights N(0, 1/fan_in) vs the
# same weights rounded to float16), both paths: measured 9.1e-4 (also at SD v1.5 size, docs/speed.md).
# Bound: 3e-3 (3.3x), and above 1e-5 (the weights' rounding must show).
UNET_ROUNDING_TOL = 3e-3


def test_unet_call_differs_from_float32_weights_by_the_rounding_of_the_weights():
    rng = np.random.default_rng(0)
    p32 = random_params(unet_shapes(SMALL_UNET), rng)
    p16 = rounded(p32)
    x, ctx = rng.standard_normal((2, 4, 16, 16), dtype=np.float32), rng.standard_normal((2, 7, 64), dtype=np.float32)
    cfg = dict(sd15_config()["unet"], num_heads=2)
    for a, b in zip(*(both_paths(lambda: unet.unet(p, x, [999, 10], ctx, cfg)) for p in (p32, p16))):
        rel = float(np.abs(b - a).max() / np.abs(a).max())
        print(f"UNet eps, float16 vs float32 weights: max relative difference {rel:.2g} (bound {UNET_ROUNDING_TOL})")
        assert 1e-5 < rel < UNET_ROUNDING_TOL


def test_text_encoder_embeds_float16_tables_in_float32():
    """Token and position rows are added in float32 (adding them in float16 would round the sum)."""
    p = random_params(text_encoder_shapes(TextEncoderDesign(vocab_size=50, hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=1)), np.random.default_rng(1))
    p16 = rounded(p)
    ids = np.arange(12)[None] % 50
    got = clip.embed(p16["embeddings"], ids)
    want = (p16["embeddings"]["token_embedding"]["weight"][ids].astype(np.float32)
            + p16["embeddings"]["position_embedding"]["weight"][:12].astype(np.float32))
    assert got.dtype == np.float32 and np.array_equal(got, want)


# --- LoRA and embeddings on float16 weights -----------------------------------------------------

def test_lora_and_embedding_on_float16_weights(tmp_path):
    """A LoRA merges in float32 and is stored back in float16 (W' = fp16(W + s up @ down)); unloading
    gives back the very arrays loaded. An embedding's vectors become float16 rows of the table. The
    images then equal those of a float32 pipeline holding the same values (measured 0)."""
    from safetensors.numpy import save_file
    from npsd import lora
    pipe = npsd.load(weights_dtype="float16")
    layers = lora.targets(pipe.params)
    names = {v: k for k, v in lora.kohya_names(layers).items()}
    rng = np.random.default_rng(5)
    chosen = [("unet", p) for p in list(layers["unet"])[::25]] + [("text_encoder", "encoder.layers.0.self_attn.q_proj")]
    tensors = {}
    for comp, path in chosen:
        shape = layers[comp][path]
        k = names[(comp, path)]
        tensors[k + ".lora_down.weight"] = (rng.standard_normal((2,) + shape[1:]) * 0.1).astype(np.float32)
        tensors[k + ".lora_up.weight"] = (rng.standard_normal((shape[0], 2) + (1, 1) * (len(shape) == 4)) * 0.1
                                          ).astype(np.float32)
    save_file(tensors, str(tmp_path / "style.safetensors"))
    (tmp_path / "emb").mkdir()
    width = pipe.params["text_encoder"]["final_layer_norm"]["weight"].shape[0]
    vectors = rng.standard_normal((2, width)).astype(np.float16).astype(np.float32)   # float16 values: exact rows
    save_file({"emb_params": vectors}, str(tmp_path / "emb" / "mystyle.safetensors"))

    before = {k: v for k, v in flatten(pipe.params).items()}
    pipe.load_lora(tmp_path / "style.safetensors", 0.8)
    w = flatten(pipe.params)
    assert {a.dtype for a in w.values()} == {np.dtype(np.float16)}
    u = names[chosen[0]]
    shape = layers["unet"][chosen[0][1]]
    delta = (tensors[u + ".lora_up.weight"].reshape(shape[0], -1) @ tensors[u + ".lora_down.weight"].reshape(2, -1)
             ).reshape(shape)
    want = (before[f"unet.{chosen[0][1]}.weight"].astype(np.float32) + np.float32(0.8) * delta).astype(np.float16)
    assert np.array_equal(w[f"unet.{chosen[0][1]}.weight"], want)

    ref = npsd.Pipeline(rounded(pipe.params, np.float32), pipe.config)  # float32, the merged float16 values
    for p in (pipe, ref):
        p.embeddings_dir = str(tmp_path / "emb")
    kw = dict(num_inference_steps=2, seed=4, output_type="np")
    a, b = (p.txt2img("a photo in mystyle", **kw) for p in (pipe, ref))
    table = pipe.params["text_encoder"]["embeddings"]["token_embedding"]["weight"]
    assert table.dtype == np.float16 and np.array_equal(table[-2:], vectors)
    assert np.array_equal(a, b)
    pipe.unload_lora()
    assert all(flatten(pipe.params)[k] is v for k, v in before.items() if not k.startswith("text_encoder.embeddings"))


# --- the command line ---------------------------------------------------------------------------

def test_cli_weights_dtype(tmp_path, capsys, monkeypatch):
    loaded = []
    real = npsd.load

    def spy(*a, **k):
        loaded.append(real(*a, **k))
        return loaded[-1]
    monkeypatch.setattr(npsd, "load", spy)
    out = tmp_path / "a.png"
    rc = cli.main(["txt2img", "a red circle", "--weights-dtype", "float16", "--steps", "1", "-o", str(out), "--quiet"])
    assert rc == 0 and out.exists() and loaded[0].info["weights_dtype"] == "float16"
    capsys.readouterr()
    assert cli.main(["txt2img", "x", "--weights-dtype", "bfloat16", "-o", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--weights-dtype" in err and "float16" in err


def test_bad_weights_dtype_and_float16_overflow_are_one_line_errors(tmp_path):
    with pytest.raises(npsd.InputError, match="float32 or float16"):
        npsd.load(weights_dtype="bfloat16")
    with pytest.raises(npsd.InputError, match="not both"):
        npsd.load(weights_dtype="float16", dtype=np.float32)
    for ema in ("yes", 0, None):                                         # a flag, not a truthy value
        with pytest.raises(npsd.InputError, match="ema must be True .* or False, got"):
            npsd.load(ema=ema)
    # a float32 tensor beyond float16's range cannot be kept in float16
    from safetensors.numpy import load_file, save_file
    sd = load_file(npsd.load().info["file"])                             # the built-in model (float16)
    name = "first_stage_model.encoder.conv_in.weight"
    sd[name] = sd[name].astype(np.float32) * np.float32(1e6)              # up to about 1e6 > 65504
    save_file(sd, str(tmp_path / "big.safetensors"))
    assert npsd.load(tmp_path / "big.safetensors").params["vae"]["encoder"]["conv_in"]["weight"].max() > 65504
    with pytest.raises(npsd.CheckpointError, match=f"{name} has values beyond float16's range"):
        npsd.load(tmp_path / "big.safetensors", weights_dtype="float16")


# --- memory, in fresh processes ------------------------------------------------------------------

def run_child(code, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LOAD_CHILD = """
    import json, sys
    sys.modules["torch"] = None
    import numpy as np, npsd
    from npsd.params import flatten
    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    base = hwm()
    pipe = npsd.load(sys.argv[1], weights_dtype="float16")
    arrays = flatten(pipe.params).values()
    print(json.dumps({"base": base, "peak": hwm(), "bytes": sum(a.nbytes for a in arrays),
                      "dtypes": sorted({str(a.dtype) for a in arrays})}))
"""


def test_loading_a_float16_folder_as_float16_makes_no_float32_copy(tmp_path):
    """A diffusers folder (SD v1.5's VAE and text encoder, a smaller UNet; 0.44 GiB in float16): the
    peak while loading stays within 1.1x the float16 weights above the size before loading (a float32
    copy of everything would be 3x). Measured: 1.03x."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    design = UNetDesign(block_out_channels=(64, 128, 256, 256))
    for comp, shapes, file in (("unet", unet_shapes(design), "diffusion_pytorch_model"),
                               ("vae", vae_shapes(), "diffusion_pytorch_model"),
                               ("text_encoder", text_encoder_shapes(), "model")):
        (tmp_path / comp).mkdir()
        save_file({k: v.astype(np.float16) for k, v in flatten(random_params(shapes, rng)).items()},
                  str(tmp_path / comp / f"{file}.safetensors"))
    m = run_child(LOAD_CHILD, tmp_path)
    ratio = (m["peak"] - m["base"]) / m["bytes"]
    print(f"float16 folder of {m['bytes'] / GIB:.2f} GiB loaded as float16: peak {m['peak'] / GIB:.2f} GiB, "
          f"before loading {m['base'] / GIB:.2f} GiB: {ratio:.3f}x the weights (bound 1.1x)")
    assert m["dtypes"] == ["float16"] and ratio < 1.1


# The start of the memory tests' children: SD v1.5-sized random weights kept in float16, built without torch
FLOAT16_SD15_CHILD = """
    import json, sys, time
    sys.modules["torch"] = None
    import numpy as np, npsd
    from npsd import nn
    from npsd.architecture import random_params, text_encoder_shapes, unet_shapes, vae_shapes
    nn.set_threads(2)      # each thread's C heap keeps some freed memory: the peak grows a little with threads
    from npsd.params import flatten, unflatten
    def status(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
    rng = np.random.default_rng(0)
    params = {}
    for comp, shapes in (("text_encoder", text_encoder_shapes()), ("vae", vae_shapes()), ("unet", unet_shapes())):
        # one tensor at a time: random float32 values, kept in float16 (SD v1.5's names and shapes)
        params[comp] = unflatten({k: flatten(random_params({k: s}, rng))[k].astype(np.float16)
                                  for k, s in shapes.items()})
    pipe = npsd.Pipeline(params)
"""
TXT2IMG_CHILD = FLOAT16_SD15_CHILD + """
    built, t0 = status("VmRSS"), time.time()
    image = pipe.txt2img("a photograph of an astronaut riding a horse", negative_prompt="blurry", height=512, width=512,
                         num_inference_steps=1, guidance_scale=7.5, sampler="ddim", seed=0, output_type="np")
    print(json.dumps({"weights": sum(a.nbytes for a in flatten(params).values()), "built": built,
                      "peak": status("VmHWM"), "seconds": time.time() - t0,
                      "ok": bool(image.shape == (1, 512, 512, 3) and np.isfinite(image).all())}))
"""
TXT2IMG_LIMIT_GIB = 2.6


def test_whole_512_txt2img_with_float16_weights_peaks_under_2_6_gib():
    """SD v1.5-sized random float16 weights (1.99 GiB), one DDIM step with guidance at 512x512 (the
    peak does not depend on the number of steps: each step does the same work), VAE decode included.
    Measured with 2 threads: peak 2.55-2.57 GiB (2.06 GiB once the weights are built; the VAE decode is
    most of the rest, docs/speed.md section 6); the test takes 35-80 s on 2 cores."""
    m = run_child(TXT2IMG_CHILD)
    print(f"whole 512x512 txt2img, float16 weights {m['weights'] / GIB:.2f} GiB: after building them "
          f"{m['built'] / GIB:.2f} GiB, peak {m['peak'] / GIB:.2f} GiB (bound {TXT2IMG_LIMIT_GIB} GiB); "
          f"generation {m['seconds']:.0f} s")
    assert m["ok"] and m["peak"] <= TXT2IMG_LIMIT_GIB * GIB


LORA_CHILD = FLOAT16_SD15_CHILD + """
    from benchmarks.memory import lcm_like_lora
    path = lcm_like_lora(pipe, 64, sys.argv[1])
    out = {}
    for keep_base in (True, False):
        open("/proc/self/clear_refs", "w").write("5")            # VmHWM counts from here (Linux's proc(5))
        before = status("VmRSS")
        pipe.load_lora(path, keep_base=keep_base)
        out[str(keep_base)] = {"before": before, "after": status("VmRSS"), "peak": status("VmHWM")}
        if keep_base:
            pipe.unload_lora()
    print(json.dumps(out))
"""
LORA_GROWTH_LIMIT_GIB, LORA_PEAK_LIMIT_GIB = 0.05, 0.4


def test_a_lora_on_the_whole_unet_merged_into_the_base_takes_no_second_copy(tmp_path):
    """A rank-64 LoRA on the layers the LCM-LoRA targets (857M of the UNet's 860M weights; float16 as
    published, benchmarks/memory.py writes it) merged into SD v1.5-sized float16 weights as the command
    line's --lora merges it (keep_base=False, in place): the process grows by at most 0.05 GiB
    (measured 0.000) and peaks at most 0.4 GiB above its size before (measured 0.22: the factors,
    0.13 GiB, and the largest layer's float32 sum), under the 0.49 GiB a 512x512 generation adds. load_lora's default
    (keep_base=True), which keeps the original arrays so that it can unload, grew by the touched
    layers' 1.6 GiB (peak +1.64 GiB): the bound is what that fails. About 30 s on 2 cores."""
    m = run_child(LORA_CHILD, tmp_path / "lcm_like.safetensors")
    for keep_base, r in m.items():
        print(f"keep_base={keep_base}: grew {(r['after'] - r['before']) / GIB:.3f} GiB, peak "
              f"+{(r['peak'] - r['before']) / GIB:.3f} GiB (bounds {LORA_GROWTH_LIMIT_GIB} / {LORA_PEAK_LIMIT_GIB} GiB)")
    into_base, kept = m["False"], m["True"]
    assert into_base["after"] - into_base["before"] <= LORA_GROWTH_LIMIT_GIB * GIB
    assert into_base["peak"] - into_base["before"] <= LORA_PEAK_LIMIT_GIB * GIB
    assert kept["after"] - kept["before"] > 1.5 * GIB > LORA_GROWTH_LIMIT_GIB * GIB
