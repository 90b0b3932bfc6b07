"""The built-in model's training data (npsd/train/data.py) and the measurement its evaluation uses
(npsd.train.data.measure, npsd.train.evaluate.score). NumPy and Pillow only, no model.

1. The evaluator scores the training scenes themselves (images and captions exactly as training draws
   them) 100% on every attribute, "exactly one shape" included: a disagreement is a bug in the
   drawing or in the measurement.
2. Independently of the measurement's own tables: the caption's words put the shape in the region
   they name, at the size they name, once.
3. The shape counter counts two separate shapes as 2, ignores specks, and sees nothing on a plain
   background.
"""

import numpy as np
import pytest

from npsd.train import data, evaluate


def shape_mask(image, background):
    """Pixels that differ from the background colour by more than 30 (of 255) in some channel."""
    return (np.abs(image.astype(int) - data.COLOURS[background]) > 30).any(-1)          # [64, 64]


def test_caption_parses_back():
    """data.parse inverts data.caption on every form of the grammar, and rejects other text."""
    for shape in data.SHAPES:
        for size in (None, *data.SIZES):
            for position in (None, *data.POSITION_NAMES):
                for background, first in (("blue", False), ("blue", True), (None, False)):
                    a = dict(shape=shape, colour="red", background=background, size=size, position=position)
                    assert data.parse(data.caption(**a, background_first=first)) == a
    assert data.caption("circle", "red", "blue", "small", "top left", background_first=True) == \
        "a blue background with a small red circle in the top left"
    for bad in ("a red", "a red circle on a blue background.", "a purple circle on a blue background",
                "a blue background with a red circle on a green background"):
        with pytest.raises(ValueError, match="not a caption"):
            data.parse(bad)


def test_evaluator_scores_training_scenes_100_percent():
    """1,000 scenes (seed 1; 2,000 measured 2000/2000 on every attribute): each attribute the caption
    text names (data.parse) is measured back, and every scene has exactly one shape."""
    hits = evaluate.check_data(1000, seed=1)
    assert set(hits) == set(evaluate.ATTRIBUTES)
    assert hits["one shape"][1] == 1000
    assert 700 < hits["background"][1] < 900                            # named in 80% of captions
    assert hits["position"][1] > 700 and hits["size"][1] > 500          # named in 80% / 60%
    for attr, (correct, counted) in hits.items():
        assert correct == counted, f"{attr}: {correct}/{counted} training scenes measured as captioned"


def test_score_counts_one_shape_on_every_prompt():
    """score() counts "one shape" on prompts that name no position or size, and misses two shapes."""
    one = data.draw("circle", "red", "blue", 7, (16, 16))
    two = data.draw("circle", "red", "blue", 7, (48, 48))
    two = np.where(shape_mask(one, "blue")[..., None], one, two)                          # both circles
    case = dict(shape="circle", colour="red", background="blue", size=None, position=None)
    hits, measured = evaluate.score([case, case], np.stack([one, two]))
    assert [m["shapes"] for m in measured] == [1, 2]
    assert hits["one shape"] == (1, 2) and hits["position"] == (0, 0) and hits["size"] == (0, 0)


def test_training_scenes_show_what_their_captions_say():
    """The words, checked on the pixels without data.measure or data.POSITIONS: "top"/"bottom" and
    "left"/"right" put the shape's bounding box centre in that half (x to the right, y down, as the
    image array's columns and rows), "center" within 4 px of the middle (the jitter is 3 px);
    "small" shapes span at most 17 px, "large" at least 23 (radius 6-8 and 12-15, plus anti-aliasing);
    the colour fills the shape's inside; and the held-out colour pairs are never drawn."""
    images, captions, attrs = data.dataset(500, seed=2)
    for img, cap, a in zip(images, captions, attrs):
        bg = a["background"]
        assert (cap.endswith(f" on a {bg} background") or cap.startswith(f"a {bg} background with a ")
                or "background" not in cap), cap
        assert f"{a['colour']} {a['shape']}" in cap
        assert (a["colour"], a["background"]) not in data.HELD_OUT
        mask = shape_mask(img, a["background"])
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        if a["position"]:
            assert f" in the {a['position']}" in cap
            words = a["position"].split()
            if words == ["center"]:
                assert abs(cx - 32) <= 4 and abs(cy - 32) <= 4, (cap, cx, cy)
            else:
                assert (cy < 32) == ("top" in words) and (cx < 32) == ("left" in words), (cap, cx, cy)
        if a["size"]:
            assert f"a {a['size']} {a['colour']} {a['shape']}" in cap
            assert side <= 17 if a["size"] == "small" else side >= 23, (cap, side)
        inside = img[int(cy) - 1:int(cy) + 2, int(cx) - 1:int(cx) + 2]      # 3x3 at the box centre
        assert (inside == data.COLOURS[a["colour"]]).all(), cap


@pytest.mark.parametrize("shape", data.SHAPES)
def test_one_shape_is_one_region(shape):
    """Anti-aliased edges join their shape: the smallest and the largest shape of each kind count 1."""
    for radius in (6.0, 15.0):
        img = data.draw(shape, "yellow", "blue", radius, (32, 32))
        assert data.count_shapes(img) == 1


