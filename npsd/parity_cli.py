"""`npsd parity --model PATH`: npsd against diffusers/transformers on YOUR checkpoint, block by block.

    npsd parity --model v1-5-pruned-emaonly.safetensors          # or a .ckpt, or a diffusers folder
    npsd parity                                                   # the built-in model

The checkpoint is loaded twice: by npsd (npsd.load) and by the references, which share nothing
with npsd's loader, key mapping or config:
- an original single file: diffusers reads it (its tensors, which model it is and which text tower
  it holds), and builds UNet2DConditionModel and AutoencoderKL with its single-file loading
  (from_single_file), the text encoder (transformers' CLIPTextModel) with its single-file CLIP
  loader, from the published configuration of that model (npsd/published_configs.py: SD v1.x's
  v1-inference.yaml or v1-inpainting-inference.yaml with CLIP ViT-L/14's config.json; SD 2.x's
  v2-inference.yaml, v2-inference-v.yaml or v2-inpainting-inference.yaml with OpenCLIP ViT-H/14's
  text tower as stable-diffusion-2-1's config.json describes it), offline. A file that does not fit
  that configuration is refused with diffusers' reason. What the UNet predicts (epsilon or v) is
  not in the file: npsd chooses it (npsd.loading.prediction_type_of for SD 2.x), the report's
  second line says what it chose and why, and the reference's scheduler is given the same;
- a single file that states its own configuration (npsd_config in its header: the built-in model,
  the default here, and models exported by npsd/train): the same, with an LDM configuration of
  its own layout in place of a published one (own_configuration). Its settings (heads, scaling
  factor) are read from the file by the safetensors package, not from npsd's reading of them;
- a diffusers folder: the models', the tokenizer's and the scheduler's from_pretrained on the local
  folder, with its own config files.
Then, at a small image size (--size, default 64 pixels), the same random inputs go through both and
both are traced under the same names (docs/traces.md): npsd's blocks by npsd.trace, the
reference's by forward hooks (npsd/trace_torch.py): the tokenizer's ids (against transformers'
CLIPTokenizer; equal or failed), the text encoder's embeddings, layers (their self-attention and
MLP) and final LayerNorm, the VAE encoder's and decoder's blocks (each resnet, attention, down- and
upsampler), the VAE's latent scaling factor, the UNet's time embedding, conv_in, every down/mid/up
block and inside them every resnet, transformer block, attention and feed-forward, its output, and
one DDIM step with classifier-free guidance (the guided prediction, eps or v, and x_prev; the
reference's scheduler from the folder's scheduler_config.json, else SD v1.5's published one with
npsd's prediction type).
Every block's input (NAME:in) and output are compared.
A wrong key mapping or a wrongly inferred setting in npsd (the number of attention heads, the
scaling factor) therefore shows up as a block above tolerance, and the first such block in execution
order is marked (>>): the report is `npsd compare`'s (npsd.trace_cli.report), max abs error and
relative error (max abs error / max |reference|, as npsd.testing) per tensor. The exit code is 1
when any tensor is above --tolerance (default 1e-4; float32 SD v1.5 and SD 2.1 blocks measure
about 1e-6 to 3e-5) or has no counterpart in the reference.

Needs the test extra (torch, diffusers, transformers, accelerate): pip install "npsd[test]". torch
is imported here only, never by `import npsd`. One torch component is in memory at a time, beside
npsd's weights (and, for a single file, the file's tensors as diffusers read them) and the two
traces (small at the default size).
"""

import gc
import os
import sys
import time

import numpy as np

from . import published_configs, resources
from .errors import CheckpointError, NpsdError, UsageError
from .trace import Trace
from .trace_cli import report
from .trace_torch import hook_trace

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"


def _references():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")                # never reach for the hub
    try:
        import accelerate  # noqa: F401 - diffusers' single-file loading builds models without memory with it
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise NpsdError(f"npsd parity needs torch, diffusers, transformers and accelerate ({e.name or e} is missing); "
                        f'install them with: pip install "npsd[test]"') from None
    return torch


# --- the reference models, built by diffusers/transformers from the checkpoint ---------------------

