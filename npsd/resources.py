"""Refuse a generation request that will not fit in memory, before any work starts.

npsd's peak memory above the loaded weights is set by the largest temporaries of one UNet call and
of one VAE decode; they run one after the other, so the request needs about the larger of the two:

    unet_bytes = 2 * CHUNK_BYTES + K_UNET * (B_unet * C0 * h * w * 4)
    vae_bytes  =     CHUNK_BYTES + K_VAE  * (C_up * H * W * 4) + 2 * (B * 3 * H * W * 4)

- B_unet: the UNet's batch (images x 2 with classifier-free guidance: [uncond, cond]); C0: the
  UNet's level-0 channels (conv_in's output, 320 for SD v1.x); h x w: the latent size. One level-0
  activation B_unet*C0*h*w float32 is the unit: skips, the GEGLU projection (8 x C0 channels) and the
  attention inputs are all multiples of it. The two CHUNK_BYTES are the attention score block and the
  im2col band (npsd.settings.CHUNK_BYTES bounds each).
- C_up x H x W: the decoder's largest activation (for SD v1.x 256 channels at full resolution after
  the last-but-one upsampling: 268 MB at 512x512); images are decoded one at a time, so it does not
  grow with the batch; the decoded and converted images do (the last term). The encoder (img2img,
  inpaint) peaks lower than the decoder at the same size (docs/vae.md: 977 vs 1268 MiB, plain path).

K_UNET and K_VAE are calibrated on the measurements in docs/unet.md (SD v1.5 UNet, batch 2, 64x64
latents: 0.683 GB above the weights, CHUNK_BYTES 128 MiB -> K_UNET = 45) and docs/vae.md (SD v1.5
VAE decode 512x512: 1268 MiB -> K_VAE = 4.5), rounded up; those are the plain path's, the larger
(the fast path, the default, measured 0.31 GB and 456 MiB), so the estimate holds for both;
tests/test_reliability.py checks that the formula reproduces both within 10 %. GB here means 2**30 bytes, as in those pages.

A generation that records a trace of every block (npsd/trace.py) keeps it all until it ends: the
request then needs the trace's bytes too (trace_bytes, calibrated below), as `npsd parity` needs two
traces and the reference's copy of the weights (parity_bytes).

Available memory is /proc/meminfo's MemAvailable (what the kernel can give without swapping); where
that file does not exist (macOS, Windows) no check is made.
"""

from . import params, settings as npsd_settings     # (check_request's `settings` are a request's)
from .errors import NpsdError
from .schedulers import TWO_STAGE

GB = 2 ** 30
ADVICE = "use a smaller size or fewer images, or close other programs"     # also for a MemoryError
K_UNET = 45     # level-0 activations alive at the UNet's peak (calibrated, see above)
K_VAE = 4.5     # largest decoder activations alive at the VAE's peak (calibrated, see above)


def unet_bytes(batch, c0, h, w, chunk_bytes=None):
    """Peak bytes of one UNet call above the weights: batch [B_unet], C0 channels at h x w latents."""
    chunk = npsd_settings.CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return 2 * chunk + K_UNET * batch * c0 * h * w * 4


def vae_decode_bytes(batch, c_up, height, width, chunk_bytes=None):
    """Peak bytes of decoding `batch` images of height x width (one at a time) above the weights."""
    chunk = npsd_settings.CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return chunk + K_VAE * c_up * height * width * 4 + 2 * batch * 3 * height * width * 4


def largest_decoder_channels(vae_params, vae_factor):
    """C_up such that the decoder's largest activation is C_up x H x W (H x W: the image size).

    Each up block ends at channels ch_u; its upsampler doubles the resolution; the largest
    activation is max over blocks of ch_u x (its output resolution)."""
    blocks = vae_params["decoder"]["up_blocks"]
    scale, best = 1, 0.0                       # resolution of the current block / latent resolution
    for block in blocks:
        ch = block["resnets"][-1]["conv2"]["weight"].shape[0]
        if block.get("upsamplers"):
            scale *= 2
        best = max(best, ch * (scale / vae_factor) ** 2)   # in units of H x W
    return best


