"""Classifier-free guidance (Ho & Salimans 2022) as a pure function, and the model closure that
a pipeline hands to npsd.schedulers.sample.

The UNet runs once per step on the concatenated batch [uncond, cond] (the unconditional half first,
as diffusers does); the two halves of its output are combined with ``cfg``. A scale <= 1 skips the
unconditional half entirely, as in diffusers. ``rescale_cfg`` is the optional guidance rescale of
Lin et al. 2024. ``composable_cfg`` combines several prompts per image (A1111's ``AND``).
"""

import itertools

import numpy as np

from .errors import InputError, is_number


def cfg(eps_uncond, eps_cond, scale):
    """eps = eps_uncond + scale * (eps_cond - eps_uncond)   (Ho & Salimans 2022, eq. 6, with w = scale - 1).

    scale 1 gives eps_cond; scale > 1 moves further from the unconditional prediction, towards the prompt.
    """
    # [B, C, h, w] x 2 -> [B, C, h, w]
    return eps_uncond + np.float32(scale) * (eps_cond - eps_uncond)


def composable_cfg(eps_uncond, eps_parts, weights, scale):
    """Composable diffusion (Liu et al. 2022, "Compositional Visual Generation with Composable
    Diffusion Models", the conjunction of concepts), as A1111 combines the parts of a prompt with AND:

        eps = eps_uncond + sum_j  w_j * scale * (eps_j - eps_uncond)

    eps_uncond [B, C, h, w]; eps_parts [N, C, h, w], image b's parts consecutive; weights: for each
    image the list of its parts' weights (N in all). One part of weight 1 is cfg().
    """
    out = eps_uncond.copy()                                                # [B, C, h, w]
    row = 0
    for b, part_weights in enumerate(weights):
        for w in part_weights:                                             # in A1111's order of sums
            out[b] += (eps_parts[row] - eps_uncond[b]) * np.float32(w * scale)
            row += 1
    return out


def rescale_cfg(eps_cfg, eps_cond, guidance_rescale):
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", sec. 3.4, eq. 15-16), as diffusers' pipelines apply it to the guided model output.

    A large guidance scale inflates the output's standard deviation; eq. 15 scales it back to the
    conditional prediction's (per batch item, over all other axes; unbiased std as torch's), and
    eq. 16 blends: phi = guidance_rescale (0: plain CFG; the paper uses 0.7).
    eps_cfg, eps_cond [B, C, h, w] -> [B, C, h, w].
    """
    axes = tuple(range(1, eps_cfg.ndim))
    std_cond = eps_cond.std(axis=axes, keepdims=True, ddof=1, dtype=np.float64)         # [B, 1, 1, 1]
    std_cfg = eps_cfg.std(axis=axes, keepdims=True, ddof=1, dtype=np.float64)           # [B, 1, 1, 1]
    # eq. 15: x_rescaled = x_cfg * std(x_cond) / std(x_cfg)
    rescaled = eps_cfg * (std_cond / std_cfg).astype(np.float32)                          # [B, C, h, w]
    # eq. 16: x_final = phi x_rescaled + (1 - phi) x_cfg
    phi = np.float32(guidance_rescale)
    return phi * rescaled + (np.float32(1) - phi) * eps_cfg


def check_rescale(guidance_rescale):
    """phi of eq. 16 blends two predictions: it lies in [0, 1]."""
    if not is_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise InputError(f"guidance_rescale must be a number in [0, 1] (0: off; Lin et al. use 0.7), "
                         f"got {guidance_rescale!r}")


def uses_guidance(scale):
    """True when the unconditional pass runs (scale > 1)."""
    return scale is not None and float(scale) > 1.0


def guided_model(unet, context_cond, context_uncond, scale, guidance_rescale=0.0, weights=None, skip_uncond=None,
                 first_call=0):
    """Wrap a UNet into model(x, t) -> eps for npsd.schedulers.sample.

    unet(latents [B, 4, h, w], t, context [B, L, D]) -> eps [B, 4, h, w] (e.g. Pipeline.unet);
    context_cond / context_uncond [B, L, D]: the prompt's and the negative prompt's embeddings, or
    functions of the model call's index k = 0, 1, ... that return them (A1111's prompt editing
    changes the prompt during sampling; npsd.prompts.text_at_step).
    With scale > 1 the UNet sees the batch [uncond, cond] once; else only the conditional batch.
    guidance_rescale > 0 applies ``rescale_cfg`` to the guided output (only when guidance runs, as
    diffusers).
    weights: with several prompts per image (A1111's AND), for each image its parts' weights;
    context_cond then has one row per part (N in all) and the UNet sees [uncond, parts] at every
    scale, combined by ``composable_cfg``.
    skip_uncond(k, t) -> True: model call k (at timestep t) leaves the unconditional pass out and
    returns the conditional prediction (A1111's "Negative Guidance minimum sigma"; with several parts,
    composable_cfg at scale 1 around the image's first part, as A1111's CFGDenoiser).
    first_call: the index k of the first call (a refiner's model takes over at call k of a pass,
    npsd/refiner.py, and goes on counting from there, as A1111's CFGDenoiser.step).
    """
    check_rescale(guidance_rescale)
    cond_at = context_cond if callable(context_cond) else (lambda k: context_cond)
    uncond_at = context_uncond if callable(context_uncond) else (lambda k: context_uncond)
    calls = itertools.count(first_call)
    if weights is not None:
        if guidance_rescale > 0:
            raise InputError("guidance_rescale rescales one prompt's guidance; a prompt with AND combines "
                             "several: set guidance_rescale to 0 or remove AND")
        counts = [len(w) for w in weights]

        firsts = np.cumsum([0] + counts[:-1])                                  # each image's first part

        def composed(x, t):
            k = next(calls)
            parts = np.repeat(x, counts, axis=0)                               # each image once per part
            if skip_uncond is not None and skip_uncond(k, t):
                eps = unet(parts, t, cond_at(k))                               # [N, 4, h, w]
                return composable_cfg(eps[firsts], eps, weights, 1.0)
            context = np.concatenate([uncond_at(k), cond_at(k)], axis=0)      # [B + N, L, D]
            eps = unet(np.concatenate([x, parts], axis=0), t, context)         # [B + N, 4, h, w]
            return composable_cfg(eps[:len(x)], eps[len(x):], weights, scale)
        return composed
    if not uses_guidance(scale):
        return lambda x, t: unet(x, t, cond_at(next(calls)))

    def model(x, t):
        k = next(calls)
        if skip_uncond is not None and skip_uncond(k, t):
            return unet(x, t, cond_at(k))                                      # eps_cond, no guidance
        context = np.concatenate([uncond_at(k), cond_at(k)], axis=0)           # [2B, L, D]
        x_in = np.concatenate([x, x], axis=0)                                  # [B, 4, h, w] -> [2B, 4, h, w]
        eps_both = unet(x_in, t, context)                                      # [2B, 4, h, w]
        eps_uncond, eps_cond = np.split(eps_both, 2, axis=0)                   # 2 x [B, 4, h, w]
        eps = cfg(eps_uncond, eps_cond, scale)
        if guidance_rescale > 0:
            eps = rescale_cfg(eps, eps_cond, guidance_rescale)
        return eps
    return model
