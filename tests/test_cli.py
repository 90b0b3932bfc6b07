"""The command line (npsd/cli.py, npsd/pngmeta.py): outputs, PNG metadata, errors, interrupts.

Most tests call `npsd.cli.main([...])` in-process on a tiny random model saved as a diffusers folder
(2-level UNet/VAE with 32/64 channels, 2-layer CLIP of width 32; 16x16 images, 1-3 steps); a few run
`python -m npsd` in a subprocess (exit codes, SIGINT, determinism across processes, --threads).
Tiny checkpoints in the original single-file layout (4 levels, as SD v1.x; written with diffusers'
own routing, tests/test_loading.py) go through --model and --no-ema. `npsd parity`: tests/test_parity.py.
"""

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import npsd
from npsd import cli
from npsd.blas import THREAD_VARS
from npsd.images import write_png_atomic
from npsd.pngmeta import A1111_SAMPLERS, format_parameters, parse_parameters, read_parameters, settings_from_png
from tests.helpers import perturb_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--height", "16", "--width", "16", "--steps", "2"]
PROMPT = "a red circle on a blue background"


# --- the tiny model -------------------------------------------------------------------------------

def tiny_vae(seed=3):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return perturb_(AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  layers_per_block=1, sample_size=32).eval(), seed)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random SD-shaped model saved as a diffusers folder (read by npsd.load)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    torch.manual_seed(0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=77, hidden_act="quick_gelu")).eval(), 2)
    unet = perturb_(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                         attention_head_dim=4, norm_num_groups=8).eval(), 1)
    text.save_pretrained(folder / "text_encoder")
    tiny_vae().save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    return str(folder)


def run(args, capsys):
    """main(args) in-process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def gen(capsys, model, out, *extra, mode="txt2img", prompt=PROMPT):
    args = [mode] + ([prompt] if prompt is not None else []) + ["--model", model, "-o", out, "--quiet"] + SMALL + list(extra)
    rc, stdout, stderr = run(args, capsys)
    assert rc == 0, stderr
    return stdout, stderr


def params_of(path):
    return parse_parameters(read_parameters(path))


def sha10(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:10]


def make_image(path, size=16, mode="RGB"):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.stack([yy, xx, 1 - xx * yy], -1) + 0.1 * rng.standard_normal((size, size, 3))
    Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).convert(mode).save(path)
    return str(path)


def make_mask(path, size=16):
    m = np.zeros((size, size), np.uint8)
    m[4:12, 2:10] = 255
    Image.fromarray(m, "L").save(path)
    return str(path)


# --- PNG parameters -------------------------------------------------------------------------------

def test_parameters_roundtrip_with_awkward_text():
    fields = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 4294967295, "Size": "512x768",
              "Model hash": "0123456789", "Model": "my, model: v2.safetensors", "VAE": 'say "hi"',
              "Pipeline": "txt2img", "npsd version": "0.1.0"}
    for prompt, negative in [("a cat, on a mat: 8k", "blurry, ugly"), ("line one\nline two", ""),
                             ("", "only negative"), ("ünïcödé 猫 🐱", "Negative prompt: inside"),
                             ("Steps: 3, Seed: 4", "x")]:
        text = format_parameters(prompt, negative, fields)
        back = parse_parameters(text)
        assert back["prompt"] == prompt and back["negative_prompt"] == negative, (prompt, back)
        assert back["fields"] == {k: str(v) for k, v in fields.items()}


def test_png_chunk_roundtrip_latin1_and_utf8(tmp_path):
    """Latin-1 text goes into a tEXt chunk (what A1111 writes), other text into iTXt (UTF-8); both read back."""
    for name, prompt in (("latin.png", "café, naïve"), ("utf8.png", "猫 🐱 on a mat")):
        text = format_parameters(prompt, "", {"Steps": 1, "Seed": 2})
        write_png_atomic(Image.new("RGB", (4, 4)), str(tmp_path / name), text, overwrite=False)
        assert read_parameters(tmp_path / name) == text
    raw = (tmp_path / "latin.png").read_bytes()
    assert b"tEXtparameters" in raw and b"iTXtparameters" in (tmp_path / "utf8.png").read_bytes()
    # a LoRA or model file name that is not UTF-8 (byte 0xff, kept by Python as "\udcff") ended the run
    # in a UnicodeEncodeError after the image was made; it is written as U+FFFD
    text = format_parameters("x", "", {"Lora": "\udcffink: 1"})
    write_png_atomic(Image.new("RGB", (4, 4)), str(tmp_path / "bytes.png"), text, overwrite=False)
    assert read_parameters(tmp_path / "bytes.png") == text.replace("\udcff", "\ufffd")


def test_reads_a1111_jpeg_exif(tmp_path):
    text = "a castle, at dusk\nNegative prompt: lowres\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 9, Size: 512x512"
    img = Image.new("RGB", (8, 8))
    exif = img.getexif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")     # as A1111 writes it
    img.save(tmp_path / "a.jpg", exif=exif)
    assert read_parameters(tmp_path / "a.jpg") == text
    s = settings_from_png(str(tmp_path / "a.jpg"), "txt2img")
    assert (s["prompt"], s["sampler"], s["seed"], s["steps"]) == ("a castle, at dusk", "euler_a", 9, 20)


def test_parses_a1111_text():
    text = ("masterpiece, a castle\nNegative prompt: lowres, bad anatomy\nSteps: 28, Sampler: DPM++ 2M Karras, "
            "CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
            'Clip skip: 2, Lora hashes: "a: 1, b: 2", Version: v1.6.0')
    p = parse_parameters(text)
    assert p["prompt"] == "masterpiece, a castle" and p["negative_prompt"] == "lowres, bad anatomy"
    assert p["fields"]["Lora hashes"] == "a: 1, b: 2" and p["fields"]["Size"] == "512x768"
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": "", "fields": {}}


def test_from_png_reads_a1111_settings(tmp_path):
    path = tmp_path / "a1111.png"
    from npsd.pngmeta import png_info
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(
        "a castle\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5, Clip skip: 2, Denoising strength: 0.6"))
    s = settings_from_png(str(path), "img2img")
    assert (s["prompt"], s["negative_prompt"], s["steps"], s["sampler"], s["schedule_type"]) == \
        ("a castle", "lowres", 28, "dpmpp_2m", "karras")                   # A1111's Karras sigmas
    assert "karras" not in s and "timestep_spacing" not in s
    assert (s["guidance_scale"], s["seed"], s["width"], s["height"], s["clip_skip"], s["strength"]) == \
        (6.5, 1234, 512, 768, 1, 0.6)


def test_from_png_of_a_decompression_bomb_is_one_line(tmp_path, capsys):
    """A 20000x20000 PNG (48 KB on disk, 400 Mpixels) is beyond Pillow's limit for one image (179
    Mpixels): --from-png said "internal error: DecompressionBombError". Below the limit, the text
    chunk npsd and A1111 write before the pixels is read without decoding them."""
    from npsd.pngmeta import png_info
    bomb = tmp_path / "bomb.png"
    Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS
    try:
        Image.new("1", (20000, 20000)).save(bomb, pnginfo=png_info("a cat\nSteps: 2, Seed: 1, Size: 64x64"))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    rc, _, err = run(["txt2img", "--from-png", bomb, "-o", tmp_path / "o.png", "--quiet"], capsys)
    assert rc != 0 and "internal error" not in err and "--from-png: cannot read" in err, err
    assert "exceeds limit" in err and err.count("\n") == 1, err
    cut = tmp_path / "cut.png"                                  # the chunk, then pixels that cannot be decoded
    Image.new("RGB", (64, 64)).save(cut, pnginfo=png_info("a dog\nSteps: 3, Seed: 5, Size: 64x64"))
    data = cut.read_bytes()
    cut.write_bytes(data[:data.index(b"IDAT") + 20])
    assert settings_from_png(str(cut), "txt2img")["prompt"] == "a dog"


def test_from_png_names_the_a1111_settings_it_does_not_apply(model, tmp_path, capsys):
    """A1111 writes hires fix's checkpoint, face restoration and its extensions' settings only when
    they are in use, and each changes its image: a re-make names them in one warning (they were
    ignored without a word); npsd's own PNGs, A1111's defaults ("Schedule type: Automatic",
    "Emphasis: Original") and what npsd applies (its schedule types and their settings, Clip skip,
    seed resizing, the conditional mask weight, the hires fix's resize, prompt and sampler, the
    emphasis mode) give none; img2img's
    noise multiplier is named when a txt2img re-make meets it."""
    from npsd.pngmeta import png_info
    base = f"{PROMPT}\nNegative prompt: \nSteps: 1, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 16x16"
    cases = {", Hires resize: 32x32, Hires upscaler: Latent, Hires prompt: a dog, Denoising strength: 0.7": None,
             ", Hires upscale: 2, Hires upscaler: Latent, Hires sampler: Euler, Denoising strength: 0.7": None,
             ", Hires upscale: 2, Hires upscaler: Latent, Hires CFG Scale: 5, Denoising strength: 0.7":
             "Hires CFG Scale: 5",
             ", Seed resize from: 32x32": None,
             ", Variation seed: 9, Variation seed strength: 0.3, ENSD: 31337": None,
             ", Conditional mask weight: 0.5": None,
             ", Noise multiplier: 0.9, Soft inpainting enabled: True": "Noise multiplier: 0.9, Soft inpainting enabled: True",
             ", Conditional mask weight: 1.0": None,
             ", Schedule type: SGM Uniform, Emphasis: No norm": None,
             ", Schedule rho: 5, Discard penultimate sigma: True": None,
             ", Schedule type: Beta, Beta schedule alpha: 0.6, Beta schedule beta: 0.8": None,
             ', ADetailer model: face_yolov8n.pt, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny, '
             'Weight: 1"': "ADetailer model: face_yolov8n.pt, ControlNet 0",
             ", Schedule type: Automatic, Emphasis: Original, Clip skip: 2": None,
             ", Schedule type: Karras, Version: v1.10.1": None}
    for extra, named in cases.items():
        path = tmp_path / "a1111.png"
        Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(base + extra))
        rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "a.png", "--quiet",
                          "--overwrite"], capsys)
        expected = "" if named is None else (f"npsd: warning: --from-png: the PNG used A1111 settings that npsd "
                                             f"does not apply ({named}); the image will differ\n")
        assert rc == 0 and err == expected, (extra, err)
    own = tmp_path / "own.png"
    gen(capsys, model, own, "--seed", 3, "--sampler", "dpmpp_2m", "--karras", "--clip-skip", 1)
    rc, _, err = run(["txt2img", "--from-png", own, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err


def test_seed_resize_noise_multiplier_and_mask_weight_round_trip(model, tmp_path, capsys):
    """--seed-resize-from, --noise-multiplier and --inpainting-mask-weight (A1111's "Seed resize from",
    "Noise multiplier" and "Conditional mask weight") are written as A1111 writes them and remade
    by --from-png; each changes the image; bad stored values are one-line errors."""
    from npsd.pngmeta import png_info
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(image)
    common = ["--model", model, "--image", image, "--seed", 4, "--steps", 2, "--sampler", "euler_a",
              "--schedule-type", "automatic", "--quiet"]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    rc, _, err = run(["img2img", PROMPT, "-o", a, "--seed-resize-from", "24x8", "--noise-multiplier", 0.8,
                      "--inpainting-mask-weight", 0.5, *common], capsys)
    assert rc == 0, err
    fields = params_of(a)["fields"]
    assert (fields["Seed resize from"], fields["Noise multiplier"], fields["Conditional mask weight"]) == \
        ("24x8", "0.8", "0.5")
    rc, _, err = run(["img2img", "--from-png", a, "--model", model, "--image", image, "-o", b, "--quiet"], capsys)
    assert rc == 0 and err == "", err
    assert b.read_bytes() == a.read_bytes()
    for option in (["--seed-resize-from", "24x8"], ["--noise-multiplier", 0.8]):
        rc, _, err = run(["img2img", PROMPT, "-o", c, "--overwrite", *option, *common], capsys)
        assert rc == 0 and not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c))), option
    base = f"{PROMPT}\nSteps: 1, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 16x16, Denoising strength: 0.5"
    for extra, message in ((", Seed resize from: 0x-8", "the stored 'Seed resize from' is '0x-8', not WIDTHxHEIGHT"),
                           (", Seed resize from: big", "the stored 'Seed resize from' is 'big', not WIDTHxHEIGHT"),
                           (", Noise multiplier: -1", "the stored 'Noise multiplier' is '-1', not a number >= 0"),
                           (", Noise multiplier: x", "the stored 'Noise multiplier' is 'x', not a number")):
        path = tmp_path / "bad.png"
        Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(base + extra))
        rc, _, err = run(["img2img", "--from-png", path, "--model", model, "--image", image, "-o", c, "--quiet",
                          "--overwrite"], capsys)
        assert rc != 0 and message in err and err.count("\n") == 1, (extra, err)
    for option, message in ((["--seed-resize-from", "0x-8"], "the width and height must be > 0"),
                            (["--noise-multiplier", -1], "must be a finite number >= 0.0")):
        rc, _, err = run(["img2img", PROMPT, "-o", c, "--overwrite", *option, *common], capsys)
        assert rc != 0 and message in err, (option, err)


def test_hires_fix_with_an_image_upscaler(model, tmp_path, capsys):
    """--hires-upscaler lanczos (A1111's image upscaler without a network): the PNG names it as A1111
    does, --from-png remakes the file, and it is not the latent upscaler's image."""
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    gen(capsys, model, a, "--seed", 2, "--sampler", "euler_a", "--hires-scale", 2, "--hires-upscaler", "lanczos")
    assert params_of(a)["fields"]["Hires upscaler"] == "Lanczos" and Image.open(a).size == (32, 32)
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", b, "--quiet"], capsys)
    assert rc == 0 and err == "", err
    assert b.read_bytes() == a.read_bytes()
    gen(capsys, model, c, "--seed", 2, "--sampler", "euler_a", "--hires-scale", 2, "--hires-upscaler", "latent")
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))


