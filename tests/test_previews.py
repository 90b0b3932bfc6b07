"""Cheap step previews (npsd/previews.py): the least squares fit, the stored tables, --preview approx
and --preview taesd (npsd/taesd.py, with random TAESD weights).

What can be checked here, without SD v1.x's real weights: the fit recovers a known map; the built-in
model's stored table reproduces its real VAE decode with the error measured by
`python -m npsd.train.fit_latent_rgb`; the SD v1.x table's shape, convention and published values.
Whether the SD v1.x table matches the real SD VAE's decode needs the real weights and is not tested.
"""

import os
import time

import numpy as np
import pytest
from PIL import Image

import npsd
from npsd import cli, previews
from npsd.train import fit_latent_rgb as fit_script

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def builtin():
    return npsd.load()


def test_fit_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    factors = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    latents = rng.standard_normal((3, 4, 6, 5)).astype(np.float32)          # [B, 4, h, w]
    rgb = np.einsum("bchw,cr->brhw", latents.astype(np.float64), factors) + bias[:, None, None]  # [B, 3, h, w]
    images = rgb.repeat(8, axis=2).repeat(8, axis=3)                         # a "decode" at factor 8
    got_factors, got_bias = previews.fit_latent_rgb(latents, images)
    assert got_factors.shape == (4, 3) and got_bias.shape == (3,)
    np.testing.assert_allclose(got_factors, factors, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_bias, bias, rtol=0, atol=1e-6)


def test_latent_to_rgb_convention_and_nearest_upscaling():
    latents = np.zeros((1, 4, 2, 3), np.float32)
    latents[0, 1, 0, 0] = 1.0                                                # channel 2 at pixel (0, 0)
    out = previews.latent_to_rgb(latents, previews.SD1_FACTORS, previews.SD1_BIAS)
    assert out.shape == (1, 2, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], previews.SD1_FACTORS[1] / 2 + 0.5, atol=1e-7)  # row 2, then [-1,1]->[0,1]
    np.testing.assert_allclose(out[0, 1, 2], [0.5, 0.5, 0.5])               # a zero latent is mid-grey (no bias)
    big = previews.latent_to_rgb(10 * latents, previews.SD1_FACTORS, scale=8)
    assert big.shape == (1, 16, 24, 3) and big.min() >= 0 and big.max() <= 1   # clipped
    assert np.all(big[0, :8, :8] == big[0, 0, 0]) and np.all(big[0, 8:, 8:] == big[0, 8, 8])


def test_sd1_table_is_the_published_one():
    # Not checkable here: how close it comes to the real SD VAE's decode (that needs the real weights).
    assert previews.SD1_FACTORS.shape == (4, 3) and previews.SD1_FACTORS.dtype == np.float32
    assert previews.SD1_FACTORS[0].tolist() == pytest.approx([0.298, 0.207, 0.208])
    assert previews.SD1_FACTORS[3].tolist() == pytest.approx([-0.184, -0.271, -0.473])
    assert not previews.SD1_BIAS.any()


def test_builtin_table_reproduces_the_real_decode(builtin):
    """Measured by `python -m npsd.train.fit_latent_rgb`: 0.1626 mean absolute error ([0, 1] units, at
    latent resolution) on 256 held-out images (seed 1); a constant mean colour has 0.3627. Here 32
    images of seed 2, accepted up to 1.5x the measured error."""
    assert previews.table_name(builtin) == "npsd-tiny"
    latents, decodes = fit_script.encode_decode(builtin, 32, seed=2)
    err = previews.preview_error(latents, decodes, previews.BUILTIN_FACTORS, previews.BUILTIN_BIAS)
    print(f"approx preview error on 32 images: {err:.4f} (measured {previews.BUILTIN_ERROR})")
    assert err <= 1.5 * previews.BUILTIN_ERROR
    images = previews.approx_preview(builtin, latents[:2])
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1


def test_table_choice_by_model(builtin):
    class Fake:
        info, latent_channels, vae_factor = {}, 4, 8
    assert previews.table_name(Fake()) == "sd-v1"
    Fake.vae_factor = 2
    assert previews.table_name(Fake()) is None
    with pytest.raises(npsd.errors.InputError, match="no latent -> RGB table"):
        previews.approx_preview(Fake(), np.zeros((1, 4, 2, 2), np.float32))


