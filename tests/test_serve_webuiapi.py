"""`npsd serve` driven by a real AUTOMATIC1111 client: a uvicorn server on a free port (in a thread,
the built-in model), and the webuiapi package (the test extra) calling it over HTTP with the request
bodies it builds for A1111 (its defaults included: enable_hr=False, restore_faces=False, eta=1, ...).
"""

import base64
import io
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
import requests  # noqa: E402  (webuiapi's own dependency)
from PIL import Image  # noqa: E402

import npsd  # noqa: E402
from npsd.loading import BUILTIN_MODEL  # noqa: E402
from npsd.serve.app import ServeSettings, create_app  # noqa: E402
from npsd.weights import path as weights_path  # noqa: E402

PROMPT = "a red circle on a blue background"
USER, PASSWORD = "npsd", "test-password"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copy(weights_path(BUILTIN_MODEL), models / "second.safetensors")     # a second model to switch to
    app = create_app(ServeSettings(models_dir=str(models), api_auth=f"{USER}:{PASSWORD}"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < end and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server, sampler="Euler a", steps=4,
                             username=USER, password=PASSWORD)


@pytest.fixture(scope="module")
def pipe():
    return npsd.load()


def pixels(img):
    return np.asarray(img.convert("RGB"))


def test_authentication_is_required(server):
    r = requests.get(f"http://127.0.0.1:{server}/sdapi/v1/options", timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")


def test_txt2img(api, pipe):
    result = api.txt2img(prompt=PROMPT, negative_prompt="green", seed=17, width=64, height=64, cfg_scale=7,
                         batch_size=2)
    assert len(result.images) == 2 and all(im.size == (64, 64) for im in result.images)
    assert result.info["all_seeds"] == [17, 18] and result.info["sampler_name"] == "Euler a"   # A1111's seeds
    ref = [pipe.txt2img(PROMPT, negative_prompt="green", num_inference_steps=4, guidance_scale=7, seed=seed,
                        sampler="euler_a", schedule_type="automatic") for seed in (17, 18)]     # A1111's schedule
    for got, want in zip(result.images, ref):
        assert np.array_equal(pixels(got), pixels(want))                  # exact: the same computation
    # the PNG it received carries its parameters; png-info reads them back
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    assert api.png_info(result.images[0]).info == result.info["infotexts"][0]


def test_img2img_and_inpainting(api, pipe):
    y, x = np.mgrid[0:64, 0:64]
    picture = Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], -1).astype(np.uint8), "RGB")
    result = api.img2img(images=[picture], prompt=PROMPT, seed=5, denoising_strength=0.5, width=64, height=64,
                         sampler_name="DDIM", eta=0)
    ref = pipe.img2img(PROMPT, picture, strength=0.5, num_inference_steps=4, guidance_scale=7, seed=5)
    assert np.array_equal(pixels(result.image), pixels(ref))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 48))                                        # white = repaint
    result = api.img2img(images=[picture], mask_image=mask, prompt=PROMPT, seed=6, denoising_strength=1.0,
                         width=64, height=64, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                         sampler_name="DDIM", eta=0)
    ref = pipe.inpaint(PROMPT, picture, mask, strength=1.0, num_inference_steps=4, guidance_scale=7, seed=6)
    assert np.array_equal(pixels(result.image), pixels(ref))
    assert "Pipeline: inpaint" in result.info["infotexts"][0]
    # webuiapi's inpainting defaults (fill, only masked with padding 0, mask blur 4) are A1111's
    # inpainting, which npsd runs for the samplers A1111 runs with k-diffusion
    result = api.img2img(images=[picture], mask_image=mask, prompt=PROMPT, seed=7, steps=4, width=64, height=64,
                         sampler_name="Euler a")
    ref = pipe.inpaint(PROMPT, picture, mask, strength=0.75, num_inference_steps=4, guidance_scale=7, seed=7,
                       sampler="euler_a", schedule_type="automatic", mask_blur=4, masked_content="fill",
                       inpaint_area="only masked", masked_area_padding=0, height=64, width=64)
    assert np.array_equal(pixels(result.image), pixels(ref))
    with pytest.raises(RuntimeError, match="inpainting_fill"):          # ... and not for DDIM
        api.img2img(images=[picture], mask_image=mask, prompt=PROMPT, width=64, height=64, sampler_name="DDIM", eta=0)


def test_progress_during_a_job_and_interrupt(api):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault(
        "result", api.txt2img(prompt=PROMPT, seed=8, steps=300, width=64, height=64, sampler_name="DDIM", eta=0)))
    thread.start()
    end = time.monotonic() + 60
    while True:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            break
        assert time.monotonic() < end, progress
        time.sleep(0.02)
    assert progress["state"]["sampling_steps"] == 300 and 0 < progress["progress"] < 1
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (64, 64)
    api.interrupt()
    thread.join(60)
    result = box["result"]
    assert result.json["npsd"]["interrupted"] is True and result.image.size == (64, 64)
    assert "Interrupted at step:" in result.info["infotexts"][0]
    assert api.get_progress()["state"]["job_count"] == 0


def test_models_listing_and_switching(api, pipe):
    assert api.util_get_model_names() == ["npsd-tiny", "second.safetensors"]
    assert api.util_get_current_model() == "npsd-tiny"
    assert "DPM++ 2M" in api.util_get_sampler_names()
    api.util_set_model("second.safetensors")
    assert api.util_get_current_model() == "second.safetensors"
    result = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64)
    assert result.info["sd_model_name"] == "second" and "Model: second.safetensors" in result.info["infotexts"][0]
    ref = pipe.txt2img(PROMPT, num_inference_steps=4, guidance_scale=7, seed=3, sampler="euler_a",
                       schedule_type="automatic")
    assert np.array_equal(pixels(result.image), pixels(ref))              # the same weights, another name
    api.set_options({"sd_model_checkpoint": "npsd-tiny", "CLIP_stop_at_last_layers": 2})
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "npsd-tiny" and options["CLIP_stop_at_last_layers"] == 2
    result = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64,
                         override_settings={"sd_model_checkpoint": "second.safetensors"})
    assert result.info["sd_model_name"] == "second" and result.info["clip_skip"] == 2
    assert api.util_get_current_model() == "npsd-tiny"                   # restored after the request
    api.set_options({"CLIP_stop_at_last_layers": 1})
    result = api.txt2img(prompt=PROMPT, enable_hr=True, hr_scale=1.5, width=64, height=64, steps=3)  # hires fix
    assert result.image.size == (96, 96) and "Hires upscaler: Latent" in result.info["infotexts"][0]
    with pytest.raises(RuntimeError, match="R-ESRGAN 4x.* is not one npsd has"):
        api.txt2img(prompt=PROMPT, enable_hr=True, hr_upscaler="R-ESRGAN 4x+", width=64, height=64)
    assert json.loads(json.dumps(api.get_sd_models()))[0]["title"] == "npsd-tiny"