def test_resize_modes(model, tmp_path, capsys):
    """--resize-mode brings an image of another shape to --height x --width as the pipeline's
    resize_mode (npsd.images.resize_to), states it in the PNG, and --from-png remakes the file."""
    from npsd import load
    from npsd.images import resize_to
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 32, 3)).astype(np.uint8)).save(image)
    a = tmp_path / "a.png"
    _, err = gen(capsys, model, a, "--image", image, "--seed", 4, "--resize-mode", "crop and resize", mode="img2img")
    assert "image of size 32x16 resized to 16x16" in err
    assert params_of(a)["fields"]["Resize mode"] == "Crop and resize"
    ref = load(model).img2img(PROMPT, resize_to(Image.open(image), 16, 16, "crop and resize"), seed=4, height=16,
                              width=16, num_inference_steps=2)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    b = tmp_path / "b.png"
    rc, _, err = run(["img2img", "--from-png", a, "--image", image, "--model", model, "-o", b, "--quiet"], capsys)
    assert rc == 0, err
    assert b.read_bytes() == a.read_bytes()


def test_variation_seed_and_ensd(model, tmp_path, capsys):
    """--variation-seed, --variation-strength and --ensd are the pipeline's A1111 seed options: the
    PNG states them as A1111 does, --from-png remakes the file, and without them the image differs."""
    from npsd import load
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--sampler", "euler_a", "--schedule-type", "automatic", "--rng", "torch",
        "--variation-seed", 9, "--variation-strength", 0.3, "--ensd", 31337, "--steps", 3)
    f = params_of(a)["fields"]
    assert (f["Variation seed"], f["Variation seed strength"], f["ENSD"]) == ("9", "0.3", "31337")
    pipe = load(model)
    kw = dict(seed=4, sampler="euler_a", schedule_type="automatic", rng="torch", num_inference_steps=3, height=16, width=16)
    ref = pipe.txt2img(PROMPT, variation_seed=9, variation_strength=0.3, eta_noise_seed_delta=31337, **kw)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    plain = pipe.txt2img(PROMPT, **kw)
    assert not np.array_equal(np.asarray(plain), np.asarray(ref))
    b = tmp_path / "b.png"
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", b, "--quiet"], capsys)
    assert rc == 0 and err == "", err
    assert b.read_bytes() == a.read_bytes()
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "c.png", "--variation-strength", 0.5,
                      "--quiet"], capsys)
    assert rc == 2 and "variation_seed" in err and err.count("\n") == 1, err


def test_schedule_type_option_and_its_png_field(model, tmp_path, capsys):
    """--schedule-type runs A1111's schedule (the pipeline's schedule_type) and writes A1111's
    "Schedule type" (for automatic, the type A1111 resolves it to) without "Timestep spacing", which
    npsd writes with diffusers' schedules: --from-png tells the two apart and remakes each exactly.
    A1111's PNGs name the type, or, for its Uniform, nothing; the two kinds of option exclude each
    other; a type npsd lacks is one line that names the option to give."""
    from npsd import load
    from npsd.pngmeta import png_info
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--sampler", "dpmpp_2m", "--schedule-type", "automatic", "--rng", "torch")
    f = params_of(a)["fields"]
    assert f["Schedule type"] == "Karras" and "Timestep spacing" not in f, f
    pipe = load(str(model))
    ref = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                       sampler="dpmpp_2m", schedule_type="karras", rng="torch", prompt_syntax="a1111",
                       height=16, width=16)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    diffusers = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                             sampler="dpmpp_2m", use_karras_sigmas=True, rng="torch", height=16, width=16)
    assert not np.array_equal(np.asarray(ref), np.asarray(diffusers))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == a.read_bytes(), err
    k = tmp_path / "k.png"                                         # diffusers' Karras: kept as it was
    gen(capsys, model, k, "--seed", 4, "--sampler", "dpmpp_2m", "--karras", "--rng", "torch")
    assert params_of(k)["fields"]["Timestep spacing"] == "leading"
    assert not np.array_equal(np.asarray(Image.open(k)), np.asarray(Image.open(a)))
    rc, _, err = run(["txt2img", "--from-png", k, "--model", model, "-o", tmp_path / "k2.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "k2.png").read_bytes() == k.read_bytes(), err
    # A1111's PNGs: no field is Uniform; an option of the other kind replaces the stored schedule
    for sampler, extra, expected in (("Euler a", "", "uniform"), ("DPM++ 2M", ", Schedule type: SGM Uniform", "sgm_uniform"),
                                     ("DPM++ 2M SDE Exponential", "", "exponential"), ("DDIM", "", None)):
        path = tmp_path / "a1111.png"
        Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(
            f"{PROMPT}\nNegative prompt: \nSteps: 3, Sampler: {sampler}{extra}, CFG scale: 7, Seed: 5, Size: 16x16"))
        assert settings_from_png(str(path), "txt2img").get("schedule_type") == expected, sampler
    rc, _, err = run(["txt2img", "--from-png", path.with_name("a1111.png"), "--model", model, "-o", tmp_path / "c.png",
                      "--quiet", "--sampler", "euler", "--karras"], capsys)
    f = params_of(tmp_path / "c.png")["fields"]
    assert rc == 0 and f["Schedule type"] == "Karras" and f["Timestep spacing"] == "leading", err
    bad = tmp_path / "bad.png"
    Image.new("RGB", (16, 16)).save(bad, pnginfo=png_info(
        f"{PROMPT}\nNegative prompt: \nSteps: 3, Sampler: Euler, Schedule type: Karras Exponential, CFG scale: 7, Seed: 5, Size: 16x16"))
    rc, _, err = run(["txt2img", "--from-png", bad, "--model", model, "-o", tmp_path / "d.png", "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "schedule type 'Karras Exponential' is not one npsd has" in err \
        and "give --schedule-type" in err, err
    rc, _, err = run(["txt2img", "--from-png", bad, "--model", model, "-o", tmp_path / "d.png", "--quiet",
                      "--schedule-type", "normal"], capsys)
    assert rc == 0 and params_of(tmp_path / "d.png")["fields"]["Schedule type"] == "Normal", err
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "e.png", "--schedule-type", "karras",
                      "--karras", "--timestep-spacing", "linspace"], capsys)
    assert rc == 2 and err == ("npsd: error: --schedule-type sets A1111's sigmas itself; drop --karras and "
                               "--timestep-spacing\n"), err
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "e.png", "--schedule-type", "karras",
                      "--sampler", "ddim"], capsys)
    assert rc == 2 and err.startswith("npsd: error: --schedule-type applies to the samplers euler, euler_a") \
        and err.endswith(", not to ddim\n") and err.count("\n") == 1, err
    assert not (tmp_path / "e.png").exists()


