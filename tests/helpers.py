"""Helpers for parity tests against the torch references (diffusers, transformers)."""

import numpy as np
import torch

from npsd.params import unflatten

torch.set_num_threads(max(1, torch.get_num_threads()))


def perturb_(model, seed=0):
    """Give every parameter a random value that a bug could not ignore (DECISIONS: parity tests
    that can fail): norm weights 1 + 0.1 N(0,1), every bias 0.1 N(0,1); other weights keep their
    random initialisation. Zero-initialised weights (none in SD's modules, but checked) get N(0, 0.02)."""
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
