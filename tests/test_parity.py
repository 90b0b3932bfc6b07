"""`npsd parity` (npsd/parity_cli.py): npsd against diffusers/transformers on a user's checkpoint.

For an original single file the reference is diffusers' own reading of it (its single-file loading,
with the published SD v1.x or 2.x configuration in npsd/published_configs.py), never npsd's loader
or config, so a wrong key mapping or a wrongly inferred setting in npsd must show up as a block
above tolerance. Checked here for SD v1.x (SD 2.x: tests/test_parity_sd2.py):
- at full SD v1.5 size (random fp16 weights under the real file's names and shapes,
  tests/data/sd15_original_manifest.json; 64x64 images, 8x8 latents): every block passes; and with
  npsd's loader broken three ways (CLIP q/k swapped in the key mapping, the UNet's head count and
  the VAE's scaling factor inferred wrongly) the affected blocks fail, those before them agree;
- on tiny original files (4 levels like SD v1.x), with a tiny LDM configuration in place of the
  published one (the route is the same: diffusers reads the YAML and the file): EMA copies
  (diffusers' extract_ema), a 9-channel inpainting UNet, a .ckpt with training state (read by
  torch's weights-only unpickler), and a file that does not fit the published configuration;
- on a tiny diffusers folder: the references' from_pretrained; a weight perturbed in one UNet block
  makes that block the first difference.
Both sides are traced under the same names (npsd.trace; the reference by npsd.trace_torch's hooks)
and reported by `npsd compare`'s code: every block's input (NAME:in) and output, in execution order.
The tolerance of `npsd parity` is 1e-4 relative (max |npsd - reference| / max |reference|).
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import npsd
from npsd import loading, published_configs, weights
from tests import test_cli
from tests.helpers import perturb_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
model = test_cli.model            # the tiny diffusers folder (2 levels, CLIP width 32), a module fixture
run = test_cli.run                # main([...]) in-process -> (exit code, stdout, stderr)
ROW = re.compile(r"^(?P<name>\S+)\s+(?P<shape>\S+)\s+(?P<abs>-|\S*\d)\s+(?P<rel>-|\S*\d)"
                 r"(?:  (?P<mark>>>|!!) (?P<problem>.*))?$")


def rows(out):
    """The report of a parity run: {name: (relative error, "ok" / "ABOVE TOLERANCE" / "FAILED", shape)}."""
    table = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m and not line.startswith("name "):
            over = m["problem"] == "exceeds the tolerance"
            result = "ok" if not m["mark"] else "ABOVE TOLERANCE" if over else "FAILED"
            table[m["name"]] = (float(m["rel"]) if m["rel"] != "-" else float("inf"), result, m["shape"])
    return table


def first_difference(out):
    """The one name the report marks >> (None when none is)."""
    marked = [line.split()[0] for line in out.splitlines() if ROW.match(line) and ROW.match(line)["mark"] == ">>"]
    assert len(marked) <= 1, marked
    return marked[0] if marked else None


def blocks(text_layers, vae_levels, unet_levels, ddim=True, guided="eps"):
    """The outer blocks a parity run reports, in execution order (the report also has their
    inputs and the blocks inside them). guided: "eps", or "v" for a v-prediction UNet."""
    return (["tokenizer", "text_encoder.embeddings"] + [f"text_encoder.encoder.layers.{i}" for i in range(text_layers)]
            + ["text_encoder.final_layer_norm", "vae.encoder.conv_in"]
            + [f"vae.encoder.down_blocks.{i}" for i in range(vae_levels)]
            + ["vae.encoder.mid_block", "vae.encoder.conv_out", "vae.encoder", "vae.quant_conv", "vae.post_quant_conv",
               "vae.decoder.conv_in", "vae.decoder.mid_block"]
            + [f"vae.decoder.up_blocks.{i}" for i in range(vae_levels)]
            + ["vae.decoder.conv_out", "vae.decoder", "vae.scaling_factor", "unet.time_embedding", "unet.conv_in"]
            + [f"unet.down_blocks.{i}" for i in range(unet_levels)] + ["unet.mid_block"]
            + [f"unet.up_blocks.{i}" for i in range(unet_levels)] + ["unet.conv_norm_out", "unet.conv_out", "unet"]
            + ([f"ddim_step.guided_{guided}", "ddim_step.x_prev"] if ddim else []))


def check_report(out, expected_blocks):
    """The report lists expected_blocks in that order, each with its input (but the tokenizer, the
    scaling factor and the DDIM step), every npsd tensor has a reference counterpart, and the
    closing lines count the rows. -> the report's table."""
    table = rows(out)
    assert [n for n in table if n in set(expected_blocks)] == expected_blocks
    assert [n for n in expected_blocks if f"{n}:in" not in table] == \
        [n for n in expected_blocks if n in ("tokenizer", "vae.scaling_factor") or n.startswith("ddim_step.")]
    assert "only in" not in out
    assert f"\n{len(table)} tensors compared, " in out
    return table


