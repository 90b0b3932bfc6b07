"""Train the built-in model and export it as weights/npsd-tiny.safetensors (needs `pip install .[train]`).

    python -m npsd.train.builtin                 # the whole run: data, VAE, latents, UNet + CLIP, export
    python -m npsd.train.builtin --export-only   # export the last checkpoint in --workdir again

The SD v1.x design scaled down, built from the same torch modules SD v1.x uses (diffusers'
AutoencoderKL and UNet2DConditionModel, transformers' CLIPTextModel) so that the exported file has
SD v1.5's original tensor names, only smaller shapes:

1. data: procedural 64x64 scenes with captions (npsd.train.data), seeded;
2. VAE: KL autoencoder 64x64x3 -> 16x16x4 (reconstruction L1 + MSE + a small KL term, as LDM's
   KL-f8 models minus the perceptual and GAN losses), on the training scenes and, in its last three
   cycles, on scenes in random colours as well, the last with the loss weighted on the shape's
   pixels (VAE_PHASES); the latent scaling factor is 1 / std of
   the training latents (LDM paper, sec. 4.3.2 / appendix G: "rescale the latent ... unit variance");
3. the latents of all training images are computed once (posterior mean and std);
4. UNet + CLIP text encoder trained together from scratch: epsilon prediction under SD's
   scaled-linear schedule (0.00085..0.012, 1000 steps), the caption replaced by "" 10% of the time
   (classifier-free guidance, Ho & Salimans 2022), min-SNR-5 loss weights (Hang et al. 2023), EMA weights;
   timesteps drawn half uniformly and half with density rising linearly to t = 999 (HIGH_NOISE), since
   a scene's layout (where the shape goes) is settled at high noise; the text encoder also learns to
   name the caption's position at the word that ends it (TEXT_AUX_WEIGHT, TEXT_AUX_NAMES;
   --text-aux-at pooled: from its pooled output); every --eval-every steps the EMA
   model is scored on the held-out prompts (learning curves in --workdir/curves.jsonl);
5. export: fp16 .safetensors in the original single-file layout with the npsd config in
   __metadata__["npsd_config"] (read by npsd.load).

Checkpoints go to --workdir every few hundred steps; a run stopped by --max-minutes still exports
what it has (the README states which run the shipped file came from).
"""

import argparse
import json
import math
import os
import sys
import time
from collections import namedtuple

import numpy as np

from . import data

SEED = 0
NUM_IMAGES = 20000
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=data.SIZE,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32, act_fn="silu")
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# SD v1.x's block layout one level shorter: cross-attention at the 16x16 and 8x8 latent levels (so
# that position words can act where positions are resolved), none at the lowest level, one in the middle.
UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(64, 96, 128),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32)  # 4 heads (diffusers' naming)
DEFAULTS = dict(height=64, width=64, num_inference_steps=20, guidance_scale=7.5, sampler="ddim")
EMA_DECAY = 0.998
P_UNCOND = 0.1
# The text encoder's auxiliary task: linear heads name attributes the caption states, by
# cross-entropy with this weight beside the UNet's loss, from the output at the word that carries
# the attribute (ATTRIBUTE_WORD; "words") or from the pooled output (the end-of-text token's state;
# "pooled"). The heads are trained with it and not exported. Without it the encoder, trained from
# scratch, learns to carry the colours but hardly the position (see weights/README.md, which also
# compares the two places).
TEXT_AUX_WEIGHT = 0.1
TEXT_AUX_AT = ("words", "pooled")             # the first is the default
ATTRIBUTE_VALUES = {"colour": data.COLOUR_NAMES, "shape": data.SHAPES, "position": data.POSITION_NAMES,
                    "background": data.COLOUR_NAMES, "size": tuple(data.SIZES)}
# the attributes the auxiliary loss names: the position alone, the one the encoder does not learn
# from the UNet's loss; naming the colours too made them bind worse on unseen pairs (weights/README.md)
TEXT_AUX_NAMES = ("position",)
# where each attribute is read: the shape's noun (which follows its size and colour words), the last
# word of the position phrase ("left" of "in the top left") and the word "background" (after its
# colour); the text encoder's causal mask lets each of them see the words before it
ATTRIBUTE_WORD = {"colour": "shape", "shape": "shape", "size": "shape", "position": "position",
                  "background": "background"}
