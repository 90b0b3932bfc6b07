"""npsd.load on every SD v1.x layout, checked against diffusers' own single-file converters.

Full-size checkpoints are built from the tensor manifests of the real files (tests/data/, copied from
the project's reference folder) with random fan-in-scaled fp16 values, written one at a time and
deleted after use. npsd loads them with dtype=float16 here (exact: no value changes, half the memory);
the float32 default is exercised by the memory test (a fresh subprocess without torch) and the small
forward-pass tests.
"""

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as sfu

import npsd
from npsd import clip
from npsd.errors import CheckpointError
from npsd.params import flatten

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent

# The v1-inference.yaml of the original repository, as a dict (diffusers' config builders read it).
V1_INFERENCE = {"model": {"params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
    "unet_config": {"params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
        "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
        "use_checkpoint": True, "legacy": False}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
}}}


def manifest(name):
    with open(DATA / name) as f:
        return {k: (tuple(shape), dtype) for k, (shape, dtype) in json.load(f).items()}


# --- building checkpoints -------------------------------------------------------------------------

class RandomTensors:
    """Deterministic fan-in-scaled fp16 tensors for a manifest, cut from one random pool at random
    offsets (so no two tensors are equal and a swapped mapping is caught), fast to build at 1.07B values."""

    def __init__(self, seed=0, pool=1 << 22):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(pool, dtype=np.float32)

    def __call__(self, shape, dtype):
        n = int(np.prod(shape))
        if dtype.startswith("I"):  # position_ids [1, 77], model_ema.num_updates
            return np.arange(n, dtype=np.int64 if dtype == "I64" else np.int32).reshape(shape)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = np.float32(self.rng.uniform(0.5, 1.5) / np.sqrt(fan_in))
        reps = -(-n // self.pool.size) + 1
        off = int(self.rng.integers(self.pool.size))
        src = self.pool if reps == 1 and off + n <= self.pool.size else np.tile(self.pool, reps)
        return (src[off:off + n] * scale).astype(np.float16).reshape(shape)


def random_state(manifest_dict, seed=0):
    gen = RandomTensors(seed)
    return {k: gen(shape, dtype) for k, (shape, dtype) in manifest_dict.items()}


def write_safetensors(path, tensors, metadata=None):
    """A streaming .safetensors writer (header, then each tensor's bytes): no second in-memory copy.
    Values may be arrays or zero-argument callables returning arrays (computed while writing)."""
    codes = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32", "uint16": "BF16"}
    header, off, specs = {}, 0, {}
    for k, v in tensors.items():
        a = v() if callable(v) else v
        specs[k] = (str(a.dtype), a.shape, a.nbytes)
    for k, (dt, shape, nbytes) in specs.items():
        header[k] = {"dtype": codes[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for v in tensors.values():
            a = np.ascontiguousarray(v() if callable(v) else v)
            f.write(a.tobytes())


def to_torch(sd):
    return {k: torch.from_numpy(v) for k, v in sd.items()}  # shares memory


def diffusers_reference(original_sd, extract_ema=False):
    """diffusers' own conversion of an original-layout state dict -> {component: {name: tensor}}."""
    ckpt = to_torch(original_sd) if isinstance(next(iter(original_sd.values())), np.ndarray) else original_sd
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(V1_INFERENCE, ckpt)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(V1_INFERENCE, ckpt)
    clip = sfu.convert_ldm_clip_checkpoint(ckpt)
    return {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg, extract_ema=extract_ema),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg),
        "text_encoder": {k[len("text_model."):]: v for k, v in clip.items() if not k.endswith("position_ids")},
    }


def assert_same_tensors(params, reference, negate=()):
    """Every tensor of every component equal (exactly) to the reference; same names."""
    for comp, ref in reference.items():
        flat = flatten(params[comp])
        assert set(flat) == set(ref), (comp, sorted(set(flat) ^ set(ref))[:5])
        for name, t in ref.items():
            expect = t.numpy() if isinstance(t, torch.Tensor) else t
            if comp in negate:
                expect = -expect
            got = flat[name]
            assert got.shape == expect.shape, (comp, name, got.shape, expect.shape)
            assert np.array_equal(got, expect), f"{comp}.{name} differs"


def diffusers_manifest():
    m = json.load(open(DATA / "sd15_diffusers_manifest.json"))
    return {
        "unet": m["unet/diffusion_pytorch_model.safetensors"],
        "vae": m["vae/diffusion_pytorch_model.safetensors (current diffusers names)"],
        "text_encoder": {k[len("text_model."):]: v for k, v in
                         m["text_encoder/model.safetensors (text_model.* without position_ids)"].items()},
    }


# --- full-size fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def original_sd():
    """The v1-5-pruned-emaonly layout (1145 tensors) with random fp16 values (2.1 GB)."""
    return random_state(manifest("sd15_original_manifest.json"))


@pytest.fixture(scope="module")
def reference(original_sd):
    return diffusers_reference(original_sd)  # tensors share original_sd's memory (VAE attention: views)


@pytest.fixture(scope="module")
def original_file(original_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("orig") / "v1-5-pruned-emaonly.safetensors"
    write_safetensors(path, original_sd)
    yield path
    path.unlink()


# --- full-size tests ------------------------------------------------------------------------------

def test_original_safetensors_matches_diffusers_conversion(original_file, reference):
    pipe = npsd.load(original_file, dtype=np.float16)
    assert pipe.info["ema"] is None and pipe.info["unexpected"] == []
    # every tensor used: 1145 = 686 + 248 + 196 used + 15 ignored (12 schedule buffers, 2 EMA counters, position_ids)
    used = sum(len(flatten(pipe.params[c])) for c in pipe.params)
    assert used == 686 + 248 + 196 and pipe.info["ignored"] == 14 and used + 14 + 1 == 1145
    assert_same_tensors(pipe.params, reference)
    # the text encoder's linear weights laid out [in, out] in memory (npsd.clip.blas_layout), the rest as read
    text = flatten(pipe.params["text_encoder"])
    laid_out = {n for n, a in text.items() if a.flags.f_contiguous and not a.flags.c_contiguous}
    assert laid_out == {f"encoder.layers.{i}.{m}.{n}.weight" for i in range(12) for m, n in clip.LINEAR_LAYERS}
    assert all(a.flags.c_contiguous for n, a in text.items() if n not in laid_out)
    # names and shapes are those of the diffusers folder layout (what npsd's components read)
    for comp, man in diffusers_manifest().items():
        flat = flatten(pipe.params[comp])
        assert {k: list(v.shape) for k, v in flat.items()} == {k: s for k, (s, _) in man.items()}
    assert pipe.config["text_encoder"]["num_heads"] == 12 and pipe.config["unet"]["num_heads"] == 8
    assert pipe.config["vae"]["scaling_factor"] == 0.18215


def test_safetensors_reader_agrees_with_the_safetensors_package(original_file):
    from safetensors import safe_open
    from npsd.safetensors_io import SafetensorsFile
    with safe_open(str(original_file), framework="np") as ref, SafetensorsFile(original_file) as ours:
        assert set(ref.keys()) == set(ours.tensors)
        for name in list(ref.keys())[::50]:
            assert np.array_equal(ours.read(name), ref.get_tensor(name)), name


def test_ckpt_full_size(original_sd, reference, tmp_path):
    """The .ckpt zip-pickle written by torch.save, with training state beside state_dict."""
    path = tmp_path / "v1-5-pruned-emaonly.ckpt"
    torch.save({"state_dict": to_torch(original_sd), "global_step": 840000, "epoch": 6,
                "pytorch-lightning_version": "1.4.2", "loss_scale": np.float64(65536.0),
                "lr_schedulers": [], "optimizer_states": []}, path)
    pipe = npsd.load(path, dtype=np.float16)
    assert pipe.info["unexpected"] == []
    assert_same_tensors(pipe.params, reference)
    del pipe
    gc.collect()
    n, _, base, peak = measure_load(path)  # the .ckpt reader too keeps one storage's bytes at a time
    path.unlink()
    assert peak - base < 1.1 * 4 * n


def add_ema_copies(sd, seed=0):
    """Give every UNet weight of an original-layout state dict an EMA copy, named as in
    v1-5-pruned.* (model_ema.<name without "model." and without dots)), that differs from the raw
    weight (1.2 x raw + noise), so that choosing the wrong copy shows."""
    rng = np.random.default_rng(seed)
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] * np.float32(1.2) + np.float32(0.05) * \
            rng.standard_normal(sd[k].shape, dtype=np.float32)
    return sd


def test_full_ema_layout_prefers_ema_copies(original_sd, reference, tmp_path):
    """v1-5-pruned layout: every UNet weight also as model_ema.<name without dots>. The EMA copies
    are written as the negated raw weights, so the two selections give different values."""
    full = manifest("sd15_full_ema_manifest.json")
    assert set(original_sd) <= set(full)
    ema_of = {"model_ema." + "".join(k.split(".")[1:]): k for k in original_sd if k.startswith("model.diffusion_model.")}
    assert set(full) - set(original_sd) == set(ema_of)
    # diffusers' extract_ema=True picks the same names (string values: only the name routing matters)
    names_only = {k: k for k in full}
    cfg = sfu.create_unet_diffusers_config_from_ldm(V1_INFERENCE, to_torch({"model.diffusion_model.input_blocks.0.0.weight": original_sd["model.diffusion_model.input_blocks.0.0.weight"]}))
    picked = sfu.convert_ldm_unet_checkpoint(names_only, cfg, extract_ema=True)
    assert all(v in ema_of for v in picked.values()) and len(picked) == 686
    path = tmp_path / "v1-5-pruned.safetensors"
    write_safetensors(path, {k: (lambda r=ema_of[k]: -original_sd[r]) if k in ema_of else original_sd[k] for k in full})
    pipe = npsd.load(path, dtype=np.float16)  # ema=True by default
    assert pipe.info["ema"] is True and pipe.info["unexpected"] == []
    assert_same_tensors(pipe.params, reference, negate=("unet",))
    del pipe
    gc.collect()
    pipe = npsd.load(path, ema=False, dtype=np.float16)
    path.unlink()
    assert pipe.info["ema"] is False and pipe.info["unexpected"] == []
    assert_same_tensors(pipe.params, reference)


def write_diffusers_folder(folder, reference, legacy_vae, position_ids, fp16_variant, scaling=0.18215):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    folder = Path(folder)
    for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / d).mkdir(parents=True)
    var = ".fp16" if fp16_variant else ""
    write_safetensors(folder / "unet" / f"diffusion_pytorch_model{var}.safetensors",
                      {k: v.numpy() for k, v in reference["unet"].items()})
    vae = {}
    for k, v in reference["vae"].items():
        if legacy_vae:
            for new, old in legacy.items():
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        vae[k] = v.numpy()
    write_safetensors(folder / "vae" / f"diffusion_pytorch_model{var}.safetensors", vae)
    te = {"text_model." + k: v.numpy() for k, v in reference["text_encoder"].items()}
    if position_ids:
        te["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    write_safetensors(folder / "text_encoder" / f"model{var}.safetensors", te)
    json.dump({"attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-05,
               "sample_size": 64}, open(folder / "unet" / "config.json", "w"))
    json.dump({"scaling_factor": scaling, "norm_num_groups": 32}, open(folder / "vae" / "config.json", "w"))
    json.dump({"hidden_size": 768, "num_attention_heads": 12, "layer_norm_eps": 1e-05, "hidden_act": "quick_gelu"},
              open(folder / "text_encoder" / "config.json", "w"))
    json.dump({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
               "beta_schedule": "scaled_linear"}, open(folder / "scheduler" / "scheduler_config.json", "w"))
    json.dump({"_class_name": "StableDiffusionPipeline"}, open(folder / "model_index.json", "w"))
    for n in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "weights" / n, folder / "tokenizer" / n)


