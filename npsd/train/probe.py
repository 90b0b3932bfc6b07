"""Can the built-in design learn where the caption puts the shape? A probe, in minutes (needs .[train]).

    python -m npsd.train.probe --conditioning clip          # the CLIP text encoder, trained with the UNet
    python -m npsd.train.probe --conditioning clip-aux      # ... with its auxiliary attribute loss
    python -m npsd.train.probe --conditioning clip-aux-words   # ... read at the words (--text-aux-at words)
    python -m npsd.train.probe --conditioning attributes    # no text encoder: 5 learned attribute tokens

The UNet of npsd.train.builtin, from scratch, learns to predict a scene's latent x0 from pure noise
and the caption alone (t = 999 of a zero-terminal-SNR schedule: x_t shows nothing of x0), the hardest
case of denoising and the one that decides the layout. Every --every steps it prints the held-out x0
error with each scene's caption and with its position words moved two places on ("top left" ->
"bottom left"), beside what a caption can tell at best: the mean latent of the training scenes with the
same colours, and with the same colours and position. A model that uses the position words gets below
the first bound and does much worse with the moved words.

weights/README.md has the measurements: attribute tokens learn the position within 500 steps, the
CLIP encoder trained with the UNet does not in 1,500 (nor with x/y coordinate ramps added to the
UNet's input, nor with 10x its learning rate), and with the auxiliary loss of npsd.train.builtin
(TEXT_AUX_WEIGHT) it does, read from the pooled output or at the words. The probe's auxiliary loss
names all five attributes (the measurements were made so); the training run names TEXT_AUX_NAMES.
"""

import argparse
import time

import numpy as np

from . import builtin, data
from .evaluate import caption_only_errors, moved_caption, moved_position


def held_out_scenes(said, n_test=256):
    """The held-out scenes: the last n_test whose captions name a position -> int array."""
    return np.array([i for i, d in enumerate(said) if d["position"]][-n_test:])


def bounds(latents, said, test):
    """The caption-only errors on the test scenes, from group means of the other scenes."""
    return caption_only_errors(latents, said, test, known=np.setdiff1d(np.arange(len(said)), test))


def run(latents, captions, conditioning, steps, every=250, batch=32, lr=7e-4, n_test=256, seed=0, report=print):
    """Train from scratch and report; -> list of (step, error with the caption, error moved)."""
    import torch
    from ..tokenizer import Tokenizer
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    _, text, unet = builtin.build_models()
    said = [data.parse(c) for c in captions]
    test = held_out_scenes(said, n_test)
    train = np.setdiff1d(np.arange(len(captions)), test)
    targets = torch.from_numpy(builtin.attribute_targets(captions))
    token_at = torch.from_numpy(builtin.attribute_tokens(captions)) if conditioning == "clip-aux-words" else None
    if conditioning == "attributes":
        tokens = torch.nn.ModuleList([torch.nn.Embedding(1 + len(v), builtin.TEXT_CONFIG["hidden_size"])
                                      for v in builtin.ATTRIBUTE_VALUES.values()])
        moved_targets = targets[test].clone()
        moved_targets[:, 2] = torch.tensor([1 + data.POSITION_NAMES.index(moved_position(said[i]["position"]))
                                            for i in test])

        def encode(rows, moved_words=False):                           # -> ([B, 5, W], None)
            t = moved_targets if moved_words else targets[rows]
            return torch.stack([e(t[:, j]) for j, e in enumerate(tokens)], 1), None
        params = list(unet.parameters()) + list(tokens.parameters())
    else:
        tok = Tokenizer.default()
        ids = torch.from_numpy(np.stack(tok(captions))).long()
        moved_ids = torch.from_numpy(np.stack(tok([moved_caption(captions[i], said[i]["position"]) for i in test]))).long()
        heads = builtin.text_aux_heads()

        def encode(rows, moved_words=False):                           # -> ([B, 77, W], the encoder's output)
            out = text(moved_ids if moved_words else ids[rows])
            return out.last_hidden_state, out
        params = list(unet.parameters()) + list(text.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    z = torch.from_numpy(latents)
    noise = torch.from_numpy(np.random.default_rng(seed + 5).standard_normal(z[test].shape).astype(np.float32))
    t999 = lambda n: torch.full((n,), 999)
    points, t0 = [], time.time()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            with torch.no_grad():
                errs = [float(((unet(noise, t999(len(test)), encode(test, m)[0]).sample - z[test]) ** 2).mean())
                        for m in (False, True)]
            points.append((step, *errs))
            report(f"{conditioning} step {step}: x0 error {errs[0]:.4f} with the caption, {errs[1]:.4f} with the "
                   f"position moved ({100 * (errs[1] - errs[0]) / errs[0]:+.1f}%) ({time.time() - t0:.0f} s)")
        if step == steps:
            break
        rows = gen.choice(train, size=batch)
        ctx, out = encode(rows)
        loss = ((unet(torch.from_numpy(gen.standard_normal((batch, 4, 16, 16), dtype=np.float32)), t999(batch),
                      ctx).sample - z[rows]) ** 2).mean()
        if conditioning.startswith("clip-aux"):
            at = None if token_at is None else token_at[rows]
            loss = loss + builtin.TEXT_AUX_WEIGHT * builtin.text_aux_loss(heads, out, targets[rows], at,
                                                                          tuple(builtin.ATTRIBUTE_VALUES))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return points


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conditioning", choices=("clip", "clip-aux", "clip-aux-words", "attributes"), default="clip-aux")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250, help="report every N steps")
    ap.add_argument("--workdir", default="build/npsd-train", help="training data and latents (made if absent)")
    ap.add_argument("--vae-from", default=None, metavar="FILE", help="model file whose VAE encodes the scenes "
                    "(default: the shipped built-in model)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import os
    import torch
    from .. import weights
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    images, captions = builtin.make_data(args.workdir)
    vae = builtin.load_original(args.vae_from or str(weights.path("npsd-tiny.safetensors")), parts=("vae",))[0]
    mean, std = builtin.encode_all(vae, images, args.workdir)
    latents = mean.astype(np.float32) * np.float32(builtin.latent_scaling(mean, std))
    said = [data.parse(c) for c in captions]
    b = bounds(latents, said, held_out_scenes(said))
    builtin.log(f"caption-only errors: colours {b['colours']:.4f}, colours + position {b['colours + position']:.4f}")
    run(latents, list(captions), args.conditioning, args.steps, args.every, report=builtin.log)


if __name__ == "__main__":
    main()
