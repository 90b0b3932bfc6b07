"""Classifier-free guidance (Ho & Salimans 2022) as a pure function, and the model closure that
a pipeline hands to npsd.schedulers.sample.

The UNet runs once per step on the concatenated batch [uncond, cond] (the unconditional half first,
as diffusers does); the two halves of its output are combined with ``cfg``. A scale <= 1 skips the
unconditional half entirely, as in diffusers (DECISIONS: "Guidance is skipped ... <= 1").
"""

import numpy as np


def cfg(eps_uncond, eps_cond, scale):
    """eps = eps_uncond + scale * (eps_cond - eps_uncond)   (Ho & Salimans 2022, eq. 6, with w = scale - 1).

    scale 1 gives eps_cond; scale > 1 moves further from the unconditional prediction, towards the prompt.
    """
    # [B, C, h, w] x 2 -> [B, C, h, w]
    return eps_uncond + np.float32(scale) * (eps_cond - eps_uncond)


def uses_guidance(scale):
    """True when the unconditional pass runs (scale > 1)."""
    return scale is not None and float(scale) > 1.0


def guided_model(unet, context_cond, context_uncond, scale):
    """Wrap a UNet into model(x, t) -> eps for npsd.schedulers.sample.

    unet(latents [B, 4, h, w], t, context [B, L, D]) -> eps [B, 4, h, w] (e.g. Pipeline.unet);
    context_cond / context_uncond [B, L, D]: the prompt's and the negative prompt's embeddings.
    With scale > 1 the UNet sees the batch [uncond, cond] once; else only the conditional batch.
    """
    if not uses_guidance(scale):
        return lambda x, t: unet(x, t, context_cond)
    context = np.concatenate([context_uncond, context_cond], axis=0)           # [2B, L, D]

    def model(x, t):
        x_in = np.concatenate([x, x], axis=0)                                  # [B, 4, h, w] -> [2B, 4, h, w]
        eps_both = unet(x_in, t, context)                                      # [2B, 4, h, w]
        eps_uncond, eps_cond = np.split(eps_both, 2, axis=0)                   # 2 x [B, 4, h, w]
        return cfg(eps_uncond, eps_cond, scale)
    return model