def test_count_shapes_counts_two_shapes_and_ignores_specks():
    small = data.draw("triangle", "white", "black", 6, (16, 48))            # the smallest drawn shape
    other = data.draw("square", "red", "black", 8, (48, 16))
    two = np.where(shape_mask(small, "black")[..., None], small, other)      # [64, 64, 3]
    assert data.count_shapes(two) == 2
    assert data.measure(two)["shapes"] == 2
    # a second shape of the same colour, and one of another colour touching nothing
    same = data.draw("square", "white", "black", 8, (48, 16))
    assert data.count_shapes(np.where(shape_mask(small, "black")[..., None], small, same)) == 2
    # specks (decoder noise): 4 scattered 2x2 blobs of another colour next to one shape stay 1
    specks = small.copy()
    for y, x in ((5, 5), (5, 58), (30, 30), (58, 58)):
        specks[y:y + 2, x:x + 2] = data.COLOURS["green"]
    assert data.count_shapes(specks) == 1
    # a blob of MIN_AREA pixels is a shape, one pixel fewer is not
    blob = np.full((64, 64, 3), data.COLOURS["black"], np.uint8)
    blob[10:14, 10:15] = data.COLOURS["red"]                                 # 4 x 5 = 20 pixels
    assert data.MIN_AREA == 20 and data.count_shapes(blob) == 1
    blob[13, 14] = data.COLOURS["black"]                                     # 19 pixels
    assert data.count_shapes(blob) == 0
    # nothing but background: no shape
    assert data.count_shapes(np.full((64, 64, 3), data.COLOURS["white"], np.uint8)) == 0


def test_random_colour_scenes_keep_the_layout_and_vary_the_colours():
    """data.random_colour_scene: the layout sample draws from the same generator state, in two colours
    at least MIN_CONTRAST apart, which are not palette colours: the box centre's 3x3 is the shape's
    colour, the corner the background's, and the shape's bounding box is the one sample draws (to a
    pixel: which anti-aliased edge pixels lie nearer the shape's colour depends on the colours)."""
    rng = np.random.default_rng(5)
    colours = []
    for _ in range(200):
        state = rng.bit_generator.state
        img = data.random_colour_scene(rng)
        rng_again = np.random.default_rng()
        rng_again.bit_generator.state = state
        drawn, _, a = data.sample(rng_again)                                # the same layout, palette colours
        background, centre = img[0, 0].astype(float), (int(a["centre"][1]), int(a["centre"][0]))
        colour = img[centre].astype(float)
        assert np.linalg.norm(colour - background) >= data.MIN_CONTRAST - 2     # uint8 rounding
        assert (img[centre[0] - 1:centre[0] + 2, centre[1] - 1:centre[1] + 2] == img[centre]).all()
        nearer = lambda im, c, b: np.linalg.norm(im - c, axis=-1) < np.linalg.norm(im - b, axis=-1)   # [64, 64]
        mask = nearer(img.astype(float), colour, background)
        palette_mask = nearer(drawn.astype(float), data.COLOURS[a["colour"]], data.COLOURS[a["background"]])
        box = lambda m: np.array([f(np.nonzero(m)[k]) for k in (0, 1) for f in (np.min, np.max)])   # [4]
        assert np.abs(box(mask) - box(palette_mask)).max() <= 1, "the shape is not where sample drew it"
        colours += [colour, background]
    nearest = np.min(np.linalg.norm(np.array(colours)[:, None] - data.PALETTE, axis=-1), axis=1)   # [400]
    assert np.median(nearest) > 40, f"random colours sit near the palette: median distance {np.median(nearest):.0f}"


def test_saturated_random_colours_sit_near_the_ends_of_each_channel():
    """colours="saturated" draws the same layouts from the same generator state (the shape's pixels
    are where the uniform draw puts them) in colours whose channels lie mostly near 0 or 255.
    Measured on these 300 scenes: 59% of the channels within 25 of an end, against 23% for uniform
    colours (about 51/255 = 20% expected)."""
    near_end, shapes = {"uniform": [], "saturated": []}, {"uniform": [], "saturated": []}
    for seed in range(300):
        _, _, a = data.sample(np.random.default_rng(seed))
        centre = int(a["centre"][1]), int(a["centre"][0])
        for colours in near_end:
            img = data.random_colour_scene(np.random.default_rng(seed), colours)     # [64, 64, 3]
            channels = np.array([img[0, 0], img[centre]], float)                      # [2, 3]
            near_end[colours].append(np.minimum(channels, 255 - channels) <= 25)
            shapes[colours].append((img != img[0, 0]).any(-1))                        # [64, 64]
    near_end = {k: float(np.mean(v)) for k, v in near_end.items()}
    assert near_end["uniform"] < 0.3 and near_end["saturated"] > 0.45, near_end
    same = np.mean([(a == b).mean() for a, b in zip(shapes["uniform"], shapes["saturated"])])
    assert same > 0.99, f"saturated colours moved the shapes: {same:.3f} of the pixels agree"
    with pytest.raises(ValueError, match="'uniform' or 'saturated'"):
        data.random_colour_scene(np.random.default_rng(0), "saturate")
