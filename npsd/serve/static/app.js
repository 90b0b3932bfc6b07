// The page of `npsd serve`: a form for /sdapi/v1/txt2img and /sdapi/v1/img2img (A1111's API), a progress
// view fed by /sdapi/v1/progress, and the gallery of /npsd/v1/gallery. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const PNG = "data:image/png;base64,";
const FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "seed", "subseed",
                "subseed_strength", "width", "height", "denoising_strength", "mask_blur", "inpainting_fill",
                "inpaint_full_res_padding"];
const HIRES_TEXT = ["hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler"];   // sent as they are
const NUMBERS = new Set(["steps", "cfg_scale", "seed", "subseed", "subseed_strength", "width", "height",
                         "denoising_strength", "mask_blur", "inpainting_fill", "inpaint_full_res_padding"]);
const INPAINT_ONLY = ["mask_blur", "inpainting_fill", "inpaint_full_res_padding"];
const POLL_MS = 200;
// A JavaScript number holds whole numbers exactly up to 2**53 - 1; the server takes seeds up to 2**64 - 1.
const SEED_TOO_LARGE = "the page can hold seeds up to 2**53 - 1 exactly; give larger ones through the API or " +
                       "the command line (npsd txt2img --seed)";

let running = false;
let lastSeed = null;

// ---- talking to the server ----

async function api(path, body) {
  const init = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorText(response, data));
  return data;
}

// A 422 carries {"detail": "one line"}; FastAPI's own validation errors carry a list of {loc, msg}.
function errorText(response, data) {
  const detail = data && data.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail) && detail.length) {
    const d = detail[0];
    return `${(d.loc || []).filter((x) => x !== "body").join(".")}: ${d.msg}`;
  }
  return `${response.status} ${response.statusText}`;
}

function showError(message) {
  $("error").textContent = message ? String(message).split("\n")[0] : "";
}

// ---- the form ----

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function setMode(value) {
  document.querySelector(`input[name=mode][value=${value}]`).checked = true;
  document.body.dataset.mode = value;
}

function formRequest() {
  const request = {};
  for (const name of FIELDS) {
    const value = $(name).value.trim();
    if (value === "") continue;
    request[name] = NUMBERS.has(name) ? Number(value) : value;
  }
  for (const name of ["seed", "subseed"]) {
    if (request[name] !== undefined && !Number.isSafeInteger(request[name])) throw new Error(SEED_TOO_LARGE);
  }
  if ($("attention-maps").checked) request.npsd_attention_maps = true;
  if ($("tiling").checked) request.tiling = true;
  if (mode() !== "inpaint") {
    for (const name of INPAINT_ONLY) delete request[name];
  }
  if (mode() === "txt2img") {
    delete request.denoising_strength;
    if ($("enable_hr").checked) {                 // A1111's hires fix: its fields, its denoising strength
      request.enable_hr = true;
      request.hr_upscaler = $("hr_upscaler").value;
      for (const [name, id] of [["hr_scale", "hr_scale"], ["hr_second_pass_steps", "hr_second_pass_steps"],
                                ["denoising_strength", "hr_denoising"], ["hr_resize_x", "hr_resize_x"],
                                ["hr_resize_y", "hr_resize_y"]]) {
        if ($(id).value.trim() !== "") request[name] = Number($(id).value);
      }
      for (const name of HIRES_TEXT) request[name] = $(name).value;   // "" and "Use same ...": the first pass's
    }
    return request;
  }
  if (!initImage()) throw new Error("img2img and inpaint need an image: choose one under 'image' first");
  request.init_images = [initImage()];
  if (mode() === "inpaint") {
    if (!maskPainted) throw new Error("inpaint needs a mask: paint the area to repaint over the image first");
    request.mask = maskPng();
    request.inpaint_full_res = $("inpaint_full_res").checked;
  }
  return request;
}

// Puts a gallery entry's settings (request fields, its mode and model) back into the form.
function loadSettings(settings) {
  for (const name of FIELDS) {
    if (settings[name] !== undefined && settings[name] !== null) $(name).value = settings[name];
  }
  if (!settings.subseed_strength) {                 // (no variation seed: the fields go back to none)
    $("subseed").value = "";
    $("subseed_strength").value = 0;
  }
  $("inpaint_full_res").checked = Boolean(settings.inpaint_full_res);
  $("tiling").checked = Boolean(settings.tiling);
  if (["txt2img", "img2img", "inpaint"].includes(settings.mode)) setMode(settings.mode);
  $("enable_hr").checked = Boolean(settings.enable_hr);
  if (settings.enable_hr) {
    $("hr_scale").value = settings.hr_scale;
    $("hr_upscaler").value = settings.hr_upscaler;
    $("hr_second_pass_steps").value = settings.hr_second_pass_steps;
    $("hr_denoising").value = settings.denoising_strength;
    $("hr_resize_x").value = settings.hr_resize_x || 0;
    $("hr_resize_y").value = settings.hr_resize_y || 0;
    $("hr_prompt").value = settings.hr_prompt || "";
    $("hr_negative_prompt").value = settings.hr_negative_prompt || "";
    $("hr_sampler_name").value = settings.hr_sampler_name || "Use same sampler";
    $("hr_scheduler").value = settings.hr_scheduler || "Use same scheduler";
  }
  const model = settings.sd_model_checkpoint;
  if (model && model !== $("model").value && [...$("model").options].some((o) => o.value === model)) {
    $("model").value = model;
    switchModel();
  }
}