HIGH_NOISE = 0.5               # fraction of timesteps drawn as 1000 sqrt(u) (at most 999) instead of uniformly


def build_models():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text, unet


def npsd_config(scaling_factor, defaults=DEFAULTS):
    """The config npsd.load reads from __metadata__["npsd_config"] (npsd.config.SD15's layout)."""
    return {
        "text_encoder": {"num_heads": TEXT_CONFIG["num_attention_heads"], "layer_norm_eps": TEXT_CONFIG["layer_norm_eps"],
                         "hidden_act": TEXT_CONFIG["hidden_act"]},
        "unet": {"num_heads": UNET_CONFIG["attention_head_dim"], "norm_groups": UNET_CONFIG["norm_num_groups"],
                 "resnet_eps": 1e-5, "transformer_eps": 1e-6, "layer_norm_eps": 1e-5},
        "vae": {"scaling_factor": float(scaling_factor), "norm_groups": VAE_CONFIG["norm_num_groups"], "eps": 1e-6},
        "defaults": dict(defaults),
    }


class Threads:
    """--threads auto: on a shared machine 2 torch threads can be many times slower than 1 (spinning
    OpenMP workers), on an idle one about twice as fast. Every 200 steps, time 10 steps with each
    and keep the faster. (Thread counts change float summation order: runs are seeded, not bit-exact.)"""

    def __init__(self, setting):
        import torch
        self.torch, self.fixed = torch, None if setting == "auto" else int(setting)
        self.times, self.best, self.t = {1: [], 2: []}, 1, None
        torch.set_num_threads(self.fixed or 1)

    def before(self, step):
        if self.fixed:
            return
        phase = step % 200
        n = 1 if phase < 10 else 2 if phase < 20 else self.best
        if phase == 20:
            self.best = min((1, 2), key=lambda k: np.median(self.times[k]) if self.times[k] else 1e9)
            self.times = {1: [], 2: []}
            n = self.best
        self.torch.set_num_threads(n)
        self.n, self.t = n, time.time()

    def after(self, step):
        if self.fixed or self.t is None:
            return
        if step % 200 < 20:
            self.times[self.n].append(time.time() - self.t)


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# --- 1. data -------------------------------------------------------------------------------------

def make_data(workdir, n=NUM_IMAGES):
    path = os.path.join(workdir, "data.npz")
    if os.path.exists(path):
        z = np.load(path)
        return z["images"], list(z["captions"])
    images, captions, _ = data.dataset(n, seed=SEED)
    np.savez(path, images=images, captions=np.array(captions))
    return images, captions


def to_tensor(images):
    import torch
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()           # [B, 3, H, W] 0..255
    return x / 127.5 - 1.0                                             # [-1, 1]


# --- 2. VAE --------------------------------------------------------------------------------------

# Cosine cycles with warm restarts (as SGDR): first cheap 32x32 crops (the VAE is convolutional up to
# its one mid-block attention), then larger crops and whole images so that attention sees 256 tokens,
# then two cycles on whole images at a lower rate, which bring back the small shapes (triangles under
# 8 pixels across came back rounded after the first two), then two with half of each batch drawn in
# random colours (data.random_colour_scene), so that the VAE encodes any colour pair, the second of
# them with the encoder frozen, then one more with the encoder training again and the shape's pixels
# weighted 5x, which keeps small triangles from coming back rounded in the colours that differ least,
# and a last one weighted 10x whose random colours are mostly saturated, as the palette's are.
# steps, peak lr; crop: side of the crops; full: fraction of the steps (at the end) on whole 64x64
# images; random_colours: fraction of each batch in random colours; decoder_only: the encoder frozen
# (the latents, and so the UNet trained on them, do not change); shape_weight: the reconstruction
# loss's weight on the shape and its edge (shape_weights; whole images only); colours: how the random
# colours are drawn (data.random_colour_scene)
VAEPhase = namedtuple("VAEPhase", "steps lr crop full random_colours decoder_only shape_weight colours",
                      defaults=(1.0, "uniform"))
