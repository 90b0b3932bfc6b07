"""npsd's CLIP text encoder against transformers' CLIPTextModel (and diffusers' clip_skip code).

Weights: CLIPTextModel's random initialisation, then tests.helpers.perturb_ (every LayerNorm weight
1 + 0.1 N(0,1), every bias 0.1 N(0,1)), copied into npsd's nested params.
Inputs: token ids of two real prompts from npsd's tokenizer (identical to transformers', see
tests/test_tokenizer.py).

Tolerance: relative error (max abs difference / max |reference|) in float32; both sides sum in
float32 in a different order. Tiny configs: RTOL = 1e-5, as in tests/test_nn.py. Full ViT-L/14
size: RTOL_FULL (its comment gives the measured errors), and the embeddings (hidden_states[0], a
lookup and one addition on both sides) exactly. Every deliberate bug tried (no causal mask,
LayerNorm eps 10x off either way, gelu for quick_gelu, the attention scale of the wrong width,
clip_skip off by one) gives 1e-3 or more.
"""

import gc
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from npsd import Pipeline, clip, nn
from npsd.config import sd15_config
from npsd.errors import CheckpointError, InputError
from npsd.params import flatten, unflatten
from npsd.testing import assert_close
from npsd.tokenizer import Tokenizer
from tests.helpers import BUGS, Bug, assert_caught, perturb_, t2n, to_numpy_params

RTOL = 1e-5
# Full ViT-L/14, the two PROMPTS: measured 5.4e-7 .. 8.2e-7 for every layer's hidden state, the
# last hidden state and clip_skip 1 and 2, on both kernel paths (npsd/fast.py and the plain
# npsd/nn.py); the tolerance is 6x the largest, 9x the smallest.
RTOL_FULL = 5e-6
PROMPTS = ["a photograph of an astronaut riding a horse", "A Portable Radio, 1950s style; photo by someone's friend"]
LONG = ("a detailed oil painting of a lighthouse on a rocky cliff at dusk, crashing waves, seagulls, "
        "dramatic clouds, warm light from the windows, ") * 4
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"