def test_hires_resize_and_prompts_options_and_png_fields(model, tmp_path, capsys):
    """--hires-resize and --hires-(negative-)prompt run the pipeline's Hires(resize=..., prompt=...,
    negative_prompt=...) and write A1111's fields (Hires resize instead of Hires upscale; the prompts
    where they differ); --from-png remakes it exactly, also from an A1111 PNG; bad values are one line."""
    from npsd import load
    from npsd.hires import Hires
    from npsd.pngmeta import png_info
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--sampler", "euler_a", "--schedule-type", "automatic", "--rng", "torch",
        "--hires-resize", "24x20", "--hires-steps", 2, "--hires-prompt", "a blue square, at night",
        "--hires-negative-prompt", "dark")
    f = params_of(a)["fields"]
    assert Image.open(a).size == (24, 20) and "Hires upscale" not in f, f
    assert (f["Hires resize"], f["Hires prompt"], f["Hires negative prompt"]) == ("24x20", "a blue square, at night",
                                                                                  "dark"), f
    pipe = load(str(model))
    ref = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                       sampler="euler_a", schedule_type="automatic", rng="torch", prompt_syntax="a1111", height=16,
                       width=16, hires=Hires(steps=2, resize=(24, 20), prompt="a blue square, at night",
                                             negative_prompt="dark"))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == a.read_bytes(), err
    text = (f"{PROMPT}\nNegative prompt: \nSteps: {f['Steps']}, Sampler: Euler a, CFG scale: {f['CFG scale']}, "
            f'Seed: 4, Size: 16x16, Denoising strength: 0.7, Hires resize: 24x20, Hires steps: 2, '
            f'Hires upscaler: Latent, Hires prompt: "a blue square, at night", Hires negative prompt: dark, RNG: CPU')
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (24, 20)).save(a1111, pnginfo=png_info(text))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "c.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(ref))
    # --hires-scale replaces a stored resize
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "d.png", "--quiet",
                      "--hires-scale", 2], capsys)
    assert rc == 0 and Image.open(tmp_path / "d.png").size == (32, 32), err
    Image.new("RGB", (24, 20)).save(a1111, pnginfo=png_info(text.replace("24x20", "0x0")))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "e.png", "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "the stored Hires resize '0x0': hires resize must be (width, height)" \
        in err and "not both 0" in err, err
    for args, message in ((["--hires-resize", "0x0"], "whole numbers from 0 to 16384 (0: from the other side and the "
                                                       "aspect ratio), not both 0, got (0, 0)"),
                          (["--hires-resize", "big"], "expected WIDTHxHEIGHT"),
                          (["--hires-prompt", "x"], "--hires-prompt is the hires fix's; give --hires-scale or "
                                                    "--hires-resize")):
        rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "f.png"] + args, capsys)
        assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_hires_sampler_and_schedule_type_options_and_png_fields(model, tmp_path, capsys):
    """--hires-sampler and --hires-schedule-type: the pipeline's Hires(sampler=..., schedule_type=...),
    written as A1111 writes them (Hires sampler where it is another, Hires schedule type where the
    second pass's resolved schedule is another); --from-png remakes it, also from an A1111 PNG (whose
    Brownian hires sampler gets Brownian noise); a stored name npsd lacks is one line."""
    from npsd import load
    from npsd.hires import Hires
    from npsd.pngmeta import png_info
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--sampler", "euler_a", "--schedule-type", "automatic", "--rng", "torch",
        "--hires-scale", 1.5, "--hires-steps", 2, "--hires-sampler", "dpmpp_2m", "--hires-schedule-type", "exponential")
    f = params_of(a)["fields"]
    assert (f["Hires sampler"], f["Hires schedule type"]) == ("DPM++ 2M", "Exponential"), f
    pipe = load(str(model))
    ref = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                       sampler="euler_a", schedule_type="automatic", rng="torch", prompt_syntax="a1111", height=16,
                       width=16, hires=Hires(1.5, steps=2, sampler="dpmpp_2m", schedule_type="exponential"))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == a.read_bytes(), err
    # A1111's PNG: DPM++ 2M SDE in the second pass draws A1111's Brownian noise
    text = (f"{PROMPT}\nNegative prompt: \nSteps: {f['Steps']}, Sampler: Euler a, CFG scale: {f['CFG scale']}, "
            f"Seed: 4, Size: 16x16, Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 2, "
            f"Hires upscaler: Latent, Hires sampler: DPM++ 2M SDE, Hires schedule type: Karras, RNG: CPU")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (24, 24)).save(a1111, pnginfo=png_info(text))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "c.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err
    sde = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                       sampler="euler_a", schedule_type="uniform", rng="torch", prompt_syntax="a1111", height=16,
                       width=16, sde_noise="brownian",
                       hires=Hires(1.5, steps=2, sampler="dpmpp_2m_sde", schedule_type="karras"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(sde))
    g = params_of(tmp_path / "c.png")["fields"]
    assert (g["Hires sampler"], g["Hires schedule type"], g["SDE noise"]) == ("DPM++ 2M SDE", "Karras", "Brownian"), g
    Image.new("RGB", (24, 24)).save(a1111, pnginfo=png_info(text.replace("DPM++ 2M SDE", "Restart")))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "d.png", "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "the stored hires sampler 'Restart' is not one npsd has" in err \
        and "give --hires-sampler" in err, err
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "d.png", "--quiet",
                      "--hires-sampler", "euler"], capsys)
    assert rc == 0 and params_of(tmp_path / "d.png")["fields"]["Hires sampler"] == "Euler", err


def test_ngms_option_and_png_field(model, tmp_path, capsys):
    """--ngms: the pipeline's negative_guidance_min_sigma, written as A1111's "NGMS" field and remade by
    --from-png (also from an A1111 PNG); without A1111's schedules it is one line."""
    from npsd import load
    from npsd.pngmeta import png_info
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--sampler", "euler_a", "--schedule-type", "automatic", "--rng", "torch",
        "--ngms", 2.5, "--steps", 6)
    f = params_of(a)["fields"]
    assert f["NGMS"] == "2.5" and f["Steps"] == "6", f
    pipe = load(str(model))
    ref = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                       sampler="euler_a", schedule_type="automatic", rng="torch", prompt_syntax="a1111", height=16,
                       width=16, negative_guidance_min_sigma=2.5)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    plain = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                         sampler="euler_a", schedule_type="automatic", rng="torch", prompt_syntax="a1111", height=16,
                         width=16)
    assert not np.array_equal(np.asarray(ref), np.asarray(plain))
    text = (f"{PROMPT}\nNegative prompt: \nSteps: {f['Steps']}, Sampler: Euler a, CFG scale: {f['CFG scale']}, "
            f"Seed: 4, Size: 16x16, NGMS: 2.5, RNG: CPU")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=png_info(text))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err
    uniform = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                           sampler="euler_a", schedule_type="uniform", rng="torch", prompt_syntax="a1111", height=16,
                           width=16, negative_guidance_min_sigma=2.5)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(uniform))
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "c.png", "--ngms", 2, "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "negative_guidance_min_sigma is A1111's" in err, err


def test_tiling_option_and_png_field(model, tmp_path, capsys):
    """--tiling: the pipeline's tiling=True, written as A1111's "Tiling: True" and remade by --from-png
    (also from an A1111 PNG, in img2img too); --no-tiling turns a stored one off; a stored value that is
    not True or False is one line."""
    from npsd import load
    from npsd.pngmeta import png_info
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--tiling")
    f = params_of(a)["fields"]
    assert f["Tiling"] == "True", f
    pipe = load(str(model))
    kw = dict(num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
              prompt_syntax="a1111", height=16, width=16)
    tiled, plain = pipe.txt2img(PROMPT, tiling=True, **kw), pipe.txt2img(PROMPT, **kw)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(tiled))
    assert not np.array_equal(np.asarray(tiled), np.asarray(plain))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == a.read_bytes(), err
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "c.png", "--quiet",
                      "--no-tiling"], capsys)
    assert rc == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(plain)), err
    assert "Tiling" not in params_of(tmp_path / "c.png")["fields"]
    image = tmp_path / "in.png"
    make_image(image)
    text = (f"{PROMPT}\nNegative prompt: \nSteps: 3, Sampler: Euler, CFG scale: {f['CFG scale']}, Seed: 5, "
            f"Size: 16x16, Denoising strength: 0.6, RNG: CPU, Tiling: True")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=png_info(text))
    rc, _, err = run(["img2img", "--from-png", a1111, "--image", image, "--model", model, "-o", tmp_path / "d.png",
                      "--quiet"], capsys)
    assert rc == 0 and err == "", err
    ref = pipe.img2img(PROMPT, str(image), strength=0.6, num_inference_steps=3, guidance_scale=float(f["CFG scale"]),
                       seed=5, sampler="euler", schedule_type="uniform", rng="torch", prompt_syntax="a1111",
                       tiling=True)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), np.asarray(ref))
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=png_info(text.replace("Tiling: True", "Tiling: yes")))
    rc, _, err = run(["img2img", "--from-png", a1111, "--image", image, "--model", model, "-o", tmp_path / "e.png",
                      "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "the stored 'Tiling' is 'yes'" in err, err


def test_schedule_options_and_png_fields(model, tmp_path, capsys):
    """--schedule-sigma-min, --schedule-sigma-max, --schedule-rho, --discard-penultimate-sigma and
    --beta-schedule-alpha / -beta: the pipeline's schedule_options, written as A1111 1.10's get_sigmas
    writes them (only where they apply; the option's float as Python prints it) and remade by
    --from-png, also from an A1111 PNG; without a schedule type they are one line."""
    from npsd import load, schedulers as S
    from npsd.pngmeta import png_info
    pipe = load(str(model))
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--sampler", "dpmpp_2m", "--schedule-type", "karras", "--rng", "torch",
        "--schedule-sigma-min", 0.1, "--schedule-sigma-max", 10, "--schedule-rho", 5, "--discard-penultimate-sigma")
    f = params_of(a)["fields"]
    assert (f["Schedule min sigma"], f["Schedule max sigma"], f["Schedule rho"], f["Discard penultimate sigma"]) == \
        ("0.1", "10.0", "5.0", "True") and "Beta schedule alpha" not in f, f
    kw = dict(num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4, sampler="dpmpp_2m",
              schedule_type="karras", rng="torch", prompt_syntax="a1111", height=16, width=16)
    ref = pipe.txt2img(PROMPT, schedule_options=S.ScheduleOptions(0.1, 10.0, 5.0, True), **kw)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    assert not np.array_equal(np.asarray(ref), np.asarray(pipe.txt2img(PROMPT, **kw)))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and err == "" and np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(ref)), err
    text = (f"{PROMPT}\nNegative prompt: \nSteps: {f['Steps']}, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: "
            f"{f['CFG scale']}, Seed: 4, Size: 16x16, Schedule min sigma: 0.1, Schedule max sigma: 10.0, "
            f"Schedule rho: 5.0, Discard penultimate sigma: True, RNG: CPU")       # as A1111 writes them
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=png_info(text))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "c.png", "--quiet"], capsys)
    assert rc == 0 and err == "" and np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(ref)), err
    # where they apply: rho not for Beta, whose alpha and beta A1111 always writes; no override with
    # "Automatic" on a sampler without its own schedule (k-diffusion's get_sigmas), nor at the model's
    # own sigma_min; the discard where the sampler does not discard by itself
    own_min = S.a1111_model_ends(S.sigma_table(pipe.config))[0]
    for extra, written, absent in [
            (("--schedule-type", "beta", "--schedule-rho", 3, "--beta-schedule-alpha", 0.5),
             {"Beta schedule alpha": "0.5", "Beta schedule beta": "0.6"}, ("Schedule rho",)),
            (("--schedule-type", "automatic", "--schedule-sigma-min", 0.1, "--discard-penultimate-sigma"),
             {"Discard penultimate sigma": "True"}, ("Schedule min sigma",)),
            (("--schedule-type", "uniform", "--schedule-sigma-min", 0.1), {"Schedule min sigma": "0.1"}, ()),
            (("--schedule-type", "karras", "--schedule-sigma-min", repr(own_min), "--sampler", "dpm2",
              "--discard-penultimate-sigma"), {}, ("Schedule min sigma", "Discard penultimate sigma"))]:
        out = tmp_path / "d.png"
        gen(capsys, model, out, "--sampler", "euler", *extra, "--overwrite")
        f = params_of(out)["fields"]
        assert {k: f.get(k) for k in written} == written and not any(k in f for k in absent), (extra, f)
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "e.png", "--schedule-rho", 3, "--quiet"],
                     capsys)
    assert rc != 0 and err.count("\n") == 1 and "--schedule-rho is a setting of A1111's schedule types" in err, err


def test_token_merging_options_and_png_fields(model, tmp_path, capsys):
    """--token-merging-ratio and --hires-token-merging-ratio: the pipeline's token_merging_ratio and the
    Hires field, written as A1111's "Token merging ratio" and "Token merging ratio hr" and remade by
    --from-png; without the hr field the hires pass runs with the first pass's ratio (A1111's
    get_token_merging_ratio(for_hr=True)); a ratio out of range is one line."""
    from npsd import load
    from npsd.hires import Hires
    from npsd.pngmeta import png_info
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--token-merging-ratio", 0.5, "--hires-scale", 2,
        "--hires-token-merging-ratio", 0.3, "--steps", 3, "--hires-steps", 2)
    f = params_of(a)["fields"]
    assert (f["Token merging ratio"], f["Token merging ratio hr"]) == ("0.5", "0.3"), f
    pipe = load(str(model))
    kw = dict(num_inference_steps=3, guidance_scale=float(f["CFG scale"]), seed=4, prompt_syntax="a1111", height=16,
              width=16, token_merging_ratio=0.5)
    ref = pipe.txt2img(PROMPT, hires=Hires(2, steps=2, token_merging_ratio=0.3), **kw)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    assert not np.array_equal(np.asarray(ref), np.asarray(pipe.txt2img(PROMPT, hires=Hires(2, steps=2), **kw)))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == a.read_bytes(), err
    # without the hr field (A1111 writes it whenever the first pass merges; a text written by hand may
    # leave it out) the hires pass takes the first pass's ratio, as A1111's for_hr=True falls back
    text = read_parameters(a).replace("Token merging ratio hr: 0.3, ", "")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (32, 32)).save(a1111, pnginfo=png_info(text))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "c.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")),
                          np.asarray(pipe.txt2img(PROMPT, hires=Hires(2, steps=2, token_merging_ratio=0.5), **kw)))
    assert params_of(tmp_path / "c.png")["fields"]["Token merging ratio hr"] == "0.5"
    Image.new("RGB", (32, 32)).save(a1111, pnginfo=png_info(text.replace("ratio: 0.5", "ratio: 1.5")))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "d.png", "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "the stored 'Token merging ratio' must be a number in [0, 0.9]" in err, err
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "e.png", "--token-merging-ratio", "0.95"],
                     capsys)
    assert rc != 0 and err.count("\n") == 1 and "--token-merging-ratio: the ratio must be a number in [0, 0.9]" in err, err