// ---- the input image and its mask ----

let maskPainted = false;

function initImage() {
  const src = $("init-image").getAttribute("src") || "";
  return src.startsWith("data:") ? src.slice(src.indexOf(",") + 1) : null;
}

async function setInitImage(url) {
  // A gallery picture has a URL; the request needs the bytes, so read it into a data: URL first.
  const dataUrl = url.startsWith("data:") ? url : await readFile(await (await fetch(url)).blob());
  const img = $("init-image");
  img.onload = () => {
    const canvas = $("mask");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    $("brush").max = Math.max(img.naturalWidth, img.naturalHeight) / 2;
    $("brush").value = Math.max(1, Math.round(img.naturalWidth / 8));
    $("canvas-box").hidden = false;
    clearMask();
  };
  img.onerror = () => showError("that file is not an image the browser can read; choose a PNG or JPEG");
  img.src = dataUrl;
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
}

// The mask A1111 expects: white = repaint, black = keep, the size of the image.
function maskPng() {
  const canvas = $("mask");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return out.toDataURL("image/png").slice(PNG.length);
}

function setupMaskPainting() {
  const canvas = $("mask");
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width,
            (event.clientY - box.top) * canvas.height / box.height];
  };
  const paint = (event) => {
    const ctx = canvas.getContext("2d");
    const [x, y] = point(event);
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = Number($("brush").value);
    ctx.lineCap = "round";
    ctx.beginPath();
    if (last) { ctx.moveTo(last[0], last[1]); ctx.lineTo(x, y); ctx.stroke(); }
    else { ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI); ctx.fill(); }
    last = [x, y];
    maskPainted = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = null;
    paint(event);
  });
  canvas.addEventListener("pointermove", (event) => { if (last) paint(event); });
  const stop = () => { last = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---- generating ----

async function generate() {
  if (running) return;
  showError("");
  let request;
  try { request = formRequest(); } catch (error) { showError(error.message); return; }
  const route = mode() === "txt2img" ? "/sdapi/v1/txt2img" : "/sdapi/v1/img2img";
  setRunning(true);
  if (matchMedia("(max-width: 700px)").matches) $("output").scrollIntoView({behavior: "smooth"});   // one column
  const poller = pollProgress();
  $("attention-note").textContent = "";
  try {
    let response;
    try {
      response = await api(route, request);
    } catch (error) {
      // the maps need a plain prompt (no A1111 emphasis or editing): then make the image without them
      if (!request.npsd_attention_maps || !error.message.startsWith("npsd_attention_maps")) throw error;
      delete request.npsd_attention_maps;
      $("attention-note").textContent = error.message;
      response = await api(route, request);
    }
    showResult(response);
    await loadGallery();
  } catch (error) {
    showError(error.message);
  } finally {
    poller.stop();
    setRunning(false);
  }
}

function setRunning(value) {
  running = value;
  document.body.classList.toggle("running", value);
  $("generate").disabled = value;
  $("interrupt").disabled = !value;
  $("progress-box").hidden = !value;
  $("preview").hidden = true;
  if (value) {
    $("progress").value = 0;
    $("progress-text").textContent = "starting";
  }
}

function pollProgress() {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      const p = await api("/sdapi/v1/progress");
      if (!stopped) showProgress(p);
    } catch (error) { /* a missed poll only delays the next update */ }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };
  timer = setTimeout(tick, POLL_MS / 2);
  return {stop() { stopped = true; clearTimeout(timer); }};
}

function showProgress(p) {
  const state = p.state || {};
  const extra = p.npsd || {};
  $("progress").value = p.progress || 0;
  const parts = [];
  if (state.sampling_steps) parts.push(`step ${state.sampling_step} / ${state.sampling_steps}`);
  if (extra.step_seconds) parts.push(`${extra.step_seconds.toFixed(2)} s/step`);
  if (p.eta_relative) parts.push(`${p.eta_relative.toFixed(1)} s left`);
  if (extra.queue) parts.push(`${extra.queue} waiting in the queue`);
  $("progress-text").textContent = parts.join(" · ") || "waiting";
  if (p.current_image) {
    const preview = $("preview");
    preview.src = PNG + p.current_image;
    preview.hidden = false;
    $("result").hidden = true;
  }
}