def q_k_swapped(map_text_encoder):
    """npsd.loading.map_text_encoder with every layer's self_attn.q_proj and k_proj exchanged: a
    key-mapping error that npsd's shape checks cannot see (the two have the same shape)."""
    swap = {"self_attn.q_proj.": "self_attn.k_proj.", "self_attn.k_proj.": "self_attn.q_proj."}
    return lambda names: {re.sub(r"self_attn\.[qk]_proj\.", lambda m: swap[m[0]], d): o
                          for d, o in map_text_encoder(names).items()}


# --- full SD v1.5 size -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """v1-5-pruned-emaonly.safetensors' names and shapes (1145 tensors) with random fp16 values (2.1 GB)."""
    from tests.test_loading import manifest, random_state, write_safetensors
    path = tmp_path_factory.mktemp("sd15") / "v1-5-pruned-emaonly.safetensors"
    write_safetensors(path, random_state(manifest("sd15_original_manifest.json"), seed=1))
    yield path
    path.unlink()


SD15_BLOCKS = blocks(12, 4, 4)


def test_parity_on_an_original_sd15_file(sd15_file, capsys, monkeypatch):
    """Every tensor of the full-size model within 1e-4. Measured (float32): the guided eps 2.7e-5
    (classifier-free guidance scales the difference of two predictions by 7.5) and the timestep's
    sinusoid, unet.time_embedding:in, 2.7e-5 (both sides compute sin(t f) in float32 at t = 500,
    each 2.4e-5 from the float64 values), held to 1e-4; every other tensor <= 5.5e-6 (the DDIM
    x_prev; the UNet's eps 2.5e-6), held to 2e-5. The traces' sizes are what npsd.resources'
    memory check for `--size` assumes, within 10 % and not above it (measured: 132.7 UNet and 19.1
    VAE activations a side, against 135 and 20)."""
    from npsd import parity_cli, resources
    recorded, report = {}, parity_cli.report

    def measured(ours, ref, *args, **kwargs):
        for side, tensors in (("npsd", ours), ("reference", ref)):
            for name, t in tensors.items():
                key = (side, name.split("/")[-1].split(".")[0].split(":")[0])
                recorded[key] = recorded.get(key, 0) + t.nbytes
        return report(ours, ref, *args, **kwargs)
    monkeypatch.setattr(parity_cli, "report", measured)
    rc, out, err = run(["parity", "--model", sd15_file, "--size", 64], capsys)
    for side in ("npsd", "reference"):                               # units: 320 x 8 x 8, 256 x 64 x 64 floats
        unet, vae = recorded[side, "unet"] / (4 * 320 * 8 * 8), recorded[side, "vae"] / (4 * 256 * 64 * 64)
        assert resources.K_TRACE_UNET / 1.1 <= unet <= resources.K_TRACE_UNET, (side, unet)
        assert resources.K_TRACE_VAE / 1.1 <= vae <= resources.K_TRACE_VAE, (side, vae)
    print(out)
    assert rc == 0, out + err
    assert "(single file, read by diffusers, as 'v1' with the published v1-inference.yaml)" in out.splitlines()[0]
    table = check_report(out, SD15_BLOCKS)
    assert all(result == "ok" for _, result, _ in table.values()) and first_difference(out) is None
    assert table["tokenizer"][0] == 0 and table["vae.scaling_factor"][0] == 0
    loose = ("ddim_step.guided_eps", "unet.time_embedding:in")
    assert max(table[name][0] for name in loose) <= 1e-4 and "one DDIM step at t=951" in out
    assert max(rel for name, (rel, _, _) in table.items() if name not in loose) <= 2e-5
    assert out.strip().splitlines()[-1].startswith(f"npsd parity: OK: {len(table)} tensors within 0.0001")


