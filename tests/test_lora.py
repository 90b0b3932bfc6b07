"""LoRA (npsd/lora.py) against diffusers' load_lora_weights + fuse_lora, which merges through peft.

Random LoRAs are written in both formats: kohya/A1111 names built from diffusers' and transformers'
module names (dots as underscores), LoCon on the 3x3 convs; diffusers/PEFT files made with peft's
LoraConfig (rank_pattern, alpha_pattern) and saved by diffusers' save_lora_weights. npsd and diffusers
load the same files into the same random weights; then the text encoder's output, the UNet's output
and whole tiny txt2img images (same latents) are compared.

Tolerances (relative to the reference's max |x|), measured with the tiny models of
tests/test_pipelines.py:
    TOL_TEXT = 2e-6   text encoder outputs; measured at most 3.8e-7
    TOL = 1e-5        UNet outputs; measured at most 1.6e-6 (PEFT file)
    TOL_IMAGE = 1e-5  txt2img images in [0, 1]; measured at most 2.3e-6 (two LoRAs), LCM 7.8e-7
and at full SD v1.5 size (text encoder ViT-L/14, the 860M-parameter UNet at 16x16 latents, two LoRAs
over 122 layers):
    TOL_FULL = 1e-5   text encoder and UNet; measured 1.0e-6 and 1.4e-6, and 8.7e-7 and 3.9e-6 on the
                      AMD EPYC without AVX-512 of README.md's speed tables
The LoRAs change these outputs by 5e-2 to 0.4 relative; leaving out alpha / r (measured 0.18 and
0.06 off) or transposing up @ down (0.09 and 0.025) fails the same comparisons
(test_scaling_or_transpose_bugs_fail).

diffusers reads one alpha per file well, but not per-layer alphas that differ between attention
layers (its alpha_pattern for the attention-processor names misses, and the most common alpha is
used), so the kohya files compared with it use one alpha for the linear layers and one for the 3x3
convs, as kohya's trainer writes them (network_alpha, conv_alpha). Per-layer alphas are checked
against the formula instead (test_per_layer_alpha_and_conv_shapes).
"""

import copy
import gc
import math
import os

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, LCMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import npsd
from npsd import clip, lora
from npsd.config import sd15_config
from npsd.errors import CheckpointError, InputError
from npsd.testing import assert_close, compare
from npsd.weights import path as weights_path
from tests.helpers import n2t, perturb_, t2n, to_numpy_params
from tests.test_pipelines import SCHED, SIZE, models, npsd_pipe, reference  # noqa: F401

TOL_TEXT = 2e-6
TOL = 1e-5
TOL_IMAGE = 1e-5
TOL_FULL = 1e-5
PROMPTS = ["a red circle on a blue background", "a green square"]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


# --- making LoRA files -------------------------------------------------------------------------------

def layers_of(model):
    """{module name: weight shape} of a torch model's Linear and Conv2d layers."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def kohya_lora(text, unet, select=lambda name: True, seed=0, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.5,
               up_scale=0.1):
    """A random kohya/A1111 LoRA: {name: float32 array}. Names from the torch modules' names, dots as
    underscores (the text encoder's under text_model., as kohya writes them); 3x3 convs get a LoCon
    pair (down [r, in, 3, 3], up [out, r, 1, 1]) with their own rank and alpha."""
    rng = np.random.default_rng(seed)
    sd = {}
    for prefix, model in (("lora_te_", text), ("lora_unet_", unet)):
        for name, shape in layers_of(model).items():
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name                # transformers 5 has no text_model level
            key = prefix + name.replace(".", "_")
            if not select(key):
                continue
            conv3 = len(shape) == 4 and shape[2:] != (1, 1)
            r, a = (conv_rank, conv_alpha) if conv3 else (rank, alpha)
            fan_in = math.prod(shape[1:])
            down = rng.standard_normal((r, *shape[1:])) / math.sqrt(fan_in)
            sd[key + ".lora_down.weight"] = down.astype(np.float32)
            up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
            sd[key + ".lora_up.weight"] = (up_scale * rng.standard_normal(up_shape)).astype(np.float32)
            sd[key + ".alpha"] = np.array(a, np.float32)
    return sd


def write(path, sd, metadata=None):
    save_file(sd, str(path), metadata=metadata)
    return path


def peft_lora(models, path, seed=3, te=True):
    """A diffusers/PEFT LoRA file: peft's LoraConfig injected into copies of the tiny UNet and text
    encoder, random factors, peft's state dict, saved by diffusers' save_lora_weights with the
    configs as metadata (rank_pattern, alpha_pattern: per-layer ranks and alphas)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    configs = {"unet": LoraConfig(r=4, lora_alpha=6, rank_pattern={"ff.net.2": 2}, alpha_pattern={"proj_out": 3},
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                  "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]),
               "text_encoder": LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "out_proj", "fc1", "fc2"])}
    layers = {}
    g = torch.Generator().manual_seed(seed)
    for comp, key in (("unet", "unet4"), ("text_encoder", "text")):
        model = inject_adapter_in_model(configs[comp], copy.deepcopy(models[key]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "lora_B" in n else p[0].numel() ** -0.5))
        layers[comp] = get_peft_model_state_dict(model)
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"] if te else None,
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict() if te else None, weight_name=path.name)
    return path


