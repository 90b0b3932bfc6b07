"""Load SD v1.x weights from the files users have: original single files and diffusers folders.

    pipe = npsd.load("v1-5-pruned-emaonly.safetensors")   # or .ckpt, or a diffusers folder

Every layout ends up in npsd's one naming (diffusers / transformers names, docs/parameters.md):

    params = {"text_encoder": CLIPTextModel names without "text_model." and without position_ids,
              "unet": UNet2DConditionModel names, "vae": AutoencoderKL names (current attention names)}

The original single-file layout (CompVis latent-diffusion names) is translated by the tables
below (docs/checkpoints.md shows them side by side): the UNet's flat `input_blocks.i` /
`output_blocks.i` numbering is turned into (level, layer) from the blocks present, then renames
of the leaf modules apply. Before reading any tensor, the translated names and shapes are checked
against what npsd's components need (npsd.architecture: the design read from a few anchor tensors,
then every tensor of that design), so a wrong or damaged file fails with the offending names.
Tensors are then read and converted to float32 (or, with weights_dtype="float16", to float16) one at a time.
"""

import json
import logging
import os
import re
import warnings
from dataclasses import replace

import numpy as np

from . import architecture, clip
from .config import LCM_DEFAULTS, sd15_config, sd2_config
from .errors import CheckpointError, InputError, NpsdError, is_flag
from .malloc import holding
from .params import flatten, unflatten
from .pipeline import Pipeline
from .safetensors_io import open_weights

log = logging.getLogger("npsd")

# --- the original single-file layout -------------------------------------------------------------

PREFIXES = {  # original prefix -> component
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.transformer.": "text_encoder",  # then "text_model." (transformers >= 4.x saves)
    "cond_stage_model.model.": "text_encoder",        # SD 2.x: OpenCLIP ViT-H/14's text tower (map_open_clip)
}
IGNORED = {  # the DDPM schedule buffers and EMA bookkeeping: recomputed by npsd's samplers, not weights
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates",
}

