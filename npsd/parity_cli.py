"""`npsd parity --model PATH`: npsd against diffusers/transformers on YOUR checkpoint, block by block.

    npsd parity --model v1-5-pruned-emaonly.safetensors          # or a .ckpt, or a diffusers folder

The checkpoint is loaded twice: by npsd (npsd.load) and by the references, independently of npsd's
key mapping:
- an original single file: its tensors (read with npsd's safe reader, no pickle code is run) are
  converted by diffusers' own single-file converters (convert_ldm_unet_checkpoint,
  convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint) into diffusers' UNet2DConditionModel,
  AutoencoderKL and transformers' CLIPTextModel, loaded with strict=True;
- a diffusers folder: the models' from_pretrained on the local folder.
The models' sizes (channels, depths) come from the tensor shapes; strict loading fails if they do
not fit. Then, at a small image size (--size, default 64 pixels), the same random inputs go through
both and every block is compared: the tokenizer's ids (against transformers' CLIPTokenizer), the
text encoder's embeddings and layers (and the final output),
the UNet's time embedding, conv_in, down/mid/up blocks and output (forward hooks on the reference),
the VAE encoder's and decoder's blocks and outputs, and one DDIM step with classifier-free guidance.
The table shows max abs error and relative error (max abs error / max |reference|, as
npsd.testing) per block; the exit code is 1 when any block is above --tolerance (default 1e-4;
float32 SD v1.5 blocks measure about 1e-6 to 1e-5).

Needs the test extra (torch, diffusers, transformers): pip install "npsd[test]". torch is imported
here only, never by `import npsd`. One torch component is in memory at a time, beside npsd's weights.
"""

import gc
import os
import sys
import time

import numpy as np

from .errors import CheckpointError, NpsdError
from .testing import compare

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"


def _references():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")                # never reach for the hub
    try:
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise NpsdError(f"npsd parity needs torch, diffusers and transformers ({e.name or e} is missing); "
                        f'install them with: pip install "npsd[test]"') from None
    return torch


# --- the reference models, built from the checkpoint -------------------------------------------------

def unet_kwargs(pipe):
    """UNet2DConditionModel arguments for the UNet whose weights npsd loaded (read off the shapes)."""
    p, c = pipe.params["unet"], pipe.config["unet"]
    attn = ["attentions" in b and b["attentions"] for b in p["down_blocks"]]
    first = next(b["attentions"][0] for b, a in zip(p["down_blocks"], attn) if a)
    heads = c["num_heads"]
    return dict(
        sample_size=64, in_channels=p["conv_in"]["weight"].shape[1], out_channels=p["conv_out"]["weight"].shape[0],
        block_out_channels=tuple(b["resnets"][0]["conv1"]["weight"].shape[0] for b in p["down_blocks"]),
        layers_per_block=len(p["down_blocks"][0]["resnets"]),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=first["transformer_blocks"][0]["attn2"]["to_k"]["weight"].shape[1],
        attention_head_dim=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        norm_num_groups=c["norm_groups"], norm_eps=c.get("resnet_eps", 1e-5),
        use_linear_projection=first["proj_in"]["weight"].ndim == 2,
        transformer_layers_per_block=len(first["transformer_blocks"]))


def vae_kwargs(pipe):
    p, c = pipe.params["vae"], pipe.config["vae"]
    enc = p["encoder"]
    levels = len(enc["down_blocks"])
    return dict(
        in_channels=enc["conv_in"]["weight"].shape[1], out_channels=p["decoder"]["conv_out"]["weight"].shape[0],
        latent_channels=p["post_quant_conv"]["weight"].shape[0],
        block_out_channels=tuple(b["resnets"][0]["conv1"]["weight"].shape[0] for b in enc["down_blocks"]),
        layers_per_block=len(enc["down_blocks"][0]["resnets"]), norm_num_groups=c["norm_groups"],
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        scaling_factor=c["scaling_factor"], sample_size=64)


