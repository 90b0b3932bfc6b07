"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", sec. 2.4; the GPT-2-style pre-LN design): token ids -> the context that the
UNet's cross-attention reads. SD v1.x uses OpenAI's ViT-L/14 text tower: width 768, 12 layers,
12 heads, MLP 3072, 77 positions, quick_gelu; the output is the last hidden state, [B, 77, 768].

params: transformers' CLIPTextModel names without the "text_model." prefix:
    embeddings.token_embedding.weight [V, W], embeddings.position_embedding.weight [77, W],
    encoder.layers[i].{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2},
    final_layer_norm.
config (npsd.config.SD15["text_encoder"]): num_heads (default width / 64, the SD v1.x fallback),
    layer_norm_eps (1e-5), hidden_act ("quick_gelu" or "gelu").
Width, layer count, vocabulary and position count come from the weights.
"""

import numpy as np

from . import nn
from .config import with_fallbacks
from .errors import CheckpointError, InputError, is_whole
from .trace import record as _record, scope as _scope

ACTIVATIONS = {"quick_gelu": nn.quick_gelu, "gelu": nn.gelu}


def embed(params, ids):
    """int64 ids [B, L] -> token embedding + learned position embedding [B, L, W]."""
    tokens = params["token_embedding"]["weight"][ids]                      # [V, W][B, L] -> [B, L, W]
    positions = params["position_embedding"]["weight"][:ids.shape[1]]      # [L, W]  (position ids 0 .. L-1)
    return tokens.astype(np.float32) + positions                           # [B, L, W], float32 (float16 tables too)


def encoder_layer(p, x, num_heads, eps, act, trace=None):
    """One pre-LN transformer layer with causal self-attention, x [B, L, W] -> [B, L, W].

    x = x + Attention(LN1(x))        (queries see only themselves and earlier tokens)
    x = x + fc2(act(fc1(LN2(x))))
    """
    _record(trace, ":in", x)
    a = p["self_attn"]
    h = nn.layer_norm(x, **p["layer_norm1"], eps=eps)                      # [B, L, W]
    _record(trace, "self_attn:in", h)
    q, k, v = nn.linears(h, a["q_proj"], a["k_proj"], a["v_proj"])        # 3 x [B, L, W]
    # softmax(q k^T / sqrt(d) + causal mask) v, per head (Vaswani et al. 2017, eq. 1)
    h = nn.attention(q, k, v, num_heads, causal=True)                     # [B, L, W]
    h = nn.linear(h, **a["out_proj"])                                     # [B, L, W]
    _record(trace, "self_attn", h)
    x = x + h                                                              # [B, L, W]
    h = nn.layer_norm(x, **p["layer_norm2"], eps=eps)                      # [B, L, W]
    _record(trace, "mlp:in", h)
    h = act(nn.linear(h, **p["mlp"]["fc1"]))                               # [B, L, W] -> [B, L, M] (M = 4W)
    h = nn.linear(h, **p["mlp"]["fc2"])                                    # [B, L, M] -> [B, L, W]
    _record(trace, "mlp", h)
    x = x + h                                                              # [B, L, W]
    _record(trace, "", x)
    return x


def hidden_states(params, ids, config, num_layers=None, trace=None):
    """ids [B, L] (L <= positions) -> [embeddings, after layer 1, ..., after layer n], each [B, L, W],
    before the final LayerNorm: transformers' `output_hidden_states`. n = num_layers or all layers.
    trace: None, or an npsd.trace Scope for the text encoder (records embeddings, encoder.layers.i)."""
    params = _text_model(params)
    ids = _check_ids(params, ids)
    if ids.shape[1] > params["embeddings"]["position_embedding"]["weight"].shape[0]:
        raise InputError("hidden_states takes one window of at most 77 tokens; encode_text splits long-prompt chunks")
    layers = params["encoder"]["layers"]
    width = params["embeddings"]["token_embedding"]["weight"].shape[1]
    num_heads, eps, act = _settings(config, width)
    _record(trace, "embeddings:in", ids)
    x = embed(params["embeddings"], ids)                                   # [B, L, W]
    _record(trace, "embeddings", x)
    states = [x]
    for i, p in enumerate(layers[:len(layers) if num_layers is None else num_layers]):
        x = encoder_layer(p, x, num_heads, eps, act, _scope(trace, f"encoder.layers.{i}"))   # [B, L, W]
        states.append(x)
    return states


def encode_text(params, ids, config, clip_skip=None, trace=None):
    """int ids [B, L] -> float32 context [B, L, W]: CLIP's last hidden state after the final LayerNorm.

    L is the number of positions (77) or less, or a multiple of it (chunk mode, Tokenizer.chunked):
    then every 77-token window is encoded on its own and the results are concatenated along tokens.

    clip_skip (as diffusers' pipelines): None or 0 = the last layer; k >= 1 = the output of the layer
    k before the last (hidden_states[-(k + 1)]), then the final LayerNorm. A1111's "CLIP skip" counts
    from 1: A1111 "CLIP skip 2" == clip_skip=1.
    trace: None, or an npsd.trace.Trace: records text_encoder.embeddings, text_encoder.encoder.layers.i
    (and their self_attn, mlp), text_encoder.final_layer_norm (docs/traces.md).
    """
    trace = _scope(trace, "text_encoder")
    params = _text_model(params)
    ids = _check_ids(params, ids)
    num_layers = layer_count(params)
    if clip_skip is None:
        clip_skip = 0
    if not is_whole(clip_skip) or not 0 <= clip_skip <= num_layers:
        raise InputError(f"clip_skip must be an integer from 0 to {num_layers} (the text encoder's layer count) "
                         f"or None, got {clip_skip!r}; A1111's 'CLIP skip 2' is clip_skip=1")
    b, length = ids.shape
    n_pos = params["embeddings"]["position_embedding"]["weight"].shape[0]
    if length > n_pos:                                                    # chunk mode: k windows of 77
        ids = ids.reshape(b * (length // n_pos), n_pos)                    # [B, k*77] -> [B*k, 77]
    eps = _settings(config, params["final_layer_norm"]["weight"].shape[0])[1]
    x = hidden_states(params, ids, config, num_layers=num_layers - clip_skip, trace=trace)[-1]  # [B*k, 77, W]
    _record(trace, "final_layer_norm:in", x)
    x = nn.layer_norm(x, **params["final_layer_norm"], eps=eps)                     # [B*k, 77, W]
    _record(trace, "final_layer_norm", x)
    return x.reshape(b, length, x.shape[-1]).astype(np.float32, copy=False)        # [B, L, W]


LINEAR_LAYERS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                 ("self_attn", "out_proj"), ("mlp", "fc1"), ("mlp", "fc2"))


def blas_layout(params):
    """Store each encoder layer's linear weights [out, in] as their transpose in memory (Fortran
    order), in place; returns params. Shapes and values stay the same, so every formula above reads
    them as before and computes the same numbers. CLIP's products are short (77 rows a prompt), and
    OpenBLAS packs a weight laid out [in, out] faster than one it reads transposed: a 2x77 call took
    0.95 of the time on the Zen 4 EPYC (docs/speed.md section 1). npsd.load lays the text encoder
    out so."""
    for layer in _text_model(params)["encoder"]["layers"]:
        for module, name in LINEAR_LAYERS:
            p = layer[module][name]
            p["weight"] = np.asfortranarray(p["weight"])                   # [out, in], laid out [in, out]
    return params


# --- checks ----------------------------------------------------------------------------------------

def layer_count(params):
    """The number of transformer layers of a text encoder's parameters (clip_skip goes up to it)."""
    return len(_text_model(params)["encoder"]["layers"])