def test_emphasis_option_and_png_field(model, tmp_path, capsys):
    """--emphasis: the pipeline's emphasis=, written as A1111's "Emphasis" field (its labels) and remade
    by --from-png, also from an A1111 PNG; an emphasis npsd lacks is one line."""
    from npsd import load
    from npsd.pngmeta import png_info
    prompt = "a (red:1.5) circle on a [blue] background"
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--emphasis", "no_norm", prompt=prompt)
    f = params_of(a)["fields"]
    assert f["Emphasis"] == "No norm", f
    pipe = load(str(model))
    kw = dict(num_inference_steps=2, guidance_scale=float(f["CFG scale"]), seed=4, prompt_syntax="a1111", height=16,
              width=16)
    ref = pipe.txt2img(prompt, emphasis="no_norm", **kw)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    assert not np.array_equal(np.asarray(ref), np.asarray(pipe.txt2img(prompt, **kw)))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == a.read_bytes(), err
    a1111 = tmp_path / "a1111.png"
    stored = f"{prompt}\nNegative prompt: \nSteps: 2, Sampler: DDIM, CFG scale: {f['CFG scale']}, Seed: 4, Size: 16x16, Emphasis: Ignore"
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=png_info(stored))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "c.png", "--quiet"], capsys)
    assert rc == 0 and params_of(tmp_path / "c.png")["fields"]["Emphasis"] == "Ignore", err
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=png_info(stored.replace("Ignore", "Strong")))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "d.png", "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "the stored 'Emphasis' is 'Strong', not one npsd has" in err, err


def test_hires_fix_options_and_png_fields(model, tmp_path, capsys):
    """--hires-scale runs the pipeline's hires fix and writes A1111's fields (Size: the first pass's,
    Denoising strength, Hires upscale / steps / upscaler); --from-png remakes it exactly, also from an
    A1111 PNG; an upscaler npsd lacks is one line naming the option; options that record one pass
    are refused before the model loads."""
    from npsd import load
    from npsd.hires import Hires
    from npsd.pngmeta import png_info
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 4, "--sampler", "euler_a", "--schedule-type", "automatic", "--rng", "torch",
        "--hires-scale", 1.5, "--hires-steps", 3, "--hires-upscaler", "latent_bicubic", "--hires-strength", 0.6)
    f = params_of(a)["fields"]
    assert Image.open(a).size == (24, 24) and f["Size"] == "16x16", f
    assert (f["Hires upscale"], f["Hires steps"], f["Hires upscaler"], f["Denoising strength"]) == \
        ("1.5", "3", "Latent (bicubic)", "0.6")
    pipe = load(str(model))
    ref = pipe.txt2img(PROMPT, num_inference_steps=int(f["Steps"]), guidance_scale=float(f["CFG scale"]), seed=4,
                       sampler="euler_a", schedule_type="automatic", rng="torch", prompt_syntax="a1111", height=16,
                       width=16, hires=Hires(1.5, "latent_bicubic", 3, 0.6))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == a.read_bytes(), err
    text = (f"{PROMPT}\nNegative prompt: \nSteps: {f['Steps']}, Sampler: Euler a, CFG scale: {f['CFG scale']}, "
            f"Seed: 4, Size: 16x16, Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 3, "
            f"Hires upscaler: Latent (bicubic), RNG: CPU")
    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (24, 24)).save(a1111, pnginfo=png_info(text))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "c.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(ref))
    Image.new("RGB", (24, 24)).save(a1111, pnginfo=png_info(text.replace("Latent (bicubic)", "R-ESRGAN 4x+")))
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "d.png", "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "hires upscaler 'R-ESRGAN 4x+' is not one npsd has" in err \
        and "give --hires-upscaler" in err, err
    rc, _, err = run(["txt2img", "--from-png", a1111, "--model", model, "-o", tmp_path / "d.png", "--quiet",
                      "--hires-upscaler", "latent"], capsys)
    assert rc == 0 and params_of(tmp_path / "d.png")["fields"]["Hires upscaler"] == "Latent", err
    for option in (["--save-steps", tmp_path / "steps"], ["--attention-maps", tmp_path / "maps"],
                   ["--trace", tmp_path / "t.safetensors"]):
        rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "e.png", "--hires-scale", 2] + option,
                         capsys)
        assert rc == 2 and err == f"npsd: error: {option[0]} records one pass; give it without --hires-scale\n", err
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "e.png", "--hires-scale", 2,
                      "--hires-strength", 0, "--quiet"], capsys)
    assert rc != 0 and err == ("npsd: error: the hires pass's strength 0.0 with 50 steps runs no step (int(steps * "
                               "strength) = 0); raise the hires strength or steps\n"), err
    assert not (tmp_path / "e.png").exists()
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "e.png", "--hires-scale", 0.5], capsys)
    assert rc == 2 and "--hires-scale" in err and err.count("\n") == 1, err
    rc, _, err = run(["img2img", PROMPT, "--image", a, "--model", model, "-o", tmp_path / "e.png", "--hires-scale", 2],
                     capsys)
    assert rc == 2 and "unrecognized arguments: --hires-scale" in err, err


def test_from_png_of_a1111s_dpmpp_2m_sde_takes_its_brownian_noise(model, tmp_path, capsys):
    """A1111 draws the step noise of DPM++ 2M SDE (also DPM++ SDE and 3M SDE) from a Brownian tree of
    the seed and writes no field for it: --from-png of its PNG runs --sde-noise brownian (written "SDE noise: Brownian"), with another
    --sampler the generator's noise; npsd's own PNG keeps what it was made with."""
    from npsd.pngmeta import png_info
    text = f"{PROMPT}\nNegative prompt: \nSteps: 3, Sampler: DPM++ 2M SDE Karras, CFG scale: 7, Seed: 5, Size: 16x16"
    path = tmp_path / "sde.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(text))
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "a.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err
    f = params_of(tmp_path / "a.png")["fields"]
    assert (f["Sampler"], f["Schedule type"], f["SDE noise"]) == ("DPM++ 2M SDE", "Karras", "Brownian")
    same = tmp_path / "same.png"
    gen(capsys, model, same, "--seed", 5, "--steps", 3, "--sampler", "dpmpp_2m_sde", "--schedule-type", "karras",
        "--guidance-scale", 7, "--sde-noise", "brownian")
    assert np.array_equal(np.asarray(Image.open(same)), np.asarray(Image.open(tmp_path / "a.png")))
    drawn = tmp_path / "drawn.png"
    gen(capsys, model, drawn, "--seed", 5, "--steps", 3, "--sampler", "dpmpp_2m_sde", "--karras", "--guidance-scale", 7)
    assert "SDE noise" not in params_of(drawn)["fields"]
    assert not np.array_equal(np.asarray(Image.open(drawn)), np.asarray(Image.open(same)))
    rc, _, err = run(["txt2img", "--from-png", drawn, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "b.png").read_bytes() == drawn.read_bytes(), err
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "c.png", "--quiet",
                      "--sampler", "euler"], capsys)
    assert rc == 0 and "SDE noise" not in params_of(tmp_path / "c.png")["fields"], err
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "d.png", "--quiet", "--sampler", "euler",
                      "--sde-noise", "brownian"], capsys)
    assert rc == 2 and "--sde-noise brownian applies to --sampler (or --hires-sampler) dpmpp_2m_sde, dpmpp_sde, " \
        "dpmpp_3m_sde, not to euler" in err, err
    path.unlink()                                                       # A1111's DPM++ SDE: the same
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(text.replace("DPM++ 2M SDE", "DPM++ SDE")))
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "e.png", "--quiet"], capsys)
    f = params_of(tmp_path / "e.png")["fields"]
    assert rc == 0 and (f["Sampler"], f["Schedule type"], f["SDE noise"]) == ("DPM++ SDE", "Karras", "Brownian"), err


def test_from_png_with_dpmpp_2s_a_karras(model, tmp_path, capsys):
    """A1111's "DPM++ 2S a Karras" is npsd's dpmpp_2s_a with Karras sigmas; the re-made PNG names it as
    A1111 does, and runs the sampler (another image than DPM2 a's, the same sigmas and midpoints)."""
    from npsd.pngmeta import png_info
    path = tmp_path / "2s.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(
        f"{PROMPT}\nNegative prompt: \nSteps: 3, Sampler: DPM++ 2S a Karras, CFG scale: 7, Seed: 5, Size: 16x16"))
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "a.png", "--quiet"], capsys)
    assert rc == 0, err
    f = params_of(tmp_path / "a.png")["fields"]
    assert (f["Sampler"], f["Schedule type"], f["Steps"]) == ("DPM++ 2S a", "Karras", "3")
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "b.png", "--quiet",
                      "--sampler", "dpm2_a"], capsys)
    assert rc == 0, err
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_from_png_with_a_sampler_npsd_lacks(model, tmp_path, capsys):
    from npsd.pngmeta import png_info
    path = tmp_path / "sde.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(
        f"{PROMPT}\nNegative prompt: \nSteps: 1, Sampler: Restart, CFG scale: 7, Seed: 5, Size: 16x16, Schedule type: Karras"))
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "a.png", "--quiet"], capsys)
    assert rc == 2 and "'Restart' is not one npsd has" in err and "give --sampler" in err
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "a.png", "--quiet",
                      "--sampler", "dpmpp_2m"], capsys)
    assert rc == 0, err
    f = params_of(tmp_path / "a.png")["fields"]
    assert (f["Sampler"], f["Schedule type"], f["Seed"], f["Size"]) == ("DPM++ 2M", "Karras", "5", "16x16")



def test_rng_torch_is_recorded_and_reproduced(model, tmp_path, capsys):
    """--rng torch: the PNG says "RNG: CPU" (A1111's name for torch's CPU generator), the pixels are
    those of the API with rng="torch", and --from-png re-makes the same file."""
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 21, "--sampler", "euler_a", "--rng", "torch")
    assert params_of(a)["fields"]["RNG"] == "CPU"
    api = npsd.load(str(model)).txt2img(PROMPT, seed=21, sampler="euler_a", rng="torch", height=16, width=16,
                                        num_inference_steps=2)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(api))
    b = tmp_path / "b.png"
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", b, "--quiet"], capsys)
    assert rc == 0, err
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.png"                                          # the default: npsd's own numbers
    gen(capsys, model, c, "--seed", 21, "--sampler", "euler_a")
    assert params_of(c)["fields"]["RNG"] == "numpy"
    assert np.asarray(Image.open(a)).tobytes() != np.asarray(Image.open(c)).tobytes()


def test_from_png_with_a_noise_source_npsd_lacks(model, tmp_path, capsys):
    from npsd.pngmeta import png_info
    path = tmp_path / "gpu.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(
        f"{PROMPT}\nNegative prompt: \nSteps: 1, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 16x16, RNG: GPU"))
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "a.png", "--quiet"], capsys)
    assert rc == 2 and "'GPU' generator, which npsd cannot reproduce" in err and "give --rng" in err
    rc, _, err = run(["txt2img", "--from-png", path, "--model", model, "-o", tmp_path / "a.png", "--quiet",
                      "--rng", "torch"], capsys)
    assert rc == 0, err
    assert params_of(tmp_path / "a.png")["fields"]["RNG"] == "CPU"
    rc, _, err = run(["txt2img", PROMPT, "--rng", "cuda"], capsys)
    assert rc == 2 and "--rng: invalid choice: 'cuda'" in err



