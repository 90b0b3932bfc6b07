"""AUTOMATIC1111's "Refiner" and "Hires checkpoint" (npsd/refiner.py, Pipeline.txt2img(refiner=...) and
img2img(refiner=...), npsd.hires.Hires(checkpoint=...)) against an A1111 run with two checkpoints.

The reference is tests/test_a1111_pipeline.py's A1111 run (diffusers' tiny random models, k-diffusion's
samplers on A1111's sigmas, the image's torch generator), with two different sets of tiny models (text
encoder, UNet, VAE) as the base and the refiner (and a third as the hires checkpoint), and with A1111's
switch written out as modules/sd_samplers_common.py's apply_refiner computes it, at the start of each
CFGDenoiser.forward (modules/sd_samplers_cfg_denoiser.py):

    timestep = argmin |CompVisDenoiser.sigmas - max(sigma)|;  completed_ratio = (999 - timestep) / 1000
    if not completed_ratio < switch_at: load the refiner, encode the prompts with its text encoder
    (p.setup_conds), and make this call and the later ones with its UNet;

the image decoded by the model loaded at the end (processing.py's decode_latent_batch(p.sd_model, ...)).
With the hires fix (modules/processing.py, StableDiffusionProcessingTxt2Img.sample): the switch is
looked for in the passes that hires_fix_refiner_pass names; between the passes, an image upscaler's
image is decoded by the model that ended the first pass, then reload_model_weights(info=
hr_checkpoint_info) loads the hires checkpoint or, with "Use same checkpoint", the settings' model (the
base) again, whose VAE encodes the enlarged image and whose text encoder encodes the hires prompts.

TOL_IMAGE = 2e-5 relative (images in [0, 1]), as tests/test_a1111_pipeline.py: measured 1.6e-6 to
8.9e-6 (printed; the largest with the hires checkpoint and Heun). TOL_8BIT = 1e-4 where the first pass
goes through A1111's 8-bit image (tests/test_hires_options.py: a value within rounding of a level's
edge may land one level apart): measured 2.3e-6 to 3.6e-6. npsd's switch call is also checked to be
A1111's. The small real bugs of BUGS fail on those tolerances (test_refiner_bugs_fail): the switch
one model call early or late (9.5e-2, 1.1e-2, 1.9e-2), the refiner guided by the base's text
encoder's conds (5.2e-4), the image decoded by the base's VAE (0.94), the refiner in the first pass
where A1111's option says the second (0.92), the second pass kept on the refiner that ended the first
(0.90), the image upscaler's image decoded by the base instead of the refiner that ended the first
pass (1.1e-2), the hires checkpoint ignored (0.90); in img2img the switch one call late (0.20) and the
image decoded by the base's VAE (0.83).
"""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel
from diffusers import AutoencoderKL

import npsd
from npsd.errors import InputError
from npsd.hires import Hires
from npsd.refiner import Refiner, SwitchingModel
from npsd.testing import assert_close
from tests.helpers import assert_caught, perturb_
from tests.test_a1111_pipeline import GUIDANCE, NEGATIVE, PROMPT, _LDM, a1111_resize_with_upscaler
from tests.test_hires_options import a1111_sample
from tests.test_kdiffusion import kd  # noqa: F401 - the fixture
from tests.test_cli import gen, model, run  # noqa: F401 - the fixture
from tests.test_pipelines import SCHED, SIZE, make_image, models, npsd_pipe, reference, tiny_unet  # noqa: F401

TOL_IMAGE = 2e-5
TOL_8BIT = 1e-4
OPT_F = 2                       # the tiny VAE's factor: A1111's opt_f for this model
PASSES = {"first pass": (1,), "second pass": (2,), "both passes": (1, 2)}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def other_models(models, seed):
    """Another checkpoint of the same design: its own text encoder, UNet and VAE (the tokenizer is shared)."""
    torch.manual_seed(seed)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=77, hidden_act="quick_gelu")).eval(), seed)
    vae = perturb_(AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                 layers_per_block=1, sample_size=SIZE).eval(), seed + 1)
    return {"text": text, "vae": vae, "unet4": tiny_unet(4, seed=seed + 2), "tok": models["tok"]}


