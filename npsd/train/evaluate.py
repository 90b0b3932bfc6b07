"""Measure how well the built-in model follows held-out prompts (NumPy pipeline only, no torch).

    python -m npsd.train.evaluate [--model FILE] [--seeds 2] [--steps N] [--grid out.png]
    python -m npsd.train.evaluate --check-data 2000      # the measurement on training scenes: ~100%
    python -m npsd.train.evaluate --layout               # do the position words or x_t decide the layout?

Prompts: every held-out (shape colour, background colour) pair of npsd.train.data (never drawn in
training) x every shape, in the plain form ("a red circle on a green background") and with a size and
a position. Each generated image is measured with npsd.train.data.measure (nearest palette colours,
the shape's bounding box) and compared with the prompt, per attribute:

    attribute    chance                          counted on
    background   1/6                             all prompts
    colour       1/5 (any colour but the background's)  all prompts
    shape        1/3 (fill of the bounding box: circle 0.785, square 1, triangle 0.5)  all prompts
    position     1/5 (nearest of the 5 named centres)   prompts that name a position
    size         1/2 (small / large)              prompts that name a size
    one shape    -   (exactly one region of non-background colour, data.count_shapes)  all prompts

Accuracies are reported without guidance (guidance_scale 1) and at the model's default guidance.
--check-data N measures N training scenes (npsd.train.data.dataset, the images and captions the
training uses) against what their captions say instead: every attribute should score 1.00, else
the drawing, the captions or the measurement is wrong.
"""

import argparse
import time
from collections import Counter

import numpy as np

from . import data

ATTRIBUTES = ("background", "colour", "shape", "position", "size", "one shape")
CHANCE = {"background": 1 / 6, "colour": 1 / 5, "shape": 1 / 3, "position": 1 / 5, "size": 1 / 2,
          "one shape": None}   # no chance level: a count, not a choice among named values


def generate(pipe, prompts, seed, guidance_scale=None, num_inference_steps=None, batch=16):
    """-> uint8 [N, H, W, 3], one image per prompt; image k of a batch uses seed + k's batch seed."""
    out = []
    for i in range(0, len(prompts), batch):
        imgs = pipe.txt2img(prompts[i:i + batch], seed=seed + i, guidance_scale=guidance_scale,
                            num_inference_steps=num_inference_steps, output_type="np")   # [b, H, W, 3]
        out.append(np.round(np.clip(imgs, 0, 1) * 255).astype(np.uint8))
    return np.concatenate(out)


def score(cases, images):
    """cases: attribute dicts (data.held_out_prompts()); images uint8 [N, H, W, 3]
    -> {attribute: (correct, counted)}, list of measurements."""
    hits = {a: [0, 0] for a in ATTRIBUTES}
    measured = []
    for case, img in zip(cases, images):
        m = data.measure(img)
        measured.append(m)
        for a in ATTRIBUTES:
            want, got = (1, m["shapes"]) if a == "one shape" else (case[a], m[a])
            if want is None:            # the prompt does not name it (plain form): not counted
                continue
            hits[a][1] += 1
            hits[a][0] += int(got == want)
    return {a: tuple(v) for a, v in hits.items()}, measured


def evaluate(pipe, seeds=(0,), guidance_scale=None, num_inference_steps=None, cases=None):
    """-> {attribute: accuracy}, {attribute: (correct, counted)}, images, cases (one per seed x prompt)."""
    cases = cases if cases is not None else data.held_out_prompts()
    all_cases, images = [], []
    for s in seeds:
        images.append(generate(pipe, [c["prompt"] for c in cases], 1000 * s, guidance_scale, num_inference_steps))
        all_cases += cases
    images = np.concatenate(images)
    hits, _ = score(all_cases, images)
    return {a: c / n for a, (c, n) in hits.items() if n}, hits, images, all_cases


def check_data(n=2000, seed=1):
    """The measurement on n training scenes (images and captions as training draws them) against
    what their captions say -> {attribute: (correct, counted)}: all correct when the drawing, the
    captions and the measurement agree."""
    images, captions, _ = data.dataset(n, seed=seed)
    return score([data.parse(c) for c in captions], images)[0]


def moved_position(position):
    """The position two places on in data.POSITION_NAMES ("top left" -> "bottom left")."""
    names = data.POSITION_NAMES
    return names[(names.index(position) + 2) % len(names)]


def moved_caption(caption, position):
    """The caption with its position words moved two places on (either word order)."""
    return caption.replace("in the " + position, "in the " + moved_position(position))


GROUPINGS = {"colours": ("colour", "background"), "colours + position": ("colour", "background", "position")}


def caption_only_errors(z, said, test, known=None):
    """What a caption can tell at best: the mean squared error over the scenes `test` of predicting
    each latent z[i] by the mean of the other `known` scenes (default: all) whose captions agree on
    the colours, or on the colours and the position (GROUPINGS); a scene with no other in its group
    is skipped. -> {"colours": e, "colours + position": e}"""
    known = np.arange(len(z)) if known is None else known
    is_known = np.zeros(len(z), bool)
    is_known[known] = True
    out = {}
    for name, keys in GROUPINGS.items():
        group = [tuple(d[k] for k in keys) for d in said]
        sums, counts = {}, {}
        for i in known:
            sums[group[i]], counts[group[i]] = sums.get(group[i], 0) + z[i], counts.get(group[i], 0) + 1
        errors = []
        for i in test:
            total, count = sums.get(group[i], 0) - is_known[i] * z[i], counts.get(group[i], 0) - is_known[i]
            if count:
                errors.append(((z[i] - total / count) ** 2).mean())
        out[name] = float(np.mean(errors))
    return out


