"""Draw the pictures in docs/images/ from the code itself (no hand-drawn figures).

    python docs/make_figures.py            # writes docs/images/*.png with the built-in model
    python docs/make_figures.py attention_maps cfg     # only the figures named (FIGURES' keys)

Pillow only (no plotting library): the noise schedule, a denoising filmstrip, classifier-free
guidance at several scales, the grid of built-in-model images that README.md shows, and the
built-in model's per-word cross-attention maps (docs/inside.md).
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import npsd
from npsd import schedulers
from npsd.attention_maps import AttentionMaps
from npsd.images import filmstrip as image_strip
from npsd.images import heat_overlay, postprocess, to_pil

OUT = Path(__file__).resolve().parent / "images"
SEED = 7
GRID_PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "a blue circle on a yellow background",
    "a small green square in the top left on a white background",
    "a large black triangle on a red background",
    "a red triangle on a white background",
    "a green circle on a black background",
]


def label(img, text, height=14):
    """The image with a line of text under it."""
    out = Image.new("RGB", (img.width, img.height + height), "white")
    out.paste(img, (0, 0))
    ImageDraw.Draw(out).text((2, img.height + 1), text, fill="black")
    return out


def row(images, gap=4):
    w = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (w, max(i.height for i in images)), "white")
    x = 0
    for i in images:
        out.paste(i, (x, 0))
        x += i.width + gap
    return out


def schedule_plot(path):
    """sqrt(alpha_bar_t) (signal kept) and sqrt(1 - alpha_bar_t) (noise) against t, SD v1.x."""
    ac = schedulers.alphas_cumprod(npsd.config.sd15_config())
    W, H, m = 520, 280, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, 10, W - 10, H - m], outline="black")
    for curve, colour in ((np.sqrt(ac), "blue"), (np.sqrt(1 - ac), "red")):
        pts = [(m + (W - 10 - m) * t / 999, H - m - (H - m - 10) * float(v)) for t, v in enumerate(curve)]
        d.line(pts, fill=colour, width=2)
    d.text((m, H - m + 4), "t = 0", fill="black")
    d.text((W - 60, H - m + 4), "t = 999", fill="black")
    d.text((m + 8, 14), "sqrt(alpha_bar_t): signal kept", fill="blue")
    d.text((m + 8, 28), "sqrt(1 - alpha_bar_t): noise", fill="red")
    d.text((4, 10), "1", fill="black")
    d.text((4, H - m - 10), "0", fill="black")
    img.save(path)


def filmstrip(pipe, path, prompt=GRID_PROMPTS[0], steps=20, every=4):
    """The predicted clean image x0 after every `every`-th step, decoded, left to right."""
    frames = []

    def keep(step, t, latents, x0):
        if step % every == 0 or step == steps - 1:
            frames.append((step, x0.copy()))

    pipe.txt2img(prompt, num_inference_steps=steps, sampler="ddim", seed=SEED, callback=keep, output_type="latent")
    tiles = []
    for step, x0 in frames:
        img = to_pil(postprocess(pipe.vae_decode(x0 / np.float32(pipe.scaling_factor))))[0]
        tiles.append(label(img.resize((128, 128), Image.NEAREST), f"step {step + 1}"))
    row(tiles).save(path)


def cfg_scales(pipe, path, prompt=GRID_PROMPTS[3], scales=(1.0, 2.0, 4.0, 7.5)):
    tiles = [label(pipe.txt2img(prompt, guidance_scale=s, seed=SEED).resize((128, 128), Image.NEAREST), f"scale {s}")
             for s in scales]
    row(tiles).save(path)


def grid(pipe, path):
    tiles = [label(pipe.txt2img(p, seed=SEED).resize((128, 128), Image.NEAREST), f"{i + 1}")
             for i, p in enumerate(GRID_PROMPTS)]
    top, bottom = row(tiles[:4]), row(tiles[4:])
    out = Image.new("RGB", (top.width, top.height * 2 + 4), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + 4))
    out.save(path)


def attention_maps(pipe, path, prompt=GRID_PROMPTS[0], seed=SEED, steps=None):
    """The image, then each word's cross-attention map (DAAM, npsd/attention_maps.py) over it, one
    labelled heat overlay per word (over the image in grey), in a row (docs/inside.md).
    steps: None = the pipeline's default."""
    maps = AttentionMaps()
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    image = pipe.txt2img(prompt, seed=seed, attention_maps=maps, **kwargs).resize((128, 128), Image.NEAREST)
    words = maps.word_maps(pipe, prompt)                                     # {word: [1, h, w]}
    grey = image.convert("L").convert("RGB")              # red heat stays visible over a red shape
    tiles = [image] + [heat_overlay(grey, m[0], word) for word, m in words.items()]
    image_strip([tiles], ["image"] + list(words)).save(path)           # the same label as the overlays' own


# name -> (function drawing it, needs the built-in model, file)
FIGURES = {
    "schedule": (schedule_plot, False, "schedule.png"),
    "filmstrip": (filmstrip, True, "filmstrip.png"),
    "cfg": (cfg_scales, True, "cfg.png"),
    "grid": (grid, True, "builtin_grid.png"),
    "attention_maps": (attention_maps, True, "attention_maps.png"),
}


def main(argv=()):
    names = list(argv) or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    OUT.mkdir(exist_ok=True)
    pipe = npsd.load() if any(FIGURES[n][1] for n in names) else None
    for n in names:
        draw, needs_model, file = FIGURES[n]
        draw(*((pipe,) if needs_model else ()), OUT / file)
    print("wrote", ", ".join(FIGURES[n][2] for n in names))


if __name__ == "__main__":
    main(sys.argv[1:])
