"""Memory of one full-size UNet call, measured in a fresh process as the peak RSS above the weights.

In a fresh subprocess without torch: random float32 weights of SD v1.5's UNet shapes (fan-in
scaled, npsd.architecture.random_params; their names and shapes equal the real checkpoint's, checked
against tests/data/sd15_diffusers_manifest.json), then one call at batch 2 on 64x64 latents.
overhead = peak RSS (VmHWM, the child's own; see the script) - RSS right after building the weights; required <= 1.0 GB.

Measured (numpy default CHUNK_BYTES 128 MB): weights 3.20 GB, RSS after weights 3.26 GB; overhead
0.313 GB on the fast path (the default, which this test runs), 0.683 GB on the plain path of
npsd/nn.py. There, most of it is the level-0 self-attention over 4096 tokens: a 128 MB score block
lives three times at once inside nn.softmax (scores, exp, normalised), plus the [2, 4096, 2560]
GEGLU projection (84 MB) and the 12 skips (about 70 MB at batch 2); the fast path scores 1 MiB
blocks in place.

SD 2.1 at its native 768x768 (96x96 latents, 9,216 tokens at level 0, heads of width 64): overhead
0.566 GB on the fast path, same bound.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
# The names, shapes and dtypes of the SD v1.5 diffusers folder's files (runwayml/stable-diffusion-v1-5)
MANIFEST = ROOT / "tests" / "data" / "sd15_diffusers_manifest.json"
LIMIT_GB = 1.0

CHILD = r"""
import json, sys, time
sys.modules["torch"] = None                       # the measurement must not include torch
import numpy as np
from npsd.config import sd15_config
from npsd.params import count
from npsd.architecture import UNetDesign, random_params, unet_shapes
from npsd.unet import unet

design, heads, side = json.loads(sys.argv[1])                 # UNetDesign fields, heads per level, latent side

def rss_kb(field="VmRSS:"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

# The peak is this process's own high-water mark, VmHWM. ru_maxrss would be wrong here: Linux
# carries the parent's peak into a child (fork keeps it, exec does not reset it), so inside a
# large pytest process it reports the parent's size, not this measurement's.

params = random_params(unet_shapes(UNetDesign(**design)), np.random.default_rng(0))   # SD v1.5: 859.5M float32 values
rss_weights = rss_kb()
peak_before = rss_kb("VmHWM:")
rng = np.random.default_rng(0)
latents = rng.standard_normal((2, 4, side, side), dtype=np.float32)
context = rng.standard_normal((2, 77, UNetDesign(**design).cross_attention_dim), dtype=np.float32)
t0 = time.perf_counter()
eps = unet(params, latents, [999, 500], context, dict(sd15_config()["unet"], num_heads=heads))
seconds = time.perf_counter() - t0
peak = rss_kb("VmHWM:")
print(json.dumps({"weights_gb": count(params) * 4 / 2**30, "rss_after_weights_gb": rss_weights / 2**20,
                  "peak_before_call_gb": peak_before / 2**20, "peak_gb": peak / 2**20,
                  "overhead_gb": (peak - rss_weights) / 2**20, "seconds": seconds,
                  "eps_shape": list(eps.shape), "eps_finite": bool(np.isfinite(eps).all()),
                  "eps_std": float(eps.std())}))
"""


def test_full_size_random_params_match_the_real_layout():
    from npsd.architecture import unet_shapes
    real = json.loads(MANIFEST.read_text())["unet/diffusion_pytorch_model.safetensors"]
    assert unet_shapes() == {k: tuple(shape) for k, (shape, dtype) in real.items()}


def measure(design, heads, side):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([design, heads, side])], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"UNet {design or 'SD v1.5'} batch 2, {side}x{side}: weights {m['weights_gb']:.2f} GB, RSS after weights "
          f"{m['rss_after_weights_gb']:.2f} GB, peak {m['peak_gb']:.2f} GB -> overhead "
          f"{m['overhead_gb']:.3f} GB (limit {LIMIT_GB} GB); call took {m['seconds']:.1f} s")
    assert m["eps_shape"] == [2, 4, side, side] and m["eps_finite"] and m["eps_std"] > 0
    assert m["overhead_gb"] <= LIMIT_GB, m


def test_unet_call_batch2_64x64_memory():
    measure({}, 8, 64)


def test_sd21_unet_call_batch2_96x96_memory():
    """SD 2.1 768-v at its native 768x768: 96x96 latents, 9,216-token self-attention at level 0, 5
    heads of width 64. Measured: overhead 0.566 GB, the call 24.6 s on a quiet 2-core Intel Xeon."""
    measure({"use_linear_projection": True, "cross_attention_dim": 1024}, [5, 10, 20, 20], 96)
