"""Draw the pictures in docs/images/ from the code itself (no hand-drawn figures).

    python docs/make_figures.py            # writes docs/images/*.png with the built-in model
    python docs/make_figures.py attention_maps cfg     # only the figures named (FIGURES' keys)

Pillow only (no plotting library), all on the built-in model (npsd.load()) with fixed seeds, so a
rerun draws the same pictures: the noise schedule, the forward process on one image, L_simple
against t, a VAE round trip, one-word prompt changes, a denoising filmstrip, classifier-free
guidance at several scales, an img2img strength sweep, inpainting, the per-word cross-attention
maps, and the grids of built-in-model images (README.md, weights/README.md). FIGURES lists them.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import npsd
from npsd import schedulers
from npsd.attention_maps import AttentionMaps
from npsd.images import filmstrip as image_strip
from npsd.images import heat_overlay, postprocess, to_array, to_pil
from npsd.train import data, evaluate

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


def title(img, text, line=14):
    """The image with text above it (one line per "\n"); the canvas widens when the text is wider."""
    lines = text.split("\n")
    d = ImageDraw.Draw(img)
    w = max([img.width] + [int(d.textlength(t)) + 4 for t in lines])
    out = Image.new("RGB", (w, img.height + line * len(lines) + 2), "white")
    draw = ImageDraw.Draw(out)
    for i, t in enumerate(lines):
        draw.text((2, 1 + line * i), t, fill="black")
    out.paste(img, (0, line * len(lines) + 2))
    return out


def row(images, gap=4):
    w = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (w, max(i.height for i in images)), "white")
    x = 0
    for i in images:
        out.paste(i, (x, 0))
        x += i.width + gap
    return out


def column(images, gap=4):
    """Images stacked top to bottom (left-aligned), `gap` pixels apart."""
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)),
                    "white")
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height + gap
    return out


def tile(img, size=128):
    """A 64x64 image scaled up to size x size, pixel for pixel (nearest), for reading in the docs."""
    return img.resize((size, size), Image.NEAREST)


def decode(pipe, latents):
    """Scaled latents [B, 4, h, w] -> PIL images: vae_decode(latents / k)."""
    return to_pil(postprocess(pipe.vae_decode(latents / np.float32(pipe.scaling_factor))))


def encode(pipe, img):
    """PIL image -> scaled latent x_0 = k * (the VAE posterior's mean) [1, 4, h, w]."""
    mean, _ = pipe.vae_encode(to_array(img))
    return mean * np.float32(pipe.scaling_factor)


def drawn_scene():
    """A red circle on a blue background drawn as the built-in model's training images are drawn
    (npsd/train/data.py), with its caption."""
    img = Image.fromarray(data.draw("circle", "red", "blue", 12.0, (30.0, 34.0)))
    return img, data.caption("circle", "red", "blue")


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
        tiles.append(label(tile(decode(pipe, x0)[0]), f"step {step + 1}"))
    row(tiles).save(path)


def cfg_scales(pipe, path, prompt=GRID_PROMPTS[3], scales=(1.0, 2.0, 4.0, 7.5), steps=None):
    """One prompt and seed at guidance scales w = 1 (the conditional prediction alone), 2, 4, 7.5
    (docs/guidance.md), with the prompt and seed written above. steps: None = the default (20)."""
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    tiles = [label(tile(pipe.txt2img(prompt, guidance_scale=s, seed=SEED, **kwargs)), f"scale {s}") for s in scales]
    title(row(tiles), f"prompt '{prompt}', seed {SEED}").save(path)


def grid(pipe, path, steps=None):
    """The eight GRID_PROMPTS at seed SEED and the default settings, numbered (README.md lists them)."""
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    tiles = [label(tile(pipe.txt2img(p, seed=SEED, **kwargs)), f"{i + 1}") for i, p in enumerate(GRID_PROMPTS)]
    column([row(tiles[:4]), row(tiles[4:])]).save(path)


def held_out_grid(pipe, path, steps=None, prompts=None):
    """The 36 held-out prompts of npsd.train.data.held_out_prompts() (colour pairs never drawn in
    training) at the default settings, as the evaluation generates them (npsd.train.evaluate:
    batches of 16, seeds 0, 16, 32) and lays them out, in rows of 6: one colour pair per row
    (weights/README.md says what each row and column is). prompts: default those 36."""
    prompts = prompts or [a["prompt"] for a in data.held_out_prompts()]
    images = evaluate.generate(pipe, prompts, seed=0, num_inference_steps=steps)       # uint8 [36, 64, 64, 3]
    evaluate.grid(images, cols=6).save(path)                                          # 2x, 1-px white frames


def noising(pipe, path, prompt=GRID_PROMPTS[0], ts=(0, 250, 500, 750, 999), steps=None):
    """The forward process (docs/forward.md): a built-in-model image's latent x_0 = k * vae_encode(image)
    noised with one fixed epsilon to x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) epsilon
    (npsd.schedulers.add_noise) at each t, decoded (x_t / k through the VAE decoder), labelled with
    t and sqrt(ab_t), the share of x_0 left. steps: the image's generation steps (None = 20)."""
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    image = pipe.txt2img(prompt, seed=SEED, **kwargs)
    x0 = encode(pipe, image)                                                         # [1, 4, h, w]
    eps = np.random.default_rng(SEED).standard_normal(x0.shape, dtype=np.float32)   # one epsilon for all t
    ac = schedulers.alphas_cumprod(pipe.config)                                      # ab_t [N]
    tiles = [label(tile(decode(pipe, schedulers.add_noise(x0, eps, t, ac))[0]), f"t={t}  sqrt(ab)={np.sqrt(ac[t]):.2f}")
             for t in ts]
    title(row(tiles), f"x_t decoded; image: prompt '{prompt}', seed {SEED}; one epsilon (seed {SEED})").save(path)


def plot(curves, xs, path, xlabel, ylabel, heading, xticks, W=520, H=300):
    """A line plot with a logarithmic y axis (one tick per power of 10): curves = [(values, colour,
    legend text)], all against xs; the x axis from 0 to max(xs), ticks at xticks."""
    left, right, top, bottom = 44, 12, 36, 36
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v, _, _ in curves])
    lo, hi = int(np.floor(np.log10(values.min()))), int(np.ceil(np.log10(values.max())))
    x_max = max(xs)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), heading, fill="black")
    d.rectangle([left, top, W - right, H - bottom], outline="black")

    def at(x, y):                                  # data -> pixel; y on a log scale from 10^lo to 10^hi
        return (left + (W - right - left) * x / x_max,
                H - bottom - (H - bottom - top) * (np.log10(y) - lo) / (hi - lo))

    for e in range(lo, hi + 1):
        py = at(0, 10.0 ** e)[1]
        d.line([(left - 3, py), (left, py)], fill="black")
        d.text((4, py - 6), f"{10.0 ** e:g}", fill="black")
    for x in xticks:
        px = at(x, 10.0 ** lo)[0]
        d.line([(px, H - bottom), (px, H - bottom + 3)], fill="black")
        d.text((px - 8, H - bottom + 4), str(x), fill="black")
    d.text(((W - d.textlength(xlabel)) / 2, H - 14), xlabel, fill="black")
    d.text((left + 6, top + 4), ylabel, fill="black")
    for k, (v, colour, legend) in enumerate(curves):
        pts = [at(x, float(y)) for x, y in zip(xs, v)]
        d.line(pts, fill=colour, width=2)
        for px, py in pts:
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        d.text((W - right - 8 - d.textlength(legend), top + 4 + 14 * k), legend, fill=colour)
    img.save(path)