VAE_PHASES = (VAEPhase(800, 1e-3, 32, 0.1, 0.0, False), VAEPhase(400, 5e-4, 48, 0.25, 0.0, False),
              VAEPhase(1200, 3e-4, 64, 1.0, 0.0, False), VAEPhase(2400, 3e-4, 64, 1.0, 0.0, False),
              VAEPhase(1200, 3e-4, 64, 1.0, 0.5, False), VAEPhase(1200, 3e-4, 64, 1.0, 0.5, True),
              VAEPhase(1000, 3e-4, 64, 1.0, 0.5, False, 5.0),
              VAEPhase(1000, 3e-4, 64, 1.0, 0.5, False, 10.0, "saturated"))


def train_vae(vae, images, batch, workdir, deadline, threads, phases=VAE_PHASES):
    import torch
    for k, (steps, lr, crop, full, random_colours, decoder_only, shape_weight, colours) in enumerate(phases, 1):
        path = os.path.join(workdir, f"vae_phase{k}.pt")
        if os.path.exists(path):
            vae.load_state_dict(torch.load(path))
            log(f"VAE: loaded {path}")
            continue
        gen = np.random.default_rng(SEED + 1 if k == 1 else SEED + 10 + k)
        trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if decoder_only else vae.parameters()
        opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        t0 = time.time()
        for step in range(steps):
            threads.before(step)
            n_random = int(round(random_colours * batch))
            x = images[gen.integers(len(images), size=batch - n_random)]           # [B - n, 64, 64, 3]
            if n_random:
                x = np.concatenate([x, [data.random_colour_scene(gen, colours) for _ in range(n_random)]])
            x = to_tensor(x)                                                       # [B, 3, 64, 64]
            if step < (1 - full) * steps:  # a crop on the 4-pixel latent grid
                i, j = 4 * gen.integers(0, (data.SIZE - crop) // 4 + 1, size=2)
                x = x[:, :, i:i + crop, j:j + crop]                                # [B, 3, crop, crop]
            with torch.set_grad_enabled(not decoder_only):
                post = vae.encode(x).latent_dist
                z = post.sample(generator=None)
            rec = vae.decode(z).sample
            err, w = rec - x, shape_weights(x, shape_weight)                      # w: [B, 1, H, W] or 1
            kl = post.kl().mean() / z[0].numel()
            loss = (w * err.abs()).mean() + (w * err ** 2).mean() + 1e-5 * kl   # per-element KL weight 1e-5
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            threads.after(step)
            if step % 50 == 0 or step == steps - 1:
                log(f"VAE phase {k} step {step}/{steps} loss {loss.item():.4f} l1 {err.abs().mean().item():.4f} "
                    f"kl {kl.item():.2f} ({(time.time() - t0) / (step + 1):.2f} s/step)")
            if time.time() > deadline:
                log(f"VAE: time budget reached at phase {k} step {step}")
                break
        torch.save(vae.state_dict(), path)


def shape_weights(x, weight):
    """[B, 3, H, W] scenes in [-1, 1] -> [B, 1, H, W]: `weight` on the shape's pixels (those that
    differ from the top-left pixel, which is always background) and their neighbours, 1 elsewhere;
    1 everywhere when weight is 1. A small shape covers 2-7% of the image, so without it the
    reconstruction loss hardly tells a small triangle from a small circle."""
    import torch
    if weight == 1.0:
        return x.new_ones(())
    shape = ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.02).float()        # [B, 1, H, W]
    shape = torch.nn.functional.max_pool2d(shape, 3, stride=1, padding=1)              # and its edge
    return 1.0 + (weight - 1.0) * shape


def encode_all(vae, images, workdir):
    import torch
    path = os.path.join(workdir, "latents.npz")
    if os.path.exists(path):
        z = np.load(path)
        return z["mean"], z["std"]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            post = vae.encode(to_tensor(images[i:i + 256])).latent_dist
            means.append(post.mean.numpy())
            stds.append(post.std.numpy())
    mean, std = np.concatenate(means), np.concatenate(stds)
    np.savez(path, mean=mean, std=std)
    return mean, std