# --- running both ------------------------------------------------------------------------------------

def ddim():
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SCHED)


def diffusers_with(models, loras, scheduler=None):
    """diffusers' pipeline on copies of the tiny models with the LoRAs [(file, strength)] loaded by
    load_lora_weights and merged by fuse_lora."""
    m = {**models, "text": copy.deepcopy(models["text"]), "unet4": copy.deepcopy(models["unet4"])}
    pipe = reference(StableDiffusionPipeline, m, scheduler or ddim())
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    pipe.fuse_lora(adapter_names=names)
    return pipe


def inputs(width=32, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, size, size)).astype(np.float32)
    context = rng.standard_normal((2, 77, width)).astype(np.float32)
    return x, 500, context


def outputs_npsd(pipe, width=32, size=16):
    """(text encoder output [2, 77, W], UNet output [2, 4, s, s]) of an npsd Pipeline."""
    x, t, context = inputs(width, size)
    return pipe.encode_text(pipe.tokenize(PROMPTS)), pipe.unet(x, t, context)


def outputs_diffusers(pipe, width=32, size=16):
    x, t, context = inputs(width, size)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return t2n(pipe.text_encoder(ids)[0]), t2n(pipe.unet(n2t(x), t, n2t(context)).sample)


def images(pipe, **kw):
    """Tiny txt2img images [2, H, W, 3], 4 DDIM steps with guidance, fixed latents; npsd or diffusers."""
    latents = np.random.default_rng(7).standard_normal((2, 4, 16, 16)).astype(np.float32)
    common = dict(negative_prompt=["blurry", ""], num_inference_steps=4, guidance_scale=7.5, height=SIZE,
                  width=SIZE, output_type="np")
    if isinstance(pipe, npsd.Pipeline):
        return pipe.txt2img(PROMPTS, sampler="ddim", latents=latents, **common, **kw)
    with torch.no_grad():
        return pipe(PROMPTS, latents=n2t(latents), **common, **kw).images


def check_parity(ours, ref, tol, what):
    """Both outputs compared; the comparisons printed (run with -s to see the measured errors)."""
    for a, b, name, t in zip(ours, ref, ("text encoder", "UNet"), tol):
        print(assert_close(a, b, t, f"{what}: {name}"))


# --- parity, tiny models --------------------------------------------------------------------------------

def test_kohya_locon_matches_diffusers(models, tmp_path):
    """Every linear and conv layer of the tiny UNet and text encoder (attention, proj_in/out 1x1 convs,
    feed-forward, ResBlock 3x3 convs and shortcuts, time embedding, down/upsamplers, conv_in/out)."""
    path = write(tmp_path / "k.safetensors", kohya_lora(models["text"], models["unet4"]))
    ref = diffusers_with(models, [(path, 0.8)])
    pipe = npsd_pipe(models)
    base = outputs_npsd(pipe)
    assert pipe.load_lora(path, 0.8) == len(layers_of(models["text"])) + len(layers_of(models["unet4"]))
    ours = outputs_npsd(pipe)
    check_parity(ours, outputs_diffusers(ref), (TOL_TEXT, TOL), "kohya LoRA + LoCon")
    for a, b in zip(ours, base):                                 # the LoRA matters
        assert compare(a, b).max_rel > 0.05
    print(assert_close(images(pipe), images(ref), TOL_IMAGE, "kohya LoRA + LoCon: txt2img images"))


def test_peft_file_matches_diffusers(models, tmp_path):
    """diffusers/PEFT names with per-layer ranks and alphas in the file's metadata."""
    path = peft_lora(models, tmp_path / "peft.safetensors")
    ref = diffusers_with(models, [(path, 0.7)])
    pipe = npsd_pipe(models)
    pipe.load_lora(path, 0.7)
    assert pipe.loras["peft"].format == "diffusers"
    check_parity(outputs_npsd(pipe), outputs_diffusers(ref), (TOL_TEXT, TOL), "PEFT LoRA")