def loss_vs_t(pipe, path, n_t=20, draws=4):
    """L_simple = mean((epsilon - epsilon_theta(x_t, t, c))^2) of the built-in UNet against t
    (docs/training.md), for one encoded image drawn as the training images are (npsd/train/data.py),
    with its caption as c and with the empty caption (the empty condition): n_t values of t from 0
    to 999, each averaged over `draws` epsilons (the same draws at every t, seed SEED)."""
    image, caption = drawn_scene()
    x0 = encode(pipe, image)                                                         # [1, 4, h, w]
    eps = np.random.default_rng(SEED).standard_normal((draws,) + x0.shape[1:], dtype=np.float32)
    ac = schedulers.alphas_cumprod(pipe.config)
    c = pipe.encode_text(pipe.tokenize([caption, ""]))                              # [2, 77, D]: c, empty
    context = np.repeat(c, draws, axis=0)                                            # [2 * draws, 77, D]
    ts = np.linspace(0, len(ac) - 1, n_t).round().astype(int)
    with_c, empty = [], []
    for t in ts:
        x_t = schedulers.add_noise(np.repeat(x0, draws, axis=0), eps, t, ac)        # [draws, 4, h, w]
        pred = pipe.unet(np.concatenate([x_t, x_t]), t, context)                    # [2 * draws, 4, h, w]
        err = (pred - np.concatenate([eps, eps])) ** 2
        with_c.append(err[:draws].mean())
        empty.append(err[draws:].mean())
    plot([(with_c, "blue", f"c = '{caption}'"), (empty, "red", "c = '' (the empty caption)")], ts.tolist(), path,
         "t", "L_simple (log scale)", f"L_simple = mean((eps - eps_theta(x_t, t, c))^2) of the built-in UNet, "
         f"one drawn image, mean of {draws} eps draws", xticks=(0, 250, 500, 750, 999))
    return ts, np.array(with_c), np.array(empty)