@pytest.mark.parametrize("sampler", ["pndm", "lms", "dpmpp_2m_sde", "unipc", "dpm2", "dpm2_a", "lcm", "deis"])
def test_every_sampler_is_written_and_read_back_by_its_a1111_name(model, tmp_path, capsys, sampler):
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 3, "--sampler", sampler, "--rng", "torch")
    f = params_of(a)["fields"]
    assert f["Sampler"] == A1111_SAMPLERS[sampler]
    b = tmp_path / "b.png"
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", b, "--quiet"], capsys)
    assert rc == 0, err
    assert a.read_bytes() == b.read_bytes()


def test_prediction_type_and_guidance_rescale_options(model, tmp_path, capsys):
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 3, "--prediction-type", "v_prediction", "--guidance-rescale", 0.7)
    f = params_of(a)["fields"]
    assert (f["Prediction type"], f["Guidance rescale"]) == ("v_prediction", "0.7")
    api = npsd.load(str(model)).txt2img(PROMPT, seed=3, height=16, width=16, num_inference_steps=2,
                                        prediction_type="v_prediction", guidance_rescale=0.7)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(api))
    b = tmp_path / "b.png"
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", b, "--quiet"], capsys)
    assert rc == 0 and a.read_bytes() == b.read_bytes(), err
    c = tmp_path / "c.png"                                            # the defaults are not written
    gen(capsys, model, c, "--seed", 3)
    assert "Prediction type" not in params_of(c)["fields"] and "Guidance rescale" not in params_of(c)["fields"]
    rc, _, err = run(["txt2img", PROMPT, "--guidance-rescale", "1.5"], capsys)
    assert rc == 2 and "--guidance-rescale" in err


# --- generation -----------------------------------------------------------------------------------

def test_txt2img_png_carries_its_parameters(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    stdout, stderr = gen(capsys, model, out, "--seed", 42, "--negative-prompt", "blurry, dark", "--sampler", "ddim")
    assert stdout == f"{out}\n" and stderr == ""                   # --quiet: only the path
    img = Image.open(out)
    assert img.size == (16, 16) and img.mode == "RGB"
    p = params_of(out)
    assert p["prompt"] == PROMPT and p["negative_prompt"] == "blurry, dark"
    f = p["fields"]
    assert (f["Steps"], f["Sampler"], f["CFG scale"], f["Seed"], f["Size"]) == ("2", "DDIM", "7.5", "42", "16x16")
    assert f["Model"] == "tiny-sd" and f["Model hash"] == sha10(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors"))
    assert f["npsd version"] == npsd.__version__ and f["Pipeline"] == "txt2img"
    assert sorted(os.listdir(tmp_path)) == ["a.png"]               # nothing else left behind


def test_same_seed_gives_byte_identical_pngs(model, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    gen(capsys, model, a, "--seed", 7, "--sampler", "euler_a")      # a sampler that draws noise each step
    gen(capsys, model, b, "--seed", 7, "--sampler", "euler_a")
    assert a.read_bytes() == b.read_bytes()
    gen(capsys, model, c, "--seed", 8, "--sampler", "euler_a")
    assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(c), np.int16)).max() > 0


def test_a_64_bit_seed_as_torch_and_comfyui_take_it(model, tmp_path, capsys):
    """torch.Generator.manual_seed takes seeds up to 2**64 - 1 and its MT19937 reads their low 32 bits,
    so with --rng torch the seed 2**64 - 1 draws the noise of 2**32 - 1; the PNG keeps the seed given,
    and --from-png makes the same file again."""
    big, low = tmp_path / "big.png", tmp_path / "low.png"
    gen(capsys, model, big, "--seed", 2**64 - 1, "--rng", "torch", "--sampler", "euler_a")
    gen(capsys, model, low, "--seed", 2**32 - 1, "--rng", "torch", "--sampler", "euler_a")
    assert params_of(big)["fields"]["Seed"] == "18446744073709551615"
    assert np.array_equal(np.asarray(Image.open(big)), np.asarray(Image.open(low)))
    again = tmp_path / "again.png"
    rc, _, err = run(["txt2img", "--from-png", big, "--model", model, "-o", again, "--quiet"], capsys)
    assert rc == 0, err
    assert again.read_bytes() == big.read_bytes()
    other, other_low = tmp_path / "other.png", tmp_path / "other-low.png"   # NumPy's generator reads the whole seed
    gen(capsys, model, other, "--seed", 2**64 - 1, "--sampler", "euler_a")
    gen(capsys, model, other_low, "--seed", 2**32 - 1, "--sampler", "euler_a")
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(other_low)))


def test_random_seed_is_printed_and_used_in_the_name(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(["txt2img", PROMPT, "--model", model] + SMALL, capsys)
    assert rc == 0, err
    seed = int(err.split("seed: ")[1].split()[0])
    assert out == f"npsd-{seed}.png\n" and params_of(tmp_path / f"npsd-{seed}.png")["fields"]["Seed"] == str(seed)
    assert "s/step" in err                                         # the progress bar shows time per step


def test_num_images_get_numbered_names(model, tmp_path, capsys):
    out = tmp_path / "batch.png"
    stdout, _ = gen(capsys, model, out, "--seed", 3, "--num-images", 2)
    names = [tmp_path / "batch-1.png", tmp_path / "batch-2.png"]
    assert stdout.split() == [str(n) for n in names]
    f1, f2 = params_of(names[0])["fields"], params_of(names[1])["fields"]
    assert (f1["Batch size"], f1["Batch pos"], f2["Batch pos"]) == ("2", "1", "2")
    assert names[0].read_bytes() != names[1].read_bytes()


def test_from_png_reproduces_the_image_and_options_override(model, tmp_path, capsys):
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 11, "--negative-prompt", "dark", "--sampler", "dpmpp_2m", "--karras",
        "--guidance-scale", 5, "--clip-skip", 1, "--timestep-spacing", "trailing")
    assert params_of(a)["fields"]["Schedule type"] == "Karras" and params_of(a)["fields"]["Clip skip"] == "2"
    b = tmp_path / "b.png"
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", b, "--quiet"], capsys)
    assert rc == 0, err
    assert a.read_bytes() == b.read_bytes()                        # same pixels, same parameters
    c = tmp_path / "c.png"
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", c, "--quiet", "--steps", 1, "--seed", 12], capsys)
    assert rc == 0, err
    f = params_of(c)["fields"]
    assert (f["Steps"], f["Seed"], f["Sampler"], f["CFG scale"]) == ("1", "12", "DPM++ 2M", "5")
    # one image of a batch is re-made alone
    gen(capsys, model, tmp_path / "batch.png", "--seed", 5, "--num-images", 2)
    d = tmp_path / "d.png"
    rc, _, err = run(["txt2img", "--from-png", tmp_path / "batch-2.png", "--model", model, "-o", d, "--quiet"], capsys)
    assert rc == 0, err
    assert d.read_bytes() == (tmp_path / "batch-2.png").read_bytes()


def test_img2img_and_inpaint(model, tmp_path, capsys):
    image, mask = make_image(tmp_path / "in.png"), make_mask(tmp_path / "mask.png")
    a = tmp_path / "img2img.png"
    gen(capsys, model, a, "--image", image, "--strength", 0.5, "--seed", 1, "--steps", 4, mode="img2img")
    f = params_of(a)["fields"]
    assert (f["Denoising strength"], f["Pipeline"], f["Steps"]) == ("0.5", "img2img", "4")
    b = tmp_path / "inpaint.png"
    gen(capsys, model, b, "--image", image, "--mask", mask, "--mask-blur", 2, "--seed", 1, mode="inpaint")
    f = params_of(b)["fields"]
    assert (f["Denoising strength"], f["Mask blur"], f["Pipeline"]) == ("1", "2", "inpaint")
    # the kept region stays close to the input (the VAE round trip of a random tiny VAE is not exact,
    # so only check that the repainted region moved more than the kept one)
    src, res = (np.asarray(Image.open(p), np.float32) for p in (image, b))
    m = np.asarray(Image.open(mask)) > 127
    assert np.abs(res - src)[m].mean() != np.abs(res - src)[~m].mean()
    # --from-png on an img2img image needs the same subcommand and --image
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "x.png"], capsys)
    assert rc == 2 and "made by img2img" in err and err.count("\n") == 1
    c = tmp_path / "again.png"
    rc, _, err = run(["img2img", "--from-png", a, "--image", image, "--model", model, "-o", c, "--quiet"], capsys)
    assert rc == 0, err
    assert c.read_bytes() == a.read_bytes()
    # a grayscale input of another size is converted and resized, with a one-line note
    gray = make_image(tmp_path / "gray.png", size=20, mode="L")
    rc, _, err = run(["img2img", PROMPT, "--image", gray, "--model", model, "-o", tmp_path / "g.png", "--quiet",
                      "--steps", 2, "--height", 16, "--width", 16], capsys)
    assert rc == 0 and err.strip().startswith("npsd: warning: image of size 20x20 resized to 16x16"), err


def test_a1111_inpainting_and_its_png(model, tmp_path, capsys):
    """--schedule-type makes inpainting A1111's (npsd/a1111_inpaint.py): --masked-content is written as
    A1111's "Masked content" field, --from-png makes the same file, the kept region is the input's
    pixels; --masked-content without an A1111 schedule is one line."""
    image, mask = make_image(tmp_path / "in.png"), make_mask(tmp_path / "mask.png")
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--image", image, "--mask", mask, "--mask-blur", 1, "--seed", 3, "--steps", 3,
        "--sampler", "euler_a", "--schedule-type", "automatic", "--masked-content", "latent nothing", mode="inpaint")
    f = params_of(a)["fields"]
    assert (f["Masked content"], f["Mask blur"], f["Schedule type"]) == ("latent nothing", "1", "Uniform")
    from npsd.a1111_inpaint import soft_mask
    kept = soft_mask(Image.open(mask), 1) == 0
    assert kept.sum() > 50 and np.array_equal(np.asarray(Image.open(a))[kept], np.asarray(Image.open(image))[kept])
    b = tmp_path / "b.png"
    rc, _, err = run(["inpaint", "--from-png", a, "--image", image, "--mask", mask, "--model", model, "-o", b,
                      "--quiet"], capsys)
    assert rc == 0, err
    assert b.read_bytes() == a.read_bytes()
    rc, _, err = run(["inpaint", PROMPT, "--image", image, "--mask", mask, "--model", model, "-o", tmp_path / "c.png",
                      "--masked-content", "fill", "--quiet"], capsys)
    assert rc == 2 and "masked_content" in err and err.count("\n") == 1, err
    # "only masked" on a 24x20 image: its PNG has the image's size, states the 16x16 it sampled at, and
    # --from-png remakes it
    image = make_image(tmp_path / "big.png", size=24)
    mask = make_mask(tmp_path / "big_mask.png", size=24)
    c = tmp_path / "c.png"
    gen(capsys, model, c, "--image", image, "--mask", mask, "--seed", 3, "--steps", 3, "--sampler", "euler_a",
        "--schedule-type", "automatic", "--inpaint-area", "only masked", "--masked-area-padding", 2,
        "--height", 16, "--width", 16, mode="inpaint")
    f = params_of(c)["fields"]
    assert (f["Inpaint area"], f["Masked area padding"], f["Size"]) == ("Only masked", "2", "16x16")
    assert Image.open(c).size == (24, 24)
    d = tmp_path / "d.png"
    rc, _, err = run(["inpaint", "--from-png", c, "--image", image, "--mask", mask, "--model", model, "-o", d,
                      "--quiet"], capsys)
    assert rc == 0, err
    assert d.read_bytes() == c.read_bytes()
    # a stored value npsd lacks is one line naming the option to give
    from npsd.pngmeta import png_info, read_parameters
    e = tmp_path / "e.png"
    Image.open(c).save(e, pnginfo=png_info(read_parameters(c).replace("Only masked", "Only faces")))
    rc, _, err = run(["inpaint", "--from-png", e, "--image", image, "--mask", mask, "--model", model, "-o",
                      tmp_path / "f.png", "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "'Inpaint area' is 'Only faces'" in err and "--inpaint-area" in err, err


def test_save_steps_writes_x0_previews_and_a_filmstrip(model, tmp_path, capsys):
    out, steps = tmp_path / "a.png", tmp_path / "steps"
    gen(capsys, model, out, "--seed", 2, "--steps", 3, "--save-steps", steps, "--num-images", 2, "--save-every", 2,
        "--sampler", "ddpm")
    names = sorted(os.listdir(steps))
    assert names == ["filmstrip.png", "step-2-1.png", "step-2-2.png", "step-3-1.png", "step-3-2.png"]
    strip = Image.open(steps / "filmstrip.png")
    assert strip.size == (3 * 18 + 2, 2 * 18 + 2)                 # 2 rows (images) x (2 previews + result)
    assert params_of(steps / "step-2-1.png")["fields"]["Preview of step"] == "2"
    assert params_of(steps / "filmstrip.png")["fields"]["Size"] == "16x16"
    # the last preview's x0 is the final latent: the same picture as the result
    last = np.asarray(Image.open(steps / "step-3-1.png"), np.int16)
    assert np.abs(last - np.asarray(Image.open(tmp_path / "a-1.png"), np.int16)).max() <= 1
    # existing previews are refused before any work
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "b.png", "--seed", 2, "--steps", 3,
                      "--save-steps", steps, "--num-images", 2, "--save-every", 2, "--height", 16, "--width", 16], capsys)
    assert rc == 2 and "already exists" in err and not (tmp_path / "b-1.png").exists()