def test_two_loras_with_strengths_match_diffusers(models, tmp_path):
    kohya = write(tmp_path / "a.safetensors", kohya_lora(models["text"], models["unet4"], seed=1))
    peft = peft_lora(models, tmp_path / "b.safetensors", seed=4)
    ref = diffusers_with(models, [(kohya, 0.6), (peft, -0.9)])
    pipe = npsd_pipe(models)
    pipe.load_lora(kohya, 0.6)
    pipe.load_lora(peft, -0.9)
    assert list(pipe.loras) == ["a", "b"] and pipe.loras["b"].strength == -0.9
    check_parity(outputs_npsd(pipe), outputs_diffusers(ref), (TOL_TEXT, TOL), "two LoRAs, strengths 0.6 and -0.9")
    print(assert_close(images(pipe), images(ref), TOL_IMAGE, "two LoRAs: txt2img images"))


def test_older_diffusers_names_and_pt_files_read_the_same(models, tmp_path):
    """`.lora.down.weight` / `.lora.up.weight` names (diffusers before PEFT), attention-processor names
    (`attn1.processor.to_q_lora.down.weight`), and a kohya `.pt` read by npsd's restricted unpickler:
    the same merged weights, bit for bit, as the equivalent current files."""
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((4, 32)).astype(np.float32) for _ in range(2))
    up, down = 0.1 * a.T, b                                        # [32, 4], [4, 32]
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    te = "text_encoder.text_model.encoder.layers.1.self_attn"
    current = {f"{block}.attn1.to_q.lora_A.weight": down, f"{block}.attn1.to_q.lora_B.weight": up,
               f"{block}.attn2.to_out.0.lora_A.weight": down, f"{block}.attn2.to_out.0.lora_B.weight": up,
               f"{te}.out_proj.lora_A.weight": down, f"{te}.out_proj.lora_B.weight": up}
    older = {f"{block}.attn1.to_q.lora.down.weight": down, f"{block}.attn1.to_q.lora.up.weight": up,
             f"{block}.attn2.processor.to_out_lora.down.weight": down,
             f"{block}.attn2.processor.to_out_lora.up.weight": up,
             f"{te}.to_out_lora.down.weight": down, f"{te}.to_out_lora.up.weight": up}
    merged = []
    for name, sd in (("current", current), ("older", older)):
        pipe = npsd_pipe(models)
        assert pipe.load_lora(write(tmp_path / f"{name}.safetensors", sd)) == 3
        merged.append(pipe.params)
    kohya = kohya_lora(models["text"], models["unet4"], seed=2)
    torch.save({k: torch.from_numpy(v) for k, v in kohya.items()}, tmp_path / "k.pt")
    torch.save({k: float(v) if k.endswith(".alpha") else torch.from_numpy(v) for k, v in kohya.items()},
               tmp_path / "numbers.pt")                            # alphas as plain numbers
    for file in (write(tmp_path / "k.safetensors", kohya), tmp_path / "k.pt", tmp_path / "numbers.pt"):
        pipe = npsd_pipe(models)
        pipe.load_lora(file)
        merged.append(pipe.params)
    for x, y in ((merged[0], merged[1]), (merged[2], merged[3]), (merged[2], merged[4])):
        fx, fy = npsd.params.flatten(x), npsd.params.flatten(y)
        assert all(np.array_equal(fx[k], fy[k]) for k in fx)