# names that real SD .ckpt files pickle beside the tensors (training state); torch's weights-only
# unpickler refuses them, so they are bound to an inert placeholder (never to the named code)
TRAINING_STATE = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "numpy.")


class _Placeholder:
    """Stands for a pickled training-state object (a callback, a numpy scalar): takes any
    arguments and state, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _first_sentence(e):
    text = " ".join(str(e).split())
    return text.split(". ")[0].rstrip(".")


def read_checkpoint(torch, path):
    """The file's tensors as diffusers reads them: load_single_file_checkpoint (safetensors, or
    torch.load(weights_only=True)). Real SD .ckpt files also pickle training state, which
    torch.load(weights_only=True) refuses; such a file is read by the same weights-only unpickler
    with those names (TRAINING_STATE, nothing else) bound to _Placeholder. npsd's reader is not used.
    Returns ({name: tensor}, how it was read)."""
    import zipfile
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint
    try:
        return load_single_file_checkpoint(path, local_files_only=True), "read by diffusers"
    except Exception as e:                          # noqa: BLE001 - diffusers wraps torch's error
        if path.endswith(".safetensors"):
            raise CheckpointError(f"parity: diffusers cannot read {path}: {_first_sentence(e)}") from None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:                          # noqa: BLE001
        raise CheckpointError(f"parity: torch cannot read {path}: {_first_sentence(e)}") from None
    refused = [n for n in names if not n.startswith(TRAINING_STATE)]
    if refused:
        raise CheckpointError(f"parity: torch.load(weights_only=True) refuses {path}: it names {', '.join(refused[:3])}")
    try:
        with torch.serialization.safe_globals([(_Placeholder, n) for n in names]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:                          # noqa: BLE001
        raise CheckpointError(f"parity: torch cannot read {path}: {_first_sentence(e)}") from None
    while isinstance(obj, dict) and "state_dict" in obj:   # as load_single_file_checkpoint does
        obj = obj["state_dict"]
    packages = ", ".join(sorted({n.split(".")[0] for n in names}))
    return obj, f"read by torch.load(weights_only=True), the training state it pickles ({packages} objects) as placeholders"


# What an LDM configuration cannot state, so diffusers' single-file loading builds it as in SD's
# models: npsd_config's entries for it, and SD's values
_LDM_FIXED = {("unet", "norm_groups"): 32, ("unet", "resnet_eps"): 1e-5, ("unet", "transformer_eps"): 1e-6,
              ("unet", "layer_norm_eps"): 1e-5, ("vae", "norm_groups"): 32, ("vae", "eps"): 1e-6}


def stated_configuration(path):
    """The npsd_config a .safetensors file's header states, read with the safetensors package
    (json), or None: another kind of file, or a header without one."""
    import json
    from safetensors import safe_open
    if not str(path).endswith(".safetensors"):
        return None
    with safe_open(path, "np") as f:
        text = (f.metadata() or {}).get("npsd_config")
    return None if text is None else json.loads(text)


def own_configuration(path, stated, pipe):
    """(LDM YAML, text_encoder/config.json) for a file that carries npsd's configuration in its
    __metadata__ (npsd_config: the built-in model, models exported by npsd/train), in place of the
    published ones of SD's files. The settings come from what the file states (`stated`, from
    stated_configuration: heads, the VAE's scaling factor, the text encoder's activation and eps; an
    entry it leaves out means SD's value), not from npsd's reading of it; the layout (levels,
    channels, blocks per level, the levels that attend, the context width) from the tensors' shapes
    as npsd.architecture reads them, which diffusers' converter then checks, placing every tensor
    itself. Channels are written as a base times whole multiples, their greatest common divisor
    (diffusers multiplies them back). A design an LDM configuration cannot state is refused in one
    line. (The YAML is written as JSON, which YAML reads.)"""
    import json
    import math
    from . import architecture
    from .params import flatten
    setting = lambda c, k, sd=None: stated.get(c, {}).get(k, sd)              # noqa: E731
    missing = [f"{c}.{k}" for c, k in (("unet", "num_heads"), ("text_encoder", "num_heads"), ("vae", "scaling_factor"))
               if setting(c, k) is None]
    shapes = {c: {k: v.shape for k, v in flatten(pipe.params[c]).items()} for c in ("unet", "vae", "text_encoder")}
    unet, vae = architecture.unet_design(shapes["unet"]), architecture.vae_design(shapes["vae"])
    text = architecture.text_encoder_design(shapes["text_encoder"])
    odd = [f"{c} {k} {setting(c, k, v)} (SD's {v})" for (c, k), v in _LDM_FIXED.items() if setting(c, k, v) != v]
    odd += [text for unlike_sd, text in (
        (unet.time_cond_proj_dim is not None, "an LCM UNet (time_cond_proj_dim)"),
        (unet.ff_mult != 4, f"a feed-forward {unet.ff_mult}x wide (SD's 4x)"),
        (unet.time_embedding_dim != 4 * unet.block_out_channels[0],
         f"a time embedding {unet.time_embedding_dim} wide (SD's 4 x {unet.block_out_channels[0]})")) if unlike_sd]
    if missing or odd:
        raise CheckpointError(f"parity: {path}'s npsd_config " + (f"does not state {', '.join(missing)}" if missing else
                              f"has {', '.join(odd)}, which an LDM configuration cannot tell diffusers"))
    uc, vc = unet.block_out_channels, vae.block_out_channels
    ub, vb = math.gcd(*uc), math.gcd(*vc)
    ldm_unet = {"image_size": 32, "in_channels": unet.in_channels, "out_channels": unet.out_channels,
                "model_channels": ub, "channel_mult": [c // ub for c in uc], "num_res_blocks": unet.layers_per_block,
                "attention_resolutions": [2 ** l for l, a in enumerate(unet.attention_levels) if a],
                "num_heads": setting("unet", "num_heads"), "use_spatial_transformer": True,
                "transformer_depth": unet.transformer_layers_per_block, "context_dim": unet.cross_attention_dim,
                "use_linear_in_transformer": unet.use_linear_projection, "legacy": False}
    ldm_vae = {"double_z": True, "z_channels": vae.latent_channels, "resolution": 256, "in_channels": vae.in_channels,
               "out_ch": vae.out_channels, "ch": vb, "ch_mult": [c // vb for c in vc],
               "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0}
    ldm = {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
        "conditioning_key": "hybrid" if unet.in_channels != vae.latent_channels else "crossattn",
        "scale_factor": setting("vae", "scaling_factor"),
        "unet_config": {"params": ldm_unet},
        "first_stage_config": {"params": {"embed_dim": vae.latent_channels, "ddconfig": ldm_vae}}}}}
    clip = published_configs.CLIP_TEXT_CONFIG
    text_config = {**clip, "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
                   "projection_dim": text.hidden_size, "intermediate_size": text.intermediate_size,
                   "num_hidden_layers": text.num_hidden_layers, "max_position_embeddings": text.max_position_embeddings,
                   "num_attention_heads": setting("text_encoder", "num_heads"),
                   "hidden_act": setting("text_encoder", "hidden_act", clip["hidden_act"]),
                   "layer_norm_eps": setting("text_encoder", "layer_norm_eps", clip["layer_norm_eps"])}
    return json.dumps(ldm, indent=1), text_config


class OriginalFile:
    """An original single file as diffusers reads it, independently of npsd's loader and config:
    the tensors by diffusers' reader (read_checkpoint), the model type by diffusers'
    infer_diffusers_model_type, the text tower by diffusers' is_open_clip_model (OpenCLIP's
    cond_stage_model.model.* names: SD 2.x; else CLIP's), and each model by diffusers' single-file
    loading, offline, with the published configuration of that type (npsd.published_configs),
    written to a temporary folder:
    - UNet, VAE: from_single_file(checkpoint, original_config=<the LDM YAML>), i.e. diffusers'
      create_*_diffusers_config_from_ldm + convert_ldm_*_checkpoint (extract_ema as --no-ema says);
    - text encoder: create_diffusers_clip_model_from_ldm(config=<folder>/text_encoder/config.json),
      i.e. convert_ldm_clip_checkpoint (SD 2.x: convert_open_clip_checkpoint, which splits the fused
      q/k/v and leaves out the 24th layer) into transformers' CLIPTextModel;
    - tokenizer: transformers' CLIPTokenizer on npsd's shipped vocabulary (CLIP's and OpenCLIP's are
      the same), padding with the text tower's published pad token;
    - scheduler: DDIMScheduler from SD v1.5's published scheduler_config.json, predicting what npsd
      chose (prediction_type: the UNet's output is not in the file; it also picks the YAML).
    A wrong key mapping or a wrong inferred setting in npsd then shows up as a difference."""

    def __init__(self, torch, path, ema, prediction_type, pipe):
        import json
        import tempfile
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type, is_open_clip_model
        self.ema, self.prediction_type = ema, prediction_type
        self.checkpoint, self.how = read_checkpoint(torch, path)
        self.model_type = infer_diffusers_model_type(self.checkpoint)
        self.tower = "open_clip" if is_open_clip_model(self.checkpoint) else "clip"
        stated = stated_configuration(path)
        if stated is not None:                                         # the file says what it is
            self.config_name, self.config_source = "own-inference.yaml", "its own configuration (npsd_config)"
            text, text_config = own_configuration(path, stated, pipe)
        else:
            key = (self.model_type, prediction_type)
            if key not in published_configs.LDM_CONFIGS:
                known = ", ".join(f"{m!r} ({p})" for m, p in published_configs.LDM_CONFIGS)
                raise CheckpointError(f"parity: diffusers reads {path} as {self.model_type!r}, predicting "
                                      f"{prediction_type}; npsd parity compares original files of SD v1.x and 2.x: {known}")
            self.config_name, text = published_configs.LDM_CONFIGS[key]
            self.config_source = f"the published {self.config_name}"
            text_config = (published_configs.OPEN_CLIP_TEXT_CONFIG if self.tower == "open_clip"
                           else published_configs.CLIP_TEXT_CONFIG)
        self.folder = tempfile.mkdtemp(prefix="npsd-parity-")
        self.yaml = os.path.join(self.folder, self.config_name)
        with open(self.yaml, "w") as f:
            f.write(text)
        os.mkdir(os.path.join(self.folder, "text_encoder"))
        with open(os.path.join(self.folder, "text_encoder", "config.json"), "w") as f:
            json.dump(text_config, f)

    def model(self, kind):
        """The reference model (kind: text_encoder, vae, unet), float32; then the checkpoint's
        tensors of that component are dropped."""
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel
        try:
            if kind == "text_encoder":
                model = create_diffusers_clip_model_from_ldm(
                    CLIPTextModel, self.checkpoint, subfolder="text_encoder", config=self.folder,
                    torch_dtype=torch.float32, local_files_only=True)
            else:
                cls, extra = (UNet2DConditionModel, {"extract_ema": self.ema}) if kind == "unet" else (AutoencoderKL, {})
                model = cls.from_single_file(self.checkpoint, original_config=self.yaml, local_files_only=True,
                                             torch_dtype=torch.float32,       # whatever the file's precision
                                             low_cpu_mem_usage=True, **extra)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:   # e.g. a tensor of another shape
            raise CheckpointError(f"parity: the {kind} weights do not fit diffusers' model for "
                                  f"{self.config_source}: {_first_sentence(e)}") from None
        # diffusers builds the model without memory and fills in what its converter produced:
        # a parameter still without memory is one the file lacks
        missing = [n for n, p in (*model.named_parameters(), *model.named_buffers()) if p.is_meta]
        if missing:
            raise CheckpointError(f"parity: the {kind} weights lack {len(missing)} tensors of diffusers' model for "
                                  f"{self.config_source}, e.g. {', '.join(missing[:3])}")
        prefix = {"text_encoder": "cond_stage_model.", "vae": "first_stage_model.", "unet": ""}[kind]
        for k in [k for k in self.checkpoint if k.startswith(prefix)]:
            del self.checkpoint[k]
        return model.eval()

    def tokenizer(self):
        from transformers import CLIPTokenizer
        from . import weights
        return CLIPTokenizer(*[str(weights.path(n)) for n in ("vocab.json", "merges.txt")], model_max_length=77,
                             pad_token=published_configs.PAD_TOKENS[self.tower])

    def scheduler(self):
        from diffusers import DDIMScheduler
        return DDIMScheduler.from_config({**published_configs.SCHEDULER_CONFIG, "prediction_type": self.prediction_type})

    def describe(self):
        text = " and SD 2.x's text encoder config (OpenCLIP ViT-H/14)" if self.tower == "open_clip" else ""
        return f"single file, {self.how}, as {self.model_type!r} with {self.config_source}{text}"

    def scheduler_source(self):
        return "npsd's choice, the file does not say"

    def close(self):
        import shutil
        self.checkpoint = None
        shutil.rmtree(self.folder, ignore_errors=True)


class DiffusersFolder:
    """A diffusers folder: the models', the tokenizer's and the scheduler's from_pretrained on the
    local folder (for a folder without tokenizer/ or scheduler/, the ones npsd falls back to: its
    shipped vocabulary, SD v1.5's scheduler)."""

    def __init__(self, folder, pipe):
        self.folder, self.files = folder, (pipe.info or {}).get("files", {})

    def model(self, kind):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
        name = str(self.files.get(kind, ""))
        variant = "fp16" if ".fp16." in name else ("non_ema" if ".non_ema." in name else None)
        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[kind]
        model = cls.from_pretrained(self.folder, subfolder=kind, local_files_only=True, variant=variant,
                                    torch_dtype=torch.float32)                  # float32 whatever the files hold
        return model.eval()

    def tokenizer(self):
        from transformers import CLIPTokenizer
        from . import weights
        if os.path.isdir(os.path.join(self.folder, "tokenizer")):
            return CLIPTokenizer.from_pretrained(self.folder, subfolder="tokenizer", local_files_only=True)
        return CLIPTokenizer(*[str(weights.path(n)) for n in ("vocab.json", "merges.txt")], model_max_length=77)

    def _scheduler_config(self):
        return os.path.join(self.folder, "scheduler", "scheduler_config.json")

    def scheduler(self):
        from diffusers import DDIMScheduler
        if os.path.isfile(self._scheduler_config()):
            return DDIMScheduler.from_pretrained(self.folder, subfolder="scheduler", local_files_only=True)
        return DDIMScheduler.from_config(published_configs.SCHEDULER_CONFIG)   # as npsd's SD v1.x default

    def describe(self):
        return "diffusers folder"

    def scheduler_source(self):
        return ("the folder's scheduler_config.json" if os.path.isfile(self._scheduler_config())
                else "SD v1.5's published scheduler_config.json")

    def close(self):
        pass


# --- the traces: npsd's blocks by npsd.trace, the reference's by forward hooks (npsd.trace_torch) --

def trace_tokenizer(pipe, tokenizer, ours, ref):
    """npsd's token ids vs transformers' CLIPTokenizer (the source's: the folder's tokenizer/, else
    npsd's shipped vocabulary with the published pad token); integers, compared exactly.
    SD 2.x pads with "!" (id 0), as OpenCLIP's tokenizer, which it was trained with, does; but that
    tokenizer encodes a "!" in the prompt as text ("8k!!" -> 330, 748), whereas transformers, given
    "!" as its pad token, matches it in the prompt as a special token and gives the pad id 0 for
    each (diffusers issue #4153). The reference follows OpenCLIP there (split_special_tokens)."""
    prompts = [PROMPT, NEGATIVE, "A  Portable RADIO, 8k!!"]
    ours.record("tokenizer", pipe.tokenize(prompts))                                      # [3, 77] int64
    ref.record("tokenizer", tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                      split_special_tokens=tokenizer.pad_token == "!", return_tensors="np").input_ids)


def trace_text_encoder(torch, pipe, model, ours, ref):
    """The prompt and the negative prompt through both text encoders -> (ids, the reference's context)."""
    from . import clip
    ids = pipe.tokenize([PROMPT, NEGATIVE])                                               # [2, 77] int64
    clip.encode_text(pipe.params["text_encoder"], ids, pipe.config["text_encoder"], trace=ours)
    with hook_trace(model, "text_encoder", ours.names(), ref, strip="text_model."):
        context = model(torch.from_numpy(ids)).last_hidden_state.numpy()                  # [2, 77, D]
    return ids, context


def trace_vae(torch, pipe, model, ours, ref, images, z):
    """An image through both encoders, a latent through both decoders; then the latent scaling factor,
    which is not in the weights (npsd: its config; the reference: its model config)."""
    from . import vae
    vae.encode(pipe.params["vae"], images, pipe.config["vae"], trace=ours)
    vae.decode(pipe.params["vae"], z, pipe.config["vae"], trace=ours)
    with hook_trace(model, "vae", ours.names(), ref):
        model.encode(torch.from_numpy(images))
        model.decode(torch.from_numpy(z))
    ours.record("vae.scaling_factor", np.float32([pipe.scaling_factor]))
    ref.record("vae.scaling_factor", np.float32([model.config.scaling_factor]))


def trace_unet(torch, pipe, model, ours, ref, latents, t, context):
    """One UNet call on the same latents, timestep and (the reference's) context."""
    from . import unet
    unet.unet(pipe.params["unet"], latents, t, context, pipe.config["unet"], trace=ours)
    with hook_trace(model, "unet", ours.names(), ref):
        model(torch.from_numpy(latents), torch.tensor(t), torch.from_numpy(context))


def trace_ddim_step(torch, pipe, unet_ref, sched, ours, ref, latents, ctx_ref, ids, steps=20, guidance=7.5):
    """One DDIM step with classifier-free guidance, each side with its own text encoder, UNet and
    scheduler settings (sched: the reference's DDIMScheduler; npsd's from pipe.config): the guided
    prediction (ddim_step.guided_eps, or guided_v for a v-prediction UNet) and x_prev -> t."""
    from . import schedulers
    from .guidance import cfg
    sched.set_timesteps(steps)
    t = int(sched.timesteps[0])
    spacing = pipe.config["scheduler"].get("timestep_spacing", "leading")
    sch = schedulers.make_schedule("ddim", steps, pipe.config, timestep_spacing=spacing)
    guided = "ddim_step.guided_" + ("v" if sch.prediction_type == "v_prediction" else "eps")
    e = unet_ref(torch.from_numpy(np.concatenate([latents, latents])), t,
                 torch.from_numpy(ctx_ref[[1, 0]])).sample                                # [uncond, cond]
    e_ref = e[:1] + guidance * (e[1:] - e[:1])
    ref.record(guided, e_ref.numpy())
    ref.record("ddim_step.x_prev", sched.step(e_ref, t, torch.from_numpy(latents)).prev_sample.numpy())
    ctx = pipe.encode_text(ids)                                                         # [2, 77, D]: prompt, negative
    t_npsd = int(sch.timesteps[0])
    both = pipe.unet(np.concatenate([latents, latents]), t_npsd, ctx[[1, 0]])
    out = cfg(both[:1], both[1:], guidance)                                             # eps, or v
    eps, x0 = schedulers.model_output_to_eps(out, latents, sch.alphas_cumprod[t_npsd], sch.prediction_type)
    x_prev, _ = schedulers.ddim_step(latents, eps, t_npsd, int(sch.prev_timesteps[0]), sch.alphas_cumprod,
                                     final_alpha_cumprod=sch.final_alpha_cumprod, x0_pred=x0)
    ours.record(guided, out)
    ours.record("ddim_step.x_prev", x_prev)
    return t


def npsd_prediction_type(pipe, folder):
    """What npsd takes the UNet to predict, and why: -> (prediction type, reason). An SD 2.x single
    file says in pipe.info (npsd.loading.prediction_type_of); otherwise npsd's config of the model."""
    if "prediction_type" in (pipe.info or {}):
        return pipe.info["prediction_type"]
    if folder and os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
        where = "the folder's scheduler_config.json"
    else:
        where = "SD v1.x's; nothing says otherwise"
    return pipe.config["scheduler"].get("prediction_type", "epsilon"), where


def run_parity(args, out=None):
    """The `npsd parity` command; returns the exit code (0 all blocks within tolerance, 1 otherwise)."""
    out = out or sys.stdout
    torch = _references()
    import npsd
    if args.model is None:                          # the built-in model's file, as npsd.load() reads it
        from . import weights
        from .loading import BUILTIN_MODEL
        args.model = str(weights.path(BUILTIN_MODEL))
    path = os.fspath(args.model)
    if not os.path.exists(path):
        raise UsageError(f"--model {path} does not exist; give an SD v1.x or 2.x .safetensors/.ckpt file or diffusers folder")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    pipe = npsd.load(path, ema=not args.no_ema)
    f = pipe.vae_factor
    smallest = f * 2 ** (len(pipe.params["unet"]["down_blocks"]) - 1)   # the UNet's lowest level is 1x1
    if args.size % f or args.size < smallest:
        raise UsageError(f"--size must be a multiple of {f} and at least {smallest}, got {args.size}")
    resources.check_parity(pipe, args.size)                          # before either side runs
    folder = path if os.path.isdir(path) else None
    t1 = time.perf_counter()
    prediction, why = npsd_prediction_type(pipe, folder)
    source = DiffusersFolder(folder, pipe) if folder else OriginalFile(torch, path, not args.no_ema, prediction, pipe)
    ours, ref = Trace(), Trace()

    def done(what, since, before):
        print(f"{what}: {len(ours) - before} tensors each side ({time.perf_counter() - since:.1f} s)",
              file=out, flush=True)
        return time.perf_counter(), len(ours)

    try:
        print(f"npsd parity: {path} ({source.describe()}); loaded by npsd in {t1 - t0:.1f} s; "
              f"tolerance {args.tolerance:g} (relative)", file=out, flush=True)
        print(f"prediction type: npsd {prediction} ({why}); the reference's scheduler "
              f"{source.scheduler().config.prediction_type} ({source.scheduler_source()})", file=out, flush=True)
        rng = np.random.default_rng(args.seed)
        h = args.size // f
        latents = rng.standard_normal((1, pipe.latent_channels, h, h), dtype=np.float32)     # [1, 4, h, h]
        images = np.clip(rng.standard_normal((1, 3, args.size, args.size), dtype=np.float32) * 0.5, -1, 1)
        with torch.no_grad():
            start = time.perf_counter()
            trace_tokenizer(pipe, source.tokenizer(), ours, ref)
            since = done("tokenizer", start, 0)
            ids, ctx_ref = trace_text_encoder(torch, pipe, source.model("text_encoder"), ours, ref)
            since = done("text encoder", *since)
            gc.collect()
            trace_vae(torch, pipe, source.model("vae"), ours, ref, images, latents)
            since = done("VAE", *since)
            gc.collect()
            model = source.model("unet")
            x = latents                              # an inpainting UNet reads 9 channels: add 5 more
            if pipe.unet_in_channels != pipe.latent_channels:
                extra = rng.standard_normal((1, pipe.unet_in_channels - pipe.latent_channels, h, h), dtype=np.float32)
                x = np.concatenate([latents, extra], axis=1)
            trace_unet(torch, pipe, model, ours, ref, x, 500.0, ctx_ref[:1])
            since = done("UNet", *since)
            if pipe.unet_in_channels == pipe.latent_channels:       # inpainting UNets need 9 channels
                step = trace_ddim_step(torch, pipe, model, source.scheduler(), ours, ref, latents, ctx_ref, ids)
                done(f"one DDIM step at t={step} with guidance", *since)
            del model
            gc.collect()
    finally:
        source.close()
    rc, rows = report(ours.tensors, ref.tensors, args.tolerance, labels=("npsd", "the reference"), out=out)
    unmatched = [n for n in ours.names() if n not in ref]      # a block the reference has no module for
    if rc or unmatched:
        bad = sum(problem is not None for _, _, problem in rows) + len(unmatched)
        print(f"npsd parity: FAILED: {bad} of {len(ours)} tensors above {args.tolerance:g}, mismatched or "
              f"without a reference", file=out)
        return 1
    worst = max((r for r in rows if r[1] is not None), key=lambda r: r[1].max_rel)
    print(f"npsd parity: OK: {len(rows)} tensors within {args.tolerance:g} "
          f"(worst: {worst[0]}, {worst[1].max_rel:.3e})", file=out)
    return 0