def run_cli(args, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_preview_approx_writes_previews_and_a_filmstrip(tmp_path, capsys):
    timings = {}
    for method in ("full", "approx"):
        steps = tmp_path / method
        args = ["txt2img", PROMPT, "-o", tmp_path / f"{method}.png", "--quiet", "--seed", 3, "--steps", 6,
                "--save-steps", steps, "--preview", method]
        started = time.perf_counter()
        rc, _, err = run_cli(args, capsys)
        timings[method] = time.perf_counter() - started
        assert rc == 0, err
        assert sorted(os.listdir(steps)) == ["filmstrip.png"] + [f"step-{k}.png" for k in range(1, 7)]
        assert Image.open(steps / "step-1.png").size == (64, 64)          # the image size: the strip lines up
    assert Image.open(tmp_path / "approx" / "filmstrip.png").size == Image.open(tmp_path / "full" / "filmstrip.png").size
    # the same generation: the results are identical, only the previews differ
    assert np.array_equal(np.asarray(Image.open(tmp_path / "full.png")), np.asarray(Image.open(tmp_path / "approx.png")))
    last = np.asarray(Image.open(tmp_path / "approx" / "step-6.png"), np.float32) / 255
    assert np.all(last[:4, :4] == last[0, 0])                                 # blocks of 4x4: nearest upscaling
    print(f"txt2img 6 steps with 6 previews: full {timings['full']:.2f} s, approx {timings['approx']:.2f} s")


def test_bad_preview_value_is_a_one_line_usage_error(tmp_path, capsys):
    rc, out, err = run_cli(["txt2img", PROMPT, "-o", tmp_path / "a.png", "--save-steps", tmp_path / "s",
                            "--preview", "blurry"], capsys)
    assert (rc, out) == (2, "") and err.count("\n") == 1 and err.startswith("npsd: error: ")
    assert "invalid choice: 'blurry'" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def sd_shaped(tmp_path_factory):
    """A tiny random model of SD v1.x's shape (4 levels: VAE factor 8; original single-file layout) and a
    random TAESD saved as a diffusers AutoencoderTiny folder."""
    import torch
    from diffusers import AutoencoderTiny
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.helpers import perturb_
    from tests.test_loading import TINY_CLIP, tiny_models, tiny_original_state, write_safetensors
    unet, vae, _ = tiny_models()
    torch.manual_seed(0)
    clip = perturb_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "vocab_size": 49408})).eval(), seed=3)
    folder = tmp_path_factory.mktemp("sd-shaped")
    write_safetensors(folder / "tiny-v1.safetensors", tiny_original_state(unet, vae, clip))
    AutoencoderTiny().eval().save_pretrained(folder / "taesd")
    return folder / "tiny-v1.safetensors", folder / "taesd"


def test_cli_preview_taesd_and_approx_on_an_sd_shaped_model(sd_shaped, tmp_path, capsys):
    model, taesd_folder = sd_shaped
    base = ["txt2img", PROMPT, "--model", model, "--quiet", "--height", 64, "--width", 64, "--steps", 2, "--seed", 1]
    for method in ("taesd", "approx"):                            # approx: the SD v1.x table
        steps = tmp_path / method
        rc, _, err = run_cli(base + ["-o", tmp_path / f"{method}.png", "--save-steps", steps, "--preview", method,
                                     "--taesd", taesd_folder], capsys)
        assert rc == 0, err
        assert sorted(os.listdir(steps)) == ["filmstrip.png", "step-1.png", "step-2.png"]
        assert Image.open(steps / "step-2.png").size == (64, 64)


def test_preview_taesd_errors_are_one_line(sd_shaped, tmp_path, capsys):
    model, taesd_folder = sd_shaped
    cases = [(["--model", model], "needs --taesd"),
             (["--model", model, "--taesd", tmp_path / "nope"], "does not exist"),
             (["--taesd", taesd_folder], "TAESD weights decode latents of 4 channels at VAE factor 8; "
                                         "this model's latents have 4 channels at factor 4")]   # the built-in model
    for extra, phrase in cases:
        rc, out, err = run_cli(["txt2img", PROMPT, "-o", tmp_path / "a.png", "--save-steps", tmp_path / "s",
                                "--preview", "taesd", "--quiet"] + extra, capsys)
        assert (rc, out) == (2, "") and err.count("\n") == 1 and phrase in err, (extra, err)
    assert os.listdir(tmp_path) == []


# --- previews and the TAESD decoder through the pipelines' API ----------------------------------------

