"""Helpers for parity tests against the torch references (diffusers, transformers), and the small
real bugs that the sensitivity tests inject into npsd to show that each parity check can fail."""

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from npsd import guidance, nn
from npsd import unet as unet_model
from npsd import vae as vae_model
from npsd.params import unflatten

torch.set_num_threads(max(1, torch.get_num_threads()))


def perturb_(model, seed=0):
    """Give every parameter a random value that a bug could not ignore: norm weights
    1 + 0.1 N(0,1), every bias 0.1 N(0,1); other weights keep their random initialisation.
    Zero-initialised weights (none in SD's modules, but checked) get N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
                if isinstance(mod, norm_types) and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                elif name == "bias":
                    p.copy_(0.1 * noise)
                elif float(p.abs().max()) == 0.0:
                    p.copy_(0.02 * noise)
    return model


def to_numpy_params(state_dict, strip_prefix="", drop=()):
    """torch state dict -> npsd nested params (float32 NumPy arrays)."""
    flat = {}
    for k, v in state_dict.items():
        if k.startswith(strip_prefix):
            k = k[len(strip_prefix):]
        if any(d in k for d in drop):
            continue
        flat[k] = v.detach().to(torch.float32).numpy().copy()
    return unflatten(flat)


def t2n(x):
    return x.detach().to(torch.float32).numpy()


def n2t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


# ---------------------------------------------------------------------------------------------
# Small real bugs, injected into npsd by the sensitivity tests (tests/test_sensitivity.py for
# layers, blocks and tiny models; the full-size test files for whole components and pipelines)
# ---------------------------------------------------------------------------------------------

def gelu_tanh(x):
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks &
    Gimpel 2016): within 4.7e-4 of the exact (erf) GELU that SD's GEGLU uses."""
    inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x ** 3)
    return (np.float32(0.5) * x * (1 + np.tanh(inner))).astype(np.float32)


def _geglu_with_tanh_gelu(original):
    def geglu(x, weight, bias):
        value, gate = np.split(nn.linear(x, weight, bias), 2, axis=-1)
        return value * gelu_tanh(gate)
    return geglu


def _attention_scaled_by_full_width(original):
    # softmax(q k^T / sqrt(C)) instead of / sqrt(C / heads): the same as scaling q by 1 / sqrt(heads)
    def attention(q, k, v, num_heads, causal=False):
        return original(q * np.float32(1 / np.sqrt(num_heads)), k, v, num_heads, causal=causal)
    return attention


def _timestep_one_lower(original):
    def timestep_embedding(t, *args, **kwargs):
        return original(np.asarray(t, dtype=np.float32) - np.float32(1), *args, **kwargs)
    return timestep_embedding


def _cfg_branches_swapped(original):
    def cfg(eps_uncond, eps_cond, scale):
        return original(eps_cond, eps_uncond, scale)       # eps_cond + s (eps_uncond - eps_cond)
    return cfg


class _ConvPaddedBy:
    """npsd.nn as a model module sees it, except that conv2d pads as rule(stride, padding_mode) says
    (a tiling bug: which convs wrap around under settings.padding_mode("circular"))."""

    def __init__(self, original, rule):
        self._nn, self._rule = original, rule

    def __getattr__(self, name):
        return getattr(self._nn, name)

    def conv2d(self, x, weight, bias=None, stride=1, padding=0, padding_mode=None):
        return self._nn.conv2d(x, weight, bias, stride, padding, self._rule(stride, padding_mode))


def circular(*modules):
    """AUTOMATIC1111's Tiling on torch modules (modules/sd_hijack.py, apply_circular): every
    torch.nn.Conv2d pads circularly, for the block's duration: ``with circular(unet, vae): ...``."""
    return _Circular([m for module in modules for m in module.modules() if type(m) is torch.nn.Conv2d])


class _Circular:
    def __init__(self, convs):
        self.convs = convs

    def __enter__(self):
        for m in self.convs:
            m.padding_mode = "circular"

    def __exit__(self, *exc):
        for m in self.convs:
            m.padding_mode = "zeros"


