"""Named activation traces (npsd/trace.py) and `npsd trace` / `npsd compare` (npsd/trace_cli.py).

A trace recorded from diffusers/transformers with forward hooks under the same names (as
docs/traces.md does) must match npsd's trace of the same weights and inputs tensor by tensor.
Tolerance: TRACE_RTOL = 1e-5 relative (max|a - b| / max|b|), about 10x the largest error measured
over every traced tensor of the tiny models below (measured: CLIP up to 4.6e-7, UNet up to 1.5e-6,
VAE up to 2.4e-6: both sides compute in float32, summing in different orders). The broken block of
test_a_broken_block_is_the_first_difference (cross-attention 1% too strong) gives about 1e-2.
"""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from npsd import clip, vae
from npsd import unet as unet_model
from npsd.safetensors_io import SafetensorsFile
from npsd.trace import Trace, load
from npsd.trace_cli import compare_traces
from npsd.trace_torch import hook_trace
from tests.helpers import perturb_, to_numpy_params
from tests.test_cli import model, run  # noqa: F401 - the tiny diffusers folder, a module fixture
from tests.test_unet import TINY_SD, TINY_SD_CONFIG

TRACE_RTOL = 1e-5
rng = np.random.default_rng(0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(**TINY_SD).eval(), 0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=24, intermediate_size=48,
                                                 num_hidden_layers=3, num_attention_heads=4,
                                                 max_position_embeddings=77, hidden_act="quick_gelu",
                                                 bos_token_id=998, eos_token_id=999)).eval(), 1)
    ae = perturb_(AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                layers_per_block=1, sample_size=32).eval(), 2)
    return unet, text, ae


def npsd_trace(tiny, ids, latents, t, image):
    unet, text, ae = tiny
    trace = Trace()
    context = clip.encode_text(to_numpy_params(text.state_dict(), "text_model."), ids, {"num_heads": 4}, trace=trace)
    unet_model.unet(to_numpy_params(unet.state_dict()), latents, t, context, TINY_SD_CONFIG, trace=trace)
    vconf = {"norm_groups": 8, "eps": 1e-6}
    vparams = to_numpy_params(ae.state_dict())
    mean, _ = vae.encode(vparams, image, vconf, trace=trace)
    vae.decode(vparams, mean, vconf, trace=trace)
    return trace


def reference_trace(tiny, ids, latents, t, image, wanted):
    unet, text, ae = tiny
    trace = Trace()
    with torch.no_grad(), hook_trace(text, "text_encoder", wanted, trace, strip="text_model."), \
            hook_trace(unet, "unet", wanted, trace), hook_trace(ae, "vae", wanted, trace):
        context = text(torch.from_numpy(ids)).last_hidden_state
        unet(torch.from_numpy(latents), t, context, return_dict=False)
        mean = ae.encode(torch.from_numpy(image)).latent_dist.mean
        ae.decode(mean)
    return trace


@pytest.fixture(scope="module")
def traces(tiny):
    ids = rng.integers(0, 1000, (2, 77))
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    ours = npsd_trace(tiny, ids, latents, 500.0, image)
    ref = reference_trace(tiny, ids, latents, 500.0, image, set(ours.names()))
    return ours, ref, (ids, latents, image)


def test_tiny_npsd_trace_matches_diffusers_hooks(traces):
    ours, ref, _ = traces
    assert ours.names() == ref.names()                       # the same blocks, in the same order
    outputs = [n for n in ours.names() if ":in" not in n]
    assert [n for n in outputs if f"{n}:in" not in ours] == []             # every block's input too
    assert ours["text_encoder.embeddings:in"].dtype == ref["text_encoder.embeddings:in"].dtype == np.int64
    worst = {}
    for name in ours.names():
        c = compare_traces({name: ours[name]}, {name: ref[name]}, TRACE_RTOL)[0][0][1]
        part = re.split(r"[.:#]", name)[0]
        worst[part] = max(worst.get(part, 0.0), c.max_rel)
        assert c.max_rel <= TRACE_RTOL, f"{c}; {c.first}"
    print("largest relative error per component:", {k: f"{v:.2g}" for k, v in worst.items()})
    for name in ("text_encoder.encoder.layers.2", "text_encoder.encoder.layers.0.self_attn", "unet.mid_block",
                 "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2", "unet.down_blocks.0:in",
                 "unet.up_blocks.1.upsamplers.0", "unet", "vae.encoder.down_blocks.1", "vae.decoder.up_blocks.0",
                 "vae.decoder.mid_block.attentions.0", "vae.quant_conv", "vae.post_quant_conv",
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff:in", "unet.time_embedding:in",
                 "vae.encoder.down_blocks.0.resnets.0:in", "vae.decoder.up_blocks.0.upsamplers.0:in",
                 "vae.decoder.conv_out:in", "text_encoder.final_layer_norm:in"):
        assert name in ours, name


