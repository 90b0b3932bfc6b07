"""Fit the built-in model's latent -> RGB preview table (npsd.previews) and measure its error.

    python -m npsd.train.fit_latent_rgb [--model FILE] [--images 256] [--prompts 4]

1. Draw images of the training distribution (npsd.train.data.dataset, seed 0), encode them with the
   model's VAE (the posterior mean), scale the latents by the model's scaling_factor, decode them.
2. Least squares fit of the 4x3 matrix and the bias from the scaled latents to the decodes
   box-averaged to latent size (npsd.previews.fit_latent_rgb).
3. Mean absolute error in [0, 1] units, at latent resolution, against the real decode of other images
   (seed 1), and of the x0 predictions of every step of a few txt2img runs (what --save-steps shows).

Prints the table to paste into npsd/previews.py (BUILTIN_FACTORS, BUILTIN_BIAS, BUILTIN_ERROR).
"""

import argparse
import time

import numpy as np

import npsd
from npsd import previews
from npsd.images import to_array

from . import data

PROMPTS = ("a red circle on a green background", "a large blue square on a yellow background",
           "a small white triangle in the top left on a black background", "a green circle on a blue background")


def encode_decode(pipe, n, seed, batch=32):
    """n images of the training distribution -> (scaled latents [n, 4, h, w], decodes [n, 3, H, W] in [-1, 1])."""
    images, _, _ = data.dataset(n, seed=seed)                                  # uint8 [n, 64, 64, 3]
    latents, decodes = [], []
    for i in range(0, n, batch):
        pixels = np.concatenate([to_array(im) for im in images[i:i + batch]])  # [b, 3, 64, 64] in [-1, 1]
        mean, _ = pipe.vae_encode(pixels)                                      # unscaled [b, 4, h, w]
        latents.append(mean * np.float32(pipe.scaling_factor))
        decodes.append(pipe.vae_decode(mean))
    return np.concatenate(latents), np.concatenate(decodes)


def step_predictions(pipe, prompts, seed=0):
    """Every step's x0 prediction of txt2img runs -> (scaled latents [steps * P, 4, h, w], their decodes)."""
    x0 = []
    pipe.txt2img(list(prompts), seed=seed, output_type="latent", callback=lambda i, t, x, x0_pred: x0.append(x0_pred))
    latents = np.concatenate(x0)
    return latents, pipe.vae_decode(latents / np.float32(pipe.scaling_factor))


def bias_only(decodes):
    """The best constant preview: the mean colour of the decodes, [3] in [-1, 1]."""
    return decodes.mean(axis=(0, 2, 3)).astype(np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m npsd.train.fit_latent_rgb", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model file (default: the built-in model)")
    p.add_argument("--images", type=int, default=256, help="images to fit on, and as many to test on (default 256)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="txt2img runs whose steps are also measured")
    args = p.parse_args(argv)
    pipe = npsd.load(args.model)
    started = time.perf_counter()
    fit_latents, fit_decodes = encode_decode(pipe, args.images, seed=0)
    factors, bias = previews.fit_latent_rgb(fit_latents, fit_decodes)
    test_latents, test_decodes = encode_decode(pipe, args.images, seed=1)
    np.set_printoptions(precision=4, suppress=True, floatmode="fixed")
    print(f"fitted on {args.images} images (seed 0) in {time.perf_counter() - started:.1f} s; "
          f"scaled latents, output in [-1, 1]; rows: latent channels, columns: R, G, B")
    print("factors =", factors.tolist())
    print("bias    =", bias.tolist())
    print("factors (4 decimals):\n", factors, "\nbias:", bias)
    err_fit = previews.preview_error(fit_latents, fit_decodes, factors, bias)
    err = previews.preview_error(test_latents, test_decodes, factors, bias)
    print(f"mean abs error vs the real decode at latent resolution, [0, 1] units: {err:.4f} on {args.images} other "
          f"images (seed 1), {err_fit:.4f} on the fitted ones")
    mean_colour = previews.preview_error(test_latents, test_decodes, np.zeros_like(factors), bias_only(fit_decodes))
    print(f"for scale: one constant colour (the mean decode) has error {mean_colour:.4f}")
    if previews.table_name(pipe) == "npsd-tiny" and np.any(previews.BUILTIN_FACTORS):
        stored = previews.preview_error(test_latents, test_decodes, previews.BUILTIN_FACTORS, previews.BUILTIN_BIAS)
        print(f"the stored table (npsd.previews.BUILTIN_*): {stored:.4f}")
    if args.prompts:
        step_latents, step_decodes = step_predictions(pipe, PROMPTS[:args.prompts])
        err_steps = previews.preview_error(step_latents, step_decodes, factors, bias)
        print(f"on every step's x0 prediction of {args.prompts} txt2img runs ({len(step_latents)} latents): "
              f"{err_steps:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
