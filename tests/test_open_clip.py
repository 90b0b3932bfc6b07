"""npsd's reading of SD 2.x's text encoder against OpenCLIP itself (open_clip 3.3.0, the library
Stability AI's SD 2.x code conditions with: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder,
layer "penultimate").

What is compared
- The text tower: open_clip's own TextTransformer, built by its model factory code
  (open_clip.model._build_text_tower) from its ViT-H-14.json config without pretrained weights,
  or a tiny one of the same classes (width 128, 2 heads of 64 channels as in ViT-H/14, 3 layers),
  perturbed (tests.helpers.perturb_) and saved under cond_stage_model.model.* in an SD 2.x-layout
  original file, beside a tiny UNet and VAE. npsd.load reads it through its OpenCLIP name mapping
  (npsd.loading.map_open_clip: fused in_proj split into q, k, v; the last resblock left out) and
  pipe.encode_text is compared with what FrozenOpenCLIPEmbedder computes: token embedding plus
  positional embedding, every resblock but the last (with the causal mask), then ln_final.
  Nothing of diffusers or transformers is involved, so this checks the mapping against the
  original, where tests/test_sd2.py checks it against diffusers' converter.
- The tokenizer: npsd's ids (pad token "!") against open_clip.tokenize, which SD 2.x calls:
  padding with 0, a "!" in the prompt encoded as text, truncation keeping the end token.

open_clip is installed with --no-deps (README's test command): its requirements pull torchvision
and timm, and pip would then replace the pinned CPU torch. The text tower needs neither: the
modules are imported without running the package's __init__, with a stub standing in for
torchvision.ops.misc (only open_clip/utils.py's batch-norm freezing for image towers uses it).

Tolerance (relative, max |npsd - open_clip| / max |open_clip|, float32): measured 6.2e-7 (tiny) and
6.7e-7 (ViT-H-14); held to 6e-6. Exchanging q and k in npsd's copy, or running every layer
(OpenCLIP's last included), gives 1e-2 or more (asserted on the tiny tower).
"""

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import npsd
from npsd.testing import assert_close
from npsd.errors import TruncationWarning
from tests.helpers import perturb_

OPEN_CLIP_VERSION = "3.3.0"
INSTALL = f"pip install --no-deps open-clip-torch=={OPEN_CLIP_VERSION}"
RTOL = 6e-6
PROMPTS = ["a photograph of an astronaut riding a horse", "A  Portable RADIO, 8k!! wow! ! !! !!!"]
LONG = "a detailed oil painting of a lighthouse on a rocky cliff at dusk, crashing waves, " * 6
TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3}


def load_open_clip():
    """open_clip's model and tokenizer modules, imported without running the package's __init__
    (which imports its image transforms, torchvision included): the package directory is registered
    under a private name, and while its modules import, a stub stands in for torchvision.ops.misc.
    transformers is imported first (it probes for torchvision and must not find the stub). The stub
    is removed afterwards."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"open_clip is not installed: {INSTALL}")
    import transformers  # noqa: F401
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    name = "_npsd_test_open_clip"
    if name + ".model" not in sys.modules:
        pkg_spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                          submodule_search_locations=[str(pkg_dir)])
        stub_names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
        saved = {k: sys.modules[k] for k in stub_names if k in sys.modules}
        stubs = {k: types.ModuleType(k) for k in stub_names}
        stubs["torchvision"].ops = stubs["torchvision.ops"]
        stubs["torchvision.ops"].misc = stubs["torchvision.ops.misc"]
        stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
        sys.modules[name] = importlib.util.module_from_spec(pkg_spec)         # created, never executed
        sys.modules.update(stubs)
        try:
            importlib.import_module(name + ".model")
            importlib.import_module(name + ".tokenizer")
        finally:
            for k in stub_names:
                del sys.modules[k]
            sys.modules.update(saved)
    config = json.loads((pkg_dir / "model_configs" / "ViT-H-14.json").read_text())
    return types.SimpleNamespace(model=sys.modules[name + ".model"], tokenizer=sys.modules[name + ".tokenizer"],
                                 vit_h_14=config)


@pytest.fixture(scope="module")
def oc():
    return load_open_clip()


def unet_vae_state(context_width):
    """A tiny SD 2.x-layout UNet (64-wide heads, linear proj_in/proj_out, cross-attention reading
    context_width) and VAE under the original single-file names (diffusers' routing, as
    tests/test_sd2.py's tiny_sd2_original)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tests.test_loading import TINY_VAE, diffusers_routing
    route = diffusers_routing()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 64, 128, 128),
        cross_attention_dim=context_width, attention_head_dim=[1, 1, 2, 2], use_linear_projection=True,
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    sd = {}
    for comp, model in (("unet", unet), ("vae", AutoencoderKL(**TINY_VAE).eval())):
        for d, t in model.state_dict().items():
            name, shape = route[comp][d]
            t = t.numpy().copy()
            sd[name] = t.reshape(t.shape + (1, 1)) if comp == "vae" and len(shape) == 4 and t.ndim == 2 else t
    return sd