def _text_model(params):
    """Accept transformers 4.x names ("text_model." prefix) as well; check the top-level keys."""
    if "text_model" in params and "embeddings" not in params:
        params = params["text_model"]
    missing = [k for k in ("embeddings", "encoder", "final_layer_norm") if k not in params]
    if missing:
        raise CheckpointError(f"the text encoder's parameters lack {missing} (have {sorted(params)}); "
                              "pass transformers' CLIPTextModel weights, e.g. params['text_encoder']")
    return params


def _settings(config, width):
    """(num_heads, eps, activation) from the config; a key it lacks takes SD v1.x's value
    (npsd.config.SD15["text_encoder"]), but num_heads SD v1.x's rule for any width: 64 per head."""
    num_heads = config.get("num_heads") or width // 64
    if width % num_heads:
        raise CheckpointError(f"text encoder width {width} is not divisible by num_heads={num_heads}; "
                              "fix config['text_encoder']['num_heads']")
    settings = with_fallbacks("text_encoder", config)
    name = settings["hidden_act"]
    if name not in ACTIVATIONS:
        raise InputError(f"unknown text encoder activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return num_heads, settings["layer_norm_eps"], ACTIVATIONS[name]


def _check_ids(params, ids):
    ids = np.asarray(ids)
    vocab, n_pos = (params["embeddings"][k]["weight"].shape[0] for k in ("token_embedding", "position_embedding"))
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"token ids must be an integer array [batch, tokens], got {ids.dtype} {ids.shape}; "
                         "use pipe.tokenize(prompts) (add a batch axis with ids[None] for one row)")
    length = ids.shape[1]
    if length == 0 or (length > n_pos and length % n_pos):
        raise InputError(f"{length} tokens per prompt: the text encoder takes at most {n_pos}, or a multiple "
                         f"of {n_pos} (long-prompt chunks from Tokenizer.chunked)")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise InputError(f"token ids must lie in [0, {vocab}), got values from {ids.min()} to {ids.max()}; "
                         "the ids come from a different tokenizer")
    return ids.astype(np.int64, copy=False)