@pytest.fixture(scope="module")
def refiner_models(models):  # noqa: F811
    return other_models(models, 11)


@pytest.fixture(scope="module")
def hires_models(models):  # noqa: F811
    return other_models(models, 21)


class A1111Denoiser:
    """CFGDenoiser with apply_refiner (module docstring) for one pass: starts on `model`; when `refiner`
    is given (the pass is one hires_fix_refiner_pass names), switches to it at the first call whose
    completed ratio is not below switch_at. .current: the model loaded now; .switch_call: the call it
    switched at."""

    def __init__(self, kd, model, prompt, negative, refiner=None, switch_at=None):  # noqa: F811
        self.kd, self.prompt, self.negative = kd, prompt, negative
        self.refiner, self.switch_at, self.calls, self.switch_call = refiner, switch_at, 0, None
        self.load(model)

    def load(self, model):                        # reload_model_weights, then p.setup_conds()
        self.current = model
        ref = reference(StableDiffusionPipeline, model, EulerDiscreteScheduler(**SCHED))
        self.cond, self.uncond = ref.encode_prompt(self.prompt, "cpu", 1, True, self.negative)
        self.den = self.kd.external.CompVisDenoiser(_LDM(model["unet4"], ref.scheduler.alphas_cumprod.float()))

    def __call__(self, x, sigma, **_):
        if self.refiner is not None and self.current is not self.refiner:
            timestep = torch.argmin(torch.abs(self.den.sigmas - torch.max(sigma)))
            completed_ratio = (999 - timestep) / 1000
            if not completed_ratio < self.switch_at:
                self.load(self.refiner)
                self.switch_call = self.calls
        self.calls += 1
        out = self.den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([self.cond, self.uncond]))
        d_cond, d_uncond = out.chunk(2)
        return d_uncond + (d_cond - d_uncond) * GUIDANCE