def test_per_layer_alpha_and_conv_shapes(models, tmp_path):
    """Each layer's own alpha / r (kohya files may differ per layer); a 1x1 conv's LoRA stored as
    linear factors and a linear layer's stored as 1x1 convs; LoCon on a stride-2 3x3 conv: the merged
    weight is W + strength * (alpha / r) * up @ down, reshaped."""
    rng = np.random.default_rng(6)
    pipe = npsd_pipe(models)
    cases = {  # module path in the UNet: (down shape, up shape, alpha)
        "down_blocks.0.attentions.0.proj_in": ((4, 32), (32, 4), 1.0),                    # [32, 32, 1, 1]
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": ((3, 32, 1, 1), (32, 3, 1, 1), 7.0),
        "down_blocks.0.downsamplers.0.conv": ((2, 32, 3, 3), (32, 2, 1, 1), 0.5),         # stride 2
        "up_blocks.1.resnets.0.conv_shortcut": ((5, 96), (32, 5), None),                  # no alpha: alpha = r
    }
    sd = {}
    for path, (dshape, ushape, alpha) in cases.items():
        name = "lora_unet_" + path.replace(".", "_")
        sd[name + ".lora_down.weight"] = rng.standard_normal(dshape).astype(np.float32)
        sd[name + ".lora_up.weight"] = rng.standard_normal(ushape).astype(np.float32)
        if alpha is not None:
            sd[name + ".alpha"] = np.array(alpha, np.float32)
    before = npsd.params.flatten(pipe.params["unet"])
    pipe.load_lora(write(tmp_path / "mixed.safetensors", sd), 0.6)
    after = npsd.params.flatten(pipe.params["unet"])
    for path, (dshape, ushape, alpha) in cases.items():
        name, w = "lora_unet_" + path.replace(".", "_"), before[path + ".weight"]
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        scale = (alpha or dshape[0]) / dshape[0]
        expect = w + 0.6 * scale * np.einsum("or,rk->ok", up.reshape(up.shape[0], -1),
                                             down.reshape(down.shape[0], -1)).reshape(w.shape)
        print(assert_close(after[path + ".weight"], expect, 1e-6, path))
        assert compare(after[path + ".weight"], w).max_rel > 0.01
    assert sum(after[k] is not v for k, v in before.items()) == len(cases)       # only these layers changed


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_merge_keeps_a_weight_laid_out_transposed_so(dtype):
    """npsd.load lays the text encoder's weights out [in, out] in memory (npsd.clip.blas_layout); the
    merge computes the transposed sum for them, so the merged weight keeps that layout, with the
    values of the merge of the same weight stored [out, in]: in float32 to 5e-7 relative (measured
    1.2e-7), in float16 each value at most one float16 step apart (the sums round apart in float32
    before the float16 rounding); merged in place into such a weight, the same values."""
    rng = np.random.default_rng(3)
    w = (0.1 * rng.standard_normal((48, 32))).astype(dtype)
    updates = [(s, lora.Update("text_encoder", "layer", (0.1 * rng.standard_normal((48, r))).astype(np.float32),
                               rng.standard_normal((r, 32)).astype(np.float32), scale))
               for s, r, scale in ((0.8, 4, 0.5), (-0.3, 2, 1.0))]
    as_read, laid_out = lora.merged(w, updates), lora.merged(np.asfortranarray(w), updates)
    assert as_read.flags.c_contiguous and laid_out.flags.f_contiguous and not laid_out.flags.c_contiguous
    base = np.asfortranarray(w)                                            # merged in place (keep_base=False)
    assert lora.merged(base, updates, out=base) is not None and np.array_equal(base, laid_out)
    assert laid_out.dtype == as_read.dtype == dtype
    if dtype == np.float32:
        print(assert_close(laid_out, as_read, 5e-7, "float32 merge"))
    else:
        assert (np.abs(laid_out - as_read) <= np.spacing(np.maximum(abs(laid_out), abs(as_read)))).all()
    assert compare(as_read.astype(np.float32), w.astype(np.float32)).max_rel > 0.1     # the LoRAs matter


@pytest.mark.parametrize("band_bytes", [lora.BAND_BYTES, 2**16])
def test_a_float16_weight_merges_as_numpy_rounds_it(band_bytes, monkeypatch):
    """Weights kept in float16: the merge converts the layer to float32 (a band of rows at a time) and
    the sum back with npsd.fast.astype (in parallel pieces; NumPy's own float16 casts take one value
    at a time). The result is bit for bit NumPy's plain (W.astype(float32) + update).astype(float16),
    for a layer split into two threads' pieces, in one band or in 46, and for values of every float16
    kind: subnormal, signed zero, the largest finite, sums that round to infinity."""
    monkeypatch.setattr(lora, "BAND_BYTES", band_bytes)
    rng = np.random.default_rng(5)
    w = (0.05 * rng.standard_normal((640, 1152))).astype(np.float16)          # 737,280 values: split
    w[1, :6] = [0.0, -0.0, 6e-8, -3e-5, 65504.0, -65504.0]
    # factors whose product float32 holds exactly, so that the only roundings are the sum's and float16's
    up = rng.integers(-8, 9, (640, 8)).astype(np.float32) / 64
    down = rng.integers(-8, 9, (8, 1152)).astype(np.float32) / 16
    up[1] = 0.0                                                                # row 1 keeps its values ...
    up[0, 0], down[0, 0] = 2.0 ** 14, 16.0                                    # ... and one sum overflows
    update = lora.Update("unet", "layer", up, down, 0.5)
    with np.errstate(over="ignore"):
        expect = (w.astype(np.float32) + 0.25 * (up @ down)).astype(np.float16)
    got = lora.merged(w, [(0.5, update)])
    assert got.dtype == np.float16 and np.isinf(got[0, 0]) and (got[1] == w[1]).all()
    assert np.array_equal(got.view(np.uint16), expect.view(np.uint16)), \
        f"{(got.view(np.uint16) != expect.view(np.uint16)).sum()} float16 values differ from NumPy's rounding"