@pytest.fixture(scope="module")
def sd_pipe(sd_shaped):
    """The SD-shaped model with its TAESD attached (pipe.taesd), as the API asks for it."""
    from npsd.taesd import load_taesd
    model, taesd_folder = sd_shaped
    pipe = npsd.load(str(model))
    pipe.taesd = load_taesd(taesd_folder)
    return pipe


def _run(pipe, **kw):
    """txt2img of 2 steps on 64x64 -> (final latents, {step: (x0_pred, preview images)})."""
    seen = {}

    def callback(i, t, latents, x0_pred, preview):
        seen[i] = (x0_pred.copy(), preview)
    latents = pipe.txt2img(PROMPT, seed=1, num_inference_steps=2, height=64, width=64, output_type="latent",
                           callback=callback, **kw)
    return latents, seen


def test_api_callback_receives_previews_of_each_method(sd_pipe):
    from npsd import taesd
    finals = {}
    for method in previews.PREVIEW_METHODS:
        finals[method], seen = _run(sd_pipe, preview=method)
        assert sorted(seen) == [0, 1]
        for x0, images in seen.values():
            assert isinstance(images, np.ndarray) and images.dtype == np.float32
            assert images.shape == (1, 64, 64, 3) and 0 <= images.min() <= images.max() <= 1, method
            if method == "approx":           # the stored SD v1.x table, nearest-upscaled: the same numbers
                np.testing.assert_array_equal(images, previews.approx_preview(sd_pipe, x0, full_size=True))
                assert np.all(images[0, :8, :8] == images[0, 0, 0])
            else:                            # an independent decode of the same x0, written out here
                raw = (taesd.decode(sd_pipe.taesd, x0) if method == "taesd"
                       else sd_pipe.vae_decode(x0 / np.float32(sd_pipe.scaling_factor)))      # [1, 3, 64, 64]
                expected = np.clip(raw / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
                np.testing.assert_array_equal(images, expected)    # the same float32 operations: bit for bit
    # drawing previews does not change the generation
    np.testing.assert_array_equal(finals["full"], finals["approx"])
    np.testing.assert_array_equal(finals["full"], finals["taesd"])


def test_api_decoder_taesd_decodes_the_final_latents(sd_pipe):
    from npsd import taesd
    latents, _ = _run(sd_pipe, preview="approx")
    common = dict(seed=1, num_inference_steps=2, height=64, width=64, output_type="np")
    drafts = sd_pipe.txt2img(PROMPT, decoder="taesd", **common)                             # [1, 64, 64, 3]
    expected = np.clip(taesd.decode(sd_pipe.taesd, latents) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(drafts, expected)                    # the same float32 operations
    full = sd_pipe.txt2img(PROMPT, **common)                           # the VAE's decode differs
    assert np.abs(full - drafts).mean() > 0.01


def test_api_preview_and_decoder_errors_come_before_any_work(builtin, sd_pipe, monkeypatch):
    monkeypatch.setattr(builtin, "encode_text", lambda *a, **k: pytest.fail("the generation started"))
    cb = (lambda i, t, x, x0, preview: None)
    cases = [(dict(preview="taesd", callback=cb), "preview 'taesd' needs TAESD weights: set pipe.taesd"),
             (dict(decoder="taesd"), "decoder 'taesd' needs TAESD weights"),
             (dict(preview="approx"), "draws images for the callback; give callback= too"),
             (dict(preview="blurry", callback=cb), "preview must be one of full, approx, taesd, got 'blurry'"),
             (dict(decoder="fast"), "decoder must be one of vae, taesd, got 'fast'")]
    for kw, phrase in cases:
        with pytest.raises(npsd.InputError, match=phrase) as e:
            builtin.txt2img(PROMPT, seed=0, **kw)
        assert "\n" not in str(e.value)
    monkeypatch.setattr(builtin, "taesd", sd_pipe.taesd)           # TAESD for factor 8 on the factor-4 model
    with pytest.raises(npsd.InputError, match="decoder 'taesd': these TAESD weights decode latents of 4 channels "
                                              "at VAE factor 8; this model's latents have 4 channels at factor 4"):
        builtin.txt2img(PROMPT, seed=0, decoder="taesd")


def test_approx_without_a_table_is_refused():
    class Fake:
        info, latent_channels, vae_factor = {}, 4, 2
    with pytest.raises(npsd.InputError, match="preview 'approx': no latent -> RGB table for this model "
                                              r"\(4 latent channels, VAE factor 2\); use the 'full' or 'taesd'"):
        previews.with_previews(Fake(), lambda *a, **k: None, "approx")