def test_parity_refuses_a_size_beyond_the_memory_before_any_work(tiny_file, capsys, monkeypatch):
    """--size whose traces and working memory exceed the available memory is refused in one line
    before either side runs (--size 100000 ended in an internal MemoryError after loading both);
    with the memory unknown no check is made."""
    from npsd import parity_cli, resources
    monkeypatch.setattr(resources, "available_bytes", lambda: 2**30)                 # 1 GB "available"
    need = resources.parity_bytes(npsd.load(tiny_file), 1024) / resources.GB

    def no_work(*a, **k):
        raise AssertionError("work started before the memory check")
    monkeypatch.setattr(parity_cli, "trace_tokenizer", no_work)
    rc, out, err = run(["parity", "--model", tiny_file, "--size", 1024], capsys)
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"npsd: error: --size 1024 needs about {need:.1f} GB of memory") and need > 1, err
    assert "only 1.0 GB are available; use a smaller --size (default 64)" in err, err
    monkeypatch.setattr(resources, "available_bytes", lambda: None)
    rc, out, err = run(["parity", "--model", tiny_file, "--size", 1024], capsys)
    assert rc == 1 and "work started before the memory check" in err, err


def test_parity_finds_npsd_loading_errors_in_an_original_file(sd15_file, capsys, monkeypatch):
    """Sensitivity: the same file, with npsd's loader broken where the file does not say what is
    right. Key mapping: the text encoder's q_proj and k_proj exchanged (same shapes, so npsd's
    shape checks pass). Inference: the UNet's heads taken as width / 64 per level (SD 2.x's rule:
    5, 10, 20, 20 instead of SD v1.x's 8) and SDXL's VAE scaling factor 0.13025. The reference
    takes neither from npsd, so the text encoder's layers, the UNet's attention blocks and the
    scaling factor fail while the blocks before them (embeddings, VAE, time embedding, conv_in)
    still agree, and the first difference is the first layer's self-attention; the exit code is 1.
    Measured: text_encoder.encoder.layers.0 5.8e-1, unet.down_blocks.0 1.8e-3, the scaling factor
    2.8e-1 (tolerance 1e-4)."""
    real_config = loading.sd15_config

    def wrong_config():
        config = real_config()
        config["unet"]["num_heads"] = [5, 10, 20, 20]
        config["vae"]["scaling_factor"] = 0.13025
        return config

    monkeypatch.setattr(loading, "sd15_config", wrong_config)
    monkeypatch.setattr(loading, "map_text_encoder", q_k_swapped(loading.map_text_encoder))
    rc, out, err = run(["parity", "--model", sd15_file, "--size", 64], capsys)
    print(out)
    assert rc == 1, out + err
    table = rows(out)
    failed = {name for name, (_, result, _) in table.items() if result != "ok"}
    assert {"text_encoder.encoder.layers.0", "text_encoder.final_layer_norm", "vae.scaling_factor",
            "unet.down_blocks.0", "unet"} <= failed
    for name in ["tokenizer", "text_encoder.embeddings", "text_encoder.encoder.layers.0.self_attn:in",
                 "unet.time_embedding", "unet.conv_in"] + \
            [n for n in table if n.startswith("vae.") and n != "vae.scaling_factor"]:
        assert table[name][1] == "ok", name
    assert first_difference(out) == "text_encoder.encoder.layers.0.self_attn"
    assert out.strip().splitlines()[-1].startswith(f"npsd parity: FAILED: {len(failed)} of {len(table)} tensors")