def a1111_refiner_run(kd, base, refiner, sampler, schedule_type, seed, steps, switch_at, hires=None,  # noqa: F811
                      hires_pass="second pass", hires_model=None, strength=None):
    """A1111's txt2img with a refiner (and the hires fix: hires (scale, upscaler "latent" or "none", steps,
    strength), hires_model its checkpoint), or with strength its img2img of make_image() (the image
    encoded by the base's VAE, the posterior's mean) -> (images [1, H, W, 3] in [0, 1], the switch
    calls per pass)."""
    vae_scaling = reference(StableDiffusionPipeline, base, EulerDiscreteScheduler(**SCHED)).vae.config.scaling_factor

    def run(den, x, n, t_enc):                 # sample (t_enc None) or sample_img2img, the seed's generator
        return a1111_sample(kd, den, x, n, t_enc, sampler, schedule_type, seed)

    with torch.no_grad():
        acts = PASSES[hires_pass] if hires is not None else (1,)
        refiner = refiner if switch_at is not None else None
        den = A1111Denoiser(kd, base, PROMPT, NEGATIVE, refiner if 1 in acts else None, switch_at)
        if strength is None:
            x = run(den, torch.zeros(1, 4, SIZE // OPT_F, SIZE // OPT_F), steps, None)
        else:
            pixels = torch.from_numpy(np.asarray(make_image(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            x0 = base["vae"].encode(pixels).latent_dist.mean * vae_scaling
            x = run(den, x0, steps, int(min(strength, 0.999) * steps))
        switches = [den.switch_call]
        if hires is not None:
            scale, upscaler, hr_steps, hr_strength = hires
            side = int(SIZE * scale)
            second = hires_model or base                              # reload_model_weights(info=hr_checkpoint_info)
            if upscaler == "latent":
                x = torch.nn.functional.interpolate(x, size=(side // OPT_F, side // OPT_F), mode="bilinear")
            else:                       # decoded by the model that ended the first pass, encoded by the second's
                lowres = torch.clamp((den.current["vae"].decode(x / vae_scaling).sample + 1.0) / 2.0, 0.0, 1.0)
                x_sample = (255. * np.moveaxis(lowres[0].numpy(), 0, 2)).astype(np.uint8)
                image = a1111_resize_with_upscaler(Image.fromarray(x_sample), side, side, "None")
                image = torch.from_numpy(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))[None]
                x = second["vae"].encode(image * 2 - 1).latent_dist.mean * vae_scaling
            den = A1111Denoiser(kd, second, PROMPT, NEGATIVE, refiner if 2 in acts else None, switch_at)
            x = run(den, x, hr_steps, int(min(hr_strength, 0.999) * hr_steps))
            switches.append(den.switch_call)
        image = den.current["vae"].decode(x / vae_scaling).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), switches


class Recorded(SwitchingModel):
    """npsd's SwitchingModel, keeping each pass's switch call in `log`."""
    log = []

    def __call__(self, x, t):
        out = super().__call__(x, t)
        if self.calls == 1:
            Recorded.log.append(self)
        return out


def npsd_run(models, pipe, refiner_pipe, sampler, schedule_type, seed, steps, switch_at, hires=None,
             hires_pass="second pass", hires_pipe=None, monkeypatch=None, model_class=None, strength=None):
    """npsd's txt2img (with strength: img2img) of the same run -> (images, the switch calls per pass).
    model_class: what switches (default npsd's SwitchingModel, recorded)."""
    Recorded.log = []
    monkeypatch.setattr("npsd.pipeline.SwitchingModel", model_class or Recorded)
    hr, refiner = None, (None if switch_at is None else Refiner(refiner_pipe, switch_at, hires_pass))
    if hires is not None:
        scale, upscaler, hr_steps, hr_strength = hires
        hr = Hires(scale=scale, upscaler=upscaler, steps=hr_steps, strength=hr_strength, checkpoint=hires_pipe)
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
              seed=seed, rng="torch", sampler=sampler, schedule_type=schedule_type, output_type="np", refiner=refiner)
    if strength is not None:
        out = pipe.img2img(PROMPT, make_image(), strength=strength, **kw)
    else:
        out = pipe.txt2img(PROMPT, hires=hr, **kw)
    return out, [m.switch_call for m in Recorded.log]


CASES = {  # name: (sampler, schedule type, steps, switch_at (None: no refiner), hires, hires_pass, hires checkpoint)
    "euler a, 0.5": ("euler_a", "automatic", 6, 0.5, None, "second pass", False),
    "heun, 0.8 (inside a step)": ("heun", "karras", 5, 0.8, None, "second pass", False),
    "dpm++ 2s a, 0.5": ("dpmpp_2s_a", "automatic", 5, 0.5, None, "second pass", False),
    "dpm++ 2m, 0.8": ("dpmpp_2m", "karras", 6, 0.8, None, "second pass", False),
    "dpm++ 2m, 1.0 (never)": ("dpmpp_2m", "automatic", 4, 1.0, None, "second pass", False),
    "hires, second pass": ("euler_a", "automatic", 4, 0.8, (1.5, "latent", 4, 0.6), "second pass", False),
    "hires, first pass": ("dpmpp_2m", "automatic", 4, 0.5, (1.5, "latent", 4, 0.6), "first pass", False),
    "hires, both passes, image upscaler": ("euler", "automatic", 4, 0.8, (1.5, "none", 4, 0.6), "both passes", False),
    "hires checkpoint, image upscaler": ("euler_a", "automatic", 4, 0.5, (1.5, "none", 4, 0.6), "first pass", True),
    "hires checkpoint, both passes": ("heun", "automatic", 4, 0.8, (1.5, "latent", 3, 0.6), "both passes", True),
    "hires checkpoint alone": ("dpmpp_2m", "automatic", 4, None, (1.5, "latent", 3, 0.6), "second pass", True),
    "hires checkpoint alone, image upscaler": ("euler_a", "karras", 4, None, (1.5, "none", 3, 0.6), "second pass",
                                               True),
    # img2img (an 8th item: the strength)
    "img2img, dpm++ 2m, 0.8": ("dpmpp_2m", "automatic", 6, 0.8, None, "second pass", False, 0.6),
    "img2img, heun, 0.5": ("heun", "karras", 5, 0.5, None, "second pass", False, 0.75),
}


def _pipes(models, refiner_models, hires_models):
    return npsd_pipe(models), npsd_pipe(refiner_models), npsd_pipe(hires_models)


@pytest.mark.parametrize("case", CASES)
def test_refiner_equals_an_a1111_run(kd, models, refiner_models, hires_models, case, monkeypatch):  # noqa: F811
    sampler, schedule_type, steps, switch_at, hires, hires_pass, with_checkpoint, *strength = CASES[case]
    strength = strength[0] if strength else None
    pipe, refiner_pipe, hires_pipe = _pipes(models, refiner_models, hires_models)
    ours, our_switches = npsd_run(models, pipe, refiner_pipe, sampler, schedule_type, 21, steps, switch_at, hires,
                                  hires_pass, hires_pipe if with_checkpoint else None, monkeypatch, strength=strength)
    ref, switches = a1111_refiner_run(kd, models, refiner_models, sampler, schedule_type, 21, steps, switch_at, hires,
                                      hires_pass, hires_models if with_checkpoint else None, strength)
    print(f"\n  {case}: switched at model calls {switches} (npsd {our_switches})")
    assert [s for s in our_switches if s is not None] == [s for s in switches if s is not None]
    tol = TOL_8BIT if hires is not None and hires[1] == "none" else TOL_IMAGE
    print(assert_close(ours, ref, tol, f"{case} vs A1111"))


class SwitchAt(SwitchingModel):
    """A wrong switch: at model call `call` of the first pass with a refiner, whatever the ratio says."""
    call = None

    def __call__(self, x, t):
        if self.refined is None and self.calls == SwitchAt.call:
            self.refined, self.switch_call = self.make_refined(self.calls), self.calls
        self.calls += 1
        return (self.base if self.refined is None else self.refined)(x, t)


def _with(pipe, other, part):
    """pipe with other's text encoder or VAE (part): a refiner whose conds or decode are the base's."""
    return npsd.Pipeline(dict(pipe.params, **{part: other.params[part]}), pipe.config)


# bug: (case, what npsd runs instead: a function of (the base, refiner and hires pipelines, the right
# switch call) -> keyword arguments of npsd_run)
BUGS = {
    "the switch one call late": ("heun, 0.8 (inside a step)", lambda p, r, h, k: dict(switch_call=k + 1)),
    "the switch one call early": ("dpm++ 2s a, 0.5", lambda p, r, h, k: dict(switch_call=k - 1)),
    "the switch one call late, ancestral": ("euler a, 0.5", lambda p, r, h, k: dict(switch_call=k + 1)),
    "the refiner guided by the base's conds": ("dpm++ 2m, 0.8",
                                                lambda p, r, h, k: dict(refiner_pipe=_with(r, p, "text_encoder"))),
    "the image decoded by the base's VAE": ("euler a, 0.5", lambda p, r, h, k: dict(refiner_pipe=_with(r, p, "vae"))),
    "the refiner in the first pass, not the second": ("hires, second pass",
                                                       lambda p, r, h, k: dict(hires_pass="first pass")),
    "the second pass kept on the refiner": ("hires, first pass", lambda p, r, h, k: dict(hires_pipe=r)),
    "the image upscaler's image decoded by the base": ("hires, both passes, image upscaler",
                                                       lambda p, r, h, k: dict(decode_first=p)),
    "the hires checkpoint ignored": ("hires checkpoint alone", lambda p, r, h, k: dict(hires_pipe=None)),
    "img2img: the switch one call late": ("img2img, heun, 0.5", lambda p, r, h, k: dict(switch_call=k + 1)),
    "img2img: the image decoded by the base's VAE": ("img2img, dpm++ 2m, 0.8",
                                                     lambda p, r, h, k: dict(refiner_pipe=_with(r, p, "vae"))),
}


@pytest.mark.parametrize("bug", BUGS)
def test_refiner_bugs_fail(kd, models, refiner_models, hires_models, bug, monkeypatch):  # noqa: F811
    case, wrong = BUGS[bug]
    sampler, schedule_type, steps, switch_at, hires, hires_pass, with_checkpoint, *strength = CASES[case]
    strength = strength[0] if strength else None
    pipe, refiner_pipe, hires_pipe = _pipes(models, refiner_models, hires_models)
    ref, switches = a1111_refiner_run(kd, models, refiner_models, sampler, schedule_type, 21, steps, switch_at, hires,
                                      hires_pass, hires_models if with_checkpoint else None, strength)
    kw = dict(refiner_pipe=refiner_pipe, hires_pass=hires_pass, hires_pipe=hires_pipe if with_checkpoint else None)
    kw.update(wrong(pipe, refiner_pipe, hires_pipe, next((s for s in switches if s is not None), None)))
    switch_call, decode_first = kw.pop("switch_call", None), kw.pop("decode_first", None)
    if decode_first is not None:        # the first pass's image decoded by the base, not by the refiner
        monkeypatch.setattr(npsd.Pipeline, "_hires_pass", _decoded_by(npsd.Pipeline._hires_pass, decode_first))
    tol = TOL_8BIT if hires is not None and hires[1] == "none" else TOL_IMAGE

    def check():
        ours, _ = npsd_run(models, pipe, kw["refiner_pipe"], sampler, schedule_type, 21, steps, switch_at, hires,
                           kw["hires_pass"], kw["hires_pipe"], monkeypatch, SwitchAt if switch_call is not None else None,
                           strength)
        assert_close(ours, ref, tol, bug)
    SwitchAt.call = switch_call
    assert_caught(bug, check)


def _decoded_by(hires_pass, pipe):
    def run(self, x0, hires, settings, first, eta, callback, progress, done, ended_by=None, refiner=None):
        return hires_pass(self, x0, hires, settings, first, eta, callback, progress, done, pipe, refiner)
    return run


def test_refiner_errors_are_one_line(models, refiner_models):  # noqa: F811
    pipe, refiner_pipe = npsd_pipe(models), npsd_pipe(refiner_models)
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, seed=1, output_type="latent")
    a1111 = dict(kw, sampler="euler", schedule_type="automatic")
    cases = [(lambda: Refiner(refiner_pipe, 1.5), r"refiner switch_at must be a number in \[0, 1\] \(1: never\)"),
             (lambda: Refiner(refiner_pipe, hires_pass="third pass"),
              "refiner hires_pass must be one of first pass, second pass, both passes, got 'third pass'"),
             (lambda: Refiner("model.safetensors"), "refiner pipeline must be an npsd.Pipeline"),
             (lambda: Hires(checkpoint="model.safetensors"), "hires checkpoint must be an npsd.Pipeline"),
             (lambda: pipe.txt2img(PROMPT, refiner=refiner_pipe, **a1111),
              r"refiner must be an npsd.refiner.Refiner\(pipeline, switch_at\) or None, got Pipeline"),
             (lambda: pipe.txt2img(PROMPT, refiner=Refiner(refiner_pipe), **kw),
              "the refiner's switch is A1111's, computed from the noise levels of its schedules: give a schedule_type"),
             (lambda: pipe.txt2img(PROMPT + " <lora:ink:0.5>", refiner=Refiner(refiner_pipe), prompt_syntax="a1111",
                                   **a1111), r"<lora:...> tags with a refiner or hires checkpoint"),
             (lambda: pipe.txt2img(PROMPT, hires=Hires(checkpoint=npsd_pipe(models, "unet9")), **a1111),
              "the hires checkpoint and this model must both be ordinary UNets")]
    v_model = npsd_pipe(refiner_models)
    v_model.config["scheduler"]["prediction_type"] = "v_prediction"
    cases.append((lambda: pipe.txt2img(PROMPT, refiner=Refiner(v_model), **a1111),
                  "the refiner's noise schedule differs from this model's; npsd switches only between models of one "
                  "latent space and noise schedule"))
    for call, message in cases:
        with pytest.raises(InputError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


# --- the command line and the PNG ---------------------------------------------------------------

@pytest.fixture(scope="module")
def refiner_folder(models, tmp_path_factory):  # noqa: F811
    """Another tiny model saved as a diffusers folder "tiny-refiner" in a folder of models."""
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-refiner"
    other = other_models(models, 31)
    other["text"].save_pretrained(folder / "text_encoder")
    other["vae"].save_pretrained(folder / "vae")
    other["unet4"].save_pretrained(folder / "unet")
    return folder


def test_refiner_and_hires_checkpoint_on_the_command_line(model, refiner_folder, tmp_path, capsys):  # noqa: F811
    from npsd.generation import file_hash
    from npsd.pngmeta import read_parameters
    common = ["--seed", 3, "--sampler", "euler_a", "--schedule-type", "automatic", "--rng", "torch"]
    title = f"tiny-refiner [{file_hash(refiner_folder / 'unet' / 'diffusion_pytorch_model.safetensors')}]"
    runs = {"refiner": ["--refiner", refiner_folder, "--refiner-switch-at", 0.5],
            "hires checkpoint": ["--hires-scale", 2, "--hires-steps", 2, "--hires-checkpoint", refiner_folder],
            "both, first pass": ["--refiner", refiner_folder, "--hires-scale", 2, "--hires-steps", 2,
                                 "--hires-refiner-pass", "first pass"]}
    fields = {"refiner": [f"Refiner: {title}", "Refiner switch at: 0.5"], "hires checkpoint": [f"Hires checkpoint: {title}"],
              "both, first pass": [f"Refiner: {title}", "Refiner switch at: 0.8", "Hires refiner: first pass"]}
    for name, options in runs.items():
        a, b, plain = tmp_path / f"{name}-a.png", tmp_path / f"{name}-b.png", tmp_path / f"{name}-plain.png"
        gen(capsys, model, a, *common, *options)
        text = read_parameters(str(a))
        for field in fields[name]:
            assert field in text, (name, text)
        # --from-png finds the checkpoint by name in --models-dir and remakes the image
        gen(capsys, model, b, "--models-dir", refiner_folder.parent, "--from-png", a, prompt=None)
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), name
        assert read_parameters(str(b)) == text
        # (without the second model the image differs)
        gen(capsys, model, plain, *common, *[o for o in options if o is not refiner_folder and o not in (
            "--refiner", "--hires-checkpoint", "--refiner-switch-at", 0.5, "--hires-refiner-pass", "first pass")])
        assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(plain))), name
    from npsd.pngmeta import png_info, settings_from_png
    a1111 = tmp_path / "a1111-img2img.png"                 # (the command line's img2img has no refiner)
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=png_info(f"{PROMPT}\nSteps: 2, Sampler: Euler a, Seed: 5, Size: "
                                                            f"16x16, Denoising strength: 0.5, Refiner: other [0123456789], "
                                                            f"Refiner switch at: 0.8"))
    with pytest.warns(UserWarning, match=r"does not apply \(Refiner: other \[0123456789\], Refiner switch at: 0.8\)"):
        settings_from_png(str(a1111), "img2img")
    rc, _, err = run(["txt2img", "--from-png", tmp_path / "refiner-a.png", "--model", model, "-o", tmp_path / "c.png",
                      "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "the image used the refiner 'tiny-refiner'; give --models-dir" in err
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "d.png", "--refiner", refiner_folder,
                      "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "give --schedule-type" in err
    rc, _, err = run(["txt2img", PROMPT, "--model", model, "-o", tmp_path / "d.png", "--refiner-switch-at", 0.5,
                      "--quiet"], capsys)
    assert rc != 0 and err.count("\n") == 1 and "--refiner-switch-at is the refiner's; give --refiner PATH" in err