def clip_kwargs(pipe):
    p, c = pipe.params["text_encoder"], pipe.config["text_encoder"]
    p = p.get("text_model", p)
    vocab, width = p["embeddings"]["token_embedding"]["weight"].shape
    return dict(vocab_size=vocab, hidden_size=width,
                intermediate_size=p["encoder"]["layers"][0]["mlp"]["fc1"]["weight"].shape[0],
                num_hidden_layers=len(p["encoder"]["layers"]), num_attention_heads=c["num_heads"],
                max_position_embeddings=p["embeddings"]["position_embedding"]["weight"].shape[0],
                hidden_act=c.get("hidden_act", "quick_gelu"), layer_norm_eps=c.get("layer_norm_eps", 1e-5))


class OriginalFile:
    """The original single-file layout: tensors by name (torch, float32), read on demand."""

    def __init__(self, path, ema):
        from .loading import open_weights
        self.path, self.ema = path, ema
        self.f = open_weights(path)

    def state(self, prefixes, placeholders=()):
        import torch
        out = {n: torch.from_numpy(np.ascontiguousarray(self.f.read(n, np.float32)))
               for n in self.f.tensors if n.startswith(prefixes)}
        out.update({n: None for n in self.f.tensors if n.startswith(placeholders)})
        return out

    def unet(self, model):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        if self.ema:   # the EMA copies (model_ema.*), as npsd.load uses them; the raw names route them
            sd = self.state(("model_ema.",), placeholders=("model.diffusion_model.",))
        else:
            sd = self.state(("model.diffusion_model.",))
        return convert_ldm_unet_checkpoint(sd, dict(model.config), extract_ema=self.ema)

    def vae(self, model):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        return convert_ldm_vae_checkpoint(self.state(("first_stage_model.",)), dict(model.config))

    def text_encoder(self, model):
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
        return convert_ldm_clip_checkpoint(self.state(("cond_stage_model.transformer.",)))

    def close(self):
        self.f.close()