# --- tiny original files, with a tiny LDM configuration in place of the published one ----------

def tiny_ldm_yaml(in_channels=4, unet_config=None, sd2=None):
    """The LDM configuration of tests/test_loading.py's tiny models (diffusers reads it as it reads
    v1-inference.yaml): channels 32, 32, 64, 64; 8 heads; context 128; latent 4. unet_config: another
    tiny UNet's diffusers config; sd2: "epsilon" or "v" for an SD 2.x-layout UNet, configured as
    v2-inference(-v).yaml (heads 64 channels wide, linear proj_in/proj_out, the parameterization)."""
    from tests.test_loading import TINY_UNET, TINY_VAE
    unet_config = unet_config or TINY_UNET
    ch = unet_config["block_out_channels"]
    heads = ({"num_head_channels": 64, "use_linear_in_transformer": True} if sd2
             else {"num_heads": unet_config["attention_head_dim"]})
    unet = {"in_channels": in_channels, "out_channels": 4, "model_channels": ch[0],
            "channel_mult": [c // ch[0] for c in ch], "num_res_blocks": unet_config["layers_per_block"],
            "attention_resolutions": [4, 2, 1], **heads, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": unet_config["cross_attention_dim"], "legacy": False}
    vc = TINY_VAE["block_out_channels"]
    vae = {"double_z": True, "z_channels": TINY_VAE["latent_channels"], "resolution": 64, "in_channels": 3,
           "out_ch": 3, "ch": vc[0], "ch_mult": [c // vc[0] for c in vc], "num_res_blocks": TINY_VAE["layers_per_block"],
           "attn_resolutions": [], "dropout": 0.0}
    parameterization = {"parameterization": "v"} if sd2 == "v" else {}
    return yaml.safe_dump({"model": {"params": {
        **parameterization, "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": unet},
        "first_stage_config": {"params": {"embed_dim": TINY_VAE["latent_channels"], "ddconfig": vae}}}}})


@pytest.fixture
def tiny_configs(monkeypatch):
    """The tiny models' configurations where npsd parity takes the published ones."""
    from tests.test_loading import TINY_CLIP
    monkeypatch.setattr(published_configs, "LDM_CONFIGS", {
        ("v1", "epsilon"): ("tiny-inference.yaml", tiny_ldm_yaml()),
        ("inpainting", "epsilon"): ("tiny-inpainting.yaml", tiny_ldm_yaml(9))})
    monkeypatch.setattr(published_configs, "CLIP_TEXT_CONFIG", {
        **TINY_CLIP, "vocab_size": 49408, "model_type": "clip_text_model", "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1})


def tiny_state(in_channels=4):
    """A tiny model's weights under the original single-file names (diffusers' own routing)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.test_loading import TINY_CLIP, tiny_models, tiny_original_state
    unet, vae, _ = tiny_models(in_channels=in_channels)
    torch.manual_seed(0)                      # a CLIP with the real vocabulary size, for the shipped tokenizer
    clip = perturb_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "vocab_size": 49408})).eval(), seed=3)
    return tiny_original_state(unet, vae, clip)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from tests.test_loading import write_safetensors
    path = tmp_path_factory.mktemp("tiny") / "tiny-v1.safetensors"
    write_safetensors(path, tiny_state())
    return path


def test_parity_on_a_tiny_original_file(tiny_file, tiny_configs, capsys):
    """Measured: the guided eps 6.4e-6 (CFG's factor 7.5), every other tensor <= 3.2e-6; held to 3e-5."""
    rc, out, err = run(["parity", "--model", tiny_file, "--size", 64], capsys)
    print(out)
    assert rc == 0, out + err
    assert "as 'v1' with the published tiny-inference.yaml" in out
    table = check_report(out, blocks(2, 4, 4))
    assert max(rel for rel, _, _ in table.values()) <= 3e-5
    assert out.strip().splitlines()[-1].startswith(f"npsd parity: OK: {len(table)} tensors within 0.0001")


def test_a_file_that_does_not_fit_the_published_configuration_is_refused(tiny_file, capsys, monkeypatch):
    """Without the tiny configuration diffusers builds SD v1.x's models, which the tiny weights do
    not fit: one line naming the tensor, exit code 2. A model type without a published
    configuration is refused the same way."""
    rc, out, err = run(["parity", "--model", tiny_file, "--size", 64], capsys)
    assert rc == 2 and err.count("\n") == 1, out + err
    assert err.startswith("npsd: error: parity: the text_encoder weights do not fit diffusers' model for the "
                          "published v1-inference.yaml") and "embeddings.token_embedding.weight" in err, err
    monkeypatch.delitem(published_configs.LDM_CONFIGS, ("v1", "epsilon"))
    rc, out, err = run(["parity", "--model", tiny_file, "--size", 64], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, out + err
    assert "diffusers reads" in err and "as 'v1', predicting epsilon; npsd parity compares original files of " \
        "SD v1.x and 2.x: 'inpainting' (epsilon), 'v2' (epsilon), 'v2' (v_prediction), 'inpainting_v2' (epsilon)" in err
    rc, out, err = run(["parity", "--model", tiny_file, "--size", 32], capsys)   # too small for 4 levels
    assert rc == 2 and out == "" and "--size must be a multiple of 8 and at least 64" in err and err.count("\n") == 1


# This file's UNet (random weights, EMA copies of other random weights) reaches 1x1 at its deepest
# level, where GroupNorm amplifies rounding: with OpenBLAS's Haswell kernels its worst block measured
# 1.5e-4 relative, over the default 1e-4. Using the raw weights instead of the EMA copies is far above.
TOL_EMA = 1e-3


def test_parity_compares_the_ema_copies_unless_no_ema(tmp_path, tiny_configs, capsys, monkeypatch):
    """A v1-5-pruned-like file with EMA copies of every UNet weight (model_ema.<name without dots>):
    diffusers extracts them (extract_ema=True) unless --no-ema; both runs pass. Sensitivity: npsd
    using the raw weights where the EMA copies were asked for fails at the UNet's first block."""
    from tests.test_loading import add_ema_copies, write_safetensors
    sd = tiny_state()
    add_ema_copies(sd)
    path = tmp_path / "tiny-full-ema.safetensors"
    write_safetensors(path, sd)
    for extra in ([], ["--no-ema"]):
        rc, out, err = run(["parity", "--model", path, "--size", 64, "--tolerance", TOL_EMA] + extra, capsys)
        assert rc == 0 and "npsd parity: OK: " in out, out + err
        check_report(out, blocks(2, 4, 4))
    real_load = npsd.load
    monkeypatch.setattr(npsd, "load", lambda p, **kw: real_load(p, **{**kw, "ema": False}))
    rc, out, err = run(["parity", "--model", path, "--size", 64, "--tolerance", TOL_EMA], capsys)
    assert rc == 1, out + err
    table = rows(out)
    assert table["unet.conv_in"][1] == "ABOVE TOLERANCE" and table["vae.decoder"][1] == "ok"
    assert first_difference(out).startswith("unet.")


def test_parity_on_an_inpainting_file(tmp_path, tiny_configs, capsys):
    """A 9-channel (inpainting) UNet: diffusers reads the file as 'inpainting' (its configuration
    has 9 input channels); the UNet blocks are compared on 9-channel input; no DDIM step."""
    from tests.test_loading import write_safetensors
    path = tmp_path / "tiny-inpainting.safetensors"
    write_safetensors(path, tiny_state(in_channels=9))
    rc, out, err = run(["parity", "--model", path, "--size", 64], capsys)
    assert rc == 0, out + err
    assert "as 'inpainting' with the published tiny-inpainting.yaml" in out
    table = check_report(out, blocks(2, 4, 4, ddim=False))
    assert table["unet.conv_in:in"][2] == "1x9x8x8" and table["unet"][2] == "1x4x8x8" and "DDIM" not in out


def test_parity_on_a_ckpt_with_training_state(tmp_path, tiny_configs, capsys):
    """A .ckpt that pickles training state beside the tensors (a pytorch_lightning callback, numpy
    scalars and arrays, as real SD .ckpt files do): torch's weights-only unpickler reads it, those
    names bound to a placeholder; every block passes."""
    from tests.test_ckpt import write_ckpt
    path = tmp_path / "tiny.ckpt"
    write_ckpt(path, {k: torch.from_numpy(v) for k, v in tiny_state().items()})
    rc, out, err = run(["parity", "--model", path, "--size", 64], capsys)
    assert rc == 0, out + err
    header = out.splitlines()[0]
    assert "read by torch.load(weights_only=True), the training state it pickles (numpy, pytorch_lightning " \
        "objects) as placeholders, as 'v1'" in header
    assert "npsd parity: OK: " in out
    check_report(out, blocks(2, 4, 4))


# --- the built-in model: a file that carries its own configuration -----------------------------

SHIPPED = str(weights.path("npsd-tiny.safetensors"))


def test_parity_on_the_built_in_model(capsys):
    """The shipped file states its settings in npsd_config: diffusers reads it with an LDM
    configuration of its own layout (parity_cli.own_configuration), its settings read from the
    file's metadata by the safetensors package. Measured: the time embedding's input 1.4e-5 (the
    sinusoid at t = 500 in float32: 500 f rounded differently), every other tensor <= 4.8e-6; held
    to 1e-4 and 3e-5."""
    rc, out, err = run(["parity"], capsys)                                  # no --model: the built-in one
    print(out)
    assert rc == 0, out + err
    assert out.startswith(f"npsd parity: {SHIPPED} (single file")
    assert "as 'v1' with its own configuration (npsd_config)" in out
    table = check_report(out, blocks(3, 3, 3))
    assert table["unet.time_embedding:in"][0] <= 1e-4
    assert max(rel for name, (rel, _, _) in table.items() if name != "unet.time_embedding:in") <= 3e-5


def test_parity_on_the_built_in_model_finds_npsd_errors(capsys, monkeypatch):
    """Sensitivity: npsd's reading of the same file broken where the reference does not share it:
    the text encoder's q_proj and k_proj exchanged in npsd's key mapping, and the UNet's heads read
    as 2 where the file states 4. The text encoder fails from its first self-attention on, the UNet
    from its first transformer on, the VAE still agrees; the exit code is 1."""
    real_load = npsd.load

    def two_heads(path, **kw):
        pipe = real_load(path, **kw)
        pipe.config["unet"]["num_heads"] = 2
        return pipe

    monkeypatch.setattr(loading, "map_text_encoder", q_k_swapped(loading.map_text_encoder))
    monkeypatch.setattr(npsd, "load", two_heads)
    rc, out, err = run(["parity", "--model", SHIPPED], capsys)
    print(out)
    assert rc == 1, out + err
    table = rows(out)
    assert first_difference(out) == "text_encoder.encoder.layers.0.self_attn"
    assert table["unet.down_blocks.0.attentions.0"][1] == "ABOVE TOLERANCE"
    for name in ["text_encoder.embeddings", "unet.time_embedding", "unet.conv_in", "unet.down_blocks.0.resnets.0"] + \
            [n for n in table if n.startswith("vae.")]:
        assert table[name][1] == "ok", name


def test_a_built_in_design_an_ldm_configuration_cannot_state_is_refused(tmp_path, capsys):
    """The shipped file with npsd_config claiming 16 GroupNorm groups in the UNet: diffusers' single
    -file loading has no place for it, so parity refuses in one line, before any comparison."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    import json
    with safe_open(SHIPPED, "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["npsd_config"])
    config["unet"]["norm_groups"] = 16
    save_file(tensors, tmp_path / "groups16.safetensors", metadata={**meta, "npsd_config": json.dumps(config)})
    rc, out, err = run(["parity", "--model", tmp_path / "groups16.safetensors"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, out + err
    assert "npsd_config has unet norm_groups 16 (SD's 32), which an LDM configuration cannot tell diffusers" in err


# --- a tiny diffusers folder -------------------------------------------------------------------

def test_parity_on_a_diffusers_folder(model, capsys):
    rc, out, err = run(["parity", "--model", model, "--size", 32], capsys)
    assert rc == 0, out + err
    assert "diffusers folder" in out and "npsd parity: OK: " in out
    check_report(out, blocks(2, 2, 2))


def test_parity_fails_when_npsd_is_wrong(model, capsys, monkeypatch):
    """Sensitivity: the same weights, but npsd's UNet GroupNorm eps changed 1e-5 -> 1e-2:
    the blocks from the first resnet on are above tolerance, the first marked; the exit code is 1."""
    real_load = npsd.load

    def wrong_eps(path, **kw):
        pipe = real_load(path, **kw)
        pipe.config["unet"]["resnet_eps"] = 1e-2
        return pipe

    monkeypatch.setattr(npsd, "load", wrong_eps)
    rc, out, err = run(["parity", "--model", model, "--size", 32], capsys)
    assert rc == 1, out + err
    table = rows(out)
    assert table["text_encoder.encoder.layers.1"][1] == "ok" and table["unet.conv_in"][1] == "ok"
    assert table["unet.down_blocks.0"][1] == "ABOVE TOLERANCE" and "npsd parity: FAILED" in out
    assert first_difference(out) == "unet.down_blocks.0.resnets.0"


def test_parity_names_a_broken_block_first(model, capsys, monkeypatch):
    """Sensitivity: one weight of one UNet block perturbed in npsd's copy (the second resnet of the
    first up block, conv1's weight x 1.01): that resnet's output is the first difference (>>), its
    input and every tensor before it still agree, the ones after it inherit the error. Measured:
    the resnet's output 2.3e-3 relative (tolerance 1e-4), the tensors before it <= 1.7e-6 (held
    to 2e-5)."""
    real_load = npsd.load

    def broken(path, **kw):
        pipe = real_load(path, **kw)
        conv1 = pipe.params["unet"]["up_blocks"][0]["resnets"][1]["conv1"]
        conv1["weight"] = conv1["weight"] * np.float32(1.01)
        return pipe

    monkeypatch.setattr(npsd, "load", broken)
    rc, out, err = run(["parity", "--model", model, "--size", 32], capsys)
    print(out)
    assert rc == 1, out + err
    assert first_difference(out) == "unet.up_blocks.0.resnets.1"
    table = rows(out)
    names = list(table)
    before = names[:names.index("unet.up_blocks.0.resnets.1")]
    assert "unet.up_blocks.0.resnets.1:in" in before and all(table[n][1] == "ok" for n in before)
    assert max(table[n][0] for n in before) <= 2e-5
    assert table["unet.up_blocks.0.resnets.1"][0] > 1e-3
    assert all(table[n][1] != "ok" for n in ("unet.up_blocks.0", "unet", "ddim_step.x_prev"))
    assert out.strip().splitlines()[-1].startswith("npsd parity: FAILED: ")


def test_parity_needs_the_test_extra(model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    rc, out, err = run(["parity", "--model", model], capsys)
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert 'pip install "npsd[test]"' in err and "diffusers" in err


def test_import_npsd_does_not_import_torch_or_parity():
    code = ("import sys; sys.modules['torch'] = None; import npsd, npsd.cli, npsd.pngmeta; "
            "assert 'npsd.parity_cli' not in sys.modules; "
            "from npsd.cli import main; sys.exit(main(['parity', '--model', '.']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and 'pip install "npsd[test]"' in p.stderr, p.stderr
