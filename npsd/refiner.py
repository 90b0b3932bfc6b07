"""AUTOMATIC1111's "Refiner": a second checkpoint takes over part-way through sampling.

A1111 checks, at the start of every model call (modules/sd_samplers_cfg_denoiser.py,
CFGDenoiser.forward, calling modules/sd_samplers_common.py's apply_refiner), how much of the
sampling is done, from the noise level sigma the sampler asks about:

    timestep        = argmin_j |sigma_j - sigma|        sigma_j: the model's training sigmas, j = 0..999
    completed_ratio = (999 - timestep) / 1000

and at the first call with completed_ratio >= switch_at it loads the refiner, encodes the prompts
again with the refiner's text encoder (p.setup_conds) and makes that call and every later one with
the refiner's UNet, on the same sampler, sigmas, noise and latents. That call may be the second
model call inside a step (Heun's, DPM++ 2S a's), whose sigma is the next step's or the midpoint's.
A1111's completed_ratio never reaches 1 (at most 0.999), so switch_at 1 never switches. The model
stays the refiner afterwards, so the refiner's VAE decodes the image.

With the hires fix, A1111's option hires_fix_refiner_pass ("Hires fix: which pass to enable refiner
for", default "second pass") says in which passes the switch is looked for. The second pass starts
with the model of A1111's settings again (the base, or the "Hires checkpoint"): its
StableDiffusionProcessingTxt2Img.sample reloads that model between the passes (reload_model_weights
with hr_checkpoint_info, None being the settings' checkpoint); what decodes the first pass for an
image upscaler is the model that ended it, what encodes the enlarged image the second pass's.

A1111's other way to count, the option refiner_switch_by_sample_steps (model calls made / calls
planned), is not remade here.
"""

from dataclasses import dataclass

import numpy as np

from .errors import InputError, is_number

# A1111's choices of hires_fix_refiner_pass (modules/shared_options.py) -> the passes (1, 2) it acts in
HIRES_PASSES = {"first pass": (1,), "second pass": (2,), "both passes": (1, 2)}
SWITCH_AT = 0.8                 # A1111's default "Switch at"


@dataclass(frozen=True)
class Refiner:
    """What Pipeline.txt2img(refiner=...) and img2img(refiner=...) switch to (A1111's "Refiner").

    pipeline     the refiner: an npsd.Pipeline (npsd.load(...)) of the same latent space and noise
                 schedule as the base; its text encoder, UNet and VAE take over
    switch_at    A1111's "Switch at", in [0, 1]: the completed ratio (module docstring) at which the
                 refiner takes over; 1 never switches
    hires_pass   with the hires fix, A1111's hires_fix_refiner_pass: "first pass", "second pass"
                 (A1111's default) or "both passes"
    name         what the PNG's "Refiner" field calls it (A1111: "NAME [hash]"); None: left out
    """
    pipeline: object
    switch_at: float = SWITCH_AT
    hires_pass: str = "second pass"
    name: str = None

    def __post_init__(self):
        if not hasattr(self.pipeline, "unet") or not hasattr(self.pipeline, "params"):
            raise InputError(f"refiner pipeline must be an npsd.Pipeline (npsd.load(PATH)), got "
                             f"{type(self.pipeline).__name__}")
        if not is_number(self.switch_at) or not 0 <= float(self.switch_at) <= 1:
            raise InputError(f"refiner switch_at must be a number in [0, 1] (1: never), got {self.switch_at!r}")
        if self.hires_pass not in HIRES_PASSES:
            raise InputError(f"refiner hires_pass must be one of {', '.join(HIRES_PASSES)}, got {self.hires_pass!r}")

    def acts_in(self, pass_number, hires):
        """True when the switch is looked for in this pass (1 or 2) of a call with (hires) or without the hires fix."""
        return not hires or pass_number in HIRES_PASSES[self.hires_pass]


def completed_ratio(sigma, sigma_table):
    """A1111's apply_refiner: (999 - timestep) / 1000 in float32, timestep the index of the training
    sigma nearest to sigma. sigma_table: float32 [1000]."""
    timestep = int(np.argmin(np.abs(sigma_table - np.float32(sigma))))
    return np.float32(999 - timestep) / np.float32(1000)


class SwitchingModel:
    """model(x, t) for npsd.schedulers.sample: base(x, t) until the first call whose completed ratio
    reaches switch_at (.switch_call, k), then refined(x, t), refined = make_refined(k) made at that call (the
    refiner's guided model, its prompts encoded by its own text encoder, counting model calls on
    from k as A1111's CFGDenoiser.step does). sigma_of(t) -> the call's sigma. .switched: whether it did."""

    def __init__(self, base, make_refined, sigma_of, sigma_table, switch_at):
        self.base, self.make_refined, self.sigma_of = base, make_refined, sigma_of
        self.sigma_table, self.switch_at = sigma_table, np.float32(switch_at)
        self.calls, self.refined, self.switch_call = 0, None, None

    @property
    def switched(self):
        return self.refined is not None

    def __call__(self, x, t):
        if self.refined is None and completed_ratio(self.sigma_of(t), self.sigma_table) >= self.switch_at:
            self.refined, self.switch_call = self.make_refined(self.calls), self.calls
        self.calls += 1
        return (self.base if self.refined is None else self.refined)(x, t)
