"""Procedurally drawn training images for the built-in model, with captions from a small grammar.

One shape (circle, square, triangle) of one colour on a background of another colour, 64x64 RGB:

    caption  := thing [position] ["on a" colour "background"]
              | "a" colour "background with" thing [position]
    thing    := "a" [size] colour shape
    size     := "small" | "large"                       (left out: any size in between the two)
    position := "in the top left" | "in the top right" | "in the bottom left" | "in the bottom right"
              | "in the center"                         (left out: anywhere the shape fits)

e.g. "a small red circle in the top left on a blue background", "a red circle on a blue background",
"a blue background with a red circle in the center", "a small red circle in the top left" (the
background left out: any colour but the shape's). The second word order and the captions without a
background make the shape's own words carry its colour and place: with one word order the text
encoder can carry everything in the tokens after the last word, where the background dominates.
Some (shape colour, background colour) pairs are never drawn in training (HELD_OUT) and serve as
the evaluation prompts. NumPy and Pillow only (the NumPy evaluation uses it too); seeded.
"""

import re

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64                      # image side in pixels
SUPERSAMPLE = 4                # drawn at 4x and box-filtered down: anti-aliased edges
SHAPES = ("circle", "square", "triangle")
COLOURS = {                    # name -> RGB
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES = tuple(COLOURS)
POSITIONS = {                  # phrase -> centre (x, y) in pixels
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}
POSITION_NAMES = tuple(POSITIONS)
SIZES = {"small": (6.0, 8.0), "large": (12.0, 15.0)}   # "radius" (half the side) in pixels
ANY_SIZE = (6.0, 15.0)
JITTER = 3.0                   # +- pixels around a named position's centre
# (shape colour, background colour) pairs never drawn in training: each colour once on each side
HELD_OUT = (("red", "green"), ("green", "blue"), ("blue", "yellow"),
            ("yellow", "white"), ("white", "black"), ("black", "red"))
TRAIN_PAIRS = tuple((a, b) for a in COLOUR_NAMES for b in COLOUR_NAMES if a != b and (a, b) not in HELD_OUT)
P_SIZE, P_POSITION = 0.6, 0.8  # how often the caption names the size / the position
P_NO_BACKGROUND = 0.2          # how often the caption leaves the background out
P_BACKGROUND_FIRST = 0.3       # of the captions that name it: "a blue background with a red circle"
MIN_CONTRAST = 80.0            # least RGB distance between a random-colour scene's two colours


def caption(shape, colour, background, size=None, position=None, background_first=False):
    """The grammar's sentence; size / position / background None leave that phrase out;
    background_first: "a blue background with a red circle ..." (needs the background)."""
    words = ["a"] + ([size] if size else []) + [colour, shape]
    if position:
        words += ["in the", position]
    if background is None:
        return " ".join(words)
    if background_first:
        return " ".join(["a", background, "background with"] + words)
    return " ".join(words + ["on a", background, "background"])


def parse(text):
    """A caption of the grammar -> dict(shape, colour, background, size, position), None for a phrase
    left out (the inverse of caption; which word order it was is not returned)."""
    size, colour, shape, position = ("|".join(names) for names in (SIZES, COLOUR_NAMES, SHAPES, POSITION_NAMES))
    thing = rf"a (?:(?P<size>{size}) )?(?P<colour>{colour}) (?P<shape>{shape})(?: in the (?P<position>{position}))?"
    m = (re.fullmatch(rf"{thing}(?: on a (?P<background>{colour}) background)?", text)
         or re.fullmatch(rf"a (?P<background>{colour}) background with {thing}", text))
    if m is None:
        raise ValueError(f"not a caption of the grammar in npsd/train/data.py: {text!r}")
    return {k: m[k] for k in ("shape", "colour", "background", "size", "position")}


def draw(shape, colour, background, radius, centre):
    """-> uint8 [64, 64, 3]. colour, background: names of COLOURS or (r, g, b) 0..255; radius: half
    the side of the bounding box; centre: (x, y) in pixels."""
    s = SUPERSAMPLE
    colour, background = (COLOURS[c] if isinstance(c, str) else tuple(int(v) for v in c) for c in (colour, background))
    img = Image.new("RGB", (SIZE * s, SIZE * s), background)
    d = ImageDraw.Draw(img)
    x, y, r = centre[0] * s, centre[1] * s, radius * s
    box = [x - r, y - r, x + r, y + r]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:                       # isosceles triangle, apex up, filling half of its bounding box
        d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)
    img = img.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def sample(rng, pairs=TRAIN_PAIRS):
    """One random scene -> (image uint8 [64, 64, 3], caption, attributes dict)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour, background = pairs[rng.integers(len(pairs))]
    size = ("small", "large")[rng.integers(2)] if rng.random() < P_SIZE else None
    position = POSITION_NAMES[rng.integers(len(POSITION_NAMES))] if rng.random() < P_POSITION else None
    radius = rng.uniform(*(SIZES[size] if size else ANY_SIZE))
    if position:
        centre = np.array(POSITIONS[position]) + rng.uniform(-JITTER, JITTER, 2)
    else:
        centre = rng.uniform(radius + 1, SIZE - radius - 1, 2)
    centre = np.clip(centre, radius + 1, SIZE - radius - 1)   # the whole shape stays in the image
    named = None if rng.random() < P_NO_BACKGROUND else background
    text = caption(shape, colour, named, size, position, background_first=rng.random() < P_BACKGROUND_FIRST)
    attrs = dict(shape=shape, colour=colour, background=background, size=size, position=position,
                 radius=float(radius), centre=(float(centre[0]), float(centre[1])))
    return draw(shape, colour, background, radius, centre), text, attrs


def random_colour_scene(rng, colours="uniform"):
    """A scene laid out as sample lays them out, drawn in two random colours (at least MIN_CONTRAST
    apart) instead of a palette pair -> uint8 [64, 64, 3]. colours: "uniform" draws each channel
    uniformly from 0..255; "saturated" from 255 * Beta(0.3, 0.3), which piles up near 0 and 255, so
    that the saturated colours the palette is made of are common (a uniform draw seldom comes near
    them). The VAE learns from these beside the training scenes so that it encodes colours, not the
    pairs it was shown: trained on the training pairs alone it decoded the held-out pairs' shapes in
    the wrong colour (65% of them), which no UNet could then draw right. The UNet and text encoder
    never see these scenes."""
    _, _, a = sample(rng)
    while True:
        if colours == "uniform":
            colour, background = rng.uniform(0, 255, (2, 3))
        elif colours == "saturated":
            colour, background = 255 * rng.beta(0.3, 0.3, (2, 3))
        else:
            raise ValueError(f"colours={colours!r}: use 'uniform' or 'saturated'")
        if np.linalg.norm(colour - background) >= MIN_CONTRAST:
            return draw(a["shape"], colour, background, a["radius"], a["centre"])


def dataset(n, seed=0, pairs=TRAIN_PAIRS):
    """n scenes -> (uint8 [n, 64, 64, 3], list of captions, list of attribute dicts)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions, attrs = [], []
    for i in range(n):
        images[i], c, a = sample(rng, pairs)
        captions.append(c)
        attrs.append(a)
    return images, captions, attrs