def test_eta_is_for_ddim(model, tmp_path, capsys):
    _, err = gen(capsys, model, tmp_path / "a.png", "--seed", 1, "--sampler", "euler", "--eta", 0.5)
    assert err == "npsd: warning: --eta is DDIM's; the euler sampler ignores it\n"
    assert "Eta" not in params_of(tmp_path / "a.png")["fields"]
    gen(capsys, model, tmp_path / "b.png", "--seed", 1, "--sampler", "ddim", "--eta", 0.5)
    assert params_of(tmp_path / "b.png")["fields"]["Eta"] == "0.5"


def test_long_prompts_warn_or_chunk(model, tmp_path, capsys):
    long = " ".join(["red"] * 90)                                       # 90 tokens + start/end
    _, err = gen(capsys, model, tmp_path / "a.png", "--seed", 1, prompt=long)
    assert err.count("\n") == 1 and err.startswith("npsd: warning: ") and "15" in err, err   # 90 - 75 dropped
    _, err = gen(capsys, model, tmp_path / "b.png", "--seed", 1, "--long-prompt", "chunk", prompt=long)
    assert err == "" and params_of(tmp_path / "b.png")["fields"]["Long prompt"] == "chunk"
    assert params_of(tmp_path / "b.png")["prompt"] == long


def test_default_model_is_the_built_in_one(original_file, tmp_path, capsys, monkeypatch):
    """Without --model, npsd.load() loads the built-in model (weights/npsd-tiny.safetensors, stood in
    for here by the tiny original-layout file); --from-png then needs no --model either."""
    from npsd import loading, weights
    real = weights.path
    monkeypatch.setattr(weights, "path", lambda name: original_file if name == loading.BUILTIN_MODEL else real(name))
    out = tmp_path / "a.png"
    rc, _, err = run(["txt2img", PROMPT, "-o", out, "--quiet", "--height", 64, "--width", 64, "--steps", 1,
                      "--seed", 3, "--sampler", "euler", "--karras"], capsys)
    assert rc == 0, err
    f = params_of(out)["fields"]
    assert f["Model hash"] == sha10(original_file) and f["Model"] == os.path.basename(original_file)
    rc, _, err = run(["txt2img", "--from-png", out, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and err == "", err
    assert (tmp_path / "b.png").read_bytes() == out.read_bytes()
    rc, _, err = run(["txt2img", "--from-png", out, "-o", tmp_path / "c.png", "--quiet", "--no-karras"], capsys)
    assert rc == 0 and "Schedule type" not in params_of(tmp_path / "c.png")["fields"]


# --- refusing to overwrite, atomic files, Ctrl-C ---------------------------------------------------

def test_existing_output_is_refused_before_any_work(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a.png"
    out.write_bytes(b"precious")

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(npsd, "load", no_loading)
    rc, stdout, err = run(["txt2img", PROMPT, "--model", model, "-o", out] + SMALL, capsys)
    assert rc == 2 and stdout == "" and out.read_bytes() == b"precious"
    assert err == f"npsd: error: {out} already exists; use --overwrite to replace it or -o to choose another name\n"
    monkeypatch.undo()
    gen(capsys, model, out, "--overwrite", "--seed", 1)
    assert out.read_bytes().startswith(b"\x89PNG")
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)          # the usual mode, not mkstemp's 0600


def test_ctrl_c_in_process_leaves_nothing_and_exits_130(model, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = npsd.Pipeline.unet

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:                          # the second step, after the first step's preview
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(npsd.Pipeline, "unet", interrupted)
    steps = tmp_path / "steps"
    rc, out, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "a.png", "--save-steps", steps,
                        "--guidance-scale", 7.5] + SMALL, capsys)
    assert rc == 130 and out == "" and "interrupted" in err.splitlines()[-1]
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []                         # not even the --save-steps folder it made


def test_ctrl_c_just_after_a_temporary_file_is_made_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    """Ctrl-C that comes after write_png_atomic's temporary file exists but before the handler that
    would remove it (here: as mkstemp returns, at the first step's preview): the run still leaves
    no file and no --save-steps folder behind."""
    import npsd.images
    real = tempfile.mkstemp

    def made_then_interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(npsd.images.tempfile, "mkstemp", made_then_interrupted)
    rc, out, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "a.png", "--save-steps",
                        tmp_path / "steps"] + SMALL, capsys)
    assert rc == 130 and out == "" and "interrupted" in err.splitlines()[-1]
    assert list(tmp_path.rglob("*")) == []


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "a.png"
    out.write_bytes(b"old")

    def boom(self, fp, *a, **k):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        write_png_atomic(Image.new("RGB", (4, 4)), str(out), "p\nNegative prompt: \nSteps: 1, Seed: 1", True)
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.png"]


def _default_sigint():
    # a test run started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no Ctrl-C handler in the child: give the child the default disposition
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def python_m_npsd(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "npsd", *map(str, args)], cwd=kw.pop("cwd", ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
                            **kw)


def test_sigint_in_a_subprocess_exits_130_and_leaves_no_file(model, tmp_path):
    steps = tmp_path / "steps"
    p = python_m_npsd("txt2img", PROMPT, "--model", model, "-o", tmp_path / "a.png", "--height", 16, "--width", 16,
                      "--steps", 500, "--save-steps", steps, "--seed", 1)
    deadline = time.time() + 120
    while not (steps.is_dir() and any(steps.glob("step-*.png"))) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert out == "" and err.strip().splitlines()[-1] == "npsd: interrupted; no output written"
    assert list(tmp_path.iterdir()) == []