def layout_source(pipe, ts=(999, 950, 900), n=64, pool=2000, seed=2):
    """Where the model's layout comes from at high noise, without sampling. On n training scenes
    whose captions name a position: the mean squared error of the model's x0 estimate (no guidance)
    at each t in ts, with the scene's caption and with its position words moved two places on
    ("top left" -> "bottom left"). A model that uses the position words does better with its own
    caption. And what a caption can tell at most: the error of predicting each latent by the mean of
    the others with the same colours, and the same colours and position, among `pool` scenes (a
    pool of 2,000 leaves about 10 per group; much smaller pools make these means noisy). A model
    that beats the caption-only error reads the layout from what x_t still shows of x0.
    -> ({t: (error with the caption, with the position moved)}, {"colours": e, "colours + position": e})."""
    from .. import schedulers
    images, captions, _ = data.dataset(pool, seed=seed)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1               # [pool, 3, 64, 64]
    z0 = np.concatenate([pipe.vae_encode(x[i:i + 100])[0] for i in range(0, pool, 100)])
    z0 = z0 * np.float32(pipe.scaling_factor)                                      # [pool, 4, 16, 16]
    said = [data.parse(c) for c in captions]                                       # None where a caption is silent
    finest = [tuple(d[k] for k in GROUPINGS["colours + position"]) for d in said]
    size = Counter(finest)
    pick = [i for i, d in enumerate(said) if d["position"] and size[finest[i]] > 1][:n]   # not alone in its group
    bound = caption_only_errors(z0, said, pick)                                    # leave-one-out group means
    moved = [moved_caption(captions[i], said[i]["position"]) for i in pick]
    contexts = [pipe.encode_text(pipe.tokenize([captions[i] for i in pick])), pipe.encode_text(pipe.tokenize(moved))]
    ac = schedulers.alphas_cumprod(pipe.config)
    prediction = pipe.config["scheduler"]["prediction_type"]
    rng = np.random.default_rng(seed)
    target = z0[pick]                                                              # [n, 4, 16, 16]
    errors = {}
    for t in ts:
        x_t = schedulers.add_noise(target, rng.standard_normal(target.shape, dtype=np.float32), t, ac)
        errs = []
        for context in contexts:
            eps, x0 = schedulers.model_output_to_eps(pipe.unet(x_t, t, context), x_t, ac[t], prediction)
            x0 = schedulers.x0_from_eps(x_t, eps, ac[t]) if x0 is None else x0
            errs.append(float(((x0 - target) ** 2).mean()))
        errors[t] = tuple(errs)
    return errors, bound


def report(hits):
    """{attribute: (correct, counted)} -> "accuracy (correct/counted)" per attribute, " | "-separated
    ("-" for an attribute no prompt names)."""
    return " | ".join(f"{c / n:.2f} ({c}/{n})" if n else "-" for c, n in (hits[a] for a in ATTRIBUTES))


def grid(images, cols=8, scale=2):
    """uint8 [N, H, W, 3] -> one PIL image, `cols` per row, each enlarged `scale` times (nearest)."""
    from PIL import Image
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = images[k]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def main(argv=None):
    import npsd
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint (default: the built-in model)")
    ap.add_argument("--seeds", type=int, default=2, help="images per prompt")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ap.add_argument("--guidance", type=float, nargs="*", default=None,
                    help="guidance scales to evaluate (default: 1 and the model's default)")
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--grid", default=None, help="save the images of the first seed at the default guidance here")
    ap.add_argument("--check-data", type=int, default=None, metavar="N",
                    help="measure N training scenes against their captions instead (no model)")
    ap.add_argument("--layout", action="store_true",
                    help="instead: whether the position words or x_t decide the layout (layout_source)")
    args = ap.parse_args(argv)
    if args.check_data is not None:
        if args.check_data < 1:
            ap.error(f"--check-data needs a number of scenes >= 1, got {args.check_data}")
        print(f"{args.check_data} training scenes (npsd.train.data.dataset, seed 1): " + " | ".join(ATTRIBUTES))
        print(report(check_data(args.check_data)))
        return
    pipe = npsd.load(args.model)
    if args.layout:
        errors, bound = layout_source(pipe)
        print("x0 error of the caption alone, at best: " + ", ".join(f"{k} {v:.3f}" for k, v in bound.items()))
        for t, (own, moved) in errors.items():
            print(f"t = {t}: x0 error with the caption {own:.4f}, with the position moved {moved:.4f}")
        return
    if args.sampler:
        pipe.config["defaults"]["sampler"] = args.sampler
    d = pipe.config["defaults"]
    scales = args.guidance or [1.0, float(d["guidance_scale"])]
    print(f"model defaults: {d}")
    print(f"{len(data.held_out_prompts())} held-out prompts x {args.seeds} seeds")
    print("guidance | " + " | ".join(f"{a} (chance {CHANCE[a]:.2f})" if CHANCE[a] else a for a in ATTRIBUTES)
          + " | s/image")
    for g in scales:
        t = time.time()
        acc, hits, images, cases = evaluate(pipe, range(args.seeds), g, args.steps)
        per = (time.time() - t) / len(images)
        print(f"{g:g} | " + report(hits) + f" | {per:.2f}", flush=True)
        if args.grid and g == scales[-1]:
            n = len(data.held_out_prompts())
            grid(images[:n], cols=6).save(args.grid)
            print(f"saved {args.grid}")


if __name__ == "__main__":
    main()