TINY = dict(vocab_size=49408, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=160,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VIT_L = dict(vocab_size=49408, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def npsd_config(cfg):
    return {"num_heads": cfg["num_attention_heads"], "layer_norm_eps": cfg["layer_norm_eps"],
            "hidden_act": cfg["hidden_act"]}


def build(cfg, seed=0):
    """A perturbed CLIPTextModel and its weights as npsd params."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    model = perturb_(CLIPTextModel(CLIPTextConfig(**cfg)).eval(), seed=seed)
    sd = model.state_dict()
    # transformers 5.x: no "text_model." prefix and no position_ids buffer; 4.x had both. Accept either.
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    params = to_numpy_params(sd, prefix, drop=("position_ids",))
    return model, params


def hf_tokenizer():
    """transformers' CLIPTokenizer from the shipped vocabulary, offline (for diffusers' encode_prompt)."""
    import tempfile
    from transformers import CLIPTokenizer
    folder = Path(tempfile.mkdtemp(prefix="npsd_clip_"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(WEIGHTS / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    tok = CLIPTokenizer.from_pretrained(str(folder))
    shutil.rmtree(folder)
    return tok


def diffusers_clip_skip(model, prompts, clip_skip):
    """diffusers' StableDiffusionPipeline.encode_prompt with clip_skip, run on this text encoder.

    diffusers 0.42.1 reads `text_encoder.text_model.final_layer_norm`, which transformers 5.x's
    CLIPTextModel no longer has (its layers sit at the top level), so the encoder is wrapped in a shim
    that provides that one attribute; everything else is diffusers' own code."""
    from diffusers import StableDiffusionPipeline

    class Shim:
        def __init__(self, m):
            self.m, self.config, self.dtype, self.text_model = m, m.config, m.dtype, m

        def __call__(self, *args, **kwargs):
            return self.m(*args, **kwargs)

    pipe = types.SimpleNamespace(text_encoder=Shim(model), tokenizer=hf_tokenizer(), unet=None)
    with torch.no_grad():
        embeds, _ = StableDiffusionPipeline.encode_prompt(pipe, prompts, torch.device("cpu"), 1, False,
                                                          clip_skip=clip_skip)
    return t2n(embeds)


def reference_outputs(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    hs = [t2n(h) for h in out.hidden_states]
    assert len(hs) == model.config.num_hidden_layers + 1, "hidden_states: the embeddings, then every layer"
    return t2n(out.last_hidden_state), hs


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tiny(tok):
    model, params = build(TINY)
    ids = tok(PROMPTS)
    last, hs = reference_outputs(model, ids)
    return types.SimpleNamespace(model=model, params=params, ids=ids, last=last, hs=hs, config=npsd_config(TINY))


@pytest.fixture(scope="session")
def full(tok):
    """ViT-L/14 text tower: build once, compute every reference output, free the torch model."""
    model, params = build(VIT_L, seed=1)
    ids = tok(PROMPTS)
    last, hs = reference_outputs(model, ids)
    skip1 = diffusers_clip_skip(model, PROMPTS, 1)
    skip2 = diffusers_clip_skip(model, PROMPTS, 2)
    del model
    gc.collect()
    return types.SimpleNamespace(params=params, ids=ids, last=last, hs=hs, skip1=skip1, skip2=skip2,
                                 config=npsd_config(VIT_L))


# --- parity ----------------------------------------------------------------------------------------

def test_tiny_last_hidden_state_and_every_layer(tiny):
    out = clip.encode_text(tiny.params, tiny.ids, tiny.config)
    assert out.dtype == np.float32 and out.shape == (2, 77, 64)
    assert_close(out, tiny.last, RTOL, "last_hidden_state")
    states = clip.hidden_states(tiny.params, tiny.ids, tiny.config)
    assert len(states) == len(tiny.hs)
    for i, (a, r) in enumerate(zip(states, tiny.hs)):
        assert_close(a, r, RTOL, f"hidden_states[{i}]")


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_tiny_clip_skip_matches_diffusers(tiny, clip_skip):
    ref = diffusers_clip_skip(tiny.model, PROMPTS, clip_skip)
    assert_close(clip.encode_text(tiny.params, tiny.ids, tiny.config, clip_skip=clip_skip), ref, RTOL,
                 f"clip_skip={clip_skip}")


def test_tiny_gelu_and_other_eps():
    """hidden_act "gelu" and a non-default eps are read from the config."""
    cfg = dict(TINY, hidden_act="gelu", layer_norm_eps=1e-6, num_hidden_layers=2)
    model, params = build(cfg, seed=3)
    ids = Tokenizer.default()(PROMPTS)
    last, _ = reference_outputs(model, ids)
    assert_close(clip.encode_text(params, ids, npsd_config(cfg)), last, RTOL, "gelu, eps 1e-6")


def test_tiny_unpadded_ids(tiny, tok):
    """Fewer than 77 positions (no padding) works as in transformers."""
    ids = np.array([tok.encode(PROMPTS[0])[0]])                         # [1, 8], no BOS/EOS
    with torch.no_grad():
        ref = t2n(tiny.model(torch.from_numpy(ids)).last_hidden_state)
    assert_close(clip.encode_text(tiny.params, ids, tiny.config), ref, RTOL, "8 tokens")


def test_tiny_chunked_long_prompt(tiny, tok):
    """Chunk mode: [B, 77k] = each 77-token window encoded on its own, concatenated."""
    ids = tok.chunked([LONG, "a cat"])                                    # 2 prompts, k chunks
    k = ids.shape[1] // 77
    assert k >= 2
    out = clip.encode_text(tiny.params, ids, tiny.config)
    assert out.shape == (2, 77 * k, 64)
    windows = []
    for c in range(k):
        part = ids[:, 77 * c:77 * (c + 1)]
        # against npsd on the window alone: the same arithmetic, only the GEMM batch size differs
        assert_close(out[:, 77 * c:77 * (c + 1)], clip.encode_text(tiny.params, part, tiny.config), 1e-6,
                     f"chunk {c} vs npsd alone")
        with torch.no_grad():
            windows.append(t2n(tiny.model(torch.from_numpy(part)).last_hidden_state))
    assert_close(out, np.concatenate(windows, axis=1), RTOL, "chunks vs transformers")


def test_pipeline_methods(tiny):
    config = sd15_config()
    config["text_encoder"].update(tiny.config)
    pipe = Pipeline({"text_encoder": tiny.params}, config)
    ids = pipe.tokenize(PROMPTS)
    np.testing.assert_array_equal(ids, tiny.ids)
    assert_close(pipe.encode_text(ids), tiny.last, RTOL, "Pipeline.encode_text")
    assert_close(pipe.encode_text(ids, clip_skip=1), clip.encode_text(tiny.params, ids, tiny.config, 1), 0,
                 "Pipeline.encode_text clip_skip")


def test_prompt_and_negative_prompt_are_encoded_in_one_batch(tiny, monkeypatch):
    """With guidance, the pipelines encode the prompts and the negative prompts in one text-encoder call
    (products twice as tall as two calls': 0.83 of the time at SD v1.5 size on the Zen 4 EPYC) and
    get each side's own encoding (against two calls: identical on the Zen 4 EPYC; 1e-6 leaves room
    for a BLAS whose kernel sums a taller product in another order, where swapped halves differ by
    O(1)); a trace keeps diffusers' two calls, whose records it names."""
    from npsd.trace import Trace
    config = sd15_config()
    config["text_encoder"].update(tiny.config)
    pipe = Pipeline({"text_encoder": tiny.params}, config)
    batches = []
    encode = pipe.encode_text
    monkeypatch.setattr(pipe, "encode_text", lambda ids, clip_skip=None: batches.append(len(ids)) or encode(ids, clip_skip))
    cond, uncond, n, _ = pipe._contexts(PROMPTS, "blurry", 2, 7.5, None, "truncate")
    assert batches == [2 * len(PROMPTS)] and n == 2 * len(PROMPTS)
    assert_close(cond, np.repeat(clip.encode_text(tiny.params, pipe.tokenize(PROMPTS), tiny.config), 2, axis=0), 1e-6,
                 "prompts in one batch with the negatives")
    negative = clip.encode_text(tiny.params, pipe.tokenize(["blurry"] * len(PROMPTS)), tiny.config)
    assert_close(uncond, np.repeat(negative, 2, axis=0), 1e-6, "negative prompts in one batch with the prompts")
    batches.clear()
    assert pipe._contexts(PROMPTS, "blurry", 1, 1.0, None, "truncate")[1] is None and batches == [len(PROMPTS)]
    batches.clear()
    pipe._trace = Trace()
    pipe._contexts(PROMPTS, "blurry", 1, 7.5, None, "truncate")
    assert batches == [len(PROMPTS), len(PROMPTS)]


def test_transformers_state_dict_names(tiny):
    """transformers 5.x: CLIPTextModel.state_dict() has no "text_model." prefix and no position_ids
    (4.x had both; build() accepts either). npsd's params must hold exactly the model's tensors."""
    import transformers
    keys = set(tiny.model.state_dict())
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not any(k.startswith("text_model.") or k.endswith("position_ids") for k in keys)
    stripped = {k.removeprefix("text_model.") for k in keys if not k.endswith("position_ids")}
    assert set(flatten(tiny.params)) == stripped


def test_transformers_4_names_accepted(tiny):
    out = clip.encode_text({"text_model": tiny.params}, tiny.ids, tiny.config)
    assert_close(out, tiny.last, RTOL, "params under text_model")


def test_heads_fallback_is_width_over_64(tiny):
    """Without num_heads in the config the SD v1.x fallback width / 64 applies (64 -> 1 head here,
    which differs from the model's 4, so the output must differ)."""
    out = clip.encode_text(tiny.params, tiny.ids, {})
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(out, tiny.last, RTOL)


# --- the checks can fail ---------------------------------------------------------------------------

def test_sensitivity(tiny, monkeypatch):
    """Each plausible bug makes the parity check fail."""
    cases = {
        "LayerNorm eps 1e-6": dict(tiny.config, layer_norm_eps=1e-6),
        "gelu instead of quick_gelu": dict(tiny.config, hidden_act="gelu"),
        "2 heads instead of 4": dict(tiny.config, num_heads=2),
    }
    for name, cfg in cases.items():
        with pytest.raises(AssertionError, match="exceeds the tolerance"):
            assert_close(clip.encode_text(tiny.params, tiny.ids, cfg), tiny.last, RTOL, name)
    # clip_skip off by one
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(clip.encode_text(tiny.params, tiny.ids, tiny.config, clip_skip=1),
                     clip.encode_text(tiny.params, tiny.ids, tiny.config, clip_skip=2), RTOL, "skip 1 vs 2")
    # no causal mask
    attention = nn.attention
    monkeypatch.setattr(nn, "attention", lambda q, k, v, heads, causal=False: attention(q, k, v, heads, False))
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        assert_close(clip.encode_text(tiny.params, tiny.ids, tiny.config), tiny.last, RTOL, "no causal mask")


# --- bad input -------------------------------------------------------------------------------------

def test_bad_input(tiny):
    p, cfg = tiny.params, tiny.config
    with pytest.raises(InputError, match="multiple of 77"):
        clip.encode_text(p, np.zeros((1, 100), np.int64), cfg)
    with pytest.raises(InputError, match="integer array"):
        clip.encode_text(p, np.zeros((1, 77), np.float32), cfg)
    with pytest.raises(InputError, match=r"ids\[None\]"):
        clip.encode_text(p, np.zeros(77, np.int64), cfg)
    with pytest.raises(InputError, match="different tokenizer"):
        clip.encode_text(p, np.full((1, 77), 49408), cfg)
    for bad in (-1, 4, 1.0, True, "2"):
        with pytest.raises(InputError, match="clip_skip"):
            clip.encode_text(p, tiny.ids, cfg, clip_skip=bad)
    np.testing.assert_array_equal(clip.encode_text(p, tiny.ids, cfg, clip_skip=0), clip.encode_text(p, tiny.ids, cfg))
    with pytest.raises(InputError, match="activation"):
        clip.encode_text(p, tiny.ids, dict(cfg, hidden_act="relu"))
    with pytest.raises(CheckpointError, match="lack"):
        clip.encode_text({"encoder": p["encoder"]}, tiny.ids, cfg)
    with pytest.raises(CheckpointError, match="divisible"):
        clip.encode_text(p, tiny.ids, dict(cfg, num_heads=3))


# --- full ViT-L/14 size ----------------------------------------------------------------------------

def check_full(full, config):
    """The full-size checks of the last hidden state and of every layer's output."""
    out = clip.encode_text(full.params, full.ids, config)
    assert out.dtype == np.float32 and out.shape == (2, 77, 768)
    print(assert_close(out, full.last, RTOL_FULL, "ViT-L last_hidden_state"))
    for i, (a, r) in enumerate(zip(clip.hidden_states(full.params, full.ids, config), full.hs)):
        print(assert_close(a, r, RTOL_FULL if i else 0.0, f"ViT-L hidden_states[{i}]"))


@pytest.mark.slow
def test_full_size_last_hidden_state_and_every_layer(full):
    check_full(full, full.config)


@pytest.mark.slow
def test_full_size_weights_laid_out_for_blas(full):
    """npsd.load stores the linear weights laid out [in, out] in memory (clip.blas_layout): the same
    shapes and values, and outputs as close to transformers' as those of the weights as read."""
    as_read = flatten(full.params)
    laid_out = clip.blas_layout(unflatten(as_read))                        # new dicts, the same arrays
    for name, a in flatten(laid_out).items():
        fortran = any(f".{m}.{n}.weight" in "." + name for m, n in clip.LINEAR_LAYERS)
        assert (a.flags.f_contiguous and not a.flags.c_contiguous) if fortran else a.flags.c_contiguous, name
        assert np.array_equal(a, as_read[name]), name
    check_full(types.SimpleNamespace(**{**vars(full), "params": laid_out}), full.config)
    diff = np.abs(clip.encode_text(laid_out, full.ids, full.config) - clip.encode_text(full.params, full.ids, full.config)).max()
    print(f"ViT-L laid out for BLAS: largest difference from the weights as read {diff:.2g}")


@pytest.mark.slow
def test_full_size_clip_skip_matches_diffusers(full):
    print(assert_close(clip.encode_text(full.params, full.ids, full.config, clip_skip=1), full.skip1, RTOL_FULL,
                       "ViT-L clip_skip=1"))
    print(assert_close(clip.encode_text(full.params, full.ids, full.config, clip_skip=2), full.skip2, RTOL_FULL,
                       "ViT-L clip_skip=2"))


@pytest.mark.slow
@pytest.mark.parametrize("bug", [
    BUGS["layer_norm_eps"],
    Bug("LayerNorm eps 1e-6 instead of 1e-5", config={"text_encoder": {"layer_norm_eps": 1e-6}}),
    BUGS["attention_scale"],
], ids=["layer_norm_eps_1e-4", "layer_norm_eps_1e-6", "attention_scale"])
def test_full_size_sensitivity(full, monkeypatch, bug):
    """At full size too, each small real bug fails the check on its tolerance (measured: LayerNorm
    eps 1e-4 2.3e-2, 1e-6 2.5e-3, the attention scale 7.7e-3 at the last hidden state)."""
    bug.inject(monkeypatch)
    assert_caught(bug, lambda: check_full(full, bug.section("text_encoder", full.config)))