def test_subprocess_matches_in_process_bytes(model, tmp_path, capsys):
    gen(capsys, model, tmp_path / "a.png", "--seed", 9, "--sampler", "ddpm")
    p = python_m_npsd("txt2img", PROMPT, "--model", model, "-o", tmp_path / "b.png", "--seed", 9, "--sampler", "ddpm",
                      "--quiet", *SMALL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and err == "" and out == f"{tmp_path / 'b.png'}\n", err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# --- errors: one line, what to do, exit code -------------------------------------------------------

def test_running_out_of_memory_is_one_line(model, tmp_path, capsys, monkeypatch):
    """A MemoryError during a generation (the request passed the memory estimate, then an array could
    not be allocated) is one line that says so and what to do, exit code 1, no file; it was an
    "internal error ... report it"."""
    def unet(*args, **kwargs):
        raise MemoryError("Unable to allocate 112. GiB for an array with shape (1, 3, 100000, 100000)")
    monkeypatch.setattr(npsd.Pipeline, "unet", unet)
    out = tmp_path / "a.png"
    rc, stdout, err = run(["txt2img", PROMPT, "--model", model, "-o", out, "--quiet"] + SMALL, capsys)
    assert rc == 1 and stdout == "" and not out.exists(), err
    assert err == ("npsd: error: out of memory (Unable to allocate 112. GiB for an array with shape (1, 3, 100000, "
                   "100000)); use a smaller size or fewer images, or close other programs\n"), err


def test_missing_and_empty_paths_are_refused_before_the_model_loads(model, tmp_path, capsys, monkeypatch):
    """A --lora that does not exist was found only after the model had loaded (tens of seconds for SD
    v1.5), and an empty path said "--lora  does not exist" (or, for -o in npsd trace, failed after the
    run), a folder "does not exist" (npsd trace: "[Errno 21] Is a directory" after loading); each is
    one line now, before npsd.load."""
    image = make_image(tmp_path / "in.png")
    monkeypatch.setattr(npsd, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = ["-o", tmp_path / "out.png", "--quiet"]
    cases = [(["txt2img", PROMPT, "--lora", tmp_path / "gone.safetensors:0.5"], f"--lora {tmp_path / 'gone.safetensors'} "
                                                                              f"does not exist; check the path"),
             (["txt2img", PROMPT, "--lora", ""], "--lora is empty; give a path"),
             (["txt2img", PROMPT, "--lora", tmp_path], f"--lora {tmp_path} is a folder; give a LoRA file (a folder "
                                                       f"of LoRAs is --lora-dir)"),      # was "does not exist"
             (["trace", PROMPT, "--lora", tmp_path], f"--lora {tmp_path} is a folder; give a LoRA file (a folder "
                                                     f"of LoRAs is --lora-dir)"),        # was "[Errno 21]"
             (["txt2img", PROMPT, "--model", ""], "--model is empty; give a path"),
             (["txt2img", PROMPT, "--vae", ""], "--vae is empty; give a path"),
             (["img2img", PROMPT, "--image", ""], "--image is empty; give a path"),
             (["inpaint", PROMPT, "--image", image, "--mask", ""], "--mask is empty; give a path")]
    for args, message in cases:
        rc, stdout, err = run(args + (out if args[0] != "trace" else ["-o", tmp_path / "t.safetensors"]), capsys)
        assert (rc, stdout, err) == (2, "", f"npsd: error: {message}\n"), (args, err)


def test_error_cases_are_one_line(model, tmp_path, capsys):
    image, mask = make_image(tmp_path / "in.png"), make_mask(tmp_path / "mask.png")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not a png")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    base = ["--model", model, "-o", tmp_path / "out.png", "--quiet"]
    cases = [  # (args, exit code, a phrase of the message)
        (["txt2img", PROMPT, "--model", tmp_path / "missing.safetensors", "--quiet"], 2, "does not exist"),
        (["txt2img", PROMPT, "--model", junk, "-o", tmp_path / "o.png", "--quiet"], 2, "not a valid .safetensors"),
        (["txt2img", PROMPT, "--height", 17, "--width", 16, "--steps", 1] + base, 2, "height must be a multiple"),
        (["txt2img", PROMPT, "--sampler", "plms"] + base, 2, "unknown sampler 'plms': npsd's name for it is 'pndm'"),
        (["txt2img", PROMPT, "--sampler", "k_lms"] + base, 2, "invalid choice: 'k_lms'"),
        (["txt2img", PROMPT, "--steps", 0] + base, 2, "--steps: must be >= 1"),
        (["txt2img", PROMPT, "--guidance-scale", "nan"] + base, 2, "finite"),
        (["txt2img", PROMPT, "--seed", -1] + base, 2, "[0, 2**64)"),
        (["txt2img", PROMPT, "--seed", 2**64] + base, 2, "[0, 2**64)"),
        (["txt2img"] + base, 2, "give a PROMPT"),
        (["img2img", PROMPT] + base, 2, "needs --image"),
        (["img2img", PROMPT, "--image", image, "--strength", 0] + base, 2, "(0.0, 1.0]"),
        (["img2img", PROMPT, "--image", image, "--strength", 1.5] + base, 2, "(0.0, 1.0]"),
        (["img2img", PROMPT, "--image", bad_image] + base + SMALL, 2, "cannot read image"),
        (["img2img", PROMPT, "--image", tmp_path / "nope.png"] + base, 2, "--image"),
        (["inpaint", PROMPT, "--image", image] + base, 2, "needs --mask"),
        (["inpaint", PROMPT, "--image", image, "--mask", bad_image] + base + SMALL, 2, "cannot read mask"),
        (["txt2img", PROMPT, "--mask", mask] + base, 2, "unrecognized arguments: --mask"),
        (["img2img", PROMPT, "--image", image, "--mask", mask] + base, 2, "unrecognized arguments: --mask"),
        (["txt2img", "--from-png", plain] + base, 2, "no 'parameters' text chunk"),
        (["txt2img", "--from-png", tmp_path / "nope.png"] + base, 2, "does not exist"),
        (["txt2img", PROMPT, "--vae", junk] + base + SMALL, 2, "not a valid .safetensors"),
        (["txt2img", PROMPT, "-o", tmp_path / "no" / "dir" / "x.png", "--model", model, "--quiet"], 2, "does not exist"),
        (["txt2img", PROMPT, "--karras", "--sampler", "ddim"] + base + SMALL, 2, "use_karras_sigmas applies"),
        (["txt2img", PROMPT, "--bogus"] + base, 2, "unrecognized arguments"),
        (["txt2img", PROMPT, "--model", model, "-o", tmp_path / "x.jpg"], 2, "ending in .png"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    for args, code, phrase in cases:
        rc, out, err = run(args, capsys)
        assert (rc, out) == (code, ""), (args, rc, err)
        assert err.count("\n") == 1 and err.startswith("npsd: error: ") and phrase in err, (args, err)
        assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bad.png", "in.png", "junk.safetensors", "mask.png", "plain.png"]
    rc, _, err = run(["txt2img", PROMPT, "--debug"] + base + SMALL + ["--height", 17], capsys)
    assert rc == 2 and "Traceback (most recent call last)" in err and err.strip().endswith("got 17")


def test_nan_latents_stop_with_the_step(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(npsd.Pipeline, "unet", lambda self, x, t, c: np.full_like(x, np.nan))
    rc, out, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "a.png", "--quiet"] + SMALL, capsys)
    assert rc == 1 and "NaN or infinite at step 1" in err and err.count("\n") == 1
    assert not (tmp_path / "a.png").exists()


def test_console_script_entry_point():
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group="console_scripts") if e.name == "npsd"]
    assert [e.value for e in eps] == ["npsd.cli:main"]          # pyproject.toml [project.scripts], installed
    assert eps[0].load() is cli.main


def test_version_and_help(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"npsd {npsd.__version__}"
    out = ""
    for mode in ("txt2img", "img2img", "inpaint"):
        rc, text, _ = run([mode, "--help"], capsys)
        assert rc == 0
        out += text
    for option in ("--output", "--negative-prompt", "--steps", "--guidance-scale", "--sampler", "--seed", "--height",
                   "--width", "--num-images", "--model", "--vae", "--image", "--mask", "--strength", "--eta", "--karras",
                   "--timestep-spacing", "--clip-skip", "--long-prompt", "--mask-blur", "--threads", "--save-steps",
                   "--preview", "--taesd", "--save-every", "--from-png", "--overwrite", "--quiet", "--debug", "--rng"):
        assert option in out, option


# --- --threads ------------------------------------------------------------------------------------

def test_threads_via_npsd_blas(model, tmp_path, capsys, monkeypatch):
    from npsd import blas, settings
    if not blas.available():
        pytest.skip("NumPy's BLAS here is not an OpenBLAS that npsd.blas can find")
    before = blas.get_threads()
    monkeypatch.setattr(settings, "THREADS", settings.THREADS)      # restored after the test
    try:
        gen(capsys, model, tmp_path / "a.png", "--threads", 1, "--seed", 1)
        assert blas.get_threads() == 1 and settings.THREADS == 1
    finally:
        blas.set_threads(before)



def test_more_threads_than_cpus_warn(model, tmp_path, capsys, monkeypatch):
    """--threads beyond the CPUs this process may use still runs, with a one-line warning."""
    from npsd import blas, settings
    monkeypatch.setattr(settings, "THREADS", settings.THREADS)
    before = blas.get_threads()
    try:
        n = settings.usable_cpus()
        _, err = gen(capsys, model, tmp_path / "a.png", "--threads", n, "--seed", 1)
        assert "warning" not in err
        _, err = gen(capsys, model, tmp_path / "b.png", "--threads", n + 1, "--seed", 1)
        assert err == (f"npsd: warning: --threads {n + 1} is more than the {n} CPUs this process may use; the "
                       "threads beyond them take turns on those CPUs and make it slower\n")
    finally:
        if before:
            blas.set_threads(before)


@pytest.fixture
def blas_out_of_reach(monkeypatch):
    """As with a BLAS that npsd.blas cannot set (MKL, Accelerate); npsd's own thread count restored after."""
    from npsd import blas, settings
    monkeypatch.setattr(blas, "set_threads", lambda n: False)
    monkeypatch.setattr(settings, "THREADS", settings.THREADS)


def test_threads_with_threadpoolctl(model, tmp_path, capsys, monkeypatch, blas_out_of_reach):
    seen = []
    fake = types.ModuleType("threadpoolctl")
    fake.threadpool_limits = lambda limits: seen.append(limits) or "limiter"
    monkeypatch.setitem(sys.modules, "threadpoolctl", fake)
    gen(capsys, model, tmp_path / "a.png", "--threads", 1, "--seed", 1)
    assert seen == [1]


def test_threads_without_threadpoolctl(model, tmp_path, capsys, monkeypatch, blas_out_of_reach):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)          # import fails
    for v in THREAD_VARS:
        monkeypatch.delenv(v, raising=False)
    _, err = gen(capsys, model, tmp_path / "a.png", "--threads", 1, "--seed", 1)
    assert err.startswith("npsd: warning: --threads 1: cannot change") and err.count("\n") == 1
    # as a command, npsd sets the variables and restarts itself, so OpenBLAS starts with them
    code = ("import sys; sys.modules['threadpoolctl'] = None; import npsd.blas; npsd.blas.set_threads = lambda n: False; "
            "from npsd.cli import main; sys.exit(main())")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code, "txt2img", PROMPT, "--model", model, "-o", str(tmp_path / "b.png"),
                        "--threads", "1", "--debug", "--quiet", *SMALL], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "OPENBLAS_NUM_THREADS=1" in p.stderr, p.stderr               # the restarted process has them
    # (the restarted process is a plain `python -m npsd`, which may also set BLAS by itself)
    assert any(f"threads: 1 via {w}" in p.stderr for w in ("the environment", "threadpoolctl", "npsd.blas")), p.stderr


# --- --vae ----------------------------------------------------------------------------------------

def vae_to_original(state_dict, levels=2):
    """diffusers AutoencoderKL names -> the original (CompVis) names of a VAE file; checked against
    diffusers' own converter in test_vae_file_layouts."""
    import re
    out = {}
    for k, v in state_dict.items():
        v = v.numpy().copy()
        n = k
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", n)
        n = n.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        n = n.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f"mid_block.attentions.0.{a}." in n:
                n = n.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
                if v.ndim == 2:
                    v = v[:, :, None, None]                         # linear -> 1x1 conv
        n = n.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        out[n] = v
    return out


def write_st(path, tensors, metadata=None):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def test_vae_file_layouts(model, tmp_path, capsys):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    base = tmp_path / "base.png"
    gen(capsys, model, base, "--seed", 4)
    base_px = np.asarray(Image.open(base))
    # the same VAE as the model's, in four layouts: the pixels must not change
    same = tiny_vae()
    orig = vae_to_original(same.state_dict())
    conv = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in orig.items()}, dict(same.config))
    for k, v in same.state_dict().items():                      # the test's inverse agrees with diffusers
        assert torch.equal(conv[k].reshape(v.shape), v), k
    files = {
        "original": write_st(tmp_path / "vae-orig.safetensors", orig),
        "prefixed": write_st(tmp_path / "vae-prefixed.safetensors",
                             {"first_stage_model." + k: v for k, v in orig.items()} | {"loss.logvar": np.zeros(1, np.float32)}),
        "diffusers file": write_st(tmp_path / "vae-diffusers.safetensors", {k: v.numpy() for k, v in same.state_dict().items()}),
        "diffusers folder": os.path.join(model, "vae"),
    }
    for layout, path in files.items():
        out = tmp_path / f"with-{layout.replace(' ', '-')}.png"
        gen(capsys, model, out, "--seed", 4, "--vae", path)
        assert np.array_equal(np.asarray(Image.open(out)), base_px), layout
        f = params_of(out)["fields"]
        assert f["VAE"] == os.path.basename(os.path.normpath(path)), layout
        assert f["VAE hash"] == sha10(cli.vae_weights_file(path))
    # another VAE changes the picture
    other = write_st(tmp_path / "other.safetensors", vae_to_original(tiny_vae(seed=9).state_dict()))
    gen(capsys, model, tmp_path / "other.png", "--seed", 4, "--vae", other)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "other.png")), base_px)
    # a file without VAE weights, and a VAE whose latent channels do not fit the UNet
    unet_only = write_st(tmp_path / "unet.safetensors", {"model.diffusion_model.x": np.zeros(2, np.float32)})
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "--vae", unet_only, "-o", tmp_path / "x.png", "--quiet"] + SMALL,
                     capsys)
    assert rc == 2 and "unet.safetensors holds no VAE (no encoder.* / decoder.*" in err and err.count("\n") == 1
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    z8 = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, norm_num_groups=8, layers_per_block=1)
    z8f = write_st(tmp_path / "z8.safetensors", vae_to_original(z8.state_dict()))
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "--vae", z8f, "-o", tmp_path / "x.png", "--quiet"] + SMALL, capsys)
    assert rc == 2 and "8 channels" in err and err.count("\n") == 1


# --- a real single-file checkpoint ----------------------------------------------------------------