def estimate(pipe, batch, height, width, guided):
    """{"unet": bytes, "vae": bytes, "total": bytes} for `batch` images of height x width."""
    f = pipe.vae_factor
    c0 = pipe.params["unet"]["conv_in"]["weight"].shape[0]
    unet = unet_bytes(batch * (2 if guided else 1), c0, height // f, width // f)
    vae = vae_decode_bytes(batch, largest_decoder_channels(pipe.params["vae"], f), height, width)
    return {"unet": unet, "vae": vae, "total": max(unet, vae)}


# A trace of every block's input and output (npsd/trace.py; `npsd parity` keeps one a side) soon
# outgrows the working memory. Its bytes, in units of the estimate's activations: per image through
# the UNet K_TRACE_UNET level-0 activations C0 x h x w, for the VAE (encode and decode) K_TRACE_VAE
# decoder activations C_up x H x W; measured 133 and 19.1 on SD v1.5's shapes at 64 pixels (one UNet
# call of batch 1, `npsd parity`), 71 and 14.1 on the built-in model's at 128 and 256, rounded up.
K_TRACE_UNET = 135
K_TRACE_VAE = 20


def trace_bytes(pipe, height, width, unet_images):
    """Bytes a Trace of every block keeps (npsd/trace.py): `unet_images` images through the UNet (a
    call of batch B counts B) and the VAE's blocks at height x width."""
    f = pipe.vae_factor
    c0 = pipe.params["unet"]["conv_in"]["weight"].shape[0]
    c_up = largest_decoder_channels(pipe.params["vae"], f)
    return 4 * (K_TRACE_UNET * c0 * (height // f) * (width // f) * unet_images + K_TRACE_VAE * c_up * height * width)


def parity_bytes(pipe, size):
    """Peak bytes of comparing `pipe` with a reference at size x size pixels (npsd parity), beyond
    npsd's loaded model: each side's working memory (a guided UNet call or a VAE decode) and trace,
    and the reference's float32 copy of the weights."""
    trace = trace_bytes(pipe, size, size, 1)
    weights = 4 * params.count(pipe.params)                       # the reference holds them in float32
    return 2 * (estimate(pipe, 1, size, size, guided=True)["total"] + trace) + weights


def check_parity(pipe, size):
    """Raise NpsdError when comparing at size x size pixels (parity_bytes) exceeds the available memory."""
    need, have = parity_bytes(pipe, size), available_bytes()
    if have is not None and need > have:
        raise NpsdError(f"--size {size} needs about {need / GB:.1f} GB of memory (both sides' traces and working "
                        f"memory, the reference's weights) but only {have / GB:.1f} GB are available; use a "
                        f"smaller --size (default 64)")


def available_bytes():
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024          # "MemAvailable:  123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_request(pipe, prompt, num_images, settings):
    """Raise NpsdError when the request's estimated peak exceeds the available memory.

    prompt / num_images as given to the pipeline (invalid values are left to the pipeline's own
    checks: they count as one); settings: Pipeline._settings' result (height, width, guidance_scale)."""
    prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1
    images = num_images if isinstance(num_images, int) and num_images >= 1 else 1
    batch = max(prompts, 1) * images
    guided = settings["guidance_scale"] > 1                # as npsd.guidance.uses_guidance
    need = estimate(pipe, batch, settings["height"], settings["width"], guided)
    trace, traced = getattr(pipe, "_trace", None), ""
    if trace is not None and trace.only is None:           # a trace of every block: all of it is kept
        steps = settings["steps"] if trace.steps is None else sum(0 <= s < settings["steps"] for s in trace.steps)
        calls = steps * (2 if settings["sampler"] in TWO_STAGE else 1) * batch * (2 if guided else 1)
        need["trace"] = trace_bytes(pipe, settings["height"], settings["width"], calls)
        need["total"] += need["trace"]
        traced = f", the trace {need['trace'] / GB:.1f} GB"
    have = available_bytes()
    if have is not None and need["total"] > have:
        advice = ("trace fewer steps or blocks (Trace(steps=...), Trace(only=...); npsd trace --trace-steps, "
                  "--only), or " + ADVICE) if traced else ADVICE
        raise NpsdError(
            f"this request ({batch} image{'s' if batch > 1 else ''} of {settings['width']}x{settings['height']}) "
            f"needs about {need['total'] / GB:.1f} GB of memory beyond the loaded model (UNet "
            f"{need['unet'] / GB:.1f} GB, VAE decode {need['vae'] / GB:.1f} GB{traced}) but only "
            f"{have / GB:.1f} GB are available; {advice}")
    return need

