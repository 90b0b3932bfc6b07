"""LoRA (Hu et al. 2021): low-rank updates merged into the text encoder's and the UNet's weights.

A LoRA file holds, for some linear or conv layers with weight W [out, in(, kh, kw)], two factors

    down (A) [r, in(, kh, kw)]     up (B) [out, r(, 1, 1)]       and often a number alpha,

and the layer used for generation is (Hu et al. 2021, eq. 3, with the alpha / r scaling of their
sec. 4.1 as kohya's trainer writes it)

    W' = W + strength * (alpha / r) * up @ down        (a conv's down flattened to [r, in*kh*kw])

A 3x3 conv's down is itself a 3x3 conv and its up a 1x1 conv (LoCon); their composition is the 3x3
conv whose weight is up @ down reshaped to [out, in, 3, 3], so the merge is the same line.

File formats (tensor names; `<path>` is a module path of npsd's params, which are diffusers' names):

    kohya / A1111    lora_unet_<path, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha
                     lora_te_text_model_<path, dots as underscores>...       (the text encoder)
    diffusers/PEFT   unet.<path>.lora_A.weight / .lora_B.weight, text_encoder.text_model.<path>...;
                     alpha from the safetensors metadata "lora_adapter_metadata" that diffusers'
                     save_lora_weights writes (lora_alpha, alpha_pattern, use_rslora), else alpha = r
    older diffusers  <path>.lora.down.weight / .lora.up.weight, attention processors'
                     attn1.processor.to_q_lora.down.weight (and to_out_lora -> to_out.0)

Kohya names are matched by writing npsd's own module paths (npsd.params.flatten) the kohya way, not
by a table. A name that matches no layer, a shape that does not fit, or a LoRA variant npsd cannot
merge (LoHa, LoKr, DoRA, ...) is a one-line error that names it. Merging never subtracts: the
original arrays of the touched layers are kept, and every change recomputes those layers from them,
so removing all LoRAs gives back the very arrays loaded (LoraSet below; docs/lora.md).
"""

import json
import math
import os
import re
from typing import NamedTuple

import numpy as np

from .errors import CheckpointError, InputError, is_flag, is_number
from .fast import astype
from .loading import file_kind
from .safetensors_io import open_weights
from .params import flatten

COMPONENTS = ("text_encoder", "unet")
KOHYA_PREFIXES = {"text_encoder": ("lora_te_", "text_model."), "unet": ("lora_unet_", "")}  # (prefix, root)
SUFFIXES = [  # the end of a tensor name -> its role; a LoRA layer's name is what comes before
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),                          # kohya / A1111
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),                              # PEFT
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),  # older diffusers
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),    # diffusers' attention processors
    (".alpha", "alpha"),
]
OLD_DIFFUSERS_NAMES = [  # diffusers' attention-processor LoRA names -> module paths
    (r"\.processor\.to_(q|k|v)$", r".to_\1"), (r"\.processor\.to_out$", ".to_out.0"),              # UNet
    (r"\.self_attn\.to_(q|k|v)$", r".self_attn.\1_proj"), (r"\.self_attn\.to_out$", ".self_attn.out_proj"),  # CLIP
]
UNSUPPORTED = [  # pattern in a tensor name -> what it is (npsd merges plain LoRA and LoCon only)
    (r"\.hada_", "LyCORIS LoHa (hada_*)"), (r"\.lokr_", "LyCORIS LoKr (lokr_*)"),
    (r"\.lora_mid\.", "LoCon with a Tucker core (lora_mid)"), (r"dora_scale|lora_magnitude_vector", "DoRA"),
    (r"\.diff(_b)?$", "full weight differences (.diff)"), (r"\.b?oft_", "OFT"),
    (r"lora_embedding_", "LoRA on an embedding table"), (r"\.(lora_[AB]|lora_up|lora_down)\.bias$", "LoRA biases"),
]
SDXL_NAMES = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
              "lora_unet_output_blocks_", "lora_unet_label_emb_", "text_encoder_2.", "unet.add_embedding.")