def test_diffusers_folder(reference, tmp_path):
    """Two folders: (legacy VAE names, text encoder with text_model.position_ids, *.fp16 variant files)
    and (current names, no position_ids, plain file names). The second reuses the first's UNet file."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_diffusers_folder(a, reference, legacy_vae=True, position_ids=True, fp16_variant=True, scaling=0.2)
    pipe = npsd.load(a, dtype=np.float16)
    assert pipe.info["format"] == "diffusers" and pipe.info["unexpected"] == []
    assert pipe.info["files"]["unet"].endswith("diffusion_pytorch_model.fp16.safetensors")
    assert pipe.config["vae"]["scaling_factor"] == 0.2  # read from vae/config.json
    assert pipe.config["unet"]["num_heads"] == 8 and pipe.config["text_encoder"]["num_heads"] == 12
    assert type(pipe._tokenizer).__name__ == "Tokenizer"  # the folder's own tokenizer/ files
    assert_same_tensors(pipe.params, reference)
    del pipe
    gc.collect()
    write_diffusers_folder(b, {"unet": {}, "vae": reference["vae"], "text_encoder": reference["text_encoder"]},
                           legacy_vae=False, position_ids=False, fp16_variant=False)
    os.remove(b / "unet" / "diffusion_pytorch_model.safetensors")
    os.replace(a / "unet" / "diffusion_pytorch_model.fp16.safetensors", b / "unet" / "diffusion_pytorch_model.safetensors")
    shutil.rmtree(a)
    pipe = npsd.load(b, dtype=np.float16)
    shutil.rmtree(b)
    assert pipe.info["unexpected"] == [] and pipe.config["vae"]["scaling_factor"] == 0.18215
    assert_same_tensors(pipe.params, reference)


def measure_load(path):
    """Load `path` as float32 in a fresh subprocess without torch; returns (parameters, seconds,
    RSS before loading, peak RSS) in bytes. The peak is the child's own VmHWM (ru_maxrss would
    include the parent's peak, which Linux carries across fork + exec)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.modules["torch"] = None
        import numpy as np, npsd
        from npsd.params import count, flatten
        def hwm():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
        base = hwm()
        t = time.perf_counter()
        pipe = npsd.load({str(path)!r})
        dt = time.perf_counter() - t
        peak = hwm()
        n = sum(count(p) for p in pipe.params.values())
        assert all(a.dtype == np.float32 for c in pipe.params.values() for a in flatten(c).values())
        print(n, dt, base, peak)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    n, dt, base, peak = out.stdout.split()
    n, dt, base, peak = int(n), float(dt), int(base), int(peak)
    print(f"\n{Path(path).name} (fp16) -> float32: {n} parameters = {4 * n / 1e9:.2f} GB; load {dt:.1f} s; "
          f"peak RSS {peak / 1e9:.2f} GB (before load {base / 1e9:.2f} GB); peak / weights = {peak / (4 * n):.3f}")
    assert n == 1_066_235_307
    return n, dt, base, peak