def latent_scaling(mean, std):
    """1 / the std of the training latents, sampled from their posteriors, in float16 as exported:
    the scaling factor that gives the UNet unit-variance latents (LDM, appendix G)."""
    rng = np.random.default_rng(SEED + 3)
    return float(np.float16(1.0 / (mean + std * rng.standard_normal(mean.shape, dtype=np.float32)).std()))


# --- 4. UNet + text encoder ----------------------------------------------------------------------

def alphas_cumprod():
    """SD's scaled-linear schedule: beta_t = (linspace(sqrt(0.00085), sqrt(0.012), 1000))^2."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def sample_timesteps(gen, batch):
    """-> int64 tensor [batch] in 0..999: uniform, or with probability HIGH_NOISE from the density
    2t / 1000^2 (the square root of a uniform number), which draws t > 500 three times as often as
    t < 500."""
    import torch
    uniform = gen.integers(1000, size=batch)
    high = np.minimum((1000 * np.sqrt(gen.random(batch))).astype(np.int64), 999)
    return torch.from_numpy(np.where(gen.random(batch) < HIGH_NOISE, high, uniform)).long()


def sample_torch(unet, text, vae, scaling, tok, prompts, seed, guidance=7.5, steps=20):
    """DDIM (eta 0, "leading" spacing as the shipped defaults) with classifier-free guidance in torch,
    for the learning curves -> uint8 [N, 64, 64, 3]."""
    import torch
    from ..schedulers import timesteps
    ac = torch.from_numpy(alphas_cumprod()).float()
    ts = timesteps(steps, "leading", steps_offset=1).tolist()           # 951, 901, ..., 1 for 20 steps
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    with torch.no_grad():
        ctx = text(torch.from_numpy(np.stack(tok(list(prompts) + [""] * n))).long()).last_hidden_state
        x = torch.randn((n, 4, data.SIZE // 4, data.SIZE // 4), generator=g)
        for i, t in enumerate(ts):
            e_c, e_u = unet(torch.cat([x, x]), torch.full((2 * n,), t), ctx).sample.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
            a, a_prev = ac[t], ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        img = vae.decode(x / scaling).sample
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    return img.astype(np.uint8)


def learning_curve_point(unet, text, vae, scaling, tok, step):
    """Scores of the EMA model at one training step: the held-out prompts (2 seeds), and the
    same-noise position test: one caption with each of the 5 position words under the same 6 noises,
    counted where the shape lands at the named place (chance 6 of 30; a model that ignores the words
    puts all 5 in one place for a given noise)."""
    from .evaluate import ATTRIBUTES, score
    cases = data.held_out_prompts()
    images = np.concatenate([sample_torch(unet, text, vae, scaling, tok, [c["prompt"] for c in cases], s)
                             for s in (0, 1)])
    hits, _ = score(cases * 2, images)
    point = {"step": step, **{a: hits[a] for a in ATTRIBUTES}}
    placed = [dict(shape="circle", colour="red", background="blue", size="small", position=p)
              for p in data.POSITION_NAMES]
    prompts = [data.caption(**c) for c in placed]
    same = []
    for noise in range(6):
        imgs = sample_torch(unet, text, vae, scaling, tok, prompts, 100 + noise)
        same.append(score(placed, imgs)[0]["position"][0])
    point["same-noise position"] = (int(sum(same)), 30)
    return point


def attribute_targets(captions):
    """captions -> int64 [N, 5]: for each attribute of ATTRIBUTE_VALUES, 1 + the index of the value
    the caption states, or 0 where it states none (always 0 for the empty caption)."""
    said = [data.parse(c) if c else {} for c in captions]
    return np.array([[1 + values.index(d[a]) if d.get(a) else 0 for a, values in ATTRIBUTE_VALUES.items()]
                     for d in said], np.int64).reshape(len(captions), len(ATTRIBUTE_VALUES))


def attribute_tokens(captions):
    """captions -> int64 [N, 5]: for each attribute of ATTRIBUTE_VALUES, the index among the caption's
    77 tokens of the word that carries it (ATTRIBUTE_WORD), 0 (the start token) where the caption has
    no such word. Every word of the grammar is one token, after the start token."""
    out = np.zeros((len(captions), len(ATTRIBUTE_VALUES)), np.int64)
    for i, c in enumerate(captions):
        if not c:
            continue
        words, d = c.split(), data.parse(c)
        at = {"shape": words.index(d["shape"]), "background": words.index("background") if d["background"] else -1,
              "position": words.index(d["position"].split()[-1]) if d["position"] else -1}
        out[i] = [1 + at[ATTRIBUTE_WORD[a]] for a in ATTRIBUTE_VALUES]
    return out


def text_aux_heads():
    """One linear head per attribute on the text encoder's width, for the auxiliary loss."""
    import torch
    return torch.nn.ModuleList([torch.nn.Linear(TEXT_CONFIG["hidden_size"], 1 + len(v))
                                for v in ATTRIBUTE_VALUES.values()])