@dataclass(frozen=True)
class Bug:
    """One small real bug: npsd functions replaced by wrong ones, and/or wrong config values.

    patches: (module, attribute, make) triples; make(original function) -> the wrong function.
    config:  {config section: {key: wrong value}} (sections of npsd.config.SD15).
    """
    what: str
    patches: tuple = ()
    config: dict = field(default_factory=dict)

    def inject(self, monkeypatch):
        """Replace the patched functions for the rest of the test (monkeypatch undoes it)."""
        for module, attribute, make in self.patches:
            monkeypatch.setattr(module, attribute, make(getattr(module, attribute)))

    def section(self, name, settings):
        """One component's settings (e.g. the "unet" section) with this bug's wrong values."""
        return {**settings, **self.config.get(name, {})}

    def model_config(self, config):
        """A whole model config (npsd.config.sd15_config()) with this bug's wrong values."""
        config = copy.deepcopy(config)
        for name, values in self.config.items():
            config[name].update(values)
        return config

    def __str__(self):
        return self.what


BUGS = {
    "geglu_tanh": Bug("GELU's tanh form inside GEGLU", patches=((nn, "geglu", _geglu_with_tanh_gelu),)),
    "group_norm_eps": Bug("UNet ResBlock GroupNorm eps 1e-6 instead of 1e-5", config={"unet": {"resnet_eps": 1e-6}}),
    # 10x too large. 10x too small (1e-6) moves the normalised values of unit-variance inputs by
    # only 4.5e-6 relative: the full UNet's eps by 5e-6, within its tolerance of 1e-5; CLIP's small
    # embeddings show it (tests/test_clip.py, test_full_size_sensitivity)
    "layer_norm_eps": Bug("LayerNorm eps 1e-4 instead of 1e-5",
                          config={"unet": {"layer_norm_eps": 1e-4}, "text_encoder": {"layer_norm_eps": 1e-4}}),
    "attention_scale": Bug("attention scaled by 1/sqrt(width) instead of 1/sqrt(head width)",
                           patches=((nn, "attention", _attention_scaled_by_full_width),)),
    "timestep": Bug("the UNet's timestep one lower (t - 1)", patches=((nn, "timestep_embedding", _timestep_one_lower),)),
    "cfg_swapped": Bug("classifier-free guidance with its two branches swapped",
                       patches=((guidance, "cfg", _cfg_branches_swapped),)),
    # the VAE's GroupNorm eps is 1e-6: its wrong value is the UNet's 1e-5
    "vae_group_norm_eps": Bug("VAE GroupNorm eps 1e-5 instead of 1e-6", config={"vae": {"eps": 1e-5}}),
}

# Bugs of tiling alone (they change nothing without settings.padding_mode("circular")): a conv that
# should wrap around pads with zeros, or the VAE's one-sided zero pad before its stride-2 conv wraps too
TILING_BUGS = {
    "tiling_downsamplers_zeros": Bug("tiling: the UNet's stride-2 downsamplers pad with zeros", patches=(
        (unet_model, "nn", lambda nn_: _ConvPaddedBy(nn_, lambda stride, mode: "zeros" if stride == 2 else mode)),)),
    "tiling_vae_pad_wrapped": Bug("tiling: the VAE's one-sided downsampler pad wraps around", patches=(
        (vae_model, "nn", lambda nn_: _ConvPaddedBy(nn_, lambda stride, mode: None)),)),
}


def assert_caught(bug, check):
    """check() is a parity check (npsd.testing.assert_close calls) run with `bug` injected: assert
    that it fails because an error exceeds its tolerance (not on a shape or a NaN), and print the
    error the bug causes beside the tolerance."""
    with pytest.raises(AssertionError, match="exceeds the tolerance") as failure:
        check()
    print(f"\n  {bug}: {str(failure.value).split('; ')[0]}")