def held_out_prompts():
    """Evaluation prompts: every held-out colour pair x shape x {plain, sized + placed} forms.
    -> list of attribute dicts (with "prompt")."""
    out = []
    for k, (colour, background) in enumerate(HELD_OUT):
        for j, shape in enumerate(SHAPES):
            out.append(dict(shape=shape, colour=colour, background=background, size=None, position=None))
            size = ("small", "large")[(k + j) % 2]
            position = POSITION_NAMES[(k * 3 + j) % len(POSITION_NAMES)]
            out.append(dict(shape=shape, colour=colour, background=background, size=size, position=position))
    for a in out:
        a["prompt"] = caption(a["shape"], a["colour"], a["background"], a["size"], a["position"])
    return out


# --- measuring a generated image (used by the evaluation) --------------------------------------

PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)   # [6, 3]
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}           # area / bounding-box area
# A region of non-background pixels smaller than this is a speck, not a shape. Measured: the smallest
# drawn shape covers 66 pixels (3,000 training scenes); specks are at most 2 pixels on the shipped VAE's
# reconstructions of training scenes and 5 on its generated images.
MIN_AREA = 20                   # pixels


def palette_labels(image):
    """uint8 or float [64, 64, 3] (0..255) -> (label int [64, 64]: index of the nearest palette colour,
    the background's index: the most common label)."""
    img = np.asarray(image, np.float32)                                          # [H, W, 3]
    label = (((img[:, :, None, :] - PALETTE) ** 2).sum(-1)).argmin(-1)           # [H, W]
    return label, np.bincount(label.ravel(), minlength=len(PALETTE)).argmax()