def test_load_unload_gives_back_the_base_model_exactly(models, tmp_path):
    """Load, change, unload, load another: the base model's numbers come back bit for bit (the layers
    get their original arrays back); strengths changed back and forth give identical merges; only the
    touched layers' originals are kept."""
    a = write(tmp_path / "a.safetensors", kohya_lora(models["text"], models["unet4"], seed=1))
    b = write(tmp_path / "b.safetensors", kohya_lora(models["text"], models["unet4"], seed=2,
                                                     select=lambda k: "attn" in k or "self_attn" in k))
    pipe = npsd_pipe(models)
    flat = npsd.params.flatten(pipe.params)
    base = outputs_npsd(pipe)
    pipe.load_lora(a)
    with_a = outputs_npsd(pipe)
    pipe.load_lora(b, 0.5)
    assert len(pipe._loras.originals) == pipe.loras["a"].layers           # b touches a subset of a's layers
    pipe.load_lora(a, 0.3)                                                # a again: replaced, new strength
    pipe.load_lora(a, 1.0)
    pipe.unload_lora("b")
    for x, y in zip(outputs_npsd(pipe), with_a):
        assert np.array_equal(x, y)
    pipe.unload_lora()
    assert pipe.loras == {} and pipe._loras.originals == {}
    assert all(v is flat[k] for k, v in npsd.params.flatten(pipe.params).items())   # the very arrays
    for x, y in zip(outputs_npsd(pipe), base):
        assert np.array_equal(x, y)
    pipe.load_lora(b)
    assert len(pipe._loras.originals) == pipe.loras["b"].layers
    pipe.unload_lora("b")
    for x, y in zip(outputs_npsd(pipe), base):
        assert np.array_equal(x, y)


# --- LCM-LoRA: 4 steps with the LCM sampler ------------------------------------------------------------

