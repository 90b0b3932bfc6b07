"""How much of npsd's difference from PyTorch is PyTorch's own float32 rounding.

    python -m benchmarks.float64_reference [--tiny]

Builds the UNet and the VAE of the parity tests (tests/test_unet.py, tests/test_vae.py: SD v1.5's
shapes, perturbed random weights; --tiny: their tiny configs, in seconds) and runs each three ways:
diffusers in float32, the same diffusers model in float64, and npsd (float32, the current kernel
path). For every UNet block (batch 2, 32x32 latents), the VAE's posterior mean (a 256x256 image) and
its decode (32x32 latents), it prints max |a - b| / max |float64| for PyTorch's float32 and for npsd
against float64, and for npsd against PyTorch's float32 (what the tests check). Where the last is
much larger than npsd's own error, the tests' tolerances are set by the reference's rounding.

The float64 run is diffusers' own model cast with .double(), its outputs rounded to float32 (6e-8
relative at most). Its sinusoidal timestep embedding is still computed in float32 (diffusers casts
the timesteps), so time_embedding is not a float64 reference and is left out. README.md quotes the
numbers of one run.
"""

import argparse

import numpy as np


def relative(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def unet_rows(tiny):
    from npsd.params import unflatten
    from npsd.unet import unet
    from tests import test_unet as tu
    model = tu.build(tu.TINY_SD if tiny else tu.SD15)
    config = tu.TINY_SD_CONFIG if tiny else tu.SD15_CONFIG
    params = unflatten({k: v.detach().numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    context = rng.standard_normal((2, 77, 24 if tiny else 768)).astype(np.float32)
    t = [999.0, 500.25]
    eps32, blocks32 = tu.reference(model, latents, t, context)
    trace = {}
    eps = unet(params, latents, t, context, config, trace=trace)
    model.double()                                  # the same model in float64, its outputs rounded to float32
    eps64, blocks64 = tu.reference(model, latents.astype(np.float64), t, context.astype(np.float64))
    names = [n for n in blocks32 if n != "time_embedding"]
    return ([(f"UNet {n}", blocks32[n], trace[n], blocks64[n]) for n in names]
            + [("UNet eps", eps32, eps, eps64)])


def vae_rows(tiny):
    from npsd import vae
    from tests import test_vae as tv
    cfg = tv.TINY if tiny else tv.SD15
    model, params = tv.build(cfg, seed=20)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    images = tv.rand((1, 3, 32 * f, 32 * f), seed=21, kind="image")
    z = tv.rand((1, 4, 32, 32), seed=22)
    ref = tv.reference(model, images, z)
    config = tv.vae_config(cfg)
    mean, _ = vae.encode(params, images, config)
    decoded = vae.decode(params, z, config)
    model.double()
    ref64 = tv.reference(model, images.astype(np.float64), z.astype(np.float64))
    return [("VAE posterior mean", ref["mean"], mean, ref64["mean"]),
            ("VAE decode", ref["decoded"], decoded, ref64["decoded"])]


def measure(tiny=False):
    """[(name, PyTorch float32 vs float64, npsd vs float64, npsd vs PyTorch float32)]."""
    rows = unet_rows(tiny) + vae_rows(tiny)
    return [(name, relative(t32, t64), relative(ours, t64), relative(ours, t32)) for name, t32, ours, t64 in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny configs instead of SD v1.5's shapes")
    args = ap.parse_args(argv)
    import torch
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"| {'block':28s} | PyTorch fp32 vs fp64 | npsd vs fp64 | npsd vs PyTorch fp32 |")
    print("|---|---|---|---|")
    for name, torch_err, npsd_err, diff in measure(args.tiny):
        print(f"| {name:28s} | {torch_err:.2e} | {npsd_err:.2e} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