class Update(NamedTuple):
    """One layer's low-rank update: W += strength * scale * (up @ down), in W's shape."""
    component: str          # "text_encoder" or "unet"
    path: str               # module path in params[component], e.g. "mid_block.attentions.0.proj_in"
    up: np.ndarray          # [out, r] or [out, r, 1, 1]; float16 or float32, as the file stores them
    down: np.ndarray        # [r, in] or [r, in, kh, kw]
    scale: float            # alpha / r (alpha / sqrt(r) for rsLoRA)


class Loaded(NamedTuple):
    """What Pipeline.loras reports for one LoRA."""
    path: str
    format: str             # "kohya" or "diffusers"
    strength: float         # text encoder (and UNet unless unet_strength says otherwise)
    unet_strength: float
    layers: int             # layers touched
    in_base: bool = False   # merged into the base weights (load_lora(..., keep_base=False)): no unloading

    def strength_for(self, component):
        return self.strength if component == "text_encoder" else self.unet_strength


# --- the math -----------------------------------------------------------------------------------

def alpha_scale(alpha, rank):
    """kohya's scaling alpha / r; no alpha (or 0) means alpha = r, as kohya's trainer and A1111 read it."""
    return 1.0 if not alpha else alpha / rank


def low_rank(up, down, shape):
    """up [out, r(, 1, 1)] @ down [r, in(, kh, kw)] -> the update [out, in(, kh, kw)] in `shape`."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)   # [out, in*kh*kw]


BAND_BYTES = 8 * 2**20       # the float32 copy of a float16 weight is made this much at a time


def merged(original, updates, out=None):
    """W' = W + sum_i strength_i * scale_i * up_i @ down_i; updates: [(strength, Update)].
    Computed in float32 and written to `out` in its dtype: by default a new array in W's memory order
    (the text encoder's weights are laid out transposed, npsd.clip.blas_layout); out=original merges
    in place. Each factor strength * scale multiplies the small up [out, r] before the product, and
    the first product's array takes the sum: one full-size float32 array per layer (W is added to it
    and the sum written out a band of rows at a time), where scaling the product and adding it to a
    float32 copy of W made three."""
    if original.ndim == 2 and original.flags.f_contiguous and not original.flags.c_contiguous:
        # W laid out [in, out]: the same sum transposed, W^T + down^T up^T, comes out laid out as W
        flip = [(s, u._replace(up=u.down.reshape(len(u.down), -1).T, down=u.up.reshape(len(u.up), -1).T))
                for s, u in updates]
        return merged(original.T, flip, None if out is None else out.T).T
    w = None
    for strength, u in updates:
        d = low_rank(u.up * np.float32(strength * u.scale), u.down, original.shape)         # float32
        if w is None:
            w = d
        else:
            w += d
    if out is None:
        out = w if original.dtype == np.float32 else np.empty(original.shape, original.dtype)
    rows = max(1, BAND_BYTES // (4 * w[0].size))
    for i in range(0, len(w), rows):        # a band at a time: a float16 W's float32 copy stays small
        band = w[i:i + rows]
        band += astype(original[i:i + rows], np.float32)
        if out is not w:
            out[i:i + rows] = astype(band, out.dtype)    # (fast.astype: NumPy's float16 casts are slow)
    return out


# --- which layers a LoRA can attach to, and their names in each format -----------------------------

def targets(params):
    """{component: {module path: weight shape}}: every linear [out, in] and conv [out, in, kh, kw]
    layer of the text encoder and the UNet (not the text encoder's embedding tables)."""
    return {c: {n[: -len(".weight")]: a.shape for n, a in flatten(params[c]).items()
                if n.endswith(".weight") and a.ndim in (2, 4) and not n.startswith("embeddings.")}
            for c in COMPONENTS}


def kohya_names(layers):
    """{kohya name: (component, path)}: npsd's module paths written as kohya writes diffusers' names,
    e.g. unet down_blocks.0.attentions.0.proj_in -> lora_unet_down_blocks_0_attentions_0_proj_in."""
    names = {}
    for comp, (prefix, root) in KOHYA_PREFIXES.items():
        for path in layers[comp]:
            names[prefix + (root + path).replace(".", "_")] = (comp, path)
    return names


def locate(name, layers, kohya):
    """A LoRA layer name of any format -> (component, path), or None when it names no layer."""
    if name in kohya or name.startswith("lora_"):
        return kohya.get(name)
    comp, rest = next(((c, name[len(p):]) for p, c in (("unet.", "unet"), ("text_encoder.", "text_encoder"),
                                                      ("base_model.model.", None)) if name.startswith(p)),
                      (None, name))
    for pattern, repl in OLD_DIFFUSERS_NAMES:
        rest = re.sub(pattern, repl, rest)
    for c in [comp] if comp else COMPONENTS:
        path = rest[len("text_model."):] if c == "text_encoder" and rest.startswith("text_model.") else rest
        if path in layers[c]:
            return c, path
    return None


def _split(key):
    for suffix, role in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None, None


def _few(names, k=3):
    names = sorted(names)
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


# --- reading a file ----------------------------------------------------------------------------

def read(path, params):
    """A LoRA file (.safetensors, or .pt/.ckpt through npsd's restricted unpickler) -> (format, [Update]).
    Every tensor must be understood and land on a layer of `params`; otherwise CheckpointError."""
    where = os.fspath(path)
    layers = targets(params)
    with open_weights(where) as f:
        numbers = getattr(f, "other", {})                # a .pt file may hold alphas as plain numbers
        odd = [k for k, v in numbers.items() if not is_number(v)]
        if odd:
            raise CheckpointError(f"{where} holds values that are neither tensors nor numbers: {_few(odd)}")
        shapes = {k: tuple(t.shape) for k, t in f.tensors.items()} | {k: () for k in numbers}
        groups = _group(shapes, where)
        kohya = kohya_names(layers)
        fmt = "kohya" if all(n.startswith("lora_") for n in groups) else "diffusers"
        _refuse_other_models(groups, shapes, params, where)
        located = {n: locate(n, layers, kohya) for n in groups}
        unknown = [n for n, loc in located.items() if loc is None]
        if unknown:
            raise CheckpointError(f"{where}: LoRA layers that match no layer of this model ({len(unknown)}): "
                                  f"{_few(unknown)}")
        seen = {}
        for n, loc in located.items():
            if loc in seen:
                raise CheckpointError(f"{where}: {seen[loc]} and {n} are two LoRAs for the same layer "
                                      f"{loc[0]}.{loc[1]}")
            seen[loc] = n
        alphas = _peft_alphas(f.metadata, where) if fmt == "diffusers" else None
        updates = []
        for n, roles in groups.items():
            comp, p = located[n]
            up, down = _factor(f, roles["up"], where), _factor(f, roles["down"], where)
            _check_fit(n, comp, p, up, down, layers[comp][p], where)
            if "alpha" in roles:
                a = roles["alpha"]
                alpha = np.asarray(numbers[a] if a in numbers else f.read(a, np.float32), np.float64)
                if alpha.size != 1 or not np.isfinite(alpha).all():                    # [] or [1]
                    raise CheckpointError(f"{where}: {a} must be one finite number (the LoRA's alpha), got "
                                          f"{alpha.size} values {alpha.reshape(-1)[:3].tolist()}; the file is corrupt")
                scale = alpha_scale(float(alpha.reshape(-1)[0]), down.shape[0])
            elif alphas is not None:
                scale = alphas(comp, p, down.shape[0])
            else:
                scale = 1.0                               # no alpha anywhere: alpha = r
            updates.append(Update(comp, p, up, down, scale))
    return fmt, updates


def _factor(f, name, where):
    """A factor as stored when float16 or float32 (float16 ones, as published files hold them, take half
    the memory until their layer is merged), else as float32; NaN or inf refused."""
    t = f.read(name)
    t = t if t.dtype in (np.float16, np.float32) else t.astype(np.float32)
    if not np.isfinite(t).all():
        raise CheckpointError(f"{where}: {name} holds NaN or inf values; the file is corrupt")
    return t


def _group(shapes, where):
    """{tensor name: shape} -> {LoRA layer name: {"down": tensor, "up": tensor[, "alpha": tensor]}}."""
    for key in shapes:
        what = next((w for pattern, w in UNSUPPORTED if re.search(pattern, key)), None)
        if what:
            raise CheckpointError(f"{where} uses {what} ({key}), which npsd cannot merge; "
                                  f"it merges plain LoRA and LoCon")
    groups, other = {}, []
    for key in shapes:
        name, role = _split(key)
        if name is None:
            other.append(key)
        else:
            groups.setdefault(name, {})[role] = key
    if not groups and file_kind(shapes) == "checkpoint":
        raise CheckpointError(f"{where} is a whole SD checkpoint, not a LoRA; give it as the model (--model, npsd.load)")
    if not groups:
        raise CheckpointError(f"{where} is not a LoRA file: none of its {len(shapes)} tensors is named like one "
                              f"(e.g. {_few(shapes)})")
    if other:
        raise CheckpointError(f"{where}: {len(other)} tensors are not LoRA factors npsd knows: {_few(other)}")
    half = [n for n, g in groups.items() if "up" not in g or "down" not in g]
    if half:
        raise CheckpointError(f"{where}: LoRA layers without both an up and a down factor: {_few(half)}")
    return groups


def _refuse_other_models(groups, shapes, params, where):
    """SDXL names, or a text width other than this model's (SD 2.x: 1024) -> one clear error."""
    sdxl = [n for n in groups if n.startswith(SDXL_NAMES)]
    if sdxl:
        raise CheckpointError(f"{where} looks like an SDXL LoRA ({_few(sdxl, 1)}); npsd supports SD v1.x")
    width = params["text_encoder"]["final_layer_norm"]["weight"].shape[0]
    reads_text = re.compile(r"(q_proj|k_proj|v_proj|fc1|attn2[._]to_k|attn2[._]to_v|attn2\.processor\.to_(k|v))$")
    theirs = {shapes[g["down"]][1] for n, g in groups.items() if reads_text.search(n) and len(shapes[g["down"]]) > 1}
    other = sorted(theirs - {width})
    if other:
        model = " (SD 2.x)" if other[0] == 1024 else ""
        raise CheckpointError(f"{where} was made for a text encoder of width {other[0]}{model}; "
                              f"this model's is {width}")


def _check_fit(name, comp, path, up, down, shape, where):
    """up [out, r(,1,1)] and down [r, in(,kh,kw)] must give the layer's [out, in(, kh, kw)]
    (a 1x1 conv and a linear layer are the same map, stored either way)."""
    inner = lambda s: s[1:2] if s[2:] in ((), (1, 1)) else s[1:]           # (in,) or (in, kh, kw)
    ok = (up.ndim in (2, 4) and down.ndim in (2, 4) and up.shape[2:] in ((), (1, 1)) and len(shape) in (2, 4)
          and up.shape[1] == down.shape[0] and up.shape[0] == shape[0] and inner(down.shape) == inner(shape))
    if not ok:
        raise CheckpointError(f"{where}: LoRA {name} does not fit {comp}.{path}.weight {list(shape)}: "
                              f"up {list(up.shape)} @ down {list(down.shape)}")


def _peft_alphas(metadata, where):
    """diffusers' "lora_adapter_metadata" (PEFT's LoraConfig per component) -> scale(comp, path, r);
    None when the file has none (alpha = r)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where}: the lora_adapter_metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: the lora_adapter_metadata is not a JSON object")
    configs = {c: {k[len(c) + 1:]: v for k, v in meta.items() if k.startswith(c + ".")} for c in COMPONENTS}
    if any(cfg.get("use_dora") for cfg in configs.values()):
        raise CheckpointError(f"{where} uses DoRA, which npsd cannot merge; it merges plain LoRA and LoCon")

    def scale(comp, path, rank):
        cfg = configs[comp]
        name = ("text_model." if comp == "text_encoder" else "") + path   # the module's name in diffusers
        # PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches the end of the name
        pattern = next((p for p in (cfg.get("alpha_pattern") or {}) if re.match(rf"(.*\.)?({p})$", name)), None)
        alpha = cfg["alpha_pattern"][pattern] if pattern else cfg.get("lora_alpha", rank)
        return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    return scale


# --- the LoRAs merged into one pipeline ------------------------------------------------------------

class LoraSet:
    """The LoRAs merged into a Pipeline's params, and the original arrays of the layers they touch
    (only those: memory grows by the touched layers' size, plus the small factors). A LoRA loaded with
    keep_base=False is merged into the base arrays themselves, in place (a read-only array is
    replaced), and its factors are not kept: the layers are not held twice, and it cannot be unloaded."""

    def __init__(self, params):
        self.params = params
        self.loaded = {}        # name -> (Loaded, {(component, path): Update}), in load order
        self.originals = {}     # (component, path) -> the layer's original weight (the very array)
        self.in_base = {}       # name -> Loaded, for the LoRAs merged into the base

    def load(self, path, strength=1.0, name=None, unet_strength=None, keep_base=True):
        strength = _strength(strength, "strength")
        unet_strength = strength if unet_strength is None else _strength(unet_strength, "unet_strength")
        if not is_flag(keep_base):
            raise InputError(f"keep_base must be True or False, got {keep_base!r}")
        name = os.path.splitext(os.path.basename(os.fspath(path)))[0] if name is None else name
        if not isinstance(name, str) or not name:
            raise InputError(f"a LoRA's name must be a non-empty string, got {name!r}")
        if name in self.in_base or (not keep_base and name in self.loaded):
            raise InputError(f"a LoRA named {name!r} is already loaded"
                             + (" into the base weights (keep_base=False); load the model again to change it"
                                if name in self.in_base else "; unload it first or give another name"))
        fmt, updates = read(path, self.params)
        info = Loaded(os.fspath(path), fmt, strength, unet_strength, len(updates), in_base=not keep_base)
        if keep_base:
            previous = self.loaded.pop(name, (None, {}))[1]              # loading a name again replaces it
            self.loaded[name] = (info, {(u.component, u.path): u for u in updates})
            self._remerge(set(previous) | set(self.loaded[name][1]))
            return info.layers
        self.in_base[name] = info
        while updates:                                   # each layer's factors let go once it is merged
            u = updates.pop()
            key, node = (u.component, u.path), _module(self.params[u.component], u.path)
            base = self.originals.get(key, node["weight"])
            out = base if base.flags.writeable else None                       # in place, unless read-only
            base = merged(base, [(info.strength_for(u.component), u)], out=out)
            if key in self.originals:                    # another LoRA touches it too: its new base
                self.originals[key] = base
                self._remerge([key])
            else:
                node["weight"] = base
        return info.layers

    def unload(self, name=None):
        if name is not None and name not in self.loaded:
            raise InputError(f"the LoRA {name!r} was loaded into the base weights (keep_base=False) and cannot "
                             "be unloaded; load the model again" if name in self.in_base else
                             f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loaded) or 'none'})")
        names = list(self.loaded) if name is None else [name]
        touched = set()
        for n in names:
            touched |= set(self.loaded.pop(n)[1])
        self._remerge(touched)

    def info(self):
        return {**self.in_base, **{name: loaded for name, (loaded, _) in self.loaded.items()}}

    def _remerge(self, layers):
        """Recompute each layer from its original and every LoRA that touches it; a layer no LoRA
        touches any more gets its original array back (the same object, so bit-identical)."""
        for comp, path in sorted(layers):
            node = _module(self.params[comp], path)
            original = self.originals.setdefault((comp, path), node["weight"])
            updates = [(info.strength_for(comp), ups[(comp, path)])
                       for info, ups in self.loaded.values() if (comp, path) in ups]
            if updates:
                node["weight"] = merged(original, updates)
            else:
                node["weight"] = self.originals.pop((comp, path))


def _module(tree, path):
    node = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _strength(value, what):
    if not is_number(value) or not math.isfinite(value):
        raise InputError(f"a LoRA's {what} must be a finite number, got {value!r}")
    return float(value)