def test_a_lora_merged_into_the_base_weights(models, tmp_path):
    """load_lora(..., keep_base=False), as the command line's --lora: the same weights, bit for bit, as
    the default merge, written into the base arrays themselves (no second copy; a read-only array is
    replaced instead). A LoRA loaded after it and unloaded gives back the base with it merged; one
    loaded before it is recomputed on the new base, and with both the model matches diffusers with
    both fused. It cannot be unloaded or loaded again (one-line errors), and unload_lora() leaves it."""
    a = write(tmp_path / "a.safetensors", kohya_lora(models["text"], models["unet4"], seed=1))
    b = peft_lora(models, tmp_path / "b.safetensors", seed=4)
    kept = npsd_pipe(models)
    kept.load_lora(a, 0.6)
    with_a = npsd.params.flatten(kept.params)
    pipe = npsd_pipe(models)
    base = {k: v for k, v in npsd.params.flatten(pipe.params).items()}
    read_only = lora._module(pipe.params["unet"], "mid_block.attentions.0.proj_in")["weight"]
    read_only.setflags(write=False)                                        # as a memory-mapped file's
    pipe.load_lora(a, 0.6, keep_base=False)
    now = npsd.params.flatten(pipe.params)
    assert pipe._loras.originals == {} and kept.loras["a"].layers == len(kept._loras.originals) > 1
    replaced = {k for k, v in now.items() if v is not base[k]}
    assert replaced == {"unet.mid_block.attentions.0.proj_in.weight"}                 # the others: in place
    for k, v in now.items():
        assert np.array_equal(v, with_a[k]), k
    assert pipe.loras["a"].in_base and not kept.loras["a"].in_base
    pipe.load_lora(b, -0.9)
    pipe.unload_lora()                                                    # all but the one in the base
    assert list(pipe.loras) == ["a"] and pipe._loras.originals == {}
    for k, v in npsd.params.flatten(pipe.params).items():
        assert np.array_equal(v, with_a[k]), k
    for call, words in ((lambda: pipe.unload_lora("a"), "cannot be unloaded; load the model again"),
                        (lambda: pipe.load_lora(a, 0.3), "already loaded into the base weights")):
        with pytest.raises(InputError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
    both = npsd_pipe(models)
    both.load_lora(b, -0.9)
    both.load_lora(a, 0.6, keep_base=False)
    assert list(both.loras) == ["a", "b"]
    check_parity(outputs_npsd(both), outputs_diffusers(diffusers_with(models, [(a, 0.6), (b, -0.9)])),
                 (TOL_TEXT, TOL), "a LoRA in the base and one loaded before it")
    both.unload_lora("b")
    for k, v in npsd.params.flatten(both.params).items():
        assert np.array_equal(v, with_a[k]), k


def test_lcm_lora_four_steps_matches_diffusers(models, tmp_path):
    """A random LoRA in the LCM-LoRA's place: diffusers' StableDiffusionPipeline with LCMScheduler,
    4 steps, guidance 1.5, and npsd's "lcm" sampler; the same seed (torch's generator: the same
    initial latents and the same noise at every step)."""
    path = write(tmp_path / "lcm.safetensors", kohya_lora(models["text"], models["unet4"], seed=9))
    ref = diffusers_with(models, [(path, 1.0)], LCMScheduler(**SCHED))
    pipe = npsd_pipe(models)
    pipe.load_lora(path)
    kw = dict(num_inference_steps=4, guidance_scale=1.5, height=SIZE, width=SIZE, output_type="np")
    with torch.no_grad():
        expect = ref(PROMPTS, generator=torch.Generator("cpu").manual_seed(21), **kw).images
    ours = pipe.txt2img(PROMPTS, sampler="lcm", seed=21, rng="torch", **kw)
    print(assert_close(ours, expect, TOL_IMAGE, "LCM LoRA, 4 LCM steps, guidance 1.5"))


# --- sensitivity ---------------------------------------------------------------------------------------

def _transposed(original):
    return lambda up, down, shape: original(up, down, shape).swapaxes(0, 1)


@pytest.mark.parametrize("bug", ["no alpha / r", "up @ down transposed"])
def test_scaling_or_transpose_bugs_fail(models, tmp_path, monkeypatch, bug):
    """alpha / r left out (alpha 1, rank 4: a 4x larger update) or the update transposed (square
    attention layers only, where the shapes still fit) must fail the parity check."""
    square = lambda k: k.endswith(("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "q_proj", "out_proj"))
    path = write(tmp_path / "s.safetensors", kohya_lora(models["text"], models["unet4"], select=square, alpha=1.0))
    expect = outputs_diffusers(diffusers_with(models, [(path, 1.0)]))
    pipe = npsd_pipe(models)
    pipe.load_lora(path)
    check_parity(outputs_npsd(pipe), expect, (TOL_TEXT, TOL), "square layers")
    pipe.unload_lora()
    if bug == "no alpha / r":
        monkeypatch.setattr(lora, "alpha_scale", lambda alpha, rank: 1.0)
    else:
        monkeypatch.setattr(lora, "low_rank", _transposed(lora.low_rank))
    pipe.load_lora(path)
    ours = outputs_npsd(pipe)
    for a, b in zip(ours, expect):
        with pytest.raises(AssertionError, match="exceeds the tolerance") as failure:
            assert_close(a, b, TOL)                                # the looser of the two tolerances
        print(f"\n  {bug}: {str(failure.value).split('; ')[0]}")


# --- errors ---------------------------------------------------------------------------------------------

def _error(pipe, path, exc=CheckpointError):
    with pytest.raises(exc) as e:
        pipe.load_lora(path)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def _pair(name, down, up):
    rng = np.random.default_rng(0)
    return {name + ".lora_down.weight": rng.standard_normal(down).astype(np.float32),
            name + ".lora_up.weight": rng.standard_normal(up).astype(np.float32)}


def test_errors_are_one_line_and_name_the_problem(models, tmp_path):
    pipe = npsd_pipe(models)
    good = _pair("lora_unet_down_blocks_0_attentions_0_proj_in", (4, 32, 1, 1), (32, 4, 1, 1))
    cases = [
        ({**good, **_pair("lora_unet_down_blocks_7_resnets_0_conv1", (4, 32, 3, 3), (32, 4, 1, 1))},
         "match no layer of this model (1): lora_unet_down_blocks_7_resnets_0_conv1"),
        (_pair("lora_unet_input_blocks_4_1_proj_in", (4, 640), (640, 4)), "looks like an SDXL LoRA"),
        (_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (4, 768), (768, 4)), "looks like an SDXL LoRA"),
        (_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (4, 1280), (1280, 4)), "SDXL"),
        (_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (4, 1024), (1024, 4)),
         "made for a text encoder of width 1024 (SD 2.x); this model's is 32"),
        (_pair("lora_unet_down_blocks_0_attentions_0_proj_in", (4, 64), (32, 4)),
         "lora_unet_down_blocks_0_attentions_0_proj_in does not fit unet.down_blocks.0.attentions.0.proj_in.weight "
         "[32, 32, 1, 1]: up [32, 4] @ down [4, 64]"),
        (_pair("lora_unet_down_blocks_0_resnets_0_conv1", (4, 32, 1, 1), (32, 4, 1, 1)),
         "conv1.weight [32, 32, 3, 3]: up [32, 4, 1, 1] @ down [4, 32, 1, 1]"),
        ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": np.zeros((4, 32), np.float32)}, "LyCORIS LoHa"),
        ({**good, "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": np.zeros(32, np.float32)}, "DoRA"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), np.float32)},
         "without both an up and a down factor: lora_unet_down_blocks_0_attentions_0_proj_in"),
        ({"model.diffusion_model.conv_in.weight": np.zeros((4, 4), np.float32)},
         "is a whole SD checkpoint, not a LoRA; give it as the model"),
        ({"foo.weight": np.zeros((4, 4), np.float32)}, "is not a LoRA file: none of its 1 tensors is named like one"),
        ({**good, "lora_unet_something_else": np.zeros(3, np.float32)},
         "not LoRA factors npsd knows: lora_unet_something_else"),
        ({k: np.full_like(v, np.nan) if k.endswith("lora_up.weight") else v for k, v in good.items()},
         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight holds NaN or inf values; the file is corrupt"),
        ({**good, "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array([1.0, 2.0], np.float32)},
         "proj_in.alpha must be one finite number (the LoRA's alpha), got 2 values [1.0, 2.0]"),
        ({**good, "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(np.inf, np.float32)},
         "must be one finite number"),
    ]
    for i, (sd, match) in enumerate(cases):
        message = _error(pipe, write(tmp_path / f"bad{i}.safetensors", sd))
        assert match in message, (match, message)
        print(message)
    assert pipe.loras == {} and not pipe._loras.originals                  # nothing half-merged
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _error(pipe, tmp_path / "broken.safetensors")
    _error(pipe, tmp_path / "missing.safetensors")
    path = write(tmp_path / "ok.safetensors", good)
    for bad in (float("nan"), "1", True):
        with pytest.raises(InputError, match="strength must be a finite number"):
            pipe.load_lora(path, bad)
    with pytest.raises(InputError, match="keep_base must be True or False, got 'no'"):
        pipe.load_lora(path, 1.0, keep_base="no")
    with pytest.raises(InputError, match="no LoRA named 'nope' is loaded"):
        pipe.unload_lora("nope")


def test_malicious_pt_lora_is_refused_and_never_runs(models, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sd = {k: torch.from_numpy(v) for k, v in kohya_lora(models["text"], models["unet4"], seed=3).items()}
    torch.save({**sd, "lora_unet_conv_in.alpha": Evil()}, tmp_path / "evil.pt")
    pipe = npsd_pipe(models)
    message = _error(pipe, tmp_path / "evil.pt")
    assert "refusing to unpickle" in message and "system" in message
    assert not marker.exists() and pipe.loras == {}


# --- full SD v1.5 size ----------------------------------------------------------------------------------

def _full_size_models(device=None):
    with torch.device(device or "cpu"):
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                                            num_attention_heads=12, intermediate_size=3072,
                                            max_position_embeddings=77, hidden_act="quick_gelu")).eval()
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32).eval()
    return text, unet