def test_peak_memory_of_a_full_size_fp16_load(original_file):
    """Peak RSS must stay near the float32 weights (1.066B parameters = 4.26 GB): no second full
    copy, no memory-mapped file pages. Measured 4.34 GB (1.02x), see the printed line."""
    n, _, base, peak = measure_load(original_file)
    assert peak - base < 1.1 * 4 * n


# --- errors (small files) --------------------------------------------------------------------------

def test_no_argument_loads_the_builtin_model():
    assert npsd.load().info["file"].endswith("npsd-tiny.safetensors")   # tests/test_builtin_model.py tests it
    with pytest.raises(npsd.InputError, match="floating"):
        npsd.load("x.safetensors", dtype=np.int32)


def test_missing_path_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        npsd.load(tmp_path / "nope.safetensors")
    (tmp_path / "notes.txt").write_text("hello world, not weights")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        npsd.load(tmp_path / "notes.txt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        npsd.load(tmp_path / "empty.ckpt")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "cat"},
               tmp_path / "cat.pt")                                      # A1111's embedding .pt
    with pytest.raises(CheckpointError, match="cat.pt is a textual-inversion embedding"):
        npsd.load(tmp_path / "cat.pt")
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match=r"nothing.pt holds no tensors \(epoch, note\)"):
        npsd.load(tmp_path / "nothing.pt")


