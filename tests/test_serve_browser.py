"""The page of `npsd serve` (npsd/serve/static/) in a real browser: headless Chromium driven by Selenium.

One `python -m npsd serve` subprocess on a free port (the built-in model) and one browser serve the
module. The page is used as a person would: typing, clicking, a file upload, painting a mask with the
mouse, Ctrl+Enter. Needs Debian's `chromium` and `chromium-driver` (apt-get; .ci/run installs them)
and selenium (test extra); the system chromedriver is passed explicitly, so Selenium Manager never
downloads one. NPSD_SCREENSHOT=1 rewrites docs/images/serve.png (the README's picture).
"""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle on a blue background"
STEPS = 10          # ~0.1 s a step for the built-in model on 2 cores: long enough for several progress polls
SIZE = 64           # the built-in model's native size


def _which(*names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = _free_port()
    out = tmp_path_factory.mktemp("serve")
    models = tmp_path_factory.mktemp("models")          # a second model to switch to: the built-in one's file
    shutil.copy(os.path.join(ROOT, "weights", "npsd-tiny.safetensors"), models / "copy.safetensors")
    log = open(out / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "npsd", "serve", "--port", str(port), "--output-dir", str(out),
                             "--models-dir", str(models)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/sdapi/v1/sd-models", timeout=5).read()
                break
            except OSError:
                log.seek(0)
                assert proc.poll() is None, f"npsd serve exited with {proc.returncode}:\n{log.read()}"
                assert time.monotonic() < deadline, f"npsd serve did not answer within 120 s:\n{log.read()}"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    chrome = _which("chromium", "chromium-browser")
    driver_path = _which("chromedriver")                     # Debian's chromium-driver: /usr/bin/chromedriver
    if chrome is None or driver_path is None:
        pytest.skip("needs Chromium and its chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})      # the page's console, for its errors
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


# --- helpers ----------------------------------------------------------------------------------------

def _js(driver, code, *args):
    return driver.execute_script(code, *args)


def _png(src):
    """A data:image/png;base64,... URL -> a PIL image (fails unless it is a PNG)."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
    assert image.format == "PNG"
    return image.convert("RGB")


def _open(driver, url):
    driver.get(url)
    # the sampler list arrives from /sdapi/v1/samplers (after the "model's default" entry): then the page is ready
    _wait(driver, "return document.querySelectorAll('#sampler_name option').length > 1", 30)


def _wait(driver, condition, timeout):
    deadline = time.monotonic() + timeout
    while not _js(driver, condition):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for: {condition}"
        time.sleep(0.05)


def _save_page(driver, path):
    """A PNG of the whole page: the window made tall enough that nothing scrolls, then restored."""
    driver.set_window_size(1200, _js(driver, "return document.documentElement.scrollHeight") + 200)
    width, height = _js(driver, "return [document.documentElement.clientWidth, "
                                "Math.ceil(document.querySelector('main').getBoundingClientRect().bottom)]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    driver.set_window_size(1200, 900)


def _set(driver, element_id, value):
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(str(value))


# A 10-step generation of the built-in model takes about 1 s on 2 quiet cores; the bound is a guard
# against a hung page, generous because CI machines may be shared.
RESULT_SECONDS = 600


def _run_and_watch(driver, start):
    """Starts a generation with `start()` and polls the page until it ends. -> (final <img> src,
    the preview srcs and progress texts seen while it ran)."""
    before = _js(driver, "return document.getElementById('result').src")
    start()
    previews, texts = set(), set()
    deadline = time.monotonic() + RESULT_SECONDS
    while True:
        state = _js(driver, """
            const p = document.getElementById('preview'), r = document.getElementById('result');
            return [document.body.classList.contains('running'), p.hidden ? '' : p.src,
                    document.getElementById('progress-text').textContent, r.hidden ? '' : r.src,
                    document.getElementById('error').textContent];""")
        running, preview, text, result, error = state
        if running:
            if preview:
                previews.add(preview)
            texts.add(text)
        elif result and result != before:
            return result, previews, texts
        assert not error, f"the page shows an error: {error}"
        assert time.monotonic() < deadline, f"no result within {RESULT_SECONDS} s"
        time.sleep(0.02)


# --- tests ------------------------------------------------------------------------------------------

def test_generate_then_inpaint(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    driver = browser
    driver.set_window_size(1200, 900)
    driver.get_log("browser")                                             # (reading empties it)
    _open(driver, server)
    assert "npsd-tiny" in _js(driver, "return [...document.querySelectorAll('#model option')].map(o => o.value)")
    made = len(json.load(urllib.request.urlopen(server + "/npsd/v1/gallery", timeout=10)))   # by other tests

    # txt2img: type, click Generate, watch the progress
    _set(driver, "prompt", PROMPT)
    _set(driver, "steps", STEPS)
    _set(driver, "seed", 1)
    src, previews, texts = _run_and_watch(driver, driver.find_element("id", "generate").click)
    first = _png(src)
    assert first.size == (SIZE, SIZE)
    assert previews, f"no progress preview was shown during a {STEPS}-step generation; texts seen: {texts}"
    for preview in previews:
        _png(preview)
    assert any(f"/ {STEPS}" in text for text in texts), texts
    assert PROMPT in driver.find_element("id", "parameters").text
    words = _js(driver, "return [...document.querySelectorAll('#attention img')].map(i => i.dataset.word)")
    assert "circle" in words, words
    for map_src in _js(driver, "return [...document.querySelectorAll('#attention img')].map(i => i.src)"):
        _png(map_src)
    assert len(driver.find_elements("css selector", "#gallery img")) == made + 1

    # inpaint: upload the picture, paint a stroke across its middle, Ctrl+Enter
    path = tmp_path / "first.png"
    first.save(path)
    driver.find_element("css selector", "input[name=mode][value=inpaint]").click()
    driver.find_element("id", "init-file").send_keys(str(path))
    _wait(driver, f"return document.getElementById('mask').width === {SIZE}", 10)
    canvas = driver.find_element("id", "mask")
    _js(driver, "arguments[0].scrollIntoView({block: 'center'})", canvas)   # the pointer goes to its middle
    width = canvas.size["width"]                       # CSS pixels; the canvas holds SIZE x SIZE
    (ActionChains(driver).move_to_element(canvas).move_by_offset(-width // 6, 0).click_and_hold()
     .move_by_offset(width // 6, 0).move_by_offset(width // 6, 0).release().perform())
    mask = np.asarray(_png("data:image/png;base64," + _js(driver, "return maskPng()")).convert("L"))
    assert mask.shape == (SIZE, SIZE)
    assert mask.max() == 255 and mask.min() == 0
    rows, cols = np.nonzero(mask > 127)
    # the stroke: from 1/3 to 2/3 of the width on the middle row, brush SIZE/8 wide
    assert abs(rows.mean() - SIZE / 2) < 2 and cols.min() < SIZE * 0.4 and cols.max() > SIZE * 0.6, (rows, cols)
    assert mask[:8].max() == 0 and mask[-8:].max() == 0

    _set(driver, "prompt", "a yellow square on a blue background")
    prompt = driver.find_element("id", "prompt")
    src, _, _ = _run_and_watch(driver, lambda: prompt.send_keys(Keys.CONTROL, Keys.ENTER))
    second = _png(src)
    assert second.size == (SIZE, SIZE)
    diff = np.abs(np.asarray(second, np.float32) - np.asarray(first, np.float32)).mean(-1)
    inside, outside = diff[mask > 127].mean(), diff[:8].mean()
    # repainted under the stroke, kept (up to the VAE's round trip) in the top rows: measured 50.3 against 9.4
    assert inside > 2 * outside, (inside, outside)
    assert len(driver.find_elements("css selector", "#gallery img")) == made + 2

    if os.environ.get("NPSD_SCREENSHOT") == "1":
        _save_page(driver, os.path.join(ROOT, "docs", "images", "serve.png"))

    # the gallery (newest first) reloads a picture's settings: the second is the txt2img one
    driver.find_elements("css selector", "#gallery img")[1].click()
    assert driver.find_element("id", "prompt").get_attribute("value") == PROMPT
    assert driver.find_element("id", "seed").get_attribute("value") == "1"
    assert driver.find_element("id", "steps").get_attribute("value") == str(STEPS)
    assert driver.find_element("css selector", "input[name=mode][value=txt2img]").is_selected()

    # A1111's inpainting (a sampler A1111 runs with k-diffusion): masked content, only masked, a
    # variation seed, all reaching the server (its parameters say so) and the result the input's size;
    # the gallery loads them back, and a picture without them clears them
    from selenium.webdriver.support.ui import Select
    driver.find_element("css selector", "input[name=mode][value=inpaint]").click()
    Select(driver.find_element("id", "sampler_name")).select_by_value("Euler a")
    Select(driver.find_element("id", "inpainting_fill")).select_by_value("2")
    driver.find_element("id", "inpaint_full_res").click()
    _set(driver, "inpaint_full_res_padding", 4)
    _set(driver, "subseed", 5)
    _set(driver, "subseed_strength", 0.3)
    src, _, _ = _run_and_watch(driver, driver.find_element("id", "generate").click)
    assert _png(src).size == (SIZE, SIZE)
    text = driver.find_element("id", "parameters").text
    for field in ("Masked content: latent noise", "Inpaint area: Only masked", "Masked area padding: 4",
                  "Variation seed: 5", "Variation seed strength: 0.3"):
        assert field in text, (field, text)
    value = lambda element_id: driver.find_element("id", element_id).get_attribute("value")  # noqa: E731
    driver.find_elements("css selector", "#gallery img")[2].click()                    # the txt2img one
    assert (value("subseed"), driver.find_element("id", "inpaint_full_res").is_selected()) == ("", False)
    driver.find_elements("css selector", "#gallery img")[0].click()                    # the last one
    assert (value("inpainting_fill"), value("inpaint_full_res_padding"), value("subseed")) == ("2", "4", "5")
    assert driver.find_element("id", "inpaint_full_res").is_selected()
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_interrupt_stops_a_long_generation(server, browser):
    driver = browser
    _open(driver, server)
    _set(driver, "prompt", PROMPT)
    _set(driver, "steps", 150)
    driver.find_element("id", "generate").click()
    _wait(driver, "return /step [1-9]/.test(document.getElementById('progress-text').textContent)", 60)
    driver.find_element("id", "interrupt").click()
    _wait(driver, "return !document.body.classList.contains('running')", 60)
    assert not driver.find_element("id", "error").text
    _png(driver.find_element("id", "result").get_attribute("src"))     # the last step's image comes back
    assert "Interrupted at step" in driver.find_element("id", "parameters").text


def test_switching_the_model(server, browser):
    from selenium.webdriver.support.select import Select
    driver = browser
    _open(driver, server)
    titles = _js(driver, "return [...document.querySelectorAll('#model option')].map(o => o.value)")
    other = next(title for title in titles if title.startswith("copy"))
    Select(driver.find_element("id", "model")).select_by_value(other)
    _wait(driver, "return document.getElementById('model-status').textContent === ''", 60)
    assert not driver.find_element("id", "error").text
    options = json.load(urllib.request.urlopen(server + "/sdapi/v1/options", timeout=10))
    assert options["sd_model_checkpoint"] == other
    _set(driver, "prompt", PROMPT)
    _set(driver, "steps", 2)
    _run_and_watch(driver, driver.find_element("id", "generate").click)
    assert "Model: copy" in driver.find_element("id", "parameters").text
    Select(driver.find_element("id", "model")).select_by_value("npsd-tiny")
    _wait(driver, "return document.getElementById('model-status').textContent === ''", 60)
    assert json.load(urllib.request.urlopen(server + "/sdapi/v1/options", timeout=10))["sd_model_checkpoint"] == "npsd-tiny"


def test_a1111_syntax_prompt_generates_without_maps(server, browser):
    # npsd maps words token by token, so a prompt with emphasis is sent again without asking for maps
    driver = browser
    _open(driver, server)
    _set(driver, "prompt", "a (red:1.3) circle on a blue background")
    _set(driver, "steps", 2)
    src, _, _ = _run_and_watch(driver, driver.find_element("id", "generate").click)
    assert _png(src).size == (SIZE, SIZE)
    assert "npsd_attention_maps" in driver.find_element("id", "attention-note").text
    assert not driver.find_elements("css selector", "#attention img")


def test_hires_fix_from_the_page(server, browser):
    """The hires fix's controls (txt2img only) send A1111's fields: the result is enlarged, its
    parameters say so, attention maps are left out with a note (they record one pass), and the
    gallery entry loads the hires settings back into the form."""
    driver = browser
    _open(driver, server)
    _set(driver, "prompt", PROMPT)
    _set(driver, "steps", 3)
    _set(driver, "seed", 21)
    assert not driver.find_element("id", "hr_scale").is_displayed()
    driver.find_element("id", "enable_hr").click()
    assert driver.find_element("id", "hr_scale").is_displayed()
    _set(driver, "hr_scale", 1.5)
    _set(driver, "hr_second_pass_steps", 2)
    _set(driver, "hr_denoising", 0.6)
    _js(driver, "document.getElementById('hr_upscaler').value = 'Latent (bicubic)'")
    src, _, _ = _run_and_watch(driver, driver.find_element("id", "generate").click)
    assert _png(src).size == (SIZE * 3 // 2, SIZE * 3 // 2)
    text = driver.find_element("id", "parameters").text
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic)" in text and "Denoising strength: 0.6" in text
    assert "npsd_attention_maps" in driver.find_element("id", "attention-note").text
    # the resize, the hires sampler and schedule type, the hires prompts: A1111's fields, as sent
    _set(driver, "hr_resize_x", SIZE + 8)
    _set(driver, "hr_resize_y", SIZE)
    _set(driver, "hr_prompt", "a blue square")
    _js(driver, "document.getElementById('sampler_name').value = 'Euler a'")
    _js(driver, "document.getElementById('hr_sampler_name').value = 'DPM++ 2M'")
    _js(driver, "document.getElementById('hr_scheduler').value = 'Karras'")
    src, _, _ = _run_and_watch(driver, driver.find_element("id", "generate").click)
    assert _png(src).size == (SIZE + 8, SIZE)
    text = driver.find_element("id", "parameters").text
    assert f"Hires resize: {SIZE + 8}x{SIZE}," in text and "Hires sampler: DPM++ 2M, Hires schedule type: Karras" in text \
        and "Hires prompt: a blue square" in text, text
    driver.find_element("id", "enable_hr").click()                    # off: the form forgets nothing
    _js(driver, "loadSettings(arguments[0])", {"mode": "txt2img", "enable_hr": True, "hr_scale": 2,
                                               "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 4,
                                               "denoising_strength": 0.45, "hr_resize_x": 0, "hr_resize_y": 0,
                                               "hr_prompt": "", "hr_sampler_name": "", "hr_scheduler": ""})
    assert driver.find_element("id", "enable_hr").is_selected()
    assert [_js(driver, f"return document.getElementById('{i}').value") for i in
            ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_denoising", "hr_resize_x", "hr_prompt",
             "hr_sampler_name", "hr_scheduler")] == ["2", "Latent (nearest)", "4", "0.45", "0", "", "Use same sampler",
                                                     "Use same scheduler"]
    _js(driver, "document.getElementById('sampler_name').value = ''")
    driver.find_element("id", "enable_hr").click()                    # leave the form as the other tests expect


def test_tiling_from_the_page(server, browser):
    """The tiling box sends A1111's tiling field: the parameters say "Tiling: True", and a gallery
    entry's settings set the box back."""
    driver = browser
    _open(driver, server)
    _set(driver, "prompt", PROMPT)
    _set(driver, "steps", 2)
    driver.find_element("id", "tiling").click()
    _run_and_watch(driver, driver.find_element("id", "generate").click)
    assert "Tiling: True" in driver.find_element("id", "parameters").text
    _js(driver, "loadSettings(arguments[0])", {"mode": "txt2img"})
    assert not driver.find_element("id", "tiling").is_selected()
    _js(driver, "loadSettings(arguments[0])", {"mode": "txt2img", "tiling": True})
    assert driver.find_element("id", "tiling").is_selected()
    driver.find_element("id", "tiling").click()                       # leave the form as the other tests expect


def test_error_is_one_line_on_the_page(server, browser):
    driver = browser
    _open(driver, server)
    _set(driver, "prompt", PROMPT)
    _set(driver, "steps", 0)
    driver.find_element("id", "generate").click()
    _wait(driver, "return document.getElementById('error').textContent !== ''", 30)
    error = driver.find_element("id", "error").text
    assert "steps" in error and "\n" not in error, error
    assert not _js(driver, "return document.body.classList.contains('running')")


def test_a_seed_beyond_what_javascript_holds_is_refused_on_the_page(server, browser):
    """JavaScript's numbers hold whole numbers exactly up to 2**53 - 1: a larger seed would reach the
    server rounded (2**60 + 1 as 2**60), so the page refuses it and names the ways that take it."""
    driver = browser
    _open(driver, server)
    _set(driver, "prompt", PROMPT)
    _set(driver, "seed", 2**60 + 1)
    driver.find_element("id", "generate").click()
    _wait(driver, "return document.getElementById('error').textContent !== ''", 30)
    error = driver.find_element("id", "error").text
    assert "2**53 - 1" in error and "--seed" in error and "\n" not in error, error
    assert not _js(driver, "return document.body.classList.contains('running')")


def test_one_column_on_a_phone(server, browser):
    driver = browser
    _open(driver, server)
    box = "return document.getElementById(arguments[0]).getBoundingClientRect().toJSON()"
    driver.set_window_size(1200, 900)
    form, output = _js(driver, box, "form"), _js(driver, box, "output")
    assert output["left"] >= form["right"], (form, output)          # side by side on a laptop
    driver.set_window_size(390, 844)
    form, output = _js(driver, box, "form"), _js(driver, box, "output")
    assert output["top"] >= form["bottom"], (form, output)          # stacked on a phone
    assert _js(driver, "return document.documentElement.scrollWidth") <= 390   # nothing wider than the screen
    driver.set_window_size(1200, 900)