def test_a_broken_block_is_the_first_difference(tiny, traces, monkeypatch, tmp_path, capsys):
    _, ref, (ids, latents, image) = traces
    good = unet_model.attention

    def broken(p, x, context, heads, trace=None):                # cross-attention 1% too strong
        out = good(p, x, context, heads)
        if context is not None:
            out = out * np.float32(1.01)
        unet_model._record(trace, ":in", x)
        unet_model._record(trace, "", out)
        return out
    monkeypatch.setattr(unet_model, "attention", broken)
    bad = npsd_trace(tiny, ids, latents, 500.0, image)
    rows, missing, extra, first = compare_traces(bad.tensors, ref.tensors, TRACE_RTOL)
    assert first == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    bad.save(tmp_path / "a.safetensors")
    ref.save(tmp_path / "b.safetensors")
    rc, out, err = run(["compare", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--tolerance", TRACE_RTOL], capsys)
    assert rc == 1, err
    marked = [line for line in out.splitlines() if ">>" in line]
    assert len(marked) == 1 and marked[0].startswith("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2 ")
    assert "first difference: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2" in out


def test_compare_exit_codes_and_listings(tmp_path, capsys):
    a, b = Trace(), Trace()
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for t in (a, b):
        t.record("unet.conv_in", x)
        t.record("unet.mid_block", x * 2)
    a.record("unet.only_a", x)
    b.record("unet.only_b", x)
    a.save(tmp_path / "a.safetensors", {"seed": 1})
    b.save(tmp_path / "b.safetensors")
    rc, out, err = run(["compare", tmp_path / "a.safetensors", tmp_path / "b.safetensors"], capsys)
    assert rc == 0, out + err
    assert "only in" in out and "unet.only_a" in out and "unet.only_b" in out
    many = Trace()                                                        # a file of 25 names B lacks:
    for i in range(25):                                                   # the first 20 listed, and the count
        many.record(f"unet.extra_{i}", x)
    many.save(tmp_path / "many.safetensors")
    rc, out, err = run(["compare", tmp_path / "many.safetensors", tmp_path / "b.safetensors"], capsys)
    assert rc == 1 and "no tensor names in common" in out
    listed = next(line for line in out.splitlines() if line.startswith(f"only in {tmp_path / 'many.safetensors'}"))
    assert listed.startswith(f"only in {tmp_path / 'many.safetensors'} (25): unet.extra_0, unet.extra_1, ")
    assert listed.endswith("unet.extra_19, ...") and "unet.extra_20" not in listed

    c = Trace()
    c.record("unet.conv_in", x)
    c.record("unet.mid_block", x * 2 + 1e-3)
    c.record("unet.only_b", np.zeros((3, 3), np.float32))                 # another shape
    c.save(tmp_path / "c.safetensors")
    rc, out, err = run(["compare", tmp_path / "c.safetensors", tmp_path / "b.safetensors", "--tolerance", 1e-6], capsys)
    assert rc == 1
    assert [line.split()[0] for line in out.splitlines() if ">>" in line] == ["unet.mid_block"]
    assert "shape (3, 3) vs (2, 3)" in out
    rc, out, err = run(["compare", tmp_path / "c.safetensors", tmp_path / "b.safetensors", "--tolerance", 1e-2], capsys)
    assert rc == 1 and "unet.only_b" in [line.split()[0] for line in out.splitlines() if ">>" in line]

    (tmp_path / "bad.safetensors").write_bytes(b"not a trace")
    rc, out, err = run(["compare", tmp_path / "bad.safetensors", tmp_path / "b.safetensors"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "bad.safetensors" in err
    rc, out, err = run(["compare", tmp_path / "missing.safetensors", tmp_path / "b.safetensors"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_trace_file_metadata_and_order(tmp_path):
    t = Trace()
    for name in ("z.first", "a.second", "m.third", "a.second"):
        t.record(name, np.ones(2, np.float32))
    assert t.names() == ["z.first", "a.second", "m.third", "a.second#2"]
    t.save(tmp_path / "t.safetensors", {"prompt": "a cat", "steps": 3})
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert json.loads(f.metadata["order"]) == t.names()
        assert json.loads(f.metadata["settings"]) == {"prompt": "a cat", "steps": 3}
        assert f.metadata["format"] == "npsd-trace/1"
    tensors, settings, _ = load(tmp_path / "t.safetensors")
    assert list(tensors) == t.names() and settings["steps"] == 3


def test_a_failed_save_leaves_the_path_as_it_was(tmp_path, monkeypatch):
    """Trace.save writes a temporary file and renames it: a write that fails halfway (a full disk)
    leaves no file, or the previous trace whole, and no temporary file; it wrote straight to the path."""
    import safetensors.numpy
    t = Trace()
    t.record("unet.conv_in", np.arange(6, dtype=np.float32))
    path = tmp_path / "t.safetensors"
    real = safetensors.numpy.save_file

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x80\x00\x00")                                  # a part of a file
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        t.save(path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    t.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        t.save(path)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before
    assert list(load(path)[0]) == ["unet.conv_in"]


def test_no_trace_records_nothing_and_unet_dict_trace_still_works(tiny):
    unet, _, ae = tiny
    vparams, vconf = to_numpy_params(ae.state_dict()), {"norm_groups": 8, "eps": 1e-6}
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    trace = Trace()
    np.testing.assert_array_equal(vae.decode(vparams, z, vconf), vae.decode(vparams, z, vconf, trace=trace))
    assert "vae.decoder.conv_out:in" in trace                # recorded beside the fast path, not instead of it
    params = to_numpy_params(unet.state_dict())
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 77, 24)).astype(np.float32)
    plain = unet_model.unet(params, latents, 10.0, context, TINY_SD_CONFIG)
    top = {}
    traced = unet_model.unet(params, latents, 10.0, context, TINY_SD_CONFIG, trace=top)
    np.testing.assert_array_equal(plain, traced)
    assert sorted(top) == sorted(["time_embedding", "conv_in", "mid_block"] + [f"down_blocks.{i}" for i in range(4)]
                                 + [f"up_blocks.{i}" for i in range(4)])


def test_pipeline_and_cli_trace_name_steps(model, tmp_path, capsys):  # noqa: F811 - the fixture
    out = tmp_path / "trace.safetensors"
    rc, stdout, err = run(["trace", "a red circle", "--model", model, "--steps", 3, "--trace-steps", "0,2",
                           "--height", 16, "--width", 16, "--seed", 7, "-o", out], capsys)
    assert rc == 0, err
    tensors, settings, meta = load(out)
    names = list(tensors)
    assert settings["seed"] == 7 and settings["steps"] == 3 and settings["prompt"] == "a red circle"
    assert json.loads(meta["steps"]) == [0, 2]
    assert "step0/unet.down_blocks.1" in names and "step2/unet.mid_block" in names
    assert not any(n.startswith("step1/") for n in names)
    assert names.index("text_encoder.encoder.layers.1") < names.index("step0/unet.conv_in") \
        < names.index("step2/unet") < names.index("vae.decoder.up_blocks.1")
    assert "text_encoder.final_layer_norm#2" in names                 # the negative prompt's encoding
    rc, _, err = run(["trace", "a red circle", "--model", model, "--steps", 1, "-o", out], capsys)
    assert rc == 2 and "exists" in err
    missing = tmp_path / "missing" / "t.safetensors"                    # was an internal error after the run
    rc, _, err = run(["trace", "a red circle", "--model", model, "--steps", 1, "-o", missing], capsys)
    assert rc == 2 and f"the folder of {missing} does not exist" in err
    rc, _, err = run(["trace", "a red circle", "--model", model, "--steps", 1, "-o", ""], capsys)   # was an
    assert rc == 2 and err == "npsd: error: -o is empty; give the name of the file to write\n", err  # error after the run
    rc, _, err = run(["trace", "a red circle", "--model", model, "--steps", 1, "-o", tmp_path / "t.png"], capsys)
    assert rc == 2 and "a trace is a .safetensors file" in err and not (tmp_path / "t.png").exists(), err
    rc, stdout, err = run(["compare", out, out], capsys)
    assert rc == 0, stdout + err
    rc, stdout, err = run(["trace", "a red circle", "--model", model, "--steps", 2, "--height", 16, "--width", 16,
                           "--only", r"unet\.mid_block", "-o", tmp_path / "mid.safetensors"], capsys)
    assert rc == 0, err
    assert list(load(tmp_path / "mid.safetensors")[0]) == ["step0/unet.mid_block", "step1/unet.mid_block"]


def test_a_trace_with_float16_weights(model, tmp_path, capsys):  # noqa: F811 - the fixture
    """--weights-dtype float16 traces the run with the weights rounded to float16 (the folder's are
    float32): the same tensors, each off by the rounding of the weights, about 2^-11 relative."""
    args = ["trace", "a red circle", "--model", model, "--steps", 2, "--height", 16, "--width", 16, "--seed", 3]
    for dtype in ("float32", "float16"):
        rc, _, err = run(args + ["--weights-dtype", dtype, "-o", tmp_path / f"{dtype}.safetensors"], capsys)
        assert rc == 0, err
    (single, _, _), (half, settings, _) = (load(tmp_path / f"{d}.safetensors") for d in ("float32", "float16"))
    assert settings["weights_dtype"] == "float16" and list(half) == list(single)
    worst = max(float(np.abs(half[n] - single[n]).max() / np.abs(single[n]).max()) for n in single)
    rc, stdout, _ = run(["compare", tmp_path / "float16.safetensors", tmp_path / "float32.safetensors",
                         "--tolerance", 1e-2], capsys)
    assert rc == 0, stdout
    print(f"largest relative difference of a traced tensor: {worst:.1e}")
    assert 1e-5 < worst < 1e-2


def test_a_trace_with_a_lora_a_vae_and_torch_noise(tmp_path, capsys):
    """--lora merges the file before the run and --rng torch starts from diffusers' noise: the CLI's
    trace equals the API's with the same LoRA and generator, its UNet input is torch's draw for the
    seed, and without the LoRA the first layer it changes is the first that differs. --vae changes
    the VAE's records only."""
    import npsd
    from tests.test_cli import run
    from tests.test_prompt_syntax_pipeline import write_lora
    pipe = npsd.load()
    lora = write_lora(tmp_path / "ink.safetensors", pipe)
    args = ["trace", "a red circle", "--steps", 2, "--sampler", "ddim", "--seed", 5, "--rng", "torch"]
    rc, _, err = run(args + ["--lora", f"{lora}:0.5", "-o", tmp_path / "lora.safetensors"], capsys)
    assert rc == 0, err
    rc, _, err = run(args + ["-o", tmp_path / "plain.safetensors"], capsys)
    assert rc == 0, err
    (cli, settings, _), (plain, _, _) = (load(tmp_path / f"{n}.safetensors") for n in ("lora", "plain"))
    assert settings["rng"] == "torch" and settings["lora"] == [[str(lora), 0.5]]
    pipe.load_lora(lora, 0.5)
    api = Trace()
    pipe.txt2img("a red circle", num_inference_steps=2, sampler="ddim", seed=5, rng="torch", output_type="np", trace=api)
    assert list(cli) == api.names() and all(np.array_equal(cli[n], api[n]) for n in cli)
    x = cli["step0/unet:in"]                                            # [uncond, cond] of the same latents
    noise = torch.randn((1,) + x.shape[1:], generator=torch.Generator().manual_seed(5)).numpy()
    assert np.array_equal(x[:1], noise) and np.array_equal(x[1:], noise)
    differ = [n for n in cli if not np.array_equal(cli[n], plain[n])]
    assert differ[0] == "text_encoder.encoder.layers.0.self_attn"       # the LoRA's first layer (q_proj)
    from safetensors.numpy import save_file
    from npsd.params import flatten
    save_file({k: v * np.float32(1.01) for k, v in flatten(npsd.load().params["vae"]).items()},
              str(tmp_path / "vae.safetensors"))                         # diffusers' names, scaled by 1.01
    rc, _, err = run(args + ["--vae", tmp_path / "vae.safetensors", "-o", tmp_path / "vae_trace.safetensors"], capsys)
    assert rc == 0, err
    other = load(tmp_path / "vae_trace.safetensors")[0]
    differ = [n for n in other if not np.array_equal(other[n], plain[n])]
    assert differ and all(n.startswith("vae.") for n in differ) and differ[0] == "vae.post_quant_conv"
    for option in ("--lora", "--vae"):
        rc, _, err = run(args + [option, tmp_path / "nope.safetensors", "-o", tmp_path / "x.safetensors"], capsys)
        assert rc == 2 and f"{option} {tmp_path / 'nope.safetensors'} does not exist" in err
        assert not (tmp_path / "x.safetensors").exists()


def test_a_generation_traces_the_run_it_makes(model, tmp_path, capsys):  # noqa: F811 - the fixture
    """txt2img / img2img / inpaint --trace FILE record the run that makes the PNG, with every option of
    the command: the API's trace of the same call, tensor for tensor; its VAE output is the PNG's
    pixels; --from-png of that PNG traces the same numbers again. `npsd trace` reads prompts with
    A1111's syntax, as the rest of the command line does."""
    import npsd
    from PIL import Image
    prompt = "a (red:1.3) circle"
    base = ["--model", model, "--steps", 2, "--height", 16, "--width", 16, "--seed", 4, "--quiet"]
    png, traced = tmp_path / "a.png", tmp_path / "a.safetensors"
    rc, stdout, err = run(["txt2img", prompt, *base, "--clip-skip", 1, "--sampler", "dpmpp_2m", "--karras",
                           "-o", png, "--trace", traced], capsys)
    assert rc == 0, err
    assert stdout.split() == [str(png), str(traced)]
    cli, settings, _ = load(traced)
    assert (settings["clip_skip"], settings["karras"], settings["mode"]) == (1, True, "txt2img")
    api = Trace()
    npsd.load(model).txt2img(prompt, num_inference_steps=2, height=16, width=16, seed=4, clip_skip=1,
                             sampler="dpmpp_2m", use_karras_sigmas=True, prompt_syntax="a1111", output_type="np",
                             trace=api)
    assert list(cli) == api.names() and all(np.array_equal(cli[n], api[n]) for n in cli)
    pixels = np.round(np.clip(cli["vae.decoder"][0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255)
    assert np.array_equal(pixels, np.asarray(Image.open(png)))
    again = tmp_path / "again.safetensors"
    rc, _, err = run(["txt2img", "--from-png", png, "--model", model, "-o", tmp_path / "b.png", "--quiet",
                      "--trace", again], capsys)
    assert rc == 0, err
    rc, stdout, _ = run(["compare", again, traced, "--tolerance", 1e-30], capsys)
    assert rc == 0 and "0 over the tolerance" in stdout, stdout
    rc, _, err = run(["img2img", prompt, *base, "--image", png, "-o", tmp_path / "c.png", "--trace",
                      tmp_path / "c.safetensors"], capsys)
    assert rc == 0, err
    assert "vae.encoder" in load(tmp_path / "c.safetensors")[0]
    # npsd trace: the same text encoder inputs as txt2img's, unless --prompt-syntax plain
    short = ["--model", model, "--steps", 1, "--height", 16, "--width", 16, "--seed", 4]
    for name, extra in (("syntax", []), ("plain", ["--prompt-syntax", "plain"])):
        rc, _, err = run(["trace", prompt, *short, *extra, "-o", tmp_path / f"{name}.safetensors"], capsys)
        assert rc == 0, err
    rc, _, err = run(["txt2img", prompt, *short, "--quiet", "-o", tmp_path / "d.png", "--trace",
                      tmp_path / "d.safetensors"], capsys)
    assert rc == 0, err
    (syntax, _, _), (plain, _, _), (gen, _, _) = (load(tmp_path / f"{n}.safetensors") for n in ("syntax", "plain", "d"))
    assert list(syntax) == list(gen) and all(np.array_equal(syntax[n], gen[n]) for n in gen)
    assert not np.array_equal(plain["text_encoder.embeddings:in"], gen["text_encoder.embeddings:in"])
    # refused before any work: a name that is not .safetensors, an existing file
    for trace_file, phrase in ((tmp_path / "t.png", "a trace is a .safetensors file"),
                               (traced, "already exists; use --overwrite to replace it or --trace")):
        rc, _, err = run(["txt2img", prompt, *base, "-o", tmp_path / "e.png", "--trace", trace_file], capsys)
        assert rc == 2 and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "t.png").exists()