def test_other_architectures_are_named(tmp_path):
    cases = {
        "sdxl": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": np.ones(768, np.float16)}, "SDXL"),
        "sd2 text encoder only": ({"cond_stage_model.model.ln_final.weight": np.ones(1024, np.float16)},
                                  "lacks the unet and vae weights"),
        "other": ({"foo.weight": np.ones(3, np.float16)}, "not an SD v1.x or 2.x checkpoint"),
        "lora": ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": np.ones((4, 8), np.float16),
                  "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": np.ones((8, 4), np.float16)},
                 "is a LoRA, not a model; apply it to one with --lora"),
        "peft lora": ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": np.ones((4, 8), np.float16)}, "is a LoRA"),
        "embedding": ({"emb_params": np.ones((2, 768), np.float16)}, "is a textual-inversion embedding"),
    }
    for name, (sd, msg) in cases.items():
        write_safetensors(tmp_path / f"{name}.safetensors", sd)
        with pytest.raises(CheckpointError, match=msg.replace(".", r"\.")):
            npsd.load(tmp_path / f"{name}.safetensors")
    (tmp_path / "xl" / "text_encoder_2").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="SDXL"):
        npsd.load(tmp_path / "xl")


def test_bin_only_folder_without_safetensors_is_explained(tmp_path):
    (tmp_path / "f" / "unet").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        npsd.load(tmp_path / "f")