def text_aux_loss(heads, out, targets, at=None, names=TEXT_AUX_NAMES):
    """Sum over the attributes j in names of the cross-entropy of heads[j] against targets[:, j]
    (int64 [B, 5]), read from out (the text encoder's output) at the pooled state, or with at (int64
    [B, 5], from attribute_tokens) at last_hidden_state[b, at[b, j]] for the rows where at[b, j] > 0."""
    import torch
    loss = out.last_hidden_state.new_zeros(())
    for j, (name, h) in enumerate(zip(ATTRIBUTE_VALUES, heads)):
        if name not in names:
            continue
        if at is None:
            loss = loss + torch.nn.functional.cross_entropy(h(out.pooler_output), targets[:, j])
            continue
        rows = torch.nonzero(at[:, j] > 0).flatten()
        if len(rows):
            states = out.last_hidden_state[rows, at[rows, j]]                  # [R, W]
            loss = loss + torch.nn.functional.cross_entropy(h(states), targets[rows, j])
    return loss


def train_unet(unet, text, mean, std, captions, scaling, steps, batch, lr, workdir, deadline, threads,
               vae=None, eval_every=0, aux_at=TEXT_AUX_AT[0], aux_names=TEXT_AUX_NAMES):
    import copy
    import torch
    from ..tokenizer import Tokenizer
    tok = Tokenizer.default()
    unique = sorted(set(captions) | {""})
    ids_of = dict(zip(unique, tok(unique)))                             # caption -> int64 [77]
    cap_ids = np.stack([ids_of[c] for c in captions])                   # [N, 77]
    targets = torch.from_numpy(attribute_targets(captions))            # [N, 5]
    token_at = torch.from_numpy(attribute_tokens(captions)) if aux_at == "words" else None   # [N, 5]
    empty = torch.from_numpy(ids_of[""]).long()
    ac = torch.from_numpy(alphas_cumprod()).float()                      # [1000]
    snr = ac / (1 - ac)                                                  # [1000]
    weight = torch.clamp(snr, max=5.0) / snr                             # min-SNR-5 for epsilon targets
    heads = text_aux_heads()
    params = list(unet.parameters()) + list(text.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = {"unet": copy.deepcopy(unet).eval(), "text": copy.deepcopy(text).eval()}
    start = 0
    ckpt = os.path.join(workdir, "unet_ckpt.pt")
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"]); text.load_state_dict(state["text"])
        ema["unet"].load_state_dict(state["ema_unet"]); ema["text"].load_state_dict(state["ema_text"])
        if "heads" in state:
            heads.load_state_dict(state["heads"]); opt.load_state_dict(state["opt"])
        else:                                    # a checkpoint from before the auxiliary loss: new heads
            log("UNet: checkpoint without text heads; heads and optimiser state start afresh")
        sched.load_state_dict(state["sched"])
        start = state["step"]
        log(f"UNet: resumed from step {start}")
    gen = np.random.default_rng(SEED + 2 + start)
    torch.manual_seed(SEED + 2 + start)

    def save(step):
        torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema["unet"].state_dict(),
                    "ema_text": ema["text"].state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "step": step}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)

    t0, avg = time.time(), None
    step = start
    for step in range(start, steps):
        threads.before(step)
        idx = gen.integers(len(mean), size=batch)
        z0 = torch.from_numpy(mean[idx] + std[idx] * gen.standard_normal(mean[idx].shape, dtype=np.float32))
        z0 = z0 * scaling                                                # [B, 4, 16, 16] unit-variance latents
        ids = torch.from_numpy(cap_ids[idx]).long()                      # [B, 77]
        drop = torch.from_numpy(gen.random(batch) < P_UNCOND)
        ids[drop] = empty
        said = targets[idx].clone()                                      # [B, 5]
        said[drop] = 0                                                   # the empty caption states nothing
        at = None if token_at is None else token_at[idx].clone()         # [B, 5]
        if at is not None:
            at[drop] = 0                                                 # ... and has no such words
        t = sample_timesteps(gen, batch)                                 # [B]
        eps = torch.from_numpy(gen.standard_normal(z0.shape, dtype=np.float32))
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps                        # DDPM eq. 4
        out = text(ids)
        ctx = out.last_hidden_state                                      # [B, 77, 64]
        pred = unet(zt, t, ctx).sample
        denoise = (weight[t] * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        loss = denoise + TEXT_AUX_WEIGHT * text_aux_loss(heads, out, said, at, aux_names)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in ((unet, ema["unet"]), (text, ema["text"])):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.mul_(d).add_(p.detach(), alpha=1 - d)
        threads.after(step)
        avg = denoise.item() if avg is None else 0.98 * avg + 0.02 * denoise.item()   # the UNet's loss
        if step % 50 == 0 or step == steps - 1:
            log(f"UNet step {step}/{steps} loss {avg:.4f} ({(time.time() - t0) / (step + 1 - start):.2f} s/step, "
                f"{torch.get_num_threads()} threads)")
        if step % 100 == 99:
            save(step + 1)
        if eval_every and vae is not None and step % eval_every == eval_every - 1:
            t1 = time.time()
            point = learning_curve_point(ema["unet"], ema["text"], vae, scaling, tok, step + 1)
            with open(os.path.join(workdir, "curves.jsonl"), "a") as f:
                f.write(json.dumps(point) + "\n")
            log("eval " + " | ".join(f"{k} {v[0]}/{v[1]}" for k, v in point.items() if k != "step")
                + f" ({time.time() - t1:.0f} s)")
        if time.time() > deadline:
            log(f"UNet: time budget reached at step {step}")
            break
    save(step + 1)
    return ema["unet"], ema["text"], step + 1


# --- 5. export in the original single-file layout ------------------------------------------------

def unet_to_original(sd, levels, n_res, attn_levels):
    """diffusers UNet2DConditionModel names -> CompVis names (model.diffusion_model.* without prefix).
    The inverse of npsd.loading.map_unet: input_blocks count conv_in, then per level n_res ResBlocks
    (+ transformer) and a downsampler; output_blocks count per level n_res + 1 ResBlocks (+ transformer)
    with the upsampler in the last one."""
    blocks = {"conv_in.": "input_blocks.0.0.", "mid_block.resnets.0.": "middle_block.0.",
              "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.1.": "middle_block.2.",
              "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    i = 1
    for l in range(levels):
        for j in range(n_res):
            blocks[f"down_blocks.{l}.resnets.{j}."] = f"input_blocks.{i}.0."
            blocks[f"down_blocks.{l}.attentions.{j}."] = f"input_blocks.{i}.1."
            i += 1
        if l < levels - 1:
            blocks[f"down_blocks.{l}.downsamplers.0.conv."] = f"input_blocks.{i}.0.op."
            i += 1
    i = 0
    for u in range(levels):
        has_attn = attn_levels[levels - 1 - u]
        for j in range(n_res + 1):
            blocks[f"up_blocks.{u}.resnets.{j}."] = f"output_blocks.{i}.0."
            blocks[f"up_blocks.{u}.attentions.{j}."] = f"output_blocks.{i}.1."
            if j == n_res and u < levels - 1:
                blocks[f"up_blocks.{u}.upsamplers.0.conv."] = f"output_blocks.{i}.{2 if has_attn else 1}.conv."
            i += 1
    leaf = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
            "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
    out = {}
    for name, v in sd.items():
        prefix = max((p for p in blocks if name.startswith(p)), key=len)
        rest = name[len(prefix):]
        if ".resnets." in prefix:
            first = next((k for k in leaf if rest.startswith(k)), None)
            rest = leaf[first] + rest[len(first):]
        out[blocks[prefix] + rest] = v
    return out


def vae_to_original(sd, levels):
    """diffusers AutoencoderKL names -> CompVis names (first_stage_model.* without prefix); the
    decoder's up_blocks.u is up.(levels - 1 - u); the mid attention's linears become 1x1 convs."""
    import re
    out = {}
    for name, v in sd.items():
        n = name
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", n)
        n = n.replace(".mid_block.resnets.0.", ".mid.block_1.").replace(".mid_block.resnets.1.", ".mid.block_2.")
        n = n.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f".mid_block.attentions.0.{a}." in n:
                n = n.replace(f".mid_block.attentions.0.{a}.", f".mid.attn_1.{b}.")
                if n.endswith(".weight") and hasattr(v, "reshape"):
                    v = v.reshape(*v.shape, 1, 1)                     # [C, C] -> [C, C, 1, 1]
        n = n.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
        out[n] = v
    return out


def to_original(unet_sd, vae_sd, text_sd):
    """The three modules' state dicts (values: tensors, or anything when only names matter)
    -> {original SD v1.x name: value}."""
    levels = len(UNET_CONFIG["block_out_channels"])
    attn = [t.startswith("CrossAttn") for t in UNET_CONFIG["down_block_types"]]
    out = {}
    for n, v in unet_to_original(unet_sd, levels, UNET_CONFIG["layers_per_block"], attn).items():
        out["model.diffusion_model." + n] = v
    for n, v in vae_to_original(vae_sd, len(VAE_CONFIG["block_out_channels"])).items():
        out["first_stage_model." + n] = v
    for n, v in text_sd.items():               # SD's names: transformer.text_model.*, whether or not this
        if not n.endswith("position_ids"):     # transformers' CLIPTextModel wraps its layers in text_model
            out["cond_stage_model.transformer.text_model." + n.removeprefix("text_model.")] = v
    return out


def original_state_dict(unet, vae, text):
    """The three torch modules -> {original SD v1.x name: float16 numpy array}."""
    out = to_original(unet.state_dict(), vae.state_dict(), text.state_dict())
    return {n: v.detach().float().numpy().astype(np.float16) for n, v in out.items()}


def load_original(path, parts=("vae", "text", "unet")):
    """The inverse of export, with torch: a file in the original layout -> (vae, text, unet) torch
    modules (float32; those not in parts keep their random weights). Used by the tests to run the
    shipped weights in the reference modules, and by --vae-from (parts=("vae",)), which also reads
    files whose UNet or text encoder has another layout."""
    import torch
    from safetensors.numpy import load_file
    tensors = load_file(str(path))
    vae, text, unet = build_models()
    for part, m in (("unet", unet), ("vae", vae), ("text", text)):
        if part not in parts:
            continue
        sds = {"unet": {}, "vae": {}, "text": {}}
        sds[part] = {k: k for k in m.state_dict() if not k.endswith("position_ids")}
        names = to_original(sds["unet"], sds["vae"], sds["text"])          # original name -> module name
        state = {}
        for orig, name in names.items():
            shape = m.state_dict()[name].shape
            state[name] = torch.from_numpy(tensors[orig].astype(np.float32)).reshape(shape)
        m.load_state_dict(state, strict=False)
        missing = set(sds[part]) - set(state)
        if missing:
            raise KeyError(f"{path}: no tensors for {sorted(missing)[:3]}")
    return vae.eval(), text.eval(), unet.eval()


def export(path, unet, vae, text, scaling, extra=None):
    from safetensors.numpy import save_file
    tensors = original_state_dict(unet, vae, text)
    meta = {"npsd_config": json.dumps(npsd_config(scaling)), "format": "pt",
            "npsd_training": json.dumps(extra or {})}
    save_file(tensors, path, metadata=meta)
    n = sum(v.size for v in tensors.values())
    log(f"exported {path}: {len(tensors)} tensors, {n / 1e6:.2f}M parameters, {os.path.getsize(path) / 1e6:.1f} MB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="build/npsd-train", help="data, latents and checkpoints")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "weights", "npsd-tiny.safetensors"))
    ap.add_argument("--vae-steps", type=int, default=None, help="one VAE cycle of this many steps "
                    "(default: VAE_PHASES)")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=4300)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--max-minutes", type=float, default=240,
                    help="stop (and still export) after this long (how long a whole run takes: weights/README.md)")
    ap.add_argument("--vae-minutes", type=float, default=180, help="time budget of the VAE stage")
    ap.add_argument("--num-images", type=int, default=NUM_IMAGES, help="training set size")
    ap.add_argument("--threads", default="auto", help="torch threads: 1, 2, ... or auto (see Threads)")
    ap.add_argument("--stage", choices=("all", "vae", "unet", "export"), default="all")
    ap.add_argument("--vae-from", default=None, metavar="FILE",
                    help="take the VAE from this model file (original layout) instead of training it")
    ap.add_argument("--eval-every", type=int, default=1000, help="learning-curve point every N UNet steps (0: none)")
    ap.add_argument("--text-aux-at", choices=TEXT_AUX_AT, default=TEXT_AUX_AT[0],
                    help="where the text encoder's auxiliary loss reads the attributes: its pooled output, "
                         "or the word that carries each (weights/README.md compares them)")
    ap.add_argument("--text-aux-names", default=",".join(TEXT_AUX_NAMES), metavar="NAMES",
                    help=f"the attributes the auxiliary loss names, comma-separated, of {','.join(ATTRIBUTE_VALUES)} "
                         "(empty: no auxiliary loss)")
    ap.add_argument("--export-only", action="store_true", help="= --stage export")
    args = ap.parse_args(argv)
    aux_names = tuple(n for n in args.text_aux_names.split(",") if n)
    if any(n not in ATTRIBUTE_VALUES for n in aux_names):
        ap.error(f"--text-aux-names: {args.text_aux_names!r} is not a comma-separated list of "
                 f"{', '.join(ATTRIBUTE_VALUES)}")
    import torch
    threads = Threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    start = time.time()
    deadline = start + 60 * args.max_minutes
    vae, text, unet = build_models()
    phases = VAE_PHASES if args.vae_steps is None else (VAE_PHASES[0]._replace(steps=args.vae_steps),)
    for name, m in (("VAE", vae), ("text encoder", text), ("UNet", unet)):
        log(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters")
    images, captions = make_data(args.workdir, args.num_images)
    log(f"data: {len(images)} images, {len(set(captions))} distinct captions")
    stage = "export" if args.export_only else args.stage
    if args.vae_from:
        vae.load_state_dict(load_original(args.vae_from, parts=("vae",))[0].state_dict())
        log(f"VAE: taken from {args.vae_from}")
    elif stage in ("all", "vae"):
        train_vae(vae, images, args.vae_batch, args.workdir, min(deadline, time.time() + 60 * args.vae_minutes),
                  threads, phases)
    else:
        vae.load_state_dict(torch.load(os.path.join(args.workdir, f"vae_phase{len(phases)}.pt")))
    vae.eval()
    mean, std = encode_all(vae, images, args.workdir)
    scaling = latent_scaling(mean, std)
    log(f"latents: std {1 / scaling:.4f} -> scaling factor {scaling}")
    if stage == "vae":
        return
    if stage in ("all", "unet"):
        ema_unet, ema_text, steps = train_unet(unet, text, mean, std, captions, scaling, args.unet_steps,
                                               args.unet_batch, args.lr, args.workdir, deadline, threads,
                                               vae, args.eval_every, args.text_aux_at, aux_names)
    else:
        state = torch.load(os.path.join(args.workdir, "unet_ckpt.pt"), weights_only=False)
        unet.load_state_dict(state["ema_unet"]); text.load_state_dict(state["ema_text"])
        ema_unet, ema_text, steps = unet, text, state["step"]
    extra = {"unet_steps": steps, "unet_batch": args.unet_batch, "vae_phases": phases, "seed": SEED,
             "num_images": args.num_images, "vae_from": os.path.basename(args.vae_from) if args.vae_from else None,
             "text_aux_at": args.text_aux_at, "text_aux_names": list(aux_names)}
    export(os.path.abspath(args.out), ema_unet.eval(), vae, ema_text.eval(), scaling, extra)
    log(f"done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