def _load_strict(model, sd, what, assign=False):
    """load_state_dict(strict) after the usual name differences (transformers 5: no "text_model."
    prefix, no position_ids buffer); legacy VAE attention 1x1 convs become linear weights."""
    own = model.state_dict()
    fixed = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k not in own and k.startswith("text_model.") and k[len("text_model."):] in own:
            k = k[len("text_model."):]
        if k in own and v is not None and v.ndim == 4 and own[k].ndim == 2:
            v = v[:, :, 0, 0]
        fixed[k] = v.contiguous() if v is not None else v
    missing, unexpected = set(own) - set(fixed), set(fixed) - set(own)
    if missing or unexpected:
        raise CheckpointError(f"parity: the reference {what} does not fit the checkpoint: missing "
                              f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(fixed, strict=True, assign=assign)
    return model.eval()


def reference_model(kind, pipe, source, folder):
    """One reference model (kind: unet, vae, text_encoder) holding the checkpoint's weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    if folder:
        files = (pipe.info or {}).get("files", {})
        variant = "fp16" if ".fp16." in str(files.get(kind, "")) else (
            "non_ema" if ".non_ema." in str(files.get(kind, "")) else None)
        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[kind]
        model = cls.from_pretrained(folder, subfolder=kind, local_files_only=True, variant=variant,
                                    torch_dtype=torch.float32)
        return model.float().eval()
    if kind == "text_encoder":                   # small; has non-persistent buffers, so built normally
        model = CLIPTextModel(CLIPTextConfig(**clip_kwargs(pipe)))
        return _load_strict(model, source.text_encoder(model), kind)
    # UNet and VAE: built without memory ("meta" tensors), then given the converted tensors
    # themselves (assign=True), so the weights are in memory once, not three times
    with torch.device("meta"):
        model = UNet2DConditionModel(**unet_kwargs(pipe)) if kind == "unet" else AutoencoderKL(**vae_kwargs(pipe))
    return _load_strict(model, getattr(source, kind)(model), kind, assign=True)


# --- the comparisons --------------------------------------------------------------------------------

class Table:
    def __init__(self, tolerance, out):
        self.rows, self.tolerance, self.out = [], tolerance, out
        print(f"{'block':<34} {'shape':<20} {'max abs err':>12} {'rel err':>10}  result", file=out)

    def add(self, name, ours, ref):
        try:
            c = compare(ours, ref, name)
            ok = c.max_rel <= self.tolerance
            line = (f"{name:<34} {str(list(c.shape)):<20} {c.max_abs:>12.3e} {c.max_rel:>10.3e}  "
                    f"{'ok' if ok else 'ABOVE TOLERANCE'}")
            self.rows.append((name, c.max_rel, ok))
        except AssertionError as e:
            line = f"{name:<34} FAILED: {' '.join(str(e).split())}"
            self.rows.append((name, float("inf"), False))
        print(line, file=self.out, flush=True)


def _hook_outputs(torch, model, names):
    """Forward hooks that keep each named module's output (a block's first output) as NumPy."""
    outs, hooks = {}, []

    def keep(name):
        def hook(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            outs[name] = first.detach().float().numpy().copy()
        return hook

    for name, mod in model.named_modules():
        if name in names:
            hooks.append(mod.register_forward_hook(keep(name)))
    return outs, hooks


def compare_tokenizer(pipe, folder, table):
    """npsd's token ids vs transformers' CLIPTokenizer on the same vocabulary (the folder's tokenizer/
    when it has one, else the one shipped with npsd): they must be equal."""
    from transformers import CLIPTokenizer
    from . import weights
    sub = os.path.join(folder, "tokenizer") if folder else None
    files = ([os.path.join(sub, n) for n in ("vocab.json", "merges.txt")] if sub and os.path.isdir(sub)
             else [str(weights.path(n)) for n in ("vocab.json", "merges.txt")])
    ref = CLIPTokenizer(*files, model_max_length=77)
    prompts = [PROMPT, NEGATIVE, "A  Portable RADIO, 8k!!"]
    ids_ref = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    table.add("tokenizer (ids)", pipe.tokenize(prompts), ids_ref)


def compare_text_encoder(torch, pipe, model, table):
    from . import clip
    ids = pipe.tokenize([PROMPT, NEGATIVE])                                    # [2, 77] int64
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    ours = clip.hidden_states(pipe.params["text_encoder"], ids, pipe.config["text_encoder"])
    for i, (a, r) in enumerate(zip(ours, out.hidden_states)):
        table.add("text_encoder.embeddings" if i == 0 else f"text_encoder.layers.{i - 1}", a, r.numpy())
    ctx = pipe.encode_text(ids)
    table.add("text_encoder (final)", ctx, out.last_hidden_state.numpy())
    return ids, out.last_hidden_state.numpy()


def compare_unet(torch, pipe, model, table, latents, t, context):
    from . import unet as unet_model
    names = {n for n, _ in model.named_modules()
             if n in ("time_embedding", "conv_in", "mid_block")
             or (n.count(".") == 1 and n.split(".")[0] in ("down_blocks", "up_blocks"))}
    outs, hooks = _hook_outputs(torch, model, names)
    with torch.no_grad():
        eps_ref = model(torch.from_numpy(latents), torch.tensor(t), torch.from_numpy(context)).sample.numpy()
    for h in hooks:
        h.remove()
    trace = {}
    eps = unet_model.unet(pipe.params["unet"], latents, t, context, pipe.config["unet"], trace=trace)
    order = ["time_embedding", "conv_in"] + [k for k in trace if k.startswith("down_blocks")] + ["mid_block"] + \
            [k for k in trace if k.startswith("up_blocks")]
    for k in order:
        if k in trace and k in outs:
            table.add(f"unet.{k}", trace[k], outs[k])
    table.add("unet (eps)", eps, eps_ref)


def compare_vae(torch, pipe, model, table, images, z):
    from . import nn, vae
    p, cfg = pipe.params["vae"], pipe.config["vae"]
    names = {"encoder.conv_in", "encoder.mid_block", "quant_conv", "post_quant_conv", "decoder.conv_in",
             "decoder.mid_block"} | {n for n, _ in model.named_modules()
                                     if n.count(".") == 2 and n.split(".")[1] in ("down_blocks", "up_blocks")}
    outs, hooks = _hook_outputs(torch, model, names)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
        decoded_ref = model.decode(torch.from_numpy(z)).sample.numpy()
    for h in hooks:
        h.remove()
    # npsd's blocks in the same order (npsd.vae.encoder / decoder, step by step)
    enc, dec = p["encoder"], p["decoder"]
    x = nn.conv2d(images, **enc["conv_in"], padding=1)
    table.add("vae.encoder.conv_in", x, outs["encoder.conv_in"])
    for i, block in enumerate(enc["down_blocks"]):
        x = vae.down_block(block, x, cfg)
        table.add(f"vae.encoder.down_blocks.{i}", x, outs[f"encoder.down_blocks.{i}"])
    x = vae.mid_block(enc["mid_block"], x, cfg)
    table.add("vae.encoder.mid_block", x, outs["encoder.mid_block"])
    mean, logvar = pipe.vae_encode(images)
    table.add("vae.encode (mean)", mean, dist.mean.numpy())
    table.add("vae.encode (logvar)", logvar, dist.logvar.numpy())
    x = nn.conv2d(z, **p["post_quant_conv"])
    table.add("vae.post_quant_conv", x, outs["post_quant_conv"])
    x = nn.conv2d(x, **dec["conv_in"], padding=1)
    table.add("vae.decoder.conv_in", x, outs["decoder.conv_in"])
    x = vae.mid_block(dec["mid_block"], x, cfg)
    table.add("vae.decoder.mid_block", x, outs["decoder.mid_block"])
    for i, block in enumerate(dec["up_blocks"]):
        x = vae.up_block(block, x, cfg)
        table.add(f"vae.decoder.up_blocks.{i}", x, outs[f"decoder.up_blocks.{i}"])
    table.add("vae.decode (image)", pipe.vae_decode(z), decoded_ref)


def compare_ddim_step(torch, pipe, unet_ref, table, latents, ctx_ref, ids, steps=20, guidance=7.5):
    """One DDIM step with classifier-free guidance, each side with its own text encoder and UNet."""
    from diffusers import DDIMScheduler
    from . import schedulers
    from .guidance import cfg
    s = pipe.config["scheduler"]
    sched = DDIMScheduler(num_train_timesteps=s["num_train_timesteps"], beta_start=s["beta_start"],
                          beta_end=s["beta_end"], beta_schedule=s["beta_schedule"], clip_sample=False,
                          set_alpha_to_one=s.get("set_alpha_to_one", False), steps_offset=s.get("steps_offset", 1),
                          timestep_spacing=s.get("timestep_spacing", "leading"))
    sched.set_timesteps(steps)
    t = int(sched.timesteps[0])
    with torch.no_grad():
        e = unet_ref(torch.from_numpy(np.concatenate([latents, latents])), t,
                     torch.from_numpy(ctx_ref[[1, 0]])).sample                        # [uncond, cond]
        e_ref = e[:1] + guidance * (e[1:] - e[:1])
        x_ref = sched.step(e_ref, t, torch.from_numpy(latents)).prev_sample.numpy()
    sch = schedulers.make_schedule("ddim", steps, pipe.config, timestep_spacing=s.get("timestep_spacing", "leading"))
    ctx = pipe.encode_text(ids)                                                  # [2, 77, D]: prompt, negative
    both = pipe.unet(np.concatenate([latents, latents]), sch.timesteps[0], ctx[[1, 0]])
    eps = cfg(both[:1], both[1:], guidance)
    x_prev, _ = schedulers.ddim_step(latents, eps, int(sch.timesteps[0]), int(sch.prev_timesteps[0]),
                                     sch.alphas_cumprod, final_alpha_cumprod=sch.final_alpha_cumprod)
    table.add(f"ddim step t={t} (guided eps)", eps, e_ref.numpy())
    table.add(f"ddim step t={t} (x_prev)", x_prev, x_ref)


def run_parity(args, out=None):
    """The `npsd parity` command; returns the exit code (0 all blocks within tolerance, 1 otherwise)."""
    out = out or sys.stdout
    torch = _references()
    import npsd
    path = os.fspath(args.model)
    if not os.path.exists(path):
        from .cli import UsageError
        raise UsageError(f"--model {path} does not exist; give an SD v1.x .safetensors/.ckpt file or diffusers folder")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    pipe = npsd.load(path, ema=not args.no_ema)
    f = pipe.vae_factor
    smallest = f * 2 ** (len(pipe.params["unet"]["down_blocks"]) - 1)   # the UNet's lowest level is 1x1
    if args.size % f or args.size < smallest:
        from .cli import UsageError
        raise UsageError(f"--size must be a multiple of {f} and at least {smallest}, got {args.size}")
    folder = path if os.path.isdir(path) else None
    source = None if folder else OriginalFile(path, ema=bool((pipe.info or {}).get("ema")))
    print(f"npsd parity: {path} ({'diffusers folder' if folder else 'single file, converted by diffusers'}), "
          f"loaded by npsd in {time.perf_counter() - t0:.1f} s; tolerance {args.tolerance:g} (relative)", file=out)
    rng = np.random.default_rng(args.seed)
    h = args.size // f
    latents = rng.standard_normal((1, pipe.latent_channels, h, h), dtype=np.float32)     # [1, 4, h, h]
    images = np.clip(rng.standard_normal((1, 3, args.size, args.size), dtype=np.float32) * 0.5, -1, 1)
    table = Table(args.tolerance, out)
    try:
        with torch.no_grad():
            compare_tokenizer(pipe, folder, table)
            model = reference_model("text_encoder", pipe, source, folder)
            ids, ctx_ref = compare_text_encoder(torch, pipe, model, table)
            del model
            gc.collect()
            model = reference_model("vae", pipe, source, folder)
            compare_vae(torch, pipe, model, table, images, latents)
            del model
            gc.collect()
            model = reference_model("unet", pipe, source, folder)
            x = latents                              # an inpainting UNet reads 9 channels: add 5 more
            if pipe.unet_in_channels != pipe.latent_channels:
                extra = rng.standard_normal((1, pipe.unet_in_channels - pipe.latent_channels, h, h), dtype=np.float32)
                x = np.concatenate([latents, extra], axis=1)
            compare_unet(torch, pipe, model, table, x, 500.0, ctx_ref[:1])
            if pipe.unet_in_channels == pipe.latent_channels:       # inpainting UNets need 9 channels
                compare_ddim_step(torch, pipe, model, table, latents, ctx_ref, ids)
            del model
            gc.collect()
    finally:
        if source is not None:
            source.close()
    bad = [r for r in table.rows if not r[2]]
    worst = max(table.rows, key=lambda r: r[1])
    if bad:
        print(f"npsd parity: FAILED: {len(bad)} of {len(table.rows)} blocks above {args.tolerance:g} "
              f"(worst: {worst[0]}, {worst[1]:.3e})", file=out)
        return 1
    print(f"npsd parity: OK: {len(table.rows)} blocks within {args.tolerance:g} "
          f"(worst: {worst[0]}, {worst[1]:.3e})", file=out)
    return 0