function showResult(response) {
  const result = $("result");
  result.src = PNG + response.images[0];
  result.hidden = false;
  $("preview").hidden = true;
  $("result-actions").hidden = false;
  let info = {};
  try { info = JSON.parse(response.info); } catch (error) { /* info is optional text */ }
  $("parameters").textContent = (info.infotexts && info.infotexts[0]) || "";
  lastSeed = info.seed !== undefined ? info.seed : null;
  showAttention((response.npsd && response.npsd.attention_maps) || []);
}

function showAttention(maps) {
  const box = $("attention");
  box.replaceChildren();
  for (const {word, image} of maps) {               // each picture carries its word, drawn by the server
    const img = document.createElement("img");
    img.src = PNG + image;
    img.alt = img.title = word;
    img.dataset.word = word;
    box.append(img);
  }
}

async function loadGallery() {
  let entries;
  try { entries = await api("/npsd/v1/gallery"); } catch (error) { return; }
  const box = $("gallery");
  box.replaceChildren();
  for (const entry of entries.slice().reverse()) {
    const img = document.createElement("img");
    img.src = entry.url;
    img.alt = entry.parameters || "";
    img.title = `${entry.parameters || ""}\n(click: load these settings)`;
    img.loading = "lazy";
    img.addEventListener("click", () => {
      loadSettings(entry.settings || {});
      const result = $("result");
      result.src = entry.url;
      result.hidden = false;
      $("parameters").textContent = entry.parameters || "";
      $("attention").replaceChildren();
      $("result-actions").hidden = false;
      lastSeed = entry.settings && entry.settings.seed !== undefined ? entry.settings.seed : null;
    });
    box.append(img);
  }
}

// ---- models and samplers ----

async function loadChoices() {
  const [samplers, schedulers, latent, image, models, options] = await Promise.all([api("/sdapi/v1/samplers"),
    api("/sdapi/v1/schedulers"), api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers"),
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/options")]);
  const upscalers = [...latent, ...image];
  $("sampler_name").append(...samplers.map((s) => new Option(s.name, s.name)));
  $("scheduler").append(...schedulers.map((s) => new Option(s.label, s.label)));
  $("hr_upscaler").append(...upscalers.map((u) => new Option(u.name, u.name)));
  $("hr_sampler_name").append(...samplers.map((s) => new Option(s.name, s.name)));
  $("hr_scheduler").append(...schedulers.map((s) => new Option(s.label, s.label)));
  $("model").replaceChildren(...models.map((m) => new Option(m.model_name || m.title, m.title)));
  if (options.sd_model_checkpoint) $("model").value = options.sd_model_checkpoint;
}

async function switchModel() {
  const title = $("model").value;
  $("model-status").textContent = "loading...";
  $("generate").disabled = true;
  try {
    await api("/sdapi/v1/options", {sd_model_checkpoint: title});
    $("model-status").textContent = "";
  } catch (error) {
    $("model-status").textContent = "";
    showError(error.message);
    const options = await api("/sdapi/v1/options").catch(() => ({}));
    if (options.sd_model_checkpoint) $("model").value = options.sd_model_checkpoint;
  } finally {
    $("generate").disabled = running;
  }
}

// ---- wiring ----

function setup() {
  setMode(mode());
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => setMode(radio.value));
  }
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); generate(); }
  });
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch((e) => showError(e.message)));
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
  $("reuse-seed").addEventListener("click", () => {
    if (lastSeed === null) return;
    if (Number.isSafeInteger(lastSeed)) $("seed").value = lastSeed; else showError(SEED_TOO_LARGE);
  });
  $("use-as-input").addEventListener("click", () => {
    setInitImage($("result").src).catch((error) => showError(error.message));
    if (mode() === "txt2img") setMode("img2img");
  });
  $("model").addEventListener("change", switchModel);
  $("clear-mask").addEventListener("click", clearMask);
  $("init-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) await setInitImage(await readFile(file)).catch((error) => showError(error.message));
  });
  setupMaskPainting();
  // Small images (the built-in model's 64x64) are scaled up with visible pixels rather than blurred.
  document.addEventListener("load", (event) => {
    if (event.target.tagName === "IMG") event.target.classList.toggle("small", event.target.naturalWidth < 256);
  }, true);
  loadChoices().catch((error) => showError(error.message));
  loadGallery();
}

setup();
