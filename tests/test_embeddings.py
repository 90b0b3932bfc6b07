"""Textual-inversion embeddings (npsd/embeddings.py) against diffusers' load_textual_inversion.

Files in each format (A1111 .pt and .safetensors, diffusers learned_embeds.bin / .safetensors,
single- and multi-vector) hold random vectors; they are loaded into npsd and into a diffusers
StableDiffusionPipeline built from the same tiny random components (text encoder perturbed as in
tests/helpers.py). Token ids must be equal; text-encoder outputs agree within RTOL = 5e-6 relative
(max abs error / max |reference|; measured 6.5e-7, float32 rounding; a wrong or missing row differs by O(1)).
"""

import copy
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import npsd
from npsd import embeddings, prompts
from npsd.config import sd15_config
from npsd.errors import CheckpointError, InputError
from npsd.testing import assert_close
from npsd.tokenizer import Tokenizer
from tests.helpers import perturb_, t2n, to_numpy_params

RTOL = 5e-6
WIDTH = 32
TINY = dict(vocab_size=49408, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def parts():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(**TINY)).eval(), seed=5)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return {"text": text, "unet": unet.eval(), "vae": vae.eval(),
            "scheduler": DDIMScheduler(steps_offset=1, clip_sample=False)}


def fresh(parts):
    """A new diffusers pipeline (its own copy of the text encoder) and an npsd pipeline with the same weights."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    from npsd.weights import path as weights_path
    text = copy.deepcopy(parts["text"])
    tok = CLIPTokenizer(str(weights_path("vocab.json")), str(weights_path("merges.txt")), model_max_length=77)
    ref = StableDiffusionPipeline(vae=parts["vae"], text_encoder=text, tokenizer=tok, unet=parts["unet"],
                                  scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    sd = text.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    config = sd15_config()
    config["text_encoder"]["num_heads"] = 4
    pipe = npsd.Pipeline({"text_encoder": to_numpy_params(sd, prefix, drop=("position_ids",))}, config)
    return ref, pipe


def reference(ref, prompt):
    """diffusers: (token ids [77], encode_prompt output [1, 77, W]) for one prompt."""
    text = ref.maybe_convert_prompt(prompt, ref.tokenizer)
    ids = ref.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        embeds, _ = ref.encode_prompt(prompt, torch.device("cpu"), 1, False)
    return np.array(ids), t2n(embeds)


def write_files(folder, gen):
    """One file per format; returns {file: (token diffusers is given or None, vectors)}."""
    def vec(n):
        return torch.randn(n, WIDTH, generator=gen)
    files = {}
    v = vec(3)                                                       # A1111 .pt, 3 vectors
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "trained-name", "step": 500,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, folder / "zq-style.pt")
    files["zq-style.pt"] = ("zq-style", v)
    v = vec(1)                                                       # A1111 .pt, 1 vector
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x", "step": 1,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, folder / "zqone.pt")
    files["zqone.pt"] = ("zqone", v)
    v = vec(2)                                                       # A1111 / kohya .safetensors, 2 vectors
    save_file({"emb_params": v}, str(folder / "zqneg.safetensors"))
    files["zqneg.safetensors"] = ("zqneg", v)
    v = vec(1)[0]                                                    # diffusers .bin, one vector [W]
    (folder / "toy").mkdir()
    torch.save({"<zq-toy>": v}, folder / "toy" / "learned_embeds.bin")
    files["toy/learned_embeds.bin"] = (None, v[None])
    v = vec(2)                                                       # diffusers .safetensors, 2 vectors
    (folder / "dog").mkdir()
    save_file({"<zq-dog>": v}, str(folder / "dog" / "learned_embeds.safetensors"))
    files["dog/learned_embeds.safetensors"] = (None, v)
    return files


PROMPT = "a zq-style photo of <zq-toy> and <zq-dog> , zqone zqneg art, zq-style"


def test_every_format_matches_diffusers(parts, tmp_path):
    ref, pipe = fresh(parts)
    files = write_files(tmp_path, torch.Generator().manual_seed(0))
    for name, (token, vectors) in files.items():
        vectors_np, _ = embeddings.read_embedding(tmp_path / name)
        np.testing.assert_array_equal(vectors_np, vectors.numpy())
        word, ids = embeddings.load_embedding(pipe, tmp_path / name)
        assert word == (token or {"toy/learned_embeds.bin": "<zq-toy>", "dog/learned_embeds.safetensors": "<zq-dog>"}[name])
        assert len(ids) == len(vectors)
        ref.load_textual_inversion(str(tmp_path / name), token=token)
    ref_ids, ref_out = reference(ref, PROMPT)
    ids = pipe.tokenize(PROMPT)[0]
    assert ids.tolist() == ref_ids.tolist()
    assert sorted(set(ids.tolist()) - set(range(49408))) == list(range(49408, 49408 + 9))   # all 9 new ids used
    print(assert_close(pipe.encode_text(ids[None]), ref_out, RTOL, "text encoder with embeddings"))
    # the A1111-syntax path reads the same ids and gives the same numbers
    assert np.array_equal(prompts.encode_weighted(pipe, PROMPT), pipe.encode_text(ids[None]))
    # where the two differ: A1111 (and npsd) match a word by its tokens, and CLIP reads ">," as one
    # token, so "<zq-dog>," is not the word; diffusers matches the literal text anywhere
    assert not set(pipe.tokenize("<zq-dog>,")[0].tolist()) & set(pipe.tokenizer.added_words["<zq-dog>"])
    assert reference(ref, "<zq-dog>,")[0][1] == pipe.tokenizer.added_words["<zq-dog>"][0]


def test_multi_vector_word_stays_in_one_chunk(parts, tmp_path):
    _, pipe = fresh(parts)
    save_file({"emb_params": torch.randn(8, WIDTH)}, str(tmp_path / "bigemb.safetensors"))
    _, new = embeddings.load_embedding(pipe, tmp_path / "bigemb.safetensors")
    a = pipe.tokenizer.encode("a")[0][0]
    ids, m = prompts.tokenize_weighted(pipe.tokenizer, "a " * 70 + "(bigemb:1.2)")   # 70 + 8 > 75: next chunk
    assert ids[0, 1:72].tolist() == [a] * 70 + [pipe.tokenizer.eos_id]
    assert ids[1, 1:9].tolist() == new and m[1, 1:9].tolist() == [np.float32(1.2)] * 8


def test_words_match_by_tokens_like_a1111(parts, tmp_path):
    _, pipe = fresh(parts)
    tok = pipe.tokenizer
    style = embeddings.add_embedding(pipe, "MyStyle", np.ones((2, WIDTH), np.float32))
    my = embeddings.add_embedding(pipe, "my", np.zeros((1, WIDTH), np.float32))
    ids = tok.encode("a mystyle photo, my cat, mystyles")[0]
    plain = Tokenizer.default()
    enc = lambda text: plain.encode(text)[0]                            # noqa: E731
    # case-insensitive; "my" inside "mystyle" is not the word "my"; "mystyles" is neither word
    assert ids == enc("a") + style + enc("photo ,") + my + enc("cat ,") + enc("mystyles")
    assert tok.decode(tok("a mystyle photo")[0]) == "a MyStyle photo"
    assert embeddings.add_embedding(pipe, "MyStyle", np.ones((2, WIDTH), np.float32)) == style   # same again: nothing
    with pytest.raises(InputError, match="already loaded"):
        embeddings.add_embedding(pipe, "MyStyle", np.zeros((2, WIDTH), np.float32))
    with pytest.raises(InputError, match="already added"):
        embeddings.add_embedding(pipe, "mystyle", np.zeros((2, WIDTH), np.float32))
    table = pipe.params["text_encoder"]["embeddings"]["token_embedding"]["weight"]
    assert table.shape == (49408 + 3, WIDTH) and (table[style] == 1).all()


def test_embeddings_folder(parts, tmp_path):
    _, pipe = fresh(parts)
    write_files(tmp_path, torch.Generator().manual_seed(1))
    torch.save({"string_to_param": {"*": torch.randn(2, 1024)}, "name": "sd2"}, tmp_path / "sdtwo.pt")   # SD 2.x
    loaded = embeddings.load_used_embeddings(pipe, tmp_path, ["a (zq-style:1.2) photo", "[zqneg:blurry:0.5]"])
    assert loaded == ["zq-style", "zqneg"] and set(pipe.tokenizer.added_words) == {"zq-style", "zqneg"}
    assert embeddings.load_used_embeddings(pipe, tmp_path, ["zq-style"]) == []          # already loaded
    with pytest.raises(InputError, match=r"sdtwo.pt .*1024 wide.* 32 wide"):              # used: refused
        embeddings.load_used_embeddings(pipe, tmp_path, ["a photo", "sdtwo"])
    save_file({"emb_params": torch.randn(1, WIDTH)}, str(tmp_path / "zqone.safetensors"))
    with pytest.raises(InputError, match="2 embedding files are named 'zqone'"):
        embeddings.load_used_embeddings(pipe, tmp_path, ["zqone"])
    with pytest.raises(InputError, match="not a folder"):
        embeddings.load_used_embeddings(pipe, tmp_path / "nowhere", ["a"])


def test_wrong_widths_are_one_line_errors(parts, tmp_path):
    _, pipe = fresh(parts)
    torch.save({"string_to_param": {"*": torch.randn(2, 1024)}, "name": "sd2"}, tmp_path / "sd2.pt")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    wide = r"\[2, 1024\] \(1024 wide\) but this text encoder's token embeddings are 32 wide"
    with pytest.raises(InputError, match=wide) as e:
        embeddings.load_embedding(pipe, tmp_path / "sd2.pt")
    assert "\n" not in str(e.value) and "sd2.pt" in str(e.value)
    with pytest.raises(InputError, match=r"SDXL embedding .*768 \+ 1280 wide") as e:
        embeddings.load_embedding(pipe, tmp_path / "xl.safetensors")
    assert "\n" not in str(e.value)
    assert pipe.tokenizer.added_words == {}                           # nothing half-added


def test_not_embeddings_are_refused(parts, tmp_path):
    _, pipe = fresh(parts)
    torch.save({"a": torch.zeros(2, WIDTH), "b": torch.zeros(2, WIDTH)}, tmp_path / "two.bin")
    save_file({"a": torch.zeros(WIDTH), "b": torch.zeros(WIDTH)}, str(tmp_path / "two.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH), "+": torch.zeros(1, WIDTH)}}, tmp_path / "terms.pt")
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4), "first_stage_model.x": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    save_file({"lora_te_x.lora_down.weight": torch.zeros(2, 4), "lora_te_x.lora_up.weight": torch.zeros(4, 2)},
              str(tmp_path / "lora.safetensors"))
    for name, match in [("two.bin", "not a textual-inversion embedding"), ("two.safetensors", "holds 2 tensors"),
                        ("terms.pt", "exactly one tensor"), ("missing.pt", "does not exist"),
                        ("model.safetensors", "holds 2 tensors .*; this is a whole SD checkpoint: give it as the model"),
                        ("lora.safetensors", "this is a LoRA: give it with --lora or put it in --lora-dir")]:
        with pytest.raises(InputError, match=match):
            embeddings.load_embedding(pipe, tmp_path / name)


def test_malicious_pt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}, "name": "evil", "step": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*system"):
        embeddings.read_embedding(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)                              # the payload is live: torch runs it
    assert marker.exists()
    # the first textual-inversion scripts pickled a torch.nn.ParameterDict: a class, also refused
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, WIDTH))})},
               tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="ParameterDict"):
        embeddings.read_embedding(tmp_path / "old.pt")


def test_reading_embeddings_never_imports_torch(tmp_path):
    import subprocess
    import sys
    torch.save({"string_to_param": {"*": torch.ones(2, WIDTH)}, "name": "e"}, tmp_path / "e.pt")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from npsd import embeddings\n"
            f"v, _ = embeddings.read_embedding({str(tmp_path / 'e.pt')!r})\n"
            f"assert v.shape == (2, {WIDTH}) and (v == 1).all()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