# --- small original-layout checkpoints: forward passes against diffusers-converted models ----------

class Tag:
    """Stands in for a tensor while tracing diffusers' converters: it is only routed (and the VAE
    attention weights are sliced [:, :, 0, 0]), so the output tells which original name went where."""

    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)

    def __getitem__(self, idx):
        return Tag(self.name, self.shape[:2])


def diffusers_routing():
    """{component: {diffusers name: (original name, original shape)}} from diffusers' converters
    run on the real file's names (sd15_original_manifest.json)."""
    m = manifest("sd15_original_manifest.json")
    tags = {k: Tag(k, s) for k, (s, _) in m.items()}
    conv = diffusers_reference(tags)
    return {c: {d: (t.name, m[t.name][0]) for d, t in sd.items()} for c, sd in conv.items()}


TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(32, 32, 64, 64), cross_attention_dim=128, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
TINY_CLIP = dict(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def tiny_models(in_channels=4):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.helpers import perturb_
    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(**{**TINY_UNET, "in_channels": in_channels}).eval(), seed=1)
    vae = perturb_(AutoencoderKL(**TINY_VAE).eval(), seed=2)
    clip = perturb_(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval(), seed=3)
    return unet, vae, clip


def tiny_original_state(unet, vae, clip):
    """The tiny models' weights under the ORIGINAL single-file names (routing from diffusers' converters)."""
    route = diffusers_routing()
    sd = {}
    for comp, model in (("unet", unet), ("vae", vae)):
        for d, t in model.state_dict().items():
            name, shape = route[comp][d]
            t = t.numpy().copy()
            sd[name] = t.reshape(t.shape + (1, 1)) if len(shape) == 4 and t.ndim == 2 else t  # VAE attn: 1x1 convs
    for d, t in clip.state_dict().items():
        sd["cond_stage_model.transformer." + ("" if d.startswith("text_model.") else "text_model.") + d] = t.numpy().copy()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    sd["betas"] = np.linspace(0.00085, 0.012, 1000, dtype=np.float32)
    sd["model_ema.decay"], sd["model_ema.num_updates"] = np.array(0.9999, np.float32), np.array(0, np.int32)
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    unet, vae, clip = tiny_models()
    sd = tiny_original_state(unet, vae, clip)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    write_safetensors(path, sd, metadata={"format": "pt"})
    return sd, path


def test_tiny_original_layout_converts_like_diffusers(tiny):
    """Mapping check on the tiny file too: diffusers' converters vs npsd, every tensor exact."""
    sd, path = tiny
    pipe = npsd.load(path)
    ref = diffusers_reference(sd)
    assert_same_tensors(pipe.params, {c: {k: v.numpy() for k, v in r.items()} for c, r in ref.items()})