# Leaf renames, applied in order with re.sub after the block numbering below.
UNET_RENAMES = [
    (r"^time_embed\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.2\.", "time_embedding.linear_2."),
    (r"^out\.0\.", "conv_norm_out."),
    (r"^out\.2\.", "conv_out."),
    (r"\.in_layers\.0\.", ".norm1."),           # ResBlock: GroupNorm, SiLU, conv
    (r"\.in_layers\.2\.", ".conv1."),
    (r"\.emb_layers\.1\.", ".time_emb_proj."),  # SiLU, linear
    (r"\.out_layers\.0\.", ".norm2."),          # GroupNorm, SiLU, dropout, conv
    (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".conv_shortcut."),
]   # spatial transformers (norm, proj_in, transformer_blocks.*, proj_out) already use diffusers' names
VAE_RENAMES = [
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.q\.", ".mid_block.attentions.0.to_q."),       # 1x1 conv -> linear (reshaped)
    (r"\.mid\.attn_1\.k\.", ".mid_block.attentions.0.to_k."),
    (r"\.mid\.attn_1\.v\.", ".mid_block.attentions.0.to_v."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),      # after reversing the index
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]
VAE_LEGACY_RENAMES = [  # diffusers folders saved before diffusers 0.14 (the hub's fp32 SD v1.5 VAE)
    (r"\.attentions\.0\.query\.", ".attentions.0.to_q."),
    (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
    (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0."),
]
LINEAR_ATTENTION = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def unet_block_map(names):
    """Original block prefixes -> diffusers prefixes, read off the blocks present (any depth/levels).

    input_blocks.0 is conv_in; then each input block is a ResBlock (+ transformer) of the current
    level, or a lone downsampler `.0.op` that closes the level. Output blocks mirror it: a ResBlock
    (+ transformer), and an upsampler `.1.conv` or `.2.conv` closes the level.
    """
    m = {"input_blocks.0.0.": "conv_in.", "middle_block.0.": "mid_block.resnets.0.",
         "middle_block.1.": "mid_block.attentions.0.", "middle_block.2.": "mid_block.resnets.1."}
    has = lambda prefix: any(n.startswith(prefix) for n in names)
    level = layer = 0
    for i in architecture.block_indices(names, r"input_blocks\.(\d+)\.")[1:]:
        if has(f"input_blocks.{i}.0.op."):
            m[f"input_blocks.{i}.0.op."] = f"down_blocks.{level}.downsamplers.0.conv."
            level, layer = level + 1, 0
        else:
            m[f"input_blocks.{i}.0."] = f"down_blocks.{level}.resnets.{layer}."
            if has(f"input_blocks.{i}.1."):
                m[f"input_blocks.{i}.1."] = f"down_blocks.{level}.attentions.{layer}."
            layer += 1
    level = layer = 0
    for i in architecture.block_indices(names, r"output_blocks\.(\d+)\."):
        m[f"output_blocks.{i}.0."] = f"up_blocks.{level}.resnets.{layer}."
        up = next((k for k in (1, 2) if has(f"output_blocks.{i}.{k}.conv.")), None)
        if up is not None:
            m[f"output_blocks.{i}.{up}.conv."] = f"up_blocks.{level}.upsamplers.0.conv."
        if up != 1 and has(f"output_blocks.{i}.1."):
            m[f"output_blocks.{i}.1."] = f"up_blocks.{level}.attentions.{layer}."
        level, layer = (level + 1, 0) if up is not None else (level, layer + 1)
    return m


def _rename(name, rules):
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def map_unet(names):
    """Original UNet names (without "model.diffusion_model.") -> {diffusers name: original name}."""
    blocks = unet_block_map(names)
    out = {}
    for n in names:
        parts = n.split(".")
        prefix = next((p for p in (".".join(parts[:k]) + "." for k in (4, 3, 2)) if p in blocks), None)
        new = blocks[prefix] + n[len(prefix):] if prefix else n
        out[_rename(new, UNET_RENAMES)] = n
    return out


def map_vae(names):
    """Original VAE names (without "first_stage_model.") -> {diffusers name: original name}.
    The decoder's `up.N` counts from the lowest resolution (up.3 runs first); diffusers' up_blocks
    count in running order, so N -> levels - 1 - N."""
    levels = len(architecture.block_indices(names, r"decoder\.up\.(\d+)\."))
    out = {}
    for n in names:
        new = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", n)
        out[_rename(new, VAE_RENAMES)] = n
    return out


def map_text_encoder(names):
    """CLIP names (without "cond_stage_model.transformer." / "text_model.") map to themselves."""
    return {re.sub(r"^text_model\.", "", n): n for n in names if not n.endswith("position_ids")}


OPEN_CLIP_RENAMES = [
    (r"^token_embedding\.", "embeddings.token_embedding."),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^ln_final\.", "final_layer_norm."),
]
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")     # the contrastive head; SD reads hidden states


def map_open_clip(names):
    """OpenCLIP text-tower names (without "cond_stage_model.model.") -> {CLIPTextModel name: original
    name, or (original name, i)}: the fused attn.in_proj_weight [3W, W] / in_proj_bias [3W] is split
    into q, k, v (i = 0, 1, 2: its row thirds). The last resblock is left out: SD 2.x conditions on the
    penultimate layer's output followed by ln_final, which is a 23-layer CLIPTextModel (as diffusers'
    converter builds it). Returns (mapping, names left out)."""
    last = max(architecture.block_indices(names, r"transformer\.resblocks\.(\d+)\."), default=None)
    out, unused = {}, []
    for n in names:
        if n in OPEN_CLIP_UNUSED or n.startswith(f"transformer.resblocks.{last}."):
            unused.append(n)
            continue
        fused = re.match(r"(.*)\.attn\.in_proj_(weight|bias)$", n)
        if fused:
            layer = _rename(fused[1] + ".", OPEN_CLIP_RENAMES)
            out.update({f"{layer}self_attn.{qkv}.{fused[2]}": (n, i) for i, qkv in enumerate(("q_proj", "k_proj", "v_proj"))})
        else:
            out[_rename(n, OPEN_CLIP_RENAMES)] = n
    return out, unused


# --- the check: every tensor of the design the anchors describe (npsd.architecture) ---------------

def _few(names, k=4):
    names = sorted(names)
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def check(component, shapes, expected, where):
    """Missing or mis-shaped tensors -> CheckpointError. Returns the names of the unexpected
    tensors (not loaded; `load` warns about them once)."""
    missing = set(expected) - set(shapes)
    if missing:
        raise CheckpointError(f"{where}: the {component} weights lack {len(missing)} tensors npsd needs: {_few(missing)}")
    bad = [n for n in sorted(expected) if tuple(shapes[n]) != tuple(expected[n])]
    if bad:
        raise CheckpointError(f"{where}: shape mismatch in the {component} weights: " + "; ".join(
            f"{n} is {list(shapes[n])} but npsd expects {list(expected[n])}" for n in bad[:3])
            + (f" ({len(bad)} in all)" if len(bad) > 3 else ""))
    return sorted(f"{component}: {n}" for n in set(shapes) - set(expected))


# --- architecture detection ---------------------------------------------------------------------

def _refuse_other_architectures(shapes, where):
    names = list(shapes)
    if any(n.startswith(("conditioner.embedders", "model.diffusion_model.label_emb.", "add_embedding.")) for n in names):
        raise CheckpointError(f"{where} looks like SDXL (conditioner.embedders / add_embedding weights); "
                              f"npsd supports SD v1.x and 2.x")


# --- opening files ------------------------------------------------------------------------------

def _ema_name(name):
    """model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight"""
    return "model_ema." + name[len("model."):].replace(".", "")


def _load_original(path, ema, dtype):
    with open_weights(path) as f:
        shapes = {n: tuple(t.shape) for n, t in f.tensors.items()}
        _refuse_other_architectures(shapes, path)
        parts = {c: {} for c in ("unet", "vae", "text_encoder")}  # component -> {original name: full name}
        ignored, unknown = [], []
        for n in shapes:
            prefix = next((p for p in PREFIXES if n.startswith(p)), None)
            if prefix:
                parts[PREFIXES[prefix]][n[len(prefix):]] = n
            elif n in IGNORED or n.endswith("position_ids") or n.startswith("model_ema."):
                ignored.append(n)
            else:
                unknown.append(n)
        empty = [c for c, p in parts.items() if not p]
        if len(empty) == 3:
            raise CheckpointError(_not_sd1_message(path, shapes, getattr(f, "other", {})))
        if empty:
            raise CheckpointError(f"{path} lacks the {' and '.join(empty)} weights (no "
                                  f"{' / '.join(p + '*' for p, c in PREFIXES.items() if c in empty)} tensors); "
                                  f"npsd needs a complete SD v1.x or 2.x checkpoint")
        # EMA: in v1-5-pruned.* every UNet weight also has an EMA copy (prefix "model." dropped, dots removed)
        ema_names = {n for n in shapes if n.startswith("model_ema.") and n not in IGNORED}
        info = {"format": "original", "file": str(path), "ema": None}
        source = dict(parts["unet"])  # unet original name -> name in the file
        if ema_names:
            info["ema"] = bool(ema)
            if ema:
                wanted = {k: _ema_name(v) for k, v in source.items()}
                lacking = [w for w in wanted.values() if w not in ema_names]
                if lacking:
                    raise CheckpointError(f"{path}: the EMA copies are incomplete (missing {_few(lacking)}); "
                                          f"load it with ema=False to use the raw weights")
                source = wanted
                unknown += sorted(ema_names - set(wanted.values()))
            log.info("npsd: %s: using the %s UNet weights", path, "EMA (model_ema.*)" if ema else "raw (non-EMA)")
        open_clip = any(n.startswith("cond_stage_model.model.") for n in shapes)       # SD 2.x
        if open_clip:
            text_map, unused = map_open_clip(list(parts["text_encoder"]))
            ignored += unused
        else:
            text_map = map_text_encoder(list(parts["text_encoder"]))
        full_name = lambda o: parts["text_encoder"][o] if isinstance(o, str) else (parts["text_encoder"][o[0]], o[1])
        maps = {
            "unet": {d: source[o] for d, o in map_unet(list(parts["unet"])).items()},
            "vae": {d: parts["vae"][o] for d, o in map_vae(list(parts["vae"])).items()},
            "text_encoder": {d: full_name(o) for d, o in text_map.items()},
        }
        params, extra = _read_components({c: f for c in maps}, maps, {c: shapes for c in maps}, dtype)
        if open_clip:   # SD 2.x's settings (npsd/config.py); v or epsilon by prediction_type_of
            channels = architecture.unet_design({k: v.shape for k, v in flatten(params["unet"]).items()}).block_out_channels
            info["prediction_type"] = prediction_type_of(path, params, channels)
            config = sd2_config(channels, info["prediction_type"][0])
        else:
            config = sd15_config()  # SD v1.x fallbacks (npsd/config.py), then what the tensors and metadata say
        config["text_encoder"]["num_heads"] = params["text_encoder"]["final_layer_norm"]["weight"].shape[0] // 64
        meta = f.metadata.get("npsd_config")
        if meta:
            _merge(config, _json(meta, f"{path}: __metadata__ npsd_config"))
            info["config"] = "npsd_config metadata"
        unused_unet_copies = len(parts["unet"]) if ema_names and ema else len(ema_names)  # raw or EMA
        info["ignored"] = len(ignored) + unused_unet_copies
        info["unexpected"] = sorted(unknown) + extra
    return params, config, info


def file_kind(names, other=()):
    """What a weights file is, as far as its tensor names tell: "checkpoint" (a whole SD checkpoint's
    prefixes), "lora", "embedding" or None. other: the names of its entries that are not tensors."""
    if any(n.startswith(tuple(PREFIXES)) for n in names):
        return "checkpoint"
    if any(part in n for n in names for part in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a")):
        return "lora"
    if "string_to_param" in other or (names and set(names) <= {"emb_params", "clip_l", "clip_g"}):
        return "embedding"
    return None


def _network_kind(path, names, other=()):
    """The message for a LoRA or an embedding given where a model or a VAE belongs, else None."""
    kind = file_kind(names, other)
    if kind == "lora":
        return f"{path} is a LoRA, not a model; apply it to one with --lora (Pipeline.load_lora)"
    if kind == "embedding":
        return (f"{path} is a textual-inversion embedding, not a model; put it in --embeddings-dir "
                f"(pipe.embeddings_dir) and write its name in the prompt")
    return None


def _not_sd1_message(path, shapes, other=()):
    """What a file that holds none of an SD checkpoint's components is, as far as its names tell.
    other: the names of its entries that are not tensors (a .pt file's)."""
    names = list(shapes)
    if any(n.startswith(("encoder.", "decoder.")) for n in names) and "quant_conv.weight" in shapes:
        return f"{path} is a standalone VAE file, not a whole SD v1.x or 2.x checkpoint; give it with --vae"
    network = _network_kind(path, names, other)
    if network:
        return network
    if "conv_in.weight" in shapes and any(n.startswith("down_blocks.") for n in names):
        return f"{path} is a single diffusers component file; pass the diffusers folder that contains it"
    if not names:
        return f"{path} holds no tensors ({_few(list(other), 3) or 'nothing'}); give an SD v1.x or 2.x checkpoint"
    return (f"{path} is not an SD v1.x or 2.x checkpoint: none of its {len(names)} tensors is named "
            f"model.diffusion_model.* / first_stage_model.* / cond_stage_model.* (e.g. {_few(names, 3)})")


def _read_components(sources, maps, shapes, dtype, components=("text_encoder", "vae", "unet")):
    """Check all three components' translated names and shapes first (fail before reading
    gigabytes), then read the tensors one at a time. sources/shapes: {component: open file /
    {name in file: shape}}; maps: {component: {npsd name: name in file}}.
    Returns (params, names of unexpected tensors, which are not loaded)."""
    expected, unexpected, width = {}, [], None
    for comp in components:
        mshapes = {d: _part_shape(shapes[comp], o) for d, o in maps[comp].items()}
        for d in mshapes:  # VAE attention 1x1 convs [C, C, 1, 1] become linear weights [C, C]
            if LINEAR_ATTENTION.search(d) and len(mshapes[d]) == 4 and mshapes[d][2:] == (1, 1):
                mshapes[d] = mshapes[d][:2]
        try:  # the anchors' shapes come from the file: a damaged one must not crash the arithmetic
            if comp == "text_encoder":
                design = architecture.text_encoder_design(mshapes)
                width = design.hidden_size
                expected[comp] = architecture.text_encoder_shapes(design)
            elif comp == "vae":
                expected[comp] = architecture.vae_shapes(architecture.vae_design(mshapes))
            else:  # the cross-attention reads the text encoder's states: its width is the text width
                design = architecture.unet_design(mshapes)
                design = replace(design, cross_attention_dim=width) if width else design
                expected[comp] = architecture.unet_shapes(design)
        except (IndexError, ValueError, TypeError, ZeroDivisionError) as e:
            raise CheckpointError(f"{sources[comp].path}: the {comp} weights have shapes npsd cannot interpret "
                                  f"({type(e).__name__}: {e}); the file is damaged or not an SD v1.x or 2.x model") from None
        unexpected += check(comp, mshapes, expected[comp], sources[comp].path)
    params = {}
    for comp, exp in expected.items():
        flat = {}
        for d, shape in exp.items():  # one tensor at a time: peak = the weights in `dtype` + one tensor
            name, part = (maps[comp][d], None) if isinstance(maps[comp][d], str) else maps[comp][d]
            with np.errstate(over="ignore"):   # values beyond float16's range: the error below says so
                t = sources[comp].read(name, dtype)
            stored = str(sources[comp].tensors[name].dtype)            # "F32", "float32", "BF16", ...
            if t.dtype == np.float16 and stored not in ("F16", "float16") and not np.isfinite(t).all():
                raise CheckpointError(f"{sources[comp].path}: {name} has values beyond float16's range (|x| > 65504); "
                                      f"load it with weights_dtype float32")
            if part is not None:      # one third of a fused q/k/v tensor, copied so the rest is freed
                t = t[part * len(t) // 3:(part + 1) * len(t) // 3].copy()
            flat[d] = t.reshape(shape)
        params[comp] = unflatten(flat)
    return params, unexpected


def _part_shape(shapes, source):
    """The shape of a map entry: a tensor's name, or (name, i) for the i-th third of its rows."""
    if isinstance(source, str):
        return shapes[source]
    shape = shapes[source[0]]
    return (shape[0] // 3,) + tuple(shape[1:])


# --- v or epsilon: the shapes cannot tell --------------------------------------------------------

V_TEST_THRESHOLD = -1.0


def prediction_type_of(path, params, unet_channels):
    """What an SD 2.x single file's UNet predicts, "epsilon" or "v_prediction", and why: -> (type, reason).

    1. A config beside the file, as AUTOMATIC1111 reads it (the file's name with .yaml): the LDM
       config's `parameterization: "v"` means v; a config without it means epsilon.
    2. Otherwise AUTOMATIC1111's test (modules/sd_models_config.py): the UNet at t = 999 on x = 0.5
       everywhere ([1, 4, 8, 8]) with a context of 0.5 ([1, 2, 1024]). There x_t is almost pure noise,
       so an epsilon model returns about x, and a v model, v = sqrt(abar) eps - sqrt(1 - abar) x0,
       returns about -x0: mean(unet(x) - x) < -1 means v.
    The caller's prediction_type (API, `--prediction-type`) overrides either."""
    yaml = os.path.splitext(os.fspath(path))[0] + ".yaml"
    if os.path.isfile(yaml):
        try:
            with open(yaml, encoding="utf-8", errors="replace") as fh:
                text = fh.read(1 << 20)
        except OSError as e:
            raise CheckpointError(f"{yaml}: cannot read the config beside the checkpoint ({e})") from None
        v = re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*(#.*)?$", text, re.M) is not None
        return ("v_prediction" if v else "epsilon"), f"{os.path.basename(yaml)} says parameterization {'v' if v else 'eps'}"
    if params["unet"]["conv_in"]["weight"].shape[1] != 4:
        return "epsilon", "an inpainting UNet (SD 2's inpainting model predicts epsilon)"
    from .unet import unet
    width = architecture.context_width({k: v.shape for k, v in flatten(params["unet"]).items()})
    x = np.full((1, 4, 8, 8), 0.5, np.float32)
    context = np.full((1, 2, width), 0.5, np.float32)
    config = sd2_config(unet_channels, "epsilon")["unet"]              # SD 2.x's heads; the type is what is tested
    score = float(np.mean(unet(params["unet"], x, 999, context, config) - x))
    kind = "v_prediction" if score < V_TEST_THRESHOLD else "epsilon"
    return kind, f"AUTOMATIC1111's test: mean(unet(x) - x) at t = 999 is {score:.2f} ({'<' if score < V_TEST_THRESHOLD else '>='} {V_TEST_THRESHOLD:g})"


# --- diffusers folders --------------------------------------------------------------------------

# file names per component (diffusers saves "diffusion_pytorch_model", transformers "model" /
# "pytorch_model"); .safetensors first, then torch-zip .bin (read by the same safe unpickler as .ckpt)
COMPONENT_FILES = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                   "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                   "text_encoder": ("model", "pytorch_model")}


def _component_file(folder, comp, ema):
    d = os.path.join(folder, comp)
    st, binary = COMPONENT_FILES[comp]
    variants = [".non_ema", "", ".fp16"] if comp == "unet" and not ema else ["", ".fp16"]
    for name in [st + v + ".safetensors" for v in variants] + [binary + v + ".bin" for v in variants]:
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    if not os.path.isdir(d):
        raise CheckpointError(f"{folder} has no {comp}/ folder; a diffusers SD v1.x folder has unet/, vae/, text_encoder/")
    have = sorted(os.listdir(d))
    raise CheckpointError(f"{d} has no {st}[.fp16].safetensors or {binary}.bin (found: {', '.join(have) or 'nothing'})"
                          + ("; sharded weights are not supported, merge them into one .safetensors file"
                             if any(h.endswith(".index.json") for h in have) else ""))


def _json(text_or_path, what):
    try:
        if os.path.isfile(text_or_path):
            with open(text_or_path) as fh:
                value = json.load(fh)
        else:
            value = json.loads(text_or_path)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):  # every config npsd reads is a JSON object
        raise CheckpointError(f"{what} is not a JSON object (it is a {type(value).__name__})")
    return value


def _merge(base, extra):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def folder_config(folder):
    """The settings a diffusers folder states in its config.json files, in npsd's config layout."""
    config, read = sd15_config(), lambda *p: _json(os.path.join(folder, *p), os.path.join(*p))
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        u = read("unet", "config.json")
        heads = u.get("num_attention_heads") or u.get("attention_head_dim")  # SD1: "attention_head_dim": 8 heads
        if isinstance(heads, (list, tuple)) and len(set(heads)) == 1:
            heads = heads[0]
        if heads is not None:
            config["unet"]["num_heads"] = heads
        config["unet"]["norm_groups"] = u.get("norm_num_groups", config["unet"]["norm_groups"])
        config["unet"]["resnet_eps"] = u.get("norm_eps", config["unet"]["resnet_eps"])
        if u.get("sample_size"):  # latent size -> default image size (x8 for SD's 4-level VAE)
            config["defaults"]["height"] = config["defaults"]["width"] = int(u["sample_size"]) * 8
        if u.get("addition_embed_type"):
            raise CheckpointError(f"{folder}: this looks like SDXL (unet/config.json has addition_embed_type); "
                                  f"npsd supports SD v1.x and 2.x")
    if os.path.isfile(os.path.join(folder, "vae", "config.json")):
        v = read("vae", "config.json")
        config["vae"]["scaling_factor"] = v.get("scaling_factor", config["vae"]["scaling_factor"])
        config["vae"]["norm_groups"] = v.get("norm_num_groups", config["vae"]["norm_groups"])
    if os.path.isfile(os.path.join(folder, "text_encoder", "config.json")):
        t = read("text_encoder", "config.json")
        for ours, theirs in (("num_heads", "num_attention_heads"), ("layer_norm_eps", "layer_norm_eps"),
                             ("hidden_act", "hidden_act")):
            if theirs in t:
                config["text_encoder"][ours] = t[theirs]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):    # SD 2.x pads with "!", not the end token
        if os.path.isfile(os.path.join(folder, "tokenizer", name)):
            pad = read("tokenizer", name).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str):
                config["text_encoder"]["pad_token"] = pad
    if os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
        s = read("scheduler", "scheduler_config.json")
        for k in config["scheduler"]:
            if k in s:
                config["scheduler"][k] = s[k]
    return config


def _load_folder(folder, ema, dtype):
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):
        raise CheckpointError(f"{folder} looks like SDXL (it has text_encoder_2/); npsd supports SD v1.x and 2.x")
    config = folder_config(folder)
    paths = {c: _component_file(folder, c, ema) for c in ("unet", "vae", "text_encoder")}
    files = {}
    try:
        for c, p in paths.items():
            files[c] = open_weights(p)
        shapes = {c: {n: tuple(t.shape) for n, t in f.tensors.items()} for c, f in files.items()}
        for c in files:
            _refuse_other_architectures(shapes[c], paths[c])
        maps = {
            "unet": {n: n for n in shapes["unet"]},
            "vae": {_rename(n, VAE_LEGACY_RENAMES): n for n in shapes["vae"]},
            "text_encoder": map_text_encoder(list(shapes["text_encoder"])),
        }
        info = {"format": "diffusers", "folder": str(folder), "files": paths,
                "ema": False if paths["unet"].count(".non_ema.") else None}
        for c in ("unet", "vae"):
            meta = files[c].metadata.get("npsd_config")
            if meta:
                _merge(config, _json(meta, f"{paths[c]}: __metadata__ npsd_config"))
        params, info["unexpected"] = _read_components(files, maps, shapes, dtype)
    finally:
        for f in files.values():
            f.close()
    return params, config, info


def _folder_tokenizer(folder, pad_token):
    vocab, merges = (os.path.join(folder, "tokenizer", n) for n in ("vocab.json", "merges.txt"))
    if os.path.isfile(vocab) and os.path.isfile(merges):
        from .tokenizer import Tokenizer
        return Tokenizer.from_files(vocab, merges, pad_token)
    return None  # the Pipeline falls back to the shipped CLIP tokenizer (Tokenizer.default())


# --- a VAE on its own (users swap VAEs: `--vae FILE`) ---------------------------------------------

def load_vae(path, weights_dtype="float32", *, dtype=None):
    """Load only a VAE: a standalone original-layout file (e.g. vae-ft-mse-840000-ema-pruned.safetensors
    / .ckpt), a diffusers VAE file or folder, or the VAE part of a whole SD checkpoint.
    Returns (params, config) with params as `pipe.params["vae"]` and config as `pipe.config["vae"]`:
    `pipe.params["vae"], pipe.config["vae"] = npsd.loading.load_vae("vae.safetensors")`.
    weights_dtype (old name: dtype): float32 or float16, as in `load`."""
    dtype = weights_dtype_of(weights_dtype, dtype)
    path, config = os.fspath(path), sd15_config()["vae"]
    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        if os.path.isfile(os.path.join(folder, "config.json")):
            c = _json(os.path.join(folder, "config.json"), os.path.join(folder, "config.json"))
            config["scaling_factor"] = c.get("scaling_factor", config["scaling_factor"])
            config["norm_groups"] = c.get("norm_num_groups", config["norm_groups"])
        files = [os.path.join(folder, "diffusion_pytorch_model" + v) for v in (".safetensors", ".fp16.safetensors", ".bin")]
        path = next((p for p in files if os.path.isfile(p)), None)
        if path is None:
            raise CheckpointError(f"{folder} has no diffusion_pytorch_model[.fp16].safetensors; not a diffusers VAE folder")
    with open_weights(path) as f:
        names = list(f.tensors)
        if any(n.startswith("first_stage_model.") for n in names):  # a whole SD checkpoint
            names = {n[len("first_stage_model."):]: n for n in names if n.startswith("first_stage_model.")}
        else:  # skip EMA bookkeeping and the training discriminator ("loss.*") of VAE training files
            names = {n: n for n in names if not n.startswith(("model_ema.", "loss."))}
        if not any(n.startswith(("encoder.", "decoder.")) for n in names):
            raise CheckpointError(_network_kind(path, list(f.tensors), getattr(f, "other", {}))
                                  or f"{path} holds no VAE (no encoder.* / decoder.* or first_stage_model.* tensors); "
                                  "give a VAE file or folder")
        if any(n.startswith("encoder.down.") for n in names):
            vae_map = {d: names[o] for d, o in map_vae(list(names)).items()}
        else:
            vae_map = {_rename(n, VAE_LEGACY_RENAMES): names[n] for n in names}
        shapes = {n: tuple(t.shape) for n, t in f.tensors.items()}
        params, extra = _read_components({"vae": f}, {"vae": vae_map}, {"vae": shapes}, dtype, components=("vae",))
        _warn_unexpected(path, extra)
        meta = f.metadata.get("npsd_config")
        if meta:
            config.update(_json(meta, f"{path}: __metadata__ npsd_config").get("vae", {}))
    return params["vae"], config


def _warn_unexpected(where, names):
    if names:
        warnings.warn(f"{where}: ignoring {len(names)} unexpected tensors: {_few(names)}", stacklevel=3)


# --- the public entry point ---------------------------------------------------------------------

BUILTIN_MODEL = "npsd-tiny.safetensors"  # in weights/ (npsd.weights); made by python -m npsd.train.builtin
# Short hashes (npsd.generation.file_hash) of earlier built-in files that hold the same values under other
# tensor names (weights/README.md): PNGs made with them give the same image with this file.
BUILTIN_SAME_VALUES = ("1ea350ad14",)

WEIGHTS_DTYPES = ("float32", "float16")    # NumPy has no bfloat16: bf16 files are read as float32 or rounded to float16


def weights_dtype_of(weights_dtype, dtype=None):
    """load's weights_dtype, or its old name dtype when given -> numpy.float32 or numpy.float16."""
    value = weights_dtype if dtype is None else dtype
    try:
        wanted = np.dtype(value).name
    except TypeError:
        wanted = None
    if wanted not in WEIGHTS_DTYPES:
        shown = getattr(value, "__name__", None) or repr(value)
        raise InputError(f"weights_dtype must be a floating type, {' or '.join(WEIGHTS_DTYPES)}, not {shown}"
                         + ("; NumPy has no bfloat16 (bf16 files load as either)" if "bfloat16" in str(value) else ""))
    if dtype is not None and np.dtype(weights_dtype).name not in ("float32", wanted):
        raise InputError("give weights_dtype, or its old name dtype, not both")
    return np.dtype(wanted)


@holding(huge_pages=True)                     # its temporaries stay in the heap (npsd/malloc.py)
def load(path=None, ema=True, weights_dtype="float32", *, dtype=None):
    """Load an SD v1.x model and return an npsd.Pipeline.

    path:  a single file (.safetensors or torch .ckpt, original SD layout) or a diffusers folder
           (unet/, vae/, text_encoder/, optional tokenizer/; *.safetensors incl. *.fp16.safetensors).
           None: the built-in model.
    ema:   when the file holds EMA copies of the UNet (v1-5-pruned.*), use them (True, the default)
           or the raw training weights (False). In a diffusers folder, ema=False prefers
           unet/*.non_ema.safetensors when present. `pipe.info["ema"]` says what was used
           (None: the file holds one set of UNet weights).
    weights_dtype: the type the weights are kept in: float32 (the default) or float16 (a numpy dtype
           or its name). npsd computes in float32 either way; with float16, which halves the weights'
           memory, each layer converts its own weights when it runs (npsd/nn.py), never the whole
           model at once. Outputs then differ from float32 weights by the float16 rounding of the
           weights (docs/speed.md has the measured difference, memory and time). A float16 file read
           as float16 is not converted. `pipe.info["weights_dtype"]` says which was used.
    dtype: the old name of weights_dtype (still accepted).
    """
    if path is None:  # the built-in model (weights/README.md), installed with npsd as npsd.weights
        from . import weights
        path = weights.path(BUILTIN_MODEL)
        if not os.path.isfile(path):
            raise NpsdError(f"the built-in model {BUILTIN_MODEL} is missing from {os.path.dirname(str(path))}; "
                            f"reinstall npsd, or pass the path of an SD v1.x checkpoint to npsd.load(path)")
    dtype = weights_dtype_of(weights_dtype, dtype)
    if not is_flag(ema):
        raise InputError(f"ema must be True (the EMA copies of the UNet, where the file has them) or False, got {ema!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        params, config, info = _load_folder(path, ema, dtype)
        tokenizer = _folder_tokenizer(path, config["text_encoder"].get("pad_token", "<|endoftext|>"))
    else:
        params, config, info = _load_original(path, ema, dtype)
        tokenizer = None
    _warn_unexpected(path, info["unexpected"])
    clip.blas_layout(params["text_encoder"])
    info["weights_dtype"] = dtype.name
    if "cond_proj" in params["unet"]["time_embedding"] and "config" not in info:   # LCM, without npsd's own config
        config["defaults"].update(LCM_DEFAULTS)
    return Pipeline(params, config, tokenizer, info=info)