@pytest.fixture(scope="module")
def original_file(tmp_path_factory):
    """A tiny checkpoint in the original (CompVis) single-file layout, written from tiny models with
    diffusers' own routing (tests/test_loading.py): 4 levels like SD v1.x, 64x64 images at least."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.test_loading import TINY_CLIP, tiny_models, tiny_original_state, write_safetensors
    unet, vae, _ = tiny_models()
    torch.manual_seed(0)                      # a CLIP with the real vocabulary size, for the shipped tokenizer
    clip = perturb_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "vocab_size": 49408})).eval(), seed=3)
    path = tmp_path_factory.mktemp("original") / "tiny-v1.safetensors"
    write_safetensors(path, tiny_original_state(unet, vae, clip))
    return path


def test_original_single_file_checkpoint(model, original_file, tmp_path, capsys):
    """--model with an original-layout file; Model hash is the file's SHA-256."""
    path = original_file
    out = tmp_path / "a.png"
    rc, stdout, err = run(["txt2img", PROMPT, "--model", path, "-o", out, "--quiet", "--height", 64, "--width", 64,
                           "--steps", 1, "--seed", 1], capsys)
    assert rc == 0, err
    f = params_of(out)["fields"]
    assert f["Model"] == "tiny-v1.safetensors" and f["Model hash"] == sha10(path)
    assert Image.open(out).size == (64, 64)
    # --from-png with another model: a one-line warning that the image will differ
    rc, _, err = run(["txt2img", "--from-png", out, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0 and err.count("\n") == 1 and "the image will differ" in err, err
    assert "not tiny-sd (hash " in err and f"made with tiny-v1.safetensors (hash {sha10(path)})" in err


def test_no_ema_chooses_the_raw_weights(tmp_path, capsys):
    """A v1-5-pruned-like file with EMA copies of every UNet weight (model_ema.<name without dots>):
    the EMA weights by default, the raw ones with --no-ema, recorded in the PNG as "EMA: off"."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.test_loading import TINY_CLIP, add_ema_copies, tiny_models, tiny_original_state, write_safetensors
    unet, vae, _ = tiny_models()
    torch.manual_seed(0)
    clip = perturb_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "vocab_size": 49408})).eval(), seed=3)
    sd = tiny_original_state(unet, vae, clip)
    add_ema_copies(sd)
    path = tmp_path / "tiny-full-ema.safetensors"
    write_safetensors(path, sd)
    small = ["--height", 64, "--width", 64, "--steps", 1, "--seed", 1, "--quiet", "--model", path]
    rc, _, err = run(["txt2img", PROMPT, "-o", tmp_path / "ema.png"] + small, capsys)
    assert rc == 0, err
    rc, _, err = run(["txt2img", PROMPT, "-o", tmp_path / "raw.png", "--no-ema"] + small, capsys)
    assert rc == 0, err
    assert "EMA" not in params_of(tmp_path / "ema.png")["fields"]
    assert params_of(tmp_path / "raw.png")["fields"]["EMA"] == "off"
    assert (tmp_path / "ema.png").read_bytes() != (tmp_path / "raw.png").read_bytes()
    rc, _, err = run(["txt2img", "--from-png", tmp_path / "raw.png", "--model", path, "-o", tmp_path / "again.png",
                      "--quiet"], capsys)
    assert rc == 0, err
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "raw.png").read_bytes()


# --- TAESD as the final decoder (--vae-decoder taesd) ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    """A random 2-level TAESD (VAE factor 2, 4 latent channels: it fits the tiny model's latents),
    saved as a diffusers AutoencoderTiny folder."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(4)
    m = perturb_(AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                                 num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).eval(), 4)
    folder = tmp_path_factory.mktemp("taesd") / "tiny-taesd"
    m.save_pretrained(folder)
    return str(folder)


def test_vae_decoder_taesd_writes_the_taesd_decode_of_the_final_latents(model, tiny_taesd, tmp_path, capsys):
    from npsd import taesd
    from npsd.pngmeta import short_hash
    out, full = tmp_path / "draft.png", tmp_path / "full.png"
    gen(capsys, model, out, "--seed", 9, "--vae-decoder", "taesd", "--taesd", tiny_taesd)
    gen(capsys, model, full, "--seed", 9)
    # the same generation through the API, decoded here by TAESD
    pipe = npsd.load(model)
    latents = pipe.txt2img(PROMPT, seed=9, num_inference_steps=2, height=16, width=16, output_type="latent")
    decoded = taesd.decode(taesd.load_taesd(tiny_taesd), latents)                  # [1, 3, 16, 16] in ~[-1, 1]
    expected = (np.clip(decoded[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    assert np.asarray(Image.open(full)).tolist() != expected.tolist()              # the VAE's decode differs
    f = params_of(out)["fields"]
    weights = os.path.join(tiny_taesd, "diffusion_pytorch_model.safetensors")
    assert (f["VAE Decoder"], f["TAESD hash"]) == ("TAESD", short_hash(weights))
    assert "VAE Decoder" not in params_of(full)["fields"] and "TAESD hash" not in params_of(full)["fields"]


def test_vae_decoder_taesd_errors_are_one_line(model, tiny_taesd, tmp_path, capsys, monkeypatch):
    from diffusers import AutoencoderTiny
    sd_taesd = tmp_path / "sd-taesd"                                  # SD v1.x's design: factor 8
    AutoencoderTiny().save_pretrained(sd_taesd)
    base = ["txt2img", PROMPT, "--model", model, "-o", tmp_path / "a.png", "--quiet", "--vae-decoder", "taesd"] + SMALL
    rc, out, err = run(base, capsys)                                   # before the model loads
    assert (rc, out, err) == (2, "", "npsd: error: --vae-decoder taesd needs --taesd PATH (TAESD weights)\n")
    for extra, phrase in (([tmp_path / "nope"], "--taesd " + str(tmp_path / "nope") + " does not exist"),
                          ([sd_taesd], "--vae-decoder taesd: these TAESD weights decode latents of 4 channels at "
                                       "VAE factor 8; this model's latents have 4 channels at factor 2")):
        rc, out, err = run(base + ["--taesd"] + extra, capsys)
        assert (rc, out) == (2, "") and err.count("\n") == 1 and phrase in err, err
    rc, out, err = run(base[:-len(SMALL) - 2] + ["--vae-decoder", "tiny"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "invalid choice: 'tiny'" in err
    assert sorted(os.listdir(tmp_path)) == ["sd-taesd"]


def test_vae_decoder_png_field_round_trip(model, tiny_taesd, tmp_path, capsys):
    from npsd.pngmeta import parameters_text
    settings = {"prompt": PROMPT, "negative_prompt": "", "steps": 2, "sampler": "ddim", "karras": False,
                "guidance_scale": 7.5, "seed": 1, "strength": 1.0, "mask_blur": 0, "eta": 0.0, "clip_skip": 0,
                "timestep_spacing": "leading", "prediction_type": "epsilon", "guidance_rescale": 0.0,
                "long_prompt": "truncate", "no_ema": False, "rng": "numpy", "prompt_syntax": "plain", "lora": [],
                "lora_names": [], "vae_decoder": "taesd", "sde_noise": "generator"}
    text = parameters_text(settings, "txt2img", "m", None, None, None, 16, 16, 1, 1, taesd_hash="0123456789ab")
    assert "VAE Decoder: TAESD, TAESD hash: 0123456789ab" in text
    stored = tmp_path / "stored.png"
    write_png_atomic(Image.new("RGB", (16, 16)), str(stored), text, False)
    got = settings_from_png(str(stored), "txt2img")
    assert (got["vae_decoder"], got["_taesd_hash"]) == ("taesd", "0123456789ab")
    for field, decoder in (("Full", "vae"), ("taesd", "taesd")):      # A1111's values, any case
        path = tmp_path / f"{field}.png"
        write_png_atomic(Image.new("RGB", (16, 16)), str(path), f"a cat\nSteps: 2, VAE Decoder: {field}", False)
        assert settings_from_png(str(path), "txt2img")["vae_decoder"] == decoder

    # --from-png of an image decoded by TAESD: needs --taesd, then re-makes it byte for byte
    a = tmp_path / "a.png"
    gen(capsys, model, a, "--seed", 5, "--vae-decoder", "taesd", "--taesd", tiny_taesd)
    rc, out, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    assert f"--from-png: {a} was decoded by TAESD (VAE Decoder: TAESD); give --taesd PATH" in err
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "b.png", "--quiet",
                      "--taesd", tiny_taesd], capsys)
    assert rc == 0, err
    assert (tmp_path / "b.png").read_bytes() == a.read_bytes()
    from diffusers import AutoencoderTiny                              # other weights of the same design
    AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "other")
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "e.png", "--quiet",
                      "--taesd", tmp_path / "other"], capsys)
    assert rc == 0 and err.count("\n") == 1 and "the image will differ" in err, err
    assert f"decoded by TAESD weights with hash {params_of(a)['fields']['TAESD hash']}, not those of" in err
    rc, _, err = run(["txt2img", "--from-png", a, "--model", model, "-o", tmp_path / "c.png", "--quiet",
                      "--vae-decoder", "vae"], capsys)                  # the full VAE instead: no TAESD fields
    assert rc == 0, err
    assert "VAE Decoder" not in params_of(tmp_path / "c.png")["fields"]
    # a decoder npsd lacks: an error unless --vae-decoder is given
    odd = tmp_path / "odd.png"
    write_png_atomic(Image.new("RGB", (16, 16)), str(odd), f"{PROMPT}\nSteps: 2, Seed: 5, VAE Decoder: Tiled", False)
    rc, out, err = run(["txt2img", "--from-png", odd, "--model", model, "-o", tmp_path / "d.png", "--quiet"], capsys)
    assert (rc, out) == (2, "") and err.count("\n") == 1 and "decoded by 'Tiled', which npsd lacks" in err, err


def test_from_png_of_the_built_in_models_earlier_file(tmp_path, capsys):
    """The built-in file was re-saved with other tensor names and the same values: a PNG naming the
    earlier file's hash re-runs to the same image without a warning; another hash still warns."""
    from npsd.loading import BUILTIN_SAME_VALUES
    a = tmp_path / "a.png"
    rc, _, err = run(["txt2img", PROMPT, "--steps", 2, "--seed", 5, "-o", a, "--quiet"], capsys)
    assert rc == 0, err
    current = params_of(a)["fields"]["Model hash"]
    assert current not in BUILTIN_SAME_VALUES
    text = read_parameters(str(a))
    for digest, warns in [(BUILTIN_SAME_VALUES[0], False), ("0123456789", True)]:
        old = tmp_path / f"{digest}.png"
        write_png_atomic(Image.open(a), str(old), text.replace(f"Model hash: {current}", f"Model hash: {digest}"), False)
        out = tmp_path / f"{digest}-again.png"
        rc, _, err = run(["txt2img", "--from-png", old, "-o", out, "--quiet"], capsys)
        assert rc == 0 and ("the image will differ" in err) == warns, err
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(a)))


def test_output_folders_that_cannot_be_made_fail_before_any_work(model, tmp_path, capsys, monkeypatch):
    """--save-steps and --attention-maps under a file (or anywhere mkdir fails) stop before the model
    runs, where --attention-maps used to fail with a bare '[Errno 20]' after the whole generation;
    a folder that can be made is tried and removed again, so a refused run leaves nothing."""
    calls = []
    real = npsd.Pipeline.unet
    monkeypatch.setattr(npsd.Pipeline, "unet", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for option in ("--save-steps", "--attention-maps"):
        for folder, phrase in ((blocker, "is a file; give a folder"), (blocker / "sub", "cannot be made: Not a directory"),
                               ("", "is empty; give a folder")):                # "" was "[Errno 2]" after the run
            rc, out, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "a.png", option, folder,
                                "--prompt-syntax", "plain", "--quiet"] + SMALL, capsys)
            expected = f"{option} {folder} {phrase}" if folder else f"{option} {phrase}"
            assert (rc, out) == (2, "") and expected in err and err.count("\n") == 1, err
    (tmp_path / "a.png").write_bytes(b"")                                # refused after the probe: it exists
    rc, out, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "a.png", "--save-steps",
                        tmp_path / "new" / "steps", "--quiet"] + SMALL, capsys)
    assert rc == 2 and "a.png already exists" in err and calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "file"]