def _diffusers_models_from_file(sd):
    """diffusers/transformers models built from diffusers' conversion of the original-layout dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    ref = diffusers_reference({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    unet.load_state_dict(ref["unet"], strict=True)
    vae = AutoencoderKL(**TINY_VAE).eval()
    vae.load_state_dict(ref["vae"], strict=True)
    clip = CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval()
    clip.load_state_dict(ref["text_encoder"], strict=False)
    missing = set(clip.state_dict()) - set(ref["text_encoder"])
    assert not missing, missing
    return unet, vae, clip


def _implemented(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as e:
        pytest.skip(f"component not implemented yet: {e}")


def test_tiny_forward_passes_agree_with_diffusers_converted_models(tiny):
    """UNet, VAE and text encoder of npsd loaded from the file vs diffusers/transformers models
    holding diffusers' own conversion of the same file. fp32 throughout: tolerance 1e-5 relative
    (max abs diff / max |ref|), the project's fp32 parity tolerance."""
    from npsd.testing import assert_close
    sd, path = tiny
    unet, vae, clip = _diffusers_models_from_file(sd)
    pipe = npsd.load(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(2, 77))
    with torch.no_grad():
        ref_text = clip(torch.from_numpy(ids)).last_hidden_state.numpy()
    print("\n", assert_close(_implemented(pipe.encode_text, ids), ref_text, 1e-5, "text_encoder"))
    latents = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    context = rng.standard_normal((1, 77, 128), dtype=np.float32)
    with torch.no_grad():
        ref_eps = unet(torch.from_numpy(latents), 500, torch.from_numpy(context)).sample.numpy()
    print(assert_close(_implemented(pipe.unet, latents, 500, context), ref_eps, 1e-5, "unet"))
    with torch.no_grad():
        ref_img = vae.decode(torch.from_numpy(latents)).sample.numpy()
    print(assert_close(_implemented(pipe.vae_decode, latents), ref_img, 1e-5, "vae_decode"))
    images = np.clip(rng.standard_normal((1, 3, 64, 64), dtype=np.float32), -1, 1)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images)).latent_dist
    mean, logvar = _implemented(pipe.vae_encode, images)
    print(assert_close(mean, dist.mean.numpy(), 1e-5, "vae_encode mean"))
    print(assert_close(logvar, dist.logvar.numpy(), 1e-5, "vae_encode logvar"))
    # sensitivity: a mapping that swapped the decoder's up-block order would be caught
    params = pipe.params["vae"]["decoder"]["up_blocks"]
    params[0], params[1] = params[1], params[0]  # same shapes (64 channels): only the order is wrong
    with pytest.raises(AssertionError):
        assert_close(pipe.vae_decode(latents), ref_img, 1e-5, "vae_decode with up_blocks 0<->1 swapped")


