"""A1111's prompt syntax, LoRA tags and embeddings inside the pipelines and the command line.

npsd/prompts.py and npsd/lora.py are checked against their references in tests/test_prompts.py and
tests/test_lora.py; here the pipelines must use them as documented: a plain prompt gives the same
numbers in either syntax, weighted prompts use the weighted contexts, prompt editing switches the
context at the model call A1111 would, <lora:NAME:S> equals loading NAME with strength S for that
call only (the base weights come back bit for bit), and the PNG parameters record and restore it all.
The model is the built-in one (npsd.load()), with a few steps.
"""

import hashlib

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import npsd
from npsd import cli, prompts
from npsd.errors import InputError
from npsd.pngmeta import parse_parameters, read_parameters

PROMPT = "a red circle on a blue background"
KW = dict(num_inference_steps=3, sampler="ddim", seed=4, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return npsd.load()


LORA_LAYERS = {  # kohya name -> npsd parameter (diffusers names)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight"),
}


def write_lora(path, pipe, seed=0, rank=4):
    """A kohya-format LoRA on two UNet attention projections and one text-encoder projection."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for kohya, (comp, key) in LORA_LAYERS.items():
        out_f, in_f = npsd.params.flatten(pipe.params[comp])[key].shape
        tensors[f"{kohya}.lora_down.weight"] = (0.3 * rng.standard_normal((rank, in_f))).astype(np.float32)
        tensors[f"{kohya}.lora_up.weight"] = (0.3 * rng.standard_normal((out_f, rank))).astype(np.float32)
        tensors[f"{kohya}.alpha"] = np.array(2.0, np.float32)
    save_file(tensors, str(path))
    return path


def test_a_plain_prompt_gives_the_same_numbers_in_both_syntaxes(pipe):
    long_plain = ", ".join(["a red circle on a blue background"] * 12)          # over 77 tokens
    for prompt in (PROMPT, long_plain):
        a = pipe.txt2img(prompt, **KW)
        b = pipe.txt2img(prompt, prompt_syntax="a1111", **KW)
        assert np.array_equal(a, b), prompt


def test_weighted_prompt_uses_the_weighted_contexts(pipe):
    cond, uncond, batch, _ = pipe._contexts("a (red:1.5) circle", "", 2, 7.5, None, "truncate", "a1111", 3)
    weighted = prompts.encode_weighted(pipe, ["a (red:1.5) circle"])
    assert batch == 2 and cond.shape == (2, 77, weighted.shape[-1])
    assert np.array_equal(cond, np.repeat(weighted, 2, axis=0))
    # the empty negative prompt has no syntax: its weighted encoding equals the plain one
    np.testing.assert_allclose(uncond[:1], pipe.encode_text(pipe.tokenize([""])), rtol=0, atol=1e-6)
    plain = pipe.txt2img("a (red:1.5) circle", **KW)
    assert not np.array_equal(plain, pipe.txt2img("a (red:1.5) circle", prompt_syntax="a1111", **KW))


@pytest.mark.parametrize("emphasis", ["no_norm", "ignore", "none"])
def test_emphasis_modes_use_their_contexts(pipe, monkeypatch, emphasis):
    """emphasis= (A1111's "Emphasis mode"): the UNet sees npsd.prompts.encode_weighted's contexts of that
    mode (tests/test_prompts.py checks them against A1111's formulas), not the "original" ones; in
    plain syntax it is one line."""
    seen = _record_contexts(pipe, monkeypatch)
    pipe.txt2img("a (red:1.5) circle", prompt_syntax="a1111", guidance_scale=1.0, emphasis=emphasis, **KW)
    expected = prompts.encode_weighted(pipe, ["a (red:1.5) circle"], emphasis=emphasis)
    original = prompts.encode_weighted(pipe, ["a (red:1.5) circle"])
    assert np.abs(expected - original).max() > 1e-2
    for context in seen:
        np.testing.assert_allclose(context, expected, rtol=0, atol=2e-5)
    with pytest.raises(InputError, match=f"emphasis='{emphasis}' is A1111's way of weighting .* give prompt_syntax='a1111'"):
        pipe.txt2img("a red circle", emphasis=emphasis, **KW)
    with pytest.raises(InputError, match="emphasis must be one of original, no_norm, ignore, none, got 'No norm'"):
        pipe.txt2img("a red circle", emphasis="No norm", prompt_syntax="a1111", **KW)


def _record_contexts(pipe, monkeypatch):
    seen = []
    unet = pipe.unet

    def recording(x, t, context):
        seen.append(context)
        return unet(x, t, context)
    monkeypatch.setattr(pipe, "unet", recording)
    return seen


def test_prompt_editing_switches_at_the_model_call(pipe, monkeypatch):
    """[red:blue:2] over 5 steps: A1111 uses "red" for model calls 0-2 and "blue" from call 3 on."""
    seen = _record_contexts(pipe, monkeypatch)
    pipe.txt2img("a [red:blue:2] circle", prompt_syntax="a1111", guidance_scale=1.0, num_inference_steps=5,
                 sampler="ddim", seed=1, output_type="latent")
    red = pipe.encode_text(pipe.tokenize(["a red circle"]))
    blue = pipe.encode_text(pipe.tokenize(["a blue circle"]))
    assert len(seen) == 5
    for k, context in enumerate(seen):
        expected = red if k <= 2 else blue
        # measured: 0 with OpenBLAS's SkylakeX kernels, 1.8e-6 with its Haswell kernels (a row rounds
        # differently at another place in the batch); "red" and "blue" differ by 0.1 and more
        np.testing.assert_allclose(context, expected, rtol=0, atol=2e-5, err_msg=f"model call {k}")


def test_alternation_and_two_stage_samplers_count_model_calls(pipe, monkeypatch):
    """[red|blue] alternates every model call; Heun calls the model twice a step (A1111 counts both)."""
    seen = _record_contexts(pipe, monkeypatch)
    pipe.txt2img("a [red|blue] circle", prompt_syntax="a1111", guidance_scale=1.0, num_inference_steps=3,
                 sampler="heun", seed=1, output_type="latent")
    red = pipe.encode_text(pipe.tokenize(["a red circle"]))
    blue = pipe.encode_text(pipe.tokenize(["a blue circle"]))
    assert len(seen) == 5                                    # 3 steps, 2 evaluations but in the last
    words = ["red" if np.abs(c - red).max() < 2e-5 else "blue" if np.abs(c - blue).max() < 2e-5 else "?"
             for c in seen]
    expected = [prompts.text_at_step(prompts.prompt_schedule("a [red|blue] circle", 6), k).split()[1]
                for k in range(5)]
    assert words == expected and "?" not in words and {"red", "blue"} <= set(words)


def test_lora_tag_applies_for_the_call_only(pipe, tmp_path):
    write_lora(tmp_path / "ink.safetensors", pipe)
    base = pipe.txt2img(PROMPT, **KW)
    pipe.lora_dir = str(tmp_path)
    try:
        tagged = pipe.txt2img(PROMPT + " <lora:ink:0.5>", prompt_syntax="a1111", **KW)
        pipe.load_lora(tmp_path / "ink.safetensors", 0.5)
        explicit = pipe.txt2img(PROMPT, **KW)
        pipe.unload_lora()
        assert np.array_equal(tagged, explicit)
        assert not np.allclose(tagged, base, atol=1e-3)
        assert np.array_equal(pipe.txt2img(PROMPT, **KW), base)           # the base weights are back, exactly
        assert pipe.loras == {}
        with pytest.raises(InputError, match=r"no missing\.safetensors/\.pt/\.ckpt in"):
            pipe.txt2img(PROMPT + " <lora:missing:1>", prompt_syntax="a1111", **KW)
        with pytest.raises(InputError, match=r"<lora:\.\./ink>"):
            pipe.txt2img(PROMPT + " <lora:../ink:1>", prompt_syntax="a1111", **KW)
        assert np.array_equal(pipe.txt2img(PROMPT, **KW), base)
    finally:
        pipe.lora_dir = None
    with pytest.raises(InputError, match="no LoRA folder is set"):
        pipe.txt2img(PROMPT + " <lora:ink:1>", prompt_syntax="a1111", **KW)
    with pytest.raises(InputError) as caught:                            # a name with a newline: one line
        pipe.txt2img(PROMPT + " <lora:in\nk:1>", prompt_syntax="a1111", **KW)
    assert "\n" not in str(caught.value) and "'<lora:in\\nk>' but no LoRA folder is set" in str(caught.value)
    with pytest.raises(InputError, match="prompt_syntax must be one of plain, a1111"):
        pipe.txt2img(PROMPT, prompt_syntax="comfy", **KW)


# --- the command line -------------------------------------------------------------------------------

def run(args, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def fields(path):
    return parse_parameters(read_parameters(path))["fields"]


def addnet_hash(path):
    data = open(path, "rb").read()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


SMALL = ["--steps", "2", "--seed", "5", "--quiet"]


def test_cli_lora_option_tag_and_from_png(pipe, tmp_path, capsys):
    lora = write_lora(tmp_path / "ink.safetensors", pipe)
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    rc, _, err = run(["txt2img", PROMPT, "-o", a, "--lora", f"{lora}:0.5"] + SMALL, capsys)
    assert rc == 0, err
    f = fields(a)
    assert (f["Lora"], f["Lora hashes"], f["Prompt syntax"]) == ("ink: 0.5", f"ink: {addnet_hash(lora)}", "a1111")
    rc, _, err = run(["txt2img", PROMPT + " <lora:ink:0.5>", "-o", b, "--lora-dir", tmp_path] + SMALL, capsys)
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert fields(b)["Lora hashes"] == f"ink: {addnet_hash(lora)}"
    rc, _, err = run(["txt2img", "--from-png", a, "-o", c, "--quiet"], capsys)
    assert rc == 2 and "the image used the LoRA 'ink'; give --lora-dir" in err
    rc, _, err = run(["txt2img", "--from-png", a, "-o", c, "--quiet", "--lora-dir", tmp_path], capsys)
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))
    rc, _, err = run(["txt2img", PROMPT, "-o", tmp_path / "d.png", "--lora", tmp_path / "nope.safetensors"] + SMALL,
                     capsys)
    assert rc == 2 and "nope.safetensors does not exist" in err


def test_cli_prompt_syntax_plain_and_embeddings(pipe, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    rc, _, err = run(["txt2img", "a (red:1.5) circle", "-o", a] + SMALL, capsys)
    assert rc == 0, err
    rc, _, err = run(["txt2img", "a (red:1.5) circle", "-o", b, "--prompt-syntax", "plain"] + SMALL, capsys)
    assert rc == 0, err
    assert fields(b)["Prompt syntax"] == "plain"
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    c = tmp_path / "c.png"
    rc, _, err = run(["txt2img", "--from-png", b, "-o", c, "--quiet"], capsys)
    assert rc == 0 and b.read_bytes() == c.read_bytes(), err
    # an embedding named in the prompt, from --embeddings-dir (A1111's .safetensors layout)
    emb_dir = tmp_path / "embeddings"
    emb_dir.mkdir()
    width = npsd.params.flatten(pipe.params["text_encoder"])["embeddings.token_embedding.weight"].shape[1]
    save_file({"emb_params": np.random.default_rng(1).standard_normal((2, width)).astype(np.float32)},
              str(emb_dir / "inkstyle.safetensors"))
    d, e = tmp_path / "d.png", tmp_path / "e.png"
    rc, _, err = run(["txt2img", "a red circle, inkstyle", "-o", d, "--embeddings-dir", emb_dir] + SMALL, capsys)
    assert rc == 0, err
    assert fields(d)["TI hashes"] == f"inkstyle: {addnet_hash(emb_dir / 'inkstyle.safetensors')}"
    rc, _, err = run(["txt2img", "--from-png", d, "-o", e, "--quiet"], capsys)
    assert rc == 2 and "the image used the embeddings inkstyle; give --embeddings-dir" in err
    rc, _, err = run(["txt2img", "--from-png", d, "-o", e, "--quiet", "--embeddings-dir", emb_dir], capsys)
    assert rc == 0 and d.read_bytes() == e.read_bytes(), err