def count_shapes(image, min_area=MIN_AREA):
    """How many shapes an image shows: 8-connected regions of non-background pixels (nearest palette
    colour other than the background's) of at least min_area pixels. Anti-aliased edge pixels touch
    their shape and join it; a shape nearer the background colour than any other palette colour is
    not seen."""
    label, bg = palette_labels(image)
    regions, n = ndimage.label(label != bg, structure=np.ones((3, 3)))           # [H, W] region ids
    return int((np.bincount(regions.ravel(), minlength=n + 1)[1:] >= min_area).sum())


def measure(image):
    """uint8 or float [64, 64, 3] (0..255) -> dict: background, colour (nearest palette colours),
    centre (x, y) of the shape, position (nearest named position), area, size, fill, shape, and
    shapes: how many shapes there are (count_shapes)."""
    label, bg = palette_labels(image)                                            # [H, W], most pixels
    border = np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]])    # [4W]
    shapes = count_shapes(image)
    counts = np.bincount(label[label != bg], minlength=6)
    if counts.sum() == 0:
        return dict(background=COLOUR_NAMES[bg], colour=None, centre=None, position=None, area=0,
                    size=None, fill=None, shape=None, border_bg=float((border == bg).mean()), shapes=shapes)
    fg = counts.argmax()
    # the shape: the largest 8-connected region of its colour (stray pixels would inflate the box)
    regions, n = ndimage.label(label == fg, structure=np.ones((3, 3)))           # [H, W] region ids
    mask = regions == 1 + np.bincount(regions.ravel(), minlength=n + 1)[1:].argmax()   # [H, W]
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    # bounding box centre is the drawn centre (the triangle's centroid sits lower)
    bx, by = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box
    # shape: the ideal circle / square / triangle inscribed in the bounding box that overlaps the
    # mask best (intersection over union); robust to the soft edges a decoder draws
    x0, y0, w, h = xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    u = (np.arange(w) + 0.5) / w                                                 # [w] 0..1 across the box
    v = (np.arange(h) + 0.5) / h                                                 # [h] 0..1 down the box
    ideal = {"circle": (u[None] - 0.5) ** 2 + (v[:, None] - 0.5) ** 2 <= 0.25,   # [h, w]
             "square": np.ones((h, w), bool),
             "triangle": np.abs(u[None] - 0.5) <= v[:, None] / 2}               # apex up
    m = mask[y0:y0 + h, x0:x0 + w]                                               # [h, w]
    iou = {k: (m & i).sum() / (m | i).sum() for k, i in ideal.items()}
    radius = np.sqrt(box) / 2
    names = list(POSITIONS)
    dist = [np.hypot(bx - POSITIONS[p][0], by - POSITIONS[p][1]) for p in names]
    return dict(background=COLOUR_NAMES[bg], colour=COLOUR_NAMES[fg], centre=(float(bx), float(by)),
                position=names[int(np.argmin(dist))], area=int(mask.sum()), radius=float(radius),
                size="small" if radius < (SIZES["small"][1] + SIZES["large"][0]) / 2 else "large",
                fill=float(fill), shape=max(iou, key=iou.get),
                border_bg=float((border == bg).mean()), shapes=shapes)