def open_clip_file(path, tower):
    """The tower's state dict under cond_stage_model.model.* (plus CLIP's logit_scale, as SD 2.x files
    have it), beside a tiny UNet and VAE; a .yaml beside it says epsilon (no UNet test needed)."""
    from tests.test_loading import write_safetensors
    sd = unet_vae_state(tower.transformer.width)
    sd.update({"cond_stage_model.model." + k: v.detach().numpy().copy() for k, v in tower.state_dict().items()})
    sd["cond_stage_model.model.logit_scale"] = np.array(4.6052, np.float32)
    write_safetensors(path, sd)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    return path


def penultimate(tower, ids):
    """FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer on open_clip's modules
    (open_clip 3.x's transformer is batch-first, so no NLD <-> LND permutes)."""
    x = tower.token_embedding(ids) + tower.positional_embedding                    # [B, 77, W]
    for block in tower.transformer.resblocks[:-1]:                                  # all but the last
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)                                                        # [B, 77, W]


@pytest.fixture(scope="module")
def case(request, oc, tmp_path_factory):
    """(open_clip's text tower, the SD 2.x file holding it, npsd's pipeline of that file)."""
    text_cfg = TINY_TEXT_CFG if request.param == "tiny" else oc.vit_h_14["text_cfg"]
    torch.manual_seed(0)
    tower = perturb_(oc.model._build_text_tower(oc.vit_h_14["embed_dim"], text_cfg).eval(), seed=4)
    path = open_clip_file(tmp_path_factory.mktemp("open-clip") / f"sd2-{request.param}.safetensors", tower)
    pipe = npsd.load(path)
    yield types.SimpleNamespace(name=request.param, tower=tower, path=path, pipe=pipe, layers=text_cfg["layers"])
    path.unlink()


BOTH = pytest.mark.parametrize("case", ["tiny", "ViT-H-14"], indirect=True)


@BOTH
def test_npsd_tokenizer_matches_open_clip(case, oc):
    with pytest.warns(TruncationWarning):                                          # LONG: 75 tokens kept
        ids = case.pipe.tokenize(PROMPTS + [LONG])                                 # [3, 77]
    ref = oc.tokenizer.tokenize(PROMPTS + [LONG]).numpy()
    assert ids[1, -1] == 0 and 256 in ids[1] and 748 in ids[1]                    # "!" padding; "!" and "!!" as text
    np.testing.assert_array_equal(ids, ref)


@BOTH
def test_npsd_text_encoder_matches_open_clip(case, oc):
    ids = oc.tokenizer.tokenize(PROMPTS).numpy()
    with torch.no_grad():
        ref = penultimate(case.tower, torch.from_numpy(ids)).numpy()
    assert len(case.pipe.params["text_encoder"]["encoder"]["layers"]) == case.layers - 1
    assert case.pipe.config["text_encoder"]["num_heads"] == case.tower.transformer.resblocks[0].attn.num_heads
    ours = case.pipe.encode_text(ids)
    # measured 6.2e-7 (tiny), 6.7e-7 (ViT-H-14)
    print(assert_close(ours, ref, RTOL, f"SD 2.x text encoder ({case.name}) vs open_clip, penultimate + ln_final"))


@pytest.mark.parametrize("case", ["tiny"], indirect=True)
def test_open_clip_mapping_errors_are_caught(case, oc):
    """npsd's copy with q and k exchanged in the first layer, and npsd's layers run to the last
    resblock (the tower's own last layer appended): both far off open_clip."""
    ids = oc.tokenizer.tokenize(PROMPTS).numpy()
    with torch.no_grad():
        ref = penultimate(case.tower, torch.from_numpy(ids)).numpy()
    params, config = case.pipe.params["text_encoder"], case.pipe.config["text_encoder"]
    layer0 = params["encoder"]["layers"][0]["self_attn"]
    swapped = {**params, "encoder": {"layers": [
        {**params["encoder"]["layers"][0], "self_attn": {**layer0, "q_proj": layer0["k_proj"], "k_proj": layer0["q_proj"]}},
        *params["encoder"]["layers"][1:]]}}
    last = case.tower.transformer.resblocks[-1]
    w = {k: v.detach().numpy() for k, v in last.state_dict().items()}
    q, k, v = np.split(w["attn.in_proj_weight"], 3)
    qb, kb, vb = np.split(w["attn.in_proj_bias"], 3)
    lin = lambda a, b: {"weight": a, "bias": b}
    extra = {"layer_norm1": lin(w["ln_1.weight"], w["ln_1.bias"]), "layer_norm2": lin(w["ln_2.weight"], w["ln_2.bias"]),
             "self_attn": {"q_proj": lin(q, qb), "k_proj": lin(k, kb), "v_proj": lin(v, vb),
                           "out_proj": lin(w["attn.out_proj.weight"], w["attn.out_proj.bias"])},
             "mlp": {"fc1": lin(w["mlp.c_fc.weight"], w["mlp.c_fc.bias"]), "fc2": lin(w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])}}
    all_layers = {**params, "encoder": {"layers": [*params["encoder"]["layers"], extra]}}
    from npsd import clip
    for what, bad in (("q and k exchanged", swapped), ("all layers", all_layers)):
        out = clip.encode_text(bad, ids, config)
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err > 1e-2, (what, err)