def vae_roundtrip(pipe, path, amplify=10):
    """The VAE round trip (docs/vae.md): an image drawn as the training images are, its
    reconstruction vae_decode(vae_encode(x)) (the posterior's mean, unscaled), and the absolute
    difference per pixel (on the 0..1 scale) times `amplify`, with the mean and largest difference."""
    image, caption = drawn_scene()
    x = to_array(image)                                                              # [1, 3, H, W] in [-1, 1]
    mean, _ = pipe.vae_encode(x)                                                     # [1, 4, H/f, W/f]
    recon = postprocess(pipe.vae_decode(mean))                                       # [1, H, W, 3] in [0, 1]
    diff = np.abs(recon - postprocess(x))                                            # [1, H, W, 3]
    tiles = [label(tile(image), "image x"), label(tile(to_pil(recon)[0]), "vae_decode(vae_encode(x))"),
             label(tile(to_pil(np.clip(diff * amplify, 0, 1))[0]), f"|diff| x {amplify}")]
    title(row(tiles), f"'{caption}' (drawn); |diff| on 0..1: mean {diff.mean():.3f}, max {diff.max():.2f}").save(path)
    return diff


def word_swap(pipe, path, prompt=GRID_PROMPTS[0], swaps=(("red", "yellow"), ("circle", "square"), ("blue", "white")),
              steps=None):
    """One seed, prompts that differ from `prompt` by one word (colour, shape, background colour):
    the same starting noise, so what changes is what the words say (docs/clip.md)."""
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    prompts = [prompt] + [prompt.replace(f" {old} ", f" {new} ", 1) for old, new in swaps]
    labels = ["the prompt"] + [f"{old} -> {new}" for old, new in swaps]
    tiles = [label(tile(pipe.txt2img(p, seed=SEED, **kwargs)), text) for p, text in zip(prompts, labels)]
    title(row(tiles), f"prompt '{prompt}' with one word changed, seed {SEED}").save(path)


def strength(pipe, path, prompt=GRID_PROMPTS[2], init_prompt=GRID_PROMPTS[0], strengths=(0.2, 0.4, 0.6, 0.8, 1.0),
             steps=20):
    """img2img (SDEdit) from one built-in-model image with another prompt at several strengths: the
    init image is noised to the step that strength selects and the last int(steps * strength) of
    `steps` DDIM steps are run (docs/generation.md). Even strength 1 keeps a trace of the image: with
    20 "leading" steps it starts at t = 951, where sqrt(ab_t) = 0.09 of x_0 is left."""
    init = pipe.txt2img(init_prompt, seed=SEED, num_inference_steps=steps, sampler="ddim")
    tiles = [label(tile(init), "init image")]
    for s in strengths:
        out = pipe.img2img(prompt, init, strength=s, seed=SEED, num_inference_steps=steps, sampler="ddim")
        tiles.append(label(tile(out), f"strength {s} ({int(steps * s)} steps)"))
    title(row(tiles), f"init image: '{init_prompt}', seed {SEED}\nimg2img prompt: '{prompt}', seed {SEED}, "
                      f"{steps} DDIM steps").save(path)


def square_mask(box, size=64):
    """A black image with a white square (the region to repaint): box = (left, top, right, bottom)."""
    mask = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill="white")
    return mask


def inpaint(pipe, path, prompt="a yellow circle on a blue background", init_prompt=GRID_PROMPTS[0],
            side=40, steps=None):
    """Inpainting (docs/generation.md): a built-in-model image, the mask (white: repainted; a square
    of `side` pixels over the shape, centred where data.measure finds it and kept inside the image),
    and pipe.inpaint's result, where after every step the black region's latents are replaced by
    the image's own latents noised to that step (the known region is kept)."""
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    image = pipe.txt2img(init_prompt, seed=SEED, **kwargs)
    left, top = (int(np.clip(round(c - side / 2), 0, image.width - side)) for c in data.measure(np.asarray(image))["centre"])
    mask = square_mask((left, top, left + side, top + side), image.width)
    out = pipe.inpaint(prompt, image, mask, seed=SEED, **kwargs)
    tiles = [label(tile(image), "image"), label(tile(mask), "mask (white: repaint)"), label(tile(out), "inpainted")]
    title(row(tiles), f"image: '{init_prompt}', seed {SEED}\ninpaint prompt: '{prompt}', seed {SEED}").save(path)
    return image, mask, out


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
    "noising": (noising, True, "noising.png"),
    "loss_vs_t": (loss_vs_t, True, "loss_vs_t.png"),
    "filmstrip": (filmstrip, True, "filmstrip.png"),
    "vae_roundtrip": (vae_roundtrip, True, "vae_roundtrip.png"),
    "word_swap": (word_swap, True, "word_swap.png"),
    "cfg": (cfg_scales, True, "cfg.png"),
    "strength": (strength, True, "strength.png"),
    "inpaint": (inpaint, True, "inpaint.png"),
    "attention_maps": (attention_maps, True, "attention_maps.png"),
    "grid": (grid, True, "builtin_grid.png"),
    "held_out_grid": (held_out_grid, True, "held_out_grid.png"),
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