def test_missing_mismatched_and_unexpected_keys(tiny, tmp_path):
    sd, _ = tiny
    p = tmp_path / "x.safetensors"
    gone = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"
    write_safetensors(p, {k: v for k, v in sd.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"lack 1 tensors npsd needs: up_blocks\.1\.attentions\.2\.transformer_blocks\.0\.attn2\.to_v\.weight"):
        npsd.load(p)
    bad = "first_stage_model.decoder.up.1.block.0.conv1.weight"
    assert sd[bad].shape == (32, 64, 3, 3)
    write_safetensors(p, {**sd, bad: np.zeros((32, 48, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"decoder\.up_blocks\.2\.resnets\.0\.conv1\.weight is \[32, 48, 3, 3\] but npsd expects \[32, 64, 3, 3\]"):
        npsd.load(p)
    write_safetensors(p, {**sd, "model.diffusion_model.extra.weight": np.zeros(3, np.float32),
                          "something_else": np.zeros(3, np.float32)})
    with pytest.warns(UserWarning, match="ignoring 2 unexpected tensors: something_else, unet: extra.weight"):
        pipe = npsd.load(p)
    assert pipe.info["unexpected"] == ["something_else", "unet: extra.weight"]


def test_metadata_config_bf16_and_inpainting(tmp_path):
    unet, vae, clip = tiny_models(in_channels=9)  # inpainting UNet: 9 input channels
    sd = tiny_original_state(unet, vae, clip)
    bf16 = {k: (torch.from_numpy(v).to(torch.bfloat16).view(torch.uint16).numpy() if v.dtype == np.float32 and v.ndim
                else v) for k, v in sd.items()}
    cfg = {"vae": {"scaling_factor": 0.5}, "unet": {"num_heads": 4}, "defaults": {"height": 64, "width": 64}}
    p = tmp_path / "inpaint-bf16.safetensors"
    write_safetensors(p, bf16, metadata={"npsd_config": json.dumps(cfg)})
    pipe = npsd.load(p)
    assert pipe.params["unet"]["conv_in"]["weight"].shape == (32, 9, 3, 3)
    assert pipe.config["vae"]["scaling_factor"] == 0.5 and pipe.config["unet"]["num_heads"] == 4
    assert pipe.config["defaults"]["height"] == 64 and pipe.config["defaults"]["num_inference_steps"] == 50
    w = pipe.params["unet"]["conv_in"]["weight"]
    expect = torch.from_numpy(sd["model.diffusion_model.input_blocks.0.0.weight"]).to(torch.bfloat16).float().numpy()
    assert w.dtype == np.float32 and np.array_equal(w, expect)


def test_load_vae_alone(tiny, tmp_path):
    """A standalone VAE file in the original layout (vae-ft-mse style: encoder.*, decoder.*, plus
    training "loss.*" tensors), a diffusers VAE folder, and the VAE of a whole checkpoint agree."""
    from npsd.loading import load_vae
    sd, path = tiny
    whole = npsd.load(path).params["vae"]
    alone = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    write_safetensors(tmp_path / "vae.safetensors", {**alone, "loss.logvar": np.zeros((), np.float32)})
    ref = diffusers_reference(sd)["vae"]
    (tmp_path / "vaedir").mkdir()
    write_safetensors(tmp_path / "vaedir" / "diffusion_pytorch_model.safetensors", {k: v.numpy() for k, v in ref.items()})
    json.dump({"scaling_factor": 0.25}, open(tmp_path / "vaedir" / "config.json", "w"))
    for src, scaling in ((tmp_path / "vae.safetensors", 0.18215), (tmp_path / "vaedir", 0.25), (path, 0.18215)):
        params, config = load_vae(src)
        assert config["scaling_factor"] == scaling
        a, b = flatten(params), flatten(whole)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), src
    write_safetensors(tmp_path / "ink.safetensors", {"lora_unet_x.lora_down.weight": np.zeros((2, 4), np.float32)})
    write_safetensors(tmp_path / "other.safetensors", {"foo.weight": np.zeros(3, np.float32)})
    for name, message in (("ink", "ink.safetensors is a LoRA, not a model; apply it to one with --lora"),
                          ("other", r"other.safetensors holds no VAE \(no encoder.\* / decoder.\*")):
        with pytest.raises(CheckpointError, match=message):             # before: "the vae weights lack ..."
            load_vae(tmp_path / f"{name}.safetensors")


def test_diffusers_folder_with_bin_files(tiny, tmp_path):
    """Older diffusers folders hold torch-zip .bin files (diffusion_pytorch_model.bin,
    text_encoder/pytorch_model.bin): read with the same restricted unpickler as .ckpt."""
    sd, path = tiny
    ref = diffusers_reference(sd)
    names = {"unet": "diffusion_pytorch_model.bin", "vae": "diffusion_pytorch_model.bin", "text_encoder": "pytorch_model.bin"}
    for comp, name in names.items():
        (tmp_path / comp).mkdir()
        state = {("text_model." if comp == "text_encoder" else "") + k: v.contiguous() for k, v in ref[comp].items()}
        torch.save(state, tmp_path / comp / name)
    pipe = npsd.load(tmp_path)
    assert pipe.info["files"]["text_encoder"].endswith("pytorch_model.bin") and pipe._tokenizer is None
    assert_same_tensors(pipe.params, {c: {k: v.numpy() for k, v in r.items()} for c, r in ref.items()})