@pytest.mark.slow
def test_kohya_names_of_every_full_size_layer_match_diffusers():
    """Every Linear and Conv2d of SD v1.5's UNet and text encoder (built on the meta device: names and
    shapes, no memory): npsd's targets are exactly these layers, and each kohya name lands on the same
    layer in npsd as through diffusers' own conversion (lora_state_dict, then to PEFT names)."""
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)
    text, unet = _full_size_models("meta")
    shapes = {"text_encoder": layers_of(text), "unet": layers_of(unet)}
    shapes["text_encoder"] = {n.removeprefix("text_model."): s for n, s in shapes["text_encoder"].items()}
    fake = {c: npsd.params.unflatten({n + ".weight": np.broadcast_to(np.float32(0), s) for n, s in d.items()})
            for c, d in shapes.items()}                        # npsd's params tree, without the memory
    ours = lora.targets(fake)
    assert set(ours["unet"]) == set(shapes["unet"]) and len(ours["unet"]) == 282
    assert set(ours["text_encoder"]) == set(shapes["text_encoder"]) and len(ours["text_encoder"]) == 72
    kohya = lora.kohya_names(ours)
    sd = {}
    for i, name in enumerate(kohya):                       # a tag in each down factor: which layer it went to
        sd[name + ".lora_down.weight"] = torch.full((1, 1), float(i))
        sd[name + ".lora_up.weight"] = torch.zeros(1, 1)
    converted, _ = StableDiffusionPipeline.lora_state_dict(sd)
    unet_sd = convert_unet_state_dict_to_peft({k[5:]: v for k, v in converted.items() if k.startswith("unet.")})
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
        {k[13:]: v for k, v in converted.items() if k.startswith("text_encoder.")}))
    theirs = {}
    for comp, d in (("unet", unet_sd), ("text_encoder", te_sd)):
        for k, v in d.items():
            if k.endswith(".lora_A.weight"):
                path = k[: -len(".lora_A.weight")]
                theirs[int(v.item())] = (comp, path[len("text_model."):] if path.startswith("text_model.") else path)
    names = list(kohya)
    assert len(theirs) == len(names) == 282 + 72
    assert all(theirs[i] == kohya[names[i]] for i in range(len(names)))
    assert all(lora.locate(n, ours, kohya) == kohya[n] for n in names)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The full-size text encoder and UNet, built once: two LoRA files over a subset of the layers
    (kohya with LoCon on 3x3 convs; diffusers/PEFT names made by diffusers' own conversion), merged by
    diffusers with strengths 0.8 and -0.6, its outputs computed; then the torch models are freed."""
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)
    from peft import LoraConfig
    tmp = tmp_path_factory.mktemp("lora_full")
    torch.manual_seed(0)
    text, unet = _full_size_models()
    perturb_(text, 1)
    perturb_(unet, 2)
    sd = text.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    # the text encoder laid out as npsd.load lays it out (clip.blas_layout)
    params = {"text_encoder": clip.blas_layout(to_numpy_params(sd, prefix, drop=("position_ids",))),
              "unet": to_numpy_params(unet.state_dict())}
    in_kohya = lambda k: (any(f"layers_{i}_" in k for i in (0, 11)) or k.startswith(("lora_unet_down_blocks_1_",
                          "lora_unet_mid_block_")) or "up_blocks_2_attentions_1_" in k or k.endswith("time_emb_proj"))
    kohya = write(tmp / "kohya.safetensors", kohya_lora(text, unet, in_kohya, seed=1, rank=8, alpha=4.0,
                                                          conv_rank=4, conv_alpha=2.0, up_scale=0.05))
    other = kohya_lora(text, unet, lambda k: "up_blocks_3_attentions_2_" in k or "down_blocks_0_attentions_0_" in k
                       or "layers_5_" in k, seed=2, rank=4, alpha=4.0, up_scale=0.05)
    converted, _ = StableDiffusionPipeline.lora_state_dict({k: torch.from_numpy(v) for k, v in other.items()
                                                            if not k.endswith(".alpha")})
    peft = {"unet": convert_unet_state_dict_to_peft({k[5:]: v for k, v in converted.items() if k.startswith("unet.")}),
            "text_encoder": convert_state_dict_to_peft(convert_state_dict_to_diffusers(
                {k[13:]: v for k, v in converted.items() if k.startswith("text_encoder.")}))}
    meta = {c: LoraConfig(r=4, lora_alpha=alpha, target_modules=sorted({k.split(".lora_")[0].removeprefix("text_model.")
                                                                         for k in peft[c]})).to_dict()
            for c, alpha in (("unet", 2.0), ("text_encoder", 3.0))}
    StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=peft["unet"],
                                              text_encoder_lora_layers=peft["text_encoder"],
                                              unet_lora_adapter_metadata=meta["unet"],
                                              text_encoder_lora_adapter_metadata=meta["text_encoder"],
                                              weight_name="peft.safetensors")
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8)
    tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77)
    ref = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=ddim(),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    files = [(kohya, 0.8), (tmp / "peft.safetensors", -0.6)]
    for i, (path, _) in enumerate(files):
        ref.load_lora_weights(str(path), adapter_name=f"lora{i}")
    ref.set_adapters(["lora0", "lora1"], adapter_weights=[s for _, s in files])
    ref.fuse_lora(adapter_names=["lora0", "lora1"])
    expect = outputs_diffusers(ref, width=768)
    del ref, text, unet, sd
    gc.collect()
    return params, files, expect


@pytest.mark.slow
def test_full_size_loras_match_diffusers(full):
    params, files, expect = full
    pipe = npsd.Pipeline(params, sd15_config())
    base = outputs_npsd(pipe, width=768)
    before = npsd.params.flatten(pipe.params["text_encoder"])
    touched = sum(pipe.load_lora(path, strength) for path, strength in files)
    # the 6 linear layers of text layers 0, 5 and 11 merged, each keeping its layout
    merged = {n: a for n, a in npsd.params.flatten(pipe.params["text_encoder"]).items() if a is not before[n]}
    assert len(merged) == 3 * 6 and all(a.flags.f_contiguous for a in merged.values())
    ours = outputs_npsd(pipe, width=768)
    check_parity(ours, expect, (TOL_FULL, TOL_FULL), "full size, kohya 0.8 + PEFT -0.6")
    for a, b, name in zip(ours, base, ("text encoder", "UNet")):
        print(f"  the LoRAs change the {name} output by {compare(a, b).max_rel:.3g} relative ({touched} layers)")
        assert compare(a, b).max_rel > 100 * TOL_FULL      # measured 0.2 and 0.08
    pipe.unload_lora()
    for a, b in zip(outputs_npsd(pipe, width=768), base):
        assert np.array_equal(a, b)
